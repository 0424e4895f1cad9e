"""The mask diagrams come from the real dropout modules: each figure shows what the module zeroed (for weight drop,
per W_hh layout of every cell: vanilla RNN, GRU, LSTM).

Run: .venv/bin/python -m pytest -q tests/test_masks.py
"""

import base64
import io

import matplotlib.image
import numpy as np
import pytest
import torch
from torch import nn

from harness import masks
from harness.dropout import CELL_TABLE, EmbeddingDropout, WeightDropRNN
from harness.masks import (
    embedding_figure, embedding_masks, hidden_figure, mask_figures, png_data_uri, weight_drop_mask, weight_figure,
    write_mask_figures,
)
from helpers import random_state

pytestmark = pytest.mark.fast

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def drawn(figure) -> list:
    """The arrays the figure's image panels show, in panel order."""
    return [np.asarray(ax.images[0].get_array()) for ax in figure.axes if ax.images]


def test_embedding_figure_drops_whole_rows_and_every_use_of_a_dropped_word():
    item = embedding_figure()
    rows, positions = item.masks["embedding matrix"], item.masks["batch"]
    assert [np.array_equal(a, b) for a, b in zip(drawn(item.figure), (rows, positions))] == [True, True]
    assert set(np.unique(rows.sum(axis=1))) <= {0.0, rows.shape[1]}  # a row is all kept or all dropped
    assert 0 < rows[:, 0].sum() < rows.shape[0]  # this seed drops some words and keeps others
    batch_panel = item.figure.axes[1]
    assert len(batch_panel.texts) == positions.size
    for text in batch_panel.texts:  # each cell is labelled with its token id at (sample, step)
        sample, step = (int(round(v)) for v in text.get_position())
        assert positions[step, sample] == rows[int(text.get_text()), 0]


def test_embedding_masks_match_the_module_output():
    torch.manual_seed(3)
    embedding = nn.Embedding(40, 5)
    nn.init.ones_(embedding.weight)
    tokens = torch.randint(40, (7, 6))
    rows, positions = embedding_masks(EmbeddingDropout(embedding, 0.5), tokens)
    assert np.array_equal(positions, rows.all(axis=1)[tokens.numpy()].astype(float))
    assert set(np.unique(rows.sum(axis=1))) == {0.0, 5.0}


@pytest.mark.parametrize("mode", ["locked", "naive", "timestep"])
def test_hidden_figures_show_each_modes_sharing(mode):
    item = hidden_figure(mode, steps=24, batch=12)
    panels = list(item.masks.values())  # each (batch, time) for one hidden unit
    assert all(np.array_equal(a, b) for a, b in zip(drawn(item.figure), panels))
    for panel in panels:
        over_time = (panel == panel[:, :1]).all()
        over_batch = (panel == panel[:1, :]).all()
        assert (over_time, over_batch) == {"locked": (True, False), "naive": (False, False),
                                           "timestep": (False, True)}[mode]
        assert 0 < panel.mean() < 1


def torch_module_with(layer: WeightDropRNN, weight_hh: torch.Tensor) -> torch.nn.RNNBase:
    """The torch module of the layer's cell holding its weights, with weight_hh as W_hh."""
    module = CELL_TABLE[layer.cell].module(layer.input_size, layer.hidden_size).double()
    with torch.no_grad():
        for name, value in [("weight_ih_l0", layer.weight_ih), ("weight_hh_l0", weight_hh),
                            ("bias_ih_l0", layer.bias_ih), ("bias_hh_l0", layer.bias_hh)]:
            getattr(module, name).copy_(value)
    return module


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_weight_drop_mask_is_the_one_the_forward_used(cell):
    layer = WeightDropRNN(3, 5, cell, weight_p=0.5).double()
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    state = random_state(layer, 2)
    torch.manual_seed(11)
    mask = torch.from_numpy(weight_drop_mask(layer, x, state))
    torch.manual_seed(11)  # the same draw again, now to compare outputs
    with torch.no_grad():
        output, _ = layer.train()(x, state)
        # One matrix for every sample and step: the cell's torch module given raw W_hh * mask / (1 - p) computes it.
        expected, _ = torch_module_with(layer, layer.weight_hh_raw * mask / 0.5)(x, state)
    torch.testing.assert_close(output, expected)
    assert mask.shape == (CELL_TABLE[cell].gates * 5, 5) and 0 < mask.mean() < 1


def test_weight_figure_panels_are_the_masks_the_forwards_used(monkeypatch):
    """Each panel is read off a real forward: replaying that forward's random draw, the cell's torch module given the
    panel's mask reproduces the layer's output. A mask drawn per sample or per step, or a panel from another draw,
    would not; nor would a panel drawn for a layer other than the one it names."""
    calls = []
    read = masks.weight_drop_mask

    def record(layer, x, state):
        calls.append((layer, x, state, torch.get_rng_state()))
        return read(layer, x, state)

    monkeypatch.setattr(masks, "weight_drop_mask", record)
    item = weight_figure()
    assert len(calls) == len(item.masks) == 6
    for (name, panel), (layer, x, state, rng) in zip(item.masks.items(), calls, strict=True):
        assert name.startswith(f"{layer.cell}, layer ")
        torch.set_rng_state(rng)
        with torch.no_grad():
            output, _ = layer.train()(x, state)
        weight_hh = layer.weight_hh_raw * torch.from_numpy(panel) / (1 - masks.WEIGHT_P)
        torch.testing.assert_close(output, torch_module_with(layer, weight_hh)(x, state)[0])


def test_weight_figure_draws_each_w_hh_layout_in_its_gate_blocks_two_layers_each():
    item = weight_figure()
    hidden = 6
    # The vanilla RNN's H x H, then GRU's r, z, n, then LSTM's i, f, g, o: PyTorch's order of W_hh's blocks.
    layouts = {"rnn_tanh": [], "gru": ["r", "z", "n"], "lstm": ["i", "f", "g", "o"]}
    assert list(item.masks) == [f"{cell}, layer {i}" for cell in layouts for i in (1, 2)]
    panels = [ax for ax in item.figure.axes if ax.images]
    assert all(np.array_equal(a, b) for a, b in zip(drawn(item.figure), item.masks.values(), strict=True))
    for n, (cell, gates) in enumerate(layouts.items()):
        first, second = item.masks[f"{cell}, layer 1"], item.masks[f"{cell}, layer 2"]
        blocks = max(len(gates), 1)
        assert first.shape == second.shape == (blocks * hidden, hidden)
        assert not np.array_equal(first, second), "two layers share a mask"
        for mask in (first, second):  # p = 0.5: a mask per sample or step would leave almost nothing dropped
            assert 0.25 < 1 - mask.mean() < 0.75
        ax = panels[2 * n]
        labels = [t.get_text() for t in ax.get_yticklabels()]
        assert labels == ([f"gate {g}" for g in gates] or ["H x H"])
        assert list(ax.get_yticks()) == [hidden * g + (hidden - 1) / 2 for g in range(blocks)]
        for panel in panels[2 * n: 2 * n + 2]:  # a line between each two gate blocks, in both layers' panels
            lines = sorted(line.get_ydata()[0] for line in panel.lines)
            assert lines == [hidden * g - 0.5 for g in range(1, blocks)]
    assert "gru: 3H x H, gates r, z, n" in item.rule and "lstm: 4H x H, gates i, f, g, o" in item.rule
    assert "rnn_tanh and rnn_relu: H x H" in item.rule


def test_figures_leave_the_global_random_state_alone():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    mask_figures()
    torch.testing.assert_close(torch.rand(3), expected)


def test_write_mask_figures_writes_one_png_per_technique(tmp_path):
    paths = write_mask_figures(tmp_path / "masks")
    assert [p.name for p in paths] == [f"mask-{n}.png" for n in ("embedding", "locked", "naive", "timestep", "weight")]
    for path in paths:
        assert path.read_bytes().startswith(PNG_SIGNATURE)
        assert matplotlib.image.imread(path).shape[0] > 100


def test_data_uris_decode_to_the_figures_and_rules_name_the_sharing():
    figures = mask_figures()
    assert [f.name for f in figures] == ["embedding", "locked", "naive", "timestep", "weight"]
    assert "whole rows of the embedding matrix" in figures[0].rule and "reused at every time step" in figures[1].rule
    for item in figures:
        uri = png_data_uri(item.figure)
        assert uri.startswith("data:image/png;base64,")
        image = matplotlib.image.imread(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])), format="png")
        assert image.ndim == 3 and image.shape[0] > 100
