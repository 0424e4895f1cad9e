"""AWD-LSTM on every cell: with every rate at 0 it is a plain nn.LSTM / nn.GRU / nn.RNN stack; dropout sites act
where they should; the cell is a field of ModelConfig, settable from a study file and --set."""

import dataclasses
import math

import pytest
import torch
from torch import nn

from harness.config import CELLS, HIDDEN_MODES, DropoutConfig, ModelConfig, parse_overrides
from harness.study.spec import load_study
from harness.dropout import CELL_TABLE, WeightDropRNN
from harness.errors import UserError
from harness.model import AWDLSTM, detach_state

pytestmark = pytest.mark.fast

SIZES = ModelConfig(emb_size=8, hidden_size=12, n_layers=3)
AWD = DropoutConfig(embedding=0.1, input=0.4, hidden=0.25, output=0.4, weight=0.5)


def sizes(cell: str, base: ModelConfig = SIZES) -> ModelConfig:
    return dataclasses.replace(base, cell=cell)


def as_tuple(state) -> tuple:
    """A layer's state as a tuple: (h, c) for the LSTM, (h,) for the other cells."""
    return state if isinstance(state, tuple) else (state,)


def plain_stack_from(model: AWDLSTM) -> list[nn.RNNBase]:
    """Torch modules of the model's cell (nn.LSTM, nn.GRU, nn.RNN) holding the same weights as its layers."""
    stack = []
    for layer in model.layers:
        module = CELL_TABLE[model.config.cell].module(layer.input_size, layer.hidden_size).to(layer.weight_ih.dtype)
        with torch.no_grad():
            module.weight_ih_l0.copy_(layer.weight_ih)
            module.weight_hh_l0.copy_(layer.weight_hh_raw)
            module.bias_ih_l0.copy_(layer.bias_ih)
            module.bias_hh_l0.copy_(layer.bias_hh)
        stack.append(module)
    return stack


def keep_relu_units_alive(model: AWDLSTM) -> AWDLSTM:
    """A ReLU unit at exactly 0 passes no gradient and makes a mask ratio 0/0: for rnn_relu, a positive bias and
    small W_ih and W_hh keep every pre-activation above 0 (the other cells never output exact zeros)."""
    if model.config.cell == "rnn_relu":
        with torch.no_grad():
            for layer in model.layers:
                layer.bias_ih.add_(3.0)
                layer.weight_ih.mul_(0.1)
                layer.weight_hh_raw.mul_(0.1)
    return model


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("mode", HIDDEN_MODES)
def test_zero_rates_compute_a_plain_stack_of_the_cell(cell, mode):
    torch.manual_seed(0)
    model = AWDLSTM(50, sizes(cell), DropoutConfig(hidden_mode=mode)).double().train()
    tokens = torch.randint(50, (7, 4))
    state = model.init_state(4)
    first = tuple(torch.randn_like(t) for t in as_tuple(state[0]))  # a carried state, not zeros, into layer 1
    state[0] = first if cell == "lstm" else first[0]
    logits, new_state, raw, dropped = model(tokens, state)
    x = model.encoder(tokens)
    for module, layer_state, final in zip(plain_stack_from(model), state, new_state, strict=True):
        x, final_ref = module(x, layer_state)
        torch.testing.assert_close(as_tuple(final), as_tuple(final_ref), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(raw, x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dropped, x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logits, model.decoder(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cell", CELLS)
def test_shapes_and_tied_decoder(cell):
    model = AWDLSTM(50, sizes(cell), AWD)
    logits, state, raw, dropped = model(torch.randint(50, (5, 3)))
    assert logits.shape == (5, 3, 50) and raw.shape == dropped.shape == (5, 3, 8)
    # (h, c) per layer for the LSTM, h alone for the other cells.
    tensors = 2 if cell == "lstm" else 1
    assert [tuple(t.shape for t in as_tuple(s)) for s in state] == [((1, 3, width),) * tensors for width in (12, 12, 8)]
    assert all(isinstance(s, tuple) == (cell == "lstm") for s in state)
    assert model.decoder.weight is model.encoder.weight
    untied = AWDLSTM(50, ModelConfig(8, 12, 2, tie_weights=False, cell=cell), AWD)
    assert untied.decoder.weight is not untied.encoder.weight and untied.decoder.in_features == 12


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("mode", HIDDEN_MODES)
def test_eval_mode_is_the_plain_stack_with_every_rate_on(cell, mode):
    torch.manual_seed(0)
    model = AWDLSTM(50, sizes(cell), dataclasses.replace(AWD, hidden_mode=mode)).eval()
    plain = AWDLSTM(50, sizes(cell), DropoutConfig()).eval()
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


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("mode", HIDDEN_MODES)
def test_input_hidden_and_output_dropout_act_on_their_tensors(cell, mode):
    """And AR/TAR's tensors: raw is the last layer's output, dropped the same after output dropout."""
    torch.manual_seed(0)
    model = keep_relu_units_alive(AWDLSTM(50, sizes(cell, WIDE), DropoutConfig(**RATES, hidden_mode=mode)).train())
    plain = plain_stack_from(model)
    tokens = torch.randint(50, (6, 40))
    out, inputs, outputs = traced_forward(model, tokens)
    assert all((h != 0).all() for h in outputs)  # so every ratio below is a mask entry
    assert_mask(inputs[0] / model.encoder(tokens), RATES["input"], mode)  # the embedding fed to layer 1
    for below, above in zip(outputs, inputs[1:]):  # between layers
        assert_mask(above / below, RATES["hidden"], mode)
    assert not torch.equal(inputs[1] == 0, inputs[2] == 0), "two layers drew the same mask"
    torch.testing.assert_close(out.raw, outputs[-1], rtol=0, atol=0)
    assert_mask(out.dropped / out.raw, RATES["output"], mode)  # before the decoder
    torch.testing.assert_close(out.logits, model.decoder(out.dropped), rtol=0, atol=0)
    # The recurrent path: untouched, except in the naive_recurrent arm (its hidden rate).
    for module, x, h in zip(plain, inputs, outputs):
        recomputed = module(x)[0]
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


@pytest.mark.parametrize("cell", CELLS)
def test_weight_drop_masks_each_layers_recurrent_weights(cell):
    torch.manual_seed(0)
    p = 0.5
    config = ModelConfig(emb_size=24, hidden_size=24, n_layers=3, cell=cell)
    model = keep_relu_units_alive(AWDLSTM(50, config, DropoutConfig(weight=p)).double().train())
    out = model(torch.randint(50, (6, 8)))
    (out.logits * torch.randn_like(out.logits)).sum().backward()
    dropped = [layer.weight_hh_raw.grad == 0 for layer in model.layers]  # (gates * 24, 24) each
    assert all(d.shape == (CELL_TABLE[cell].gates * 24, 24) for d in dropped)
    for layer_dropped in dropped:
        zeros = layer_dropped.float().mean().item()
        assert abs(zeros - p) < 5 * math.sqrt(p * (1 - p) / layer_dropped.numel())
    assert not torch.equal(dropped[0], dropped[1]), "two layers drew the same weight mask"
    # Every input weight gets a gradient: the mask is on W_hh only.
    assert all((layer.weight_ih.grad != 0).float().mean() > 0.99 for layer in model.layers)
    model.zero_grad()
    model.eval()(torch.randint(50, (6, 8))).logits.sum().backward()
    assert all((layer.weight_hh_raw.grad != 0).float().mean() > 0.99 for layer in model.layers)


@pytest.mark.parametrize("cell", CELLS)
def test_initialisation_follows_the_reference_code(cell):
    torch.manual_seed(0)
    model = AWDLSTM(500, sizes(cell), AWD).double()
    embedding = model.encoder.weight
    assert embedding.abs().max() <= 0.1 and embedding.abs().max() > 0.099  # uniform(-0.1, 0.1)
    assert abs(embedding.mean().item()) < 0.005 and (model.decoder.bias == 0).all()
    state = model.init_state(5)
    assert len(state) == 3
    for layer_state, layer in zip(state, model.layers, strict=True):
        assert isinstance(layer_state, tuple) == (cell == "lstm")  # (h, c) for the LSTM, h for the others
        for t in as_tuple(layer_state):
            assert (t == 0).all() and t.shape == (1, 5, layer.hidden_size) and t.dtype == torch.float64


@pytest.mark.parametrize("cell", CELLS)
def test_detach_state_cuts_the_graph_and_keeps_the_values(cell):
    model = AWDLSTM(50, sizes(cell), AWD).train()
    _, state, _, _ = model(torch.randint(50, (4, 2)))
    assert all(t.requires_grad for s in state for t in as_tuple(s))
    detached = detach_state(state)
    assert [isinstance(s, tuple) for s in detached] == [isinstance(s, tuple) for s in state]
    for before, after in zip(state, detached, strict=True):
        for t, d in zip(as_tuple(before), as_tuple(after), strict=True):
            assert not d.requires_grad and torch.equal(t, d)


# ---- the cell is a model setting -------------------------------------------------------------------


@pytest.mark.parametrize("cell", CELLS)
def test_every_layer_runs_the_configured_cell(kernel_calls, cell):
    model = AWDLSTM(50, sizes(cell), AWD).eval()
    assert all(isinstance(layer, WeightDropRNN) and layer.cell == cell for layer in model.layers)
    model(torch.randint(50, (4, 2)))
    assert [call.kernel for call in kernel_calls] == [cell] * 3


def test_the_lstm_is_the_default_cell_and_the_model_keeps_its_name():
    assert ModelConfig().cell == "lstm" and AWDLSTM(50, SIZES, AWD).layers[0].cell == "lstm"
    assert AWDLSTM(50, ModelConfig(8, 12, 2, cell="gru"), AWD).layers[0].cell == "gru"


def test_an_unknown_cell_is_refused_naming_the_choices():
    with pytest.raises(ValueError) as error:
        ModelConfig(cell="transformer")
    assert str(error.value) == "cell = 'transformer' is not one of lstm, gru, rnn_tanh, rnn_relu"
    with pytest.raises(UserError) as error:
        parse_overrides(["model.cell=transformer"])
    assert str(error.value) == ("--set model.cell=transformer: cell = 'transformer' is not one of lstm, gru, "
                                "rnn_tanh, rnn_relu")


def test_the_cell_is_set_from_a_study_file_and_from_the_command_line(tmp_path):
    assert parse_overrides(["model.cell=gru"]) == {"model.cell": "gru"}
    study_file = tmp_path / "cells.toml"
    study_file.write_text('[fixed.model]\nemb_size = 8\nhidden_size = 12\ncell = "rnn_tanh"\n[variants.awd]\n')
    study = load_study(study_file)
    assert study.fixed.model.cell == "rnn_tanh" and study.run_config("awd").model.cell == "rnn_tanh"
    config = study.run_config("awd", parse_overrides(["model.cell=gru"]))
    assert config.model.cell == "gru" and config.flat()["model.cell"] == "gru"
    study_file.write_text('[fixed.model]\ncell = "GRU"\n[variants.awd]\n')
    with pytest.raises(UserError) as error:
        load_study(study_file)
    assert str(error.value) == f"{study_file}: fixed.model.cell = 'GRU' is not one of lstm, gru, rnn_tanh, rnn_relu"


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("mode", HIDDEN_MODES)
def test_a_training_step_reaches_every_parameter_in_every_hidden_mode(cell, mode):
    torch.manual_seed(0)
    model = AWDLSTM(50, ModelConfig(16, 32, 3, cell=cell), dataclasses.replace(AWD, hidden_mode=mode)).train()
    tokens = torch.randint(50, (13, 4))
    out = model(tokens[:-1])
    loss = nn.functional.cross_entropy(out.logits.flatten(0, 1), tokens[1:].flatten())
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and (p.grad != 0).any(), name
