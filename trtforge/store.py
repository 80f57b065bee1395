"""Artifacts on disk: the stage cache, the published artifact directory, its manifest and hashes.

Layout under the output directory DIR:

    DIR/<name>/                  the artifact; complete whenever it exists (swapped in atomically)
        manifest.json            written last; lists every file with its size and sha256
    DIR/<name>.failed/           a failed rebuild, kept beside a passing artifact instead of replacing it
    DIR/.trtforge/<name>/        the stage cache: one directory per stage and input key
        <stage>-<key>/           created under a temporary name, renamed into place when complete;
            files.json           size and sha256 of every file in it, verified before each reuse
        lock                     held by a build of <name> from start to end (says who holds it)

What trtforge owns, and so may replace or delete: DIR/.trtforge/<name>/, and DIR/<name> (or
DIR/<name>.failed) only when it is a trtforge artifact of that name (or an empty directory).
Anything else in its way is refused, never removed. Temporary names are `.tmp-<name>.<8 hex>` in DIR
and `.tmp-*` inside the cache; the next build of <name> removes leftovers of a killed one.

Integrity: artifact files are copies (never links into the cache) whose sha256 is checked against
the cache's record as they are copied; "up to date" means every file matches the manifest; a cache
entry that fails its record is dropped and rebuilt, never re-blessed.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from trtforge.checks import seconds
from trtforge.errors import ArtifactError, TrtforgeError

MANIFEST = "manifest.json"
SCHEMA_FAMILY = "trtforge.manifest/"
RESULT = "stage.json"
FILES = "files.json"
TMP_PREFIX = ".tmp-"
FAILED_SUFFIX = ".failed"
SHA256 = re.compile(r"[0-9a-f]{64}")
PUBLISHED = "published.json"  # in the cache: the sha256 of each manifest this cache's builds published
# A cache entry: <stage>-<16 hex>, where a stage is export, validate, fp16 or engine-<backend>-<target>.
ENTRY = re.compile(r"(export|validate|fp16|engine-[A-Za-z0-9._-]+)-[0-9a-f]{16}")


class BusyError(TrtforgeError):
    """Another build holds the artifact's lock for longer than we were asked to wait."""


def remove_tree(path: Path) -> None:
    """Remove what trtforge made at `path`: a directory's own tree, or a file; a link is removed
    itself, never followed (what it points at is not trtforge's)."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path)


def real_directory(path: Path, what: str) -> None:
    """Refuse a `path` that is a link or not a directory: trtforge never works through a link in
    a directory it owns (deleting there would delete what the link points at)."""
    if path.is_symlink():
        raise ArtifactError(f"{path} is a symbolic link; trtforge keeps {what} only in a real directory it created "
                            "(it would otherwise delete what the link points at): remove the link")
    if os.path.lexists(path) and not path.is_dir():
        raise ArtifactError(f"{path} is not a directory, and trtforge keeps {what} there: move it away")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def copy_hashing(source: Path, target: Path) -> str:
    """Copy `source` to `target` and return the sha256 of the bytes written, in one pass."""
    digest = hashlib.sha256()
    with source.open("rb") as src, target.open("wb") as dst:
        while chunk := src.read(1 << 22):
            digest.update(chunk)
            dst.write(chunk)
    return digest.hexdigest()


def key_of(*parts: Any) -> str:
    """A short, stable hash of JSON-serialisable parts: the cache key of a stage."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


def file_records(directory: Path, *, skip: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every regular file under `directory`, by POSIX path relative to it."""
    records = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and not p.is_symlink()):
        rel = path.relative_to(directory).as_posix()
        if rel not in skip:
            records[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    return records


class StageCache:
    """Completed stage outputs, keyed by a hash of everything that determines them."""

    def __init__(self, out_dir: Path, name: str, *, warn: Callable[[str], None] = lambda line: None) -> None:
        self.root = out_dir / ".trtforge" / name
        self.name = name
        self.warn = warn

    @contextlib.contextmanager
    def locked(self, *, timeout_s: float = 1800.0) -> Iterator[None]:
        """Serialise builds of one artifact: a second build says whom it waits for, waits at most
        `timeout_s`, then finds the first one's work."""
        seconds("timeout_s", timeout_s, allow_zero=True)  # nan or inf would wait forever
        real_directory(self.root.parent, "its stage cache")
        real_directory(self.root, "the stage cache of " + self.name)
        self.root.mkdir(parents=True, exist_ok=True)
        real_directory(self.root, "the stage cache of " + self.name)  # again: it may have been swapped meanwhile
        path = self.root / "lock"
        try:  # never through a link: the lock file is truncated and written
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            if e.errno != errno.ELOOP:
                raise
            raise ArtifactError(f"{path} is a symbolic link, not the lock trtforge writes: remove the link") from None
        with os.fdopen(fd, "r+") as lock:
            if not _try_lock(lock):
                holder = lock.read().strip() or "another process"
                self.warn(f"waiting for the build of {self.name} that holds {path} ({holder}); "
                          f"giving up after {timeout_s:.0f} s")
                deadline = time.monotonic() + timeout_s
                while not _try_lock(lock):
                    if time.monotonic() > deadline:
                        raise BusyError(f"gave up after {timeout_s:.0f} s waiting for the build of {self.name} that "
                                        f"holds {path} ({holder}); let it finish or stop it, or pass a longer --wait")
                    time.sleep(0.2)
            try:
                lock.seek(0)
                lock.truncate()
                lock.write(f"pid {os.getpid()}, since {dt.datetime.now().isoformat(timespec='seconds')}\n")
                lock.flush()
                self._remove_leftovers()
                yield
            finally:
                lock.seek(0)
                lock.truncate()
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _remove_leftovers(self) -> None:
        for path in self.root.glob(f"{TMP_PREFIX}*"):
            with contextlib.suppress(OSError):
                remove_tree(path)

    def path(self, stage: str, key: str) -> Path:
        return self.root / f"{stage}-{key}"

    def lookup(self, stage: str, key: str) -> dict[str, Any] | None:
        """The stage's result if its entry exists and every file in it matches the entry's record;
        an entry that does not is removed (and said), so that the stage runs again."""
        entry = self.path(stage, key)
        if not entry.is_dir():
            return None
        problems = self._verify(entry)
        result = None if problems else read_small_json(entry / RESULT)
        if not isinstance(result, dict):
            self.warn(f"cache entry {entry.name} fails verification ({problems[0] if problems else RESULT + ' unreadable'});"
                      " rebuilding it")
            with contextlib.suppress(OSError):
                remove_tree(entry)
            return None
        return result

    @staticmethod
    def _verify(entry: Path) -> list[str]:
        if entry.is_symlink():
            return ["a symbolic link, not an entry trtforge wrote"]
        expected = read_small_json(entry / FILES)
        if expected is None:
            return [f"{FILES} missing or unreadable"]
        if not isinstance(expected, dict) or RESULT not in expected:
            return [f"{FILES} does not record {RESULT}"]
        actual = set(file_records_names(entry)) - {FILES}
        problems = [f"{rel}: not recorded" for rel in sorted(actual - set(expected))]
        return problems + check_records(entry, expected)

    def scratch(self, stage: str, key: str) -> Path:
        """A new temporary directory for a stage's outputs (removed by the next build if abandoned)."""
        tmp = self.root / f"{TMP_PREFIX}{stage}-{key}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, stage: str, key: str, scratch: Path) -> Path:
        """Record every file's size and sha256, then make the scratch directory the stage's cache
        entry, atomically."""
        write_json_atomic(scratch / FILES, file_records(scratch, skip=(FILES,)))
        final = self.path(stage, key)
        if os.path.lexists(final):  # forced rebuild: replace the old entry
            remove_tree(final)
        os.rename(scratch, final)
        return final

    def records(self, stage: str, key: str) -> dict[str, dict[str, Any]]:
        return json.loads((self.path(stage, key) / FILES).read_text())

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
        """Drop cache entries that the current build no longer uses: only directories named as
        trtforge names its entries (never a link, never anything else someone put here)."""
        real_directory(self.root, "the stage cache of " + self.name)
        for entry in self.root.iterdir():
            if entry.name in keep or not ENTRY.fullmatch(entry.name):
                continue
            if entry.is_symlink() or not entry.is_dir():
                self.warn(f"left {entry} alone: not a cache entry trtforge wrote")
                continue
            shutil.rmtree(entry, ignore_errors=True)

    def record_published(self, directory: str, manifest_sha256: str, request_key: str) -> None:
        """Pin the manifest a build published (and the request that built it), so that a later
        build can tell it was edited, or that nothing has changed."""
        records = {k: v for k, v in self._published().items() if k != directory}
        records[directory] = {"manifest_sha256": manifest_sha256, "request_key": request_key}
        write_json_atomic(self.root / PUBLISHED, records)

    def published_record(self, directory: str) -> dict[str, str] | None:
        record = self._published().get(directory)
        if isinstance(record, dict) and all(isinstance(record.get(k), str) for k in ("manifest_sha256", "request_key")):
            return record
        return None

    def _published(self) -> dict[str, Any]:
        records = read_small_json(self.root / PUBLISHED) if not self.root.is_symlink() else None
        return records if isinstance(records, dict) else {}


def read_small_json(path: Path, max_bytes: int = 64 << 20) -> Any:
    """A JSON file trtforge wrote (a cache record, a manifest read to tell who owns a directory),
    or None where it is missing, a link, not a regular file, larger than `max_bytes`, or not JSON."""
    try:
        info = os.lstat(path)
        if not stat.S_ISREG(info.st_mode) or info.st_size > max_bytes:
            return None
        return json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return None


def _try_lock(lock: Any) -> bool:
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def file_records_names(directory: Path) -> list[str]:
    return [p.relative_to(directory).as_posix() for p in directory.rglob("*") if not p.is_dir()]


def record_ok(record: Any) -> bool:
    """A file's record as trtforge writes it: {"size": int >= 0, "sha256": 64 hex digits}."""
    return (isinstance(record, dict) and isinstance(record.get("size"), int) and not isinstance(record["size"], bool)
            and record["size"] >= 0 and isinstance(record.get("sha256"), str) and bool(SHA256.fullmatch(record["sha256"])))


def check_records(root: Path, expected: dict[str, Any]) -> list[str]:
    """One line per listed file that is missing, not a regular file inside `root`, or differs in
    size or sha256."""
    problems = []
    resolved_root = root.resolve()
    for rel, record in expected.items():
        if not (safe_relative(rel) and record_ok(record)):
            problems.append(f"{str(rel)[:80]}: its record is not a path with a size and a sha256")
            continue
        path = root / rel
        try:
            info = os.lstat(path)
        except OSError:
            problems.append(f"{rel}: missing")
            continue
        if not stat.S_ISREG(info.st_mode) or not path.resolve().is_relative_to(resolved_root):
            problems.append(f"{rel}: not a regular file inside {root}")
        elif info.st_size != record["size"]:
            problems.append(f"{rel}: size {info.st_size} != {record['size']}")
        elif sha256_file(path) != record["sha256"]:
            problems.append(f"{rel}: sha256 mismatch")
    return problems


# --- the published artifact ---------------------------------------------------------------------------

def owned(path: Path, name: str) -> bool:
    """Whether trtforge may replace `path`: absent, an empty directory, or a trtforge artifact named `name`."""
    if not os.path.lexists(path):
        return True
    if path.is_symlink() or not path.is_dir():
        return False
    if not any(path.iterdir()):
        return True
    manifest = read_small_json(path / MANIFEST)
    return (isinstance(manifest, dict) and str(manifest.get("schema", "")).startswith(SCHEMA_FAMILY)
            and manifest.get("name") == name)


def refuse_unowned(path: Path, name: str) -> None:
    if not owned(path, name) and path.is_dir() and not path.is_symlink() and os.path.lexists(path / MANIFEST) \
            and not isinstance(read_small_json(path / MANIFEST), dict):
        raise ArtifactError(f"{path} has a {MANIFEST} that trtforge cannot read (damaged or edited), so it cannot "
                            "tell that it made this directory and will not replace it: if it is a damaged artifact of "
                            "yours, delete it and build again")
    if not owned(path, name):
        raise ArtifactError(f"{path} exists and is not a trtforge artifact named {name!r}; trtforge replaces only "
                            "its own artifacts: move it away, or choose another [model] name or --out")


def temporary_names(out_dir: Path, name: str) -> list[Path]:
    """Leftovers of killed builds of `name` in `out_dir` (and only of `name`)."""
    pattern = re.compile(rf"{re.escape(TMP_PREFIX)}{re.escape(name)}(\.old)?\.[0-9a-f]{{8}}")
    with contextlib.suppress(FileNotFoundError):
        return [p for p in out_dir.iterdir() if pattern.fullmatch(p.name)]
    return []


def remove_leftovers(out_dir: Path, name: str) -> None:
    for path in temporary_names(out_dir, name):
        with contextlib.suppress(OSError):
            remove_tree(path)


def publish(out_dir: Path, name: str, files: dict[str, tuple[Path, str | None]], texts: dict[str, str],
            manifest: dict[str, Any], *, directory: str | None = None,
            before_swap: Callable[[str, str], None] = lambda directory, manifest_sha256: None) -> Path:
    """Assemble the artifact beside its final place, then swap it in.

    `files` maps artifact-relative paths to (source file, its expected sha256 or None): each is
    copied and the copy's sha256 checked against the expectation. `texts` are written as given. The
    manifest gains the size and sha256 of every file and is written last. `directory` is the name
    under `out_dir` (default: `name`).
    """
    final = out_dir / (directory or name)
    refuse_unowned(final, name)
    staging = out_dir / f"{TMP_PREFIX}{name}.{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    try:
        records = {}
        for rel, (source, expected) in files.items():
            target = _inside(staging, rel)
            target.parent.mkdir(parents=True, exist_ok=True)
            digest = copy_hashing(source, target)
            if expected is not None and digest != expected:
                raise ArtifactError(f"{source} changed since it was cached (sha256 {digest[:12]}... != recorded "
                                    f"{expected[:12]}...); run the build again (the entry is rebuilt) or --force")
            records[rel] = {"size": target.stat().st_size, "sha256": digest}
        for rel, text in texts.items():
            target = _inside(staging, rel)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
            records[rel] = {"size": target.stat().st_size, "sha256": sha256_file(target)}
        manifest["files"] = dict(sorted(records.items()))
        write_json_atomic(staging / MANIFEST, manifest)
        before_swap(final.name, sha256_file(staging / MANIFEST))  # pinned first: a kill after the swap keeps it
        _swap(staging, final)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return final


def remove_owned(path: Path, name: str) -> None:
    """Delete `path` if it is a trtforge artifact named `name` (a stale `<name>.failed`, say)."""
    if os.path.lexists(path) and owned(path, name):
        shutil.rmtree(path)


def _inside(root: Path, rel: str) -> Path:
    """`root / rel`, refusing anything that would land outside `root`."""
    if not safe_relative(rel):
        raise ArtifactError(f"refusing to write {rel!r} outside the artifact directory")
    return root / rel


def safe_relative(rel: Any) -> bool:
    """A normalised relative POSIX path with no '..', '.' or empty parts."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        return False
    path = PurePosixPath(rel)
    return not path.is_absolute() and path.as_posix() == rel and all(p not in ("", ".", "..") for p in path.parts)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> None:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE): no instant without either."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(a))


def _swap(staging: Path, final: Path) -> None:
    """Put `staging` at `final`. An existing `final` is exchanged with it atomically where the file
    system allows (then removed); elsewhere it is renamed aside first, a window in which `final` is
    absent that a killed build closes on its next run (the old copy is kept under a .tmp name)."""
    if not os.path.lexists(final):
        os.rename(staging, final)
        return
    try:
        _exchange(staging, final)
    except OSError as e:
        if e.errno not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            raise
        old = final.with_name(f"{staging.name.rsplit('.', 1)[0]}.old.{uuid.uuid4().hex[:8]}")
        os.rename(final, old)
        os.rename(staging, final)
        shutil.rmtree(old, ignore_errors=True)
        return
    shutil.rmtree(staging, ignore_errors=True)  # now holds the previous artifact
