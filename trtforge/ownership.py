"""What trtforge owns, so that it writes and deletes only there.

trtforge replaces or deletes a path only when it made it and can tell: an artifact (a manifest of
its schema), its stage cache (`OUT/.trtforge/<name>/`, a real directory, never through a link), a
Triton repository whose `hashes.json` lists every file in it, bench results holding only bench
files. The other side of the rule: nothing a user asks trtforge to write may land inside one of
those, where the next build or export would corrupt or delete it (`--out` inside an artifact, a
Triton repository inside an artifact's cache, ...).
"""

from __future__ import annotations

import os
from pathlib import Path

from trtforge.errors import ArtifactError
from trtforge.store import MANIFEST, SCHEMA_FAMILY, TMP_PREFIX, read_small_json

CACHE_DIR = ".trtforge"
TRITON_MARKER = "hashes.json"
TRITON_SCHEMA = "trtforge.triton/1"
BENCH_MARKER = "bench.json"


def is_artifact(path: Path) -> bool:
    manifest = read_small_json(path / MANIFEST)
    return isinstance(manifest, dict) and str(manifest.get("schema", "")).startswith(SCHEMA_FAMILY)


def triton_record(path: Path) -> dict | None:
    """The record `trtforge export triton` left in a repository it wrote, or None."""
    record = read_small_json(path / TRITON_MARKER)
    if (isinstance(record, dict) and record.get("schema") == TRITON_SCHEMA and isinstance(record.get("files"), dict)
            and isinstance(record.get("artifact"), str)):
        return record
    return None


def owned_kind(path: Path) -> str | None:
    """What trtforge-owned thing `path` is, in words, or None."""
    if path.name == CACHE_DIR:
        return "trtforge's stage cache"
    if path.name.startswith(TMP_PREFIX) and (path.parent.name == CACHE_DIR or path.parent.parent.name == CACHE_DIR
                                              or is_artifact(path)):
        return "a build's temporary directory"
    if is_artifact(path):
        return "the artifact"
    if triton_record(path) is not None:
        return "the Triton repository"
    if (path / BENCH_MARKER).is_file() and path.name.endswith(".bench"):
        return "the bench results"
    return None


def refuse_inside_owned(path: Path, option: str, *, may_be: str | None = None) -> None:
    """Refuse a destination that is, or lies inside, something trtforge owns (an artifact, a stage
    cache, a Triton repository, bench results): writing there would corrupt it, and the next build
    or export would delete what was written. `may_be`: the kind the destination itself may be
    (an existing Triton repository is replaced by the next export, whole)."""
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError):  # a link loop: the file system refuses it when it is used
        resolved = Path(os.path.abspath(path))
    for place in (resolved, *resolved.parents):
        kind = owned_kind(place)
        if kind is None or (place == resolved and kind == may_be):
            continue
        what = f"{path} is {kind}" if place == resolved else f"{path} is inside {kind} {place}"
        raise ArtifactError(f"{option} {what}; trtforge would corrupt it, and its next build or export would delete "
                            f"what is written there: choose a {option} outside it")
