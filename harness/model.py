"""AWD-LSTM (Merity et al. 2017) with every dropout site switchable by its rate, on any recurrent cell.

    tokens (T, B) -> embedding dropout -> input dropout -> [WeightDropRNN -> hidden dropout] x (n-1)
                  -> WeightDropRNN (emb_size wide) -> output dropout -> tied decoder -> logits (T, B, V)

The cell (ModelConfig.cell: lstm, gru, rnn_tanh, rnn_relu) is the same in every layer. A rate of 0 is the
identity, so with every rate at 0 this computes what a plain stack of nn.LSTM (nn.GRU, nn.RNN) layers with
the same weights computes.
"""

from typing import NamedTuple

from torch import Tensor, nn

from harness.config import DropoutConfig, ModelConfig
from harness.dropout import EmbeddingDropout, State, WeightDropRNN, make_hidden_dropout

ModelState = list[State]  # one per layer: (h, c) for the LSTM, h for the other cells; each (1, B, H_layer)
LSTMState = ModelState  # its name from before there were other cells


class LMOutput(NamedTuple):
    """What one forward pass returns: the loss needs logits, truncated BPTT the state, AR/TAR raw and dropped."""

    logits: Tensor  # (T, B, V)
    state: ModelState  # to carry into the next segment
    raw: Tensor  # the last layer's output before output dropout (T, B, E): TAR penalises its changes over time
    dropped: Tensor  # the same after output dropout (T, B, E): AR penalises its size


class AWDLSTM(nn.Module):
    """The language model on the cell ModelConfig.cell names; forward returns what training needs for the loss and
    AR/TAR. The name is the model family's (AWD-LSTM) whatever the cell, so scripts keep working."""

    def __init__(self, vocab_size: int, model: ModelConfig, dropout: DropoutConfig):
        super().__init__()
        self.config, self.dropout = model, dropout
        mode = dropout.hidden_mode
        self.encoder = nn.Embedding(vocab_size, model.emb_size)
        self.embedding_dropout = EmbeddingDropout(self.encoder, dropout.embedding)
        self.input_dropout = make_hidden_dropout(mode, dropout.input)
        # The last layer is emb_size wide so its output can feed the tied decoder.
        last = model.emb_size if model.tie_weights else model.hidden_size
        sizes = [model.emb_size] + [model.hidden_size] * (model.n_layers - 1) + [last]
        recurrent_p = dropout.hidden if mode == "naive_recurrent" else 0.0
        self.layers = nn.ModuleList(
            WeightDropRNN(sizes[i], sizes[i + 1], model.cell, weight_p=dropout.weight, recurrent_p=recurrent_p)
            for i in range(model.n_layers)
        )
        self.hidden_dropouts = nn.ModuleList(make_hidden_dropout(mode, dropout.hidden) for _ in sizes[2:])
        self.output_dropout = make_hidden_dropout(mode, dropout.output)
        self.decoder = nn.Linear(last, vocab_size)
        if model.tie_weights:  # the shapes match by construction: the last layer is emb_size wide
            self.decoder.weight = self.encoder.weight
        # The reference code's initialisation.
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)

    def init_state(self, batch_size: int) -> ModelState:
        """Zeros for every layer: (h, c) each for the LSTM, h for the other cells."""
        return [layer.init_state(batch_size) for layer in self.layers]

    def forward(self, tokens: Tensor, state: ModelState | None = None) -> LMOutput:
        """tokens (T, B) -> logits (T, B, V), new state, last layer's raw and dropped outputs (T, B, E).

        Raises ValueError (from the fused kernel) when a state's batch size differs from the tokens'.
        """
        x = self.input_dropout(self.embedding_dropout(tokens))  # (T, B, E)
        state = state or [None] * len(self.layers)
        new_state = []
        for i, layer in enumerate(self.layers):
            raw, layer_state = layer(x, state[i])  # (T, B, H_i)
            new_state.append(layer_state)
            x = self.hidden_dropouts[i](raw) if i < len(self.hidden_dropouts) else raw
        dropped = self.output_dropout(raw)
        return LMOutput(self.decoder(dropped), new_state, raw, dropped)


def detach_state(state: ModelState) -> ModelState:
    """Cut the graph between truncated-BPTT segments while carrying the values on."""
    return [tuple(t.detach() for t in s) if isinstance(s, tuple) else s.detach() for s in state]
