"""Property tests for harness.dropout: mask shapes and sharing, drop rates, scaling, identity at p=0/eval,
and, for every cell of CELL_TABLE, the weight-dropped layer's buffer aliasing, masks, gradients, naive recurrent
dropout and agreement with nn.LSTM / nn.GRU / nn.RNN.

Run: .venv/bin/python -m pytest -q tests/test_dropout.py -m "not gpu"
"""

import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from harness import dropout
from harness.config import CELLS
from harness.dropout import (
    CELL_TABLE,
    HIDDEN_MODES,
    EmbeddingDropout,
    LockedDropout,
    NaiveDropout,
    TimestepDropout,
    WeightDropLSTM,
    WeightDropRNN,
    make_hidden_dropout,
)
from helpers import random_state, run, torch_like

pytestmark = pytest.mark.fast

P = 0.4
SCALE = 1 / (1 - P)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def assert_drop_rate(dropped: torch.Tensor, p: float = P) -> None:
    """The fraction of True in `dropped` is p within 5 standard errors."""
    n = dropped.numel()
    assert abs(dropped.float().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n)


def assert_masks(values: torch.Tensor, p: float = P) -> None:
    """Every value is 0 or 1/(1-p), and the zeros occur at rate p."""
    kept = torch.isclose(values, torch.tensor(1 / (1 - p), dtype=values.dtype))
    assert ((values == 0) | kept).all()
    assert_drop_rate(values == 0, p)


# ---- rates, identity, factory ---------------------------------------------------------------------


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, float("nan")])
@pytest.mark.parametrize(
    "build, name",
    [
        (lambda p: LockedDropout(p), "p"),
        (lambda p: NaiveDropout(p), "p"),
        (lambda p: TimestepDropout(p), "p"),
        (lambda p: EmbeddingDropout(nn.Embedding(5, 3), p), "p"),
        (lambda p: WeightDropLSTM(3, 4, weight_p=p), "weight_p"),
        (lambda p: WeightDropLSTM(3, 4, recurrent_p=p), "recurrent_p"),
        *((lambda p, c=cell: WeightDropRNN(3, 4, c, weight_p=p), "weight_p") for cell in CELLS),
        *((lambda p, c=cell: WeightDropRNN(3, 4, c, recurrent_p=p), "recurrent_p") for cell in CELLS),
    ],
)
def test_rates_outside_unit_interval_raise(build, name, p):
    with pytest.raises(ValueError) as error:
        build(p)
    assert str(error.value) == f"{name} = {p!r} is outside [0, 1): use a rate like 0.3 (0 switches it off)"


@pytest.mark.parametrize("cls", [LockedDropout, NaiveDropout, TimestepDropout])
def test_hidden_dropout_is_identity_at_zero_and_in_eval(cls):
    x = torch.randn(5, 3, 4)
    assert cls(0.0)(x) is x
    assert cls(P).eval()(x) is x


def test_rate_zero_draws_no_random_numbers_in_training():
    """Switching a site off leaves the random stream, and so every other site's masks, as they were."""
    x, tokens = torch.randn(5, 3, 4), torch.randint(0, 20, (7, 3))
    modules = [(LockedDropout(0.0), x), (NaiveDropout(0.0), x), (TimestepDropout(0.0), x),
               (EmbeddingDropout(nn.Embedding(20, 6), 0.0), tokens),
               *((WeightDropRNN(4, 6, cell), x) for cell in CELLS)]
    for module, inputs in modules:
        state = torch.get_rng_state()
        module.train()(inputs)
        assert torch.equal(torch.get_rng_state(), state), type(module).__name__


def test_embedding_dropout_is_identity_at_zero_and_in_eval():
    embedding = nn.Embedding(20, 6)
    tokens = torch.randint(0, 20, (7, 3))
    assert torch.equal(EmbeddingDropout(embedding, 0.0)(tokens), embedding(tokens))
    assert torch.equal(EmbeddingDropout(embedding, P).eval()(tokens), embedding(tokens))


def test_make_hidden_dropout_maps_every_mode():
    expected = {"locked": LockedDropout, "naive": NaiveDropout, "timestep": TimestepDropout,
                "naive_recurrent": NaiveDropout}
    assert set(HIDDEN_MODES) == set(expected)
    for mode in HIDDEN_MODES:
        module = make_hidden_dropout(mode, P)
        assert type(module) is expected[mode] and module.p == P


def test_make_hidden_dropout_rejects_unknown_mode_listing_the_choices():
    with pytest.raises(ValueError) as error:
        make_hidden_dropout("variational", P)
    assert str(error.value) == f"unknown hidden dropout mode 'variational'; choose one of {', '.join(HIDDEN_MODES)}"


def test_extra_repr_shows_the_rates():
    assert "p=0.4" in repr(LockedDropout(P))
    assert "p=0.4" in repr(EmbeddingDropout(nn.Embedding(5, 3), P))
    assert "cell='lstm', weight_p=0.4, recurrent_p=0.1" in repr(WeightDropLSTM(3, 4, P, 0.1))
    assert "cell='rnn_relu', weight_p=0.4, recurrent_p=0.0" in repr(WeightDropRNN(3, 4, "rnn_relu", P))


# ---- hidden-dropout masks -------------------------------------------------------------------------


def test_locked_mask_is_per_sample_and_constant_over_time():
    module = LockedDropout(P)
    mask = module(torch.ones(6, 8, 500))  # on ones the output is the mask
    assert (mask == mask[0]).all()  # same at every step
    assert not torch.equal(mask[0, 0], mask[0, 1])  # differs between samples
    assert_masks(mask[0])
    assert not torch.equal(module(torch.ones(6, 8, 500)), mask)  # new draw per call


def test_naive_mask_is_fresh_per_step_and_sample():
    mask = NaiveDropout(P)(torch.ones(6, 8, 500))
    assert not torch.equal(mask[0], mask[1]) and not torch.equal(mask[:, 0], mask[:, 1])
    assert_masks(mask)


def test_timestep_mask_is_per_step_and_shared_by_the_batch():
    mask = TimestepDropout(P)(torch.ones(6, 8, 500))
    assert (mask == mask[:, :1]).all()  # same for every sample
    assert not torch.equal(mask[0], mask[1])  # differs between steps
    assert_masks(mask[:, 0])


# ---- embedding dropout ----------------------------------------------------------------------------


def test_embedding_dropout_drops_whole_words_everywhere_and_scales_the_rest():
    embedding = nn.Embedding(4000, 5)
    tokens = torch.cat([torch.arange(4000).view(500, 8)] * 2)  # every word at two positions
    out = EmbeddingDropout(embedding, P)(tokens)
    expected = embedding.weight[tokens]
    dropped = (out == 0).all(-1)
    kept_right = torch.isclose(out, expected * SCALE).all(-1)
    assert (dropped | kept_right).all()
    assert torch.equal(dropped[:500], dropped[500:])  # a word's fate is the same at every position
    assert_drop_rate(dropped[:500])


def test_embedding_dropout_draws_a_new_mask_per_call_and_gradients_skip_dropped_rows():
    embedding = nn.Embedding(300, 4)
    module = EmbeddingDropout(embedding, P)
    tokens = torch.arange(300).view(30, 10)
    first, second = module(tokens), module(tokens)
    assert not torch.equal((first == 0).all(-1), (second == 0).all(-1))
    second.sum().backward()
    dropped = (second == 0).all(-1).view(-1)
    assert (embedding.weight.grad[dropped] == 0).all()
    assert (embedding.weight.grad[~dropped] == SCALE).all()


def test_embedding_dropout_uses_the_wrapped_weight_so_tying_works():
    embedding = nn.Embedding(10, 4)
    decoder = nn.Linear(4, 10)
    decoder.weight = embedding.weight
    module = EmbeddingDropout(embedding, P).eval()
    with torch.no_grad():
        decoder.weight.add_(1.0)
    assert torch.equal(module(torch.tensor([[3]])), embedding.weight[3].view(1, 1, 4))


def test_embedding_dropout_honours_padding_idx_and_rejects_max_norm():
    embedding = nn.Embedding(10, 4, padding_idx=0)
    EmbeddingDropout(embedding, P)(torch.tensor([[0, 1], [0, 2]])).sum().backward()
    assert (embedding.weight.grad[0] == 0).all()
    with pytest.raises(ValueError) as error:
        EmbeddingDropout(nn.Embedding(10, 4, max_norm=1.0), P)
    assert str(error.value) == "EmbeddingDropout does not support an nn.Embedding with max_norm; set max_norm=None"


class _LargestOutput(TorchDispatchMode):
    """Records the largest number of elements any operator produced."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


def test_embedding_dropout_never_materialises_a_masked_vocabulary_matrix():
    vocab, emb_size = 5000, 64
    module = EmbeddingDropout(nn.Embedding(vocab, emb_size), P)
    with _LargestOutput() as probe:
        module(torch.randint(0, vocab, (10, 4)))
    assert probe.largest < vocab * emb_size // 10


# ---- the cell table -------------------------------------------------------------------------------


def test_the_cell_table_has_every_configurable_cell_and_the_torch_modules_modes():
    assert list(CELL_TABLE) == list(CELLS)
    for name, cell in CELL_TABLE.items():
        module = cell.module(3, 5)
        assert cell.cudnn_mode == module.mode  # what nn.RNNBase.flatten_parameters hands cuDNN for this cell
        assert module.weight_hh_l0.shape == (cell.gates * 5, 5)
        assert (name == "lstm") == cell.cell_state
    assert CELL_TABLE["rnn_relu"].module(3, 5).nonlinearity == "relu"
    assert CELL_TABLE["rnn_tanh"].module(3, 5).nonlinearity == "tanh"


def test_unknown_cell_raises_naming_the_choices():
    with pytest.raises(ValueError) as error:
        WeightDropRNN(3, 4, "lstm2")
    assert str(error.value) == "cell = 'lstm2' is not one of lstm, gru, rnn_tanh, rnn_relu"


def test_weight_drop_lstm_is_the_lstm_case_with_its_old_arguments():
    layer = WeightDropLSTM(3, 4, P, 0.1)
    assert isinstance(layer, WeightDropRNN) and layer.cell == "lstm"
    assert (layer.weight_p, layer.recurrent_p) == (P, 0.1)
    assert WeightDropRNN(3, 4).cell == "lstm"  # the default cell
    for layer in (WeightDropLSTM(3, 4), WeightDropRNN(3, 4, "gru")):  # rates default to 0: off
        assert (layer.weight_p, layer.recurrent_p) == (0.0, 0.0)


# ---- weight-dropped layers, every cell ------------------------------------------------------------


def layer_and_input(cell: str, hidden: int = 10, steps: int = 7, batch: int = 3, **rates):
    """A float64 layer of the cell (input 6 wide) with a random input (T, B, 6) and a random state."""
    layer = WeightDropRNN(6, hidden, cell, **rates).double()
    return layer, torch.randn(steps, batch, 6, dtype=torch.float64), random_state(layer, batch)


@pytest.mark.parametrize("cell", CELLS)
def test_parameters_are_named_shaped_and_initialised_like_the_torch_module(cell):
    layer = WeightDropRNN(6, 100, cell)  # a vanilla RNN's bias has 100 entries: enough to near both bounds
    shapes = {name: tuple(p.shape) for name, p in layer.named_parameters()}
    module = CELL_TABLE[cell].module(6, 100)
    reference = {name.removesuffix("_l0"): tuple(p.shape) for name, p in module.named_parameters()}
    assert shapes == {"weight_ih": reference["weight_ih"], "weight_hh_raw": reference["weight_hh"],
                      "bias_ih": reference["bias_ih"], "bias_hh": reference["bias_hh"]}
    bound = 1 / math.sqrt(100)  # uniform in +-1/sqrt(hidden_size), as the torch modules
    assert all(p.abs().max() <= bound and p.min() < -0.8 * bound and p.max() > 0.8 * bound
               for p in layer.parameters())


@pytest.mark.parametrize("cell", CELLS)
def test_init_state_is_zeros_of_the_cells_form(cell):
    state = WeightDropRNN(6, 10, cell).double().init_state(3)
    tensors = state if isinstance(state, tuple) else (state,)
    assert isinstance(state, tuple) == (cell == "lstm")  # (h, c) for the LSTM, h alone otherwise
    assert len(tensors) == (2 if cell == "lstm" else 1)
    assert all(t.shape == (1, 3, 10) and t.dtype == torch.float64 and (t == 0).all() for t in tensors)
    x = torch.randn(4, 3, 6, dtype=torch.float64)
    layer = WeightDropRNN(6, 10, cell).double()
    torch.testing.assert_close(run(layer, x), run(layer, x, layer.init_state(3)), rtol=0, atol=0)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("weight_p, recurrent_p, train", [(0.0, 0.0, True), (P, 0.3, False)])
def test_matches_the_torch_module_at_zero_and_in_eval(cell, weight_p, recurrent_p, train):
    layer, x, state = layer_and_input(cell, weight_p=weight_p, recurrent_p=recurrent_p)
    layer.train(train)
    module = torch_like(layer)
    torch.testing.assert_close(run(layer, x, state), run(module, x, state), rtol=0, atol=0)  # the same kernel
    run(layer, x, state).sum().backward()
    run(module, x, state).sum().backward()
    for mine, theirs in [(layer.weight_hh_raw, module.weight_hh_l0), (layer.weight_ih, module.weight_ih_l0),
                         (layer.bias_ih, module.bias_ih_l0), (layer.bias_hh, module.bias_hh_l0)]:
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-12, atol=1e-12)


def assert_flat(weights: list[torch.Tensor]) -> None:
    """The kernel's weights lie back to back, in order, in one storage starting at offset 0."""
    storage = weights[0].untyped_storage().data_ptr()
    assert weights[0].data_ptr() == storage
    for before, after in zip(weights, weights[1:]):
        assert after.untyped_storage().data_ptr() == storage
        assert after.data_ptr() == before.data_ptr() + before.numel() * before.element_size()


@pytest.mark.parametrize("cell", CELLS)
def test_the_cells_kernel_gets_the_parameters_in_one_flat_buffer_once_per_forward(kernel_calls, cell):
    layer = WeightDropRNN(6, 10, cell, weight_p=P)
    x = torch.randn(7, 3, 6)
    layer(x)[0].sum().backward()
    with torch.no_grad():
        layer.eval()(x)
    # One fused call of this cell's kernel per forward: no Python loop over time.
    assert [call.kernel for call in kernel_calls] == [cell, cell]
    for call in kernel_calls:
        assert_flat(call.weights)
        assert call.weights[0] is layer.weight_ih and call.weights[2] is layer.bias_ih
        assert call.weights[3] is layer.bias_hh


@pytest.mark.parametrize("cell", CELLS)
def test_one_weight_mask_for_batch_and_time_over_every_gate_and_gradients_are_grad_times_mask(kernel_calls, cell):
    layer, x, state = layer_and_input(cell, hidden=40, steps=9, batch=5, weight_p=P)
    out = run(layer, x, state)
    masked = kernel_calls[0].weight_hh
    mask = masked / layer.weight_hh_raw.detach()
    assert mask.shape == (CELL_TABLE[cell].gates * 40, 40)
    assert_masks(mask)
    blocks = (mask == 0).chunk(CELL_TABLE[cell].gates)  # each gate block drops at rate p, with its own entries
    for block in blocks:
        assert_drop_rate(block)
    assert all(not torch.equal(blocks[0], block) for block in blocks[1:])
    # One matrix for every sample and step: the torch module given the masked W_hh reproduces the whole output.
    module = torch_like(layer, masked)
    torch.testing.assert_close(out, run(module, x, state), rtol=0, atol=0)
    probe = torch.randn_like(out)
    (out * probe).sum().backward()
    (run(module, x, state) * probe).sum().backward()
    # Chain rule through raw * mask: d/d raw = mask * d/d masked, exactly zero where dropped.
    torch.testing.assert_close(layer.weight_hh_raw.grad, module.weight_hh_l0.grad * mask, rtol=1e-12, atol=1e-12)
    assert (layer.weight_hh_raw.grad[mask == 0] == 0).all() and (layer.weight_hh_raw.grad[mask != 0] != 0).all()


@pytest.mark.parametrize("cell", CELLS)
def test_each_call_and_each_layer_draw_their_own_weight_mask(kernel_calls, cell):
    first, second = WeightDropRNN(6, 10, cell, weight_p=P), WeightDropRNN(6, 10, cell, weight_p=P)
    second.load_state_dict(first.state_dict())
    x = torch.randn(4, 2, 6)
    with torch.no_grad():
        first(x), first(x), second(x)
    dropped = [call.weight_hh == 0 for call in kernel_calls]
    assert len(dropped) == 3
    assert not torch.equal(dropped[0], dropped[1]) and not torch.equal(dropped[0], dropped[2])


@pytest.mark.parametrize("cell", CELLS)
def test_second_forward_before_backward_raises_instead_of_using_the_wrong_mask(cell):
    layer = WeightDropRNN(6, 10, cell, weight_p=P)
    x = torch.randn(4, 2, 6)
    first, _ = layer(x)
    layer(x)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        first.sum().backward()


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("assign", [False, True])
def test_state_dict_round_trip_keeps_values_and_aliasing(kernel_calls, cell, assign):
    source, target = WeightDropRNN(6, 10, cell, weight_p=P), WeightDropRNN(6, 10, cell, weight_p=P)
    state = source.state_dict()
    assert list(state) == ["weight_ih", "weight_hh_raw", "bias_ih", "bias_hh"]
    target.load_state_dict(state, assign=assign)
    x = torch.randn(4, 2, 6)
    torch.testing.assert_close(run(target.eval(), x), run(source.eval(), x), rtol=0, atol=0)
    assert_flat(kernel_calls[0].weights)


@pytest.mark.parametrize("cell", CELLS)
def test_double_rebuilds_the_buffer_and_still_matches_the_torch_module(kernel_calls, cell):
    layer = WeightDropRNN(6, 10, cell, weight_p=P).double()
    storages = {p.untyped_storage().data_ptr() for p in (layer.weight_ih, layer.bias_ih, layer.bias_hh)}
    assert len(storages) == 1  # re-aliased by .double() itself, not later by forward
    x = torch.randn(4, 2, 6, dtype=torch.float64)
    out = run(layer.eval(), x)
    assert all(w.dtype == torch.float64 for w in kernel_calls[0].weights)
    assert_flat(kernel_calls[0].weights)
    torch.testing.assert_close(out, run(torch_like(layer), x), rtol=0, atol=0)


@pytest.mark.parametrize("cell", CELLS)
def test_on_cudnn_the_buffer_is_flattened_in_the_cells_mode_with_the_w_hh_slot(monkeypatch, cell):
    """CPU twin of the cuDNN branch (tests/test_gpu.py runs the real one): where cuDNN takes the weights, the layer
    asks torch._cudnn_rnn_flatten_weight for what nn.RNNBase.flatten_parameters asks for the same cell, with the
    W_hh slot, not the raw W_hh, among the weights; the parameters then alias the buffer it made."""
    calls = []

    def flatten(weights, *arguments):
        # What cuDNN's flatten does to its arguments, in plain concatenation instead of cuDNN's layout.
        calls.append((list(weights), arguments))
        flat = torch.cat([w.reshape(-1) for w in weights])
        offset = 0
        for w in weights:
            w.set_(flat.untyped_storage(), offset, w.shape)
            offset += w.numel()

    monkeypatch.setattr(dropout.cudnn, "is_acceptable", lambda tensor: True)
    monkeypatch.setattr(torch, "_use_cudnn_rnn_flatten_weight", lambda: True)
    monkeypatch.setattr(torch, "_cudnn_rnn_flatten_weight", flatten)
    monkeypatch.setattr(dropout.cudnn_rnn, "get_cudnn_mode", lambda mode: f"cudnn {mode}")  # needs a cuDNN build
    layer = WeightDropRNN(6, 10, cell, weight_p=P).double()  # flattened when built, and again by .double()
    layer.double()  # a no-op move: still flat, so no new flattening
    layer.weight_ih.data = layer.weight_ih.data.clone()  # as an ASGD swap does: the next forward flattens anew
    x, state = torch.randn(5, 2, 6, dtype=torch.float64), random_state(layer, 2)
    out = run(layer.train(), x, state)
    module = CELL_TABLE[cell].module(6, 10)
    # weights per layer, then as nn.RNNBase.flatten_parameters: input_size, mode, hidden_size, proj_size, layers,
    # batch_first, bidirectional.
    expected = (4, 6, f"cudnn {module.mode}", 10, module.proj_size, module.num_layers, module.batch_first,
                bool(module.bidirectional))
    assert [arguments for _, arguments in calls] == [expected] * 3
    weights = calls[-1][0]
    assert weights[0] is layer.weight_ih and weights[1] is layer._slot and weights[2] is layer.bias_ih
    assert weights[3] is layer.bias_hh and layer._slot is not layer.weight_hh_raw
    assert_flat([layer.weight_ih, layer._slot, layer.bias_ih, layer.bias_hh])
    mask = layer._slot / layer.weight_hh_raw.detach()
    assert_masks(mask)
    torch.testing.assert_close(out, run(torch_like(layer, layer._slot), x, state), rtol=0, atol=0)


def test_a_cudnn_build_keeps_a_layer_on_the_cpu_in_the_plain_layout(monkeypatch):
    """On a CUDA machine torch may flatten for cuDNN, but a layer on the CPU is not cuDNN's: plain concatenation."""
    calls = []
    monkeypatch.setattr(torch, "_use_cudnn_rnn_flatten_weight", lambda: True)
    monkeypatch.setattr(torch, "_cudnn_rnn_flatten_weight", lambda *args: calls.append(args))
    layer = WeightDropRNN(6, 10, "gru", weight_p=P)
    x = torch.randn(4, 2, 6)
    torch.testing.assert_close(run(layer.eval(), x), run(torch_like(layer), x), rtol=0, atol=0)
    assert calls == []
    assert_flat([layer.weight_ih, layer._slot, layer.bias_ih, layer.bias_hh])


@pytest.mark.parametrize("assign", ["data", "copy"])
@pytest.mark.parametrize("cell", CELLS)
def test_asgd_style_weight_swaps_reach_the_kernel(kernel_calls, cell, assign):
    """NT-ASGD swaps the averaged weights in and out with `param.data = ...` (the reference code) or `copy_`
    (harness.train): either way the next forward computes with them, from one flat buffer."""
    layer, x, _ = layer_and_input(cell)
    other = WeightDropRNN(6, 10, cell).double()
    for mine, theirs in zip(layer.parameters(), other.parameters()):
        if assign == "data":
            mine.data = theirs.detach().clone()
        else:
            with torch.no_grad():
                mine.copy_(theirs)
    torch.testing.assert_close(run(layer.eval(), x), run(torch_like(other), x), rtol=0, atol=0)
    assert_flat(kernel_calls[0].weights)


def test_block_names_say_what_each_gate_block_does():
    """Saturating one named block's bias shows its role, in the fused kernel and in the step loop alike:
    the mask diagrams label W_hh's blocks with these names."""
    big = 1e3

    def outputs(cell, biases, recurrent_p):
        layer, x, state = layer_and_input(cell, recurrent_p=recurrent_p)
        blocks = CELL_TABLE[cell].blocks
        with torch.no_grad():
            for block, value in biases.items():
                layer.bias_ih.view(len(blocks), -1)[blocks.index(block)] = value
        out, final = layer(x, state)
        return out, final, state

    for recurrent_p in (0.0, 1e-12):  # the fused kernel; the step loop with nothing dropped
        out, (h, c), (h0, c0) = outputs("lstm", {"i": -big, "f": big}, recurrent_p)
        torch.testing.assert_close(c, c0)  # input gate shut, forget gate open: the cell keeps c
        out, _, _ = outputs("lstm", {"o": -big}, recurrent_p)
        assert (out == 0).all()  # output gate shut
        out, (h, c), _ = outputs("lstm", {"i": big, "f": -big, "g": big}, recurrent_p)
        torch.testing.assert_close(c, torch.ones_like(c))  # c' = i * tanh(g) = 1
        out, h, h0 = outputs("gru", {"z": big}, recurrent_p)
        torch.testing.assert_close(out, h0.expand_as(out))  # update gate open: h' = h
        out, h, h0 = outputs("gru", {"z": -big, "n": big}, recurrent_p)
        torch.testing.assert_close(out, torch.ones_like(out))  # h' = n = tanh(big)
        layer, x, h0 = layer_and_input("gru", recurrent_p=recurrent_p)
        with torch.no_grad():
            layer.bias_ih.view(3, -1)[0] = -big  # reset gate shut: n ignores h
            layer.bias_ih.view(3, -1)[1] = -big  # and h' = n
        torch.testing.assert_close(layer(x, h0)[0], layer(x, torch.randn_like(h0))[0])


# ---- naive recurrent dropout ----------------------------------------------------------------------


@pytest.mark.parametrize("cell", CELLS)
def test_recurrent_path_matches_the_fused_kernel_when_nothing_is_dropped(cell):
    layer, x, state = layer_and_input(cell, recurrent_p=1e-12)  # the loop runs, but every mask is 1
    torch.testing.assert_close(run(layer, x, state), run(torch_like(layer), x, state), rtol=1e-10, atol=1e-10)
    _, final = layer(x, state)  # the state in the cell's form, as the fused path and the torch module return it
    _, final_ref = torch_like(layer)(x, state)
    assert type(final) is type(final_ref) and isinstance(final, tuple) == (cell == "lstm")


@pytest.mark.parametrize("cell", CELLS)
def test_recurrent_dropout_off_or_in_eval_uses_the_fused_kernel(kernel_calls, cell):
    x = torch.randn(4, 2, 6)
    WeightDropRNN(6, 10, cell, weight_p=P)(x)
    WeightDropRNN(6, 10, cell, recurrent_p=P).eval()(x)
    assert [call.kernel for call in kernel_calls] == [cell, cell]


def reference_step(cell: str, layer, weight_hh, x_t, h_in, state):
    """One step by plain autograd, in PyTorch's documented equations, with h_in (the masked h) on W_hh's path.

    The LSTM and the vanilla RNN use h only through W_hh, so torch's own cell functions given h_in are it; the
    GRU carries h itself through z * h, so it is spelled out (nn.GRU's docs) and checked against torch.gru_cell.
    """
    weights = (layer.weight_ih, weight_hh, layer.bias_ih, layer.bias_hh)
    if cell == "lstm":
        return torch.lstm_cell(x_t, (h_in, state[1]), *weights)
    if cell != "gru":
        return (getattr(torch, f"{cell}_cell")(x_t, h_in, *weights),)
    (h,) = state
    x_r, x_z, x_n = (x_t @ layer.weight_ih.T + layer.bias_ih).chunk(3, 1)
    h_r, h_z, h_n = (h_in @ weight_hh.T + layer.bias_hh).chunk(3, 1)
    r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
    n = torch.tanh(x_n + r * h_n)
    return ((1 - z) * n + z * h,)


def test_the_gru_reference_step_is_torchs_gru_cell_without_a_mask():
    layer = WeightDropRNN(6, 10, "gru").double()
    x, h = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 10, dtype=torch.float64)
    (mine,) = reference_step("gru", layer, layer.weight_hh_raw, x, h, (h,))
    torch.testing.assert_close(mine, torch.gru_cell(x, h, layer.weight_ih, layer.weight_hh_raw, layer.bias_ih,
                                                     layer.bias_hh))


@pytest.mark.parametrize("cell", CELLS)
def test_recurrent_masks_are_fresh_per_step_and_sample_on_h_and_match_a_plain_autograd_reference(
    kernel_calls, monkeypatch, cell
):
    drawn = []
    draw = dropout._mask

    def record(like, shape, p):
        drawn.append(draw(like, shape, p))
        return drawn[-1]

    monkeypatch.setattr(dropout, "_mask", record)
    layer, x, _ = layer_and_input(cell, hidden=300, steps=8, batch=4, weight_p=0.2, recurrent_p=P)
    x.requires_grad_(True)
    state = random_state(layer, 4, requires_grad=True)
    states = state if isinstance(state, tuple) else (state,)
    out = run(layer, x, state)
    assert kernel_calls == [] and len(drawn) == 2  # the weight mask, then the recurrent masks
    weight_hh = layer.weight_hh_raw * drawn[0]
    masks = drawn[1]  # (T, B, H)
    assert masks.shape == (8, 4, 300)
    assert_masks(masks)
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[:, 0], masks[:, 1])
    current, outputs = tuple(s[0] for s in states), []
    for t in range(8):
        current = reference_step(cell, layer, weight_hh, x[t], current[0] * masks[t], current)
        outputs.append(current[0])
    expected = torch.cat([torch.stack(outputs), *(s[None] for s in current)])
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    # Gradients too, for every input: W_hh's comes from the one-matmul shortcut, the reference's from autograd
    # through every step.
    probe = torch.randn_like(out)
    inputs = [x, *states, *layer.parameters()]
    torch.testing.assert_close(torch.autograd.grad((out * probe).sum(), inputs),
                               torch.autograd.grad((expected * probe).sum(), inputs), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cell", CELLS)
def test_weight_drop_applies_on_the_recurrent_path_too(cell):
    layer = WeightDropRNN(6, 40, cell, weight_p=P, recurrent_p=0.2).double()
    out, _ = layer(torch.randn(5, 3, 6, dtype=torch.float64))
    out.sum().backward()
    assert_drop_rate(layer.weight_hh_raw.grad == 0)


class _NewTensorShapes(TorchDispatchMode):
    """Records the shape of every tensor an operator computed into new memory (views and aliases left out)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in inputs:
                self.shapes.append(tuple(tensor.shape))
        return out


@pytest.mark.parametrize("cell", CELLS)
def test_the_recurrent_loops_w_hh_gradient_is_one_matmul_not_one_per_step(cell):
    layer = WeightDropRNN(6, 10, cell, weight_p=P, recurrent_p=P)
    out, _ = layer(torch.randn(12, 3, 6))
    with _NewTensorShapes() as probe:
        out.sum().backward()
    # One (gH, T*B) @ (T*B, H) product, then the DropConnect mask on it: not 12 per-step outer products and sums.
    assert probe.shapes.count(tuple(layer.weight_hh_raw.shape)) == 2
