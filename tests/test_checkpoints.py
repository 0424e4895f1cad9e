"""A run's settings against its corpus, and its checkpoints: what is refused, with which message, and what is kept.

Fast and in-process (a tiny synthetic corpus, one-epoch runs): every refusal names the file, key or value and the
fix, as the CLI prints it (tests/test_bad_input.py checks that the CLI does print it, with exit code 2).
"""

import dataclasses
import errno
import os
import re
from pathlib import Path

import pytest
import torch

from harness.data import Corpus
from harness.errors import UserError
from harness.train import CheckpointError, adopt_checkpoints, check_splits, clear_checkpoints, train_model
from helpers import tiny_config as config, tiny_corpus

pytestmark = pytest.mark.fast

START_OVER = "pass --fresh to start over, or --out for a new folder"


# --- settings the corpus cannot serve ----------------------------------------------------------------------
@pytest.mark.parametrize("settings, message", [
    ({"train_tokens": 3001}, "train.train_tokens = 3001 exceeds the train split of tiny (3,000 tokens); use at "
                             "most 3,000 (0 = the whole split)"),
    ({"valid_tokens": 601}, "train.valid_tokens = 601 exceeds the valid split of tiny (600 tokens); use at most 600 "
                            "(0 = the whole split)"),
    ({"eval_batch_size": 301}, "train.eval_batch_size = 301 is too large for the valid split of tiny (600 tokens): "
                               "each of its columns needs at least 2 tokens; use at most 300"),
    ({"valid_tokens": 3, "eval_batch_size": 2},
     "train.eval_batch_size = 2 is too large for the valid split of tiny (3 tokens): each of its columns needs at "
     "least 2 tokens; use at most 1"),
    ({"test_batch_size": 301}, "train.test_batch_size = 301 is too large for the test split of tiny (600 tokens): "
                               "each of its columns needs at least 2 tokens; use at most 300"),
    ({"bptt": 750}, "train.bptt = 750 is longer than the 749 steps each of the 4 training columns holds; use at "
                    "most 749, or a smaller train.batch_size"),
])
def test_settings_the_corpus_cannot_serve_are_refused_before_training(settings, message):
    with pytest.raises(UserError) as err:
        check_splits(config(**settings), tiny_corpus())
    assert str(err.value) == message


@pytest.mark.parametrize("settings", [
    {"train_tokens": 3000, "valid_tokens": 600}, {"eval_batch_size": 300, "test_batch_size": 300}, {"bptt": 749},
    {"valid_tokens": 4, "eval_batch_size": 2},
])
def test_settings_at_the_corpus_limits_are_accepted(settings):
    check_splits(config(**settings), tiny_corpus())


# --- damaged or foreign checkpoints ---------------------------------------------------------------------------
class Stop(Exception):
    pass


def one_epoch(folder, corpus=None):
    """The first epoch of a two-epoch run, stopped after it (as Ctrl-C would): its checkpoints stay."""
    def stop(result):
        raise Stop

    with pytest.raises(Stop):
        train_model(config(epochs=2), corpus or tiny_corpus(n_train=400), checkpoint_dir=folder, progress=False,
                    evaluate_test=False, on_epoch=stop)


def refusal(folder, corpus=None, **kwargs) -> str:
    with pytest.raises(CheckpointError) as err:
        train_model(config(epochs=2), corpus or tiny_corpus(n_train=400), checkpoint_dir=folder, progress=False,
                    evaluate_test=False, **kwargs)
    return str(err.value)


def test_an_unreadable_last_checkpoint_is_named_with_the_reason(tmp_path):
    (tmp_path / "last.pt").mkdir()
    assert refusal(tmp_path) == f"{tmp_path / 'last.pt'}: not a readable checkpoint (Is a directory); {START_OVER}"
    (tmp_path / "last.pt").rmdir()
    (tmp_path / "last.pt").write_bytes(b"")
    assert refusal(tmp_path).startswith(f"{tmp_path / 'last.pt'}: not a readable checkpoint (")
    assert refusal(tmp_path).endswith(f"); {START_OVER}")


@pytest.mark.parametrize("saved", [[1, 2], {"weights": {}}, {"model": "not a state dict"}])
def test_a_file_that_is_not_a_checkpoint_of_this_harness_is_refused(tmp_path, saved):
    torch.save(saved, tmp_path / "last.pt")
    assert refusal(tmp_path) == f"{tmp_path / 'last.pt'}: not a checkpoint of this harness; {START_OVER}"


@pytest.mark.parametrize("saved, missing", [
    ({"model": {}}, "config, epoch, optimizer, epochs, best"),
    ({"model": {}, "config": {}, "epoch": 1, "optimizer": {}, "epochs": []}, "best"),
    ({"model": {}, "config": "awd", "epoch": 1, "optimizer": {}, "epochs": [], "best": {}}, "config"),
])
def test_a_best_checkpoint_in_place_of_the_last_one_is_refused(tmp_path, saved, missing):
    torch.save(saved, tmp_path / "last.pt")
    assert refusal(tmp_path) == (f"{tmp_path / 'last.pt'}: not a last.pt of this harness (no {missing}); "
                                 f"{START_OVER}")


def corpus_with(base: Corpus, path: Path, **changes) -> Corpus:
    return dataclasses.replace(base, path=path, **changes)


def test_resuming_on_a_changed_corpus_is_refused_and_names_the_file(tmp_path):
    corpus = tiny_corpus(n_train=400)
    one_epoch(tmp_path / "run", corpus)
    changed = corpus_with(corpus, tmp_path / "nowhere", md5={**corpus.md5, "train": "new", "test": "new too"})
    assert refusal(tmp_path / "run", changed) == (
        f"{tmp_path / 'run' / 'last.pt'}: the corpus changed since this run started (the test split, the train "
        f"split); resuming would train on two datasets: restore it, or {START_OVER}")
    folder = tmp_path / "corpus"
    folder.mkdir()
    for split in ("train", "valid", "test"):
        (folder / f"ptb.{split}.txt").write_text("a b\n")
    named = corpus_with(corpus, folder, md5={**corpus.md5, "valid": "new"})
    assert f"changed since this run started ({folder / 'ptb.valid.txt'}); " in refusal(tmp_path / "run", named)


def test_a_checkpoint_of_another_vocabulary_does_not_fit(tmp_path):
    corpus = tiny_corpus(n_train=400)
    one_epoch(tmp_path, corpus)
    bigger = tiny_corpus(n_train=400, vocab=50)
    message = refusal(tmp_path, corpus_with(bigger, corpus.path, md5=corpus.md5))
    assert message.startswith(f"{tmp_path / 'last.pt'}: does not fit this model (Error(s) in loading state_dict for "
                              "AWDLSTM")
    assert message.endswith(f"); {START_OVER}") and "\n" not in message


def test_a_fresh_run_never_continues_or_overwrites_checkpoints_already_there(tmp_path):
    for name in ("last.pt", "best.pt"):
        folder = tmp_path / name
        folder.mkdir()
        (folder / name).write_bytes(b"someone else's")
        assert refusal(folder, resume=False) == (
            f"{folder} already holds checkpoints of another run (of another Optuna storage?); give this study its "
            "own --runs-dir, or delete that folder")
        assert (folder / name).read_bytes() == b"someone else's"


def test_a_checkpoint_folder_that_cannot_be_made_is_named(tmp_path):
    (tmp_path / "a file").write_text("")
    assert refusal(tmp_path / "a file" / "run") == (
        f"cannot create the checkpoint folder {tmp_path / 'a file' / 'run'} (Not a directory); choose a writable one")


# --- writing checkpoints ------------------------------------------------------------------------------------------
def test_a_failed_write_is_named_keeps_the_last_checkpoints_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    one_epoch(tmp_path)
    kept = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert set(kept) == {"best.pt", "last.pt"}

    def disk_full(fd):  # after the temporary file was written, before it replaces the checkpoint
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("harness.train.os.fsync", disk_full)
    with pytest.raises(CheckpointError) as err:
        one_epoch_more(tmp_path)
    assert re.fullmatch(rf"cannot write the checkpoint {re.escape(str(tmp_path))}/(best|last)\.pt \(No space left on "
                        r"device, ENOSPC\); free some space or choose a writable --out / --runs-dir \(the last "
                        r"complete checkpoint is kept\)", str(err.value)), str(err.value)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == kept


def test_a_checkpoint_name_taken_by_a_folder_is_named(tmp_path):
    (tmp_path / "best.pt").mkdir()  # the rename onto it fails (EISDIR) after the temporary file was written
    with pytest.raises(CheckpointError) as err:
        one_epoch(tmp_path)
    assert str(err.value).startswith(f"cannot write the checkpoint {tmp_path / 'best.pt'} (Is a directory, EISDIR); ")
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]


def one_epoch_more(folder):
    """Resume the run stopped by one_epoch for its second epoch."""
    train_model(config(epochs=2), tiny_corpus(n_train=400), checkpoint_dir=folder, progress=False,
                evaluate_test=False)


def test_a_write_error_without_an_errno_is_named_by_its_text(tmp_path, monkeypatch):
    def full(payload, out):
        raise OSError("quota exceeded")

    monkeypatch.setattr("harness.train.torch.save", full)
    with pytest.raises(CheckpointError) as err:
        one_epoch(tmp_path)
    assert str(err.value).startswith(f"cannot write the checkpoint {tmp_path / 'best.pt'} (quota exceeded); ")
    assert list(tmp_path.iterdir()) == []


def test_clear_checkpoints_deletes_what_runs_write_and_nothing_else(tmp_path, monkeypatch):
    one_epoch(tmp_path)

    def killed(fd):  # the process dies between writing and renaming: the temporary file stays behind
        raise KeyboardInterrupt

    monkeypatch.setattr("harness.train.os.fsync", killed)
    with pytest.raises(KeyboardInterrupt):
        one_epoch_more(tmp_path)
    monkeypatch.undo()
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert len(leftovers) == 3 and set(leftovers) > {"best.pt", "last.pt"}
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "link").symlink_to(tmp_path / "notes.txt")
    os.replace(tmp_path / "link", tmp_path / "last.pt")  # a checkpoint name that is a link: deleted, not followed
    deleted = clear_checkpoints(tmp_path)
    assert sorted(p.name for p in deleted) == leftovers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert clear_checkpoints(tmp_path / "never made") == []


def test_a_write_that_fails_before_the_file_exists_is_named(tmp_path, monkeypatch):
    def no_space(path, mode="r", *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("harness.train.open", no_space, raising=False)  # shadows the builtin in harness.train
    with pytest.raises(CheckpointError) as err:
        one_epoch(tmp_path)
    assert str(err.value).startswith(f"cannot write the checkpoint {tmp_path / 'best.pt'} (No space left on device, "
                                     "ENOSPC); ")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("error, reason", [
    (ValueError("First sentence. Second sentence\nmore advice"), "First sentence"),
    (ValueError("x" * 300), "x" * 200),
    (EOFError(), "EOFError"),
])
def test_an_unreadable_checkpoint_is_named_by_the_first_sentence_of_its_error(tmp_path, monkeypatch, error, reason):
    one_epoch(tmp_path)

    def damaged(*args, **kwargs):
        raise error

    monkeypatch.setattr("harness.train.torch.load", damaged)
    assert refusal(tmp_path) == f"{tmp_path / 'last.pt'}: not a readable checkpoint ({reason}); {START_OVER}"


# --- a retried trial continuing its earlier attempt (the study's retries) ---------------------------------------
def continued(folder: Path, sources: list, corpus):
    """A retried trial's run as a study's worker runs it: adopt the earlier attempts' checkpoints, then train
    with start-over on; returns (result, notes, epochs it restored)."""
    notes, restored = [], []
    note = adopt_checkpoints(folder, sources)
    notes += [note] if note else []
    result = train_model(config(epochs=2), corpus, checkpoint_dir=folder, progress=False, evaluate_test=True,
                         start_over=notes.append, on_begin=restored.extend)
    return result, notes, restored


def test_a_retry_continues_its_earlier_attempts_checkpoint_bit_exactly(tmp_path):
    corpus = tiny_corpus(n_train=400)
    whole = train_model(config(epochs=2), corpus, checkpoint_dir=tmp_path / "whole", progress=False)
    one_epoch(tmp_path / "trial-0", corpus)
    result, notes, restored = continued(tmp_path / "trial-2", [tmp_path / "trial-1", tmp_path / "trial-0"], corpus)
    assert notes == [] and [e.epoch for e in restored] == [1]
    assert [e.val_loss for e in result.epochs] == [e.val_loss for e in whole.epochs]
    assert (result.test_loss, result.best_epoch) == (whole.test_loss, whole.best_epoch)
    # The earlier attempt's folder is its own: nothing the retry trained was written there.
    assert torch.load(tmp_path / "trial-0" / "last.pt", weights_only=True)["epoch"] == 1


@pytest.mark.parametrize("damage", ["cut off", "empty", "best.pt of another epoch"])
def test_a_damaged_checkpoint_makes_the_retry_start_over_with_one_line(tmp_path, damage):
    corpus = tiny_corpus(n_train=400)
    fresh = train_model(config(epochs=2), corpus, progress=False)
    one_epoch(tmp_path / "trial-0", corpus)
    last = tmp_path / "trial-0" / "last.pt"
    if damage == "cut off":  # a write cut off mid-way, as a full disk or a dead machine leaves it
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    elif damage == "empty":
        last.write_bytes(b"")
    else:
        best = torch.load(tmp_path / "trial-0" / "best.pt", weights_only=True)
        best["metrics"]["epoch"] = 2
        torch.save(best, tmp_path / "trial-0" / "best.pt")
    result, notes, restored = continued(tmp_path / "trial-1", [tmp_path / "trial-0"], corpus)
    assert restored == [] and len(notes) == 1 and "\n" not in notes[0]
    assert notes[0].startswith(str(tmp_path / "trial-1")) and START_OVER not in notes[0]
    assert [e.val_loss for e in result.epochs] == [e.val_loss for e in fresh.epochs]  # no wrong result either


def test_a_retry_with_no_checkpoint_of_its_earlier_attempt_starts_over_saying_where_it_looked(tmp_path):
    corpus = tiny_corpus(n_train=400)
    result, notes, restored = continued(tmp_path / "trial-1", [tmp_path / "elsewhere" / "trial-0"], corpus)
    assert restored == [] and notes == [f"no checkpoint of its earlier attempt in {tmp_path / 'elsewhere' / 'trial-0'} "
                                        "(another machine's runs folder, not shared?)"]
    assert len(result.epochs) == 2


def test_a_retry_never_adopts_into_a_folder_holding_another_runs_checkpoints(tmp_path):
    one_epoch(tmp_path / "trial-0")
    one_epoch(tmp_path / "trial-1")
    with pytest.raises(CheckpointError, match="already holds checkpoints of another run"):
        adopt_checkpoints(tmp_path / "trial-1", [tmp_path / "trial-0"])
