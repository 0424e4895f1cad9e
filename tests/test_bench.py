"""The throughput benchmark measures every arm against the plain stack, with memory."""

import pytest

from harness.bench import PlainLSTM, SIZES, run_bench

pytestmark = pytest.mark.slow


def test_bench_rows_have_ratios_and_memory():
    rows = run_bench(sizes=("cpu",), rounds=2, steps=1, arms=("plain", "locked"), log=lambda *a: None)
    assert [(r.size, r.arm) for r in rows] == [("cpu", "plain"), ("cpu", "locked")]
    plain, locked = rows
    assert plain.ratio == plain.cpu_ratio == 1.0 and locked.ratio > 0 and locked.cpu_ratio > 0
    assert locked.tokens_per_s > 0
    # The model, its gradients and (T, B, V) logits at least: far above nothing.
    assert plain.peak_memory_mb > 20 and locked.peak_memory_mb > 20


@pytest.mark.fast
def test_plain_stack_has_the_awd_sizes():
    model = PlainLSTM(100, SIZES["cpu"])
    assert [(m.input_size, m.hidden_size) for m in model.layers] == [(200, 400), (400, 400), (400, 200)]
    assert model.decoder.weight is model.encoder.weight


def test_ratios_are_the_arms_speed_over_the_plain_stacks(monkeypatch):
    """Two copies of the plain stack, one made to do every step twice: measured side by side, its ratio is
    about 1/2 in wall-clock and in CPU time (a ratio computed the wrong way round would be about 2)."""
    from harness import bench

    real_init, real_step = bench._Trainer.__init__, bench._Trainer.step

    def init(self, arm, size, device, batch_size=bench.BATCH):
        real_init(self, "plain", size, device, batch_size)  # "locked" builds the plain stack too
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
