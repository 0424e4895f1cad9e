"""Where a study's results live, and how coordinators on several machines share them.

A sqlite:/// Optuna storage serves one coordinator on one machine (a file lock keeps a second one out). A
postgresql:// storage serves coordinators on any number of machines (`python -m harness worker` on each): they
serialize their check-then-write steps with PostgreSQL advisory locks and record heartbeats for the trials they
run, so a trial whose machine dies goes stale and is run again elsewhere. MLflow is a local sqlite:/// file or
a tracking server (`mlflow server` on PostgreSQL). Connections give up within seconds when a server does not
answer, and URLs are only ever shown with their password masked.
"""

import contextlib
import fcntl
import hashlib
import threading
import warnings
from pathlib import Path
from urllib.parse import urlsplit

import optuna
import requests
import sqlalchemy
from optuna.storages import RDBStorage

from harness.errors import UserError

HEARTBEAT = 30  # seconds between heartbeats of a running trial on a shared storage
STALE_AFTER = 4  # heartbeats missed before a trial counts as stale: its machine or coordinator is gone
CONNECT_TIMEOUT = 5  # seconds; without it an unreachable host hangs for TCP's minutes of retries
# What a storage server that is down or restarting raises; the coordinator retries or skips, never crashes.
STORAGE_ERRORS = (optuna.exceptions.StorageInternalError, sqlalchemy.exc.OperationalError,
                  sqlalchemy.exc.InterfaceError)
SECRET_QUERY_KEYS = ("password", "sslpassword")


def redact(url: str) -> str:
    """The URL with its password masked, for messages, tags and reports: postgresql://user:***@host/db."""
    parts = urlsplit(url)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if at and ":" in userinfo:
        url = url.replace(f"//{parts.netloc}", f"//{userinfo.split(':', 1)[0]}:***@{hostport}", 1)
    if parts.query:  # libpq also takes ?password=...
        pairs = [f"{pair.split('=', 1)[0]}=***" if pair.split("=", 1)[0] in SECRET_QUERY_KEYS else pair
                 for pair in parts.query.split("&")]
        url = url.replace(f"?{parts.query}", "?" + "&".join(pairs), 1)
    return url


def _is_postgres(url: str) -> bool:
    scheme = urlsplit(url).scheme
    return scheme == "postgresql" or scheme.startswith("postgresql+")  # e.g. postgresql+psycopg


def _reason(err: Exception) -> str:
    """The driver's first line (e.g. 'connection refused'), without SQLAlchemy's statement dump."""
    while err.__cause__ is not None:
        err = err.__cause__
    text = str(getattr(err, "orig", None) or err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _engine_kwargs() -> dict:
    # pool_pre_ping replaces a pooled connection that a server restart cut, instead of failing the next query.
    # The password comes from the URL or, when the URL has none, from PGPASSWORD / ~/.pgpass (libpq reads them).
    return {"pool_pre_ping": True, "connect_args": {"connect_timeout": CONNECT_TIMEOUT}}


@contextlib.contextmanager
def _advisory_lock(engine, key: str):
    # Held by the transaction: released at its end, or by the server when the holder's connection dies.
    lock_id = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big", signed=True)
    with engine.begin() as connection:
        connection.execute(sqlalchemy.text("SELECT pg_advisory_xact_lock(:id)"), {"id": lock_id})
        yield


def open_storage(url: str, heartbeat: int = HEARTBEAT) -> RDBStorage:
    """The Optuna storage at url: a local SQLite file, or a PostgreSQL database shared by machines (heartbeats on)."""
    if urlsplit(url).scheme == "sqlite":
        return RDBStorage(url)
    if not _is_postgres(url):
        raise UserError(f"--storage {redact(url)}: use sqlite:///FILE (one machine) or "
                        "postgresql://USER@HOST:PORT/DB (shared by several machines)")
    if heartbeat < 1:
        raise UserError(f"--heartbeat {heartbeat}: must be at least 1 second")
    try:
        probe = sqlalchemy.create_engine(url, **_engine_kwargs())
        # Machines starting at once on an empty database would all create Optuna's tables: one does it.
        with _advisory_lock(probe, "optuna tables"), warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat_interval
            storage = RDBStorage(url, engine_kwargs=_engine_kwargs(), heartbeat_interval=heartbeat,
                                 grace_period=STALE_AFTER * heartbeat)
        probe.dispose()
    except STORAGE_ERRORS as err:
        raise UserError(
            f"cannot reach the Optuna storage {redact(url)} ({_reason(err)}); start PostgreSQL there or fix "
            "--storage (host, port, database, user; the password in the URL or in PGPASSWORD)"
        ) from None
    return storage


def check_storage(url: str) -> None:
    """Fail within seconds, naming the URL, when a PostgreSQL storage does not answer (SQLite: nothing to do)."""
    if _is_postgres(url):
        open_storage(url).engine.dispose()


def check_tracking(uri: str) -> None:
    """Fail within seconds, naming the URI, when the MLflow tracking server does not answer."""
    scheme = urlsplit(uri).scheme
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
    elif _is_postgres(uri):
        engine = sqlalchemy.create_engine(uri, **_engine_kwargs())
        try:
            with engine.connect():
                pass
        except STORAGE_ERRORS as err:
            raise UserError(f"cannot reach the MLflow database {redact(uri)} ({_reason(err)}); {fix}") from None
        finally:
            engine.dispose()


def is_shared(storage: RDBStorage) -> bool:
    """Whether coordinators on other machines may use this storage too (PostgreSQL), or only this one (SQLite)."""
    return storage.engine.dialect.name == "postgresql"


def study_lock(storage: RDBStorage, study_name: str):
    """A lock around one study's check-then-write steps, across machines (SQLite: its file lock covers it)."""
    if not is_shared(storage):
        return contextlib.nullcontext()
    return _advisory_lock(storage.engine, f"harness study {study_name}")


class LocalLock:
    """One coordinator per local SQLite storage: a second one would run the same trials twice."""

    def __init__(self, storage: str):
        self.path = Path(storage[len("sqlite:///"):] + ".lock") if storage.startswith("sqlite:///") else None

    def __enter__(self):
        if self.path is None:
            return self
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(
                f"another ablation is already running on {self.path.with_suffix('')}; wait for it, give this one "
                "its own --storage and --tracking-uri, or share a PostgreSQL storage (python -m harness worker)"
            ) from None
        return self

    def __exit__(self, *exc):
        if self.path is not None:
            self.file.close()
        return False


class Heartbeat:
    """Records every interval that this coordinator still runs its trials (a no-op on SQLite).

    A thread, so that a main loop busy with a slow server reply never misses a beat; a coordinator that dies
    stops beating, and the other machines fail and retry its trials once they are stale.
    """

    def __init__(self, storage: RDBStorage):
        self.storage, self.interval = storage, storage.get_heartbeat_interval()
        self.trial_ids: set[int] = set()
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    @property
    def grace(self) -> int | None:
        """Seconds without a heartbeat after which a trial is stale."""
        return self.storage.grace_period

    def __enter__(self):
        if self.interval:
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopped.set()
        if self.thread.is_alive():
            self.thread.join()
        return False

    def beat(self, trial_id: int) -> None:
        """One heartbeat for the trial, now."""
        if self.interval:
            self.storage.record_heartbeat(trial_id)

    def beat_all(self) -> None:
        """One heartbeat for every trial this coordinator runs, now (before judging others' trials stale)."""
        with self.lock:
            trial_ids = list(self.trial_ids)
        for trial_id in trial_ids:
            self.beat(trial_id)

    def add(self, trial_id: int) -> None:
        with self.lock:
            self.trial_ids.add(trial_id)

    def discard(self, trial_id: int) -> None:
        with self.lock:
            self.trial_ids.discard(trial_id)

    def _run(self) -> None:
        while not self.stopped.wait(self.interval):
            with self.lock:
                trial_ids = list(self.trial_ids)
            for trial_id in trial_ids:
                try:
                    self.storage.record_heartbeat(trial_id)
                except STORAGE_ERRORS:
                    break  # the server is away; the main loop says so, and the next beat tries again
