"""The ledger of an ablation study: every rule about its state, and the only code that touches Optuna.

One Optuna study per variant and phase in one storage: `<study>/<variant>/search` tunes the variant's active
rates (the paper's values are its first trial) and `<study>/<variant>/confirm` retrains the best search
trial's parameters once per confirmation seed. The whole budget waits in Optuna's queue, and work is only
ever taken by claiming a waiting trial (an atomic WAITING -> RUNNING in the storage), so coordinators on
several machines never run more than the budget. Each rule lives in one method: the budget and its queue,
claiming, reporting epochs and the pruning verdict, finishing, failing and retrying (an interruption uses no
attempt), stale trials, enqueueing the confirmation, what counts as settled and complete, and patience while
the storage is away. Optuna's public API is used except where a line says why not.
"""

import contextlib
import dataclasses
import functools
import hashlib
import shlex
import threading
import time
import uuid
import warnings
from dataclasses import dataclass

import optuna
import sqlalchemy
from optuna.distributions import FloatDistribution
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import BaseStorage, RDBStorage
from optuna.trial import FrozenTrial, TrialState

from harness.config import SITES, StudyConfig, StudyIdentity
from harness.errors import UserError
from harness.stores import (
    HEARTBEAT, STALE_AFTER, advisory_lock, check_password, check_sqlite, engine_kwargs, error_reason, is_postgres,
    redact, scrub,
)

SEARCH, CONFIRM = "search", "confirm"
PHASES = (SEARCH, CONFIRM)
OBJECTIVE = "val_ppl"  # what every trial's value is: the best validation perplexity of its run
RECONNECT_SECONDS = 300  # how long the ledger keeps retrying a storage that went away before it gives up
# What a storage server that is down or restarting raises: the ledger waits and retries, never crashes.
STORAGE_ERRORS = (optuna.exceptions.StorageInternalError, sqlalchemy.exc.OperationalError,
                  sqlalchemy.exc.InterfaceError)
# Attributes of a failed trial that its retry must not inherit.
_PER_ATTEMPT_ATTRS = ("fail_reason", "retried", "interrupted", "mlflow_run_id", "coordinator", "device")


# --- the storage ----------------------------------------------------------------------------------------
def open_storage(url: str, heartbeat: int = HEARTBEAT) -> RDBStorage:
    """The Optuna storage at url: a local SQLite file, or a PostgreSQL database shared by machines (heartbeats on).

    Raises UserError for a storage that would not persist (in-memory SQLite), a file that is not an Optuna
    database, an unknown scheme, or a server that does not answer within seconds.
    """
    path = check_sqlite(url, "--storage")  # before Optuna adds its tables to a file that is not its own
    if path is not None:
        try:
            return RDBStorage(url)
        except sqlalchemy.exc.DatabaseError as err:
            # check_sqlite has read the file; what is left is e.g. a lock held past SQLite's busy timeout.
            raise UserError(f"--storage {url}: {path} cannot be opened as an Optuna database ({error_reason(err)}); "
                            "pass the --storage the study ran with, or a new file name") from None
    if not is_postgres(url):
        raise UserError(f"--storage {redact(url)}: use sqlite:///FILE (one machine) or "
                        "postgresql://USER@HOST:PORT/DB (shared by several machines)")
    if heartbeat < 1:
        raise UserError(f"--heartbeat {heartbeat}: must be at least 1 second")
    check_password(url, "--storage")
    try:
        probe = sqlalchemy.create_engine(url, **engine_kwargs())
        # Machines starting at once on an empty database would all create Optuna's tables: one does it.
        with advisory_lock(probe, "optuna tables"), warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat_interval
            storage = RDBStorage(url, engine_kwargs=engine_kwargs(), heartbeat_interval=heartbeat,
                                 grace_period=STALE_AFTER * heartbeat)
        probe.dispose()
    except (*STORAGE_ERRORS, sqlalchemy.exc.ArgumentError, ValueError) as err:
        raise UserError(
            f"cannot reach the Optuna storage {redact(url)} ({scrub(error_reason(err), url)}); start PostgreSQL there "
            "or fix --storage (host, port, database, user; the password in the URL or in PGPASSWORD)"
        ) from None
    return storage


def check_storage(url: str) -> None:
    """Fail within seconds, naming the URL, when the storage cannot be opened."""
    storage = open_storage(url)
    storage.engine.dispose()


def dashboard_command(url: str) -> str:
    """How to browse this Optuna storage in optuna-dashboard."""
    make = "make dashboard" + ("" if url == "sqlite:///optuna.db" else f" STORAGE={shlex.quote(redact(url))}")
    return f"{make}  (or: optuna-dashboard {shlex.quote(redact(url))})"


def is_shared(storage: BaseStorage) -> bool:
    """Whether coordinators on other machines may use this storage too (PostgreSQL), or only this one (SQLite)."""
    return isinstance(storage, RDBStorage) and storage.engine.dialect.name == "postgresql"


class Heartbeat:
    """Records every interval that this coordinator still runs its trials (a no-op without heartbeats).

    A thread, so that a main loop busy with a slow server reply never misses a beat; a coordinator that dies
    stops beating, and the other machines fail and retry its trials once they are stale.
    """

    def __init__(self, storage: BaseStorage):
        self.storage = storage
        self.interval = storage.get_heartbeat_interval() if isinstance(storage, RDBStorage) else None
        self.grace = storage.grace_period if self.interval else None  # seconds without a beat: stale
        self.trial_ids: set[int] = set()
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def __enter__(self):
        if self.interval:
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopped.set()
        if self.thread.is_alive():
            self.thread.join()
        return False

    def beat(self, trial_id: int) -> None:
        """One heartbeat for the trial, now."""
        if self.interval:
            self.storage.record_heartbeat(trial_id)

    def beat_all(self) -> None:
        """One heartbeat for every trial this coordinator runs, now (before judging others' trials stale)."""
        with self.lock:
            trial_ids = list(self.trial_ids)
        for trial_id in trial_ids:
            self.beat(trial_id)

    def add(self, trial_id: int) -> None:
        with self.lock:
            self.trial_ids.add(trial_id)

    def discard(self, trial_id: int) -> None:
        with self.lock:
            self.trial_ids.discard(trial_id)

    def _run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                self.beat_all()
            except STORAGE_ERRORS:
                pass  # the server is away; the ledger says so, and the next beat tries again


# --- the records --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tally:
    """Trials of one variant and phase by state; a trial that failed and was retried is counted apart."""

    finished: int = 0
    pruned: int = 0
    failed: int = 0  # failed for good: its attempts are used up
    retried: int = 0  # failed, used an attempt, and was enqueued again with the same parameters
    interrupted: int = 0  # stopped by Ctrl-C, SIGTERM or a coordinator that died: retried, no attempt used
    running: int = 0
    waiting: int = 0

    @property
    def settled(self) -> int:
        """Trials that used up budget: finished, pruned, or failed for good."""
        return self.finished + self.pruned + self.failed

    @property
    def attempts(self) -> int:
        """Runs that ended and counted: settled ones and failures that were retried."""
        return self.settled + self.retried


def tally_trials(trials) -> Tally:
    """The Tally of a list of FrozenTrials (the one rule for what each state counts as)."""
    counts = {f.name: 0 for f in dataclasses.fields(Tally)}
    for t in trials:
        if t.state == TrialState.COMPLETE:
            counts["finished"] += 1
        elif t.state == TrialState.PRUNED:
            counts["pruned"] += 1
        elif t.state == TrialState.FAIL:
            key = "failed"
            if t.user_attrs.get("retried"):
                key = "interrupted" if t.user_attrs.get("interrupted") else "retried"
            counts[key] += 1
        elif t.state == TrialState.RUNNING:
            counts["running"] += 1
        elif t.state == TrialState.WAITING:
            counts["waiting"] += 1
    return Tally(**counts)


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
    trial: optuna.Trial = dataclasses.field(repr=False, compare=False)

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


@dataclass(frozen=True)
class SearchTrial:
    """A finished or pruned search trial, for the report."""

    variant: str
    number: int
    state: str  # "finished" or "pruned"
    value: float | None  # best validation perplexity; None when pruned
    best_seen: float | None  # the value, or a pruned trial's lowest reported perplexity
    params: dict


class TrialLost(Exception):
    """Another machine failed this trial as stale while it ran here: its retry counts, not this run."""


# --- the search's parts ---------------------------------------------------------------------------------
def optuna_name(study: StudyConfig, variant: str, phase: str) -> str:
    """Name of the Optuna study of one variant and phase."""
    return f"{study.name}/{variant}/{phase}"


def search_space(study: StudyConfig, variant: str) -> dict:
    """Distributions of the variant's searched parameters, named like the config keys they set."""
    arm = study.variants[variant]
    space = {
        f"dropout.{site}": FloatDistribution(rng.low, rng.high)  # rates are searched on a linear scale
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


def holds_study(storage: BaseStorage, study: StudyConfig) -> bool:
    """Whether the storage holds any Optuna study of this study (any variant, any phase)."""
    names = set(optuna.get_all_study_names(storage))
    return any(optuna_name(study, v, p) in names for v in study.variants for p in PHASES)


# --- the ledger -----------------------------------------------------------------------------------------
def _patient(method):
    """Run a ledger method, retrying it while the storage is away, for up to RECONNECT_SECONDS."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        delay = 1.0
        while True:
            try:
                result = method(self, *args, **kwargs)
            except STORAGE_ERRORS as err:
                self._outage(err)
                time.sleep(delay)
                delay = min(2 * delay, 10.0)
                continue
            self._reconnected()
            return result

    return wrapper


class Ledger:
    """The Optuna side of one study on one storage: opened (and its budget enqueued) once per coordinator.

    `identity` is checked against what the storage recorded when the study started (the study file's digest
    and the corpus's MD5s); a mismatch is a UserError naming what changed. `create=False` opens a study that
    must already exist (the report).
    """

    def __init__(self, study: StudyConfig, storage: BaseStorage, identity: StudyIdentity, *, log=print,
                 create: bool = True):
        self.study, self.storage, self.identity, self.log = study, storage, identity, log
        self.shared = is_shared(storage)
        self.heartbeat = Heartbeat(storage)
        self.variants = list(study.variants)
        self.outage_since: float | None = None
        self.no_verdicts_until = 0.0
        if not create:
            if not holds_study(storage, study):
                raise UserError(f"{redact(self._url())} holds no Optuna study of {study.name!r}")
            names = set(optuna.get_all_study_names(storage))
            self.studies = {(v, p): self._load(v, p) for v in self.variants for p in PHASES
                            if optuna_name(study, v, p) in names}
            return
        with self.lock():
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
    def _load(self, variant: str, phase: str) -> optuna.Study:
        ostudy = optuna.load_study(study_name=optuna_name(self.study, variant, phase), storage=self.storage)
        self._check_identity(ostudy)
        return ostudy

    def _check_identity(self, ostudy: optuna.Study) -> None:
        problem = self.identity.mismatch(ostudy.user_attrs)
        if problem:
            raise UserError(f"{problem} (the Optuna study {ostudy.study_name!r} in {redact(self._url())})")

    def _url(self) -> str:
        return getattr(self.storage, "url", type(self.storage).__name__)

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
            if phase == SEARCH and search_space(self.study, variant):
                ostudy.enqueue_trial(default_params(self.study, variant),
                                     user_attrs={"origin": "paper rates"})
        else:
            self._check_identity(ostudy)
        if phase == SEARCH:
            # The rest of the budget waits with no parameters: the sampler draws them when a trial is claimed.
            # Topping up, not enqueueing once, also restores a retry lost to a crash between failing and
            # enqueueing it.
            tally = tally_trials(ostudy.get_trials(deepcopy=False))
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

    # --- patience while the storage is away ---------------------------------------------------------
    def _outage(self, err: Exception) -> None:
        """Note that the storage is away; give up once it has been for RECONNECT_SECONDS."""
        now = time.monotonic()
        if self.outage_since is None:
            self.outage_since = now
            self.log(f"the Optuna storage {redact(self._url())} does not answer ({type(err).__name__}); "
                     f"retrying for up to {RECONNECT_SECONDS} s")
        elif now - self.outage_since > RECONNECT_SECONDS:
            raise UserError(
                f"the Optuna storage {redact(self._url())} did not answer for {RECONNECT_SECONDS} s; the trials "
                "running here will be retried by the other machines, or when this command is run again"
            ) from None

    def _reconnected(self) -> None:
        if self.outage_since is None:
            return
        self.log(f"the Optuna storage answers again after {time.monotonic() - self.outage_since:.0f} s")
        self.outage_since = None
        # Every machine's heartbeats were blocked too: let them beat again before judging any trial stale.
        self.no_verdicts_until = time.monotonic() + (self.heartbeat.grace or 0)

    # --- the state ------------------------------------------------------------------------------------
    def _trials(self, variant: str, phase: str, states=None) -> list[FrozenTrial]:
        ostudy = self.studies.get((variant, phase))
        return ostudy.get_trials(deepcopy=False, states=states) if ostudy is not None else []

    @_patient
    def tally(self, variant: str, phase: str) -> Tally:
        """Trials of one variant and phase by state."""
        return tally_trials(self._trials(variant, phase))

    @_patient
    def best(self, variant: str) -> tuple[dict, float, int] | None:
        """Parameters, value and number of the variant's best finished (never pruned) search trial."""
        done = self._trials(variant, SEARCH, (TrialState.COMPLETE,))
        if not done:
            return None
        best = min(done, key=lambda t: (t.value, t.number))
        return dict(best.params), best.value, best.number

    def search_settled(self, variant: str) -> bool:
        """Every search trial of the budget has settled and none runs or waits."""
        tally = self.tally(variant, SEARCH)
        return tally.settled >= trials_for(self.study, variant) and not tally.running and not tally.waiting

    def confirmation_due(self, variant: str) -> int:
        """Confirmation runs the variant still owes: its seeds once its search has a finished trial, else 0."""
        if not self.study.budget.confirm_seeds:
            return 0
        if not self.search_settled(variant):
            return len(self.study.budget.confirm_seeds)
        tally = self.tally(variant, CONFIRM)
        if tally.settled + tally.retried + tally.interrupted + tally.running + tally.waiting == 0:  # not enqueued yet
            return len(self.study.budget.confirm_seeds) if self.best(variant) else 0
        return tally.waiting + tally.running

    def variant_settled(self, variant: str) -> bool:
        """Search settled and every confirmation seed settled (or nothing could be confirmed)."""
        return self.search_settled(variant) and self.confirmation_due(variant) == 0

    def complete(self) -> bool:
        """Nothing waits or runs anywhere and nothing is left to enqueue."""
        return all(self.variant_settled(v) for v in self.variants)

    def remaining(self) -> int:
        """Trials still to start, on any machine."""
        return sum(self.tally(v, SEARCH).waiting + self.confirmation_due(v) - self.tally(v, CONFIRM).running
                   for v in self.variants)

    # --- taking work ----------------------------------------------------------------------------------
    @_patient
    def waiting(self, variant: str, phase: str) -> int:
        """Trials of one variant and phase waiting in the queue."""
        return len(self._trials(variant, phase, (TrialState.WAITING,)))

    @_patient
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
            for param, distribution in search_space(self.study, variant).items():
                trial.suggest_float(param, distribution.low, distribution.high, log=distribution.log)
            attrs = waiting.user_attrs
            self.heartbeat.add(trial_id)
            return Claim(variant, phase, waiting.number, trial_id, dict(trial.params), attrs.get("seed"),
                         int(attrs.get("attempt", 1)), attrs.get("retry_of"), trial)
        return None

    @_patient
    def annotate(self, claim: Claim, attrs: dict) -> None:
        """Record facts about a running trial (its device, coordinator, MLflow run)."""
        for key, value in attrs.items():
            self.storage.set_trial_user_attr(claim.trial_id, key, value)

    # --- what happened ------------------------------------------------------------------------------
    @_patient
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

    @_patient
    def finish(self, claim: Claim, value: float, attrs: dict) -> bool:
        """Record a finished run's best validation perplexity; False when the trial was lost (see TrialLost)."""
        return self._tell(claim, TrialState.COMPLETE, value, attrs)

    @_patient
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

    @_patient
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
        retry = interrupted or attempt <= self.study.budget.max_retries
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
            self.studies[(variant, phase)].enqueue_trial(
                dict(frozen.params),
                user_attrs={**attrs, "attempt": attempt + (not interrupted), "retry_of": frozen.number})
        return retry

    @_patient
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
    @_patient
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

    # --- reading, for the report --------------------------------------------------------------------
    @_patient
    def search_trials(self, variant: str) -> list[SearchTrial]:
        """The variant's finished and pruned search trials, in trial order."""
        out = []
        for t in self._trials(variant, SEARCH, (TrialState.COMPLETE, TrialState.PRUNED)):
            value = t.value if t.state == TrialState.COMPLETE else None
            seen = [v for v in t.intermediate_values.values() if v == v and v != float("inf")]
            out.append(SearchTrial(variant, t.number, "finished" if value is not None else "pruned", value,
                                   value if value is not None else min(seen, default=None), dict(t.params)))
        return out

    @_patient
    def importances(self, variant: str, min_trials: int) -> dict | str:
        """Seeded fANOVA importances of the variant's searched parameters, or a sentence saying why there are none."""
        if not search_space(self.study, variant):
            return "nothing is searched in this variant."
        finished = self._trials(variant, SEARCH, (TrialState.COMPLETE,))
        if len(finished) < min_trials:
            return (f"{len(finished)} finished search trial{'s' * (len(finished) != 1)}: too few for parameter "
                    f"importances (they need at least {min_trials}).")
        if all(t.params == finished[0].params for t in finished):
            return "every finished search trial used the same values, so no parameter can explain a difference."
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        importances = optuna.importance.get_param_importances(self.studies[(variant, SEARCH)], evaluator=evaluator)
        return {k: float(v) for k, v in importances.items()}

    @_patient
    def confirmation_results(self, variant: str) -> dict:
        """Confirmation seed -> test perplexity of the variant's finished confirmation runs."""
        return {t.user_attrs["seed"]: t.user_attrs["test_ppl"]
                for t in self._trials(variant, CONFIRM, (TrialState.COMPLETE,)) if "test_ppl" in t.user_attrs}

    def has(self, variant: str, phase: str) -> bool:
        """Whether the storage holds the Optuna study of this variant and phase."""
        return (variant, phase) in self.studies

