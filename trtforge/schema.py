"""Reading one TOML table with types checked and unknown keys reported.

Every problem becomes a RecipeError that names the file, the dotted key and the fix, on one line.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from trtforge.errors import RecipeError


class Section:
    """Reads one TOML table, remembering which keys were used so that unknown ones are reported."""

    def __init__(self, path: Path, name: str, table: Any) -> None:
        if not isinstance(table, dict):
            raise RecipeError(path, name, f"expected a table, got {type(table).__name__}",
                              f"write it as a [{name}] section")
        self.path, self.name, self.table, self.used = path, name, table, set()

    def qualified(self, key: str) -> str:
        return f"{self.name}.{key}" if self.name else key

    def error(self, key: str, problem: str, fix: str) -> RecipeError:
        return RecipeError(self.path, self.qualified(key) if key else self.name, problem, fix)

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ..., *, hint: str = "") -> Any:
        self.used.add(key)
        if key not in self.table:
            if default is ...:
                raise self.error(key, "missing required key", hint or f"add `{key} = ...` to [{self.name or 'the recipe'}]")
            return default
        value = self.table[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # TOML integers are fine where floats are expected; booleans are never numbers here.
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) and bool not in kinds:
            raise self.error(key, f"expected {kind_names(kinds)}, got a boolean", hint or "fix its type")
        if not isinstance(value, kinds):
            raise self.error(key, f"expected {kind_names(kinds)}, got {type(value).__name__} {value!r}",
                             hint or "fix its type")
        if isinstance(value, float) and not math.isfinite(value):  # nan or inf would disable a gate
            raise self.error(key, f"must be a finite number, got {value}", hint or "use a finite number")
        return value

    def integer(self, key: str, default: Any, lo: int, hi: int, *, hint: str = "") -> int:
        """An integer within [lo, hi]; the message names the key, the value and the limits."""
        value = self.get(key, int, default, hint=hint)
        if not lo <= value <= hi:
            raise self.error(key, f"{value} is outside [{lo}, {hi}]", hint or f"use a value from {lo} to {hi}")
        return value

    def sub(self, key: str) -> Section | None:
        self.used.add(key)
        if key not in self.table:
            return None
        return Section(self.path, self.qualified(key), self.table[key])

    def finish(self) -> None:
        unknown = sorted(set(self.table) - self.used)
        if unknown:
            known = ", ".join(sorted(self.used))
            raise self.error(unknown[0], "unknown key", f"remove it or use one of: {known}")


def kind_names(kinds: tuple[type, ...]) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "a table"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)
