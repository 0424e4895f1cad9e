"""Diagrams of the dropout masks, drawn from the project's own modules in harness/dropout.py.

Each figure runs a real module in train mode on ones and shows which entries came out zero (for weight
drop: which entries of W_hh got no gradient, for each W_hh layout of harness.dropout.CELL_TABLE: the vanilla
RNN's H x H, GRU's 3 and LSTM's 4 gate blocks). `python -m harness masks` writes them as PNGs; the report
embeds them as data URIs (`png_data_uri`).
"""

import base64
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.colors import LinearSegmentedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from torch import nn

from harness.dropout import CELL_TABLE, EmbeddingDropout, LockedDropout, NaiveDropout, TimestepDropout, WeightDropRNN

SEED = 0
KEPT, DROPPED = "#8fbde6", "#1d2733"
# Fractions in between would mean a partly dropped vector: they show as a shade instead of hiding.
CMAP = LinearSegmentedColormap.from_list("mask", [DROPPED, KEPT])
EMBEDDING_P, HIDDEN_P, WEIGHT_P = 0.3, 0.4, 0.5
BLOCK_LINE = "#e4572e"  # the line between two gate blocks of W_hh


@dataclass(frozen=True)
class MaskFigure:
    """One technique's diagram: its name, its rule in one line, the masks drawn (1 kept, 0 dropped)."""

    name: str
    title: str
    rule: str
    masks: dict  # panel title -> 2-D array, exactly what the panel shows
    figure: Figure


def embedding_masks(module: EmbeddingDropout, tokens: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """One train-mode call on every word and a batch: (vocab, emb) matrix kept, (T, B) batch kept fraction."""
    vocab = module.embedding.num_embeddings
    steps, batch = tokens.shape
    # One call draws one mask, so the batch and the whole vocabulary go through together as one column.
    probe = torch.cat([tokens.reshape(-1), torch.arange(vocab)]).unsqueeze(1)  # (T*B + V, 1)
    with torch.no_grad():
        out = module.train()(probe)[:, 0]  # (T*B + V, E)
    kept = (out != 0).double()
    return kept[steps * batch:].numpy(), kept[: steps * batch].mean(dim=1).reshape(steps, batch).numpy()


def hidden_mask(module: nn.Module, steps: int, batch: int, units: int) -> np.ndarray:
    """(T, B, H) kept entries of ones passed through a hidden-dropout module in train mode."""
    with torch.no_grad():
        return (module.train()(torch.ones(steps, batch, units)) != 0).double().numpy()


def weight_drop_mask(layer: WeightDropRNN, x: torch.Tensor, state) -> np.ndarray:
    """(gates * H, H) kept entries of W_hh in one train-mode forward from x (T, B, I) and state (the layer's form),
    read off the raw W_hh's gradient: zero exactly where dropped (given inputs that leave no unit idle)."""
    output, _ = layer.train()(x, state)
    (grad,) = torch.autograd.grad(output.sum(), layer.weight_hh_raw)
    return (grad != 0).double().numpy()


def _grid(ax, mask: np.ndarray, title: str, aspect: str = "auto") -> None:
    """Draw a 0/1 mask as cells with thin white borders."""
    ax.imshow(mask, cmap=CMAP, vmin=0, vmax=1, interpolation="nearest", aspect=aspect)
    rows, cols = mask.shape
    ax.set_xticks(np.arange(-0.5, cols), minor=True)
    ax.set_yticks(np.arange(-0.5, rows), minor=True)
    ax.grid(which="minor", color="white", linewidth=0.6)
    ax.tick_params(which="minor", length=0)
    ax.set_title(title, fontsize=9)


def _legend(fig: Figure) -> None:
    fig.legend(handles=[Patch(color=KEPT, label="kept (scaled by 1/(1-p))"), Patch(color=DROPPED, label="dropped (0)")],
               loc="lower center", ncol=2, frameon=False, fontsize=8)


def embedding_figure(vocab: int = 16, emb_size: int = 8, steps: int = 6, batch: int = 5) -> MaskFigure:
    """EmbeddingDropout: the embedding matrix after the mask, and the batch that looked words up in it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        embedding = nn.Embedding(vocab, emb_size)
        nn.init.ones_(embedding.weight)
        tokens = torch.randint(vocab, (steps, batch))
        rows, positions = embedding_masks(EmbeddingDropout(embedding, EMBEDDING_P), tokens)
    fig = Figure(figsize=(6.4, 3.3))
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [emb_size, batch * 1.6]})
    _grid(left, rows, "embedding matrix (vocab x emb)")
    left.set_yticks(range(vocab), [f"word {w}" for w in range(vocab)], fontsize=7)
    left.set_xticks([])
    _grid(right, positions, "the batch: token ids (time x batch)")
    for (t, b), word in np.ndenumerate(tokens.numpy()):
        right.text(b, t, str(word), ha="center", va="center", fontsize=8,
                   color="white" if positions[t, b] < 0.5 else "black")
    right.set_xticks(range(batch), [f"sample {b}" for b in range(batch)], fontsize=7)
    right.set_yticks(range(steps), [f"t={t}" for t in range(steps)], fontsize=7)
    _legend(fig)
    fig.subplots_adjust(left=0.12, right=0.98, top=0.9, bottom=0.18, wspace=0.25)
    return MaskFigure(
        "embedding", "Embedding dropout",
        f"p={EMBEDDING_P}: one draw per mini-batch zeroes whole rows of the embedding matrix, so a dropped word "
        "vanishes at every position of the batch.",
        {"embedding matrix": rows, "batch": positions}, fig,
    )


HIDDEN_RULES = {
    "locked": (LockedDropout, "Locked (variational) dropout",
               "one mask per sample and unit, (1, B, H), reused at every time step."),
    "naive": (NaiveDropout, "Naive dropout", "a fresh mask for every time step, sample and unit, (T, B, H)."),
    "timestep": (TimestepDropout, "Timestep dropout",
                 "a fresh mask per time step, shared by the whole batch, (T, 1, H) (awd-lstm-lm before Sep 2017)."),
}


def hidden_figure(mode: str, steps: int = 16, batch: int = 6, units: int = 2) -> MaskFigure:
    """A hidden-dropout mode's mask over time steps x batch, one panel per hidden unit."""
    cls, title, rule = HIDDEN_RULES[mode]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        mask = hidden_mask(cls(HIDDEN_P), steps, batch, units)  # (T, B, H)
    fig = Figure(figsize=(3.2, 3.3))
    axes = fig.subplots(units, 1, sharex=True)
    masks = {}
    for unit, ax in enumerate(axes):
        panel = mask[:, :, unit].T  # (B, T): time runs left to right
        masks[f"unit {unit}"] = panel
        _grid(ax, panel, f"hidden unit {unit}")
        ax.set_yticks(range(batch), [f"sample {b}" for b in range(batch)], fontsize=7)
    axes[-1].set_xticks(range(0, steps, 3), [f"t={t}" for t in range(0, steps, 3)], fontsize=7)
    _legend(fig)
    fig.subplots_adjust(left=0.2, right=0.97, top=0.91, bottom=0.2, hspace=0.35)
    return MaskFigure(mode, title, f"p={HIDDEN_P}: {rule}", masks, fig)


def weight_layouts() -> dict:
    """The W_hh layouts to draw, fewest gate blocks first: blocks -> the cells of CELL_TABLE that share them."""
    layouts = {}
    for name, cell in CELL_TABLE.items():
        layouts.setdefault(cell.blocks, []).append(name)
    return dict(sorted(layouts.items(), key=lambda item: len(item[0])))


def weight_figure(hidden_size: int = 6, emb_size: int = 4, steps: int = 5, batch: int = 3) -> MaskFigure:
    """WeightDropRNN: the DropConnect mask on W_hh of two stacked layers per W_hh layout, each layer its own draw."""
    layouts = weight_layouts()
    masks = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        for cells in layouts.values():
            for i, input_size in enumerate((emb_size, hidden_size)):
                # float64 and random inputs and state: no saturated gate or zero activation hides a kept weight.
                layer = WeightDropRNN(input_size, hidden_size, cells[0], weight_p=WEIGHT_P).double()
                x = torch.randn(steps, batch, input_size, dtype=torch.float64)
                zeros = layer.init_state(batch)
                state = tuple(map(torch.randn_like, zeros)) if isinstance(zeros, tuple) else torch.randn_like(zeros)
                masks[f"{cells[0]}, layer {i + 1}"] = weight_drop_mask(layer, x, state)
    # Every entry drawn the same size, so the layouts' heights compare: positions in inches.
    unit, gap, between, left, right, top, bottom = 0.09, 0.12, 0.62, 0.5, 0.1, 0.62, 0.4
    panel = hidden_size * unit
    tallest = max(len(blocks) for blocks in layouts) * panel
    width = left + len(layouts) * (2 * panel + gap) + (len(layouts) - 1) * between + right
    height = bottom + tallest + top
    fig = Figure(figsize=(width, height))
    panels = iter(masks.items())
    for n, (blocks, cells) in enumerate(layouts.items()):
        factory = CELL_TABLE[cells[0]].module  # a torch module class, or a partial of one
        module = getattr(factory, "func", factory).__name__  # RNN, GRU, LSTM; building one would draw numbers
        for layer in range(2):
            _, mask = next(panels)
            x0 = left + n * (2 * panel + gap + between) + layer * (panel + gap)
            rows = len(blocks) * hidden_size
            ax = fig.add_axes([x0 / width, (bottom + tallest - rows * unit) / height, panel / width,
                               rows * unit / height])
            _grid(ax, mask, f"nn.{module}\nlayer {layer + 1}" if layer == 0 else f"\nlayer {layer + 1}",
                  aspect="equal")
            ax.set_xticks([])
            labels = [f"gate {b}" for b in blocks] if len(blocks) > 1 else ["H x H"]
            ax.set_yticks([hidden_size * g + (hidden_size - 1) / 2 for g in range(len(blocks))], labels, fontsize=7)
            if layer == 1:
                ax.tick_params(labelleft=False, length=0)
            for g in range(1, len(blocks)):
                ax.axhline(hidden_size * g - 0.5, color=BLOCK_LINE, linewidth=1.2)
    fig.suptitle("W_hh (gates*H x H) of two stacked layers, per cell", fontsize=9)
    _legend(fig)
    layout_text = "; ".join(
        f"{' and '.join(cells)}: H x H" if len(blocks) == 1 else f"{' and '.join(cells)}: {len(blocks)}H x H, "
        f"gates {', '.join(blocks)}" for blocks, cells in layouts.items()
    )
    return MaskFigure(
        "weight", "Weight drop (DropConnect on W_hh)",
        f"p={WEIGHT_P}: one mask on each layer's whole hidden-to-hidden matrix, every gate block ({layout_text}), "
        "per forward call, shared by every sample and time step; each layer draws its own.",
        masks, fig,
    )


def mask_figures() -> list[MaskFigure]:
    """Every technique's diagram, in the order the report shows them."""
    return [embedding_figure(), *(hidden_figure(mode) for mode in HIDDEN_RULES), weight_figure()]


def figure_png(fig: Figure) -> bytes:
    """The figure as PNG bytes."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def png_data_uri(fig: Figure) -> str:
    """The figure as a base64 PNG data URI, so a page can embed it and needs no other file."""
    return "data:image/png;base64," + base64.b64encode(figure_png(fig)).decode("ascii")


def write_mask_figures(out_dir: Path) -> list[Path]:
    """Write one PNG per technique into out_dir (created if missing); returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for item in mask_figures():
        path = out_dir / f"mask-{item.name}.png"
        path.write_bytes(figure_png(item.figure))
        paths.append(path)
    return paths
