"""CUDA tests of the weight-dropped layers of every cell on cuDNN: agreement with nn.LSTM / nn.GRU / nn.RNN,
gradients, the flat weight buffer through .to/.half/load_state_dict/ASGD swaps, and memory per step against
plain cuDNN layers of the same cell.

Every test is marked gpu: `make test` deselects them; on a GPU machine `make gpu-check` runs them, or
    python -m pytest -m gpu tests/test_gpu.py
Inside the checked calls warnings are errors, so cuDNN's per-call "RNN module weights are not part of single
contiguous chunk of memory" warning (it then copies every weight at every call) fails the test. Each test has a
CPU twin in tests/test_dropout.py or tests/test_model.py (same name or noted), which runs everywhere.
"""

import contextlib
import statistics
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harness.config import CELLS, HIDDEN_MODES, DropoutConfig, ModelConfig, RunConfig, TrainConfig
from harness.dropout import CELL_TABLE, WeightDropRNN
from harness.gpu_check.probes import WeightDropMemory, peak_step_bytes
from harness.model import AWDLSTM
from harness.train import NTASGD
from helpers import random_state, run, torch_like

pytestmark = [
    pytest.mark.fast,
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


@pytest.mark.parametrize("cell", CELLS)
def test_cuda_reaches_cudnn_without_weight_copies(kernel_calls, cell):
    # CPU twin: test_the_cells_kernel_gets_the_parameters_in_one_flat_buffer_once_per_forward.
    layer = WeightDropRNN(32, 48, cell, weight_p=P).cuda()
    x = torch.randn(10, 4, 32, device="cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            layer.zero_grad()  # keep only the last call's gradient, to compare with its mask
            out, _ = layer(x)
            out.sum().backward()
        torch.cuda.synchronize()
    assert [str(w.message) for w in caught] == []
    assert [call.kernel for call in kernel_calls] == [cell] * 3
    assert_one_buffer(kernel_calls[-1].weights)
    mask = kernel_calls[-1].weight_hh / layer.weight_hh_raw.detach()
    grad = layer.weight_hh_raw.grad
    assert (grad[mask == 0] == 0).all()
    if cell != "rnn_relu":  # a ReLU unit that never fires passes no gradient to its row of W_hh, kept or not
        assert (grad[mask != 0] != 0).all()
    layer.weight_p = 0.0
    torch.testing.assert_close(run(layer, x), run(torch_like(layer), x))


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("weight_p, train", [(0.0, True), (P, False)], ids=["rate-0", "eval"])
def test_matches_the_torch_module_on_cudnn_at_rate_zero_and_in_eval(cell, weight_p, train):
    # CPU twin: test_matches_the_torch_module_at_zero_and_in_eval.
    layer = WeightDropRNN(32, 48, cell, weight_p).cuda().train(train)
    module = torch_like(layer).train(train)
    x = torch.randn(9, 5, 32, device="cuda")
    state = random_state(layer, 5)
    with no_warnings():
        ours, theirs = run(layer, x, state), run(module, x, state)
        torch.testing.assert_close(ours, theirs)
        if train:  # cuDNN has no backward in eval mode
            probe = torch.randn_like(ours)
            (ours * probe).sum().backward()
            (theirs * probe).sum().backward()
    if train:
        for mine, reference in [(layer.weight_hh_raw, module.weight_hh_l0), (layer.weight_ih, module.weight_ih_l0),
                                (layer.bias_ih, module.bias_ih_l0), (layer.bias_hh, module.bias_hh_l0)]:
            torch.testing.assert_close(mine.grad, reference.grad)


@pytest.mark.parametrize("cell", CELLS)
def test_raw_w_hh_gets_the_masked_gradient_exactly_where_the_mask_kept_it(kernel_calls, cell):
    # CPU twin: test_one_weight_mask_for_batch_and_time_over_every_gate_and_gradients_are_grad_times_mask.
    layer = WeightDropRNN(32, 64, cell, weight_p=P).cuda()
    x = torch.randn(12, 6, 32, device="cuda")
    with no_warnings():
        out = run(layer, x)
        probe = torch.randn_like(out)
        (out * probe).sum().backward()
    masked = kernel_calls[-1].weight_hh
    mask = masked / layer.weight_hh_raw.detach()  # 0 or 1/(1-p), over every gate block
    assert mask.shape == (CELL_TABLE[cell].gates * 64, 64)
    assert ((mask == 0) | torch.isclose(mask, torch.tensor(1 / (1 - P), device="cuda"))).all()
    # The cell's torch module given the masked W_hh computes the same output; chain rule: d/d raw = mask * d/d masked.
    reference = torch_like(layer, masked)
    (run(reference, x) * probe).sum().backward()
    torch.testing.assert_close(layer.weight_hh_raw.grad, reference.weight_hh_l0.grad * mask)
    assert (layer.weight_hh_raw.grad[mask == 0] == 0).all()


def cell_weight_drop_memory(cell: str, sizes: list[tuple[int, int]], batch_size: int, bptt: int,
                            weight_p: float = 0.5, repeats: int = 3) -> WeightDropMemory:
    """harness.bench.weight_drop_memory for any cell: CUDA allocator bytes of WeightDropRNN layers against the cell's
    torch module (nn.LSTM, nn.GRU, nn.RNN) of the same sizes, per training step and held (float32)."""
    gates = CELL_TABLE[cell].gates
    x = torch.randn(bptt, batch_size, sizes[0][0], device="cuda")  # (T, B, I)
    builders = {"plain": lambda i, o: CELL_TABLE[cell].module(i, o),
                "weight_drop": lambda i, o: WeightDropRNN(i, o, cell, weight_p=weight_p)}
    stacks, held = {}, {}
    for name, build in builders.items():
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        stacks[name] = nn.ModuleList(build(i, o) for i, o in sizes).cuda().train()
        torch.cuda.synchronize()
        held[name] = torch.cuda.memory_allocated() - before
    for stack in stacks.values():  # warm-up: cuDNN's algorithm choice and workspace, the allocator's pools
        peak_step_bytes(stack, x)
    peaks = {name: [] for name in stacks}
    for r in range(repeats):
        for name in (list(stacks) if r % 2 == 0 else list(stacks)[::-1]):
            peaks[name].append(peak_step_bytes(stacks[name], x))
    element = x.element_size()
    return WeightDropMemory(
        step_extra=statistics.median(peaks["weight_drop"]) - statistics.median(peaks["plain"]),
        held_extra=held["weight_drop"] - held["plain"],
        w_hh_bytes=sum(gates * o * o for _, o in sizes) * element,
        flat_bytes=sum(gates * o * (i + o + 2) for i, o in sizes) * element,
    )


@pytest.mark.parametrize("cell", CELLS)
def test_a_training_step_costs_only_the_mask_and_the_masked_gradient_beyond_the_torch_module(cell):
    # Input much wider than hidden: a per-call copy of the flat buffer (9 x W_hh here) cannot hide.
    with no_warnings():
        memory = cell_weight_drop_memory(cell, [(2048, 256)], batch_size=8, bptt=20, weight_p=0.5)
    assert memory.held_extra == pytest.approx(memory.w_hh_bytes, rel=0.02)  # the raw W_hh beside the buffer
    # The mask lives through the whole step, the masked gradient from backward on: 1 to 2 x W_hh.
    assert 0.9 * memory.w_hh_bytes <= memory.step_extra <= 2.5 * memory.w_hh_bytes
    assert memory.flat_bytes > 8 * memory.w_hh_bytes


@pytest.mark.parametrize("cell", CELLS)
def test_the_memory_probe_sees_cudnn_compacting_scattered_weights_at_every_call(cell):
    # The control for the test above: the cell's torch module with W_hh moved out of its flat buffer makes cuDNN
    # copy all its weights at each call, and the probe must see that copy.
    x = torch.randn(20, 8, 2048, device="cuda")
    flat = nn.ModuleList([CELL_TABLE[cell].module(2048, 256)]).cuda()
    scattered = nn.ModuleList([CELL_TABLE[cell].module(2048, 256)]).cuda()
    scattered[0].weight_hh_l0.data = scattered[0].weight_hh_l0.data.clone()
    flat_bytes = CELL_TABLE[cell].gates * 256 * (2048 + 256 + 2) * 4
    peak_step_bytes(flat, x)
    with pytest.warns(UserWarning, match="contiguous chunk"):
        peak_step_bytes(scattered, x)  # warm-up
        extra = peak_step_bytes(scattered, x) - peak_step_bytes(flat, x)
    assert extra >= 0.9 * flat_bytes


@pytest.mark.parametrize("cell", CELLS)
def test_flat_buffer_survives_to_half_and_load_state_dict(kernel_calls, cell):
    # CPU twins: test_double_rebuilds_the_buffer_and_still_matches_the_torch_module,
    # test_state_dict_round_trip_keeps_values_and_aliasing.
    x = torch.randn(8, 3, 32, device="cuda")

    def check(layer, x, **tolerance):
        """Eval output equals the torch module's, a training step runs, and cuDNN got one buffer without a warning."""
        with no_warnings():
            out = run(layer.eval(), x)
            run(layer.train(), x).float().sum().backward()
        assert kernel_calls[-1].kernel == cell
        assert_one_buffer(kernel_calls[-1].weights)
        torch.testing.assert_close(out, run(torch_like(layer).eval(), x), **tolerance)

    layer = WeightDropRNN(32, 48, cell, weight_p=P).to("cuda")  # built on the CPU, moved
    check(layer, x)
    layer.half()
    check(layer, x.half())
    layer.float().cpu().cuda()
    check(layer, x)
    source = WeightDropRNN(32, 48, cell, weight_p=P).cuda()
    pointer = layer.weight_ih.data_ptr()
    layer.load_state_dict(source.state_dict())
    assert layer.weight_ih.data_ptr() == pointer  # copied into the buffer, not beside it
    check(layer, x)
    torch.testing.assert_close(run(layer.eval(), x), run(source.eval(), x), rtol=0, atol=0)
    layer.load_state_dict(WeightDropRNN(32, 48, cell, weight_p=P).cuda().state_dict(), assign=True)
    check(layer, x)  # new tensors: the next forward builds a new buffer


@pytest.mark.parametrize("cell", CELLS)
def test_asgd_weight_swaps_keep_cudnn_fed_from_the_flat_buffer(cell):
    # CPU twin: test_asgd_style_weight_swaps_reach_the_kernel.
    config = RunConfig("ptb", "awd", ModelConfig(16, 32, 2, cell=cell), DropoutConfig(0.1, 0.2, 0.2, 0.2, 0.5),
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


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("mode", HIDDEN_MODES)
def test_awd_trains_on_cuda_in_every_hidden_mode(cell, mode):
    # CPU twin: test_a_training_step_reaches_every_parameter_in_every_hidden_mode.
    config = ModelConfig(16, 32, 3, cell=cell)
    model = AWDLSTM(50, config, DropoutConfig(0.1, 0.3, 0.3, 0.3, 0.5, hidden_mode=mode)).cuda()
    tokens = torch.randint(50, (13, 4), device="cuda")
    with no_warnings():
        out = model(tokens[:-1])
        loss = F.cross_entropy(out.logits.flatten(0, 1), tokens[1:].flatten())
        loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
