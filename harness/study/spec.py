"""The study file: one experiment's complete, reproducible record, validated before anything runs.

`[study]`, `[fixed.model|dropout|train]`, `[variants.NAME]`, `[axes]`, `[search]` and `[budget]`; `load_study` checks
it (every error names the file, the key path and the bad value), crosses the variants with the axes into arms, and
`StudyConfig.run_config` resolves one arm into the `RunConfig` a run trains with.
"""

import dataclasses
import hashlib
import itertools
import math
import typing
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from harness.config import (
    MASKED_SITES, SEED_MAX, SITES, HIDDEN_MODES, DropoutConfig, ModelConfig, RunConfig, TrainConfig, build_record,
    check_choice, check_non_negative, check_numbers, check_positive, coerce, dropout_rate, idle_sites, suggest,
)
from harness.data import changed_splits
from harness.errors import UserError
from harness.paths import check_path

METRICS = ("val_ppl",)
MAX_TRIALS = 10_000  # per arm and phase: beyond it a budget queues for months and Optuna's sampler slows per trial
SAMPLERS = ("tpe", "qmc")
PRUNERS = ("median", "hyperband", "none")
# Every name that becomes a path, an MLflow filter string or HTML (study, variant) matches this.
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# An axis value as it appears in an arm's name (awd@cell=gru,train_tokens=20000): safe there too.
SAFE_VALUE = re.compile(r"^[A-Za-z0-9_.+-]{1,32}$")
RECORDS = {"model": ModelConfig, "dropout": DropoutConfig, "train": TrainConfig}
# Keys that cannot be axes, and why: each is set elsewhere for every run.
NOT_AXES = {
    "train.seed": "the confirmation seeds set it (budget.confirm_seeds)",
    "train.epochs": "budget.epochs (or fixed.train.epochs) is one for the whole study: the pruner and the fair budget "
                    "rest on it; compare epoch budgets in separate studies",
    "dropout.hidden_mode": "each variant sets it: define variants with the modes to compare",
}


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
    """One ablation arm: which dropout sites are on and how hidden-state masks are drawn; in a study with [axes], a
    variant crossed with one value of each axis that can act on it (its name then says them: awd@cell=gru)."""

    name: str
    sites: frozenset
    hidden_mode: str = "locked"
    description: str = ""
    base: str = ""  # the variant this arm crosses with axis values; "" when it is the variant itself
    axes: tuple = ()  # ((key, value), ...): this arm's axis settings, in [axes] order

    @property
    def variant(self) -> str:
        """The name of the variant (the set of techniques) this arm runs."""
        return self.base or self.name


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
    # A trial with no epoch for this many seconds (stopped, a stuck kernel, a dead network mount) is killed and
    # retried from its checkpoint. 0 = automatic: a multiple of the slowest epoch so far (scheduler.hung_limit).
    hung_after: int = 0

    def __post_init__(self):
        check_numbers(self)
        check_positive(self, "trials")
        check_choice("pruner", self.pruner, PRUNERS)
        check_non_negative(self, "epochs", "warmup_epochs", "pruner_startup_trials", "max_retries", "hung_after")
        for name, runs in (("trials", self.trials), ("confirm_seeds", len(self.confirm_seeds))):
            if runs > MAX_TRIALS:
                raise ValueError(f"{name} asks for {runs} runs per arm, more than {MAX_TRIALS}: a typo, not a plan; "
                                 "price a large budget first with `python -m harness plan`")
        if len(set(self.confirm_seeds)) != len(self.confirm_seeds):
            raise ValueError(f"confirm_seeds = {list(self.confirm_seeds)!r} repeats a seed")


@dataclass(frozen=True)
class ExpectConfig:
    """What the literature reports for this study's configuration, with its source: the report's answer key."""

    source: str  # e.g. "Merity et al. 2017, Table 4: PTB, AWD-LSTM without fine-tuning"
    test_ppl: dict = field(default_factory=dict)  # arm -> published test perplexity
    val_ppl: dict = field(default_factory=dict)  # arm -> published validation perplexity
    ordering_only: tuple = ()  # arms whose published values come from another recipe: signs and ordering only
    tolerance: float = 0.0  # a value agrees within this fraction of it (else only inside the measured interval)
    note: str = ""


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
        if digest is None:  # every study the harness makes records it first
            return (f"{self.study_path}: a study of this name exists that this harness did not make (it records no "
                    "study_digest); refusing to write this study into it: give this file another study.name, or use "
                    "other stores")
        if digest != self.study_digest:
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
    variants: dict  # name -> Variant: the arms (the variants crossed with the axes; without [axes], the variants)
    search: SearchConfig
    budget: BudgetConfig
    text: str  # the file as read, logged as an artifact
    axes: dict = field(default_factory=dict)  # key ("model.cell") -> tuple of its values, in file order
    expect: ExpectConfig | None = None  # the published results this study is checked against ([expect])

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

    def active_sites(self, variant: str) -> frozenset:
        """The arm's sites whose rates can act on its model (harness.config.idle_sites): run at their rates and
        searched; every other site stays 0."""
        arm = self.variants[variant]
        return arm.sites - set(idle_sites(self.fixed.replace(dict(arm.axes)).model, arm.hidden_mode))

    def run_config(self, variant: str, overrides: dict | None = None) -> RunConfig:
        """The resolved config of one arm: the arm's axis values, then `section.key` overrides; every site that is
        off in the arm or cannot act on its model at 0. A rate or setting the overrides give that cannot act is a
        UserError."""
        arms = [a.name for a in self.variants.values() if a.base == variant and a.name != variant]
        if variant not in self.variants and arms:
            raise UserError(f"{self.path}: variant {variant!r} is crossed with [axes]: name one of its arms: "
                            f"{', '.join(arms)}")
        if variant not in self.variants:
            raise UserError(
                f"{self.path}: unknown variant {variant!r}{suggest(variant, self.variants)}; "
                f"this study defines: {', '.join(self.variants)}"
            )
        arm = self.variants[variant]
        user = overrides or {}
        for key, value in user.items():
            section, name = key.split(".", 1)
            if section == "dropout" and name in SITES and name not in arm.sites and value:
                raise UserError(
                    f"--set {key}={value}: variant {variant!r} keeps {name} dropout off "
                    f"(its sites: {', '.join(sorted(arm.sites)) or 'none'}); choose a variant that uses it"
                )
        try:
            config = self.fixed.replace({"dropout.hidden_mode": arm.hidden_mode, **dict(arm.axes), **user})
        except ValueError as err:
            raise UserError(f"--set: {err}") from None
        idle = idle_sites(config.model, config.dropout.hidden_mode)
        for key, value in user.items():
            section, name = key.split(".", 1)
            if section == "dropout" and name in idle and value:
                raise UserError(f"--set {key}={value} cannot act in {variant!r}: {idle[name]}; leave it at 0")
            if key == "train.nonmono" and config.train.optimizer == "sgd":
                raise UserError(f"--set {key}={value} cannot act: train.optimizer is sgd, which never averages; "
                                "drop it, or set train.optimizer=nt-asgd")
        rates = {s: getattr(config.dropout, s) if s in arm.sites and s not in idle else 0.0 for s in SITES}
        return dataclasses.replace(config, variant=variant,
                                   dropout=dataclasses.replace(config.dropout, **rates))


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
        if mode != "locked" and not set(sites) & set(MASKED_SITES):
            raise UserError(f"{source}: {where}.hidden_mode = {mode!r} cannot act: it draws the masks of "
                            f"{', '.join(MASKED_SITES)}, and this variant switches none of them on; write "
                            "hidden_mode = 'locked'")
        description = spec.get("description", base.description if base else "")
        if not isinstance(description, str):
            raise UserError(f"{source}: {where}.description = {description!r} should be a string")
        variants[name] = Variant(name, frozenset(sites), mode, description)
    return variants


def _axis_acts(key: str, variant: Variant, model: ModelConfig) -> bool:
    """Whether an axis can change the variant's runs: a dropout rate only where the variant switches its site on and
    the model (the arm's, its axis values applied) can use it."""
    section, name = key.split(".", 1)
    return not (section == "dropout" and name in SITES
                and (name not in variant.sites or name in idle_sites(model, variant.hidden_mode)))


def _parse_axes(table, fixed: RunConfig, search: SearchConfig, source) -> dict:
    """[axes]: "section.key" = [value, value, ...]; each value valid for its key, at least two, none twice."""
    axes = {}
    for key, values in table.items():
        where = f'axes."{key}"'
        section, _, name = key.partition(".")
        hints = typing.get_type_hints(RECORDS[section]) if section in RECORDS else {}
        if name not in hints:
            known = [f"{s}.{n}" for s, cls in RECORDS.items() for n in typing.get_type_hints(cls)]
            raise UserError(f"{source}: {where}: not a setting{suggest(key, known)}; an axis is a key of "
                            "[fixed.model], [fixed.dropout] or [fixed.train], written \"section.key\"")
        if key in NOT_AXES:
            raise UserError(f"{source}: {where} cannot be an axis: {NOT_AXES[key]}")
        if section == "dropout" and name in search.rates or key == "train.lr" and search.lr is not None:
            raise UserError(f"{source}: {where}: [search] searches it; a setting is either searched or an axis: "
                            f"remove it from [search] or from [axes]")
        if not isinstance(values, list) or len(values) < 2:
            raise UserError(f"{source}: {where} = {values!r} should be a list of at least two values to compare")
        coerced = []
        for value in values:
            try:
                value = coerce(hints[name], value, key)
                fixed.replace({key: value})  # the field's own checks (range, choices), as --set makes them
            except ValueError as err:
                raise UserError(f"{source}: {where}: {err}") from None
            if value in coerced:
                raise UserError(f"{source}: {where} lists {value!r} twice; list each value once")
            if not SAFE_VALUE.match(_axis_text(value)):
                raise UserError(f"{source}: {where}: value {value!r} cannot name an arm; use letters, digits, '_', "
                                "'.', '+', '-' (at most 32)")
            coerced.append(value)
        axes[key] = tuple(coerced)
    return axes


def _axis_text(value) -> str:
    """An axis value as an arm's name shows it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return f"{value:g}" if isinstance(value, float) else str(value)


def cross_arms(variants: dict, axes: dict, fixed: RunConfig) -> dict:
    """name -> Variant of every arm: each variant at every combination of the axis values that can act on it (a
    variant an axis cannot act on, e.g. a rate axis on a variant without that site, runs once for all its values),
    grouped by combination, variants in file order within it. Without axes, the variants themselves."""
    if not axes:
        return dict(variants)
    short = {k: k.split(".", 1)[1] for k in axes}
    labels = {k: short[k] if list(short.values()).count(short[k]) == 1 else k for k in axes}
    arms = {}
    for combination in itertools.product(*axes.values()):
        model = fixed.replace({k: v for k, v in zip(axes, combination) if k.startswith("model.")}).model
        for variant in variants.values():
            acting = tuple((k, v) for k, v in zip(axes, combination) if _axis_acts(k, variant, model))
            name = variant.name + ("@" + ",".join(f"{labels[k]}={_axis_text(v)}" for k, v in acting) if acting else "")
            arms.setdefault(name, dataclasses.replace(variant, name=name, base=variant.name, axes=acting))
    return arms


def _parse_expect(table, arms: dict, source) -> ExpectConfig | None:
    """[expect]: source (required), test_ppl / val_ppl tables of arm -> published perplexity (at least one),
    ordering_only (arms), tolerance (a fraction, default 0), note."""
    if not table:
        return None
    _only_keys(table, ("source", "test_ppl", "val_ppl", "ordering_only", "tolerance", "note"), "expect", source)
    text = {key: table.get(key, "") for key in ("source", "note")}
    for key, value in text.items():
        if not isinstance(value, str):
            raise UserError(f"{source}: expect.{key} = {value!r} should be a string")
    if not text["source"].strip():
        raise UserError(f"{source}: expect.source is missing: say where the numbers come from (paper, table, "
                        "configuration)")
    published = {}
    for metric in ("test_ppl", "val_ppl"):
        values = _table(table, metric, f"expect.{metric}", source)
        for arm, value in values.items():
            if arm not in arms:
                raise UserError(f"{source}: expect.{metric}.{arm}: no such arm{suggest(arm, arms)}; this study runs: "
                                f"{', '.join(arms)}")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 1 <= value < math.inf:
                raise UserError(f"{source}: expect.{metric}.{arm} = {value!r} should be a perplexity (a finite "
                                "number >= 1)")
        published[metric] = {arm: float(value) for arm, value in values.items()}
    if not any(published.values()):
        raise UserError(f"{source}: [expect] gives no number: add test_ppl = {{ ARM = VALUE }} or val_ppl")
    ordering_only = table.get("ordering_only", [])
    keyed = {*published["test_ppl"], *published["val_ppl"]}
    if not isinstance(ordering_only, list) or any(arm not in keyed for arm in ordering_only):
        raise UserError(f"{source}: expect.ordering_only = {ordering_only!r} should list arms of expect.test_ppl or "
                        "expect.val_ppl")
    tolerance = table.get("tolerance", 0.0)
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance < 1:
        raise UserError(f"{source}: expect.tolerance = {tolerance!r} should be a fraction in [0, 1), e.g. 0.05")
    return ExpectConfig(text["source"].strip(), published["test_ppl"], published["val_ppl"], tuple(ordering_only),
                        float(tolerance), text["note"].strip())


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
    path = check_path(path, f"the study file {path}")
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
    _only_keys(data, ("study", "fixed", "variants", "axes", "search", "budget", "expect"), "(top level)", path)
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
    search = _parse_search(_table(data, "search", "search", path), path)
    axes = _parse_axes(_table(data, "axes", "axes", path), run, search, path)
    arms = cross_arms(_parse_variants(_table(data, "variants", "variants", path), path), axes, run)
    study = StudyConfig(
        path=path,
        name=name,
        corpus=corpus,
        metric=metric,
        notes=notes,
        fixed=run,
        variants=arms,
        search=search,
        budget=build_record(BudgetConfig, _table(data, "budget", "budget", path), "budget", path),
        text=text,
        axes=axes,
        expect=_parse_expect(_table(data, "expect", "expect", path), arms, path),
    )
    _refuse_idle_settings(study, data)
    return study


def _refuse_idle_settings(study: StudyConfig, data: dict) -> None:
    """UserError for a setting the file gives that can act in none of its arms: a non-zero rate or a search range of a
    site no arm's model can use (harness.config.idle_sites), a hidden_mode in [fixed.dropout] (the variants set it),
    nonmono without NT-ASGD, an axis that changes no arm."""
    source, fixed = study.path, data.get("fixed", {})
    for site in SITES:
        using = [arm for arm in study.variants.values() if site in arm.sites]
        if not using or any(site in study.active_sites(arm.name) for arm in using):
            continue
        arm = using[0]
        why = idle_sites(study.fixed.replace(dict(arm.axes)).model, arm.hidden_mode)[site]
        if getattr(study.fixed.dropout, site):
            raise UserError(f"{source}: fixed.dropout.{site} = {getattr(study.fixed.dropout, site):g} cannot act in "
                            f"any arm: {why}; set it to 0 or remove it")
        if site in study.search.rates:
            raise UserError(f"{source}: search.{site} cannot act in any arm: {why}; remove it from [search]")
    if "hidden_mode" in fixed.get("dropout", {}):
        raise UserError(f"{source}: fixed.dropout.hidden_mode cannot act: each variant sets its own hidden_mode; "
                        "remove it and set hidden_mode in [variants.NAME]")
    if ("nonmono" in fixed.get("train", {}) or "train.nonmono" in study.axes) and all(
            study.run_config(arm).train.optimizer == "sgd" for arm in study.variants):
        raise UserError(f"{source}: fixed.train.nonmono cannot act: train.optimizer is sgd, which never averages; "
                        "remove it, or use optimizer = 'nt-asgd'")
    for key in study.axes:
        if not any(key in dict(arm.axes) for arm in study.variants.values()):
            raise UserError(f"{source}: axes.\"{key}\" cannot act in any arm (no variant switches its site on where "
                            "the model can use it); remove it from [axes]")


