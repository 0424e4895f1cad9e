"""CUDA tests of the weight-dropped LSTM on cuDNN: agreement with nn.LSTM, gradients, the flat weight buffer
through .to/.half/load_state_dict/ASGD swaps, and memory per step against plain cuDNN layers.

Every test is marked gpu: `make test` deselects them; on a GPU machine `make gpu-check` runs them, or
    python -m pytest -m gpu tests/test_gpu.py
Inside the checked calls warnings are errors, so cuDNN's per-call "RNN module weights are not part of single
contiguous chunk of memory" warning (it then copies every weight at every call) fails the test.
"""

import contextlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harness.gpu_check.probes import peak_step_bytes, weight_drop_memory
from harness.config import HIDDEN_MODES, DropoutConfig, ModelConfig, RunConfig, TrainConfig
from harness.dropout import WeightDropLSTM
from harness.model import AWDLSTM
from harness.train import NTASGD
from test_dropout import lstm_like, run

pytestmark = [pytest.mark.fast, 
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)"),
]

P = 0.4


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@contextlib.contextmanager
def no_warnings():
    """Warnings raised inside are errors: cuDNN's weight-compaction warning among them."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def assert_one_buffer(weights: list[torch.Tensor]) -> None:
    """The four weights the kernel got live in one storage: cuDNN's flat buffer (cuDNN owns the layout)."""
    assert len({w.untyped_storage().data_ptr() for w in weights}) == 1


def test_cuda_reaches_cudnn_without_weight_copies(kernel_calls):
    layer = WeightDropLSTM(32, 48, weight_p=P).cuda()
    x = torch.randn(10, 4, 32, device="cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            layer.zero_grad()  # keep only the last call's gradient, to compare with its mask
            out, _ = layer(x)
            out.sum().backward()
        torch.cuda.synchronize()
    assert [str(w.message) for w in caught] == []
    assert_one_buffer(kernel_calls[-1][0])
    mask = kernel_calls[-1][1] / layer.weight_hh_raw.detach()
    grad = layer.weight_hh_raw.grad
    assert (grad[mask == 0] == 0).all() and (grad[mask != 0] != 0).all()
    layer.weight_p = 0.0
    torch.testing.assert_close(run(layer, x), run(lstm_like(layer).cuda(), x))


@pytest.mark.parametrize("weight_p, train", [(0.0, True), (P, False)], ids=["rate-0", "eval"])
def test_matches_nn_lstm_on_cudnn_at_rate_zero_and_in_eval(weight_p, train):
    layer = WeightDropLSTM(32, 48, weight_p).cuda().train(train)
    lstm = lstm_like(layer).train(train)
    x = torch.randn(9, 5, 32, device="cuda")
    state = (torch.randn(1, 5, 48, device="cuda"), torch.randn(1, 5, 48, device="cuda"))
    with no_warnings():
        ours, theirs = run(layer, x, state), run(lstm, x, state)
        torch.testing.assert_close(ours, theirs)
        if train:  # cuDNN has no backward in eval mode
            probe = torch.randn_like(ours)
            (ours * probe).sum().backward()
            (theirs * probe).sum().backward()
    if train:
        for mine, reference in [(layer.weight_hh_raw, lstm.weight_hh_l0), (layer.weight_ih, lstm.weight_ih_l0),
                                (layer.bias_ih, lstm.bias_ih_l0), (layer.bias_hh, lstm.bias_hh_l0)]:
            torch.testing.assert_close(mine.grad, reference.grad)


def test_raw_w_hh_gets_the_masked_gradient_exactly_where_the_mask_kept_it(kernel_calls):
    layer = WeightDropLSTM(32, 64, weight_p=P).cuda()
    x = torch.randn(12, 6, 32, device="cuda")
    with no_warnings():
        out = run(layer, x)
        probe = torch.randn_like(out)
        (out * probe).sum().backward()
    masked = kernel_calls[-1][1]
    mask = masked / layer.weight_hh_raw.detach()  # 0 or 1/(1-p)
    assert ((mask == 0) | torch.isclose(mask, torch.tensor(1 / (1 - P), device="cuda"))).all()
    # nn.LSTM given the masked W_hh computes the same output; chain rule: d/d raw = mask * d/d masked.
    reference = lstm_like(layer, masked)
    (run(reference, x) * probe).sum().backward()
    torch.testing.assert_close(layer.weight_hh_raw.grad, reference.weight_hh_l0.grad * mask)
    assert (layer.weight_hh_raw.grad[mask == 0] == 0).all()


def test_a_training_step_costs_only_the_mask_and_the_masked_gradient_beyond_nn_lstm():
    # Input much wider than hidden: a per-call copy of the flat buffer (9 x W_hh here) cannot hide.
    with no_warnings():
        memory = weight_drop_memory([(2048, 256)], batch_size=8, bptt=20, weight_p=0.5, device="cuda")
    assert memory.held_extra == pytest.approx(memory.w_hh_bytes, rel=0.02)  # the raw W_hh beside the buffer
    # The mask lives through the whole step, the masked gradient from backward on: 1 to 2 x W_hh.
    assert 0.9 * memory.w_hh_bytes <= memory.step_extra <= 2.5 * memory.w_hh_bytes
    assert memory.flat_bytes > 8 * memory.w_hh_bytes


def test_the_memory_probe_sees_cudnn_compacting_scattered_weights_at_every_call():
    # The control for the test above: nn.LSTM with W_hh moved out of its flat buffer makes cuDNN copy all
    # its weights at each call, and the probe must see that copy.
    x = torch.randn(20, 8, 2048, device="cuda")
    flat = nn.ModuleList([nn.LSTM(2048, 256)]).cuda()
    scattered = nn.ModuleList([nn.LSTM(2048, 256)]).cuda()
    scattered[0].weight_hh_l0.data = scattered[0].weight_hh_l0.data.clone()
    flat_bytes = 4 * 256 * (2048 + 256 + 2) * 4
    peak_step_bytes(flat, x)
    with pytest.warns(UserWarning, match="contiguous chunk"):
        peak_step_bytes(scattered, x)  # warm-up
        extra = peak_step_bytes(scattered, x) - peak_step_bytes(flat, x)
    assert extra >= 0.9 * flat_bytes


def test_flat_buffer_survives_to_half_and_load_state_dict(kernel_calls):
    x = torch.randn(8, 3, 32, device="cuda")

    def check(layer, x, **tolerance):
        """Eval output equals nn.LSTM's, a training step runs, and cuDNN got one buffer without a warning."""
        with no_warnings():
            out = run(layer.eval(), x)
            run(layer.train(), x).float().sum().backward()
        assert_one_buffer(kernel_calls[-1][0])
        torch.testing.assert_close(out, run(lstm_like(layer).eval(), x), **tolerance)

    layer = WeightDropLSTM(32, 48, weight_p=P).to("cuda")  # built on the CPU, moved
    check(layer, x)
    layer.half()
    check(layer, x.half())
    layer.float().cpu().cuda()
    check(layer, x)
    source = WeightDropLSTM(32, 48, weight_p=P).cuda()
    pointer = layer.weight_ih.data_ptr()
    layer.load_state_dict(source.state_dict())
    assert layer.weight_ih.data_ptr() == pointer  # copied into the buffer, not beside it
    check(layer, x)
    torch.testing.assert_close(run(layer.eval(), x), run(source.eval(), x), rtol=0, atol=0)
    layer.load_state_dict(WeightDropLSTM(32, 48, weight_p=P).cuda().state_dict(), assign=True)
    check(layer, x)  # new tensors: the next forward builds a new buffer


def test_asgd_weight_swaps_keep_cudnn_fed_from_the_flat_buffer():
    config = RunConfig("ptb", "awd", ModelConfig(16, 32, 2), DropoutConfig(0.1, 0.2, 0.2, 0.2, 0.5),
                       TrainConfig(lr=1.0))
    model = AWDLSTM(50, config.model, config.dropout).cuda()
    optimizer = NTASGD(model, config)
    optimizer.start_averaging()
    tokens = torch.randint(50, (11, 4), device="cuda")

    def step():
        logits = model.train()(tokens[:-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[1:].flatten())
        optimizer.opt.zero_grad()
        loss.backward()
        optimizer.opt.step()

    pointers = [layer.weight_ih.data_ptr() for layer in model.layers]
    with no_warnings():
        step()
        step()
        with optimizer.averaged_weights():  # the harness swaps with copy_
            averaged = model.eval()(tokens[:-1]).logits
        step()
    assert [layer.weight_ih.data_ptr() for layer in model.layers] == pointers
    # The reference code swaps with `.data =` (main.py: prm.data = optimizer.state[prm]['ax'].clone(), and back
    # after evaluating): the layers rebuild their buffer at the next forward, each time without a warning.
    with no_warnings():
        step()  # the raw weights now differ from the averaged ones
        own = {p: p.data.clone() for p in model.parameters()}
        for p in model.parameters():
            p.data = optimizer.opt.state[p]["ax"].clone()
        swapped = model.eval()(tokens[:-1]).logits
        with optimizer.averaged_weights():
            averaged = model.eval()(tokens[:-1]).logits
        for p in model.parameters():
            p.data = own[p].clone()
        step()
    torch.testing.assert_close(swapped, averaged)


@pytest.mark.parametrize("mode", HIDDEN_MODES)
def test_awd_lstm_trains_on_cuda_in_every_hidden_mode(mode):
    model = AWDLSTM(50, ModelConfig(16, 32, 3), DropoutConfig(0.1, 0.3, 0.3, 0.3, 0.5, hidden_mode=mode)).cuda()
    tokens = torch.randint(50, (13, 4), device="cuda")
    with no_warnings():
        out = model(tokens[:-1])
        loss = F.cross_entropy(out.logits.flatten(0, 1), tokens[1:].flatten())
        loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
