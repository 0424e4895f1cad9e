"""The study file: one experiment's complete, reproducible record, validated before anything runs.

`[study]`, `[fixed.model|dropout|train]`, `[variants.NAME]`, `[search]` and `[budget]`; `load_study` reads and
checks it (every error names the file, the key path and the bad value) and `StudyConfig.run_config` resolves one
variant into the `RunConfig` a run trains with.
"""

import dataclasses
import hashlib
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from harness.config import (
    SEED_MAX, SITES, HIDDEN_MODES, DropoutConfig, ModelConfig, RunConfig, TrainConfig, build_record, dropout_rate,
    suggest, check_non_negative, check_numbers, check_positive, check_choice,
)
from harness.data import changed_splits
from harness.errors import UserError

METRICS = ("val_ppl",)
SAMPLERS = ("tpe", "qmc")
PRUNERS = ("median", "hyperband", "none")
# Every name that becomes a path, an MLflow filter string or HTML (study, variant) matches this.
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_name(name, what: str, source) -> str:
    """`name` if it is safe as a file name, inside an MLflow filter string and in HTML; else a UserError.

    `what` says where the name came from, e.g. "study.name =" or "the variant name".
    """
    if not isinstance(name, str) or not SAFE_NAME.match(name):
        raise UserError(
            f"{source}: {what} {name!r} is unsafe for file names, MLflow filters and HTML; "
            "use letters, digits, '_', '.', '-' (at most 64, starting with a letter or digit)"
        )
    return name


@dataclass(frozen=True)
class Variant:
    """One ablation arm: which dropout sites are on and how hidden-state masks are drawn."""

    name: str
    sites: frozenset
    hidden_mode: str = "locked"
    description: str = ""


_LOCKED = frozenset({"input", "hidden", "output"})
BUILTIN_VARIANTS = {
    v.name: v
    for v in (
        Variant("no_dropout", frozenset(), "locked", "no dropout anywhere"),
        Variant("naive", _LOCKED, "naive", "naive per-step dropout on input, hidden and output (the baseline)"),
        Variant("embedding_only", frozenset({"embedding"}), "locked", "embedding dropout alone"),
        Variant("locked_only", _LOCKED, "locked", "locked (variational) dropout on input, hidden and output"),
        Variant("weight_only", frozenset({"weight"}), "locked", "weight drop on W_hh alone"),
        Variant("awd", frozenset(SITES), "locked", "all three techniques (AWD-LSTM)"),
        Variant("awd_no_embedding", frozenset(SITES) - {"embedding"}, "locked", "AWD without embedding dropout"),
        Variant("awd_no_locked", frozenset({"embedding", "weight"}), "locked", "AWD without hidden-state dropout"),
        Variant("awd_no_weight", frozenset(SITES) - {"weight"}, "locked", "AWD without weight drop"),
        Variant("awd_naive", frozenset(SITES), "naive", "AWD with naive instead of locked masks"),
        Variant("awd_timestep", frozenset(SITES), "timestep", "AWD with the paper-era (T, 1, H) mask"),
        Variant("naive_recurrent", _LOCKED, "naive_recurrent",
                "naive per-step dropout, also on the recurrent h(t-1) path (the hidden rate)"),
    )
}


@dataclass(frozen=True)
class Range:
    """A closed search interval; `log` samples it on a log scale."""

    low: float
    high: float
    log: bool = False


@dataclass(frozen=True)
class SearchConfig:
    """Which nuisance parameters Optuna searches: the rates of a variant's active sites, optionally lr."""

    rates: dict = field(default_factory=dict)  # site -> Range
    lr: Range | None = None
    sampler: str = "tpe"
    seed: int = 0


@dataclass(frozen=True)
class BudgetConfig:
    """How much work a study may spend: the same for every variant, so the ablation is fair."""

    trials: int = 8
    epochs: int = 0  # 0 = fixed.train.epochs
    pruner: str = "median"
    warmup_epochs: int = 2  # no trial is pruned at epochs 1..warmup_epochs
    pruner_startup_trials: int = 2  # median pruner: finished trials it needs before it prunes any
    confirm_seeds: tuple = (1, 2, 3, 4, 5)
    max_retries: int = 2

    def __post_init__(self):
        check_numbers(self)
        check_positive(self, "trials")
        check_choice("pruner", self.pruner, PRUNERS)
        check_non_negative(self, "epochs", "warmup_epochs", "pruner_startup_trials", "max_retries")
        if len(set(self.confirm_seeds)) != len(self.confirm_seeds):
            raise ValueError(f"confirm_seeds = {list(self.confirm_seeds)!r} repeats a seed")


@dataclass(frozen=True)
class StudyIdentity:
    """What makes the runs of one study comparable: the study file's digest and the corpus files' MD5s.

    Recorded in Optuna and MLflow when a study starts; resuming it with either changed is refused.
    `corpus_files` (split -> file path, may be empty) only serves to name a changed file.
    """

    study_path: Path
    study_digest: str
    corpus_md5: dict = field(default_factory=dict)  # split -> MD5 hex; empty: not checked (e.g. the report)
    corpus_files: dict = field(default_factory=dict)

    def as_attrs(self) -> dict:
        """How Optuna user attributes and MLflow tags record it."""
        return {"study_digest": self.study_digest,
                "corpus_md5": ",".join(f"{split}={md5}" for split, md5 in sorted(self.corpus_md5.items()))}

    def mismatch(self, recorded: dict) -> str | None:
        """Why a study recorded as `recorded` (attrs or tags) is not this one, or None when it is."""
        digest = recorded.get("study_digest")
        if digest is not None and digest != self.study_digest:
            return (f"{self.study_path}: this study name was first run from a different version of the study file; "
                    "refusing to mix their results: to resume it, run the file it was made from (every MLflow run "
                    "holds it as study.toml); to start afresh, give this file a new study.name (or use new stores)")
        before = dict(pair.split("=", 1) for pair in str(recorded.get("corpus_md5") or "").split(",") if "=" in pair)
        changed = changed_splits(before, self.corpus_md5)
        if changed:
            files = ", ".join(f"{self.corpus_files.get(s, s)} (MD5 {before[s]} -> {self.corpus_md5[s]})"
                              for s in changed)
            return (f"{self.study_path}: the corpus changed since this study started: {files}; its trials would "
                    "compare runs on two datasets: restore the file, or give the study a new study.name (or use new "
                    "stores)")
        return None


@dataclass(frozen=True)
class StudyConfig:
    """A validated study file."""

    path: Path
    name: str
    corpus: str
    metric: str
    notes: str
    fixed: RunConfig  # variant "" : the settings every arm starts from
    variants: dict  # name -> Variant, in file order
    search: SearchConfig
    budget: BudgetConfig
    text: str  # the file as read, logged as an artifact

    @property
    def digest(self) -> str:
        """Content hash of the study file: resuming under one name with another file is refused."""
        return hashlib.sha256(self.text.encode()).hexdigest()[:16]

    @property
    def max_epochs(self) -> int:
        """Epochs of every run of the study, search and confirmation: budget.epochs, else fixed.train.epochs."""
        return self.budget.epochs or self.fixed.train.epochs

    def identity(self, corpus_md5: dict | None = None, corpus_files: dict | None = None) -> StudyIdentity:
        """This study's identity on a corpus (split -> MD5); without one, only the study file is checked."""
        return StudyIdentity(self.path, self.digest, dict(corpus_md5 or {}), dict(corpus_files or {}))

    def run_config(self, variant: str, overrides: dict | None = None) -> RunConfig:
        """The resolved config of one arm: inactive sites at 0, then `section.key` overrides."""
        if variant not in self.variants:
            raise UserError(
                f"{self.path}: unknown variant {variant!r}{suggest(variant, self.variants)}; "
                f"this study defines: {', '.join(self.variants)}"
            )
        arm = self.variants[variant]
        rates = {s: (getattr(self.fixed.dropout, s) if s in arm.sites else 0.0) for s in SITES}
        config = dataclasses.replace(
            self.fixed, variant=variant,
            dropout=DropoutConfig(**rates, hidden_mode=arm.hidden_mode),
        )
        overrides = overrides or {}
        for key, value in overrides.items():
            section, name = key.split(".", 1)
            if section == "dropout" and name in SITES and name not in arm.sites and value:
                raise UserError(
                    f"--set {key}={value}: variant {variant!r} keeps {name} dropout off "
                    f"(its sites: {', '.join(sorted(arm.sites)) or 'none'}); choose a variant that uses it"
                )
        try:
            return config.replace(overrides)
        except ValueError as err:
            raise UserError(f"--set: {err}") from None


def _table(parent, key, where, source) -> dict:
    """parent[key] as a table ({} when absent); a scalar or list there is a UserError naming the key."""
    table = parent.get(key, {})
    if not isinstance(table, dict):
        raise UserError(f"{source}: {where} = {table!r} should be a table: write [{where}] with its keys below it")
    return table


def _only_keys(table, allowed, where, source):
    for key in table:
        if key not in allowed:
            raise UserError(
                f"{source}: unknown key '{where}.{key}'{suggest(key, allowed)}; known keys: {', '.join(allowed)}"
            )


def _parse_variants(table, source) -> dict:
    if not table:
        raise UserError(f"{source}: no [variants.NAME] table; add at least one, e.g. [variants.awd]")
    variants, folded = {}, {}
    for name, spec in table.items():
        where = f"variants.{name}"
        check_name(name, "the variant name", source)
        if name.lower() in folded:  # one checkpoint folder on a case-insensitive file system
            raise UserError(f"{source}: [{where}] and [variants.{folded[name.lower()]}] differ only in case; "
                            "rename one of them")
        folded[name.lower()] = name
        spec = _table(table, name, where, source)
        _only_keys(spec, ("sites", "hidden_mode", "description"), where, source)
        base = BUILTIN_VARIANTS.get(name)
        if base is None and ("sites" not in spec or "hidden_mode" not in spec):
            raise UserError(
                f"{source}: [{where}] is not a built-in variant{suggest(name, BUILTIN_VARIANTS)}; "
                f"give it `sites` and `hidden_mode`, or use one of: {', '.join(BUILTIN_VARIANTS)}"
            )
        sites = spec.get("sites", sorted(base.sites) if base else [])
        if not isinstance(sites, list) or any(s not in SITES for s in sites):
            raise UserError(f"{source}: {where}.sites = {sites!r}: each site must be one of {', '.join(SITES)}")
        mode = spec.get("hidden_mode", base.hidden_mode if base else "locked")
        if mode not in HIDDEN_MODES:
            raise UserError(f"{source}: {where}.hidden_mode = {mode!r} is not one of {', '.join(HIDDEN_MODES)}")
        description = spec.get("description", base.description if base else "")
        if not isinstance(description, str):
            raise UserError(f"{source}: {where}.description = {description!r} should be a string")
        variants[name] = Variant(name, frozenset(sites), mode, description)
    return variants


def _parse_range(value, key, source, *, log=False) -> Range:
    if (not isinstance(value, list) or len(value) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        raise UserError(f"{source}: {key} = {value!r} should be [low, high]")
    if not all(math.isfinite(v) for v in value):
        raise UserError(f"{source}: {key} = {value!r}: both ends must be finite numbers")
    low, high = float(value[0]), float(value[1])
    if low >= high:
        raise UserError(f"{source}: {key} = {value!r} is inverted or empty; write [low, high] with low < high")
    if log and low <= 0:
        raise UserError(f"{source}: {key} = {value!r} is searched on a log scale; low must be > 0")
    return Range(low, high, log)


def _parse_search(table, source) -> SearchConfig:
    _only_keys(table, (*SITES, "lr", "sampler", "seed"), "search", source)
    rates = {}
    for site in SITES:
        if site in table:
            rng = _parse_range(table[site], f"search.{site}", source)
            try:
                dropout_rate(f"search.{site}", rng.low), dropout_rate(f"search.{site}", rng.high)
            except ValueError as error:
                raise UserError(f"{source}: {error}") from None
            rates[site] = rng
    lr = _parse_range(table["lr"], "search.lr", source, log=True) if "lr" in table else None
    sampler = table.get("sampler", "tpe")
    if sampler not in SAMPLERS:
        raise UserError(f"{source}: search.sampler = {sampler!r} is not one of {', '.join(SAMPLERS)}")
    seed = table.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise UserError(f"{source}: search.seed = {seed!r} should be an integer")
    if not 0 <= seed <= SEED_MAX:
        raise UserError(f"{source}: search.seed = {seed!r} is outside [0, {SEED_MAX}]")
    return SearchConfig(rates, lr, sampler, seed)


def load_study(path) -> StudyConfig:
    """Read and validate a study file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no such study file; the shipped ones are in studies/") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:  # a folder, no permission, an I/O error
        raise UserError(f"{path}: cannot read the study file ({err.strerror}); pass a .toml file") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"{path}: malformed TOML: {err}") from None
    _only_keys(data, ("study", "fixed", "variants", "search", "budget"), "(top level)", path)
    head = _table(data, "study", "study", path)
    _only_keys(head, ("name", "corpus", "metric", "notes"), "study", path)
    name = check_name(head.get("name", path.stem), "study.name =", path)
    corpus = head.get("corpus", "ptb")
    if not isinstance(corpus, str) or not corpus:
        raise UserError(f"{path}: study.corpus = {corpus!r} should be a corpus name like 'ptb' or a folder path")
    metric = head.get("metric", "val_ppl")
    if metric not in METRICS:
        raise UserError(f"{path}: study.metric = {metric!r} is not one of {', '.join(METRICS)}")
    notes = head.get("notes", "")
    if not isinstance(notes, str):
        raise UserError(f"{path}: study.notes = {notes!r} should be a string")
    fixed = _table(data, "fixed", "fixed", path)
    _only_keys(fixed, ("model", "dropout", "train"), "fixed", path)
    run = RunConfig(
        corpus=corpus,
        variant="",
        model=build_record(ModelConfig, _table(fixed, "model", "fixed.model", path), "fixed.model", path),
        dropout=build_record(DropoutConfig, _table(fixed, "dropout", "fixed.dropout", path), "fixed.dropout", path),
        train=build_record(TrainConfig, _table(fixed, "train", "fixed.train", path), "fixed.train", path),
    )
    return StudyConfig(
        path=path,
        name=name,
        corpus=corpus,
        metric=metric,
        notes=notes,
        fixed=run,
        variants=_parse_variants(_table(data, "variants", "variants", path), path),
        search=_parse_search(_table(data, "search", "search", path), path),
        budget=build_record(BudgetConfig, _table(data, "budget", "budget", path), "budget", path),
        text=text,
    )


