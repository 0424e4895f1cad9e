"""Integrity of a study's stores and data against what happens outside the harness (issue #20, items 1-4, 9, 10):
one local store however its URL is spelled, stores the study did not make, a corpus edited while a study runs,
secrets in any text the harness prints, stores edited by people, and summaries written once.

Most cases run in-process through `harness.cli.main` or the store classes; the corpus edit and the secret in a
library's exception run the real command (those tests are `slow`).
"""

import hashlib
import os
import signal
from pathlib import Path
from urllib.parse import quote

import pytest

from harness.cli import main
from harness.errors import UserError
from harness.study.stores import LocalLock, check_sqlite, sqlite_path

pytestmark = pytest.mark.fast


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    """Each test in its own folder (the default stores and runs/ are relative), SIGTERM restored afterwards."""
    monkeypatch.chdir(tmp_path)
    handler = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, handler)


def refused(capsys, *argv) -> str:
    """The error line of a command that must be refused: exit 2, one line on stderr, no traceback."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 2, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- 1. one store, many spellings ------------------------------------------------------------------------
# Class: every spelling of one database file that SQLite opens as that file (relative or absolute, dot segments,
# symlinked file or folder, percent-encoding, SQLAlchemy's query options, SQLite URI filenames with and without an
# authority, harmless URI parameters) is that file for the one-writer lock and the "same file" check.
def spellings(folder: Path) -> list[str]:
    """URLs that all open folder/optuna.db (the working folder is `folder`)."""
    absolute = folder / "optuna.db"
    return [
        "sqlite:///optuna.db", f"sqlite:///{absolute}", "sqlite:///./optuna.db", "sqlite:///sub/../optuna.db",
        "sqlite:///link.db", "sqlite:///linked-folder/optuna.db", "sqlite:///opt%75na.db", "sqlite:///optuna.db?timeout=9",
        "sqlite:///file:optuna.db?uri=true", f"sqlite:///file:{absolute}?uri=true", f"sqlite:///file://{absolute}?uri=true",
        f"sqlite:///file://localhost{absolute}?uri=true", "sqlite:///file:opt%2575na.db?uri=true",
        "sqlite:///file:optuna.db?mode=rwc&uri=true", "sqlite:///file:optuna.db?cache=shared&uri=true",
        "sqlite:///optuna.db?uri=true", f"sqlite:///file:{quote(str(absolute))}?uri=true",
    ]


def make_aliases(folder: Path) -> None:
    (folder / "sub").mkdir()
    (folder / "link.db").symlink_to(folder / "optuna.db")
    (folder / "linked-folder").symlink_to(folder)


def test_every_spelling_of_a_store_names_its_real_file(tmp_path):
    make_aliases(tmp_path)
    for url in spellings(tmp_path):
        assert sqlite_path(url, "--storage").resolve() == tmp_path / "optuna.db", url


@pytest.mark.parametrize("index", range(17))
def test_a_second_coordinator_is_refused_whatever_the_spelling(tmp_path, index):
    make_aliases(tmp_path)
    url = spellings(tmp_path)[index]
    with LocalLock("sqlite:///optuna.db", "sqlite:///mlflow.db"):  # the first coordinator, running
        with pytest.raises(UserError, match="another ablation is already using"):
            with LocalLock(url, "sqlite:///other-mlflow.db"):
                pass
        # and as MLflow's store: the same file for both stores is refused before any lock
        with pytest.raises(UserError, match="name the same file"):
            with LocalLock("sqlite:///optuna.db", url):
                pass


def test_the_issues_example_leaves_the_locked_store_untouched(tmp_path, capsys, test_corpus):
    from harness.study.ledger.storage import open_storage

    open_storage("sqlite:///optuna.db").engine.dispose()
    before = digest(tmp_path / "optuna.db")
    study = tmp_path / "s.toml"
    study.write_text((Path(__file__).parents[1] / "studies" / "smoke.toml").read_text())
    with LocalLock("sqlite:///optuna.db", "sqlite:///mlflow.db"):
        message = refused(capsys, "ablate", study, "--storage", "sqlite:///file:optuna.db?uri=true", "--devices",
                          "cpu", "--tracking-uri", "sqlite:///m2.db")
    assert f"another ablation is already using {tmp_path / 'optuna.db'}" in message
    assert digest(tmp_path / "optuna.db") == before and not (tmp_path / "file:optuna.db").exists()


@pytest.mark.parametrize("url, expected", [
    ("sqlite:///file:optuna.db?mode=ro&uri=true", "mode=ro would make SQLite open the store read-only"),
    ("sqlite:///file:optuna.db?immutable=1&uri=true", "immutable=1 would make"),
    ("sqlite:///file:optuna.db?nolock=1&uri=true", "nolock=1 would make"),
    ("sqlite:///file:optuna.db?vfs=unix-none&uri=true", "vfs=unix-none would make"),
    ("sqlite:///file://otherhost/x/optuna.db?uri=true", "SQLite opens no file on another host (otherhost)"),
    ("sqlite:///optuna.db?uri=maybe", "not a SQLite URL SQLAlchemy can read"),
    ("sqlite:///file::memory:?uri=true", "an in-memory database vanishes"),
    ("sqlite:///file:x?vfs=memdb&uri=true", "an in-memory database vanishes"),
])
def test_spellings_that_open_no_safe_file_are_refused(url, expected):
    with pytest.raises(UserError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        sqlite_path(url, "--storage")


def test_a_store_with_two_hard_links_is_refused(tmp_path):
    from harness.study.ledger.storage import open_storage

    open_storage("sqlite:///optuna.db").engine.dispose()
    os.link(tmp_path / "optuna.db", tmp_path / "other-name.db")
    for url in ("sqlite:///optuna.db", "sqlite:///other-name.db"):
        with pytest.raises(UserError, match="has 2 hard links"):
            check_sqlite(url, "--storage")
