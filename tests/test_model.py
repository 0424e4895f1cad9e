"""AWD-LSTM: with every rate at 0 it is a plain nn.LSTM stack; dropout sites act where they should."""

import pytest
import torch
from torch import nn

from harness.config import DropoutConfig, ModelConfig
from harness.dropout import LockedDropout, NaiveDropout, TimestepDropout
from harness.model import AWDLSTM, detach_state

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


def test_eval_mode_is_deterministic_with_rates_on():
    model = AWDLSTM(50, SIZES, AWD).eval()
    tokens = torch.randint(50, (6, 2))
    torch.testing.assert_close(model(tokens)[0], model(tokens)[0])


@pytest.mark.parametrize("mode, cls", [("locked", LockedDropout), ("naive", NaiveDropout),
                                       ("timestep", TimestepDropout), ("naive_recurrent", NaiveDropout)])
def test_hidden_mode_picks_the_mask(mode, cls):
    model = AWDLSTM(50, SIZES, DropoutConfig(input=0.4, hidden=0.25, output=0.4, hidden_mode=mode))
    sites = [model.input_dropout, *model.hidden_dropouts, model.output_dropout]
    assert len(model.hidden_dropouts) == SIZES.n_layers - 1
    assert all(type(site) is cls for site in sites)
    assert [site.p for site in sites] == [0.4, 0.25, 0.25, 0.4]
    recurrent = [layer.recurrent_p for layer in model.layers]
    assert recurrent == ([0.25] * 3 if mode == "naive_recurrent" else [0.0] * 3)


def test_locked_masks_differ_between_layers_and_stay_fixed_over_time():
    torch.manual_seed(1)
    model = AWDLSTM(50, SIZES, DropoutConfig(hidden=0.5)).train()
    seen = []
    for site in model.hidden_dropouts:
        site.register_forward_hook(lambda m, args, out: seen.append((out == 0) & (args[0] != 0)))
    model(torch.randint(50, (9, 6)))
    first, second = seen  # (T, B, H) dropped positions per layer
    assert torch.equal(first, first[:1].expand_as(first)), "locked mask changed over time"
    assert not torch.equal(first[0], second[0]), "two layers drew the same mask"


def test_detach_state_cuts_the_graph():
    model = AWDLSTM(50, SIZES, AWD).train()
    _, state, _, _ = model(torch.randint(50, (4, 2)))
    assert all(h.requires_grad for h, _ in state)
    assert not any(h.requires_grad or c.requires_grad for h, c in detach_state(state))
