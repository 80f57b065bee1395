"""A run's output directory: shards of results, and `_run.json`, the record that makes a run
resumable and tells a consumer whether the output is whole.

    OUT/_run.json              schema trtforge.run/1: the artifact, the input, the options, each
                              shard's rows, bad rows and sha256; "complete" once every row is written
    OUT/.incomplete/          shards of a run still going (or interrupted): never read as output
    OUT/part-00000.parquet    the shards, moved here when the run completes (--format parquet)
    OUT/embeddings.npy        with --format npy: every embedding, in row order, and rows.npy, the
                              input row of each (they differ where bad rows were skipped)

A shard is written to a temporary name, flushed to disk and renamed, and only then recorded in
_run.json (itself written the same way): a kill at any moment leaves either a shard that _run.json
lists with its sha256, or none. A rerun verifies each recorded shard's sha256 and starts after the
last good one. trtforge deletes only what _run.json says it wrote, in a directory it made.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from trtforge.errors import ArtifactError
from trtforge.store import read_small_json, real_directory, sha256_file

SCHEMA = "trtforge.run/1"
RECORD = "_run.json"  # "_": readers of a Parquet directory (pyarrow, pandas, Spark) skip it
STAGING = ".incomplete"


def fingerprint(parts: dict[str, Any]) -> str:
    """What a rerun must match to resume: the artifact, the input files, the options."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


class RunDir:
    """OUT, for one run: made or resumed (see the module's docstring)."""

    def __init__(self, path: Path, record: dict[str, Any]) -> None:
        self.path, self.record = path, record
        self.staging = path / STAGING

    # --- opening -------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: Path, header: dict[str, Any], say: Any) -> RunDir:
        """OUT ready for the run that `header` describes: a new run in a new or empty directory;
        the same run resumed (its good shards kept); an interrupted run of something else replaced.
        Refuses a directory that holds anything else, or a finished run of something else."""
        if os.path.lexists(path) and not path.is_dir():
            raise ArtifactError(f"--out {path} is a file; give a directory for the run's output")
        previous = read_small_json(path / RECORD) if path.is_dir() else None
        if path.is_dir() and not isinstance(previous, dict) and any(path.iterdir()):
            raise ArtifactError(f"--out {path} is not empty and holds no trtforge run ({RECORD}); choose an empty "
                                "or new directory")
        if isinstance(previous, dict) and previous.get("schema") != SCHEMA:
            raise ArtifactError(f"--out {path}/{RECORD} is not a trtforge run record ({SCHEMA}); choose another --out")
        if isinstance(previous, dict):
            run = cls(path, previous)
            if previous.get("fingerprint") != header["fingerprint"]:
                if previous.get("complete"):
                    raise ArtifactError(f"--out {path} holds a finished run of another artifact, input or options; "
                                        "choose another --out, or remove it to run again")
                say(f"  {path} held an interrupted run of another artifact, input or options: starting afresh")
                run.discard()
            elif not previous.get("complete"):
                run._resume(say)
                return run
            elif not (damaged := run.damaged_outputs()):
                return run  # finished and intact: nothing to do
            else:
                say(f"  {path}/{damaged[0]} is missing or fails its sha256: running again")
                run.discard()
        path.mkdir(parents=True, exist_ok=True)
        run = cls(path, {**header, "complete": False, "shards": []})
        run._save()
        return run

    def _resume(self, say: Any) -> None:
        """Keep the recorded shards whose sha256 holds, in order, up to the first that does not."""
        real_directory(self.staging, "a run's unfinished shards")
        shards = self.record.get("shards", [])
        good = 0
        for shard in shards:
            if not self._intact(shard):
                break
            good += 1
        if good < len(shards):
            say(f"  shard {shards[good].get('name')} is missing or fails its sha256: redoing it and those after it")
            self.record["complete"] = False
        for shard in shards[good:]:
            self._remove_shard(shard)
        self.record["shards"] = shards[:good]
        self._remove_temporaries()
        self._save()

    def _intact(self, shard: Any) -> bool:
        if not isinstance(shard, dict) or not isinstance(shard.get("name"), str) or "/" in shard["name"]:
            return False
        where = self._where(shard["name"])
        return where is not None and where.stat().st_size == shard.get("size") and sha256_file(where) == shard.get("sha256")

    def _where(self, name: str) -> Path | None:
        for place in (self.staging / name, self.path / name):
            if place.is_file() and not place.is_symlink():
                return place
        return None

    # --- shards --------------------------------------------------------------------------------------
    @property
    def done_rows(self) -> int:
        return sum(s["rows"] for s in self.record["shards"])

    def write_shard(self, index: int, table: Any, *, rows: int, bad: list[dict[str, Any]], tokens: int,
                    truncated: int = 0) -> None:
        """The shard's table to disk (temporary name, fsync, rename), then into _run.json."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.staging.mkdir(exist_ok=True)
        real_directory(self.staging, "a run's unfinished shards")
        name = f"part-{index:05d}.parquet"
        tmp = self.staging / f".tmp-{name}.{uuid.uuid4().hex[:8]}"
        # Dictionary pages only for the string columns (id, label): on float vectors they are a
        # third of the write time and make the file larger.
        strings = [f.name for f in table.schema if f.type in (pa.string(), pa.large_string())]
        pq.write_table(table, tmp, compression="zstd", use_dictionary=strings)
        _flush(tmp)
        target = self.staging / name
        os.replace(tmp, target)
        self.record["shards"].append({"name": name, "rows": rows, "written": table.num_rows, "tokens": tokens,
                                      "truncated": truncated, "bad_rows": bad, "size": target.stat().st_size, "sha256": sha256_file(target)})
        self._save()

    def finish(self, summary: dict[str, Any], npy: bool) -> list[str]:
        """Publish the output (shards into OUT, or the .npy files assembled from them) and mark the
        run complete; the names of what was published."""
        names = [s["name"] for s in self.record["shards"]]
        if npy:
            published = self._assemble_npy()
            for name in names:
                (self.staging / name).unlink(missing_ok=True)
        else:
            for name in names:
                if (self.staging / name).exists():
                    os.replace(self.staging / name, self.path / name)
            published = names
        self.record.update(complete=True, summary=summary)
        self._save()
        shutil.rmtree(self.staging, ignore_errors=True)
        return published

    def damaged_outputs(self) -> list[str]:
        """A finished run's published files that are missing or fail their sha256."""
        records = self.record.get("outputs") or {s["name"]: s for s in self.record["shards"]}
        return [name for name, r in records.items()
                if not (self.path / name).is_file() or sha256_file(self.path / name) != r.get("sha256")]

    def _assemble_npy(self) -> list[str]:
        import pyarrow.parquet as pq

        total = sum(s["written"] for s in self.record["shards"])
        first = pq.read_table(self.staging / self.record["shards"][0]["name"]) if self.record["shards"] else None
        width = first.schema.field("embedding").type.list_size if first is not None else 0
        outputs = {}
        for name, shape, dtype in (("embeddings.npy", (total, width), np.float32), ("rows.npy", (total,), np.int64)):
            tmp = self.path / f".tmp-{name}.{uuid.uuid4().hex[:8]}"
            array = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
            at = 0
            for shard in self.record["shards"]:
                table = pq.read_table(self.staging / shard["name"], columns=["embedding" if dtype is np.float32 else "row"])
                column = table.column(0).combine_chunks()
                values = (column.values.to_numpy().reshape(-1, width) if dtype is np.float32 else column.to_numpy())
                array[at:at + len(values)] = values
                at += len(values)
            array.flush()
            del array
            _flush(tmp)
            os.replace(tmp, self.path / name)
            outputs[name] = {"size": (self.path / name).stat().st_size, "sha256": sha256_file(self.path / name)}
        self.record["outputs"] = outputs
        return list(outputs)

    # --- removal of what this run wrote, only ---------------------------------------------------------
    def discard(self) -> None:
        """Remove what _run.json says this run wrote (and its staging directory), nothing else."""
        for shard in self.record.get("shards", []):
            self._remove_shard(shard)
        for name in (self.record.get("outputs") or {}):
            if isinstance(name, str) and "/" not in name:
                (self.path / name).unlink(missing_ok=True)
        if self.staging.is_dir() and not self.staging.is_symlink():
            shutil.rmtree(self.staging)
        (self.path / RECORD).unlink(missing_ok=True)

    def abandon(self, made: bool) -> None:
        """After a failure that makes the run's work useless (a bad row): remove it, and OUT too if
        this run made it and nothing else is there."""
        self.discard()
        if made:
            try:
                self.path.rmdir()
            except OSError:
                pass

    def _remove_shard(self, shard: Any) -> None:
        if isinstance(shard, dict) and isinstance(shard.get("name"), str) and "/" not in shard["name"]:
            for place in (self.staging / shard["name"], self.path / shard["name"]):
                if place.is_file() and not place.is_symlink():
                    place.unlink()

    def _remove_temporaries(self) -> None:
        for place in (self.path, self.staging):
            if place.is_dir():
                for leftover in place.glob(".tmp-*"):
                    if leftover.is_file():
                        leftover.unlink()

    def _save(self) -> None:
        tmp = self.path / f".tmp-{RECORD}.{uuid.uuid4().hex[:8]}"
        tmp.write_text(json.dumps(self.record, indent=1) + "\n")
        _flush(tmp)
        os.replace(tmp, self.path / RECORD)


def _flush(path: Path) -> None:
    with path.open("rb+") as f:
        os.fsync(f.fileno())
