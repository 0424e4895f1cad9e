"""Dropout sites of AWD-LSTM (Merity et al. 2017) and the variants the ablation compares.

Embedding-row dropout, three hidden-dropout masks (locked, naive, timestep) and a recurrent layer of any
cell in CELL_TABLE (LSTM, GRU, vanilla tanh/ReLU RNN) with DropConnect on W_hh (weight drop) plus optional
naive recurrent dropout. Tensors are sequence-first (T, B, H). A rate of 0, or eval mode, is exactly the
identity; rates outside [0, 1) raise ValueError.
"""

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, _VF, nn
from torch.backends import cudnn
from torch.backends.cudnn import rnn as cudnn_rnn

from harness.config import HIDDEN_MODES, dropout_rate


def _mask(like: Tensor, shape: tuple[int, ...], p: float) -> Tensor:
    """Bernoulli keep-mask of `shape`, scaled by 1/(1-p) so activations keep their expected value."""
    # uniform_ + in-place threshold: same distribution as bernoulli_(1 - p), several times faster on CPU.
    return like.new_empty(shape).uniform_().ge_(p).mul_(1 / (1 - p))


class _Dropout(nn.Module):
    """Base for the dropout modules: holds and validates the rate p."""

    def __init__(self, p: float):
        super().__init__()
        self.p = dropout_rate("p", p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class EmbeddingDropout(_Dropout):
    """Drop whole rows of the embedding matrix: a dropped word vanishes at every position of the batch."""

    def __init__(self, embedding: nn.Embedding, p: float):
        super().__init__(p)
        if embedding.max_norm is not None:
            # max_norm renormalises rows in place, and the reference code renormalises the masked,
            # rescaled copy instead: no cheap equivalent, so refuse rather than guess.
            raise ValueError("EmbeddingDropout does not support an nn.Embedding with max_norm; set max_norm=None")
        self.embedding = embedding

    def forward(self, tokens: Tensor) -> Tensor:
        """Look up tokens (T, B) and return embeddings (T, B, E) with dropped words zeroed."""
        if not self.training or self.p == 0:
            return self.embedding(tokens)
        # (weight * mask)[tokens] == weight[tokens] * mask[tokens]: same values and gradients as masking
        # the (V, E) matrix, at the cost of a (V, 1) mask. One draw per call, i.e. per mini-batch.
        mask = _mask(self.embedding.weight, (self.embedding.num_embeddings, 1), self.p)
        return self.embedding(tokens) * mask[tokens]  # (T, B, E) * (T, B, 1)


class LockedDropout(_Dropout):
    """Variational dropout: one mask per sample (1, B, H), the same at every time step."""

    def forward(self, x: Tensor) -> Tensor:
        """Drop features of x (T, B, H) with a mask shared over time."""
        if not self.training or self.p == 0:
            return x
        return x * _mask(x, (1, x.size(1), x.size(2)), self.p)


class NaiveDropout(_Dropout):
    """Standard dropout: a fresh mask for every element, i.e. per time step and sample (T, B, H)."""

    def forward(self, x: Tensor) -> Tensor:
        """Drop elements of x (T, B, H) independently."""
        if not self.training or self.p == 0:
            return x
        return x * _mask(x, x.shape, self.p)


class TimestepDropout(_Dropout):
    """Mask (T, 1, H): new at each step, shared by the whole batch (awd-lstm-lm before Sep 2017)."""

    def forward(self, x: Tensor) -> Tensor:
        """Drop features of x (T, B, H) with a mask shared over the batch."""
        if not self.training or self.p == 0:
            return x
        return x * _mask(x, (x.size(0), 1, x.size(2)), self.p)


_HIDDEN_DROPOUT = {
    "locked": LockedDropout,
    "naive": NaiveDropout,
    "timestep": TimestepDropout,
    # The recurrent half of this arm lives in WeightDropRNN(recurrent_p=...).
    "naive_recurrent": NaiveDropout,
}


def make_hidden_dropout(mode: str, p: float) -> nn.Module:
    """Build the between-layer dropout module for a hidden-dropout mode (one of HIDDEN_MODES)."""
    if mode not in _HIDDEN_DROPOUT:
        raise ValueError(f"unknown hidden dropout mode {mode!r}; choose one of {', '.join(HIDDEN_MODES)}")
    return _HIDDEN_DROPOUT[mode](p)



class _WriteSlot(torch.autograd.Function):
    """Write raw W_hh (times the DropConnect mask, if any) into the flat buffer's slot; grads go to raw."""

    @staticmethod
    def forward(ctx, raw: Tensor, slot: Tensor, mask: Tensor | None) -> Tensor:
        # Runs under no_grad. The write bumps the slot's version counter, which is what makes a
        # second forward before backward fail loudly (autograd's in-place error) instead of
        # silently back-propagating through the newer mask.
        if mask is None:
            slot.copy_(raw)
        else:
            torch.mul(raw, mask, out=slot)
        ctx.save_for_backward(mask)
        # An alias sharing the slot's version counter; not a view, whose view+inplace error would
        # wrongly advise cloning.
        return slot.detach()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        (mask,) = ctx.saved_tensors
        return (grad if mask is None else grad * mask), None, None


class _RecurrentWeightGrad(torch.autograd.Function):
    """Identity on the base of the recurrent projections whose backward also returns W_hh's gradient in one matmul.

    The time loop uses W_hh detached, so autograd does not build T separate (gH, H) outer products. Each step
    computes gh_t = base[t] + h_in[t] @ W_hh^T in one addmm, so the gradient reaching base[t] is dL/dgh_t
    whatever the cell then does with gh_t (GRU's r * (W_hn h + b_hn) included), and
    dL/dW_hh = sum_t dL/dgh_t^T @ h_in[t]. The loop appends each h_in[t] to `recurrent_inputs`.
    """

    @staticmethod
    def forward(ctx, base: Tensor, weight_hh: Tensor, recurrent_inputs: list[Tensor]) -> Tensor:
        ctx.recurrent_inputs = recurrent_inputs  # filled during the loop, complete before backward
        return base.view_as(base)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        inputs = torch.stack(ctx.recurrent_inputs)  # (T, B, H)
        return grad, grad.flatten(0, 1).t() @ inputs.flatten(0, 1), None  # (gH, T*B) @ (T*B, H)


# One time step of each cell for the naive_recurrent loop (WeightDropRNN._step_through), in the equations of
# PyTorch's nn.LSTM, nn.GRU and nn.RNN docs. gx: W_ih x_t + b_ih, or None where gh holds it too (see
# Cell.sums_projections); gh: W_hh h_in + b_hh (+ gx); both (B, gates * H). state: (h, c) or (h,), each (B, H),
# h unmasked: the recurrent mask acts on h_in alone. Returns the new state; its first tensor is the output.


def _lstm_step(gx: None, gh: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """c' = sigmoid(f) * c + sigmoid(i) * tanh(g); h' = sigmoid(o) * tanh(c')."""
    _, c = state
    i, f, g, o = gh.chunk(4, 1)
    c = torch.addcmul(f.sigmoid() * c, i.sigmoid(), g.tanh())
    return o.sigmoid() * c.tanh(), c


def _gru_step(gx: Tensor, gh: Tensor, state: tuple[Tensor]) -> tuple[Tensor]:
    """r, z = sigmoid(gx_r + gh_r), sigmoid(gx_z + gh_z); n = tanh(gx_n + r * gh_n); h' = (1 - z) * n + z * h."""
    (h,) = state
    x_r, x_z, x_n = gx.chunk(3, 1)
    h_r, h_z, h_n = gh.chunk(3, 1)
    r, z = (x_r + h_r).sigmoid(), (x_z + h_z).sigmoid()
    n = torch.addcmul(x_n, r, h_n).tanh()
    return (torch.lerp(n, h, z),)  # n + z * (h - n): the carry is h itself, not the masked h_in


def _rnn_tanh_step(gx: None, gh: Tensor, state: tuple[Tensor]) -> tuple[Tensor]:
    """h' = tanh(W_ih x + b_ih + W_hh h + b_hh)."""
    return (gh.tanh(),)


def _rnn_relu_step(gx: None, gh: Tensor, state: tuple[Tensor]) -> tuple[Tensor]:
    """h' = relu(W_ih x + b_ih + W_hh h + b_hh)."""
    return (gh.relu(),)


@dataclass(frozen=True)
class Cell:
    """How one recurrent cell is computed: by its fused kernel, by cuDNN, and step by step (naive_recurrent)."""

    blocks: tuple[str, ...]  # the gate blocks stacked in W_ih, W_hh and both biases, in PyTorch's order
    kernel: str  # its fused kernel in torch._VF: cuDNN on a GPU, ATen's C++ loop on the CPU (as nn.RNNBase calls)
    cudnn_mode: str  # the cuDNN weight layout to flatten into: nn.RNNBase.mode of the same cell
    cell_state: bool  # True: the state is (h, c) (LSTM); False: h alone
    step: Callable  # one step of the naive_recurrent loop: (gx, gh, state) -> state (see _lstm_step)
    # True where the step uses W_ih x + b_ih and W_hh h + b_hh only through their sum: the loop then folds the
    # input side into each step's addmm and passes gx=None. False for GRU, whose r scales W_hn h + b_hn alone.
    sums_projections: bool
    module: Callable  # (input_size, hidden_size) -> the torch module of this cell: the reference, the plain stack

    @property
    def gates(self) -> int:
        """How many (H, .) blocks W_ih, W_hh and the biases stack: 4 for the LSTM, 3 GRU, 1 vanilla RNN."""
        return len(self.blocks)


# The one extension point for recurrent cells. A fifth cell is one record here and its name in config.CELLS
# (a test checks the two agree); WeightDropRNN, the model, the bench and the mask diagrams read this table.
CELL_TABLE = {
    "lstm": Cell(blocks=("i", "f", "g", "o"), kernel="lstm", cudnn_mode="LSTM", cell_state=True, step=_lstm_step,
                 sums_projections=True, module=nn.LSTM),
    "gru": Cell(blocks=("r", "z", "n"), kernel="gru", cudnn_mode="GRU", cell_state=False, step=_gru_step,
                sums_projections=False, module=nn.GRU),
    "rnn_tanh": Cell(blocks=("h",), kernel="rnn_tanh", cudnn_mode="RNN_TANH", cell_state=False, step=_rnn_tanh_step,
                     sums_projections=True, module=functools.partial(nn.RNN, nonlinearity="tanh")),
    "rnn_relu": Cell(blocks=("h",), kernel="rnn_relu", cudnn_mode="RNN_RELU", cell_state=False, step=_rnn_relu_step,
                     sums_projections=True, module=functools.partial(nn.RNN, nonlinearity="relu")),
}

State = Tensor | tuple[Tensor, Tensor]  # h, or (h, c) for the LSTM; each (1, B, H)


class WeightDropRNN(nn.Module):
    """One recurrent layer of a cell in CELL_TABLE with DropConnect on W_hh (weight_p) and optional naive
    recurrent dropout (recurrent_p); at rates 0 and in eval mode it computes what nn.LSTM / nn.GRU / nn.RNN do.

    Weight drop (Merity et al. 2017, section 2; DropConnect, Wan et al. 2013): one mask on the whole W_hh, every
    gate block ((gates * H, H)), drawn per forward call (per mini-batch), shared by every sample and time step,
    a new one per layer; the raw W_hh is the parameter and gets grad * mask. weight_ih, bias_ih and bias_hh
    alias one flat buffer in the fused kernel's (cuDNN's) layout, with a slot for W_hh; each forward writes
    weight_hh_raw * mask there, so the kernel gets contiguous weights and the masked matrix is the only copy.
    Consequence: run backward before the next forward of a layer, otherwise backward raises autograd's
    "modified by an inplace operation" error. Raises ValueError for an unknown cell or a rate outside [0, 1).
    """

    def __init__(self, input_size: int, hidden_size: int, cell: str = "lstm", weight_p: float = 0.0,
                 recurrent_p: float = 0.0):
        super().__init__()
        if cell not in CELL_TABLE:
            raise ValueError(f"cell = {cell!r} is not one of {', '.join(CELL_TABLE)}")
        self.input_size, self.hidden_size, self.cell = input_size, hidden_size, cell
        self._spec = CELL_TABLE[cell]
        self.weight_p = dropout_rate("weight_p", weight_p)
        self.recurrent_p = dropout_rate("recurrent_p", recurrent_p)
        gates = self._spec.gates * hidden_size  # the blocks stacked as in the torch module (LSTM: i, f, g, o)
        self.weight_ih = nn.Parameter(torch.empty(gates, input_size))
        self.weight_hh_raw = nn.Parameter(torch.empty(gates, hidden_size))
        self.bias_ih = nn.Parameter(torch.empty(gates))
        self.bias_hh = nn.Parameter(torch.empty(gates))
        self.reset_parameters()
        self._flatten()

    def reset_parameters(self) -> None:
        """Initialise like nn.LSTM, nn.GRU and nn.RNN: uniform in +-1/sqrt(hidden_size)."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    def _flatten(self) -> None:
        """Copy weight_ih, W_hh, bias_ih, bias_hh into one new buffer and point the parameters into it."""
        with torch.no_grad():
            slot = self.weight_hh_raw.detach().clone()
            weights = [self.weight_ih, slot, self.bias_ih, self.bias_hh]
            if cudnn.is_acceptable(self.weight_ih) and torch._use_cudnn_rnn_flatten_weight():
                # Private, as nn.RNNBase.flatten_parameters uses it: the only way to get cuDNN's layout for the
                # cell's mode. Allocates the buffer, copies the weights in and set_()s each given tensor
                # (parameters and slot) to its view of it.
                torch._cudnn_rnn_flatten_weight(
                    weights, 4, self.input_size, cudnn_rnn.get_cudnn_mode(self._spec.cudnn_mode), self.hidden_size,
                    0, 1, False, False,  # proj_size, num_layers, batch_first, bidirectional
                )
            else:
                # Elsewhere the layout is plain concatenation: [w_ih | W_hh slot | b_ih | b_hh].
                flat = torch.cat([w.reshape(-1) for w in weights])
                views = flat.split([w.numel() for w in weights])
                w_ih, slot, b_ih, b_hh = (view.view_as(w) for view, w in zip(views, weights))
                self.weight_ih.data, self.bias_ih.data, self.bias_hh.data = w_ih, b_ih, b_hh
        self._slot = slot

    def _is_flat(self) -> bool:
        """Whether weight_ih, bias_ih and bias_hh still alias the buffer holding the W_hh slot."""
        storage = self._slot.untyped_storage().data_ptr()
        return all(
            p.untyped_storage().data_ptr() == storage and p.dtype == self._slot.dtype
            for p in (self.weight_ih, self.bias_ih, self.bias_hh)
        )

    def _apply(self, fn, recurse=True):
        # .to()/.cuda()/.double() move each parameter on its own; rebuild the shared buffer after.
        result = super()._apply(fn, recurse)
        if not self._is_flat():
            self._flatten()
        return result

    def init_state(self, batch_size: int) -> State:
        """Zeros on the layer's device and dtype: (h, c) for the LSTM, else h; each (1, B, H)."""
        zeros = [self.weight_ih.new_zeros(1, batch_size, self.hidden_size) for _ in range(1 + self._spec.cell_state)]
        return tuple(zeros) if self._spec.cell_state else zeros[0]

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """Run over x (T, B, I) from state (h_0, or (h_0, c_0) for the LSTM; zeros if None); return the output
        (T, B, H) and the final state in the same form, as the torch module of the cell does."""
        if not self._is_flat():  # e.g. load_state_dict(assign=True) or `param.data = ...` (ASGD swaps)
            self._flatten()
        if state is None:
            state = self.init_state(x.size(1))
        drop = self.training and self.weight_p > 0
        # One (gates * H, H) mask per call, shared by every sample and time step.
        mask = _mask(self.weight_hh_raw, self.weight_hh_raw.shape, self.weight_p) if drop else None
        weight_hh = _WriteSlot.apply(self.weight_hh_raw, self._slot, mask)
        if self.training and self.recurrent_p > 0:
            return self._step_through(x, state, weight_hh)
        weights = [self.weight_ih, weight_hh, self.bias_ih, self.bias_hh]
        kernel = getattr(_VF, self._spec.kernel)  # looked up per call, so a spy on torch._VF sees every call
        # has_biases, num_layers, dropout, train, bidirectional, batch_first
        output, *final = kernel(x, state, weights, True, 1, 0.0, self.training, False, False)
        return output, (tuple(final) if self._spec.cell_state else final[0])

    def _step_through(self, x: Tensor, state: State, weight_hh: Tensor) -> tuple[Tensor, State]:
        """Python loop over time with a fresh mask per step and sample on h(t-1) where it enters W_hh (all gate
        blocks), the naive_recurrent arm; the cell's own carry (LSTM's c, GRU's z * h) is not masked."""
        spec = self._spec
        steps, batch, _ = x.shape
        states = tuple(s[0] for s in (state if spec.cell_state else (state,)))  # each (B, H)
        masks = _mask(x, (steps, batch, self.hidden_size), self.recurrent_p)  # all steps drawn at once
        flat_x = x.flatten(0, 1)
        if spec.sums_projections:
            # Input projections of all steps in one matmul, both biases folded in: (T, B, gH).
            base = torch.addmm(self.bias_ih + self.bias_hh, flat_x, self.weight_ih.t()).view(steps, batch, -1)
            projections = [None] * steps
        else:
            projections = torch.addmm(self.bias_ih, flat_x, self.weight_ih.t()).view(steps, batch, -1).unbind(0)
            base = self.bias_hh.expand(steps, batch, -1)
        recurrent_inputs: list[Tensor] = []
        base = _RecurrentWeightGrad.apply(base, weight_hh, recurrent_inputs)
        weight_hh_t = weight_hh.detach().t()  # its gradient comes from _RecurrentWeightGrad
        outputs = []
        # unbind, not base[t]: indexing would back-propagate a zero-padded (T, B, gH) gradient per step.
        for gx, base_t, mask_t in zip(projections, base.unbind(0), masks.unbind(0)):
            h_in = states[0] * mask_t
            recurrent_inputs.append(h_in.detach())
            states = spec.step(gx, torch.addmm(base_t, h_in, weight_hh_t), states)  # gh: (B, gH)
            outputs.append(states[0])
        final = tuple(s.unsqueeze(0) for s in states)
        return torch.stack(outputs), (final if spec.cell_state else final[0])

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, cell={self.cell!r}, weight_p={self.weight_p}, "
                f"recurrent_p={self.recurrent_p}")


class WeightDropLSTM(WeightDropRNN):
    """WeightDropRNN with the LSTM cell, under the name and arguments scripts already use."""

    def __init__(self, input_size: int, hidden_size: int, weight_p: float = 0.0, recurrent_p: float = 0.0):
        super().__init__(input_size, hidden_size, "lstm", weight_p, recurrent_p)
