"""The frozen records every training run is built from: model sizes, dropout rates, the recipe, and `--set`.

`RunConfig` is logged with every run and saved in every checkpoint; each record validates itself on creation
(ValueError naming the field), and `build_record` / `parse_overrides` turn TOML tables and `--set` pairs into them.
"""

import dataclasses
import difflib
import math
import tomllib
import typing
from dataclasses import dataclass
from pathlib import Path

from harness.errors import UserError

# One spelled-out name per dropout site, used in study files, configs, MLflow params and reports.
SITES = ("embedding", "input", "hidden", "output", "weight")
# How the input, hidden and output masks are drawn (harness.dropout builds the module for each).
HIDDEN_MODES = ("locked", "naive", "timestep", "naive_recurrent")
# The recurrent cells, PyTorch's nn.LSTM, nn.GRU, nn.RNN(nonlinearity="tanh"/"relu") (harness.dropout.CELL_TABLE).
CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")
OPTIMIZERS = ("nt-asgd", "sgd")
SEED_MAX = 2**32 - 1  # numpy seeds are unsigned 32-bit; torch's take them too
INT_MAX = 2**31 - 1  # sizes, counts and threads reach torch as C ints


def check_numbers(obj):
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


def check_positive(obj, *names):
    for name in names:
        value = getattr(obj, name)
        if not value > 0:  # also refuses NaN
            raise ValueError(f"{name} = {value!r} must be > 0")


def check_non_negative(obj, *names):
    for name in names:
        value = getattr(obj, name)
        if not value >= 0:
            raise ValueError(f"{name} = {value!r} must be >= 0")


def check_choice(name, value, choices):
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
        check_numbers(self)
        check_positive(self, "emb_size", "hidden_size", "n_layers")
        check_choice("cell", self.cell, CELLS)


def dropout_rate(name: str, p) -> float:
    """p as a float if it is a dropout rate in [0, 1), else ValueError naming it: the one rule for every rate
    (study files, --set, search ranges and the modules of harness.dropout)."""
    if not 0.0 <= p < 1.0:  # NaN fails too
        raise ValueError(f"{name} = {p!r} is outside [0, 1): use a rate like 0.3 (0 switches it off)")
    return float(p)


# The sites whose masks `hidden_mode` draws; with none of them on, the mode changes nothing.
MASKED_SITES = ("input", "hidden", "output")


def idle_sites(model: "ModelConfig", hidden_mode: str) -> dict:
    """site -> why a non-zero rate there cannot act on this model (empty when every site can): the one rule for
    rates that change nothing (study files, axes, --set, the search space). The hidden rate drops the outputs
    between layers, so a one-layer model has none for it, unless naive_recurrent also applies it to h(t-1)."""
    if model.n_layers == 1 and hidden_mode != "naive_recurrent":
        return {"hidden": "with n_layers = 1 there is no output between layers for it to drop (only hidden_mode "
                          "naive_recurrent also applies it, to h(t-1))"}
    return {}


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
        check_numbers(self)
        for site in SITES:
            dropout_rate(site, getattr(self, site))
        check_choice("hidden_mode", self.hidden_mode, HIDDEN_MODES)


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
        check_numbers(self)
        check_positive(self, "epochs", "batch_size", "eval_batch_size", "test_batch_size", "bptt", "lr", "nonmono")
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_non_negative(self, "clip", "weight_decay", "alpha", "beta", "train_tokens", "valid_tokens", "threads")


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


def suggest(word, choices) -> str:
    """' (did you mean X?)' for the closest of choices, or ''."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def coerce(hint, value, key):
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
                f"{source}: unknown key '{where}.{key}'{suggest(key, names)}; known keys: {', '.join(names)}"
            )
        try:
            values[key] = coerce(hints[key], value, key)
        except ValueError as err:
            raise UserError(f"{source}: {where}.{err}") from None
    try:
        return cls(**values)
    except ValueError as err:
        raise UserError(f"{source}: {where}.{err}") from None


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
            raise UserError(f"--set {pair!r}: unknown key {key!r}{suggest(name, hints)}; known: {', '.join(hints)}")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()  # bare words, e.g. dropout.hidden_mode=naive
        try:
            value = coerce(hints[name], value, key.strip())
            cls(**{name: value})  # the field's own checks (range, finite), against valid defaults for the rest
        except ValueError as err:
            raise UserError(f"--set {pair.strip()}: {err}") from None
        out[key.strip()] = value
    return out
