"""The throughput benchmark measures every arm against the plain stack, with memory."""

from harness.bench import PlainLSTM, SIZES, run_bench


def test_bench_rows_have_ratios_and_memory():
    rows = run_bench(sizes=("cpu",), rounds=2, steps=1, arms=("plain", "locked"), log=lambda *a: None)
    assert [(r.size, r.arm) for r in rows] == [("cpu", "plain"), ("cpu", "locked")]
    plain, locked = rows
    assert plain.ratio == plain.cpu_ratio == 1.0 and locked.ratio > 0 and locked.cpu_ratio > 0
    assert locked.tokens_per_s > 0
    # The model, its gradients and (T, B, V) logits at least: far above nothing.
    assert plain.peak_memory_mb > 20 and locked.peak_memory_mb > 20


def test_plain_stack_has_the_awd_sizes():
    model = PlainLSTM(100, SIZES["cpu"])
    assert [(m.input_size, m.hidden_size) for m in model.layers] == [(200, 400), (400, 400), (400, 200)]
    assert model.decoder.weight is model.encoder.weight
