"""Property tests for harness.dropout: mask shapes and sharing, drop rates, scaling, identity at p=0/eval,
and the weight-dropped LSTM's buffer aliasing, gradients and agreement with nn.LSTM.

Run: .venv/bin/python -m pytest -q tests/test_dropout.py -m "not gpu"
"""

import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from harness import dropout
from harness.dropout import (
    HIDDEN_MODES,
    EmbeddingDropout,
    LockedDropout,
    NaiveDropout,
    TimestepDropout,
    WeightDropLSTM,
    make_hidden_dropout,
)

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
               (EmbeddingDropout(nn.Embedding(20, 6), 0.0), tokens), (WeightDropLSTM(4, 6), x)]
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
    assert "weight_p=0.4, recurrent_p=0.1" in repr(WeightDropLSTM(3, 4, P, 0.1))


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


# ---- weight-dropped LSTM --------------------------------------------------------------------------


def lstm_like(layer: WeightDropLSTM, weight_hh: torch.Tensor | None = None) -> nn.LSTM:
    """An nn.LSTM on the layer's device and dtype holding its weights (or weight_hh instead of its raw W_hh)."""
    lstm = nn.LSTM(layer.input_size, layer.hidden_size).to(layer.weight_ih.device, layer.weight_ih.dtype)
    with torch.no_grad():
        lstm.weight_ih_l0.copy_(layer.weight_ih)
        lstm.weight_hh_l0.copy_(layer.weight_hh_raw if weight_hh is None else weight_hh)
        lstm.bias_ih_l0.copy_(layer.bias_ih)
        lstm.bias_hh_l0.copy_(layer.bias_hh)
    return lstm


def run(layer, x, state=None):
    """The layer's output and final state concatenated, for one-line comparisons."""
    out, (h_n, c_n) = layer(x, state)
    return torch.cat([out, h_n, c_n])


def test_parameters_are_named_shaped_and_initialised_like_nn_lstm():
    layer = WeightDropLSTM(6, 10)
    shapes = {name: tuple(p.shape) for name, p in layer.named_parameters()}
    assert shapes == {"weight_ih": (40, 6), "weight_hh_raw": (40, 10), "bias_ih": (40,), "bias_hh": (40,)}
    bound = 1 / math.sqrt(10)  # uniform in +-1/sqrt(hidden_size), as nn.LSTM
    assert all(p.abs().max() <= bound and p.min() < -0.8 * bound and p.max() > 0.8 * bound
               for p in layer.parameters())


@pytest.mark.parametrize("weight_p, recurrent_p, train", [(0.0, 0.0, True), (P, 0.3, False)])
def test_matches_nn_lstm_at_zero_and_in_eval(weight_p, recurrent_p, train):
    layer = WeightDropLSTM(6, 10, weight_p, recurrent_p).train(train)
    lstm = lstm_like(layer)
    x, state = torch.randn(7, 3, 6), (torch.randn(1, 3, 10), torch.randn(1, 3, 10))
    torch.testing.assert_close(run(layer, x, state), run(lstm, x, state), rtol=0, atol=0)
    run(layer, x, state).sum().backward()
    run(lstm, x, state).sum().backward()
    torch.testing.assert_close(layer.weight_hh_raw.grad, lstm.weight_hh_l0.grad)
    torch.testing.assert_close(layer.weight_ih.grad, lstm.weight_ih_l0.grad)


def assert_flat(weights: list[torch.Tensor]) -> None:
    """The kernel's weights lie back to back, in order, in one storage starting at offset 0."""
    storage = weights[0].untyped_storage().data_ptr()
    assert weights[0].data_ptr() == storage
    for before, after in zip(weights, weights[1:]):
        assert after.untyped_storage().data_ptr() == storage
        assert after.data_ptr() == before.data_ptr() + before.numel() * before.element_size()


def test_kernel_gets_the_parameters_in_one_flat_buffer_once_per_forward(kernel_calls):
    layer = WeightDropLSTM(6, 10, weight_p=P)
    x = torch.randn(7, 3, 6)
    layer(x)[0].sum().backward()
    with torch.no_grad():
        layer.eval()(x)
    assert len(kernel_calls) == 2  # one fused call per forward: no Python loop over time
    for weights, _ in kernel_calls:
        assert_flat(weights)
        assert weights[0] is layer.weight_ih and weights[2] is layer.bias_ih and weights[3] is layer.bias_hh


def test_weight_mask_is_shared_by_batch_and_time_and_gradients_respect_it(kernel_calls):
    layer = WeightDropLSTM(6, 40, weight_p=P)
    x, state = torch.randn(9, 5, 6), (torch.randn(1, 5, 40), torch.randn(1, 5, 40))
    out = run(layer, x, state)
    masked = kernel_calls[0][1]
    mask = masked / layer.weight_hh_raw.detach()
    assert_masks(mask)
    # One matrix for every sample and step: nn.LSTM given the masked W_hh reproduces the whole output.
    torch.testing.assert_close(out, run(lstm_like(layer, masked), x, state))
    (out * torch.randn_like(out)).sum().backward()
    grad = layer.weight_hh_raw.grad
    assert (grad[mask == 0] == 0).all() and (grad[mask != 0] != 0).all()


def test_each_call_and_each_layer_draw_their_own_weight_mask(kernel_calls):
    first, second = WeightDropLSTM(6, 10, weight_p=P), WeightDropLSTM(6, 10, weight_p=P)
    second.load_state_dict(first.state_dict())
    x = torch.randn(4, 2, 6)
    with torch.no_grad():
        first(x), first(x), second(x)
    dropped = [weight_hh == 0 for _, weight_hh in kernel_calls]
    assert not torch.equal(dropped[0], dropped[1]) and not torch.equal(dropped[0], dropped[2])


def test_second_forward_before_backward_raises_instead_of_using_the_wrong_mask():
    layer = WeightDropLSTM(6, 10, weight_p=P)
    x = torch.randn(4, 2, 6)
    first, _ = layer(x)
    layer(x)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        first.sum().backward()


@pytest.mark.parametrize("assign", [False, True])
def test_state_dict_round_trip_keeps_values_and_aliasing(kernel_calls, assign):
    source, target = WeightDropLSTM(6, 10, weight_p=P), WeightDropLSTM(6, 10, weight_p=P)
    state = source.state_dict()
    assert list(state) == ["weight_ih", "weight_hh_raw", "bias_ih", "bias_hh"]
    target.load_state_dict(state, assign=assign)
    x = torch.randn(4, 2, 6)
    torch.testing.assert_close(run(target.eval(), x), run(source.eval(), x), rtol=0, atol=0)
    assert_flat(kernel_calls[0][0])


def test_double_rebuilds_the_buffer_and_still_matches_nn_lstm(kernel_calls):
    layer = WeightDropLSTM(6, 10, weight_p=P).double()
    storages = {p.untyped_storage().data_ptr() for p in (layer.weight_ih, layer.bias_ih, layer.bias_hh)}
    assert len(storages) == 1  # re-aliased by .double() itself, not later by forward
    x = torch.randn(4, 2, 6, dtype=torch.float64)
    out = run(layer.eval(), x)
    assert all(w.dtype == torch.float64 for w in kernel_calls[0][0])
    assert_flat(kernel_calls[0][0])
    torch.testing.assert_close(out, run(lstm_like(layer), x), rtol=0, atol=0)


# ---- naive recurrent dropout ----------------------------------------------------------------------


def test_recurrent_path_matches_the_fused_kernel_when_nothing_is_dropped():
    layer = WeightDropLSTM(6, 10, recurrent_p=1e-12)  # the loop runs, but every mask is 1
    x, state = torch.randn(7, 3, 6), (torch.randn(1, 3, 10), torch.randn(1, 3, 10))
    torch.testing.assert_close(run(layer, x, state), run(lstm_like(layer), x, state))


def test_recurrent_dropout_off_or_in_eval_uses_the_fused_kernel(kernel_calls):
    x = torch.randn(4, 2, 6)
    WeightDropLSTM(6, 10, weight_p=P)(x)
    WeightDropLSTM(6, 10, recurrent_p=P).eval()(x)
    assert len(kernel_calls) == 2


def test_recurrent_masks_are_fresh_per_step_and_sample_and_match_an_lstm_cell_reference(
    kernel_calls, monkeypatch
):
    drawn = []
    draw = dropout._mask

    def record(like, shape, p):
        drawn.append(draw(like, shape, p))
        return drawn[-1]

    monkeypatch.setattr(dropout, "_mask", record)
    layer = WeightDropLSTM(6, 300, weight_p=0.2, recurrent_p=P)
    x = torch.randn(8, 4, 6, requires_grad=True)
    state = (torch.randn(1, 4, 300, requires_grad=True), torch.randn(1, 4, 300, requires_grad=True))
    out = run(layer, x, state)
    assert kernel_calls == [] and len(drawn) == 2  # the weight mask, then the recurrent masks
    weight_hh = layer.weight_hh_raw * drawn[0]
    masks = drawn[1]  # (T, B, H)
    assert masks.shape == (8, 4, 300)
    assert_masks(masks)
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[:, 0], masks[:, 1])
    h, c = state[0][0], state[1][0]
    outputs = []
    for t in range(8):
        h, c = torch.lstm_cell(x[t], (h * masks[t], c), layer.weight_ih, weight_hh, layer.bias_ih, layer.bias_hh)
        outputs.append(h)
    expected = torch.cat([torch.stack(outputs), h[None], c[None]])
    torch.testing.assert_close(out, expected)
    # Gradients too, for every input: W_hh's comes from the one-matmul shortcut.
    probe = torch.randn_like(out)
    inputs = [x, *state, *layer.parameters()]
    torch.testing.assert_close(torch.autograd.grad((out * probe).sum(), inputs),
                               torch.autograd.grad((expected * probe).sum(), inputs))


def test_weight_drop_applies_on_the_recurrent_path_too():
    layer = WeightDropLSTM(6, 40, weight_p=P, recurrent_p=0.2)
    out, _ = layer(torch.randn(5, 3, 6))
    out.sum().backward()
    assert_drop_rate(layer.weight_hh_raw.grad == 0)

