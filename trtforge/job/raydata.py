"""`trtforge run --ray`: the same job as a Ray Data pipeline, for data past one machine.

    read (Ray Data: Parquet, JSON Lines, text)
        -> tokenize (Tokenize: CPU actors, the artifact's Rust tokenizer; bad rows marked, not dropped)
        -> infer (Model: one actor per GPU, or CPU actors; each loads the artifact through the
                  runtime's checked loader, so a file that does not match its sha256 is refused
                  before any row)
        -> write (this process: the single-host run's shards and _run.json, in input order)

Ray Data keeps the input's order (`preserve_order`), so row numbers are counted here as rows come
back, and the output is the single-host `trtforge run`'s, shard for shard. Ray restarts an actor
that dies and redoes its blocks; the rows come here once each. A rerun after a lost driver or head
node keeps the shards _run.json lists and recomputes (but does not rewrite) the rows before them.

`Model` is also the public API for users' own pipelines:

    import ray
    from trtforge.job.raydata import Model

    ds = ray.data.read_parquet("s3://bucket/texts/")
    ds.map_batches(Model, fn_constructor_kwargs={"artifact": "engines/minilm", "keep": ["id"]},
                   num_gpus=1, batch_size=4096, compute=ray.data.ActorPoolStrategy(size=4),
                   ).write_parquet("s3://bucket/embeddings/")
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from trtforge.job.inputs import InputError, Source, checked_text
from trtforge.job import tables

# the columns between the stages
IDS, PROBLEM, ID, TRUNCATED = "__trtforge_ids", "__trtforge_problem", "__trtforge_id", "__trtforge_truncated"
TYPES = "__trtforge_type_ids"  # segment ids, where the tokenizer gives them (a cross-encoder's pairs)
LENGTH = "__trtforge_length"  # each row's token count: what the driver needs of the ids, which stop at inference
READERS = {"parquet": "read_parquet", "jsonl": "read_json", "text": "read_text"}
BLOCK_ROWS = 4096  # rows per batch between the stages (fewer where a shard is smaller: RayPipeline.run)
IN_FLIGHT = 2  # batches in each inference actor's runtime at once: the GPU runs one while the next is sent
ACTOR_CPUS = 0.5  # the most CPU Ray reserves for each tokenizing (and CPU inference) actor


def _checked(value: Any, column: str, max_chars: int) -> tuple[str | None, str]:
    """The single-host run's checks (inputs.checked_text), with "" for no problem; NaN, as Ray's
    readers may give a missing value, is a null."""
    if isinstance(value, float) and np.isnan(value):
        value = None
    text, problem = checked_text(value, column, max_chars)
    return text, problem or ""


def verified(artifact: Path) -> dict:
    """The artifact's manifest, once every file of the artifact matches it (size, sha256, nothing
    unlisted): the driver checks before a cluster is touched, and every actor (and every restart of
    one) again in its constructor, whoever built the pipeline; the runtime's loader then checks the
    engine files it reads a third time."""
    from trtforge.errors import ArtifactError
    from trtforge.manifest import read_manifest, verify_files

    manifest = read_manifest(artifact)
    problems = verify_files(artifact, manifest)
    if problems:
        raise ArtifactError(f"{artifact} does not match its manifest ({problems[0]}"
                            f"{f'; {len(problems) - 1} more' if len(problems) > 1 else ''}); rebuild it with "
                            "trtforge build, or run trtforge inspect to see every problem")
    return manifest


def _artifact_text(artifact: str) -> tuple[dict, dict]:
    from trtforge.manifest import verified_text_config

    manifest = verified(Path(artifact))
    return manifest, verified_text_config(Path(artifact), manifest)


class Tokenize:
    """Ray Data stage (CPU): texts (with their pairs) to token ids, a block's rows padded to its
    longest (a fixed-shape tensor column, which crosses the object store without a copy per row;
    LENGTH says how many are real); a bad row gets no ids and its problem, so that row numbers and
    the bad-row policy stay the driver's."""

    def __init__(self, artifact: str, column: str = "text", pair_column: str | None = None, prefix: str = "",
                 id_column: str | None = None, threads: int = 1) -> None:
        from trtforge.runtime.tokenize import FastTokenizer

        _, text = _artifact_text(artifact)  # the tokenizer's files are verified before they are read
        self.column, self.pair_column, self.prefix, self.id_column = column, pair_column, prefix, id_column
        self.max_chars = tables.CHARS_PER_TOKEN * text["max_length"]
        self.tokenizer = FastTokenizer(Path(artifact) / text["tokenizer"], text["max_length"], threads=threads)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch[self.column])
        texts, problems, good = [], [], []
        pairs = batch[self.pair_column] if self.pair_column else None
        for i, value in enumerate(batch[self.column]):
            text, problem = _checked(value, self.column, self.max_chars)
            if not problem and pairs is not None:
                pair, problem = _checked(pairs[i], self.pair_column, self.max_chars)
                text = (self.prefix + text, pair) if not problem else None
            elif not problem:
                text = self.prefix + text
            problems.append(problem)
            if not problem:
                texts.append(text)
                good.append(i)
        truncated, lengths = np.zeros(n, dtype=bool), np.zeros(n, dtype=np.int64)
        out = {PROBLEM: np.array(problems, dtype=object), TRUNCATED: truncated, LENGTH: lengths}
        tokens = self.tokenizer.encode(texts) if texts else None
        if tokens is not None:
            truncated[good], lengths[good] = tokens.truncated, tokens.lengths
        real = _real(lengths, max(1, lengths.max(initial=0)))  # row-major: ids in order
        out[IDS] = np.zeros(real.shape, np.int32)
        if self.pair_column:  # every block of a pair job has them, so that the blocks' columns agree
            out[TYPES] = np.zeros(real.shape, np.int8)
        if tokens is not None:
            out[IDS][real] = tokens.ids
            if self.pair_column and tokens.type_ids is not None:
                out[TYPES][real] = tokens.type_ids
        if self.id_column:
            out[ID] = np.array([None if v is None else str(v) for v in batch[self.id_column]], dtype=object)
        return out


class Model:
    """Ray Data stage (one actor per GPU, or CPU actors): the artifact on this actor's device.

    Takes Tokenize's columns, or texts in `column` (tokenized here). Returns the task's columns:
    `embedding` (models with pooling), `label`/`label_id`/`score`/`logits` (classifiers), `score`
    (cross-encoders, with `pair_column`), and the input columns named in `keep` (an id, say)
    beside them. Every file of the artifact is verified against its manifest here, and the
    runtime's loader refuses an engine that does not match this actor's GPU."""

    def __init__(self, artifact: str, column: str = "text", pair_column: str | None = None,
                 prompt: str | None = None, cpu_workers: int = 1, keep: tuple[str, ...] | list[str] = ()) -> None:
        import torch

        from trtforge.runtime import Runtime
        from trtforge.tokens import prompt_text

        manifest, self.text = _artifact_text(artifact)
        self.kind = tables.kind(Path(artifact), self.text, manifest["model"]["task"], pair_column)
        self.width = tables.width(manifest, self.text, self.kind)
        self.column, self.pair_column, self.keep = column, pair_column, tuple(keep)
        self.prefix = prompt_text(self.text, prompt)
        gpu = torch.cuda.is_available() and torch.cuda.device_count() > 0  # Ray shows an actor its own GPU
        self.runtime = Runtime(artifact, devices="all" if gpu else cpu_workers)
        self.tokenizer = None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from trtforge.runtime.tokenize import Tokens

        missing = [name for name in self.keep if name not in batch]
        if missing:
            raise ValueError(f"Model(keep={missing}): not columns of the dataset, which has {sorted(batch)}")
        if IDS in batch:
            good = [i for i, p in enumerate(batch[PROBLEM]) if not p]
            lengths = np.asarray(batch[LENGTH], np.int64)[good]
            tokens = Tokens(_unpadded(batch[IDS][good], lengths),
                            _unpadded(batch[TYPES][good], lengths) if TYPES in batch else None, lengths)
        else:
            good = list(range(len(batch[self.column])))
            tokens = self._tokenize(batch)
        outputs = self.runtime.submit_tokens(tokens).result() if good else None
        columns = tables.columns(outputs, len(good), self.kind, self.width, self.text)
        n = len(batch[PROBLEM if IDS in batch else self.column])
        return {**{name: batch[name] for name in self.keep},
                **{name: _spread(np.asarray(values), good, n) for name, values in columns.items()}}

    def _tokenize(self, batch: dict[str, np.ndarray]) -> Any:
        from trtforge.runtime.tokenize import FastTokenizer

        if self.tokenizer is None:
            self.tokenizer = FastTokenizer(Path(self.runtime.artifact) / self.text["tokenizer"], self.text["max_length"])
        texts = []
        for i, value in enumerate(batch[self.column]):
            text, problem = _checked(value, self.column, tables.CHARS_PER_TOKEN * self.text["max_length"])
            if problem:
                raise ValueError(f"row {i} of a batch: {problem}")
            texts.append(self.prefix + text if not self.pair_column else (self.prefix + text, str(batch[self.pair_column][i])))
        return self.tokenizer.encode(texts)

    def __del__(self) -> None:
        runtime = getattr(self, "runtime", None)
        if runtime is not None:
            runtime.close()


def _unpadded(padded: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Row i's first lengths[i] values, one row after another, as int64: Tokenize's padded block,
    or blocks of several widths, which Ray joins into a column of rows (an object array)."""
    if padded.dtype == object:
        rows = [np.asarray(row)[:k] for row, k in zip(padded, lengths)]
        return np.concatenate(rows).astype(np.int64) if rows else np.zeros(0, np.int64)
    return padded[_real(lengths, padded.shape[1])].astype(np.int64)


def _real(lengths: np.ndarray, width: int) -> np.ndarray:
    """Which places of a (rows, width) padded block hold row i's first lengths[i] values."""
    return np.arange(width)[None, :] < lengths[:, None]


def _spread(values: np.ndarray, good: list[int], n: int) -> np.ndarray:
    """Values of the good rows at their places in a batch of n rows (zeros, or None, at bad ones)."""
    if len(good) == n:
        return values
    out = np.zeros((n, *values.shape[1:]), dtype=values.dtype) if values.dtype != object else np.full(n, None, object)
    out[good] = values
    return out


class RayPipeline:
    """The Ray Data form of run.py's _Pipeline: same `run` contract, same output."""

    def __init__(self, address: str, artifact: Path, text: dict, options: Any, meter: Any) -> None:
        from trtforge.errors import EnvironmentProblem

        try:
            import ray
        except ImportError:
            raise EnvironmentProblem("--ray needs Ray Data, which is not installed: pip install 'trtforge[ray]'") from None
        verified(artifact)  # before a cluster is touched

        self.artifact, self.text, self.options, self.meter = artifact, text, options, meter
        self.started_here = not ray.is_initialized()
        if self.started_here:
            if address == "local":  # a Ray instance of this machine's own, on loopback only
                ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
                         num_cpus=options.ray_cpus, configure_logging=False)
            else:
                ray.init(address=address, log_to_driver=False)
        resources = ray.cluster_resources()
        self.gpus = int(resources.get("GPU", 0)) if options.devices != "cpu" else 0
        cpus = int(resources.get("CPU", 1))
        self.infer_actors = self.gpus or options.cpu_workers
        self.tokenize_actors = max(1, cpus - 1) if self.gpus else 1
        # CPU shares, not whole CPUs, and together at most all CPUs but one: the read tasks need a
        # whole one, and without it the job would wait for ever (2 CPUs and 3 actors in CI).
        actors = self.tokenize_actors + (0 if self.gpus else self.infer_actors)
        self.actor_cpus = min(ACTOR_CPUS, max(0.01, (cpus - 1) / actors))
        self.tokenizers = SimpleNamespace(processes=self.tokenize_actors, threads=1)  # as run.py's summary reads it
        meter.line(f"  Ray at {address}: {self.infer_actors} inference actor(s) on "
                   f"{'GPUs' if self.gpus else 'CPUs'}, {self.tokenize_actors} tokenizing actor(s)")

    def dataset(self, source: Source, prefix: str, files: list[Path] | None = None, rows: int = BLOCK_ROWS) -> Any:
        """The pipeline over `files` (default: every input file), in blocks of `rows` rows."""
        import ray

        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True  # rows come back in input order
        context.enable_progress_bars = False
        kinds = set(source.formats)
        if len(kinds) != 1 or next(iter(kinds)) not in READERS:
            raise InputError(f"--ray reads one format at a time of {', '.join(READERS)}; {source.files[0].parent} "
                             f"holds {', '.join(sorted(kinds))}: convert it, or run without --ray")
        kind = next(iter(kinds))
        files = [str(f) for f in (source.files if files is None else files)]
        o = self.options
        if kind == "text":
            ds = ray.data.read_text(files, drop_empty_lines=False)
        elif kind == "jsonl":
            ds = ray.data.read_json(files, lines=True)
        else:
            ds = ray.data.read_parquet(files, columns=[c for c in (o.column, o.pair_column, o.id_column) if c])
        # Ray reads a file as one block, and an actor takes a block whole: without this, one actor would
        # tokenize a one-file input and the GPU would wait for all of it (0.18x the single-host run, H100)
        ds = ds.repartition(target_num_rows_per_block=rows)
        column = "text" if kind == "text" else o.column
        tokenize = dict(artifact=str(self.artifact), column=column, pair_column=o.pair_column, prefix=prefix,
                        id_column=o.id_column)
        ds = ds.map_batches(Tokenize, fn_constructor_kwargs=tokenize, batch_size=rows,
                            compute=ray.data.ActorPoolStrategy(size=self.tokenize_actors), num_cpus=self.actor_cpus)
        infer = dict(artifact=str(self.artifact), pair_column=o.pair_column, cpu_workers=1)
        return ds.map_batches(_Keep(Model), fn_constructor_kwargs=infer, batch_size=rows,
                              compute=ray.data.ActorPoolStrategy(size=self.infer_actors,
                                                                 max_concurrent_calls_per_actor=IN_FLIGHT,
                                                                 enable_true_multi_threading=True), num_gpus=1 if self.gpus else 0,
                              num_cpus=0 if self.gpus else self.actor_cpus, max_restarts=-1, max_task_retries=-1)

    def run(self, source: Source, shard_rows: int, start: int, policy: str, prefix: str, out: Any, kind: str,
            width: int, text: dict) -> None:
        files, number = unread(source, start * shard_rows)
        if not files:  # every row was written before the job stopped
            return
        skip = start * shard_rows - number  # rows already written in the files read: computed again, not written
        index = start
        pending: dict[str, list] = {}
        # Blocks no larger than a shard, the unit of resume: each shard is written as soon as its rows
        # come back, not once a whole block of other shards' rows has (an interrupted job keeps them)
        rows = min(BLOCK_ROWS, shard_rows)
        dataset = self.dataset(source, prefix, files, rows)
        for batch in dataset.iter_batches(batch_size=rows, batch_format="numpy"):
            n = len(batch[PROBLEM])
            for name, values in batch.items():
                pending.setdefault(name, []).append(values)
            if skip:
                cut = min(skip, n)
                pending = {k: [np.concatenate(v)[cut:]] for k, v in pending.items()}
                skip -= cut
                number += cut
            while len(pending) and sum(len(v) for v in pending[PROBLEM]) >= shard_rows:
                rows, pending = _split(pending, shard_rows)
                self._write(out, index, rows, number, policy, source)
                number += shard_rows
                index += 1
        if pending and sum(len(v) for v in pending[PROBLEM]):
            rows, _ = _split(pending, sum(len(v) for v in pending[PROBLEM]))
            self._write(out, index, rows, number, policy, source)
        if self.options.verbose:  # where the time went, operator by operator, as Ray Data measured it
            self.meter.line(dataset.stats())

    def _write(self, out: Any, index: int, rows: dict[str, np.ndarray], first: int, policy: str,
               source: Source) -> None:
        """Shard `index`: the rows from global row `first` on, under the bad-row policy."""

        shard = tables.Shard(index, 0, [], [], None, [])
        problems = rows[PROBLEM]
        good = [i for i, p in enumerate(problems) if not p]
        shard.rows = len(problems)
        for i, problem in enumerate(problems):
            if problem:
                where = f"{source.files[0] if len(source.files) == 1 else 'input'} row {first + i}"
                if policy == "fail":
                    raise InputError(f"{where}: {problem}; fix the row, or pass --on-bad-row skip to leave such rows "
                                     "out (they are counted and listed)")
                shard.bad.append({"row": first + i, "where": where, "problem": problem})
        shard.numbers = [first + i for i in good]
        if self.options.id_column:
            shard.ids = [rows[ID][i] for i in good]
        columns = {name: values[good] for name, values in rows.items() if name not in (LENGTH, PROBLEM, ID, TRUNCATED)}
        columns["truncated"] = rows[TRUNCATED][good].astype(bool)  # last, as the single-host table has it
        tokens = int(rows[LENGTH][good].sum())
        out.write_shard(shard.index, tables.arrow(shard.numbers, shard.ids, columns), rows=shard.rows, bad=shard.bad,
                        tokens=tokens, truncated=int(columns["truncated"].sum()))
        self.meter.add(shard.rows, tokens)

    def close(self) -> None:
        import ray

        if self.started_here:
            ray.shutdown()


def unread(source: Source, written: int) -> tuple[list[Path], int]:
    """The files a resumed job reads, and how many rows come before them: Parquet files whose rows are
    all among the `written` ones (their metadata counts them) are not read, tokenized and inferred
    again. Other formats are read from their start and the rows written counted off."""
    counts = source.parquet_rows() if written else None
    if counts is None:
        return list(source.files), 0
    before = 0
    for i, rows in enumerate(counts):
        if before + rows > written:
            return source.files[i:], before
        before += rows
    return [], before


def _split(pending: dict[str, list], rows: int) -> tuple[dict[str, np.ndarray], dict[str, list]]:
    joined = {k: np.concatenate(v) for k, v in pending.items()}
    return {k: v[:rows] for k, v in joined.items()}, {k: [v[rows:]] for k, v in joined.items()}


class _Keep:
    """A Model class that passes Tokenize's columns through beside its own (the driver needs the
    problems and the token counts), less the token ids and segment ids."""

    def __new__(cls, model: type) -> type:
        class Kept(model):
            def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
                kept = {name: values for name, values in batch.items() if name not in (IDS, TYPES)}
                return {**kept, **super().__call__(batch)}

        Kept.__name__ = Kept.__qualname__ = "TrtforgeModel"
        return Kept
