"""Artifacts on disk: the stage cache, the published artifact directory, its manifest and hashes.

Layout under the output directory DIR:

    DIR/<name>/                  the artifact; complete whenever it exists (swapped in by rename)
        manifest.json            written last; lists every file with its size and sha256
    DIR/.trtforge/<name>/        the stage cache: one directory per stage and input key
        <stage>-<key>/           created under a temporary name, renamed into place when complete
        lock                     held by a build of <name> from start to end

A build killed at any point leaves either the previous artifact or the new one, never a mix, and
at worst a temporary directory that the next build removes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from trtforge.errors import ArtifactError

MANIFEST = "manifest.json"
SCHEMA = "trtforge.manifest/1"
RESULT = "stage.json"
TMP_PREFIX = ".tmp-"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def key_of(*parts: Any) -> str:
    """A short, stable hash of JSON-serialisable parts: the cache key of a stage."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


class StageCache:
    """Completed stage outputs, keyed by a hash of everything that determines them."""

    def __init__(self, out_dir: Path, name: str) -> None:
        self.root = out_dir / ".trtforge" / name

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Serialise builds of one artifact: a second build waits, then finds the first one's work."""
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / "lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self._remove_leftovers()
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _remove_leftovers(self) -> None:
        for path in self.root.glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(path, ignore_errors=True)

    def path(self, stage: str, key: str) -> Path:
        return self.root / f"{stage}-{key}"

    def lookup(self, stage: str, key: str) -> dict[str, Any] | None:
        result = self.path(stage, key) / RESULT
        return json.loads(result.read_text()) if result.is_file() else None

    def scratch(self, stage: str, key: str) -> Path:
        """A new temporary directory for a stage's outputs (removed by the next build if abandoned)."""
        tmp = self.root / f"{TMP_PREFIX}{stage}-{key}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, stage: str, key: str, scratch: Path) -> Path:
        """Make a completed scratch directory the stage's cache entry, atomically."""
        final = self.path(stage, key)
        if final.exists():  # forced rebuild: replace the old entry
            shutil.rmtree(final)
        os.rename(scratch, final)
        return final

    @contextlib.contextmanager
    def writing(self, stage: str, key: str) -> Iterator[Path]:
        """A scratch directory that becomes the stage's cache entry only if the block completes."""
        tmp = self.scratch(stage, key)
        try:
            yield tmp
            self.commit(stage, key, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def prune(self, keep: set[str]) -> None:
        """Drop cache entries that the current build no longer uses."""
        for entry in self.root.iterdir():
            if entry.name not in keep and not entry.name.startswith(TMP_PREFIX) and entry.name != "lock":
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink()


def publish(out_dir: Path, name: str, files: dict[str, Path], texts: dict[str, str],
            manifest: dict[str, Any]) -> Path:
    """Assemble the artifact beside its final place, then swap it in.

    `files` maps artifact-relative paths to existing files (hard-linked where possible); `texts` are
    written as given. The manifest gains the size and sha256 of every file and is written last.
    """
    final = out_dir / name
    staging = out_dir / f"{TMP_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    try:
        for rel, source in files.items():
            target = _inside(staging, rel)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source, target)
            except OSError:
                shutil.copy2(source, target)
        for rel, text in texts.items():
            target = _inside(staging, rel)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
        manifest["files"] = {rel: {"size": (staging / rel).stat().st_size, "sha256": sha256_file(staging / rel)}
                             for rel in sorted([*files, *texts])}
        write_json_atomic(staging / MANIFEST, manifest)
        _swap(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def _inside(root: Path, rel: str) -> Path:
    """`root / rel`, refusing anything that would land outside `root`."""
    target = (root / rel).resolve()
    if not target.is_relative_to(root.resolve()):
        raise ArtifactError(f"refusing to write {rel!r} outside the artifact directory")
    return root / rel


def _swap(staging: Path, final: Path) -> None:
    old = final.with_name(f"{TMP_PREFIX}old-{final.name}-{uuid.uuid4().hex[:8]}")
    if final.exists():
        os.rename(final, old)
    try:
        os.rename(staging, final)
    except OSError as e:
        if old.exists() and not final.exists():
            os.rename(old, final)
        raise ArtifactError(f"could not publish {final}: {e.strerror}") from None
    shutil.rmtree(old, ignore_errors=True)


def read_manifest(artifact: Path) -> dict[str, Any]:
    path = artifact / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{artifact} is not a trtforge artifact (no {MANIFEST}); "
                            "build it with `trtforge build RECIPE`")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}); rebuild with `trtforge build RECIPE --force`") from None
    if manifest.get("schema") != SCHEMA:
        raise ArtifactError(f"{path} has schema {manifest.get('schema')!r}, this trtforge reads {SCHEMA!r}; "
                            "rebuild it with this version")
    return manifest


def verify_files(artifact: Path, manifest: dict[str, Any], only: list[str] | None = None) -> list[str]:
    """Check every listed file's size and sha256; return one line per problem (empty when all match)."""
    problems = []
    for rel, expected in manifest["files"].items():
        if only is not None and rel not in only:
            continue
        path = artifact / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
        elif path.stat().st_size != expected["size"]:
            problems.append(f"{rel}: size {path.stat().st_size} != {expected['size']}")
        elif sha256_file(path) != expected["sha256"]:
            problems.append(f"{rel}: sha256 mismatch")
    return problems
