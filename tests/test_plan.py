"""Cost before running (harness.study.plan): the schedule simulation, the runs per phase, the pruning assumption, a real
calibration on the test corpus, the estimate built from it, and the `plan` command. No absolute times: only
known makespans of hand-made durations, ratios, and the structure of what is measured."""

import json
import types

import pytest

from helpers import study_for_tests
from harness.cli import main
from harness.errors import UserError
from harness.study.ledger.storage import open_storage
from harness.study.ledger.writer import Ledger
from harness.study.live import LiveView
from harness.study.plan import (
    Calibration, EpochTimes, calibrate, estimate, format_duration, left_of, pruning_assumption, read_epoch_times,
    simulate_schedule,
)
from harness.study.rules import CONFIRM, SEARCH, count_runs
from harness.study.scheduler import Slot
from harness.study.spec import load_study

pytestmark = pytest.mark.fast

STUDY = """
[study]
name = "plan-test"
corpus = "ptb"
[fixed.model]
emb_size = 16
hidden_size = 16
n_layers = 1
[fixed.dropout]
input = 0.3
weight = 0.3
[fixed.train]
epochs = {epochs}
batch_size = 10
eval_batch_size = 10
test_batch_size = 10
bptt = 20
train_tokens = 3000
valid_tokens = 1000
threads = 1
[variants.no_dropout]
[variants.locked_only]
[variants.weight_only]
[search]
input = [0.1, 0.5]
weight = [0.1, 0.5]
[budget]
trials = 3
pruner = "{pruner}"
warmup_epochs = {warmup}
confirm_seeds = {seeds}
"""
# A corpus as estimate() sees it: only the sizes of its splits matter.
SIZES = types.SimpleNamespace(train=range(50_000), valid=range(8_000), test=range(9_000))


def write_study(folder, name="plan.toml", epochs=4, pruner="median", warmup=1, seeds="[1, 2]"):
    path = folder / name
    path.write_text(STUDY.format(epochs=epochs, pruner=pruner, warmup=warmup, seeds=seeds))
    return load_study(path)


def hand_calibration(variants, train_seconds_per_token=1e-3) -> Calibration:
    return Calibration(
        slots="2 slots: made by hand", device="cpu",
        train_seconds_per_token={v: train_seconds_per_token * (i + 1) for i, v in enumerate(variants)},
        measured=tuple(variants), valid_seconds_per_token=2e-4, test_seconds_per_token=3e-4,
        epoch_extra_seconds=0.5, startup_seconds=2.0, corpus_seconds=0.5, setup_seconds=1.5, seconds=10.0)


# --- the schedule ---------------------------------------------------------------------------------------
def test_three_equal_runs_on_two_slots_take_two_run_lengths():
    schedule = simulate_schedule({"a": [10.0, 10.0, 10.0]}, {}, n_slots=2)
    assert schedule.wall_seconds == 20.0 and schedule.busy_seconds == 30.0
    assert sorted(run.slot for run in schedule.runs) == [0, 0, 1]


def test_confirmation_waits_for_its_own_variant_search_only():
    schedule = simulate_schedule({"a": [10.0, 10.0, 10.0], "b": [5.0]}, {"a": [1.0], "b": [5.0]}, n_slots=2)
    by = {(run.variant, run.phase): run for run in schedule.runs}
    last_search_of_a = max(run.end for run in schedule.runs if (run.variant, run.phase) == ("a", SEARCH))
    assert by[("a", CONFIRM)].start == last_search_of_a == 20.0
    # b's search settles at 15 while a's still runs: b's confirmation fills the free slot then.
    assert by[("b", CONFIRM)].start == 15.0
    assert schedule.wall_seconds == 21.0


def test_search_trials_go_first_most_waiting_variant_first():
    schedule = simulate_schedule({"a": [5.0], "b": [5.0, 5.0]}, {"a": [5.0]}, n_slots=1)
    order = [(run.variant, run.phase) for run in sorted(schedule.runs, key=lambda run: run.start)]
    assert order == [("b", SEARCH), ("a", SEARCH), ("b", SEARCH), ("a", CONFIRM)]
    assert schedule.wall_seconds == 20.0


def test_a_slot_idles_while_only_a_confirmation_that_must_wait_is_left():
    schedule = simulate_schedule({"a": [30.0, 10.0]}, {"a": [10.0, 10.0]}, n_slots=2)
    confirms = sorted(run.start for run in schedule.runs if run.phase == CONFIRM)
    assert confirms == [30.0, 30.0] and schedule.wall_seconds == 40.0


# --- runs per phase, pruning ----------------------------------------------------------------------------
def test_runs_per_phase(tmp_path):
    study = write_study(tmp_path)
    runs = count_runs(study)
    assert runs[("no_dropout", SEARCH)] == 1  # nothing to search: one trial, not three identical ones
    assert runs[("locked_only", SEARCH)] == runs[("weight_only", SEARCH)] == 3
    assert all(runs[(v, CONFIRM)] == 2 for v in study.variants)
    unconfirmed = write_study(tmp_path, "none.toml", seeds="[]")
    assert all(count_runs(unconfirmed)[(v, CONFIRM)] == 0 for v in unconfirmed.variants)
    plan = estimate(unconfirmed, hand_calibration(list(unconfirmed.variants)), SIZES, n_slots=2)
    assert {row.phase for row in plan.rows} == {SEARCH}
    assert sum(row.runs for row in plan.rows) == 1 + 3 + 3


def test_median_pruning_assumption_follows_startup_and_warmup(tmp_path):
    assumption = pruning_assumption(write_study(tmp_path, epochs=14, warmup=5))
    assert "first 2 search trials" in assumption.text and "epoch 6" in assumption.text
    assert assumption.search_epochs(3, 14) == [14, 14, (6 + 14) / 2]


def test_hyperband_assumption_keeps_a_third_per_rung(tmp_path):
    # 9 epochs, rungs from epoch 1: brackets sized 9:5:3 with rungs (1, 3), (3,) and none.
    assumption = pruning_assumption(write_study(tmp_path, epochs=9, pruner="hyperband", warmup=0))
    bracket_epochs = [1 + (3 - 1) / 3 + (9 - 3) / 9, 3 + (9 - 3) / 3, 9]
    assert assumption.expected_epochs == pytest.approx((9 * bracket_epochs[0] + 5 * bracket_epochs[1]
                                                        + 3 * bracket_epochs[2]) / 17)
    assert "Hyperband" in assumption.text and "9:5:3" in assumption.text


def test_no_pruner_or_a_warmup_over_every_epoch_saves_nothing(tmp_path):
    for study in (write_study(tmp_path, "a.toml", pruner="none"), write_study(tmp_path, "b.toml", epochs=4, warmup=4)):
        assumption = pruning_assumption(study)
        assert assumption.search_epochs(3, 4) == [4, 4, 4]
        plan = estimate(study, hand_calibration(list(study.variants)), SIZES, n_slots=2)
        assert plan.pruned_wall_seconds == plan.wall_seconds and plan.pruned_device_seconds == plan.device_seconds
        assert "pruning: none expected" in plan.format()


def test_pruning_shortens_only_the_assumed_trials(tmp_path):
    study = write_study(tmp_path, epochs=10, warmup=1)
    plan = estimate(study, hand_calibration(list(study.variants)), SIZES, n_slots=2)
    saved = plan.device_seconds - plan.pruned_device_seconds
    # The third trial of locked_only and of weight_only: half of them stop at epoch 2 instead of 10.
    expected = sum(0.5 * (10 - 2) * plan.row(v, SEARCH).epoch_seconds for v in ("locked_only", "weight_only"))
    assert saved == pytest.approx(expected)
    assert plan.pruned_wall_seconds < plan.wall_seconds
    assert "pruning: the figures above assume none (an upper bound); median pruner" in plan.format()


def test_the_table_keeps_its_columns_for_arm_names_longer_than_a_variants(tmp_path):
    path = tmp_path / "axes.toml"
    path.write_text(STUDY.format(epochs=4, pruner="none", warmup=0, seeds="[1]")
                    + '[axes]\n"model.cell" = ["lstm", "rnn_tanh"]\n')
    study = load_study(path)
    lines = estimate(study, hand_calibration(list(study.variants)), SIZES, n_slots=2).format().splitlines()
    header, *rows = [line for line in lines[1:] if line.startswith("  ")]
    assert any(len(arm) > 18 for arm in study.variants)  # weight_only@cell=rnn_tanh
    phase = header.index("phase")
    assert all(row[phase:].startswith(("search", "confirmation", " ")) for row in rows)
    assert all(row[phase - 1] == " " for row in rows)  # the arm's name ends before the phase column
    hours = header.index("device-h") + len("device-h")
    assert all(row[hours - 1].isdigit() and len(row) == hours for row in rows)  # totals line included


# --- the estimate ---------------------------------------------------------------------------------------
def test_estimate_prices_runs_from_the_rates_and_the_corpus_sizes(tmp_path):
    study = write_study(tmp_path, epochs=4)
    calibration = hand_calibration(list(study.variants))
    plan = estimate(study, calibration, SIZES, n_slots=2)
    row = plan.row("weight_only", SEARCH)
    train, valid = (3000 // 10 - 1) * 10, (1000 // 10 - 1) * 10  # the study's slices, batchified
    assert row.epoch_seconds == pytest.approx(3e-3 * train + 2e-4 * valid + 0.5)
    assert row.run_seconds == pytest.approx(4.0 + 4 * row.epoch_seconds)
    test_pass = 3e-4 * (9_000 // 10 - 1) * 10
    assert plan.row("weight_only", CONFIRM).run_seconds == pytest.approx(row.run_seconds + test_pass)
    assert plan.device_seconds == pytest.approx(sum(r.runs * r.run_seconds for r in plan.rows))
    assert plan.device_seconds / 2 <= plan.wall_seconds <= plan.device_seconds


def test_seconds_per_epoch_from_elsewhere_keep_the_measured_ratios(tmp_path):
    study = write_study(tmp_path)
    calibration = hand_calibration(list(study.variants))
    local = estimate(study, calibration, SIZES, n_slots=2)
    given = estimate(study, calibration, SIZES, n_slots=32, epoch_times=read_epoch_times(["locked_only=12.5"]))
    factor = 12.5 / local.row("locked_only", SEARCH).epoch_seconds
    assert given.row("locked_only", SEARCH).epoch_seconds == 12.5
    assert given.row("weight_only", SEARCH).epoch_seconds == pytest.approx(
        local.row("weight_only", SEARCH).epoch_seconds * factor)
    assert given.test_seconds == pytest.approx(local.test_seconds * factor)
    assert given.overhead_seconds == local.overhead_seconds  # the host's work: as measured here
    assert given.n_slots == 32 and "locked_only 12.5 s (given)" in given.source
    with pytest.raises(UserError, match="no variant awd"):
        estimate(study, calibration, SIZES, n_slots=2, epoch_times=read_epoch_times(["awd=60"]))


def test_epoch_times_files(tmp_path):
    plain = tmp_path / "times.json"
    plain.write_text(json.dumps({"seconds_per_epoch": {"awd": 30.0, "naive": 33.5}, "device": "NVIDIA H200"}))
    times = read_epoch_times([str(plain), "*=40"])
    assert times.seconds == {"awd": 30.0, "naive": 33.5, "*": 40.0} and "NVIDIA H200" in times.source
    check = tmp_path / "gpu-check.json"
    rows = [{"part": "2 bench", "numbers": {"ratio": 0.95}}, {"part": "3 epoch", "numbers": {"epoch_seconds": 21.0}}]
    check.write_text(json.dumps({"environment": {"device": "NVIDIA H200"}, "rehearsal": False, "rows": rows}))
    times = read_epoch_times([str(check)])
    assert times.seconds == {"awd": 21.0} and times.study == "paper-ptb"
    check.write_text(json.dumps({"environment": {}, "rehearsal": True, "rows": rows}))
    for bad in ([str(check)], ["awd=fast"], ["awd=-3"], [str(tmp_path / "missing.json")]):
        with pytest.raises(UserError):
            read_epoch_times(bad)
    study = write_study(tmp_path)
    with pytest.raises(UserError, match="measured on study 'paper-ptb'"):
        estimate(study, hand_calibration(list(study.variants)), SIZES, n_slots=1,
                 epoch_times=EpochTimes({"locked_only": 3.0}, "a GPU", "paper-ptb"))


def test_projection_starts_at_the_estimate_and_follows_the_pace(tmp_path):
    study = write_study(tmp_path)
    plan = estimate(study, hand_calibration(list(study.variants)), SIZES, n_slots=2)
    everything = {(r.variant, r.phase): [0] * r.runs for r in plan.rows}
    assert plan.projected_seconds([], everything, []) == pytest.approx(plan.wall_seconds)
    slow = plan.projected_seconds([(20.0, 10.0)], everything, [])
    assert slow == pytest.approx(2 * plan.wall_seconds)
    halfway = plan.projected_seconds([], {}, [("locked_only", SEARCH, 2)])
    assert 0 < halfway < plan.projected_seconds([], {}, [("locked_only", SEARCH, 0)])
    assert "this session took" in plan.progress(100.0, [(20.0, 10.0)], {}, [])
    assert "this session took" not in plan.progress(100.0, [], {}, [("locked_only", CONFIRM, 4)])  # its test pass
    assert "2.00x their estimate" in plan.progress(100.0, [(20.0, 10.0)], everything, [])



def test_right_after_a_resume_what_is_left_counts_the_epochs_a_retry_continues_as_done(tmp_path, monkeypatch,
                                                                                       capsys):
    study = write_study(tmp_path, epochs=6, pruner="none")
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    monkeypatch.setattr("harness.study.plan.calibrate", lambda *args, **kwargs: hand_calibration(list(study.variants)))
    monkeypatch.setattr("harness.data.load_corpus", lambda *args, **kwargs: SIZES)
    plan_command = ["plan", str(study.path), "--devices", "cpu", "--trials-per-device", "2", "--storage", storage]
    assert main(plan_command) == 0
    assert "holds no trial of plan-test yet: all of it is left" in capsys.readouterr().out
    assert not (tmp_path / "optuna.db").exists()  # plan writes nothing
    identity = study.identity({"train": "a", "valid": "b", "test": "c"}, {"train": "/corpus/train.txt"})
    ledger = Ledger(study, open_storage(storage), identity, log=lambda *a: None)
    plan = estimate(study, hand_calibration(list(study.variants)), SIZES, n_slots=2)
    view = LiveView(study, ledger, 2, log=lambda *a: None)
    view.estimate = plan
    fresh_runs, fresh = view.runs_left(), plan.projected_seconds([], to_start(ledger), [])
    assert not ledger.started() and fresh_runs == sum(r.runs for r in plan.rows)
    assert fresh == pytest.approx(plan.wall_seconds)  # nothing done: the whole estimate

    claim = ledger.claim("locked_only", SEARCH)
    for epoch in range(1, 5):
        ledger.report_epoch(claim, epoch, 100.0 - epoch)
    ledger.fail(claim, "interrupted (SIGTERM)", interrupted=True)  # its retry waits, to continue after epoch 4
    assert ledger.started() and sorted(ledger.to_start("locked_only", SEARCH)) == [0, 0, 4]
    assert view.runs_left() == pytest.approx(fresh_runs - 4 / 6)  # not a whole run again
    packing = plan.wall_seconds * plan.n_slots / plan.device_seconds
    resumed = plan.projected_seconds([], to_start(ledger), [])
    kept = 4 * plan.row("locked_only", SEARCH).epoch_seconds * packing / plan.n_slots
    assert resumed == pytest.approx(fresh - kept)
    assert f"about {format_duration(resumed)} to go" in view.summary()  # the live view, and ablate's first lines

    # `plan --storage` says the same of a study under way, read from its storage.
    assert main(plan_command) == 0
    out = capsys.readouterr().out
    assert "retries keeping 4 epochs of their earlier attempts" in out
    assert f"about {format_duration(resumed)} on 2 slots without pruning" in out
    running = ledger.claim("locked_only", SEARCH)
    ledger.report_epoch(running, 1, 99.0)
    assert left_of(study, storage)[1] == [("locked_only", SEARCH, 1)]


def to_start(ledger) -> dict:
    return {(v, p): ledger.to_start(v, p) for v in ledger.variants for p in (SEARCH, CONFIRM)}


# --- a real calibration ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory, test_corpus):
    folder = tmp_path_factory.mktemp("plan")
    write_study(folder, epochs=2)
    return load_study(study_for_tests(folder / "plan.toml", test_corpus, folder))


@pytest.fixture(scope="module")
def calibrated(tiny) -> Calibration:
    """The tiny study timed on two one-thread CPU slots at once."""
    return calibrate(tiny, [Slot(0, "cpu", 1), Slot(1, "cpu", 1)], budget_seconds=600)  # a busy machine may be slow


@pytest.mark.slow
def test_calibration_times_every_variant_and_the_per_run_costs(calibrated, tiny):
    assert set(calibrated.measured) == set(tiny.variants) == set(calibrated.train_seconds_per_token)
    assert all(rate > 0 for rate in calibrated.train_seconds_per_token.values())
    assert calibrated.valid_seconds_per_token > 0 and calibrated.test_seconds_per_token > 0
    assert calibrated.startup_seconds > 0 and calibrated.corpus_seconds > 0
    assert calibrated.overhead_seconds > calibrated.startup_seconds
    assert "2 slots" in calibrated.slots and calibrated.device == "cpu"


@pytest.mark.slow
def test_calibration_out_of_time_sets_the_others_to_the_measured_mean(tiny):
    partial = calibrate(tiny, [Slot(0, "cpu", 1)], budget_seconds=0)
    assert len(partial.measured) == 1
    rate = partial.train_seconds_per_token[partial.measured[0]]
    assert all(r == rate for r in partial.train_seconds_per_token.values())


@pytest.mark.slow
def test_estimate_from_a_calibration_is_positive_and_scales_with_epochs(calibrated, tiny, tmp_path, test_corpus):
    from harness.data import load_corpus

    corpus = load_corpus(tiny.corpus, log=lambda *a: None)
    short = estimate(tiny, calibrated, corpus, n_slots=2)
    longer_file = tmp_path / "plan.toml"
    longer_file.write_text(tiny.text.replace("epochs = 2", "epochs = 6"))
    longer = estimate(load_study(longer_file), calibrated, corpus, n_slots=2)
    for row in short.rows:
        assert row.epoch_seconds > 0 and row.run_seconds > short.overhead_seconds
        other = longer.row(row.variant, row.phase)
        assert other.run_seconds - short.overhead_seconds == pytest.approx(
            3 * (row.run_seconds - short.overhead_seconds) - 2 * (short.test_seconds if row.phase == CONFIRM else 0))
    assert longer.wall_seconds > short.wall_seconds > 0


@pytest.mark.slow
def test_slots_that_mix_cpu_and_gpu_are_refused(tiny):
    with pytest.raises(UserError, match="mix cpu and cuda"):
        calibrate(tiny, [Slot(0, "cpu", 1), Slot(1, "cuda:0", 1)])


# --- the command ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_plan_command_prints_the_table(monkeypatch, capsys, calibrated, tiny):
    monkeypatch.setattr("harness.study.plan.calibrate", lambda *args, **kwargs: calibrated)  # measured once, above
    assert main(["plan", str(tiny.path), "--devices", "cpu", "--trials-per-device", "2"]) == 0
    out = capsys.readouterr().out
    for variant in tiny.variants:
        assert f"{variant:<18} search" in out and f"{variant:<18} confirmation" in out
    assert "wall time:" in out and "on 2 slots" in out and "pruning: none expected (the 1-epoch warm-up" in out
    assert "these are CPU figures" in out
    assert main(["plan", str(tiny.path), "--devices", "cpu", "--seconds-per-epoch", "weight_only=12.5",
                 "--slots", "32"]) == 0
    out = capsys.readouterr().out
    weight_only = [line.split() for line in out.splitlines() if line.strip().startswith("weight_only")]
    assert [cells[4] for cells in weight_only] == ["12.5", "12.5"] and "32 slots (given)" in out
    assert main(["plan", str(tiny.path), "--devices", "cpu", "--seconds-per-epoch", "awd=10"]) == 2
    assert "no variant awd" in capsys.readouterr().err


@pytest.mark.slow
def test_ablate_prints_the_estimate_and_compares_it_at_the_end(smoke_run):
    assert "wall time:" in smoke_run.output and "pruning: the figures above assume none" in smoke_run.output
    assert "this session took" in smoke_run.output.split("results:")[0]
