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


# What each file-system refusal means for the user, by errno; {target} is what to change (--out, REPO).
_OS_FIXES = {
    errno.ENOSPC: "free some space{or_target}",
    errno.EDQUOT: "free some space{or_target}",
    errno.EFBIG: "the file is larger than this process may write (ulimit -f); free space or raise the limit",
    errno.EACCES: "fix its permissions{or_target}",
    errno.EPERM: "fix its permissions{or_target}",
    errno.EROFS: "the file system is read-only{use_target}",
    errno.ELOOP: "a symbolic link in the path points back at itself; fix the link",
    errno.ENOTDIR: "a part of the path is a regular file; fix the path",
    errno.EEXIST: "a file is in the way; move it",
    errno.ENAMETOOLONG: "use a shorter path or [model] name",
    errno.EINVAL: "the file system refused the name or the operation; use another path",
    errno.ENOMEM: "the machine is out of memory; use smaller sizes or free memory",
}


def os_error_message(e: OSError, target: str | None = None) -> str:
    """One line for a file-system refusal: what the system said, on which path, and what to change
    (`target`: the option or argument that chose the path, where there is one)."""
    where = f" ({e.filename})" if e.filename else ""
    fix = _OS_FIXES.get(e.errno or 0, "check the path and its permissions")
    fix = fix.format(or_target=f", or choose another {target}" if target else "",
                     use_target=f"; choose another {target}" if target else "")
    return f"{e.strerror or e}{where}; {fix}"
