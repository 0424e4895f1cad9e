"""The coordinator's ledger: the only code that writes a study's state to Optuna.

One Optuna study per variant and phase: `<study>/<variant>/search` tunes the variant's active rates (the paper's
values are its first trial), `<study>/<variant>/confirm` retrains the best search trial's parameters once per
confirmation seed. The whole budget waits in Optuna's queue and work is only taken by claiming a waiting trial (an
atomic WAITING -> RUNNING), so coordinators on several machines never run more than the budget.
"""

import contextlib
import hashlib
import time
import uuid
import warnings
from dataclasses import dataclass, field

import optuna
from optuna.distributions import FloatDistribution
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import BaseStorage
from optuna.trial import TrialState

from harness.errors import UserError
from harness.study import rules
from harness.study.ledger.storage import Heartbeat, is_shared, patient
from harness.study.ledger.studies import StudyTrials, trial_kind
from harness.study.rules import CONFIRM, OBJECTIVE, PHASES, SEARCH, Tally, default_params, optuna_name, trials_for
from harness.study.spec import StudyConfig, StudyIdentity
from harness.study.stores import advisory_lock

# Attributes of a failed trial that its retry must not inherit.
_PER_ATTEMPT_ATTRS = ("fail_reason", "retried", "interrupted", "mlflow_run_id", "coordinator", "device")


def distributions(study: StudyConfig, variant: str) -> dict:
    """Optuna's distributions of the variant's searched parameters (rules.search_space)."""
    return {k: FloatDistribution(r.low, r.high, log=r.log) for k, r in rules.search_space(study, variant).items()}


def _seed(*parts) -> int:
    # Reproducible across processes and machines (Python's hash() is salted per process).
    return int(hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:8], 16) % 2**31


def make_sampler(study: StudyConfig, variant: str, number: int):
    """The sampler that draws trial `number`'s parameters: seeded by study seed, variant and trial number.

    Seeding per trial, not per process, is what makes a resumed search draw what an uninterrupted one would
    have (a sampler seeded once per start would repeat its first draws after every restart).
    """
    per_trial = _seed(study.search.seed, variant, number)
    if study.search.sampler == "qmc":
        # The Sobol sequence itself is one seeded sequence whose position Optuna keeps in the storage. QMC
        # falls back to its independent sampler only while no trial has parameters yet (a claim racing the
        # paper-rate trial's): seeded per trial too, so that draw is reproducible as well.
        return optuna.samplers.QMCSampler(scramble=True, seed=_seed(study.search.seed, variant),
                                          independent_sampler=optuna.samplers.RandomSampler(seed=per_trial))
    # constant_liar: trials running in parallel count as bad results, so parallel slots explore apart.
    return optuna.samplers.TPESampler(seed=per_trial, n_startup_trials=max(2, study.budget.trials // 3),
                                      constant_liar=True)


def make_pruner(study: StudyConfig):
    """Median or Hyperband pruning on per-epoch validation perplexity; never inside the warm-up epochs.

    Optuna's step is the epoch (1-based, as in MLflow), and both pruners may prune at step == their
    threshold, so the first prunable epoch is warmup_epochs + 1.
    """
    first_prunable = study.budget.warmup_epochs + 1
    if study.budget.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=study.budget.pruner_startup_trials,
                                           n_warmup_steps=first_prunable)
    if study.budget.pruner == "hyperband" and first_prunable < study.max_epochs:
        return optuna.pruners.HyperbandPruner(min_resource=first_prunable, max_resource=study.max_epochs)
    return optuna.pruners.NopPruner()


@dataclass(frozen=True)
class Claim:
    """A trial this coordinator took from the queue: what to train, and the handle to record it by."""

    variant: str
    phase: str
    number: int  # the trial's number in its Optuna study
    trial_id: int
    params: dict  # searched parameter ("dropout.input", "train.lr", ...) -> value
    seed: int | None  # the confirmation seed; None in the search (the study's fixed seed)
    attempt: int
    retry_of: int | None
    trial: optuna.Trial = field(repr=False, compare=False)
    lineage: tuple = ()  # numbers of the earlier attempts this retry replaces, newest first (their checkpoints)
    continues_run: str | None = None  # the MLflow run of those attempts, which this one continues when it can

    @property
    def key(self) -> str:
        """Unique and readable, e.g. "awd/search/3"."""
        return f"{self.variant}/{self.phase}/{self.number}"


@dataclass(frozen=True)
class Swept:
    """A trial the sweep failed because no coordinator runs it any more."""

    variant: str
    phase: str
    number: int
    coordinator: str
    retried: bool


class TrialLost(Exception):
    """Another machine failed this trial as stale while it ran here: its retry counts, not this run."""


class Ledger(StudyTrials):
    """The Optuna side of one study on one storage, for its coordinator: opened (and its budget enqueued) once.

    `identity` is checked against what the storage recorded when the study started (the study file's digest and
    the corpus's MD5s); a mismatch is a UserError naming what changed.
    """

    def __init__(self, study: StudyConfig, storage: BaseStorage, identity: StudyIdentity, *, log=print):
        super().__init__(study, storage, identity, log)
        self.shared = is_shared(storage)
        self.heartbeat = Heartbeat(storage)
        self.no_verdicts_until = 0.0
        with self.lock():
            self._refuse_foreign()
            self.studies = {(v, p): self._open(v, p) for v in self.variants for p in PHASES}
            if self.shared:
                self._check_heartbeat()
            self.uid = self._uid()

    def lock(self):
        """Serializes this study's check-then-write steps across machines (SQLite: its file lock covers it)."""
        if not self.shared:
            return contextlib.nullcontext()
        return advisory_lock(self.storage.engine, f"harness study {self.study.name}")

    # --- opening ------------------------------------------------------------------------------------
    def _refuse_foreign(self) -> None:
        """UserError, before anything is written, when an Optuna study of one of this study's names was not made by
        the harness (or by another version of it: StudyIdentity.mismatch).

        A study without the harness's attributes is its own only when empty and minimizing: made just before a
        crash stopped its first attribute from being written. Optuna loads any study by name, whatever its
        direction, so a maximizing one would rank this study's perplexities backwards.
        """
        existing = set(optuna.get_all_study_names(self.storage))
        for variant in self.variants:
            for phase in PHASES:
                name = optuna_name(self.study, variant, phase)
                if name not in existing:
                    continue
                ostudy = optuna.load_study(study_name=name, storage=self.storage)
                unmarked_own = (not ostudy.user_attrs and not ostudy.get_trials(deepcopy=False)
                                and ostudy.directions == [optuna.study.StudyDirection.MINIMIZE])
                if not unmarked_own:
                    self._check_identity(ostudy)

    def _open(self, variant: str, phase: str) -> optuna.Study:
        """Create or load one Optuna study, with its identity recorded and its search budget in the queue."""
        ostudy = optuna.create_study(
            storage=self.storage, study_name=optuna_name(self.study, variant, phase), direction="minimize",
            load_if_exists=True, pruner=make_pruner(self.study) if phase == SEARCH else None,
            sampler=optuna.samplers.RandomSampler(seed=0),  # replaced per claim: see make_sampler
        )
        if "study_digest" not in ostudy.user_attrs:
            for key, value in {**self.identity.as_attrs(), "variant": variant, "phase": phase}.items():
                ostudy.set_user_attr(key, value)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                ostudy.set_metric_names([OBJECTIVE])  # optuna-dashboard and the CLI show val_ppl, not "value"
            if phase == SEARCH and rules.search_space(self.study, variant):
                ostudy.enqueue_trial(default_params(self.study, variant),
                                     user_attrs={"origin": "paper rates"})
        else:
            self._check_identity(ostudy)
        if phase == SEARCH:
            # The rest of the budget waits with no parameters: the sampler draws them when a trial is claimed.
            # Topping up, not enqueueing once, also restores a retry lost to a crash between failing and
            # enqueueing it.
            tally = Tally.of(trial_kind(t) for t in ostudy.get_trials(deepcopy=False))
            for _ in range(trials_for(self.study, variant) - tally.settled - tally.running - tally.waiting):
                ostudy.enqueue_trial({})  # attempt 1: a trial without "attempt" is on its first
        return ostudy

    def _uid(self) -> str:
        """This study's id in this storage, made once. Its checkpoint folder records it: trial numbers restart at
        0 in every storage, so one folder used with two storages would mix their trials' checkpoints."""
        ostudy = self.studies[(self.variants[0], SEARCH)]
        uid = ostudy.user_attrs.get("study_uid")
        if uid is None:
            uid = uuid.uuid4().hex
            ostudy.set_user_attr("study_uid", uid)
        return uid

    def _check_heartbeat(self) -> None:
        # A machine beating more often than the others would judge their healthy trials stale.
        ostudy = self.studies[(self.variants[0], SEARCH)]
        recorded = ostudy.user_attrs.get("heartbeat_seconds")
        if recorded is None:
            ostudy.set_user_attr("heartbeat_seconds", self.heartbeat.interval)
        elif recorded != self.heartbeat.interval:
            raise UserError(f"--heartbeat {self.heartbeat.interval}: the machines on this study beat every {recorded} "
                            f"s; pass --heartbeat {recorded}")

    def after_outage(self) -> None:
        # Every machine's heartbeats were blocked too: let them beat again before judging any trial stale.
        self.no_verdicts_until = time.monotonic() + (self.heartbeat.grace or 0)

    # --- taking work ----------------------------------------------------------------------------------
    @patient
    def claim(self, variant: str, phase: str) -> Claim | None:
        """Take the next waiting trial of one variant and phase and draw its open parameters; None when none waits.

        Never a fresh trial (Study.ask makes one when another machine took the last waiting trial first), so the
        budget in the queue is never exceeded. The trial beats before it is taken: a coordinator that dies right
        after leaves a trial that goes stale instead of one that runs forever.
        """
        ostudy = self.studies[(variant, phase)]
        study_id = self.storage.get_study_id_from_name(ostudy.study_name)
        for waiting in self._trials(variant, phase, (TrialState.WAITING,)):
            trial_id = self.storage.get_trial_id_from_study_id_trial_number(study_id, waiting.number)
            self.heartbeat.beat(trial_id)
            try:
                if not self.storage.set_trial_state_values(trial_id, state=TrialState.RUNNING):
                    continue  # another coordinator took it
            except UpdateFinishedTrialError:
                continue
            ostudy.sampler = make_sampler(self.study, variant, waiting.number)
            trial = optuna.Trial(ostudy, trial_id)
            # Every phase suggests the variant's space: a confirmation trial's enqueued (best) values are taken
            # as they are, and recorded as its params, so Optuna shows what each confirmation run trained.
            for param, distribution in distributions(self.study, variant).items():
                trial.suggest_float(param, distribution.low, distribution.high, log=distribution.log)
            attrs = waiting.user_attrs
            self.heartbeat.add(trial_id)
            return Claim(variant, phase, waiting.number, trial_id, dict(trial.params), attrs.get("seed"),
                         int(attrs.get("attempt", 1)), attrs.get("retry_of"), trial,
                         tuple(attrs.get("lineage", ())), attrs.get("continues_run"))
        return None

    @patient
    def annotate(self, claim: Claim, attrs: dict) -> None:
        """Record facts about a running trial (its device, coordinator, MLflow run)."""
        for key, value in attrs.items():
            self.storage.set_trial_user_attr(claim.trial_id, key, value)

    # --- what happened ------------------------------------------------------------------------------
    @patient
    def restore_epochs(self, claim: Claim, values: dict) -> None:
        """A retry that continues its earlier attempt's checkpoint: record the epochs it restored (epoch -> validation
        perplexity) as its own, so the pruner judges it as the uninterrupted trial and the dashboard draws one curve.

        Not judged: the earlier attempt went on after each of them.
        """
        if claim.phase != SEARCH:
            return
        done = self.storage.get_trial(claim.trial_id).intermediate_values
        for epoch, val_ppl in sorted(values.items()):
            if epoch not in done:  # a call repeated after a dropped connection
                claim.trial.report(val_ppl, epoch)

    @patient
    def report_epoch(self, claim: Claim, epoch: int, val_ppl: float) -> bool:
        """Record one epoch's validation perplexity (step = epoch); True while the run should go on.

        Only search trials are pruned. Raises TrialLost when another machine has failed the trial as stale.
        """
        if claim.phase != SEARCH:
            return True
        try:
            claim.trial.report(val_ppl, epoch)
        except UpdateFinishedTrialError:
            raise TrialLost(claim.key) from None
        return not claim.trial.should_prune()

    @patient
    def finish(self, claim: Claim, value: float, attrs: dict) -> bool:
        """Record a finished run's best validation perplexity; False when the trial was lost (see TrialLost)."""
        return self._tell(claim, TrialState.COMPLETE, value, attrs)

    @patient
    def prune(self, claim: Claim) -> bool:
        """Record a pruned search trial (it never counts as finished); False when the trial was lost."""
        return self._tell(claim, TrialState.PRUNED, None, {})

    def _tell(self, claim: Claim, state: TrialState, value: float | None, attrs: dict) -> bool:
        self.heartbeat.discard(claim.trial_id)
        frozen = self.storage.get_trial(claim.trial_id)
        if frozen.state.is_finished():
            # Our own earlier tell, whose reply a dropped connection lost, or another machine's stale verdict.
            return frozen.state == state and (value is None or frozen.value == value)
        ostudy = self.studies[(claim.variant, claim.phase)]
        try:
            for key, attr in attrs.items():
                self.storage.set_trial_user_attr(claim.trial_id, key, attr)
            ostudy.tell(claim.number, value, state=state)
        except (UpdateFinishedTrialError, ValueError):  # ValueError: tell() of a trial finished meanwhile
            return False
        return True

    @patient
    def fail(self, claim: Claim, reason: str, *, interrupted: bool = False) -> bool | None:
        """Fail a claimed trial with its reason and enqueue its retry while attempts remain.

        An interruption (Ctrl-C, SIGTERM) is not the trial's fault: it is always retried and uses no attempt.
        Returns whether it will be retried, or None when the trial had already ended (another machine failed it).
        """
        self.heartbeat.discard(claim.trial_id)
        with self.lock():
            return self._fail(claim.variant, claim.phase, claim.trial_id, reason, interrupted)

    def _fail(self, variant: str, phase: str, trial_id: int, reason: str, interrupted: bool) -> bool | None:
        frozen = self.storage.get_trial(trial_id)
        if frozen.state.is_finished():
            return None
        attempt = int(frozen.user_attrs.get("attempt", 1))
        retry, next_attempt = rules.retry_decision(attempt, self.study.budget.max_retries, interrupted)
        try:
            # The decision is recorded before the state changes, so the tally never has to guess it.
            self.storage.set_trial_user_attr(trial_id, "fail_reason", reason[-2000:])
            self.storage.set_trial_user_attr(trial_id, "retried", retry)
            self.storage.set_trial_user_attr(trial_id, "interrupted", interrupted)
            if not self.storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                return None
        except UpdateFinishedTrialError:
            return None
        if retry:
            attrs = {k: v for k, v in frozen.user_attrs.items() if k not in _PER_ATTEMPT_ATTRS}
            # The retry continues this attempt: its checkpoint folder (and, failing that, its predecessors') and
            # its MLflow run; an attempt that died before making its own passes on, in attrs, the run it continued.
            lineage = [frozen.number, *frozen.user_attrs.get("lineage", ())]
            run = frozen.user_attrs.get("mlflow_run_id")
            self.studies[(variant, phase)].enqueue_trial(
                dict(frozen.params),
                user_attrs={**attrs, "attempt": next_attempt, "retry_of": frozen.number, "lineage": lineage,
                            **({"continues_run": run} if run else {})})
        return retry

    @patient
    def sweep(self, running_here: set[int]) -> list[Swept]:
        """Fail and retry the trials no coordinator runs any more; returns those failed here.

        On SQLite this coordinator is the only one (a file lock keeps others out), so every running trial not in
        `running_here` (trial ids) was interrupted: retried without using an attempt. On PostgreSQL a trial
        belongs to another machine until its heartbeats stop; a stale one uses an attempt (its machine died,
        which may be the trial's doing, e.g. running out of memory).
        """
        if time.monotonic() < self.no_verdicts_until:
            return []
        self.heartbeat.beat_all()  # ours are fresh even if the heartbeat thread could not beat for a while
        swept = []
        for (variant, phase), ostudy in self.studies.items():
            study_id = self.storage.get_study_id_from_name(ostudy.study_name)
            with self.lock():
                if self.shared:
                    # Private: Optuna's public fail_stale_trials fails trials before the reason and the retry
                    # decision can be recorded on them (a finished trial's attributes are frozen).
                    orphans = self.storage._get_stale_trial_ids(study_id)
                    reason = f"stale: no heartbeat for {self.heartbeat.grace} s; the machine or coordinator " \
                             "running it stopped"
                else:
                    orphans = [self.storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
                               for t in self._trials(variant, phase, (TrialState.RUNNING,))]
                    orphans = [i for i in orphans if i not in running_here]
                    reason = "interrupted: the coordinator stopped while it ran"
                for trial_id in orphans:
                    frozen = self.storage.get_trial(trial_id)
                    retried = self._fail(variant, phase, trial_id, reason, interrupted=not self.shared)
                    if retried is not None:
                        swept.append(Swept(variant, phase, frozen.number,
                                           frozen.user_attrs.get("coordinator", "an unknown coordinator"), retried))
        return swept

    # --- the confirmation -------------------------------------------------------------------------------
    @patient
    def enqueue_confirmation(self, variant: str) -> tuple[dict, float, int] | None:
        """Once the variant's search has settled: enqueue its best parameters once per confirmation seed.

        Returns the best search trial (params, value, number) when this call enqueued them, else None.
        """
        if not self.study.budget.confirm_seeds or not self.search_settled(variant):
            return None
        with self.lock():
            if self._trials(variant, CONFIRM):
                return None  # enqueued before, here or on another machine
            best = self.best(variant)
            if best is None:
                return None
            params, value, number = best
            for seed in self.study.budget.confirm_seeds:
                self.studies[(variant, CONFIRM)].enqueue_trial(params, user_attrs={
                    "seed": seed, "search_best_val_ppl": value, "search_trial": number})
        return best

