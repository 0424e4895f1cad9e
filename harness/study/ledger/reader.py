"""The report's read-only view of a study's Optuna trials: the searches' finished and pruned trials, parameter
importances, and the tallies; it opens only studies that exist and writes nothing.
"""


import optuna
from optuna.storages import BaseStorage
from optuna.trial import TrialState

from harness.errors import UserError
from harness.study import rules
from harness.study.ledger.storage import patient, storage_url
from harness.study.ledger.studies import StudyTrials, holds_study
from harness.study.rules import PHASES, SEARCH, optuna_name
from harness.study.spec import StudyConfig, StudyIdentity
from harness.study.stores import redact


class LedgerReader(StudyTrials):
    """The Optuna studies of one study that a storage holds (UserError when it holds none), read-only."""

    def __init__(self, study: StudyConfig, storage: BaseStorage, identity: StudyIdentity, *, log=print):
        super().__init__(study, storage, identity, log)
        if not holds_study(storage, study):
            raise UserError(f"{redact(storage_url(storage))} holds no Optuna study of {study.name!r}")
        names = set(optuna.get_all_study_names(storage))
        self.studies = {(v, p): self._load(v, p) for v in self.variants for p in PHASES
                        if optuna_name(study, v, p) in names}

    @patient
    def importances(self, variant: str, min_trials: int) -> dict | str:
        """Seeded fANOVA importances of the variant's searched parameters, or a sentence saying why there are none."""
        if not rules.search_space(self.study, variant):
            return "nothing is searched in this variant."
        finished = self._trials(variant, SEARCH, (TrialState.COMPLETE,))
        if len(finished) < min_trials:
            return (f"{len(finished)} finished search trial{'s' * (len(finished) != 1)}: too few for parameter "
                    f"importances (they need at least {min_trials}).")
        if all(t.params == finished[0].params for t in finished):
            return "every finished search trial used the same values, so no parameter can explain a difference."
        if len({t.value for t in finished}) == 1:  # fANOVA raises "zero total variance" on it
            return (f"every finished search trial gave the same validation perplexity ({finished[0].value:.2f}), so "
                    "there is no variance for a parameter to explain.")
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        try:
            importances = optuna.importance.get_param_importances(self.studies[(variant, SEARCH)],
                                                                  evaluator=evaluator)
        except (RuntimeError, ValueError) as err:  # what optuna raises on trials it cannot fit a forest to
            return f"Optuna could not compute them from these trials ({err})."
        return {k: float(v) for k, v in importances.items()}
