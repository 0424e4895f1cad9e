"""The Optuna side of a study: one Optuna study per variant and phase, all in one storage.

`<study>/<variant>/search` tunes the variant's active rates (and the learning rate when the study searches
it), the paper's values enqueued as its first trial; `<study>/<variant>/confirm` holds one trial per
confirmation seed with the best search parameters. Failed trials are retried by enqueueing the same
parameters again, up to the budget's limit.
"""

import hashlib
import logging

import optuna
from optuna.distributions import FloatDistribution
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
    """Create or load one Optuna study; refuses one made from a different study file."""
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
            f"{study.path}: the Optuna study {name!r} in this storage was made from a different version of "
            f"the study file; never mixing the two, use a new study.name (or a new --storage) to start afresh"
        )
    return ostudy


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


def fail_trial(ostudy: optuna.Study, trial_id: int, reason: str, max_retries: int, *, counts: bool = True) -> bool:
    """Mark a trial failed with its reason; enqueue the same parameters again while retries remain.

    An interruption (`counts=False`) is not the trial's fault: it is always retried and uses no attempt.
    """
    frozen = ostudy._storage.get_trial(trial_id)
    attempt = int(frozen.user_attrs.get("attempt", 1))
    retry = attempt <= max_retries or not counts
    trial = optuna.trial.Trial(ostudy, trial_id)
    trial.set_user_attr("fail_reason", reason[-2000:])
    trial.set_user_attr("retried", retry)
    ostudy.tell(frozen.number, state=TrialState.FAIL, skip_if_finished=True)
    if retry:
        attrs = {k: v for k, v in frozen.user_attrs.items() if k not in ("fail_reason", "retried", "mlflow_run_id")}
        ostudy.enqueue_trial(dict(frozen.params), user_attrs={**attrs, "attempt": attempt + counts,
                                                              "retry_of": frozen.number})
    return retry


def fail_interrupted(ostudy: optuna.Study, max_retries: int) -> list:
    """Trials left running by a coordinator that stopped: fail them (to be retried); returns them."""
    stale = ostudy.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for t in stale:
        fail_trial(ostudy, t._trial_id, "interrupted: the coordinator stopped while it ran", max_retries,
                   counts=False)
    return stale
