"""AWD-LSTM: with every rate at 0 it is a plain nn.LSTM stack; dropout sites act where they should."""

import dataclasses
import math

import pytest
import torch
from torch import nn

from harness.config import DropoutConfig, ModelConfig
from harness.model import AWDLSTM, detach_state

pytestmark = pytest.mark.fast

SIZES = ModelConfig(emb_size=8, hidden_size=12, n_layers=3)
AWD = DropoutConfig(embedding=0.1, input=0.4, hidden=0.25, output=0.4, weight=0.5)


def plain_stack_from(model: AWDLSTM) -> list[nn.LSTM]:
    """nn.LSTM layers holding the same weights as the model's WeightDropLSTMs."""
    stack = []
    for layer in model.layers:
        lstm = nn.LSTM(layer.input_size, layer.hidden_size)
        with torch.no_grad():
            lstm.weight_ih_l0.copy_(layer.weight_ih)
            lstm.weight_hh_l0.copy_(layer.weight_hh_raw)
            lstm.bias_ih_l0.copy_(layer.bias_ih)
            lstm.bias_hh_l0.copy_(layer.bias_hh)
        stack.append(lstm)
    return stack


@pytest.mark.parametrize("mode", ["locked", "naive", "timestep", "naive_recurrent"])
def test_zero_rates_compute_a_plain_lstm_stack(mode):
    torch.manual_seed(0)
    model = AWDLSTM(50, SIZES, DropoutConfig(hidden_mode=mode)).train()
    tokens = torch.randint(50, (7, 4))
    state = model.init_state(4)
    state[0] = (torch.randn(1, 4, 12), torch.randn(1, 4, 12))
    logits, new_state, raw, dropped = model(tokens, state)
    x = model.encoder(tokens)
    for lstm, layer_state, (h, c) in zip(plain_stack_from(model), state, new_state):
        x, (h_ref, c_ref) = lstm(x, layer_state)
        torch.testing.assert_close(h, h_ref)
        torch.testing.assert_close(c, c_ref)
    torch.testing.assert_close(raw, x)
    torch.testing.assert_close(dropped, x)
    torch.testing.assert_close(logits, model.decoder(x))


def test_shapes_and_tied_decoder():
    model = AWDLSTM(50, SIZES, AWD)
    logits, state, raw, dropped = model(torch.randint(50, (5, 3)))
    assert logits.shape == (5, 3, 50) and raw.shape == dropped.shape == (5, 3, 8)
    assert [h.shape for h, _ in state] == [(1, 3, 12), (1, 3, 12), (1, 3, 8)]
    assert model.decoder.weight is model.encoder.weight
    untied = AWDLSTM(50, ModelConfig(8, 12, 2, tie_weights=False), AWD)
    assert untied.decoder.weight is not untied.encoder.weight and untied.decoder.in_features == 12


@pytest.mark.parametrize("mode", ["locked", "naive", "timestep", "naive_recurrent"])
def test_eval_mode_is_the_plain_stack_with_every_rate_on(mode):
    torch.manual_seed(0)
    model = AWDLSTM(50, SIZES, dataclasses.replace(AWD, hidden_mode=mode)).eval()
    plain = AWDLSTM(50, SIZES, DropoutConfig()).eval()
    plain.load_state_dict(model.state_dict())
    tokens = torch.randint(50, (6, 2))
    for actual, expected in zip(model(tokens), plain(tokens)):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)


# ---- each dropout site acts in forward, on its tensor, with its mask shape and rate ------------------

WIDE = ModelConfig(emb_size=64, hidden_size=64, n_layers=3)  # wide and (below) big batches: rates to +-0.05
RATES = {"input": 0.45, "hidden": 0.2, "output": 0.3}  # distinct, so a rate used at the wrong site shows


def traced_forward(model, tokens):
    """Forward in train mode, returning (output, each layer's input, each layer's raw output)."""
    inputs, outputs = [], []
    handles = [layer.register_forward_pre_hook(lambda m, args: inputs.append(args[0])) for layer in model.layers]
    handles += [layer.register_forward_hook(lambda m, args, out: outputs.append(out[0])) for layer in model.layers]
    try:
        out = model(tokens)
    finally:
        for handle in handles:
            handle.remove()
    return out, inputs, outputs


def assert_mask(ratio: torch.Tensor, p: float, mode: str) -> None:
    """ratio (T, B, H) = dropped / undropped is a keep-mask of `mode`'s shape, scaled 1/(1-p), drop rate p."""
    zero = ratio == 0
    assert (zero | torch.isclose(ratio, torch.tensor(1 / (1 - p)))).all(), "not a dropout mask of this rate"
    if mode == "locked":
        assert (zero == zero[:1]).all(), "locked mask changed over time"
    else:
        assert not torch.equal(zero[0], zero[1]), "the mask did not change over time"
    if mode == "timestep":
        assert (zero == zero[:, :1]).all(), "timestep mask differs within the batch"
    else:
        assert not torch.equal(zero[:, 0], zero[:, 1]), "two samples share a mask"
    independent = {"locked": zero[0], "timestep": zero[:, 0]}.get(mode, zero)
    rate = independent.float().mean().item()
    assert abs(rate - p) < 5 * math.sqrt(p * (1 - p) / independent.numel()), (rate, p)


@pytest.mark.parametrize("mode", ["locked", "naive", "timestep", "naive_recurrent"])
def test_input_hidden_and_output_dropout_act_on_their_tensors(mode):
    torch.manual_seed(0)
    model = AWDLSTM(50, WIDE, DropoutConfig(**RATES, hidden_mode=mode)).train()
    plain = plain_stack_from(model)
    tokens = torch.randint(50, (6, 40))
    out, inputs, outputs = traced_forward(model, tokens)
    assert_mask(inputs[0] / model.encoder(tokens), RATES["input"], mode)  # the embedding fed to layer 1
    for below, above in zip(outputs, inputs[1:]):  # between layers
        assert_mask(above / below, RATES["hidden"], mode)
    assert not torch.equal(inputs[1] == 0, inputs[2] == 0), "two layers drew the same mask"
    torch.testing.assert_close(out.raw, outputs[-1], rtol=0, atol=0)
    assert_mask(out.dropped / out.raw, RATES["output"], mode)  # before the decoder
    torch.testing.assert_close(out.logits, model.decoder(out.dropped), rtol=0, atol=0)
    # The recurrent path: untouched, except in the naive_recurrent arm (its hidden rate).
    for lstm, x, h in zip(plain, inputs, outputs):
        recomputed = lstm(x)[0]
        if mode == "naive_recurrent":
            assert not torch.allclose(h, recomputed)
        else:
            torch.testing.assert_close(h, recomputed)
    again, inputs_again, _ = traced_forward(model, tokens)  # a new mini-batch draws new masks
    assert not torch.equal(inputs_again[0] == 0, inputs[0] == 0)
    assert not torch.equal(again.dropped == 0, out.dropped == 0)


def test_embedding_dropout_drops_whole_words_at_its_rate():
    torch.manual_seed(0)
    p = 0.4
    model = AWDLSTM(2000, WIDE, DropoutConfig(embedding=p)).train()
    words = torch.randperm(2000).view(40, 50)
    tokens = torch.cat([words, words.flip(0)])  # every word at two positions
    ratio = traced_forward(model, tokens)[1][0] / model.encoder(tokens)  # (80, 50, 64)
    scaled = torch.isclose(ratio, torch.tensor(1 / (1 - p)))
    dropped = (ratio == 0).all(-1)
    assert (dropped | scaled.all(-1)).all(), "a word was partly dropped or wrongly scaled"
    assert torch.equal(dropped[:40], dropped[40:].flip(0)), "a word's fate differs between its positions"
    assert abs(dropped[:40].float().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / 2000)
    again = traced_forward(model, tokens)[1][0]
    assert not torch.equal((again == 0).all(-1), dropped), "the same rows were dropped in the next mini-batch"


def test_weight_drop_masks_each_layers_recurrent_weights():
    torch.manual_seed(0)
    p = 0.5
    model = AWDLSTM(50, ModelConfig(emb_size=24, hidden_size=24, n_layers=3), DropoutConfig(weight=p)).train()
    out = model(torch.randint(50, (6, 8)))
    (out.logits * torch.randn_like(out.logits)).sum().backward()
    dropped = [layer.weight_hh_raw.grad == 0 for layer in model.layers]  # (96, 24) each
    for layer_dropped in dropped:
        zeros = layer_dropped.float().mean().item()
        assert abs(zeros - p) < 5 * math.sqrt(p * (1 - p) / layer_dropped.numel())
    assert not torch.equal(dropped[0], dropped[1]), "two layers drew the same weight mask"
    # Every input weight gets a gradient: the mask is on W_hh only.
    assert all((layer.weight_ih.grad != 0).float().mean() > 0.99 for layer in model.layers)
    model.zero_grad()
    model.eval()(torch.randint(50, (6, 8))).logits.sum().backward()
    assert all((layer.weight_hh_raw.grad != 0).float().mean() > 0.99 for layer in model.layers)


def test_initialisation_follows_the_reference_code():
    torch.manual_seed(0)
    model = AWDLSTM(500, SIZES, AWD)
    embedding = model.encoder.weight
    assert embedding.abs().max() <= 0.1 and embedding.abs().max() > 0.099  # uniform(-0.1, 0.1)
    assert abs(embedding.mean().item()) < 0.005 and (model.decoder.bias == 0).all()
    assert all((h == 0).all() and (c == 0).all() and h.shape == c.shape == (1, 5, layer.hidden_size)
               for (h, c), layer in zip(model.init_state(5), model.layers, strict=True))


def test_detach_state_cuts_the_graph():
    model = AWDLSTM(50, SIZES, AWD).train()
    _, state, _, _ = model(torch.randint(50, (4, 2)))
    assert all(h.requires_grad for h, _ in state)
    assert not any(h.requires_grad or c.requires_grad for h, c in detach_state(state))
