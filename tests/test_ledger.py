"""The study's bookkeeping rules (harness.ledger), fast, on Optuna's in-memory storage: no processes, no training.

Each test pins one rule whose violation would change a reported number: the budget, retries and attempts,
pruning and its warm-up, the confirmation's parameters, resumed searches, identity checks, outages.
"""

import optuna
import pytest
import sqlalchemy
from optuna.storages import InMemoryStorage
from optuna.trial import TrialState

from harness.config import load_study
from harness.errors import UserError
from harness.ledger import CONFIRM, SEARCH, Ledger, Tally, make_pruner, optuna_name, tally_trials

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


def make_study(tmp_path, trials=4, pruner="none", warmup=2, sampler="tpe"):
    path = tmp_path / "ledger.toml"
    path.write_text(STUDY.format(trials=trials, pruner=pruner, warmup=warmup, sampler=sampler))
    return load_study(path)


def open_ledger(study, storage=None, md5=None):
    return Ledger(study, storage or InMemoryStorage(), study.identity(md5 or {"train": "a", "valid": "b", "test": "c"},
                                                                       {"train": "/corpus/train.txt"}), log=lambda *a: None)


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
    assert [t.state for t in ledger.search_trials("awd")] == ["pruned", "finished"]
    assert ledger.search_trials("awd")[0].best_seen == 50.0 and ledger.search_trials("awd")[0].value is None


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


def test_the_ledger_waits_out_a_storage_outage(tmp_path, monkeypatch):
    ledger = open_ledger(make_study(tmp_path))
    lines, calls = [], []
    ledger.log = lines.append
    real = ledger.storage.get_all_trials

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) <= 2:
            raise sqlalchemy.exc.OperationalError("SELECT", {}, Exception("server closed the connection"))
        return real(*args, **kwargs)

    monkeypatch.setattr(ledger.storage, "get_all_trials", flaky)
    monkeypatch.setattr("harness.ledger.time.sleep", lambda s: None)
    assert ledger.tally("awd", SEARCH).waiting == 4
    assert len(calls) == 3 and "does not answer" in lines[0] and "answers again" in lines[-1]


def test_tally_is_the_one_rule_for_what_each_state_counts_as():
    def trial(state, **attrs):
        return optuna.trial.create_trial(state=state, value=1.0 if state == TrialState.COMPLETE else None,
                                         user_attrs=attrs) if state.is_finished() else _Fake(state, attrs)

    trials = [trial(TrialState.COMPLETE), trial(TrialState.PRUNED), trial(TrialState.FAIL, retried=False),
              trial(TrialState.FAIL, retried=True), trial(TrialState.FAIL, retried=True, interrupted=True),
              trial(TrialState.RUNNING), trial(TrialState.WAITING)]
    tally = tally_trials(trials)
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
    assert ledger.importances("no_dropout", 5) == "nothing is searched in this variant."

    def finish(n):
        for _ in range(n):
            claim = ledger.claim("awd", SEARCH)
            # input matters a lot, hidden a little, weight not at all
            p = claim.params
            ledger.finish(claim, 100 + 10 * p["dropout.input"] + 0.1 * p["dropout.hidden"], {})

    finish(3)
    assert ledger.importances("awd", 5).startswith("3 finished search trials: too few")
    finish(17)
    importances = ledger.importances("awd", 5)
    assert max(importances, key=importances.get) == "dropout.input"
    assert sum(importances.values()) == pytest.approx(1.0)
