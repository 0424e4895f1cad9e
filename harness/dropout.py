"""Dropout sites of AWD-LSTM (Merity et al. 2017) and the variants the ablation compares.

Embedding-row dropout, three hidden-dropout masks (locked, naive, timestep) and an LSTM layer with
DropConnect on W_hh (weight drop) plus optional naive recurrent dropout. Tensors are sequence-first
(T, B, H). A rate of 0, or eval mode, is exactly the identity; rates outside [0, 1) raise ValueError.
"""

import math

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
    # The recurrent half of this arm lives in WeightDropLSTM(recurrent_p=...).
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
    """Identity on the input projections whose backward also returns W_hh's gradient in one matmul.

    The time loop uses W_hh detached, so autograd does not build T separate (4H, H) outer products.
    Since gates_t = gates_x[t] + h_in[t] @ W_hh^T, the gradient reaching gates_x is dL/dgates, and
    dL/dW_hh = sum_t dL/dgates_t^T @ h_in[t]. The loop appends each h_in[t] to `recurrent_inputs`.
    """

    @staticmethod
    def forward(ctx, gates_x: Tensor, weight_hh: Tensor, recurrent_inputs: list[Tensor]) -> Tensor:
        ctx.recurrent_inputs = recurrent_inputs  # filled during the loop, complete before backward
        return gates_x.view_as(gates_x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        inputs = torch.stack(ctx.recurrent_inputs)  # (T, B, H)
        return grad, grad.flatten(0, 1).t() @ inputs.flatten(0, 1), None  # (4H, T*B) @ (T*B, H)


class WeightDropLSTM(nn.Module):
    """One-layer LSTM with DropConnect on W_hh (weight_p) and optional naive recurrent dropout (recurrent_p).

    weight_ih, bias_ih and bias_hh alias one flat buffer in the fused kernel's (cuDNN's) layout, with a
    slot for W_hh; each forward writes weight_hh_raw * mask there, so cuDNN gets contiguous weights and
    the masked matrix is the only copy. Consequence: run backward before the next forward of a layer,
    otherwise backward raises autograd's "modified by an inplace operation" error.
    """

    def __init__(self, input_size: int, hidden_size: int, weight_p: float = 0.0, recurrent_p: float = 0.0):
        super().__init__()
        self.input_size, self.hidden_size = input_size, hidden_size
        self.weight_p = dropout_rate("weight_p", weight_p)
        self.recurrent_p = dropout_rate("recurrent_p", recurrent_p)
        gates = 4 * hidden_size  # i, f, g, o stacked as in nn.LSTM
        self.weight_ih = nn.Parameter(torch.empty(gates, input_size))
        self.weight_hh_raw = nn.Parameter(torch.empty(gates, hidden_size))
        self.bias_ih = nn.Parameter(torch.empty(gates))
        self.bias_hh = nn.Parameter(torch.empty(gates))
        self.reset_parameters()
        self._flatten()

    def reset_parameters(self) -> None:
        """Initialise like nn.LSTM: uniform in +-1/sqrt(hidden_size)."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    def _flatten(self) -> None:
        """Copy weight_ih, W_hh, bias_ih, bias_hh into one new buffer and point the parameters into it."""
        with torch.no_grad():
            slot = self.weight_hh_raw.detach().clone()
            weights = [self.weight_ih, slot, self.bias_ih, self.bias_hh]
            if cudnn.is_acceptable(self.weight_ih) and torch._use_cudnn_rnn_flatten_weight():
                # As nn.RNNBase.flatten_parameters: allocates a buffer in cuDNN's layout, copies the
                # weights in and set_()s each given tensor (parameters and slot) to its view of it.
                torch._cudnn_rnn_flatten_weight(
                    weights, 4, self.input_size, cudnn_rnn.get_cudnn_mode("LSTM"), self.hidden_size,
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

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Run over x (T, B, I) from state (h_0, c_0), each (1, B, H); return output (T, B, H), (h_n, c_n)."""
        if not self._is_flat():  # e.g. load_state_dict(assign=True) or `param.data = ...` (ASGD swaps)
            self._flatten()
        if state is None:
            zeros = x.new_zeros(1, x.size(1), self.hidden_size)
            state = (zeros, zeros)
        drop = self.training and self.weight_p > 0
        # One (4H, H) mask per call, shared by every sample and time step.
        mask = _mask(self.weight_hh_raw, self.weight_hh_raw.shape, self.weight_p) if drop else None
        weight_hh = _WriteSlot.apply(self.weight_hh_raw, self._slot, mask)
        if self.training and self.recurrent_p > 0:
            return self._step_through(x, state, weight_hh)
        weights = [self.weight_ih, weight_hh, self.bias_ih, self.bias_hh]
        # has_biases, num_layers, dropout, train, bidirectional, batch_first
        output, h_n, c_n = _VF.lstm(x, state, weights, True, 1, 0.0, self.training, False, False)
        return output, (h_n, c_n)

    def _step_through(
        self, x: Tensor, state: tuple[Tensor, Tensor], weight_hh: Tensor
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Python loop over time with a fresh recurrent mask per step and sample (the naive_recurrent arm)."""
        steps, batch, _ = x.shape
        h, c = state[0][0], state[1][0]  # (B, H)
        masks = _mask(x, (steps, batch, self.hidden_size), self.recurrent_p)  # all steps drawn at once
        # Input projections of all steps in one matmul, both biases folded in: (T, B, 4H).
        gates_x = torch.addmm(self.bias_ih + self.bias_hh, x.flatten(0, 1), self.weight_ih.t())
        recurrent_inputs: list[Tensor] = []
        gates_x = _RecurrentWeightGrad.apply(gates_x.view(steps, batch, -1), weight_hh, recurrent_inputs)
        weight_hh_t = weight_hh.detach().t()  # its gradient comes from _RecurrentWeightGrad
        outputs = []
        # unbind, not gates_x[t]: indexing would back-propagate a zero-padded (T, B, 4H) gradient per step.
        for gates_x_t, mask_t in zip(gates_x.unbind(0), masks.unbind(0)):
            h_in = h * mask_t
            recurrent_inputs.append(h_in.detach())
            gates = torch.addmm(gates_x_t, h_in, weight_hh_t)  # (B, 4H)
            i, f, g, o = gates.chunk(4, 1)
            c = torch.addcmul(f.sigmoid() * c, i.sigmoid(), g.tanh())
            h = o.sigmoid() * c.tanh()
            outputs.append(h)
        return torch.stack(outputs), (h.unsqueeze(0), c.unsqueeze(0))

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}, weight_p={self.weight_p}, recurrent_p={self.recurrent_p}"
