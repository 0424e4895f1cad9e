"""The mask diagrams come from the real dropout modules: each figure shows what the module zeroed.

Run: .venv/bin/python -m pytest -q tests/test_masks.py
"""

import base64
import io

import matplotlib.image
import numpy as np
import pytest
import torch
from torch import nn

from harness.dropout import EmbeddingDropout, WeightDropLSTM
from harness.masks import (
    embedding_figure, embedding_masks, hidden_figure, mask_figures, png_data_uri, weight_drop_mask, weight_figure,
    write_mask_figures,
)

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


def test_weight_drop_mask_is_the_one_the_forward_used():
    layer = WeightDropLSTM(3, 5, weight_p=0.5).double()
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    h0, c0 = (torch.randn(1, 2, 5, dtype=torch.float64) for _ in range(2))
    torch.manual_seed(11)
    mask = torch.from_numpy(weight_drop_mask(layer, x, (h0, c0)))
    torch.manual_seed(11)  # the same draw again, now to compare outputs
    with torch.no_grad():
        output, _ = layer.train()(x, (h0, c0))
        weight_hh = layer.weight_hh_raw * mask / 0.5
        h, c, steps = h0[0], c0[0], []
        for x_t in x:  # nn.LSTM's cell, gates in i, f, g, o order
            i, f, g, o = (x_t @ layer.weight_ih.T + layer.bias_ih + h @ weight_hh.T + layer.bias_hh).chunk(4, 1)
            c = f.sigmoid() * c + i.sigmoid() * g.tanh()
            h = o.sigmoid() * c.tanh()
            steps.append(h)
    torch.testing.assert_close(output, torch.stack(steps))
    assert 0 < mask.mean() < 1


def test_weight_figure_draws_two_layers_with_their_own_masks():
    item = weight_figure()
    layers = list(item.masks.values())
    assert len(layers) == 2 and all(m.shape == (24, 6) for m in layers)
    assert all(np.array_equal(a, b) for a, b in zip(drawn(item.figure), layers))
    assert not np.array_equal(*layers)


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
