"""Paths the operating system would refuse, refused first: every path a user gives (output folders, store files, corpus
folders, study files) goes through `check_path` before anything uses it, and `os_refusal` words an OSError of that
family (a name too long, no permission, read-only, not a folder, a folder, a symlink loop) in one line.
"""

import errno
import os
from pathlib import Path

from harness.errors import UserError

NAME_MAX = 255  # bytes in one path component: ext4, XFS, Btrfs, APFS, NTFS
PATH_MAX = 4096  # bytes in a whole path (Linux)
# The errno of a path the OS refuses, whatever the surface: a user's fix (another path), never a bug.
PATH_ERRNOS = {errno.ENAMETOOLONG, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR, errno.ELOOP,
               errno.ENOENT, errno.EEXIST}


def os_refusal(err: OSError, what: str) -> UserError | None:
    """The one line for an OSError of PATH_ERRNOS met on `what` (a flag and its value, or a key), else None."""
    if err.errno not in PATH_ERRNOS:
        return None
    name = f" ({err.filename})" if err.filename and str(err.filename) not in what else ""
    return UserError(f"{what}{name}: {err.strerror or err} ({errno.errorcode.get(err.errno, err.errno)}); "
                     "pass another path")


def check_path(value, what: str) -> Path:
    """`value` as a Path (~ expanded) if the OS can name it: every component within NAME_MAX bytes, the whole within
    PATH_MAX, and its existing part reachable (no symlink loop, no file where a folder must be); else a UserError
    naming `what` (e.g. "--out X" or "study.corpus = X") and the fix."""
    path = Path(value).expanduser()
    raw = os.fsencode(str(path))
    if len(raw) > PATH_MAX:
        raise UserError(f"{what}: the path is {len(raw)} bytes, over the {PATH_MAX} the OS accepts; use a shorter one")
    for part in path.parts:
        if len(os.fsencode(part)) > NAME_MAX:
            raise UserError(f"{what}: the name {part[:40]}... is {len(os.fsencode(part))} bytes, over the {NAME_MAX} "
                            "a file system accepts in one name; use a shorter one")
    nearest = path
    for nearest in [path, *path.parents]:
        try:
            os.stat(nearest)
            break
        except FileNotFoundError:
            continue
        except NotADirectoryError:  # a file where a folder must be: each surface says so in its own words
            break
        except OSError as err:  # ELOOP, EACCES, ENAMETOOLONG on the way
            raise os_refusal(err, what) or UserError(f"{what}: {err.strerror}; pass another path") from None
    return path
