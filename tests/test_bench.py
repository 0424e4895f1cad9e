"""The throughput benchmark measures every arm against the plain stack of the same cell, with memory."""

import pytest
from torch import nn

from harness import bench
from harness.bench import PlainRNN, SIZES, build_arm, format_table, run_bench
from harness.config import CELLS, ModelConfig

pytestmark = pytest.mark.slow


def test_bench_rows_have_ratios_and_memory():
    rows = run_bench(sizes=("cpu",), rounds=2, steps=1, arms=("plain", "locked"), log=lambda *a: None)
    assert [(r.size, r.cell, r.arm) for r in rows] == [("cpu", "lstm", "plain"), ("cpu", "lstm", "locked")]
    plain, locked = rows
    assert plain.ratio == plain.cpu_ratio == 1.0 and locked.ratio > 0 and locked.cpu_ratio > 0
    assert locked.tokens_per_s > 0
    # The model, its gradients and (T, B, V) logits at least: far above nothing.
    assert plain.peak_memory_mb > 20 and locked.peak_memory_mb > 20


@pytest.mark.fast
@pytest.mark.parametrize("cell, module", [("lstm", nn.LSTM), ("gru", nn.GRU), ("rnn_tanh", nn.RNN),
                                          ("rnn_relu", nn.RNN)])
def test_plain_stack_has_the_awd_sizes_in_the_cells_torch_module(cell, module):
    model = PlainRNN(100, ModelConfig(200, 400, 3, cell=cell))
    assert [type(m) for m in model.layers] == [module] * 3
    assert [(m.input_size, m.hidden_size) for m in model.layers] == [(200, 400), (400, 400), (400, 200)]
    if module is nn.RNN:
        assert {m.nonlinearity for m in model.layers} == {cell.removeprefix("rnn_")}
    assert model.decoder.weight is model.encoder.weight
    state = model.init_state(3)
    assert all(isinstance(s, tuple) == (cell == "lstm") for s in state)
    awd = build_arm("locked", "tiny", "cpu", cell)
    assert [layer.cell for layer in awd.layers] == [cell] * SIZES["tiny"].n_layers
    assert [type(m) for m in build_arm("plain", "tiny", "cpu", cell).layers] == [module] * SIZES["tiny"].n_layers


def test_ratios_are_the_arms_speed_over_the_plain_stacks(monkeypatch):
    """Two copies of the plain stack, one made to do every step twice: measured side by side, its ratio is
    about 1/2 in wall-clock and in CPU time (a ratio computed the wrong way round would be about 2)."""
    real_init, real_step = bench._Trainer.__init__, bench._Trainer.step

    def init(self, arm, size, device, batch_size=bench.BATCH, cell="lstm"):
        real_init(self, "plain", size, device, batch_size, cell)  # "locked" builds the plain stack too
        self.repeats = 2 if arm == "locked" else 1

    def step(self):
        for _ in range(self.repeats):
            real_step(self)

    monkeypatch.setattr(bench._Trainer, "__init__", init)
    monkeypatch.setattr(bench._Trainer, "step", step)
    monkeypatch.setattr(bench, "_peak_memory", lambda arms, *a, **k: {arm: 0.0 for arm in arms})
    plain, slow = run_bench(sizes=("cpu",), rounds=3, steps=2, arms=("plain", "locked"), log=lambda *a: None)
    # Generous bounds: other processes on a loaded machine move single rounds, the median of three less.
    assert 0.35 < slow.cpu_ratio < 0.65 and 0.3 < slow.ratio < 0.75
    assert slow.tokens_per_s < plain.tokens_per_s


def test_each_cell_is_timed_against_the_plain_stack_of_that_cell(monkeypatch):
    """Per cell and size, the arms are built for that cell and timed together: the GRU's plain stack made slow
    shows in the GRU's ratio alone (about 2), the vanilla RNN's stays about 1."""
    built = []
    real_init, real_step = bench._Trainer.__init__, bench._Trainer.step

    def init(self, arm, size, device, batch_size=bench.BATCH, cell="lstm"):
        built.append((size, cell, arm))
        real_init(self, "plain", size, device, batch_size, cell)
        self.repeats = 2 if (cell, arm) == ("gru", "plain") else 1

    def step(self):
        for _ in range(self.repeats):
            real_step(self)

    monkeypatch.setattr(bench._Trainer, "__init__", init)
    monkeypatch.setattr(bench._Trainer, "step", step)
    monkeypatch.setattr(bench, "_peak_memory", lambda arms, size, device, batch_size, cell: {
        arm: float(CELLS.index(cell)) for arm in arms})
    rows = run_bench(sizes=("tiny",), rounds=3, steps=2, arms=("plain", "locked"), log=lambda *a: None,
                     cells=("gru", "rnn_tanh"))
    assert built == [("tiny", "gru", "plain"), ("tiny", "gru", "locked"),
                     ("tiny", "rnn_tanh", "plain"), ("tiny", "rnn_tanh", "locked")]
    assert [(r.cell, r.arm) for r in rows] == [("gru", "plain"), ("gru", "locked"),
                                               ("rnn_tanh", "plain"), ("rnn_tanh", "locked")]
    gru, rnn = rows[1], rows[3]
    assert 1.5 < gru.cpu_ratio < 2.8 and 0.7 < rnn.cpu_ratio < 1.4
    assert [r.peak_memory_mb for r in rows] == [1.0, 1.0, 2.0, 2.0]  # each cell's own measurement
    table = format_table(rows, "cpu").splitlines()
    assert table[2] == "| size | cell | arm | tokens/s | vs plain | vs plain (CPU time) | peak memory (MB) |"
    assert [line.split(" | ")[1:3] for line in table[4:]] == [["gru", "plain"], ["gru", "locked"],
                                                              ["rnn_tanh", "plain"], ["rnn_tanh", "locked"]]
