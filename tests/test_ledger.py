"""The study's bookkeeping rules (harness.study.ledger), fast, on Optuna's in-memory storage: no processes, no training.

Each test pins one rule whose violation would change a reported number: the budget, retries and attempts,
pruning and its warm-up, the confirmation's parameters, resumed searches, identity checks, outages.
"""

import contextlib
import json
import socket
import threading
import warnings

import optuna
import pytest
import sqlalchemy
from optuna.distributions import FloatDistribution
from optuna.storages import InMemoryStorage, RDBStorage
from optuna.trial import TrialState
from helpers import free_port

from harness.errors import UserError
from harness.study.ledger.reader import LedgerReader
from harness.study.ledger.storage import (
    RECONNECT_SECONDS, Heartbeat, check_storage, dashboard_command, is_shared, open_storage,
)
from harness.study.ledger.studies import holds_study, study_names, trial_kind
from harness.study.ledger.writer import Ledger, distributions, make_pruner
from harness.study.rules import CONFIRM, SEARCH, Tally, default_params, optuna_name
from harness.study.spec import load_study
from harness.study.stores import STALE_AFTER

pytestmark = pytest.mark.fast

STUDY = """
[study]
name = "ledger"
[fixed.dropout]
input = 0.4
hidden = 0.25
output = 0.4
weight = 0.5
[fixed.train]
epochs = 6
[variants.no_dropout]
[variants.awd]
[search]
input = [0.1, 0.6]
hidden = [0.1, 0.5]
weight = [0.2, 0.7]
seed = 3
sampler = "{sampler}"
[budget]
trials = {trials}
pruner = "{pruner}"
warmup_epochs = {warmup}
pruner_startup_trials = 1
confirm_seeds = [1, 2, 3]
max_retries = 1
"""


def make_study(tmp_path, trials=4, pruner="none", warmup=2, sampler="tpe", edits=(), name="ledger.toml"):
    """The test study with these settings; `edits` are (old, new) text replacements made in its file."""
    text = STUDY.format(trials=trials, pruner=pruner, warmup=warmup, sampler=sampler)
    for old, new in edits:
        assert old in text, old
        text = text.replace(old, new)
    path = tmp_path / name
    path.write_text(text)
    return load_study(path)


def open_ledger(study, storage=None, md5=None):
    identity = study.identity(md5 or {"train": "a", "valid": "b", "test": "c"}, {"train": "/corpus/train.txt"})
    return Ledger(study, storage or InMemoryStorage(), identity, log=lambda *a: None)


def reader_of(ledger):
    """The report's read-only view of what the coordinator's ledger wrote."""
    return LedgerReader(ledger.study, ledger.storage, ledger.identity, log=lambda *a: None)


def objective(params: dict) -> float:
    """A made-up validation perplexity with its optimum inside the search box."""
    return 100 + sum((v - 0.3) ** 2 for v in params.values()) * 100


def run_search(ledger, variant="awd", fail=(), stop_after=None):
    """Claim and finish search trials like a coordinator would; `fail` holds trial numbers that fail once."""
    done = []
    while (claim := ledger.claim(variant, SEARCH)) is not None:
        if claim.number in fail:
            ledger.fail(claim, "boom")
            continue
        assert ledger.finish(claim, objective(claim.params), {})
        done.append(claim)
        if stop_after is not None and len(done) == stop_after:
            break
    return done


def test_budget_is_exact_and_the_paper_rates_go_first(tmp_path):
    study = make_study(tmp_path, trials=4)
    ledger = open_ledger(study)
    done = run_search(ledger)
    assert len(done) == 4 and ledger.tally("awd", SEARCH) == Tally(finished=4)
    assert done[0].params == {"dropout.input": 0.4, "dropout.hidden": 0.25, "dropout.weight": 0.5}
    assert len({tuple(c.params.values()) for c in done}) == 4
    # A variant with nothing to search runs once, not `trials` identical times.
    assert len(run_search(ledger, "no_dropout")) == 1
    assert ledger.search_settled("awd") and ledger.search_settled("no_dropout")


def test_retries_keep_the_parameters_and_the_budget_stays_exact(tmp_path):
    study = make_study(tmp_path, trials=3)
    ledger = open_ledger(study)
    first = ledger.claim("awd", SEARCH)
    assert ledger.fail(first, "worker died") is True  # attempt 1 of max_retries + 1 = 2
    others = run_search(ledger, stop_after=2)  # the queue is first in, first out: the retry waits its turn
    retry = ledger.claim("awd", SEARCH)
    assert retry.params == first.params and retry.attempt == 2 and retry.retry_of == first.number
    assert ledger.fail(retry, "died again") is False  # attempts used up: failed for good, counts as settled
    assert ledger.claim("awd", SEARCH) is None and len(others) == 2
    tally = ledger.tally("awd", SEARCH)
    assert tally == Tally(finished=2, failed=1, retried=1) and tally.settled == 3 and tally.attempts == 4
    assert ledger.search_settled("awd")


def test_an_interruption_uses_no_attempt(tmp_path):
    study = make_study(tmp_path, trials=1)
    ledger = open_ledger(study)
    claim = ledger.claim("awd", SEARCH)
    for _ in range(3):  # more interruptions than max_retries allows failures
        assert ledger.fail(claim, "interrupted (Ctrl-C)", interrupted=True) is True
        again = ledger.claim("awd", SEARCH)
        assert again.params == claim.params and again.attempt == 1
        claim = again
    assert ledger.tally("awd", SEARCH) == Tally(interrupted=3, running=1)
    assert ledger.tally("awd", SEARCH).settled == 0 and not ledger.search_settled("awd")
    # A trial on its last attempt is still retried after an interruption.
    assert ledger.fail(claim, "out of memory") is True
    last = ledger.claim("awd", SEARCH)
    assert last.attempt == 2 and ledger.fail(last, "SIGTERM", interrupted=True) is True
    assert ledger.claim("awd", SEARCH).attempt == 2


def test_a_pruned_trial_is_never_counted_finished_or_best(tmp_path):
    study = make_study(tmp_path, trials=2)
    ledger = open_ledger(study)
    pruned, finished = ledger.claim("awd", SEARCH), ledger.claim("awd", SEARCH)
    ledger.report_epoch(pruned, 1, 50.0)  # better than anything that finishes: must not become "best"
    assert ledger.prune(pruned)
    assert ledger.finish(finished, 120.0, {})
    assert ledger.tally("awd", SEARCH) == Tally(finished=1, pruned=1)
    params, value, number = ledger.best("awd")
    assert (value, number) == (120.0, finished.number)
    assert [t.state for t in reader_of(ledger).search_trials("awd")] == ["pruned", "finished"]
    pruned_trial = reader_of(ledger).search_trials("awd")[0]
    assert pruned_trial.best_seen == 50.0 and pruned_trial.value is None


def test_confirmation_retrains_the_best_search_parameters_and_optuna_shows_them(tmp_path):
    study = make_study(tmp_path, trials=4)
    ledger = open_ledger(study)
    assert ledger.enqueue_confirmation("awd") is None  # not before the search has settled
    done = run_search(ledger)
    best = min(done, key=lambda c: objective(c.params))
    assert ledger.enqueue_confirmation("awd")[2] == best.number
    assert ledger.enqueue_confirmation("awd") is None  # once
    claims = [ledger.claim("awd", CONFIRM) for _ in study.budget.confirm_seeds]
    assert ledger.claim("awd", CONFIRM) is None
    assert sorted(c.seed for c in claims) == [1, 2, 3]
    assert all(c.params == best.params for c in claims)
    confirm = ledger.studies[("awd", CONFIRM)].trials
    assert all(t.params == best.params for t in confirm)  # what optuna-dashboard and `optuna trials` list


def test_nothing_to_confirm_when_no_search_trial_finished(tmp_path):
    study = make_study(tmp_path, trials=1)
    ledger = open_ledger(study)
    claim = ledger.claim("awd", SEARCH)
    ledger.report_epoch(claim, 1, 300.0)
    ledger.prune(claim)
    assert ledger.search_settled("awd") and ledger.enqueue_confirmation("awd") is None
    assert ledger.confirmation_due("awd") == 0 and ledger.variant_settled("awd")


@pytest.mark.parametrize("sampler", ["tpe", "qmc"])
@pytest.mark.parametrize("stop_after", [2, 4])
def test_a_resumed_search_draws_what_an_uninterrupted_one_would(tmp_path, sampler, stop_after):
    # 9 trials: TPE draws its first 3 at random, so a stop after 2 resumes inside the random start-up.
    study = make_study(tmp_path, trials=9, sampler=sampler)
    whole = [tuple(c.params.values()) for c in run_search(open_ledger(study))]
    storage = InMemoryStorage()
    first = [tuple(c.params.values()) for c in run_search(open_ledger(study, storage), stop_after=stop_after)]
    resumed = [tuple(c.params.values()) for c in run_search(open_ledger(study, storage))]  # a new process
    assert len(set(first + resumed)) == 9, "the resumed search repeated a point"
    assert first + resumed == whole


@pytest.mark.parametrize("pruner", ["median", "hyperband"])
@pytest.mark.parametrize("warmup", [1, 2])
def test_no_trial_is_pruned_inside_the_warm_up(tmp_path, pruner, warmup):
    study = make_study(tmp_path, trials=8, pruner=pruner, warmup=warmup)
    ledger = open_ledger(study)
    pruned_at = []
    for i in range(8):
        claim = ledger.claim("awd", SEARCH)
        for epoch in range(1, study.fixed.train.epochs + 1):
            # Each trial is worse than every earlier one at every epoch: prune as early as the rules allow.
            if not ledger.report_epoch(claim, epoch, 100.0 * (i + 1) + epoch):
                pruned_at.append(epoch)
                ledger.prune(claim)
                break
        else:
            ledger.finish(claim, 100.0 * (i + 1), {})
    assert pruned_at, "the pruner never pruned: this test checks nothing"
    assert min(pruned_at) == warmup + 1


def test_pruner_choice_none_never_prunes(tmp_path):
    study = make_study(tmp_path, pruner="none")
    assert isinstance(make_pruner(study), optuna.pruners.NopPruner)


@pytest.mark.parametrize("warmup, kind", [(4, optuna.pruners.HyperbandPruner), (5, optuna.pruners.NopPruner)])
def test_hyperband_needs_a_prunable_epoch_before_the_last(tmp_path, warmup, kind):
    study = make_study(tmp_path, pruner="hyperband", warmup=warmup)  # every run trains 6 epochs
    assert study.max_epochs == 6 and isinstance(make_pruner(study), kind)


def test_confirmation_trials_are_never_pruned(tmp_path):
    study = make_study(tmp_path, trials=2, pruner="median", warmup=0)
    ledger = open_ledger(study)
    run_search(ledger)
    ledger.enqueue_confirmation("awd")
    claim = ledger.claim("awd", CONFIRM)
    assert all(ledger.report_epoch(claim, epoch, 1e6) for epoch in range(1, 7))


def test_the_objective_is_named_val_ppl(tmp_path):
    ledger = open_ledger(make_study(tmp_path))
    assert {s.metric_names[0] for s in ledger.studies.values()} == {"val_ppl"}


def test_orphaned_trials_are_swept_as_interrupted_and_retried(tmp_path):
    study = make_study(tmp_path, trials=2)
    storage = InMemoryStorage()
    ledger = open_ledger(study, storage)
    mine, orphan = ledger.claim("awd", SEARCH), ledger.claim("awd", SEARCH)
    swept = ledger.sweep(running_here={mine.trial_id})
    assert [(s.variant, s.phase, s.number, s.retried) for s in swept] == [("awd", SEARCH, orphan.number, True)]
    assert ledger.tally("awd", SEARCH) == Tally(interrupted=1, running=1, waiting=1)
    retry = ledger.claim("awd", SEARCH)
    assert retry.params == orphan.params and retry.attempt == orphan.attempt


def test_a_lost_trial_is_not_told_twice(tmp_path):
    ledger = open_ledger(make_study(tmp_path, trials=2))
    claim = ledger.claim("awd", SEARCH)
    ledger.sweep(running_here=set())  # as if another machine had failed it as stale
    assert ledger.finish(claim, 100.0, {}) is False
    assert ledger.fail(claim, "late failure") is None


@pytest.mark.parametrize("changed, expected", [
    ("study", "different version of the study file"),
    ("corpus", "/corpus/train.txt (MD5 a -> z)"),
])
def test_a_changed_study_file_or_corpus_is_refused(tmp_path, changed, expected):
    study = make_study(tmp_path)
    storage = InMemoryStorage()
    open_ledger(study, storage)
    if changed == "study":
        other = make_study(tmp_path, trials=5)
        with pytest.raises(UserError, match=expected):
            open_ledger(other, storage)
    else:
        with pytest.raises(UserError) as err:
            open_ledger(study, storage, md5={"train": "z", "valid": "b", "test": "c"})
        assert expected in str(err.value) and "new study.name" in str(err.value)


def storage_away(monkeypatch, storage, times: int) -> list:
    """The storage's trial reads fail `times` times as a dropped database server's do, then answer; returns the
    list that grows by one per read (failed or not)."""
    calls, real = [], storage.get_all_trials

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) <= times:
            raise sqlalchemy.exc.OperationalError("SELECT", {}, Exception("server closed the connection"))
        return real(*args, **kwargs)

    monkeypatch.setattr(storage, "get_all_trials", flaky)
    return calls


def test_the_ledger_waits_out_a_storage_outage(tmp_path, monkeypatch):
    ledger = open_ledger(make_study(tmp_path))
    lines, slept = [], []
    ledger.log = lines.append
    calls = storage_away(monkeypatch, ledger.storage, times=6)
    monkeypatch.setattr("harness.study.ledger.storage.time.sleep", slept.append)
    assert ledger.tally("awd", SEARCH).waiting == 4
    assert len(calls) == 7 and "does not answer" in lines[0] and "answers again" in lines[-1]
    assert slept == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]  # backing off, doubling up to 10 s between tries


def test_the_report_reader_waits_out_an_outage_saying_so(tmp_path, monkeypatch):
    ledger = open_ledger(make_study(tmp_path))
    lines = []
    reader = LedgerReader(ledger.study, ledger.storage, ledger.identity, log=lines.append)
    storage_away(monkeypatch, ledger.storage, times=1)
    monkeypatch.setattr("harness.study.ledger.storage.time.sleep", lambda s: None)
    assert "too few" in reader.importances("awd", 2)
    assert "does not answer" in lines[0] and "answers again" in lines[-1]


def test_study_names_are_the_ones_its_storage_holds(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    optuna.create_study(study_name="someone else's", storage=storage)
    assert study_names(storage) == {"someone else's"}


def test_only_a_postgresql_storage_is_shared_between_machines(tmp_path):
    local = open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    # A PostgreSQL storage without a server: the engine is made without connecting (what is_shared reads).
    remote = object.__new__(RDBStorage)
    remote.engine = sqlalchemy.create_engine("postgresql://user@db-host/optuna")
    assert is_shared(remote) and not is_shared(local)


def test_tally_is_the_one_rule_for_what_each_state_counts_as():
    def trial(state, **attrs):
        return optuna.trial.create_trial(state=state, value=1.0 if state == TrialState.COMPLETE else None,
                                         user_attrs=attrs) if state.is_finished() else _Fake(state, attrs)

    trials = [trial(TrialState.COMPLETE), trial(TrialState.PRUNED), trial(TrialState.FAIL, retried=False),
              trial(TrialState.FAIL, retried=True), trial(TrialState.FAIL, retried=True, interrupted=True),
              trial(TrialState.RUNNING), trial(TrialState.WAITING)]
    tally = Tally.of(map(trial_kind, trials))
    assert tally == Tally(1, 1, 1, 1, 1, 1, 1) and tally.settled == 3 and tally.attempts == 4


class _Fake:
    def __init__(self, state, user_attrs):
        self.state, self.user_attrs = state, user_attrs


def test_names_are_per_variant_and_phase(tmp_path):
    study = make_study(tmp_path)
    ledger = open_ledger(study)
    assert set(ledger.studies) == {(v, p) for v in study.variants for p in (SEARCH, CONFIRM)}
    assert optuna_name(study, "awd", CONFIRM) == "ledger/awd/confirm"
    assert ledger.studies[("awd", SEARCH)].user_attrs["corpus_md5"] == "test=c,train=a,valid=b"


def test_parameter_importances_need_enough_finished_trials(tmp_path):
    study = make_study(tmp_path, trials=20)
    ledger = open_ledger(study)
    assert reader_of(ledger).importances("no_dropout", 5) == "nothing is searched in this variant."

    def finish(n):
        for _ in range(n):
            claim = ledger.claim("awd", SEARCH)
            # input matters a lot, hidden a little, weight not at all
            p = claim.params
            ledger.finish(claim, 100 + 10 * p["dropout.input"] + 0.1 * p["dropout.hidden"], {})

    finish(3)
    assert reader_of(ledger).importances("awd", 5).startswith("3 finished search trials: too few")
    finish(17)
    importances = reader_of(ledger).importances("awd", 5)
    assert max(importances, key=importances.get) == "dropout.input"
    assert sum(importances.values()) == pytest.approx(1.0)


# --- the storage --------------------------------------------------------------------------------------------
def test_open_storage_opens_a_sqlite_file_and_refuses_what_would_not_work(tmp_path, monkeypatch):
    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}")
    assert isinstance(storage, RDBStorage) and not is_shared(storage) and optuna.get_all_study_names(storage) == []
    check_storage(f"sqlite:///{tmp_path / 'study.db'}")  # the same file again: no error
    refused = {
        "sqlite:///:memory:": "--storage sqlite:///:memory:: an in-memory database vanishes",
        "mysql://u:pw@h/db": "--storage mysql://u:***@h/db: use sqlite:///FILE (one machine) or "
                             "postgresql://USER@HOST:PORT/DB (shared by several machines)",
        "postgresql://u:p@ss@127.0.0.1:1/db": "--storage postgresql://u:***@127.0.0.1:1/db: the password holds '@'",
    }
    for url, message in refused.items():
        with pytest.raises(UserError) as err:
            open_storage(url)
        assert str(err.value).startswith(message), str(err.value)
    with pytest.raises(UserError, match=r"^--heartbeat 0: must be at least 1 second$"):
        open_storage("postgresql://u:pw@127.0.0.1:1/db", heartbeat=0)

    # What SQLite itself refuses once the file has been checked (e.g. a lock held past its busy timeout).
    def locked(url, **kwargs):
        raise sqlalchemy.exc.OperationalError("SELECT", {}, Exception("database is locked"))

    monkeypatch.setattr("harness.study.ledger.storage.RDBStorage", locked)
    with pytest.raises(UserError) as err:
        open_storage(f"sqlite:///{tmp_path / 'study.db'}")
    assert str(err.value) == (f"--storage sqlite:///{tmp_path / 'study.db'}: {tmp_path / 'study.db'} cannot be opened "
                              "as an Optuna database (database is locked); pass the --storage the study ran with, or "
                              "a new file name")


def test_an_unreachable_postgresql_is_named_without_its_password():
    port = free_port()  # nothing listens there
    url = f"postgresql://harness:s3cret-pw@127.0.0.1:{port}/db"
    for heartbeat in (1, 60):  # 1 second is the least heartbeat allowed
        with pytest.raises(UserError) as err:
            open_storage(url, heartbeat=heartbeat)
        message = str(err.value)
        assert message.startswith(f"cannot reach the Optuna storage postgresql://harness:***@127.0.0.1:{port}/db (")
        assert "refused" in message.lower() and "s3cret-pw" not in message
        assert message.endswith("); start PostgreSQL there or fix --storage (host, port, database, user; the password "
                                "in the URL or in PGPASSWORD)")
    with pytest.raises(UserError, match="cannot reach"):
        check_storage(url)


@pytest.mark.servers
def test_open_storage_on_postgresql_beats_and_survives_a_server_restart(postgres):
    url = postgres.create_database("ledger_open_storage")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        storage = open_storage(url, heartbeat=7)
    assert not [w for w in caught if issubclass(w.category, optuna.exceptions.ExperimentalWarning)]
    assert is_shared(storage) and storage.get_heartbeat_interval() == 7 and storage.grace_period == STALE_AFTER * 7
    check_storage(url)
    optuna.create_study(storage=storage, study_name="before the restart")
    postgres.stop()
    postgres.start()
    # The pooled connection died with the server: the storage replaces it instead of failing the next query.
    assert optuna.get_all_study_names(storage) == ["before the restart"]
    storage.engine.dispose()


@pytest.mark.slow
def test_a_postgresql_that_does_not_answer_is_reported_within_seconds():
    # A port that accepts connections but never answers (a server hung, or a firewall that swallows packets):
    # without a connect timeout (5 s) the driver would wait forever. The watchdog (30 s, room for a loaded
    # machine) keeps this test from hanging.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"postgresql://harness:pw@127.0.0.1:{silent.getsockname()[1]}/db"
        outcome = []
        worker = threading.Thread(target=lambda: outcome.append(_raised(open_storage, url)), daemon=True)
        worker.start()
        worker.join(timeout=30)
        assert not worker.is_alive(), "open_storage still waits for a server that never answers"
    assert isinstance(outcome[0], UserError) and "timeout expired" in str(outcome[0])


def _raised(function, *args):
    try:
        function(*args)
    except Exception as err:  # handed to the test's thread, which asserts what it was
        return err
    return None


def test_dashboard_command_names_the_storage_without_its_password():
    assert dashboard_command("sqlite:///optuna.db") == "make dashboard  (or: optuna-dashboard sqlite:///optuna.db)"
    assert dashboard_command("sqlite:///my runs/o.db") == (
        "make dashboard STORAGE='sqlite:///my runs/o.db'  (or: optuna-dashboard 'sqlite:///my runs/o.db')")
    assert dashboard_command("postgresql://u:pw@h:5432/db") == (
        "make dashboard STORAGE='postgresql://u:***@h:5432/db'  (or: optuna-dashboard 'postgresql://u:***@h:5432/db')")


def heartbeat_storage(tmp_path, interval=1, grace=3):
    """A SQLite storage that records heartbeats (Optuna supports them on SQLite too), and the beats it got."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = RDBStorage(f"sqlite:///{tmp_path / 'beats.db'}", heartbeat_interval=interval, grace_period=grace)
    beats, beaten = [], threading.Event()
    real = storage.record_heartbeat

    def record(trial_id):
        real(trial_id)
        beats.append(trial_id)
        beaten.set()

    storage.record_heartbeat = record
    return storage, beats, beaten


def test_the_heartbeat_thread_beats_for_the_running_trials_until_it_stops(tmp_path):
    storage, beats, beaten = heartbeat_storage(tmp_path)
    trial = optuna.create_study(storage=storage).ask()
    heartbeat = Heartbeat(storage)
    assert (heartbeat.interval, heartbeat.grace) == (1, 3)
    heartbeat.add(trial._trial_id)
    with heartbeat:
        # Event-based: the first beat comes after one interval (1 s); 20 s leaves room for a loaded machine.
        assert beaten.wait(timeout=20), "no heartbeat within 20 s"
        assert heartbeat.thread.daemon  # a coordinator that dies without leaving the block is not kept alive
    assert not heartbeat.thread.is_alive() and set(beats) == {trial._trial_id}
    heartbeat.discard(trial._trial_id)
    beats.clear()
    heartbeat.beat_all()
    assert beats == []
    with pytest.raises(KeyError), Heartbeat(storage):  # the block's own error goes through
        raise KeyError("from the block")


@pytest.mark.slow
def test_a_heartbeat_the_storage_refuses_is_tried_again_at_the_next_interval(tmp_path):
    storage, beats, beaten = heartbeat_storage(tmp_path)
    trial = optuna.create_study(storage=storage).ask()
    record, calls = storage.record_heartbeat, []

    def flaky(trial_id):
        calls.append(trial_id)
        if len(calls) == 1:
            raise sqlalchemy.exc.OperationalError("UPDATE", {}, Exception("server closed the connection"))
        record(trial_id)

    storage.record_heartbeat = flaky
    heartbeat = Heartbeat(storage)
    heartbeat.add(trial._trial_id)
    with heartbeat:
        assert beaten.wait(timeout=20), "the heartbeat thread died with the storage's first error"
    assert calls[:2] == [trial._trial_id] * 2


def test_without_heartbeats_nothing_beats(tmp_path):
    heartbeat = Heartbeat(InMemoryStorage())
    assert (heartbeat.interval, heartbeat.grace) == (None, None)
    with heartbeat:
        heartbeat.add(0)
        heartbeat.beat(0)  # a no-op, not an error
        assert not heartbeat.thread.is_alive()


# --- the search's parts ---------------------------------------------------------------------------------------
def test_tally_counts_every_trial_of_a_state():
    trials = [optuna.trial.create_trial(state=TrialState.PRUNED) for _ in range(2)]
    trials += [_Fake(TrialState.RUNNING, {}) for _ in range(3)]
    assert Tally.of(map(trial_kind, trials)) == Tally(pruned=2, running=3)


@pytest.mark.parametrize("lr_range, paper_lr", [("[1.0, 40.0]", 30.0), ("[1.0, 10.0]", 10.0)])
def test_the_learning_rate_is_searched_on_a_log_scale_from_the_paper_value(tmp_path, lr_range, paper_lr):
    study = make_study(tmp_path, trials=3, edits=[("seed = 3\n", f"seed = 3\nlr = {lr_range}\n")])
    low, high = json.loads(lr_range)
    space = distributions(study, "awd")
    assert space["train.lr"] == FloatDistribution(low, high, log=True)
    assert space["dropout.input"] == FloatDistribution(0.1, 0.6)
    # The paper's lr (30) goes first, clipped into the range.
    assert study.fixed.train.lr == 30.0 and default_params(study, "awd")["train.lr"] == paper_lr
    ledger = open_ledger(study)
    first = ledger.claim("awd", SEARCH)
    assert first.params["train.lr"] == paper_lr
    assert distributions(study, "no_dropout") == {"train.lr": FloatDistribution(low, high, log=True)}


def draws(study, variant="awd", objective_=objective, storage=None):
    """The parameters every search trial of the variant draws, claimed and finished one by one."""
    ledger = open_ledger(study, storage)
    out = []
    while (claim := ledger.claim(variant, SEARCH)) is not None:
        ledger.finish(claim, objective_(claim.params), {})
        out.append(claim.params)
    return out


@pytest.mark.parametrize("sampler", ["tpe", "qmc"])
def test_the_draws_depend_on_the_study_seed_and_the_variant(tmp_path, sampler):
    twin = ("[variants.awd]\n", '[variants.awd]\n[variants.twin]\nsites = ["input", "hidden", "weight"]\n'
                                 'hidden_mode = "locked"\n')
    study = make_study(tmp_path, trials=5, sampler=sampler, edits=[twin])
    reseeded = make_study(tmp_path, trials=5, sampler=sampler, edits=[twin, ("seed = 3", "seed = 4")], name="4.toml")
    awd, twin, other_seed = draws(study), draws(study, "twin"), draws(reseeded)
    assert awd[0] == twin[0] == other_seed[0]  # the paper rates
    # Two variants with the same space search independently; a new seed is a new search.
    assert not set(map(repr, awd[1:])) & set(map(repr, twin[1:]))
    assert not set(map(repr, awd[1:])) & set(map(repr, other_seed[1:]))
    assert draws(study) == awd  # and the same seed is the same search


def test_qmc_covers_each_rate_evenly(tmp_path):
    # A scrambled Sobol sequence puts 8 points into the 8 eighths of every range, one each; 8 random points
    # almost never do (probability 8!/8**8 = 0.24 % per range).
    study = make_study(tmp_path, trials=9, sampler="qmc")
    points = draws(study)[1:]
    for site, rng in study.search.rates.items():
        eighths = sorted(int((p[f"dropout.{site}"] - rng.low) / (rng.high - rng.low) * 8) for p in points)
        assert eighths == list(range(8)), site


def test_qmc_draws_made_in_parallel_are_reproducible_and_silent(tmp_path, caplog):
    # Trials claimed before any has finished come from QMC's independent sampler, which is seeded per trial too;
    # that is by design here, so Optuna must not warn about it on every claim.
    study = make_study(tmp_path, trials=4, sampler="qmc")

    def parallel():
        ledger = open_ledger(study)
        return [ledger.claim("awd", SEARCH).params for _ in range(4)]

    optuna.logging.enable_propagation()  # Optuna warns through its logger, which caplog then sees
    try:
        with caplog.at_level("WARNING", logger="optuna"):
            first = parallel()
    finally:
        optuna.logging.disable_propagation()
    assert first == parallel() and len({repr(p) for p in first}) == 4
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == []


@pytest.mark.parametrize("trials, startup", [(7, 2), (9, 3)])
def test_tpe_draws_at_random_for_a_third_of_the_budget_then_learns_from_the_results(tmp_path, trials, startup):
    study = make_study(tmp_path, trials=trials)
    low = draws(study, objective_=objective)
    high = draws(study, objective_=lambda p: 200 - objective(p))  # the opposite landscape
    # Trial 0 is the paper rates; the first `startup` trials finish before TPE starts to model them, so draws
    # 1..startup-1 are the seeded random ones whatever the results, and draw `startup` already depends on them.
    assert low[:startup] == high[:startup]
    assert low[startup] != high[startup]


def test_a_trial_running_elsewhere_counts_as_a_bad_result_for_the_next_draw(tmp_path):
    # TPE's constant liar: parallel slots explore apart instead of drawing next to each other.
    study = make_study(tmp_path, trials=8)

    def next_draw(still_running: bool):
        ledger = open_ledger(study)
        for _ in range(5):  # past TPE's random start-up
            claim = ledger.claim("awd", SEARCH)
            ledger.finish(claim, objective(claim.params), {})
        elsewhere = ledger.claim("awd", SEARCH)
        if not still_running:
            ledger.fail(elsewhere, "gone", interrupted=True)  # same trial numbers, but nothing runs
        return ledger.claim("awd", SEARCH).params

    assert next_draw(still_running=True) != next_draw(still_running=False)


def test_the_median_pruner_starts_after_the_configured_trials(tmp_path):
    study = make_study(tmp_path, trials=4, pruner="median", warmup=0)  # pruner_startup_trials = 1
    ledger = open_ledger(study)
    first = ledger.claim("awd", SEARCH)
    assert ledger.report_epoch(first, 1, 100.0)
    ledger.finish(first, 100.0, {})
    second = ledger.claim("awd", SEARCH)
    assert not ledger.report_epoch(second, 1, 500.0)  # one finished trial is enough to compare with


# --- opening the ledger ----------------------------------------------------------------------------------------
def test_the_ledger_records_what_each_optuna_study_is(tmp_path):
    study = make_study(tmp_path, trials=3)
    ledger = open_ledger(study)
    search, confirm = ledger.studies[("awd", SEARCH)], ledger.studies[("awd", CONFIRM)]
    assert (search.user_attrs["variant"], search.user_attrs["phase"]) == ("awd", SEARCH)
    assert (confirm.user_attrs["variant"], confirm.user_attrs["phase"]) == ("awd", CONFIRM)
    assert search.direction == optuna.study.StudyDirection.MINIMIZE
    waiting = search.get_trials(states=(TrialState.WAITING,))
    assert [t.user_attrs for t in waiting] == [{"origin": "paper rates"}, {}, {}]
    # A trial that has not failed yet is on its first attempt, and a failure of it is retried once.
    ledger.claim("awd", SEARCH)
    second = ledger.claim("awd", SEARCH)
    assert second.attempt == 1 and second.retry_of is None and ledger.fail(second, "boom") is True


def test_a_second_coordinator_does_not_add_to_the_budget(tmp_path):
    study = make_study(tmp_path, trials=4)
    storage = InMemoryStorage()
    first = open_ledger(study, storage)
    first.claim("awd", SEARCH), first.claim("awd", SEARCH)  # two trials run on the first machine
    second = open_ledger(study, storage)
    assert second.tally("awd", SEARCH) == Tally(running=2, waiting=2)
    assert second.uid == first.uid and len(first.uid) == 32 and int(first.uid, 16) >= 0
    assert open_ledger(study).uid != first.uid  # another storage, another study


def test_a_study_of_one_variant(tmp_path):
    study = make_study(tmp_path, trials=2, edits=[("[variants.no_dropout]\n", "")])
    ledger = open_ledger(study)
    assert ledger.variants == ["awd"] and len(ledger.uid) == 32
    assert len(run_search(ledger)) == 2


def test_the_report_opens_an_existing_study_and_nothing_else(tmp_path):
    study = make_study(tmp_path, trials=2)
    storage = InMemoryStorage()
    identity = study.identity({"train": "a", "valid": "b", "test": "c"}, {"train": "/corpus/train.txt"})
    assert not holds_study(storage, study)
    with pytest.raises(UserError, match=r"^InMemoryStorage holds no Optuna study of 'ledger'$"):
        LedgerReader(study, storage, identity, log=lambda *a: None)
    writer = open_ledger(study, storage)
    run_search(writer)
    assert holds_study(storage, study)
    optuna.delete_study(study_name=optuna_name(study, "awd", CONFIRM), storage=storage)
    assert holds_study(storage, study)
    reader = LedgerReader(study, storage, identity, log=lambda *a: None)
    assert set(reader.studies) == set(writer.studies) - {("awd", CONFIRM)}
    assert reader.has("awd", SEARCH) and not reader.has("awd", CONFIRM)
    assert reader.tally("awd", SEARCH) == Tally(finished=2) and reader.tally("awd", CONFIRM) == Tally()
    assert optuna.get_all_study_names(storage).count(optuna_name(study, "awd", SEARCH)) == 1
    changed = study.identity({"train": "z", "valid": "b", "test": "c"}, {"train": "/corpus/train.txt"})
    with pytest.raises(UserError, match=r"/corpus/train.txt \(MD5 a -> z\).*in InMemoryStorage\)$"):
        LedgerReader(study, storage, changed, log=lambda *a: None)


def test_a_refusal_names_the_storage_it_came_from(tmp_path):
    study = make_study(tmp_path)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    open_ledger(study, open_storage(url))
    with pytest.raises(UserError) as err:
        open_ledger(make_study(tmp_path, trials=5), open_storage(url))
    assert str(err.value).endswith(f"in {url})")


def fake_shared(monkeypatch, storage):
    """Make the ledger treat `storage` (SQLite with heartbeats) as shared; returns the study locks it took."""
    locks = []

    @contextlib.contextmanager
    def lock(engine, key):
        locks.append((engine, key))
        yield

    monkeypatch.setattr("harness.study.ledger.writer.is_shared", lambda s: s is storage)
    monkeypatch.setattr("harness.study.ledger.writer.advisory_lock", lock)
    return locks


def test_machines_must_agree_on_the_heartbeat(tmp_path, monkeypatch):
    study = make_study(tmp_path)
    storage, _, _ = heartbeat_storage(tmp_path, interval=7, grace=21)
    locks = fake_shared(monkeypatch, storage)
    ledger = open_ledger(study, storage)
    assert ledger.shared and ledger.studies[("no_dropout", SEARCH)].user_attrs["heartbeat_seconds"] == 7
    assert locks and all(lock == (storage.engine, "harness study ledger") for lock in locks)
    open_ledger(study, storage)  # the same heartbeat: welcome
    faster, _, _ = heartbeat_storage(tmp_path, interval=3, grace=9)  # the same file, beating every 3 s
    fake_shared(monkeypatch, faster)
    with pytest.raises(UserError, match=r"^--heartbeat 3: the machines on this study beat every 7 s; pass "
                                        r"--heartbeat 7$"):
        open_ledger(study, faster)


# --- patience while the storage is away -----------------------------------------------------------------------
class Clock:
    """time.monotonic for the ledger, moved by hand; time.sleep moves it too."""

    def __init__(self, monkeypatch, now=1000.0):
        self.now = now
        monkeypatch.setattr("harness.study.ledger.storage.time.monotonic", lambda: self.now)
        monkeypatch.setattr("harness.study.ledger.storage.time.sleep", self.sleep)

    def sleep(self, seconds):
        self.now += seconds


def test_the_ledger_gives_up_once_the_storage_has_been_away_too_long(tmp_path, monkeypatch):
    ledger = open_ledger(make_study(tmp_path))
    lines = []
    ledger.log = lines.append
    clock = Clock(monkeypatch)
    away = sqlalchemy.exc.OperationalError("SELECT", {}, Exception("server closed the connection"))
    ledger._outage(away)
    assert lines == ["the Optuna storage InMemoryStorage does not answer (OperationalError); retrying for up to "
                     f"{RECONNECT_SECONDS} s"]
    clock.now += RECONNECT_SECONDS
    ledger._outage(away)  # exactly the limit: still waiting
    clock.now += 1
    with pytest.raises(UserError) as err:
        ledger._outage(away)
    assert str(err.value) == (f"the Optuna storage InMemoryStorage did not answer for {RECONNECT_SECONDS} s; the "
                              "trials running here will be retried by the other machines, or when this command is "
                              "run again")


def test_after_an_outage_no_trial_is_judged_stale_until_the_machines_could_beat_again(tmp_path, monkeypatch):
    ledger = open_ledger(make_study(tmp_path, trials=2))
    lines = []
    ledger.log = lines.append
    clock = Clock(monkeypatch)
    orphan = ledger.claim("awd", SEARCH)
    ledger.heartbeat.grace = 30  # as on a storage with heartbeats
    ledger._outage(OSError("away"))
    clock.now += 42
    ledger._reconnected()
    assert lines[-1] == "the Optuna storage answers again after 42 s"
    clock.now += 29
    assert ledger.sweep(running_here=set()) == []
    clock.now += 2
    assert [s.number for s in ledger.sweep(running_here=set())] == [orphan.number]
    ledger._outage(OSError("away again"))  # a second outage is announced like the first
    assert "does not answer (OSError)" in lines[-1]


def test_right_after_a_short_outage_without_heartbeats_the_sweep_runs(tmp_path, monkeypatch):
    ledger = open_ledger(make_study(tmp_path, trials=2))
    Clock(monkeypatch)
    orphan = ledger.claim("awd", SEARCH)
    ledger._outage(OSError("away"))
    ledger._reconnected()
    assert [s.number for s in ledger.sweep(running_here=set())] == [orphan.number]


# --- settled, due, remaining, complete ----------------------------------------------------------------------------
def test_what_is_due_and_remaining_follows_the_study_to_its_end(tmp_path):
    study = make_study(tmp_path, trials=2)
    ledger = open_ledger(study)
    seeds = len(study.budget.confirm_seeds)  # 3
    assert ledger.confirmation_due("awd") == seeds and ledger.remaining() == 2 + 1 + 2 * seeds
    run_search(ledger)
    run_search(ledger, "no_dropout")
    assert ledger.search_settled("awd") and not ledger.variant_settled("awd") and not ledger.complete()
    assert ledger.confirmation_due("awd") == seeds and ledger.remaining() == 2 * seeds  # not enqueued yet
    ledger.enqueue_confirmation("awd")
    claim = ledger.claim("awd", CONFIRM)
    assert ledger.confirmation_due("awd") == seeds and ledger.remaining() == 2 * seeds - 1
    ledger.fail(claim, "SIGTERM", interrupted=True)  # its retry waits: still due
    assert ledger.confirmation_due("awd") == seeds and ledger.remaining() == 2 * seeds
    for i in range(seeds):
        claim = ledger.claim("awd", CONFIRM)
        ledger.finish(claim, 100.0 + i, {"test_ppl": 90.0 + claim.seed})
        assert ledger.confirmation_due("awd") == seeds - 1 - i
    assert ledger.variant_settled("awd") and not ledger.complete()
    assert ledger.confirmation_results("awd") == {1: 91.0, 2: 92.0, 3: 93.0}
    ledger.enqueue_confirmation("no_dropout")
    while (claim := ledger.claim("no_dropout", CONFIRM)) is not None:
        ledger.fail(claim, "boom")
        if (retry := ledger.claim("no_dropout", CONFIRM)) is not None:
            ledger.fail(retry, "boom again")
    # Confirmation runs that failed for good are not enqueued again: nothing is left.
    assert ledger.confirmation_due("no_dropout") == 0 and ledger.remaining() == 0 and ledger.complete()
    assert ledger.tally("no_dropout", CONFIRM) == Tally(failed=seeds, retried=seeds)


def test_confirmation_owed_counts_each_seed_once_whatever_its_runs_did(tmp_path):
    two_seeds = ("confirm_seeds = [1, 2, 3]", "confirm_seeds = [1, 2]")
    ledger = open_ledger(make_study(tmp_path, trials=1, edits=[two_seeds]))
    run_search(ledger)
    ledger.enqueue_confirmation("awd")
    ledger.finish(ledger.claim("awd", CONFIRM), 100.0, {})
    second = ledger.claim("awd", CONFIRM)
    assert ledger.confirmation_due("awd") == 1  # one finished, one running
    ledger.fail(second, "SIGTERM", interrupted=True)
    ledger.fail(ledger.claim("awd", CONFIRM), "SIGTERM", interrupted=True)
    assert ledger.tally("awd", CONFIRM) == Tally(finished=1, interrupted=2, waiting=1)
    assert ledger.confirmation_due("awd") == 1  # interrupted twice, once owed


def test_a_study_without_confirmation_seeds_owes_none(tmp_path):
    no_seeds = ("confirm_seeds = [1, 2, 3]", "confirm_seeds = []")
    ledger = open_ledger(make_study(tmp_path, trials=1, edits=[no_seeds]))
    assert ledger.confirmation_due("awd") == 0 and ledger.remaining() == 2
    run_search(ledger), run_search(ledger, "no_dropout")
    assert ledger.enqueue_confirmation("awd") is None and ledger.complete()


def test_a_search_with_a_trial_still_running_has_not_settled(tmp_path):
    ledger = open_ledger(make_study(tmp_path, trials=1))
    run_search(ledger)
    assert ledger.search_settled("awd")
    ledger.studies[("awd", SEARCH)].ask()  # e.g. a trial an older coordinator started outside the queue
    assert not ledger.search_settled("awd") and ledger.enqueue_confirmation("awd") is None


# --- telling and failing -------------------------------------------------------------------------------------------
def test_a_tell_repeated_after_a_lost_reply_is_recognised(tmp_path):
    ledger = open_ledger(make_study(tmp_path, trials=2))
    finished, pruned = ledger.claim("awd", SEARCH), ledger.claim("awd", SEARCH)
    assert ledger.finish(finished, 120.0, {})
    assert ledger.finish(finished, 120.0, {}) is True  # the same tell again: it took
    assert ledger.finish(finished, 121.0, {}) is False and ledger.prune(finished) is False
    assert ledger.prune(pruned) and ledger.prune(pruned) is True and ledger.finish(pruned, 120.0, {}) is False


def test_a_tell_that_loses_the_race_with_a_stale_verdict_is_refused(tmp_path, monkeypatch):
    ledger = open_ledger(make_study(tmp_path, trials=2))
    claim = ledger.claim("awd", SEARCH)
    seen_running = ledger.storage.get_trial(claim.trial_id)
    ledger.sweep(running_here=set())  # another machine fails it right after this one read it
    monkeypatch.setattr(ledger.storage, "get_trial", lambda trial_id: seen_running)
    assert ledger.finish(claim, 100.0, {"test_ppl": 1.0}) is False


def test_finishing_records_the_attributes_and_stops_the_trials_heartbeat(tmp_path):
    storage, beats, _ = heartbeat_storage(tmp_path)
    ledger = open_ledger(make_study(tmp_path, trials=3), storage)
    finished, pruned, failed = (ledger.claim("awd", SEARCH) for _ in range(3))
    ledger.finish(finished, 120.0, {"best_epoch": 4})
    ledger.prune(pruned)
    ledger.fail(failed, "boom")
    assert storage.get_trial(finished.trial_id).user_attrs["best_epoch"] == 4
    beats.clear()
    ledger.heartbeat.beat_all()
    assert beats == []


def test_a_failure_keeps_its_reason_and_the_retry_keeps_only_what_belongs_to_the_trial(tmp_path):
    study = make_study(tmp_path, trials=1)
    ledger = open_ledger(study)
    run_search(ledger)
    ledger.enqueue_confirmation("awd")
    claim = ledger.claim("awd", CONFIRM)
    ledger.annotate(claim, {"mlflow_run_id": "abc", "coordinator": "host/1", "device": "cpu"})
    reason = "Traceback ...\n" + "x" * 3000 + "\nRuntimeError: out of memory"
    assert ledger.fail(claim, reason) is True
    failed = ledger.storage.get_trial(claim.trial_id).user_attrs
    assert failed["fail_reason"] == reason[-2000:] and failed["fail_reason"].endswith("out of memory")
    retry = next(t for t in ledger.studies[("awd", CONFIRM)].get_trials(states=(TrialState.WAITING,))
                 if t.user_attrs.get("retry_of") == claim.number)
    assert retry.user_attrs == {"seed": claim.seed, "search_best_val_ppl": failed["search_best_val_ppl"],
                                "search_trial": failed["search_trial"], "attempt": 2, "retry_of": claim.number,
                                "lineage": [claim.number], "continues_run": "abc"}


def test_a_retry_continues_its_earlier_attempts_checkpoints_run_and_epochs(tmp_path):
    study = make_study(tmp_path, trials=1)
    ledger = open_ledger(study)
    first = ledger.claim("awd", SEARCH)
    ledger.annotate(first, {"mlflow_run_id": "run-a"})
    for epoch in (1, 2):
        ledger.report_epoch(first, epoch, 100.0 - epoch)
    ledger.fail(first, "worker process died (killed by signal 9)")
    second = ledger.claim("awd", SEARCH)
    assert (second.lineage, second.continues_run) == ((first.number,), "run-a")
    ledger.fail(second, "interrupted (Ctrl-C)", interrupted=True)  # before its worker said what it continues
    third = ledger.claim("awd", SEARCH)
    # Newest first, and the run of the last attempt that had one.
    assert (third.lineage, third.continues_run) == ((second.number, first.number), "run-a")
    ledger.restore_epochs(third, {1: 99.0, 2: 98.0})
    ledger.restore_epochs(third, {1: 99.0, 2: 98.0})  # repeated after a dropped connection: no harm
    assert ledger.report_epoch(third, 3, 97.0)
    assert ledger.storage.get_trial(third.trial_id).intermediate_values == {1: 99.0, 2: 98.0, 3: 97.0}


def test_hyperband_prunes_parallel_trials_before_any_has_finished(tmp_path):
    # Its rungs come from the study's epochs, not from a first finished trial: parallel workers are pruned too.
    study = make_study(tmp_path, trials=8, pruner="hyperband", warmup=1)
    ledger = open_ledger(study)
    claims = [ledger.claim("awd", SEARCH) for _ in range(8)]
    verdicts = {}
    for epoch in range(1, 4):
        for i, claim in enumerate(claims):
            if claim.number not in verdicts and not ledger.report_epoch(claim, epoch, 100.0 * (i + 1) + epoch):
                verdicts[claim.number] = epoch
                ledger.prune(claim)
    assert verdicts and ledger.tally("awd", SEARCH).finished == 0
