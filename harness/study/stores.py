"""Where a study's results live: the store URLs (their defaults once, here), passwords masked in everything shown,
and one writer per local store. Optuna: a local sqlite:/// file or a postgresql:// database shared by coordinators
on many machines (advisory locks serialize their check-then-write steps); MLflow: a sqlite:/// file or a tracking
server. Connections give up within seconds when a server does not answer.
"""

import contextlib
import hashlib
import os
import re
import sqlite3
import warnings
from pathlib import Path
from urllib.parse import parse_qsl, quote, unquote

import filelock
import requests
import sqlalchemy
from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite

from harness.errors import UserError
from harness.paths import check_path
from harness.redaction import SECRET_QUERY_KEYS, password_span

DEFAULT_STORAGE = "sqlite:///optuna.db"  # the Optuna storage of `ablate`, `report` and `make dashboard`
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # the MLflow store of `ablate`, `report` and `make ui`
CONNECT_TIMEOUT = 5  # seconds; without it an unreachable host hangs for TCP's minutes of retries
HEARTBEAT = 30  # seconds between heartbeats of a running trial on a shared storage
STALE_AFTER = 4  # heartbeats missed before a trial counts as stale: its machine or coordinator is gone
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def redact(url: str) -> str:
    """The URL with its password masked, for messages, tags and reports: postgresql://user:***@host/db."""
    url = str(url)
    span = password_span(url)
    if span is not None:
        url = url[: span[0]] + "***" + url[span[1]:]
    # libpq also takes ?password=... (and &sslpassword=...), up to the next '&' whatever it holds ('#' too)
    return _SECRET_QUERY.sub(r"\1***", url)


_SECRET_QUERY = re.compile(rf"([?&](?:{'|'.join(SECRET_QUERY_KEYS)})=)[^&]*", re.IGNORECASE)


def scrub(text: str, url: str) -> str:
    """Text (e.g. a driver's error) with the URL redacted and its password masked wherever else it appears."""
    text = str(text).replace(url, redact(url))
    span = password_span(url)
    secrets = [url[span[0]: span[1]]] if span is not None else []
    secrets += [m.group(0).split("=", 1)[1] for m in _SECRET_QUERY.finditer(url)]
    for secret in secrets:
        for form in {secret, unquote(secret)}:
            if form:
                text = text.replace(form, "***")
    return text


def check_password(url: str, flag: str) -> None:
    """UserError when the URL's password holds a raw '@': SQLAlchemy would end the password there and take the
    rest for the host, which its errors then show (the message gives the URL masked, never the password)."""
    span = password_span(url)
    if span is not None and "@" in url[span[0]: span[1]]:
        raise UserError(f"{flag} {redact(url)}: the password holds '@', which ends a password in a URL; write it "
                        "as %40 (percent-encode it), or leave it out of the URL and set PGPASSWORD")


def sqlite_path(url: str, flag: str) -> Path | None:
    """The database file a sqlite:/// URL opens, absolute, None for other schemes; UserError for one that would not
    persist, or that SQLite would open read-only or without its locks.

    The file is found the way SQLite finds it, from SQLAlchemy's own connect arguments (the database name and
    its `uri` flag), then SQLite's URI filename rules (`file:NAME?mode=...`): two spellings of one file give one
    path (symlinks are resolved by LocalLock). `flag` names the option the URL came from, for the message.
    """
    if not url.startswith("sqlite:"):
        return None
    example = f"{flag} sqlite:///{'optuna' if 'storage' in flag else 'mlflow'}.db"
    if url != "sqlite://" and not url.startswith("sqlite:///"):
        raise UserError(f"{flag} {redact(url)}: write sqlite:///FILE (three slashes; four for an absolute path), "
                        f"e.g. {example}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SQLAlchemy's note that it ignores URI arguments without uri=true
            parsed = sqlalchemy.engine.make_url(url)
            (name, *_), options = _PYSQLITE.create_connect_args(parsed)
    except (sqlalchemy.exc.ArgumentError, ValueError) as err:
        raise UserError(f"{flag} {redact(url)}: not a SQLite URL SQLAlchemy can read ({err}); e.g. {example}") from None
    params = {}
    if not options.get("uri"):
        name = parsed.database or ""  # as spelled (SQLAlchemy made it absolute), for messages
    elif name.startswith("file:"):
        name, params = _uri_filename(name, f"{flag} {redact(url)}")
    # In memory: no file (sqlite://), SQLite's :memory: name, or a URI filename asking for memory (mode=memory)
    # or its in-memory file system (vfs=memdb); a spelling SQLAlchemy would ignore is refused too, as meant.
    spelled = unquote(url).lower()
    if (name in ("", ":memory:") or params.get("mode") == "memory" or params.get("vfs") == "memdb"
            or "file::memory:" in spelled or "mode=memory" in spelled or "vfs=memdb" in spelled):
        raise UserError(f"{flag} {redact(url)}: an in-memory database vanishes when the command ends, and every "
                        f"result with it; use a file, e.g. {example}")
    unsafe = {k: v for k, v in params.items() if k in _UNSAFE_URI_PARAMS and v not in _UNSAFE_URI_PARAMS[k]}
    if unsafe:
        named = ", ".join(f"{k}={v}" for k, v in unsafe.items())
        raise UserError(f"{flag} {redact(url)}: {named} would make SQLite open the store read-only or without its "
                        f"locks; leave it out, e.g. {example}")
    return check_path(name, f"{flag} {redact(url)}")  # a relative name: relative to the working folder, as for SQLite


_PYSQLITE = SQLiteDialect_pysqlite()
# SQLite URI parameters that would stop a store from being written safely -> the values that are harmless.
_UNSAFE_URI_PARAMS = {"mode": ("rw", "rwc"), "immutable": ("0", "false", "no", "off"),
                      "nolock": ("0", "false", "no", "off"), "vfs": ("unix",)}


def _uri_filename(name: str, where: str) -> tuple[str, dict]:
    """The file and the parameters of a SQLite URI filename (https://sqlite.org/uri.html): file:PATH,
    file:///PATH or file://localhost/PATH, percent-decoded, with ?KEY=VALUE parameters (lower-cased keys)."""
    rest = name[len("file:"):].partition("#")[0]
    rest, _, query = rest.partition("?")
    if rest.startswith("//"):
        authority, _, path = rest[2:].partition("/")
        if authority not in ("", "localhost"):
            raise UserError(f"{where}: SQLite opens no file on another host ({authority}); name a local file")
        rest = "/" + path
    return unquote(rest), {k.lower(): v.lower() for k, v in parse_qsl(query, keep_blank_values=True)}


def same_file(a: Path, b: Path) -> bool:
    """Whether two database paths are one file: one resolved path, or (existing) one inode, e.g. a bind mount."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist yet
        return False


# Tables only Optuna's storage has, and tables only MLflow's tracking store has: a file holding the other's is
# refused before either library opens it (each would add its own tables to the other's file and then fail).
_OWN_TABLES = {"--storage": ("Optuna", {"studies", "trials"}), "--tracking-uri": ("MLflow", {"experiments", "runs"})}


def check_sqlite(url: str, flag: str) -> Path | None:
    """The database file of a sqlite:/// URL, checked: a file (or one that can be made) holding nothing but the
    store `flag` names (--storage: Optuna's, --tracking-uri: MLflow's); None for other schemes."""
    path = sqlite_path(url, flag)
    if path is None:
        return None
    where = f"{flag} {redact(url)}"
    if path.is_dir():
        raise UserError(f"{where}: {path} is a folder; name a database file in it, e.g. {path / 'study.db'}")
    parent = path.parent if path.parent != Path("") else Path(".")
    if parent.exists() and not parent.is_dir() or any(p.is_file() for p in parent.parents):
        raise UserError(f"{where}: {parent} is not a folder; name a file in a folder")
    if not path.exists():
        return path
    if path.stat().st_nlink > 1:
        # SQLite names its journal after the path it was given: writers through two links would not see each
        # other's journal and corrupt the database (https://sqlite.org/howtocorrupt.html, 2.5), nor share a lock.
        raise UserError(f"{where}: {path} has {path.stat().st_nlink} hard links, so two names could write it at "
                        "once and corrupt it; copy it to a file of its own (cp) and pass that")
    try:
        with open(path, "rb") as head:
            header = head.read(16)
    except OSError as err:
        raise UserError(f"{where}: cannot read {path} ({err.strerror})") from None
    fix = f"pass the {flag} the study ran with, or a new file name"
    if header and header != b"SQLite format 3\x00":
        raise UserError(f"{where}: {path} is not an SQLite database; {fix}")
    try:
        with contextlib.closing(sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True)) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as err:
        raise UserError(f"{where}: {path} is not a readable SQLite database ({err}); {fix}") from None
    own_name, own = _OWN_TABLES[flag]
    other_name, other = next(v for k, v in _OWN_TABLES.items() if k != flag)
    if tables & other:
        raise UserError(f"{where}: {path} holds {other_name}'s tables ({', '.join(sorted(tables & other))}), "
                        f"not {own_name}'s: did you swap --storage and --tracking-uri? {fix}")
    if tables and not tables & own:
        raise UserError(f"{where}: {path} holds another program's tables ({', '.join(sorted(tables)[:3])}, ...), "
                        f"not {own_name}'s; {fix}")
    return path


def _scheme(url: str) -> str:
    # Not urlsplit: it raises on some malformed URLs (an unclosed '[' in the host), which must get a one-line error.
    match = _SCHEME.match(url)
    return match.group(0)[:-3].lower() if match else ""


def is_postgres(url: str) -> bool:
    """Whether the URL names a PostgreSQL database (postgresql:// or postgresql+driver://)."""
    scheme = _scheme(url)
    return scheme == "postgresql" or scheme.startswith("postgresql+")


def error_reason(err: Exception) -> str:
    """The driver's first line (e.g. 'connection refused'), without SQLAlchemy's statement dump."""
    while err.__cause__ is not None:
        err = err.__cause__
    text = str(getattr(err, "orig", None) or err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def engine_kwargs() -> dict:
    """SQLAlchemy engine options for a PostgreSQL store: fail fast, survive a server restart."""
    # pool_pre_ping replaces a pooled connection that a server restart cut, instead of failing the next query.
    # The password comes from the URL or, when the URL has none, from PGPASSWORD / ~/.pgpass (libpq reads them).
    return {"pool_pre_ping": True, "connect_args": {"connect_timeout": CONNECT_TIMEOUT}}


@contextlib.contextmanager
def advisory_lock(engine, key: str):
    """A PostgreSQL advisory lock on `key`, held by a transaction: released at its end, or by the server when
    the holder's connection dies."""
    lock_id = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big", signed=True)
    with engine.begin() as connection:
        connection.execute(sqlalchemy.text("SELECT pg_advisory_xact_lock(:id)"), {"id": lock_id})
        yield


def check_tracking(uri: str) -> None:
    """Fail within seconds, naming the URI, when the MLflow tracking store cannot be used."""
    scheme = _scheme(uri)
    fix = "start it (see README: Several machines) or fix --tracking-uri"
    if scheme in ("http", "https"):
        try:
            answer = requests.get(uri.rstrip("/") + "/health", timeout=CONNECT_TIMEOUT)
        except requests.Timeout:
            raise UserError(f"the MLflow tracking server {redact(uri)} did not answer within "
                            f"{CONNECT_TIMEOUT} s; {fix}") from None
        except requests.RequestException as err:
            raise UserError(f"cannot reach the MLflow tracking server {redact(uri)} ({type(err).__name__}); "
                            f"{fix}") from None
        if answer.status_code != 200:
            raise UserError(f"{redact(uri)}/health answered HTTP {answer.status_code}: is --tracking-uri the "
                            "address of an MLflow tracking server (mlflow server ...)?")
    elif is_postgres(uri):
        check_password(uri, "--tracking-uri")
        try:
            engine = sqlalchemy.create_engine(uri, **engine_kwargs())
            with engine.connect():
                pass
            engine.dispose()
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError, sqlalchemy.exc.ArgumentError,
                ValueError) as err:
            raise UserError(f"cannot reach the MLflow database {redact(uri)} ({scrub(error_reason(err), uri)}); "
                            f"{fix}") from None
    elif uri.startswith("sqlite:"):
        check_sqlite(uri, "--tracking-uri")
    else:
        raise UserError(f"--tracking-uri {redact(uri)}: use sqlite:///FILE (one machine) or http://HOST:PORT of an "
                        "MLflow tracking server (shared by several machines)")


class LocalLock:
    """One coordinator per local SQLite store, Optuna's and MLflow's alike: a second one would run the same trials
    twice, or mark the first one's live MLflow runs interrupted."""

    def __init__(self, *urls: str):
        flags = ("--storage", "--tracking-uri")
        # Resolved, so two spellings of one file (a relative path, a symlink) take the same lock.
        # A lock file beside the resolved path: spellings the file system equates (a bind mount, a case-insensitive
        # disk) equate their lock files too; hard links are refused by check_sqlite.
        paths = [path.resolve() for url, flag in zip(urls, flags) if (path := check_sqlite(url, flag)) is not None]
        if len(paths) == 2 and same_file(*paths):
            raise UserError(f"--storage and --tracking-uri name the same file {paths[0]}; Optuna and MLflow each need "
                            "their own, e.g. sqlite:///optuna.db and sqlite:///mlflow.db")
        self.locks = [filelock.FileLock(f"{path}.lock") for path in paths]

    def __enter__(self):
        for lock in self.locks:
            try:
                lock.acquire(timeout=0)
            except filelock.Timeout:
                self.__exit__()
                raise UserError(
                    f"another ablation is already using {lock.lock_file.removesuffix('.lock')}; wait for it, give "
                    "this one its own --storage and --tracking-uri, or share a PostgreSQL storage and an MLflow "
                    "server (python -m harness worker)"
                ) from None
            except OSError as err:  # the lock file cannot be made (filelock.Timeout, an OSError too, is caught above)
                self.__exit__()
                raise UserError(f"cannot create the lock file {lock.lock_file} ({err.strerror}); keep the SQLite "
                                "files in a writable folder") from None
        return self

    def __exit__(self, *exc):
        for lock in self.locks:
            lock.release()
        return False
