"""Bad input and faults, by input surface: each is refused in one line (exit 2, `error: ...` on stderr, no
traceback) before any work starts, or, for a fault during work, stops with one line naming the path; nothing
already computed is lost or leaked.

Surfaces: the study file, `--set`, CLI flags, storage and tracking URLs, corpus folders, checkpoints, output
paths, and faults while a run or a study works. Most cases call `harness.cli.main` in-process (the same path as
`python -m harness`); a few run the real command. Every case is one member of a class of bad input (see the
section comments); the generated sets cover every key of every section, not only one example.
"""

import dataclasses
import errno
import hashlib
import math
import os
import re
import typing
from pathlib import Path
from urllib.parse import quote

import optuna
import pytest
import torch
from mlflow import MlflowClient
from optuna.trial import TrialState

from helpers import refused, run_harness, with_corpus
from harness.cli import main
from harness.config import DropoutConfig, ModelConfig, SITES, TrainConfig, parse_overrides
from harness.data import find_split_files, load_corpus
from harness.errors import UserError
from harness.study.coordinator import claim_runs_dir, run_study
from harness.study.ledger.storage import open_storage
from harness.study.ledger.writer import Ledger
from harness.study.rules import SEARCH, optuna_name
from harness.study.scheduler import Slot
from harness.study.spec import BudgetConfig, load_study
from harness.study.stores import LocalLock, redact
from harness.study.tracking import Tracker
from harness.train import CheckpointError, check_splits, train_model

pytestmark = [pytest.mark.fast, pytest.mark.usefixtures("in_tmp")]  # in_tmp: conftest.py

STUDY = """
[study]
name = "bad"
corpus = "ptb"
[fixed.model]
emb_size = 8
hidden_size = 8
n_layers = 1
[fixed.dropout]
input = 0.2
weight = 0.2
[fixed.train]
epochs = 1
batch_size = 4
eval_batch_size = 4
test_batch_size = 4
bptt = 10
train_tokens = 2000
valid_tokens = 400
threads = 1
[variants.awd]
[variants.weight_only]
[search]
weight = [0.1, 0.5]
[budget]
trials = 2
pruner = "none"
confirm_seeds = []
max_retries = 1
"""
RECORDS = {"fixed.model": ModelConfig, "fixed.dropout": DropoutConfig, "fixed.train": TrainConfig,
           "budget": BudgetConfig}


def study_file(folder: Path, corpus: str, text: str = STUDY, name: str = "bad.toml") -> Path:
    path = folder / name
    path.write_text(with_corpus(text, corpus), encoding="utf-8")
    return path


def stores(folder: Path) -> list:
    return ["--storage", f"sqlite:///{folder / 'optuna.db'}", "--tracking-uri", f"sqlite:///{folder / 'mlflow.db'}"]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def study_error(tmp_path, text: str) -> str:
    path = tmp_path / "study.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UserError) as info:
        load_study(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message, message
    return message[len(f"{path}: "):]  # the temporary path holds the test's name: assert on the rest


def fields(cls, kind) -> list[str]:
    hints = typing.get_type_hints(cls)
    return [f.name for f in dataclasses.fields(cls) if hints[f.name] is kind]


# --- the study file -------------------------------------------------------------------------------------
# Class: a scalar or a list where a table belongs, at every table of the file.
@pytest.mark.parametrize("text, key", [
    ("fixed = 3\n[variants.awd]", "fixed = 3"),
    ("study = 'x'\n[variants.awd]", "study = 'x'"),
    ("variants = 3", "variants = 3"),
    ("[[variants]]\nname = 'awd'", "variants = [{'name': 'awd'}]"),
    ("search = [1]\n[variants.awd]", "search = [1]"),
    ("budget = 2\n[variants.awd]", "budget = 2"),
    ("[fixed]\nmodel = 3\n[variants.awd]", "fixed.model = 3"),
    ("[fixed]\ndropout = 'x'\n[variants.awd]", "fixed.dropout = 'x'"),
    ("[fixed]\ntrain = [1, 2]\n[variants.awd]", "fixed.train = [1, 2]"),
    ("[variants]\nawd = 3", "variants.awd = 3"),
])
def test_a_scalar_where_a_table_belongs(tmp_path, text, key):
    message = study_error(tmp_path, text)
    assert f"{key} should be a table" in message


# Its mirror: a table where a scalar belongs, for every key of every section.
SCALAR_KEYS = ([f"{where}.{f.name}" for where, cls in RECORDS.items() for f in dataclasses.fields(cls)]
               + [f"study.{k}" for k in ("name", "corpus", "metric", "notes")]
               + [f"variants.mine.{k}" for k in ("sites", "hidden_mode", "description")]
               + [f"search.{k}" for k in (*SITES, "lr", "sampler", "seed")])


@pytest.mark.parametrize("key", SCALAR_KEYS)
def test_a_table_where_a_value_belongs(tmp_path, key):
    section, name = key.rsplit(".", 1)
    mine = {"sites": "['weight']", "hidden_mode": "'locked'"}
    if section == "variants.mine":
        mine[name] = "{ a = 1 }"
        text = "[variants.mine]\n" + "".join(f"{k} = {v}\n" for k, v in mine.items())
    else:
        text = f"[variants.awd]\n[{section}]\n{name} = {{ a = 1 }}\n"
    message = study_error(tmp_path, text)
    assert f"{name} = {{'a': 1}}" in message, message


# Class: non-finite numbers, in every float key and every search range.
FLOAT_KEYS = [f"{where}.{name}" for where, cls in RECORDS.items() for name in fields(cls, float)]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_non_finite_numbers_are_refused(tmp_path, key, value):
    section, name = key.rsplit(".", 1)
    message = study_error(tmp_path, f"[{section}]\n{name} = {value}\n[variants.awd]")
    assert f"{key} = {value}" in message and "finite" in message


@pytest.mark.parametrize("value", ["[0.1, nan]", "[nan, 0.5]", "[0.1, inf]", "[-inf, 0.5]"])
@pytest.mark.parametrize("site", [*SITES, "lr"])
def test_non_finite_search_ranges_are_refused(tmp_path, site, value):
    message = study_error(tmp_path, f"[variants.awd]\n[search]\n{site} = {value}")
    assert f"search.{site}" in message and "finite" in message


# Class: seeds outside what numpy and torch accept, wherever a seed is written.
@pytest.mark.parametrize("text, key", [
    ("[fixed.train]\nseed = -1", "fixed.train.seed = -1"),
    ("[fixed.train]\nseed = 4294967296", "fixed.train.seed = 4294967296"),
    ("[budget]\nconfirm_seeds = [1, -1]", "budget.confirm_seeds = [1, -1]"),
    ("[budget]\nconfirm_seeds = [4294967296]", "budget.confirm_seeds = [4294967296]"),
    ("[search]\nseed = -5", "search.seed = -5"),
    ("[search]\nseed = 9999999999", "search.seed = 9999999999"),
])
def test_seeds_outside_numpy_range_are_refused(tmp_path, text, key):
    message = study_error(tmp_path, f"{text}\n[variants.awd]")
    assert key in message and "outside [0, 4294967295]" in message


def test_the_largest_seed_is_accepted(tmp_path):
    path = tmp_path / "study.toml"
    path.write_text("[fixed.train]\nseed = 4294967295\n[budget]\nconfirm_seeds = [0, 4294967295]\n[variants.awd]")
    assert load_study(path).fixed.train.seed == 2**32 - 1


# Integers that overflow the C ints torch takes, in every integer key.
INT_KEYS = [f"{where}.{name}" for where, cls in RECORDS.items() for name in fields(cls, int) if "seed" not in name]


@pytest.mark.parametrize("key", INT_KEYS)
def test_integers_too_large_for_torch_are_refused(tmp_path, key):
    section, name = key.rsplit(".", 1)
    message = study_error(tmp_path, f"[{section}]\n{name} = {2**31}\n[variants.awd]")
    assert f"{key} = {2**31} is too large" in message


# Class: every name that becomes a path, an MLflow filter or HTML is checked, the study's and the
# variants' alike.
UNSAFE_NAMES = ["../../../escaped", "a/b", "a\\\\b", "<b>x</b>", "a'b", 'a\\"b', "a b", "", ".hidden", "-x", "x" * 65,
                "caf\u00e9", "a\\tb"]


@pytest.mark.parametrize("name", UNSAFE_NAMES)
def test_unsafe_variant_names_are_refused(tmp_path, name):
    message = study_error(tmp_path, f'[variants."{name}"]\nsites = ["weight"]\nhidden_mode = "locked"')
    assert "the variant name" in message and "unsafe for file names, MLflow filters and HTML" in message


@pytest.mark.parametrize("name", UNSAFE_NAMES)
def test_unsafe_study_names_are_refused(tmp_path, name):
    message = study_error(tmp_path, f'[study]\nname = "{name}"\n[variants.awd]')
    assert "study.name =" in message and "unsafe" in message


def test_a_study_file_name_that_is_unsafe_as_the_default_study_name(tmp_path):
    path = tmp_path / "my study.toml"
    path.write_text("[variants.awd]")
    with pytest.raises(UserError, match="study.name = 'my study' is unsafe"):
        load_study(path)


def test_variant_names_that_differ_only_in_case_are_refused(tmp_path):
    message = study_error(tmp_path, "[variants.awd]\n[variants.AWD]\nsites = []\nhidden_mode = 'locked'")
    assert "differ only in case" in message


@pytest.mark.parametrize("text, expected", [
    ("[variants.awd]\ndescription = 3", "variants.awd.description = 3 should be a string"),
    ("[study]\nnotes = 3\n[variants.awd]", "study.notes = 3 should be a string"),
])
def test_strings_that_are_not_strings(tmp_path, text, expected):
    assert expected in study_error(tmp_path, text)


def test_a_study_path_that_is_a_folder(tmp_path, capsys):
    (tmp_path / "studies.toml").mkdir()
    message = refused(capsys, "train", tmp_path / "studies.toml", "--variant", "awd")
    assert "cannot read the study file" in message


def test_the_variant_escaping_the_runs_folder_never_reaches_it(tmp_path, test_corpus, capsys):
    study = study_file(tmp_path, test_corpus, STUDY + '[variants."../../../escaped"]\nsites = ["weight"]\n'
                                                      'hidden_mode = "locked"\n')
    work = tmp_path / "a" / "b" / "c"
    work.mkdir(parents=True)
    os.chdir(work)
    message = refused(capsys, "train", study, "--variant", "../../../escaped", "--no-progress")
    assert "unsafe" in message
    assert not [p for p in tmp_path.rglob("*escaped*")]


# Examples of the study-file classes, as a user types them.
@pytest.mark.slow
@pytest.mark.parametrize("edit, expected", [
    (lambda text: "fixed = 3\n" + text[text.index("[variants.awd]"):], "fixed = 3 should be a table"),
    (lambda text: text.replace("threads = 1", "threads = 1\nlr = nan"), "fixed.train.lr = nan is not a finite"),
    (lambda text: text.replace("threads = 1", "threads = 1\nseed = -1"), "fixed.train.seed = -1 is outside"),
])
def test_study_file_examples_exit_2_in_one_line(tmp_path, test_corpus, edit, expected):
    path = tmp_path / "bad.toml"
    path.write_text(edit(with_corpus(STUDY, test_corpus)))
    proc = run_harness("train", path, "--variant", "awd", "--no-progress", cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: ") and expected in lines[0], proc.stderr
    assert not (tmp_path / "runs").exists()


# --- --set ----------------------------------------------------------------------------------------------
SET_RECORDS = {"model": ModelConfig, "dropout": DropoutConfig, "train": TrainConfig}
SET_FLOATS = [f"{s}.{n}" for s, cls in SET_RECORDS.items() for n in fields(cls, float)]
SET_INTS = [f"{s}.{n}" for s, cls in SET_RECORDS.items() for n in fields(cls, int) if n != "seed"]
SET_ALL = [f"{s}.{f.name}" for s, cls in SET_RECORDS.items() for f in dataclasses.fields(cls)]


@pytest.mark.parametrize("pair", [f"{k}={v}" for k in SET_FLOATS for v in ("nan", "inf", "-inf", "+inf")]
                         + [f"{k}={2**31}" for k in SET_INTS]
                         + ["train.seed=-1", f"train.seed={2**32}"]
                         + [f"{k}={{a = 1}}" for k in SET_ALL] + [f"{k}=[1, 2]" for k in SET_ALL])
def test_bad_set_values_name_the_pair(pair):
    with pytest.raises(UserError) as info:
        parse_overrides([pair])
    message = str(info.value)
    assert message.startswith(f"--set {pair}: "), message
    assert pair.split("=")[0].split(".")[1] in message and "\n" not in message


def test_set_nan_is_refused_before_anything_runs(tmp_path, test_corpus, capsys):
    study = study_file(tmp_path, test_corpus)
    message = refused(capsys, "train", study, "--variant", "awd", "--set", "train.lr=nan", "--no-progress")
    assert message == "error: --set train.lr=nan: lr = nan is not a finite number; write a number like 0.5"
    assert not (tmp_path / "runs").exists()


# --- settings the corpus cannot serve ----------------------------------------------------------
# Class: every split against its batch size, the train split against bptt, and token slices longer than
# their split; refused before the first step by `train` (and by the scheduler's worker, which calls
# train_model) and by `ablate` before the study starts.
@pytest.mark.parametrize("override, key", [
    ({"train.batch_size": 1001}, "train.batch_size"),
    ({"train.eval_batch_size": 201}, "train.eval_batch_size"),
    ({"train.test_batch_size": 10**6}, "train.test_batch_size"),
    ({"train.bptt": 500}, "train.bptt"),
    ({"train.train_tokens": 10**9}, "train.train_tokens"),
    ({"train.valid_tokens": 10**9}, "train.valid_tokens"),
])
def test_settings_the_corpus_cannot_serve(tmp_path, test_corpus, override, key):
    config = load_study(study_file(tmp_path, test_corpus)).run_config("awd", override)
    corpus = load_corpus(test_corpus)
    with pytest.raises(UserError, match=rf"^{key} = {list(override.values())[0]} "):
        check_splits(config, corpus)
    with pytest.raises(UserError, match=rf"^{key} = "):
        train_model(config, corpus, checkpoint_dir=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()  # refused before the checkpoint folder was made


def test_train_refuses_a_test_batch_size_before_training(tmp_path, test_corpus, capsys):
    study = study_file(tmp_path, test_corpus)
    message = refused(capsys, "train", study, "--variant", "awd", "--set", "train.test_batch_size=100000",
                      "--out", tmp_path / "out", "--no-progress")
    assert "train.test_batch_size = 100000 is too large for the test split" in message and "use at most" in message
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_ablate_refuses_a_test_batch_size_before_the_study_starts(tmp_path, test_corpus):
    text = STUDY.replace("test_batch_size = 4", "test_batch_size = 1000000").replace("confirm_seeds = []",
                                                                                      "confirm_seeds = [1]")
    study = load_study(study_file(tmp_path, test_corpus, text))
    with pytest.raises(UserError, match="train.test_batch_size = 1000000 is too large"):
        run_study(study, storage=f"sqlite:///{tmp_path / 'optuna.db'}",
                     tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", slots=[Slot(0, "cpu", 1)],
                     runs_dir=tmp_path / "runs", log=lambda *a: None, plan=False)
    assert not (tmp_path / "optuna.db").exists() and not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_run_resumes_when_only_the_test_batch_size_changed(tmp_path, test_corpus):
    study = load_study(study_file(tmp_path, test_corpus))
    corpus = load_corpus(test_corpus)
    first = train_model(study.run_config("awd", {"train.epochs": 2}), corpus, checkpoint_dir=tmp_path,
                        progress=False)
    stamp = (tmp_path / "last.pt").stat().st_mtime_ns
    again = train_model(study.run_config("awd", {"train.epochs": 2, "train.test_batch_size": 8}), corpus,
                        checkpoint_dir=tmp_path, progress=False)
    assert (tmp_path / "last.pt").stat().st_mtime_ns == stamp  # resumed at the end: nothing trained again
    assert again.best_val_ppl == first.best_val_ppl and math.isfinite(again.test_ppl)
    with pytest.raises(CheckpointError, match="train.eval_batch_size 4 -> 8"):  # validation picks the best epoch
        train_model(study.run_config("awd", {"train.epochs": 2, "train.eval_batch_size": 8}), corpus,
                    checkpoint_dir=tmp_path, progress=False)


# --- CLI flags ------------------------------------------------------------------------------------------
# Class: every numeric or device flag out of range or malformed, and argparse's own errors, in one line.
@pytest.mark.parametrize("argv, expected", [
    (["ablate", "{study}", "--heartbeat", "0"], "argument --heartbeat: 0 must be between 1 and 3600"),
    (["ablate", "{study}", "--heartbeat", "99999999999"], "argument --heartbeat"),
    (["worker", "{study}", "--storage", "sqlite:///o.db", "--tracking-uri", "sqlite:///m.db", "--heartbeat", "x"],
     "'x' is not a whole number"),
    (["ablate", "{study}", "--trials-per-device", "0"], "argument --trials-per-device: 0 must be at least 1"),
    (["ablate", "{study}", "--trials-per-device", "100000"], "--trials-per-device 100000: must be at most 256"),
    (["ablate", "{study}", "--devices", ","], "--devices ',': names no device"),
    (["ablate", "{study}", "--devices", "cpu,cpu"], "cpu named twice"),
    (["ablate", "{study}", "--devices", "tpu"], "'tpu' is not cpu, cuda or cuda:N"),
    (["ablate", "{study}", "--devices", "cuda:-1"], "is not cpu, cuda or cuda:N"),
    (["train", "{study}", "--variant", "awd", "--device", "tpu"], "--device tpu: use cpu, cuda, cuda:N or auto"),
    (["train", "{study}", "--variant", "awd", "--device", "cuda:x"], "--device cuda:x: use cpu"),
    (["train", "{study}"], "the following arguments are required: --variant"),
    (["bench", "--rounds", "0"], "argument --rounds: 0 must be at least 1"),
    (["bench", "--steps", "-1"], "argument --steps: -1 must be at least 1"),
    (["bench", "--threads", "-1"], "argument --threads: -1 must be between 0 and"),
    (["bench", "--tasks", "0"], "argument --tasks: 0 must be at least 1"),
    (["bench", "--sizes", ","], "bench --sizes ',': use a comma list of paper, cpu"),
    (["bench", "--sizes", "plain"], "use a comma list of paper, cpu"),
    (["bench", "--sizes", "cpu", "--arms", "locked,nope"], "unknown arm 'nope'"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_bad_flags_are_one_line(tmp_path, test_corpus, capsys, argv, expected):
    study = study_file(tmp_path, test_corpus)
    message = refused(capsys, *[a.format(study=study) for a in argv])
    assert expected in message
    assert not (tmp_path / "optuna.db").exists() and not (tmp_path / "runs").exists()


# --- storage and tracking URLs --------------------------------------------------------------------------
# Class: every way to ask SQLite for a database that vanishes at exit, on both stores and every command.
IN_MEMORY = ["sqlite://", "sqlite:///", "sqlite:///:memory:", "sqlite:///file::memory:?cache=shared",
             "sqlite:///file:x.db?mode=memory&uri=true", "sqlite:///x.db?mode%3Dmemory", "sqlite:///x.db?vfs=memdb"]


@pytest.mark.parametrize("url", IN_MEMORY)
@pytest.mark.parametrize("flag", ["--storage", "--tracking-uri"])
@pytest.mark.parametrize("command", ["ablate", "worker", "report"])
def test_stores_that_would_not_persist_are_refused(tmp_path, test_corpus, capsys, command, flag, url):
    study = study_file(tmp_path, test_corpus)
    urls = {"--storage": "sqlite:///optuna.db", "--tracking-uri": "sqlite:///mlflow.db", flag: url}
    extra = ["--out", "reports"] if command == "report" else ["--devices", "cpu"]
    message = refused(capsys, command, study, *[a for pair in urls.items() for a in pair], *extra)
    assert f"{flag} {url}: an in-memory database vanishes" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.toml"]  # nothing made, nothing run


@pytest.mark.parametrize("storage, tracking, expected", [
    ("sqlite:/optuna.db", "sqlite:///mlflow.db", "write sqlite:///FILE (three slashes"),
    ("mysql://u@h/db", "sqlite:///mlflow.db", "use sqlite:///FILE (one machine) or postgresql://"),
    ("optuna.db", "sqlite:///mlflow.db", "use sqlite:///FILE"),
    ("sqlite:///optuna.db", "mlruns", "--tracking-uri mlruns: use sqlite:///FILE"),
    ("sqlite:///optuna.db", "file:///tmp/mlruns", "use sqlite:///FILE"),
    ("sqlite:///optuna.db", "http://[::1", "cannot reach the MLflow tracking server http://[::1"),
    ("sqlite:///optuna.db", "http://127.0.0.1:notaport", "cannot reach the MLflow tracking server"),
    ("postgresql+nodriver://u@127.0.0.1:1/db", "sqlite:///mlflow.db", "cannot reach the Optuna storage"),
    ("postgresql://u@[::1/db", "sqlite:///mlflow.db", "cannot reach the Optuna storage"),
    ("sqlite:///{tmp}", "sqlite:///mlflow.db", "is a folder; name a database file in it"),
    ("sqlite:///optuna.db", "sqlite:///{tmp}/a-file/mlflow.db", "a-file is not a folder"),
    ("sqlite:///optuna.db", "sqlite:///./optuna.db", "name the same file"),
    ("sqlite:////proc/no-such-dir/optuna.db", "sqlite:///mlflow.db", "cannot create the lock file"),
])
def test_malformed_or_unusable_store_urls(tmp_path, test_corpus, capsys, storage, tracking, expected):
    study = study_file(tmp_path, test_corpus)
    (tmp_path / "a-file").write_text("mine")
    message = refused(capsys, "ablate", study, "--storage", storage.format(tmp=tmp_path), "--tracking-uri",
                      tracking.format(tmp=tmp_path), "--devices", "cpu")
    assert expected in message
    assert not (tmp_path / "runs").exists() and (tmp_path / "a-file").read_text() == "mine"


# Class: a store that is damaged, not SQLite, or the other tool's (a swapped --storage and
# --tracking-uri): refused naming the file, which is left as it was (both libraries would add their tables).
def _optuna_db(path):
    optuna.storages.RDBStorage(f"sqlite:///{path}").engine.dispose()


def _mlflow_db(path):
    MlflowClient(f"sqlite:///{path}").search_experiments()


@pytest.mark.parametrize("flag, make, expected", [
    ("--storage", lambda p: p.write_bytes(b"not a database at all" * 10), "is not an SQLite database"),
    ("--tracking-uri", lambda p: p.write_bytes(b"\x00\xff" * 300), "is not an SQLite database"),
    ("--storage", lambda p: p.write_bytes(b"SQLite format 3\x00" + b"\x00" * 50), "is not a readable SQLite database"),
    ("--storage", _mlflow_db, "holds MLflow's tables (experiments, runs), not Optuna's"),
    ("--tracking-uri", _optuna_db, "holds Optuna's tables (studies, trials), not MLflow's"),
])
@pytest.mark.parametrize("command", ["ablate", "report"])
def test_damaged_or_foreign_stores_are_refused_and_left_alone(tmp_path, test_corpus, capsys, command, flag, make,
                                                              expected):
    study = study_file(tmp_path, test_corpus)
    damaged = tmp_path / "store.db"
    make(damaged)
    before = digest(damaged)
    urls = {"--storage": f"sqlite:///{tmp_path / 'optuna.db'}", "--tracking-uri": f"sqlite:///{tmp_path / 'm.db'}",
            flag: f"sqlite:///{damaged}"}
    extra = ["--devices", "cpu"] if command == "ablate" else []
    message = refused(capsys, command, study, *[a for pair in urls.items() for a in pair], *extra)
    assert f"{flag} sqlite:///{damaged}: {damaged} " in message and expected in message
    assert digest(damaged) == before


@pytest.mark.slow
def test_an_optuna_db_that_is_not_sqlite_is_one_line_and_left_as_it_was(tmp_path, test_corpus):
    study = study_file(tmp_path, test_corpus)
    (tmp_path / "optuna.db").write_text("this is not sqlite\n")
    proc = run_harness("ablate", study, "--devices", "cpu", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: --storage sqlite:///optuna.db: optuna.db is not an SQLite database; pass the --storage the study "
        "ran with, or a new file name"]
    assert (tmp_path / "optuna.db").read_text() == "this is not sqlite\n"


# Class: one coordinator per local store, the tracking store included, however a path is spelled.
@pytest.mark.parametrize("second", [
    {"--storage": "sqlite:///other-optuna.db", "--tracking-uri": "sqlite:///mlflow.db"},  # the first report's case
    {"--storage": "sqlite:///optuna.db", "--tracking-uri": "sqlite:///other-mlflow.db"},
    {"--storage": "sqlite:///other-optuna.db", "--tracking-uri": "sqlite:///link-to-mlflow.db"},
    {"--storage": "sqlite:///other-optuna.db", "--tracking-uri": "sqlite:///./sub/../mlflow.db"},
])
def test_a_second_coordinator_on_either_local_store_is_refused(tmp_path, test_corpus, capsys, second):
    study = study_file(tmp_path, test_corpus)
    (tmp_path / "sub").mkdir()
    (tmp_path / "link-to-mlflow.db").symlink_to(tmp_path / "mlflow.db")
    with LocalLock("sqlite:///optuna.db", "sqlite:///mlflow.db"):  # the first coordinator, running
        message = refused(capsys, "ablate", study, *[a for pair in second.items() for a in pair], "--devices", "cpu")
    assert "another ablation is already using" in message
    assert not (tmp_path / "other-optuna.db").exists() and not (tmp_path / "other-mlflow.db").exists()


# The checkpoint folder is a store too: trial numbers restart at 0 in every Optuna storage, so a runs folder
# used with two storages (at once, or one after the other) would mix their trial-N checkpoints.
def test_a_runs_folder_of_another_storage_is_refused_before_any_trial(tmp_path, test_corpus, capsys):
    path = study_file(tmp_path, test_corpus)
    study = load_study(path)
    runs = tmp_path / "runs"
    # The study ran on storage a.db with this runs folder: run_study claimed the folder when it started.
    first = Ledger(study, open_storage(f"sqlite:///{tmp_path / 'a.db'}"), study.identity(), log=lambda *a: None)
    claim_runs_dir(runs / study.name, first.uid)
    capsys.readouterr()  # what the first run's libraries logged
    message = refused(capsys, "ablate", path, "--storage", f"sqlite:///{tmp_path / 'b.db'}", "--tracking-uri",
                      f"sqlite:///{tmp_path / 'mlflow.db'}", "--devices", "cpu", "--runs-dir", runs)
    assert f"{runs / study.name} holds the checkpoints of this study run on another Optuna storage" in message
    assert "pass another --runs-dir" in message
    assert (runs / study.name / "STUDY_UID").read_text().strip() == first.uid
    assert sorted(p.name for p in (runs / study.name).iterdir()) == ["STUDY_UID"]  # no trial started


# Class: a password in a store URL never shows, whatever characters it holds, raw or percent-encoded,
# valid URL or not; through the real error path of `worker` with nothing listening.
def _passwords(chars):
    for c in chars:
        yield f"Pw{c}0lQx{c}9Zk"
        yield f"Pw{quote(c, safe='')}0lQx9Zk"


PRINTABLE = [chr(i) for i in range(0x20, 0x7F)]
DELIMITERS = list("@:/?#[]%&=+ ;'\"\\")


@pytest.mark.slow
@pytest.mark.parametrize("form, chars", [
    ("postgresql://harness:{pw}@127.0.0.1:1/optuna", PRINTABLE),  # --storage
    ("postgresql://harness:{pw}@127.0.0.1:1/mlflow", DELIMITERS),  # --tracking-uri
    ("http://harness:{pw}@127.0.0.1:1", DELIMITERS),  # --tracking-uri
])
def test_passwords_never_show(tmp_path, test_corpus, capsys, form, chars):
    study = study_file(tmp_path, test_corpus)
    flag = "--storage" if form.endswith("/optuna") else "--tracking-uri"
    leaks = []
    for pw in _passwords(chars):
        urls = {"--storage": "sqlite:///optuna.db", "--tracking-uri": "sqlite:///mlflow.db", flag: form.format(pw=pw)}
        code = main(["worker", str(study), *[a for pair in urls.items() for a in pair], "--devices", "cpu"])
        out, err = capsys.readouterr()
        lines = err.strip().splitlines()
        if code != 2 or len(lines) != 1 or "Traceback" in err or any(part in out + err for part in ("0lQx", "9Zk")):
            leaks.append((pw, code, err))
    assert not leaks


@pytest.mark.slow
def test_a_password_holding_a_hash_is_masked_in_the_one_line_error(tmp_path, test_corpus):
    study = study_file(tmp_path, test_corpus)
    proc = run_harness("worker", study, "--storage", "postgresql://harness:Se#cret@127.0.0.1:1/optuna",
                       "--tracking-uri", "sqlite:///m.db", "--devices", "cpu", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Se#cret" not in proc.stdout + proc.stderr and "cret" not in proc.stderr
    assert "postgresql://harness:***@127.0.0.1:1/optuna" in proc.stderr


@pytest.mark.parametrize("url, secret", [
    ("harness:S3cretPart@db-host/optuna", "S3cretPart"),  # no scheme at all
    ("postgresql:/harness:S3cretPart@db-host/optuna", "S3cretPart"),  # one slash
    ("postgresql://harness@db-host/optuna?password=S3cret#Part&sslmode=require", "Part"),
    ("postgresql://harness@db-host/optuna?PASSWORD=S3cretPart", "S3cretPart"),
])
def test_passwords_in_malformed_urls_are_masked(url, secret):
    assert secret not in redact(url)


# --- corpus folders ----------------------------------------------------------------------------
# Class: the corpus content is part of what a study and a run are; a changed split file is refused on resume,
# by the Optuna side, the MLflow side and a `train` checkpoint, naming the file.
def small_corpus(folder: Path, test_corpus: str, lines: int = 300) -> Path:
    """The first lines of each split of the test corpus, in a folder of its own that a test may edit."""
    folder.mkdir()
    for split, path in find_split_files(load_corpus(test_corpus, log=lambda *a: None).path).items():
        head = path.read_text(encoding="utf-8").splitlines(keepends=True)[:lines]
        (folder / f"{split}.txt").write_text("".join(head), encoding="utf-8")
    return folder


def test_a_corpus_changed_before_the_resume_is_refused_naming_the_file(tmp_path, test_corpus, capsys):
    corpus_dir = small_corpus(tmp_path / "corpus", test_corpus)
    path = study_file(tmp_path, str(corpus_dir))
    study, corpus = load_study(path), load_corpus(str(corpus_dir))
    # The first run records the study's identity as run_study does when it starts; then it stops.
    identity = study.identity(corpus.md5, find_split_files(corpus.path))
    Ledger(study, open_storage(f"sqlite:///{tmp_path / 'optuna.db'}"), identity, log=lambda *a: None)
    Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", study, identity, {})
    train = corpus_dir / "train.txt"
    train.write_text(train.read_text() + "a line added between the interruption and the resume\n")
    capsys.readouterr()  # what the first run's libraries logged

    message = refused(capsys, "ablate", path, *stores(tmp_path), "--devices", "cpu")
    # MLflow's record is checked first: it is read-only, the ledger's check comes before its first write.
    assert f"the corpus changed since this study started: {train}" in message and "MLflow experiment" in message
    other = ["--storage", stores(tmp_path)[1], "--tracking-uri", f"sqlite:///{tmp_path / 'new-mlflow.db'}"]
    message = refused(capsys, "ablate", path, *other, "--devices", "cpu")
    assert f"the corpus changed since this study started: {train}" in message and "Optuna study" in message
    assert not (tmp_path / "runs").exists()


def test_a_corpus_changed_before_a_train_resume_is_refused_naming_the_file(tmp_path, test_corpus, capsys):
    corpus_dir = small_corpus(tmp_path / "corpus", test_corpus)
    path = study_file(tmp_path, str(corpus_dir))
    argv = ["train", path, "--variant", "awd", "--out", tmp_path / "out", "--no-progress"]
    assert main([str(a) for a in argv]) == 0
    before = digest(tmp_path / "out" / "last.pt")
    valid = corpus_dir / "valid.txt"
    valid.write_text(valid.read_text() + "a line added between the runs\n")
    capsys.readouterr()  # the first run's output
    message = refused(capsys, *argv)
    assert str(valid) in message and "corpus changed" in message and "--fresh" in message
    assert digest(tmp_path / "out" / "last.pt") == before


# --- checkpoints ------------------------------------------------------------------------------
# Class: a checkpoint that is truncated, empty, not torch, a folder, missing its partner, another file's
# layout, or written by an older harness: one line naming the file and what to do; no file is touched.
def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _foreign_layout(folder):
    (folder / "last.pt").write_bytes((folder / "best.pt").read_bytes())  # best.pt has no optimizer state


def _retired_key(folder):
    saved = torch.load(folder / "last.pt", weights_only=True)
    saved["config"]["train"]["warmup_steps"] = 100  # a field an older harness had
    torch.save(saved, folder / "last.pt")


DAMAGES = {
    "truncated last.pt": ("last.pt", lambda f: _truncate(f / "last.pt"), "not a readable checkpoint"),
    "empty last.pt": ("last.pt", lambda f: (f / "last.pt").write_bytes(b""), "not a readable checkpoint"),
    "text last.pt": ("last.pt", lambda f: (f / "last.pt").write_text("hello\n"), "last.pt"),
    "truncated best.pt": ("best.pt", lambda f: _truncate(f / "best.pt"), "not a readable checkpoint"),
    "missing best.pt": ("best.pt", lambda f: (f / "best.pt").unlink(), "No such file or directory"),
    "best.pt as last.pt": ("last.pt", _foreign_layout, "not a last.pt of this harness"),
    "older harness": ("last.pt", _retired_key, "train.warmup_steps 100 -> None"),
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, test_corpus):
    """A `train` run of one epoch: its study file and checkpoint folder."""
    folder = tmp_path_factory.mktemp("trained")
    study = study_file(folder, test_corpus)
    assert main(["train", str(study), "--variant", "awd", "--out", str(folder / "out"), "--no-progress"]) == 0
    return study, folder / "out"


@pytest.mark.slow
@pytest.mark.parametrize("damage", DAMAGES, ids=list(DAMAGES))
def test_damaged_checkpoints_are_one_line_and_touch_nothing(tmp_path, capsys, trained, damage):
    study, original = trained
    out = tmp_path / "out"
    out.mkdir()
    for name in ("last.pt", "best.pt"):
        (out / name).write_bytes((original / name).read_bytes())
    damaged, make, expected = DAMAGES[damage]
    make(out)
    before = {p.name: digest(p) for p in out.iterdir()}
    message = refused(capsys, "train", study, "--variant", "awd", "--out", out, "--no-progress")
    assert f"{out / damaged}" in message and expected in message and "--fresh" in message
    assert {p.name: digest(p) for p in out.iterdir()} == before


@pytest.mark.slow
def test_a_truncated_last_checkpoint_is_one_line_naming_the_file(tmp_path, trained):
    study, original = trained
    out = tmp_path / "runs" / "bad" / "awd-seed141"
    out.mkdir(parents=True)
    for name in ("last.pt", "best.pt"):
        (out / name).write_bytes((original / name).read_bytes())
    _truncate(out / "last.pt")
    proc = run_harness("train", study, "--variant", "awd", "--no-progress", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    # torch's reason depends on where the cut falls in the zip (a missing central directory, or a seek past the
    # end: "Invalid argument"); the line around it is the harness's.
    (line,) = proc.stderr.strip().splitlines()
    assert re.fullmatch(rf"error: {re.escape(str(Path('runs/bad/awd-seed141/last.pt')))}: not a readable checkpoint "
                        r"\([^\n]+\); pass --fresh to start over, or --out for a new folder", line), line


# Class: --fresh deletes only what a run wrote; never the folder, never the user's files.
@pytest.mark.slow
def test_fresh_deletes_only_the_runs_own_files(tmp_path, test_corpus, capsys, trained):
    study, original = trained
    out = tmp_path / "experiments"
    (out / "mine").mkdir(parents=True)
    (out / "results.csv").write_text("variant,ppl\nawd,58.8\n")
    (out / "mine" / "notes.txt").write_text("keep")
    for name in ("last.pt", "best.pt"):
        (out / name).write_bytes((original / name).read_bytes())
    (out / "last.pt.tmp").write_bytes(b"half a checkpoint")
    assert main(["train", str(study), "--variant", "awd", "--out", str(out), "--fresh", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "resuming" not in printed and f"--fresh: deleted {out / 'last.pt'}" in printed
    assert (out / "results.csv").read_text() == "variant,ppl\nawd,58.8\n"
    assert (out / "mine" / "notes.txt").read_text() == "keep"
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "last.pt", "mine", "results.csv"]


# --- output paths -----------------------------------------------------------------------------
# Class: every output folder option naming a regular file, a folder under a regular file, or a place that
# cannot be written; refused before anything runs, the file untouched.
OUTPUTS = [
    ["train", "{study}", "--variant", "awd", "--out", "{out}"],
    ["ablate", "{study}", "--devices", "cpu", "--runs-dir", "{out}"],
    ["ablate", "{study}", "--devices", "cpu", "--reports-dir", "{out}"],
    ["worker", "{study}", "--storage", "sqlite:///o.db", "--tracking-uri", "sqlite:///m.db", "--runs-dir", "{out}"],
    ["report", "{study}", "--out", "{out}"],
    ["masks", "--out", "{out}"],
    ["data", "fetch", "ptb", "--data-dir", "{out}", "--url", "http://127.0.0.1:1"],
]


@pytest.mark.parametrize("where", ["a regular file", "under a regular file", "/proc"])
@pytest.mark.parametrize("argv", OUTPUTS, ids=["train --out", "ablate --runs-dir", "ablate --reports-dir",
                                              "worker --runs-dir", "report --out", "masks --out", "data --data-dir"])
def test_output_paths_that_cannot_be_folders(tmp_path, test_corpus, capsys, argv, where):
    study = study_file(tmp_path, test_corpus)
    somefile = tmp_path / "somefile"
    somefile.write_text("the user's data\n")
    out = {"a regular file": somefile, "under a regular file": somefile / "sub", "/proc": "/proc/harness-out"}[where]
    message = refused(capsys, *[a.format(study=study, out=out) for a in argv])
    assert str(out if where != "under a regular file" else somefile) in message
    assert somefile.read_text() == "the user's data\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.toml", "somefile"]


@pytest.mark.slow
def test_an_out_folder_that_is_a_file_is_one_line(tmp_path, test_corpus):
    study = study_file(tmp_path, test_corpus)
    (tmp_path / "somefile").write_text("x")
    proc = run_harness("train", study, "--variant", "awd", "--out", "somefile", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: --out somefile: somefile is a file, not a folder; pass a folder (it is made if missing)"]


# --- faults while working ----------------------------------------------------------------------
# Class: a checkpoint write that fails (a full disk: /dev/full answers every write with ENOSPC, as a full
# file system does, with no root or mount needed) is one line naming the file; no partial file is left and
# the last complete checkpoint is kept.
def test_a_full_disk_at_the_first_checkpoint(tmp_path, test_corpus):
    config = load_study(study_file(tmp_path, test_corpus)).run_config("awd")
    out = tmp_path / "out"
    out.mkdir()
    (out / "best.pt.tmp").symlink_to("/dev/full")
    with pytest.raises(CheckpointError) as info:
        train_model(config, load_corpus(test_corpus), checkpoint_dir=out, progress=False)
    assert str(info.value).startswith(f"cannot write the checkpoint {out / 'best.pt'} (No space left on device, "
                                      "ENOSPC); free some space")
    assert list(out.iterdir()) == []


def test_a_disk_that_fills_during_a_run_keeps_the_last_checkpoint(tmp_path, test_corpus):
    config = load_study(study_file(tmp_path, test_corpus)).run_config("awd", {"train.epochs": 3})
    out = tmp_path / "out"

    def fill_the_disk(epoch):
        if epoch.epoch == 1:
            (out / "last.pt.tmp").symlink_to("/dev/full")

    with pytest.raises(CheckpointError, match=r"cannot write the checkpoint .*last\.pt \(No space left on device"):
        train_model(config, load_corpus(test_corpus), checkpoint_dir=out, on_epoch=fill_the_disk, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "last.pt"]
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 1


def test_a_failed_write_of_any_errno_is_one_line_naming_the_file(tmp_path, test_corpus, monkeypatch):
    config = load_study(study_file(tmp_path, test_corpus)).run_config("awd")
    real_save = torch.save

    def read_only_file_system(payload, out):
        real_save(payload, out)  # half written, then the file system refuses
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr("harness.train.torch.save", read_only_file_system)
    with pytest.raises(CheckpointError, match=r"best.pt \(Read-only file system, EROFS\)"):
        train_model(config, load_corpus(test_corpus), checkpoint_dir=tmp_path / "out", progress=False)
    assert list((tmp_path / "out").iterdir()) == []


# An `ablate` in which a trial fails for a reason outside it (a full disk, another run's checkpoints in its
# folder) stops starting trials, exits non-zero with the reason, and loses nothing: the trial is retried
# without using an attempt, and the same command completes the study once the cause is gone.
def _halted_ablation(tmp_path, test_corpus, plant):
    """A one-trial-per-variant study whose first trial meets `plant`; returns what the resume needs."""
    study = load_study(study_file(tmp_path, test_corpus, STUDY.replace("trials = 2", "trials = 1")))
    storage, uri, runs = f"sqlite:///{tmp_path / 'optuna.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "runs"
    planted = []
    for variant in study.variants:
        folder = runs / study.name / variant / SEARCH / "trial-0"
        folder.mkdir(parents=True)
        plant(folder)
        planted.append(folder)
    with pytest.raises(UserError) as info:
        run_study(study, storage=storage, tracking_uri=uri, slots=[Slot(0, "cpu", 1)], runs_dir=runs,
                     log=lambda *a: None, plan=False)
    message = str(info.value)
    assert message.startswith("stopped: a trial failed for a reason outside it") and "\n" not in message
    assert "run the same command again" in message
    trials = [t for v in study.variants
              for t in optuna.load_study(study_name=optuna_name(study, v, SEARCH), storage=storage).trials]
    ran = [t for t in trials if t.state != TrialState.WAITING]
    assert len(ran) == 1 and ran[0].state == TrialState.FAIL  # one trial, then no more: no retry burnt
    assert ran[0].user_attrs["interrupted"] and ran[0].user_attrs["retried"]
    assert not list(planted[0].glob("*.tmp"))  # the trial that ran left no partial file
    return study, storage, uri, runs, planted, message


@pytest.mark.slow
def test_ablate_on_a_full_disk_stops_at_once_and_resumes_once_there_is_space(tmp_path, test_corpus):
    study, storage, uri, runs, planted, message = _halted_ablation(
        tmp_path, test_corpus, lambda folder: (folder / "best.pt.tmp").symlink_to("/dev/full"))
    assert f"cannot write the checkpoint {planted[0] / 'best.pt'} (No space left on device, ENOSPC)" in message
    for folder in planted:  # space again
        for path in folder.iterdir():
            path.unlink()
    run_study(study, storage=storage, tracking_uri=uri, slots=[Slot(0, "cpu", 1)], runs_dir=runs,
                 log=lambda *a: None, plan=False)
    for variant in study.variants:
        trials = optuna.load_study(study_name=optuna_name(study, variant, SEARCH), storage=storage).trials
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        assert len(complete) == 1 and complete[0].user_attrs["attempt"] == 1


@pytest.mark.slow
def test_ablate_stops_on_another_runs_checkpoints_in_a_trial_folder(tmp_path, test_corpus):
    *_, planted, message = _halted_ablation(
        tmp_path, test_corpus, lambda folder: (folder / "last.pt").write_bytes(b"another study's checkpoint"))
    assert f"{planted[0]} already holds checkpoints of another run" in message
    assert (planted[0] / "last.pt").read_bytes() == b"another study's checkpoint"
