"""One redaction of every secret the harness was given (passwords in the URLs on its command line and in the
environment, PGPASSWORD, MLflow's credentials, ~/.pgpass), applied to everything it prints: its own lines,
library logs and warnings, tracebacks of real bugs, and the output of its child processes. `guard()` installs it
on the process streams and exception hooks for a command (harness.cli) or a child process (harness.study.processes).
"""

import contextlib
import logging
import os
import re
import sys
import threading
import traceback
from pathlib import Path
from urllib.parse import quote, quote_plus, unquote

MASK = "***"
SECRET_QUERY_KEYS = ("password", "sslpassword")  # libpq's URL parameters that hold a password
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_SCHEME_ANYWHERE = re.compile(r"(?<![A-Za-z0-9+.-])[A-Za-z][A-Za-z0-9+.-]*://")
SECRET_ENV = ("PGPASSWORD", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")  # values that are secrets
URL_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "OPTUNA_STORAGE")  # values that may hold a password
MIN_SECRET = 2  # characters; a one-character password would mask that character everywhere (URLs still masked)
# A password in any URL of any text (user:PASSWORD@host), and libpq's ?password= / &sslpassword=.
_URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^\s/:@]*:)([^\s@/]+)(@)")
_QUERY_PASSWORD = re.compile(rf"([?&](?:{'|'.join(SECRET_QUERY_KEYS)})=)[^&\s]*", re.IGNORECASE)


def password_span(url: str) -> tuple[int, int] | None:
    """Start and end of the password in scheme://user:password@host..., or None.

    Not URL parsing: a password may hold any character ('#', '/', '?', '@', ...), and parsers stop at the first
    of those. The user ends at the first ':' after '://' (after the start of the text when there is no scheme,
    e.g. a mistyped URL), the password at the last '@' of the whole string: this masks too much rather than too
    little when '@' also appears after the host.
    """
    scheme = _SCHEME.match(url)
    at = url.rfind("@")
    if at < 0:
        return None
    colon = url.find(":", scheme.end() if scheme else 0, at)
    if colon < 0:
        return None
    return colon + 1, at


def _pgpass_passwords(environ) -> list[str]:
    """The passwords of the libpq password file (PGPASSFILE or ~/.pgpass): host:port:db:user:password lines."""
    path = Path(environ.get("PGPASSFILE") or Path.home() / ".pgpass")
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        fields = re.split(r"(?<!\\):", line)  # '\:' is a literal colon
        if len(fields) >= 5 and not line.startswith("#"):
            found.append(":".join(fields[4:]).replace("\\:", ":").replace("\\\\", "\\"))
    return found


def secrets_in(texts, environ) -> list[str]:
    """The secrets in command-line values and the environment, in every spelling that could be printed."""
    found = [environ.get(name, "") for name in SECRET_ENV] + _pgpass_passwords(environ)
    for text in [*texts, *(environ.get(name, "") for name in URL_ENV)]:
        # Each URL in the text (`--storage=URL` too), or the whole text when it has none (a mistyped URL).
        for url in [text[m.start():] for m in _SCHEME_ANYWHERE.finditer(text)] or [text]:
            span = password_span(url)
            if span is not None:
                found.append(url[span[0]:span[1]])
        found += [m.group(0).split("=", 1)[1] for m in _QUERY_PASSWORD.finditer(text)]
    forms = set()
    for secret in found:
        for plain in {secret, unquote(secret)}:
            forms |= {plain, quote(plain, safe=""), quote_plus(plain), repr(plain)[1:-1]}
    return sorted((f for f in forms if len(f) >= MIN_SECRET), key=len, reverse=True)


class Redactor:
    """text -> text with every known secret, and every URL's password, masked."""

    def __init__(self, secrets: list[str]):
        self.secrets = secrets

    def __call__(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, MASK)
        text = _URL_PASSWORD.sub(rf"\1{MASK}\3", text)
        return _QUERY_PASSWORD.sub(rf"\1{MASK}", text)


class RedactedStream:
    """A text stream that writes whole lines (or what a flush asks for) through a Redactor, so a secret split
    over two writes is still found; everything else is the wrapped stream's."""

    def __init__(self, stream, redactor: Redactor):
        self.stream, self.redactor, self.pending = stream, redactor, ""
        self.lock = threading.Lock()

    def write(self, text: str) -> int:
        with self.lock:
            self.pending += text
            end = max(self.pending.rfind("\n"), self.pending.rfind("\r")) + 1
            if end:
                self.stream.write(self.redactor(self.pending[:end]))
                self.pending = self.pending[end:]
        return len(text)

    def flush(self) -> None:
        with self.lock:
            if self.pending:
                self.stream.write(self.redactor(self.pending))
                self.pending = ""
        self.stream.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding, reconfigure, ...
        return getattr(self.stream, name)


_active = Redactor([])


def redact_text(text: str) -> str:
    """Text with every secret of the running command masked (the secrets `guard` was given)."""
    return _active(str(text))


def _excepthook(kind, value, tb) -> None:
    sys.stderr.write(redact_text("".join(traceback.format_exception(kind, value, tb))))
    sys.stderr.flush()


def _thread_excepthook(args) -> None:
    if args.exc_type is SystemExit:
        return
    where = f"in thread {args.thread.name}:\n" if args.thread is not None else ":\n"
    text = "".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback))
    sys.stderr.write(redact_text(f"Exception {where}{text}"))


@contextlib.contextmanager
def guard(argv=None, environ=None):
    """Within it, everything written to sys.stdout and sys.stderr (prints, logging, warnings, tracebacks) has the
    secrets of `argv` (default sys.argv) and `environ` (default os.environ) masked. Tracebacks that escape it
    are masked too: the exception hooks stay installed."""
    global _active
    redactor = Redactor(secrets_in(sys.argv if argv is None else argv, os.environ if environ is None else environ))
    _active = redactor
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = (None if s is None else RedactedStream(s, redactor) for s in streams)  # None: pythonw
    # Handlers made before now (logging.StreamHandler() keeps the stream it was given) write through it too.
    handlers = [h for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
                for h in getattr(logger, "handlers", []) if isinstance(h, logging.StreamHandler)]
    swapped = [(h, h.stream) for h in handlers if h.stream in streams]
    for handler, stream in swapped:
        handler.setStream(sys.stdout if stream is streams[0] else sys.stderr)
    sys.excepthook, threading.excepthook = _excepthook, _thread_excepthook
    try:
        yield redactor
    finally:
        for stream in (sys.stdout, sys.stderr):
            # A closed stream must not hide the command's own exception.
            with contextlib.suppress(AttributeError, OSError, ValueError):
                stream.flush()
        for handler, stream in swapped:
            handler.setStream(stream)
        sys.stdout, sys.stderr = streams
        # _active stays: the hooks keep this command's secrets for a traceback escaping it.
