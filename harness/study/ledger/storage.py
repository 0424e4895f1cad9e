"""The Optuna storage under a ledger: opening it (SQLite or a shared PostgreSQL), heartbeats of running trials, and
patience while its server is away (announced once, retried for RECONNECT_SECONDS, then one line).
"""

import functools
import shlex
import threading
import time
import warnings

import optuna
import sqlalchemy
from optuna.storages import BaseStorage, RDBStorage

from harness.errors import UserError
from harness.study.stores import (
    DEFAULT_STORAGE, HEARTBEAT, STALE_AFTER, advisory_lock, check_password, check_sqlite, engine_kwargs, error_reason,
    is_postgres, redact, scrub,
)

RECONNECT_SECONDS = 300  # how long the ledger keeps retrying a storage that went away before it gives up
# What a storage server that is down or restarting raises: the ledger waits and retries, never crashes.
STORAGE_ERRORS = (optuna.exceptions.StorageInternalError, sqlalchemy.exc.OperationalError,
                  sqlalchemy.exc.InterfaceError)


def _unreachable(url: str, err: Exception) -> str:
    return (f"cannot reach the Optuna storage {redact(url)} ({scrub(error_reason(err), url)}); start PostgreSQL there "
            "or fix --storage (host, port, database, user; the password in the URL or in PGPASSWORD)")


def open_storage(url: str, heartbeat: int = HEARTBEAT) -> RDBStorage:
    """The Optuna storage at url: a local SQLite file, or a PostgreSQL database shared by machines (heartbeats on).

    Raises UserError for a storage that would not persist (in-memory SQLite), a file that is not an Optuna
    database, an unknown scheme, or a server that does not answer within seconds.
    """
    path = check_sqlite(url, "--storage")  # before Optuna adds its tables to a file that is not its own
    if path is not None:
        try:
            return RDBStorage(url)
        except sqlalchemy.exc.DatabaseError as err:
            # check_sqlite has read the file; what is left is e.g. a lock held past SQLite's busy timeout.
            raise UserError(f"--storage {url}: {path} cannot be opened as an Optuna database ({error_reason(err)}); "
                            "pass the --storage the study ran with, or a new file name") from None
    if not is_postgres(url):
        raise UserError(f"--storage {redact(url)}: use sqlite:///FILE (one machine) or "
                        "postgresql://USER@HOST:PORT/DB (shared by several machines)")
    if heartbeat < 1:
        raise UserError(f"--heartbeat {heartbeat}: must be at least 1 second")
    check_password(url, "--storage")
    try:
        probe = sqlalchemy.create_engine(url, **engine_kwargs())
        # Machines starting at once on an empty database would all create Optuna's tables: one does it.
        with advisory_lock(probe, "optuna tables"), warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat_interval
            storage = RDBStorage(url, engine_kwargs=engine_kwargs(), heartbeat_interval=heartbeat,
                                 grace_period=STALE_AFTER * heartbeat)
        probe.dispose()
    except (*STORAGE_ERRORS, sqlalchemy.exc.ArgumentError, ValueError) as err:
        raise UserError(_unreachable(url, err)) from None
    return storage


def check_storage(url: str) -> None:
    """Fail within seconds, naming the URL, when the storage cannot be opened."""
    storage = open_storage(url)
    storage.engine.dispose()


def dashboard_command(url: str) -> str:
    """How to browse this Optuna storage in optuna-dashboard."""
    make = "make dashboard" + ("" if url == DEFAULT_STORAGE else f" STORAGE={shlex.quote(redact(url))}")
    return f"{make}  (or: optuna-dashboard {shlex.quote(redact(url))})"


def is_shared(storage: BaseStorage) -> bool:
    """Whether coordinators on other machines may use this storage too (PostgreSQL), or only this one (SQLite)."""
    return isinstance(storage, RDBStorage) and storage.engine.dialect.name == "postgresql"


def storage_url(storage: BaseStorage) -> str:
    """The storage's URL (for messages: always pass it through redact), or its type for an in-memory one."""
    return getattr(storage, "url", type(storage).__name__)


class Heartbeat:
    """Records every interval that this coordinator still runs its trials (a no-op without heartbeats).

    A thread, so that a main loop busy with a slow server reply never misses a beat; a coordinator that dies
    stops beating, and the other machines fail and retry its trials once they are stale.
    """

    def __init__(self, storage: BaseStorage):
        self.storage = storage
        self.interval = storage.get_heartbeat_interval() if isinstance(storage, RDBStorage) else None
        self.grace = storage.grace_period if self.interval else None  # seconds without a beat: stale
        self.trial_ids: set[int] = set()
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

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
        """Beat for this trial from now on."""
        with self.lock:
            self.trial_ids.add(trial_id)

    def discard(self, trial_id: int) -> None:
        """Stop beating for this trial (it ended here)."""
        with self.lock:
            self.trial_ids.discard(trial_id)

    def _run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                self.beat_all()
            except STORAGE_ERRORS:
                pass  # the server is away; the ledger says so, and the next beat tries again


class Patient:
    """Base of the ledger's classes: its `patient` methods wait out a storage that went away, saying so once, and
    give up with one line after RECONNECT_SECONDS."""

    def __init__(self, storage: BaseStorage, log):
        self.storage, self.log = storage, log
        self.outage_since: float | None = None

    store_kind = "the Optuna storage"  # the tracker's is its MLflow tracking store

    def store_name(self) -> str:
        """The store in the user's words, with its URL (passwords masked)."""
        return f"{self.store_kind} {redact(storage_url(self.storage))}"

    def is_outage(self, err: Exception) -> bool:
        """Whether an error means the store is away (down, restarting, unreachable) rather than a real failure."""
        return isinstance(err, STORAGE_ERRORS)

    def _outage(self, err: Exception) -> None:
        """Note that the storage is away; give up once it has been for RECONNECT_SECONDS."""
        now = time.monotonic()
        if self.outage_since is None:
            self.outage_since = now
            self.log(f"{self.store_name()} does not answer ({type(err).__name__}); "
                     f"retrying for up to {RECONNECT_SECONDS} s")
        elif now - self.outage_since > RECONNECT_SECONDS:
            raise UserError(
                f"{self.store_name()} did not answer for {RECONNECT_SECONDS} s; the "
                "trials running here will be retried by the other machines, or when this command is run again"
            ) from None

    def _reconnected(self) -> None:
        if self.outage_since is None:
            return
        self.log(f"{self.store_kind} answers again after {time.monotonic() - self.outage_since:.0f} s")
        self.outage_since = None
        self.after_outage()

    def after_outage(self) -> None:
        """What a subclass does once the storage answers again (the writer holds back stale verdicts)."""


def patient(method):
    """Run a method of a Patient, retrying it while the storage is away, for up to RECONNECT_SECONDS."""

    @functools.wraps(method)
    def wrapper(self: Patient, *args, **kwargs):
        if getattr(self, "_inside_patient", False):  # a patient method called by another: the outer one waits
            return method(self, *args, **kwargs)
        self._inside_patient = True
        try:
            return _retry(self, method, args, kwargs)
        finally:
            self._inside_patient = False

    return wrapper


def _retry(self: Patient, method, args, kwargs):
    delay = 1.0
    while True:
        try:
            result = method(self, *args, **kwargs)
        except Exception as err:
            if not self.is_outage(err):
                raise
            self._outage(err)
            time.sleep(delay)
            delay = min(2 * delay, 10.0)
            continue
        self._reconnected()
        return result
