"""One way to run work in a child process, for trials, calibration probes and the GPU check's parts: spawned (no
forked CUDA, SQLite or thread state), talking to its parent over one pipe, and stopped by terminate, a grace
period, then kill (its whole process group when it made one).
"""

import contextlib
import multiprocessing
import os
import signal
import time
from multiprocessing.connection import wait

from harness.redaction import guard

CONTEXT = multiprocessing.get_context("spawn")


def _guarded(target, *args) -> None:
    """A child's entry point: `target(*args)` with the parent's secrets masked in all it prints (spawn gives a
    child its parent's sys.argv, and it inherits the environment)."""
    with guard():
        target(*args)


class Child:
    """`target(*args, conn)` in a spawned process; `conn` is the child's end of the pipe to this process.

    `new_session`: the child is expected to call os.setsid() first, so `stop` can end it together with every
    process it started (pytest, trial workers).
    """

    def __init__(self, target, args: tuple, name: str, *, new_session: bool = False):
        parent, child = CONTEXT.Pipe()
        self.process = CONTEXT.Process(target=_guarded, args=(target, *args, child), name=name,
                                       daemon=not new_session)
        self.process.start()
        child.close()  # only the child holds its end: its exit closes the pipe
        self.conn, self.new_session, self.started = parent, new_session, time.monotonic()

    @property
    def alive(self) -> bool:
        return self.process.is_alive()

    def send(self, message) -> bool:
        """Send to the child; False when it is gone."""
        try:
            self.conn.send(message)
        except (BrokenPipeError, OSError):
            return False
        return True

    def receive(self, timeout: float = 0.0):
        """(True, the next message) if one arrives within timeout, else (False, None); also (False, None) once the
        pipe is closed (the child is gone: `death` says how)."""
        try:
            if self.conn.poll(timeout):
                return True, self.conn.recv()
        except (EOFError, OSError):
            pass
        return False, None

    def death(self) -> str:
        """How the child ended, in words: "exit code 1", "killed by signal 9"."""
        code = self.process.exitcode
        return f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"

    def stop(self, grace: float = 10.0) -> None:
        """Ask the child to end (SIGTERM), wait up to `grace` seconds, then kill it (and its session's processes)."""
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(grace)
        if self.new_session:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)  # what it started, even after it ended itself
        if self.process.is_alive():
            self.process.kill()
        self.process.join()

    def close(self) -> None:
        """Close this end of the pipe (after the child has ended)."""
        self.conn.close()


def ready(children: list, timeout: float) -> list:
    """The children with a message waiting or that ended, after waiting up to timeout seconds for one."""
    handles = {}
    for child in children:
        handles[child.conn] = child
        handles[child.process.sentinel] = child
    found = wait(list(handles), timeout=timeout)
    return list(dict.fromkeys(handles[h] for h in found))
