"""The Optuna side of a study: one Optuna study per variant and phase, all in one storage.

`<study>/<variant>/search` tunes the variant's active rates (and the learning rate when the study searches
it), the paper's values enqueued as its first trial; `<study>/<variant>/confirm` holds one trial per
confirmation seed with the best search parameters. The whole budget waits in Optuna's queue and work is
only ever taken by popping a waiting trial (atomic in the storage), so coordinators on several machines can
never run more trials than the budget. Failed trials are retried by enqueueing the same parameters again,
up to the budget's limit.
"""

import hashlib
import logging

import optuna
from optuna.distributions import FloatDistribution
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from harness.config import SITES, StudyConfig
from harness.errors import UserError

SEARCH, CONFIRM = "search", "confirm"
DIGEST_ATTR = "study_digest"

optuna.logging.set_verbosity(logging.WARNING)  # the live view says what happens


def optuna_name(study: StudyConfig, variant: str, phase: str) -> str:
    """Name of the Optuna study of one variant and phase."""
    return f"{study.name}/{variant}/{phase}"


def search_space(study: StudyConfig, variant: str) -> dict:
    """Distributions of the variant's searched parameters, named like the config keys they set."""
    arm = study.variants[variant]
    space = {
        f"dropout.{site}": FloatDistribution(rng.low, rng.high, log=rng.log)
        for site, rng in study.search.rates.items()
        if site in arm.sites
    }
    if study.search.lr is not None:
        space["train.lr"] = FloatDistribution(study.search.lr.low, study.search.lr.high, log=True)
    return space


def trials_for(study: StudyConfig, variant: str) -> int:
    """The search budget of a variant; one trial when it has nothing to search, not N identical ones."""
    return study.budget.trials if search_space(study, variant) else 1


def default_params(study: StudyConfig, variant: str) -> dict:
    """The fixed (paper) values of the searched parameters, clipped into their ranges."""
    values = {f"dropout.{s}": getattr(study.fixed.dropout, s) for s in SITES}
    values["train.lr"] = study.fixed.train.lr
    return {k: min(max(values[k], d.low), d.high) for k, d in search_space(study, variant).items()}


def _seed(base: int, variant: str) -> int:
    # Each variant gets its own reproducible stream (Python's hash() is salted per process).
    return (base + int(hashlib.sha256(variant.encode()).hexdigest()[:8], 16)) % 2**31


def make_sampler(study: StudyConfig, variant: str):
    """Seeded TPE (default) or scrambled Sobol quasi-random sampling."""
    seed = _seed(study.search.seed, variant)
    if study.search.sampler == "qmc":
        return optuna.samplers.QMCSampler(scramble=True, seed=seed, warn_asynchronous_seeding=False)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, study.budget.trials // 3))


def make_pruner(study: StudyConfig, max_epochs: int):
    """Median or Hyperband pruning on per-epoch validation perplexity, after the warm-up epochs."""
    warmup = study.budget.warmup_epochs
    if study.budget.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=warmup)
    if study.budget.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, warmup), max_resource=max_epochs)
    return optuna.pruners.NopPruner()


def open_study(storage, study: StudyConfig, variant: str, phase: str, max_epochs: int) -> optuna.Study:
    """Create or load one Optuna study with its budget waiting; refuses one made from a different study file.

    Call it under harness.stores.study_lock: the check-then-write steps here must not interleave across machines.
    """
    name = optuna_name(study, variant, phase)
    ostudy = optuna.create_study(
        storage=storage, study_name=name, direction="minimize", load_if_exists=True,
        sampler=make_sampler(study, variant), pruner=make_pruner(study, max_epochs) if phase == SEARCH else None,
    )
    digest = ostudy.user_attrs.get(DIGEST_ATTR)
    if digest is None:
        ostudy.set_user_attr(DIGEST_ATTR, study.digest)
        ostudy.set_user_attr("variant", variant)
        ostudy.set_user_attr("phase", phase)
        if phase == SEARCH and search_space(study, variant):
            ostudy.enqueue_trial(default_params(study, variant), user_attrs={"attempt": 1, "origin": "paper rates"})
    elif digest != study.digest:
        raise UserError(
            f"{study.path}: the Optuna study {name!r} in this storage was made from a different version of the "
            "study file; refusing to mix their results: to resume it, run the file it was made from (every MLflow "
            "run holds it as study.toml); to start afresh, give this file a new study.name (or use a new --storage)"
        )
    if phase == SEARCH:
        # The rest of the budget waits with no parameters: the sampler draws them when a trial is popped.
        # Topping up, not enqueueing once, also restores a retry lost to a crash between failing and enqueueing.
        c = counts(ostudy)
        for _ in range(trials_for(study, variant) - settled(c) - c["running"] - c["waiting"]):
            ostudy.enqueue_trial({}, user_attrs={"attempt": 1})
    return ostudy


def pop_trial(ostudy: optuna.Study, space: dict, heartbeat) -> optuna.Trial | None:
    """Take the next waiting trial and draw its open parameters; None when none waits.

    Never a fresh trial (Study.ask makes one when another machine took the last waiting trial first), so the
    budget in the queue is never exceeded. `heartbeat(trial_id)` beats before the pop: a coordinator that dies
    right after it leaves a trial that goes stale instead of one that runs forever.
    """
    storage = ostudy._storage
    for waiting in storage.get_all_trials(ostudy._study_id, deepcopy=False, states=(TrialState.WAITING,)):
        heartbeat(waiting._trial_id)
        try:
            if not storage.set_trial_state_values(waiting._trial_id, state=TrialState.RUNNING):
                continue  # another coordinator took it
        except UpdateFinishedTrialError:
            continue
        trial = optuna.Trial(ostudy, waiting._trial_id)
        for param, distribution in space.items():
            trial.suggest_float(param, distribution.low, distribution.high, log=distribution.log)
        return trial
    return None


def tell_result(ostudy: optuna.Study, trial: optuna.Trial, value: float | None, state: TrialState,
                attrs: dict) -> bool:
    """Record a finished or pruned trial; False when another machine failed it as stale first (its retry counts)."""
    frozen = ostudy._storage.get_trial(trial._trial_id)
    if frozen.state.is_finished():
        # Our own earlier tell, whose reply a dropped connection lost, or another machine's stale verdict.
        return frozen.state == state and (value is None or frozen.value == value)
    try:
        for key, attr in attrs.items():
            trial.set_user_attr(key, attr)
        ostudy.tell(trial, value, state=state)
    except UpdateFinishedTrialError:
        return False
    return True


def counts(ostudy: optuna.Study) -> dict:
    """Trials by state, with failures that were retried counted apart from final ones."""
    out = {"finished": 0, "pruned": 0, "failed": 0, "retried": 0, "running": 0, "waiting": 0}
    for t in ostudy.get_trials(deepcopy=False):
        if t.state == TrialState.COMPLETE:
            out["finished"] += 1
        elif t.state == TrialState.PRUNED:
            out["pruned"] += 1
        elif t.state == TrialState.FAIL:
            out["retried" if t.user_attrs.get("retried") else "failed"] += 1
        elif t.state == TrialState.RUNNING:
            out["running"] += 1
        elif t.state == TrialState.WAITING:
            out["waiting"] += 1
    return out


def settled(c: dict) -> int:
    """Trials that used up budget: finished, pruned, or failed for good."""
    return c["finished"] + c["pruned"] + c["failed"]


def best_params(ostudy: optuna.Study) -> tuple[dict, float] | None:
    """Parameters and value of the best finished (never pruned) trial."""
    done = [t for t in ostudy.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if not done:
        return None
    best = min(done, key=lambda t: t.value)
    return dict(best.params), best.value


def fail_trial(ostudy: optuna.Study, trial_id: int, reason: str, max_retries: int, *,
               counts: bool = True) -> bool | None:
    """Mark a trial failed with its reason; enqueue the same parameters again while retries remain.

    Returns whether it will be retried, or None when the trial had already ended (another machine failed it
    first: the storage's row lock lets exactly one of them fail it and enqueue the retry). An interruption
    (`counts=False`) is not the trial's fault: it is always retried and uses no attempt.
    """
    frozen = ostudy._storage.get_trial(trial_id)
    if frozen.state.is_finished():
        return None
    attempt = int(frozen.user_attrs.get("attempt", 1))
    retry = attempt <= max_retries or not counts
    trial = optuna.trial.Trial(ostudy, trial_id)
    try:
        trial.set_user_attr("fail_reason", reason[-2000:])
        trial.set_user_attr("retried", retry)
        ostudy._storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
    except UpdateFinishedTrialError:
        return None
    if retry:
        attrs = {k: v for k, v in frozen.user_attrs.items()
                 if k not in ("fail_reason", "retried", "mlflow_run_id", "coordinator", "device")}
        ostudy.enqueue_trial(dict(frozen.params), user_attrs={**attrs, "attempt": attempt + counts,
                                                              "retry_of": frozen.number})
    return retry


def fail_stale(ostudy: optuna.Study, reason: str, max_retries: int) -> list:
    """Running trials whose heartbeats stopped (their machine died): fail and retry them; returns those failed here."""
    failed = []
    for trial_id in ostudy._storage._get_stale_trial_ids(ostudy._study_id):
        frozen = ostudy._storage.get_trial(trial_id)
        if fail_trial(ostudy, trial_id, reason, max_retries) is not None:
            failed.append(frozen)
    return failed
