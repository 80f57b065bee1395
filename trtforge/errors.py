"""One root exception; the CLI is the only place that catches it.

Each error carries the exit code the CLI maps it to and a message that says what is wrong and how to
fix it, on one line.
"""

from __future__ import annotations


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
