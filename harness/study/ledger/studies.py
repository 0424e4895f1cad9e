"""What a ledger reads back from Optuna: a study's trials per variant and phase, their tally, the best search trial,
and what is settled or still due (the rules themselves are harness.study.rules'). Base of the writer and the reader.
"""

import math
from dataclasses import dataclass

import optuna
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from harness.errors import UserError
from harness.study import rules
from harness.study.ledger.storage import Patient, patient, storage_url
from harness.study.rules import CONFIRM, PHASES, SEARCH, RunState, Tally, optuna_name, trials_for
from harness.study.spec import StudyConfig, StudyIdentity
from harness.study.stores import redact

_KIND = {TrialState.COMPLETE: "finished", TrialState.PRUNED: "pruned", TrialState.RUNNING: "running",
         TrialState.WAITING: "waiting"}


def trial_kind(trial: FrozenTrial) -> str:
    """How a trial counts in a Tally (a failed one by the retry decision recorded on it)."""
    if trial.state == TrialState.FAIL:
        return rules.failure_kind(bool(trial.user_attrs.get("retried")), bool(trial.user_attrs.get("interrupted")))
    return _KIND[trial.state]


def study_names(storage: BaseStorage) -> set[str]:
    """The names of every Optuna study the storage holds."""
    return set(optuna.get_all_study_names(storage))


def holds_study(storage: BaseStorage, study: StudyConfig) -> bool:
    """Whether the storage holds any Optuna study of this study (any variant, any phase)."""
    names = set(optuna.get_all_study_names(storage))
    return any(optuna_name(study, v, p) in names for v in study.variants for p in PHASES)


@dataclass(frozen=True)
class SearchTrial:
    """A finished or pruned search trial, for the report."""

    variant: str
    number: int
    state: RunState  # FINISHED or PRUNED
    value: float | None  # best validation perplexity; None when pruned
    best_seen: float | None  # the value, or a pruned trial's lowest reported perplexity
    params: dict


class StudyTrials(Patient):
    """The Optuna studies of one study in one storage (`studies`: (variant, phase) -> optuna.Study, filled by the
    subclass), read through the study's rules; every read waits out a storage outage."""

    def __init__(self, study: StudyConfig, storage: BaseStorage, identity: StudyIdentity, log):
        super().__init__(storage, log)
        self.study, self.identity = study, identity
        self.variants = list(study.variants)
        self.studies: dict[tuple[str, str], optuna.Study] = {}

    def _load(self, variant: str, phase: str) -> optuna.Study:
        ostudy = optuna.load_study(study_name=optuna_name(self.study, variant, phase), storage=self.storage)
        self._check_identity(ostudy)
        return ostudy

    def _check_identity(self, ostudy: optuna.Study) -> None:
        problem = self.identity.mismatch(ostudy.user_attrs)
        if problem:
            where = redact(storage_url(self.storage))
            raise UserError(f"{problem} (the Optuna study {ostudy.study_name!r} in {where})")

    def _trials(self, variant: str, phase: str, states=None) -> list[FrozenTrial]:
        ostudy = self.studies.get((variant, phase))
        return ostudy.get_trials(deepcopy=False, states=states) if ostudy is not None else []

    def has(self, variant: str, phase: str) -> bool:
        """Whether the storage holds the Optuna study of this variant and phase."""
        return (variant, phase) in self.studies

    @patient
    def tally(self, variant: str, phase: str) -> Tally:
        """Trials of one variant and phase by state."""
        return Tally.of(trial_kind(t) for t in self._trials(variant, phase))

    @patient
    def waiting(self, variant: str, phase: str) -> int:
        """Trials of one variant and phase waiting in the queue."""
        return len(self._trials(variant, phase, (TrialState.WAITING,)))

    @patient
    def best(self, variant: str) -> tuple[dict, float, int] | None:
        """Parameters, value and number of the variant's best finished (never pruned) search trial; a value that is
        no measurement (an inf recorded by an older harness) is never best."""
        done = [t for t in self._trials(variant, SEARCH, (TrialState.COMPLETE,)) if rules.measured(t.value)]
        if not done:
            return None
        best = min(done, key=lambda t: (t.value, t.number))
        return dict(best.params), best.value, best.number

    @patient
    def confirmation_results(self, variant: str) -> dict:
        """Confirmation seed -> test perplexity of the variant's finished confirmation runs."""
        return {t.user_attrs["seed"]: t.user_attrs["test_ppl"]
                for t in self._trials(variant, CONFIRM, (TrialState.COMPLETE,))
                if rules.measured(t.user_attrs.get("test_ppl"))}

    @patient
    def search_trials(self, variant: str) -> list[SearchTrial]:
        """The variant's finished and pruned search trials, in trial order."""
        out = []
        for t in self._trials(variant, SEARCH, (TrialState.COMPLETE, TrialState.PRUNED)):
            value = t.value if t.state == TrialState.COMPLETE else None
            seen = [v for v in t.intermediate_values.values() if math.isfinite(v)]
            out.append(SearchTrial(variant, t.number, RunState.FINISHED if value is not None else RunState.PRUNED,
                                   value, value if value is not None else min(seen, default=None), dict(t.params)))
        return out

    def search_settled(self, variant: str) -> bool:
        """Every search trial of the budget has settled and none runs or waits (rules.search_settled)."""
        return rules.search_settled(self.tally(variant, SEARCH), trials_for(self.study, variant))

    def confirmation_due(self, variant: str) -> int:
        """Confirmation runs the variant still owes (rules.confirmation_due)."""
        search, budget = self.tally(variant, SEARCH), trials_for(self.study, variant)
        confirm = self.tally(variant, CONFIRM) if rules.search_settled(search, budget) else Tally()  # else unread
        return rules.confirmation_due(search, confirm, budget, len(self.study.budget.confirm_seeds),
                                      has_best=search.finished > 0)

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

    def running(self) -> int:
        """Trials running on any machine."""
        return sum(self.tally(v, p).running for v in self.variants for p in PHASES)

    @patient
    def running_epochs(self, variant: str, phase: str) -> list[int]:
        """The epochs each running trial of one variant and phase has recorded, on any machine."""
        return [max(t.intermediate_values, default=0) for t in self._trials(variant, phase, (TrialState.RUNNING,))]

    def started(self) -> bool:
        """Whether any trial has run (or runs) on any machine: the study is resumed or shared, not new."""
        return any((t := self.tally(v, p)).total > t.waiting for v in self.variants for p in PHASES)

    @patient
    def to_start(self, variant: str, phase: str) -> list[int]:
        """The runs of one variant and phase still to start, on any machine, each as the epochs it will not train:
        a waiting retry continues after the last epoch its newest earlier attempt recorded (that attempt's
        checkpoint), any other run starts at epoch 1 (0)."""
        trials = self._trials(variant, phase)
        by_number = {t.number: t for t in trials}
        kept = []
        for t in trials:
            if t.state == TrialState.WAITING:
                earlier = [by_number[n] for n in t.user_attrs.get("lineage", ()) if n in by_number]
                kept.append(next((max(e.intermediate_values) for e in earlier if e.intermediate_values), 0))
        if phase == CONFIRM:  # seeds not enqueued yet
            kept += [0] * (self.confirmation_due(variant) - len(kept) - self.tally(variant, CONFIRM).running)
        return kept
