"""Study files and the frozen configs every run is built from.

A study file (TOML) is the complete record of one experiment: `[study]`, `[fixed.model|dropout|train]`,
`[variants.NAME]`, `[search]` and `[budget]`. `load_study` validates it before anything runs and
`StudyConfig.run_config` resolves one variant into a `RunConfig`. Every error names the file, the key
path and the bad value.
"""

import dataclasses
import difflib
import hashlib
import math
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from harness.errors import UserError

# One spelled-out name per dropout site, used in study files, configs, MLflow params and reports.
SITES = ("embedding", "input", "hidden", "output", "weight")
# How the input, hidden and output masks are drawn (harness.dropout builds the module for each).
HIDDEN_MODES = ("locked", "naive", "timestep", "naive_recurrent")
# The recurrent cells, PyTorch's nn.LSTM, nn.GRU, nn.RNN(nonlinearity="tanh"/"relu") (harness.dropout.CELL_TABLE).
CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")
METRICS = ("val_ppl",)
SAMPLERS = ("tpe", "qmc")
PRUNERS = ("median", "hyperband", "none")
OPTIMIZERS = ("nt-asgd", "sgd")
# Every name that becomes a path, an MLflow filter string or HTML (study, variant) matches this.
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
STUDY_NAME = SAFE_NAME
SEED_MAX = 2**32 - 1  # numpy seeds are unsigned 32-bit; torch's take them too
INT_MAX = 2**31 - 1  # sizes, counts and threads reach torch as C ints


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


def _check_numbers(obj):
    """Every float of a config record is finite, every int fits a C int and every seed numpy's range."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{f.name} = {value!r} is not a finite number; write a number like 0.5")
        if isinstance(value, tuple) or "seed" in f.name:
            seeds = value if isinstance(value, tuple) else (value,)
            if any(isinstance(s, int) and not 0 <= s <= SEED_MAX for s in seeds):
                raise ValueError(f"{f.name} = {_show(value)} is outside [0, {SEED_MAX}] (numpy's and torch's seeds)")
        elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT_MAX:
            raise ValueError(f"{f.name} = {value!r} is too large (at most {INT_MAX})")


def _show(value):
    return list(value) if isinstance(value, tuple) else value


def _check_positive(obj, *names):
    for name in names:
        value = getattr(obj, name)
        if not value > 0:  # also refuses NaN
            raise ValueError(f"{name} = {value!r} must be > 0")


def _check_non_negative(obj, *names):
    for name in names:
        value = getattr(obj, name)
        if not value >= 0:
            raise ValueError(f"{name} = {value!r} must be >= 0")


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} = {value!r} is not one of {', '.join(choices)}")


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of the AWD-LSTM and its recurrent cell; the last layer is emb_size wide so the decoder can be tied."""

    emb_size: int = 400
    hidden_size: int = 1150
    n_layers: int = 3
    tie_weights: bool = True
    cell: str = "lstm"

    def __post_init__(self):
        _check_numbers(self)
        _check_positive(self, "emb_size", "hidden_size", "n_layers")
        _check_choice("cell", self.cell, CELLS)


def dropout_rate(name: str, p) -> float:
    """p as a float if it is a dropout rate in [0, 1), else ValueError naming it: the one rule for every rate
    (study files, --set, search ranges and the modules of harness.dropout)."""
    if not 0.0 <= p < 1.0:  # NaN fails too
        raise ValueError(f"{name} = {p!r} is outside [0, 1): use a rate like 0.3 (0 switches it off)")
    return float(p)


@dataclass(frozen=True)
class DropoutConfig:
    """The five dropout rates and how hidden-state masks are drawn; a rate of 0 is the identity."""

    embedding: float = 0.0
    input: float = 0.0
    hidden: float = 0.0
    output: float = 0.0
    weight: float = 0.0
    hidden_mode: str = "locked"

    def __post_init__(self):
        _check_numbers(self)
        for site in SITES:
            dropout_rate(site, getattr(self, site))
        _check_choice("hidden_mode", self.hidden_mode, HIDDEN_MODES)


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe (the paper's NT-ASGD by default) and the data slice it sees."""

    epochs: int = 500
    batch_size: int = 20
    eval_batch_size: int = 10
    test_batch_size: int = 1
    bptt: int = 70
    variable_bptt: bool = True
    optimizer: str = "nt-asgd"
    lr: float = 30.0
    clip: float = 0.25
    weight_decay: float = 1.2e-6
    alpha: float = 2.0
    beta: float = 1.0
    nonmono: int = 5
    seed: int = 141
    train_tokens: int = 0  # 0 = the whole train split; else its first N tokens
    valid_tokens: int = 0  # 0 = the whole valid split
    threads: int = 0  # torch intra-op threads; 0 = leave torch's default

    def __post_init__(self):
        _check_numbers(self)
        _check_positive(self, "epochs", "batch_size", "eval_batch_size", "test_batch_size", "bptt", "lr", "nonmono")
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_non_negative(self, "clip", "weight_decay", "alpha", "beta", "train_tokens", "valid_tokens", "threads")


@dataclass(frozen=True)
class RunConfig:
    """Everything one training run depends on; logged with every run and saved in every checkpoint."""

    corpus: str
    variant: str
    model: ModelConfig
    dropout: DropoutConfig
    train: TrainConfig

    def to_dict(self) -> dict:
        """Nested plain dict (for checkpoints and artifacts)."""
        return dataclasses.asdict(self)

    def flat(self) -> dict:
        """`section.key -> value` (MLflow params, report columns)."""
        out = {"corpus": self.corpus, "variant": self.variant}
        for section in ("model", "dropout", "train"):
            for key, value in dataclasses.asdict(getattr(self, section)).items():
                out[f"{section}.{key}"] = value
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        """Inverse of to_dict."""
        return cls(
            corpus=data["corpus"],
            variant=data["variant"],
            model=ModelConfig(**data["model"]),
            dropout=DropoutConfig(**data["dropout"]),
            train=TrainConfig(**data["train"]),
        )

    def replace(self, overrides: dict) -> "RunConfig":
        """A copy with `section.key` overrides applied (values already typed)."""
        sections = {s: dataclasses.asdict(getattr(self, s)) for s in ("model", "dropout", "train")}
        for key, value in overrides.items():
            section, name = key.split(".", 1)
            sections[section][name] = value
        return RunConfig(
            self.corpus, self.variant, ModelConfig(**sections["model"]),
            DropoutConfig(**sections["dropout"]), TrainConfig(**sections["train"]),
        )


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
        _check_numbers(self)
        _check_positive(self, "trials")
        _check_choice("pruner", self.pruner, PRUNERS)
        _check_non_negative(self, "epochs", "warmup_epochs", "pruner_startup_trials", "max_retries")
        if len(set(self.confirm_seeds)) != len(self.confirm_seeds):
            raise ValueError(f"confirm_seeds = {list(self.confirm_seeds)!r} repeats a seed")


def changed_splits(recorded: dict, md5: dict) -> list:
    """The splits (sorted) whose MD5 differs from the one recorded; a split recorded nowhere is not compared.
    The one rule for "the corpus changed" of a study (StudyIdentity) and of a run's checkpoint (harness.train)."""
    return [split for split, digest in sorted(md5.items()) if split in recorded and recorded[split] != digest]


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
            files = ", ".join(f"{self.corpus_files.get(s, s)} (MD5 {before[s]} -> {self.corpus_md5[s]})" for s in changed)
            return (f"{self.study_path}: the corpus changed since this study started: {files}; its trials would compare "
                    "runs on two datasets: restore the file, or give the study a new study.name (or use new stores)")
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
                f"{self.path}: unknown variant {variant!r}{_suggest(variant, self.variants)}; "
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


def _suggest(word, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _coerce(hint, value, key):
    """Check one TOML value against a dataclass field's type; ints are accepted for floats."""
    origin = typing.get_origin(hint)
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif hint is str:
        ok = isinstance(value, str)
    elif hint is tuple or origin is tuple:
        ok = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        value = tuple(value) if ok else value
    else:
        raise TypeError(f"no TOML check for {hint}")
    if not ok:
        words = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
        raise ValueError(f"{key} = {value!r} should be {words.get(hint, 'a list of integers')}")
    return value


def build_record(cls, table, where: str, source: Path, defaults=None):
    """Validate a TOML table against a config dataclass: unknown keys, types and ranges."""
    if not isinstance(table, dict):
        raise UserError(f"{source}: [{where}] should be a table, got {table!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    values = dict(defaults or {})
    for key, value in table.items():
        if key not in names:
            raise UserError(
                f"{source}: unknown key '{where}.{key}'{_suggest(key, names)}; known keys: {', '.join(names)}"
            )
        try:
            values[key] = _coerce(hints[key], value, key)
        except ValueError as err:
            raise UserError(f"{source}: {where}.{err}") from None
    try:
        return cls(**values)
    except ValueError as err:
        raise UserError(f"{source}: {where}.{err}") from None


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
                f"{source}: unknown key '{where}.{key}'{_suggest(key, allowed)}; known keys: {', '.join(allowed)}"
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
                f"{source}: [{where}] is not a built-in variant{_suggest(name, BUILTIN_VARIANTS)}; "
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


def parse_overrides(pairs) -> dict:
    """`["train.epochs=1", ...]` -> {"train.epochs": 1}, typed and checked against the config fields."""
    records = {"model": ModelConfig, "dropout": DropoutConfig, "train": TrainConfig}
    out = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        section, _, name = key.strip().partition(".")
        if not sep or section not in records:
            raise UserError(f"--set {pair!r}: write section.key=value with section one of model, dropout, train")
        cls = records[section]
        hints = typing.get_type_hints(cls)
        if name not in hints:
            raise UserError(f"--set {pair!r}: unknown key {key!r}{_suggest(name, hints)}; known: {', '.join(hints)}")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()  # bare words, e.g. dropout.hidden_mode=naive
        try:
            value = _coerce(hints[name], value, key.strip())
            cls(**{name: value})  # the field's own checks (range, finite), against valid defaults for the rest
        except ValueError as err:
            raise UserError(f"--set {pair.strip()}: {err}") from None
        out[key.strip()] = value
    return out
