"""Where a study's results live: the store URLs, their passwords masked, and one writer per local store.

An Optuna storage is a local sqlite:/// file (one coordinator on one machine) or a postgresql:// database
shared by coordinators on any number of machines (`python -m harness worker` on each), which serialize their
check-then-write steps with PostgreSQL advisory locks. MLflow is a local sqlite:/// file or a tracking server
(`mlflow server` on PostgreSQL). A file lock keeps a second coordinator off the local stores of a running one.
Connections give up within seconds when a server does not answer, and URLs are only ever shown with their
password masked. harness.ledger opens the Optuna storage itself.
"""

import contextlib
import hashlib
import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

import filelock
import requests
import sqlalchemy

from harness.errors import UserError

CONNECT_TIMEOUT = 5  # seconds; without it an unreachable host hangs for TCP's minutes of retries
HEARTBEAT = 30  # seconds between heartbeats of a running trial on a shared storage
STALE_AFTER = 4  # heartbeats missed before a trial counts as stale: its machine or coordinator is gone
SECRET_QUERY_KEYS = ("password", "sslpassword")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def _password_span(url: str) -> tuple[int, int] | None:
    """Start and end of the password in scheme://user:password@host..., or None.

    Not URL parsing: a password may hold any character ('#', '/', '?', '@', ...), and parsers stop at the first
    of those. The user ends at the first ':' after '://', the password at the last '@' of the whole string:
    this masks too much rather than too little when '@' also appears after the host.
    """
    scheme = _SCHEME.match(url)
    if not scheme:
        return None
    at = url.rfind("@")
    colon = url.find(":", scheme.end(), at if at >= 0 else None)
    if at < 0 or colon < 0:
        return None
    return colon + 1, at


def redact(url: str) -> str:
    """The URL with its password masked, for messages, tags and reports: postgresql://user:***@host/db."""
    url = str(url)
    span = _password_span(url)
    if span is not None:
        url = url[: span[0]] + "***" + url[span[1]:]
    # libpq also takes ?password=... (and &sslpassword=...)
    return re.sub(rf"([?&](?:{'|'.join(SECRET_QUERY_KEYS)})=)[^&#]*", r"\1***", url)


def scrub(text: str, url: str) -> str:
    """Text (e.g. a driver's error) with the URL redacted and its password masked wherever else it appears."""
    text = str(text).replace(url, redact(url))
    span = _password_span(url)
    if span is not None and span[1] > span[0]:
        secret = url[span[0]: span[1]]
        for form in {secret, unquote(secret)}:
            text = text.replace(form, "***")
    return text


def sqlite_path(url: str, flag: str) -> Path | None:
    """The database file of a sqlite:/// URL, None for other schemes; UserError for one that would not persist.

    `flag` names the option the URL came from (--storage, --tracking-uri), for the message.
    """
    if not url.startswith("sqlite:"):
        return None
    path = url[len("sqlite:///"):] if url.startswith("sqlite:///") else ""
    if not path or path.startswith(":memory:") or path.startswith("file::memory:") or "mode=memory" in path:
        raise UserError(f"{flag} {url}: an in-memory database vanishes when the command ends, and every result with "
                        f"it; use a file, e.g. {flag} sqlite:///{'optuna' if 'storage' in flag else 'mlflow'}.db")
    return Path(path.split("?", 1)[0])


def is_postgres(url: str) -> bool:
    """Whether the URL names a PostgreSQL database (postgresql:// or postgresql+driver://)."""
    scheme = urlsplit(url).scheme if _SCHEME.match(url) else ""
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
    scheme = urlsplit(uri).scheme if _SCHEME.match(uri) else ""
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
        try:
            engine = sqlalchemy.create_engine(uri, **engine_kwargs())
            with engine.connect():
                pass
            engine.dispose()
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError, sqlalchemy.exc.ArgumentError,
                ValueError) as err:
            raise UserError(f"cannot reach the MLflow database {redact(uri)} ({scrub(error_reason(err), uri)}); "
                            f"{fix}") from None
    elif scheme == "sqlite":
        path = sqlite_path(uri, "--tracking-uri")
        if path.exists() and path.read_bytes()[:16] != b"SQLite format 3\x00":
            raise UserError(f"--tracking-uri {uri}: {path} is not an SQLite database; pass the --tracking-uri the "
                            "study ran with, or a new file name")
    else:
        raise UserError(f"--tracking-uri {redact(uri)}: use sqlite:///FILE (one machine) or http://HOST:PORT of an "
                        "MLflow tracking server (shared by several machines)")


class LocalLock:
    """One coordinator per local SQLite store, Optuna's and MLflow's alike: a second one would run the same trials
    twice, or mark the first one's live MLflow runs interrupted."""

    def __init__(self, *urls: str):
        flags = ("--storage", "--tracking-uri")
        paths = [sqlite_path(url, flag) for url, flag in zip(urls, flags)]
        self.locks = [filelock.FileLock(f"{path}.lock") for path in paths if path is not None]

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
        return self

    def __exit__(self, *exc):
        for lock in self.locks:
            lock.release()
        return False
