"""One root exception; the CLI is the only place that catches it.

Each error carries the exit code the CLI maps it to and a message that says what is wrong and how to
fix it, on one line.
"""

from __future__ import annotations

import errno


class TrtforgeError(Exception):
    """Root of every error trtforge raises on purpose."""

    exit_code = 2


class RecipeError(TrtforgeError):
    """A recipe that cannot be built as written (bad TOML, key, type or value)."""

    def __init__(self, path: object, key: str | None, problem: str, fix: str) -> None:
        where = f"{path}" + (f": [{key}]" if key else "")
        super().__init__(f"{where}: {problem}; {fix}")
        self.path, self.key, self.problem, self.fix = path, key, problem, fix


class EnvironmentProblem(TrtforgeError):
    """Something missing from this machine: a package, a model, a GPU."""


class ArtifactError(TrtforgeError):
    """An artifact that is missing, incomplete or fails its hash check."""


class ParityError(TrtforgeError):
    """A parity gate failed; reports are still written."""

    exit_code = 1


class CompatibilityError(TrtforgeError):
    """An engine that does not fit this device or the installed library."""


class ShapeError(TrtforgeError):
    """Inputs outside an engine's optimization profile."""


# What each file-system refusal means for the user, by errno.
_OS_FIXES = {
    errno.ENOSPC: "free some space or choose another --out",
    errno.EDQUOT: "free some space or choose another --out",
    errno.EFBIG: "the file is larger than this process may write (ulimit -f); free space or raise the limit",
    errno.EACCES: "choose a writable --out",
    errno.EPERM: "choose a writable --out",
    errno.EROFS: "choose an --out on a writable file system",
    errno.ELOOP: "a symbolic link in the path points back at itself; fix the link or choose another --out",
    errno.ENOTDIR: "a part of the path is a regular file; choose another --out",
    errno.EEXIST: "a file is in the way; move it or choose another --out",
    errno.ENAMETOOLONG: "use a shorter --out or [model] name",
}


def os_error_message(e: OSError) -> str:
    where = f" ({e.filename})" if e.filename else ""
    return f"{e.strerror or e}{where}; {_OS_FIXES.get(e.errno or 0, 'check the path and its permissions')}"
