"""The command line. Thin: parse, call the pipeline, map errors to exit codes.

Exit codes: 0 passed, 1 a parity gate or a verification failed (reports are still written),
2 bad input or environment, 130 interrupted.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

import click

from trtforge import __version__, interrupts
from trtforge.checks import seconds
from trtforge.errors import TrtforgeError, os_error_message
from trtforge.triton import MAX_GPUS
from trtforge.text import printable

MAX_SLOTS = 64  # = trtforge.runtime.shm.MAX_SLOTS, which imports numpy (tests/test_cli.py checks they agree)

DEFAULT_OUT = Path("engines")
WAIT_MAX = 7 * 24 * 3600.0  # a week: longer is a mistake, and nan or inf would wait forever


def _finite(value: float, option: str) -> float:
    try:
        return seconds(option, value, allow_zero=True)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint=option) from None


def _fail(message: str, code: int) -> None:
    click.echo(f"error: {printable(message)}", err=True)
    sys.exit(code)


INTERRUPTED = "interrupted; the published artifact is unchanged (partial work was discarded)"
# What a file-system refusal asks the user to change, by command (see errors.os_error_message).
OS_FIX_TARGETS = {"build": "--out", "bench": "--out or --results", "export_triton": "REPO", "run": "--out"}


def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The one place that turns trtforge errors into one line and an exit code."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        verbose = kwargs.get("verbose", False)
        try:
            with interrupts.watching():
                return fn(*args, **kwargs)
        except KeyboardInterrupt:
            _fail(INTERRUPTED, 130)
        except Exception as e:
            if interrupts.received() and getattr(e, "exit_code", None) != 130:
                _fail(INTERRUPTED, 130)  # a library swallowed Ctrl-C and raised an error of its own
            if not isinstance(e, (TrtforgeError, OSError)):
                raise
            if verbose:
                traceback.print_exc()
            if isinstance(e, TrtforgeError):
                _fail(str(e), e.exit_code)
            _fail(os_error_message(e, OS_FIX_TARGETS.get(fn.__name__)), 2)  # the disk or file system said no

    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    return wrapper


def _common(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("-v", "--verbose", is_flag=True, help="More detail, and tracebacks on errors.")(fn)
    fn = click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")(fn)
    return fn


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="trtforge")
def main() -> None:
    """Build validated FP16 ONNX and GPU engines from Hugging Face models.

    \b
    trtforge build recipes/minilm.toml     export, validate, FP16, engines, manifest
    trtforge inspect engines/minilm        summarise an artifact and verify its hashes
    trtforge run engines/minilm texts.txt --out embeddings/   the model over a file of texts, every GPU
    trtforge bench recipes/minilm.toml     runtime vs PyTorch DDP: parity, speed, scaling
    trtforge export triton engines/minilm REPO   a Triton model repository from the artifact

    Exit codes: 0 passed, 1 parity gate or verification failed, 2 bad input or environment,
    130 interrupted.
    """


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", type=click.Path(path_type=Path, file_okay=False), default=DEFAULT_OUT,
              show_default=True, help="Output root; the artifact goes to OUT/<model.name>/.")
@click.option("--force", is_flag=True, help="Rebuild every stage, ignoring the cache.")
@click.option("--publish-failed", is_flag=True,
              help="Publish a build that fails its gates in place of a passing artifact (default: beside it, "
                   "as OUT/<name>.failed).")
@click.option("--wait", "wait_s", type=click.FloatRange(min=0, max=WAIT_MAX), default=1800, show_default=True,
              callback=lambda ctx, param, value: _finite(value, "--wait"),
              help="Seconds to wait for another build of the same artifact before giving up.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable result on stdout.")
@_common
@guarded
def build(recipe: Path, out_dir: Path, force: bool, publish_failed: bool, wait_s: float, as_json: bool,
          quiet: bool, verbose: bool) -> None:
    """Build the artifact described by RECIPE (a TOML file; see README.md).

    Stages are cached: an unchanged recipe does nothing, a changed tolerance re-runs only validation.
    """
    from trtforge.pipeline import Build
    from trtforge.progress import Progress
    from trtforge.recipe import load_recipe

    if not verbose:  # transformers' per-weight loading bar says nothing a stage line does not
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    parsed = load_recipe(recipe)
    command = ["trtforge", "build", str(recipe), "--out", str(out_dir)]
    result = Build(parsed, out_dir, force=force, progress=Progress(quiet=quiet, verbose=verbose),
                   command=command, wait_s=wait_s, publish_failed=publish_failed).run()
    if as_json:
        click.echo(json.dumps(result.summary(), indent=2, default=str))
    exit_now(0 if result.passed else 1)


def exit_now(code: int) -> None:
    """Leave without the interpreter's teardown of torch, transformers and onnxruntime (about a
    second after a build: a tenth of a MiniLM build). Everything has been written, closed and
    published by now; only the streams need flushing. Inside a test runner (not __main__), exit
    normally."""
    if not _is_cli_process():
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _is_cli_process() -> bool:
    main_module = sys.modules.get("__main__")
    name = getattr(main_module, "__spec__", None) and main_module.__spec__.name
    return name == "trtforge.__main__" or os.path.basename(sys.argv[0]) == "trtforge"


def _ints(value: str, option: str) -> tuple[int, ...]:
    try:
        numbers = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers such as 1,32,128, got {value!r}",
                                 param_hint=option) from None
    if not numbers or min(numbers) < 1:
        raise click.BadParameter(f"expected positive integers such as 1,32,128, got {value!r}", param_hint=option)
    return numbers


DEFAULT_BATCHES = "1,32,128"
BASELINES = ("ddp", "ddp-sorted", "dataparallel", "compile")


def _baselines(value: str) -> tuple[str, ...]:
    names = tuple(b.strip() for b in value.split(",") if b.strip())
    unknown = [b for b in names if b not in BASELINES]
    if unknown:
        raise click.BadParameter(f"unknown baseline {unknown[0]!r}; use any of {', '.join(BASELINES)}",
                                 param_hint="--baselines")
    return names


def _refuse_outside_profile(config: Any, recipe: Any) -> None:
    """Batches and the sequence length the recipe's engines cannot take, refused before the build."""
    from trtforge.errors import TrtforgeError

    top = recipe.shapes.batch[2]
    if max(config.batches) > top:
        raise TrtforgeError(f"--batches {max(config.batches)} is above the recipe's [shapes] batch max {top}; "
                            f"use batches up to {top}")
    extent = recipe.shapes.extent
    synthetic = config.text is None and config.workload is None  # real text takes its own lengths
    if synthetic and recipe.shapes.extent_name == "sequence" and extent is not None \
            and not extent[0] <= config.sequence <= extent[2]:
        raise TrtforgeError(f"--sequence {config.sequence} is outside the recipe's [shapes] sequence "
                            f"[{extent[0]}, {extent[2]}]; use a length within it")


def refuse_foreign_bench_dir(path: Path) -> None:
    """Bench results go into a directory of their own: refuse one that holds anything else."""
    from trtforge.errors import ArtifactError
    from trtforge.bench.harness import BENCH_FILES

    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise ArtifactError(f"{path} is in the way of the bench results; move it or pass --results DIR")
    if path.is_dir():
        foreign = [p.name for p in path.iterdir() if p.name not in BENCH_FILES]
        if foreign:
            raise ArtifactError(f"{path} holds {foreign[0]!r}, which trtforge bench did not write; it writes only "
                                "into its own results directory: move it, or pass --results DIR")


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", type=click.Path(path_type=Path, file_okay=False), default=DEFAULT_OUT,
              show_default=True, help="Output root of the artifact (built first if needed).")
@click.option("--results", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Where the reports and plots go.  [default: OUT/<name>.bench]")
@click.option("--batches", default=None,
              help="Per-device batch sizes.  [default: 1,32,128, those within the recipe's [shapes] batch]")
@click.option("--sequence", type=click.IntRange(min=1), default=None,
              help="Sequence length.  [default: 128, or the recipe's [shapes] sequence max if shorter]")
@click.option("--devices", "device_counts", default=None, help="Device counts to run, e.g. 1,2,4.  [default: 1..all]")
@click.option("--iterations", type=click.IntRange(min=1), default=200, show_default=True, help="Timed batches per measurement.")
@click.option("--warmup", type=click.IntRange(min=0), default=20, show_default=True, help="Untimed batches first.")
@click.option("--cpu", "cpu_workers", type=click.IntRange(min=0), default=0,
              help="Bench N CPU workers (onnxruntime-cpu engines, gloo DDP) instead of GPUs.")
@click.option("--outputs", type=click.Choice(["host", "device"]), default="host", show_default=True,
              help="Return results to host memory, or leave them on the device.")
@click.option("--text", type=click.Path(path_type=Path, dir_okay=False, exists=True), default=None,
              help="Tokenize this file's lines up front and use them as inputs (time reported apart).")
@click.option("--workload", type=click.Choice(["short", "passage"]), default=None,
              help="Real English text (sentences or paragraphs of Debian's /usr/share/common-licenses), "
                   "each request padded to its longest row; reports real tokens/s.")
@click.option("--baselines", default="ddp,dataparallel,compile", show_default=True,
              help="PyTorch baselines to run: ddp, ddp-sorted (length-sorted batches), dataparallel, compile.")
@click.option("--backend", default=None, help="Engine backend the runtime loads.  [default: the device's default]")
@click.option("--tokenizer", default=None,
              help="Tokenizer for --text/--workload when the model has none (random weights): a directory "
                   "or package:NAME.")
@click.option("--callers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Caller threads submitting to the runtime at once (as a service's request threads do).")
@click.option("--depth", type=click.IntRange(min=1), default=4, show_default=True,
              help="Requests kept in flight per device while throughput is measured.")
@click.option("--slots", type=click.IntRange(min=1, max=MAX_SLOTS), default=4, show_default=True,
              help="Chunks in flight per worker (the runtime's shared-memory slots per device).")
@click.option("--json", "as_json", is_flag=True, help="Print the full result as JSON.")
@_common
@guarded
def bench(recipe: Path, out_dir: Path, results: Path | None, batches: str | None, sequence: int | None, device_counts: str | None,
          iterations: int, warmup: int, cpu_workers: int, outputs: str, text: Path | None, workload: str | None,
          baselines: str, backend: str | None, tokenizer: str | None, callers: int, depth: int, slots: int,
          as_json: bool, quiet: bool, verbose: bool) -> None:
    """Serve RECIPE's artifact with the runtime on 1..N devices against PyTorch DDP, DataParallel and
    torch.compile: parity, throughput, latency, scaling. Writes bench.json, bench.md and plots."""
    from trtforge.ownership import refuse_inside_owned
    from trtforge.pipeline import Build
    from trtforge.progress import Progress
    from trtforge.recipe import load_recipe
    from trtforge.bench.harness import BenchConfig, bench as run_bench, write_report

    if not verbose:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # Every option is checked before the (possibly long) build.
    config = BenchConfig(batches=_ints(batches or DEFAULT_BATCHES, "--batches"), sequence=sequence or 128, iterations=iterations,
                         warmup=warmup, device_counts=_ints(device_counts, "--devices") if device_counts else None,
                         cpu_workers=cpu_workers, outputs=outputs, text=text, workload=workload, backend=backend,
                         baselines=_baselines(baselines), callers=callers, depth=depth, slots=slots,
                         tokenizer=tokenizer)
    if text is not None and workload is not None:
        raise click.UsageError("give --text FILE or --workload, not both")
    if tokenizer is not None:
        from trtforge.bench.harness import load_tokenizer

        load_tokenizer(tokenizer)  # a wrong --tokenizer is refused before the build
    parsed = load_recipe(recipe)
    if batches is None:  # the default, cut to what the recipe's engines take
        top = parsed.shapes.batch[2]
        config = dataclasses.replace(config, batches=tuple(b for b in config.batches if b <= top) or (top,))
    if sequence is None and parsed.shapes.extent_name == "sequence" and parsed.shapes.extent is not None:
        config = dataclasses.replace(config, sequence=min(config.sequence, parsed.shapes.extent[2]))
    _refuse_outside_profile(config, parsed)
    bench_dir = results or out_dir / f"{parsed.model.name}.bench"
    refuse_inside_owned(bench_dir, "--results", may_be="the bench results")
    refuse_foreign_bench_dir(bench_dir)
    progress = Progress(quiet=quiet, verbose=verbose)
    builder = Build(parsed, out_dir, progress=progress)
    built = builder.run()
    parsed = builder.recipe  # with what the model's config filled in
    if not built.passed:
        _fail(f"{built.artifact} failed its parity gates; fix the build before benchmarking it", 1)
    report = run_bench(parsed, built.artifact, config, progress)
    written = write_report(report, bench_dir)
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
    elif not quiet:
        click.echo((written[1]).read_text())
        click.echo("wrote " + ", ".join(str(p) for p in written))
    sys.exit(0 if report["parity_passed"] or not report["results"]["parity"] else 1)


def _devices(value: str) -> str | list[int]:
    if value in ("all", "cpu"):
        return value
    try:
        indices = [int(part) for part in value.split(",")]
    except ValueError:
        indices = []
    if not indices or min(indices) < 0 or len(set(indices)) != len(indices):
        raise click.BadParameter(f"{value!r}: give all, cpu, or GPU indices such as 0,1", param_hint="--devices")
    return indices


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path))
@click.option("--out", "out", type=click.Path(path_type=Path), required=True,
              help="Output directory: Parquet shards and _run.json (made if missing; a rerun resumes).")
@click.option("--column", default="text", show_default=True, help="The column (JSON Lines field) holding the text.")
@click.option("--id-column", default=None, help="A column to carry into the output as `id` (as a string).")
@click.option("--format", "output_format", type=click.Choice(["parquet", "npy"]), default="parquet",
              show_default=True, help="npy: embeddings.npy and rows.npy instead of Parquet shards (embeddings only).")
@click.option("--devices", default="all", show_default=True, callback=lambda ctx, param, value: _devices(value),
              help="all (every GPU; CPU workers where there is none), cpu, or GPU indices such as 0,1.")
@click.option("--cpu-workers", type=click.IntRange(min=1, max=64), default=1, show_default=True,
              help="Engine workers on the CPU, where the run has no GPU.")
@click.option("--on-bad-row", type=click.Choice(["fail", "skip"]), default="fail", show_default=True,
              help="A null, empty or non-string text: stop with exit 2 naming it (fail), or leave it out and "
                   "count it (skip).")
@click.option("--shard-rows", type=click.IntRange(min=1, max=1 << 24), default=None,
              help="Input rows per output shard, the unit of resume [default: 16384 on GPUs, 1024 on CPU].")
@click.option("--pair-column", default=None,
              help="Cross-encoders (rerankers): the column of each pair's second text; --column holds the first.")
@click.option("--prompt", default=None,
              help="One of the model's prompts (sentence-transformers' config, e.g. query), put before each text "
                   "[default: the model's default prompt, if it names one].")
@click.option("--tokenizers", "tokenizer_processes", type=click.IntRange(min=1, max=64), default=None,
              help="Tokenizing processes [default: from the cores the engines leave].")
@click.option("--ray", "ray_address", default=None, metavar="ADDRESS",
              help="Run as a Ray Data pipeline on the cluster at ADDRESS (local: start one on this machine, "
                   "127.0.0.1 only); needs pip install 'trtforge[ray]'.")
@click.option("--ray-cpus", type=click.IntRange(min=1, max=4096), default=None,
              help="With --ray local: the CPUs the local Ray instance may use [default: all].")
@_common
@guarded
def run(artifact: Path, input_path: Path, out: Path, column: str, id_column: str | None, output_format: str,
        devices: str | list[int], cpu_workers: int, on_bad_row: str, shard_rows: int | None,
        tokenizer_processes: int | None, pair_column: str | None, prompt: str | None, ray_address: str | None,
        ray_cpus: int | None, quiet: bool, verbose: bool) -> None:
    """Run ARTIFACT over the texts in INPUT (.txt one a line, .jsonl, .csv, .tsv, .parquet, or a
    directory of them) and write embeddings (models with pooling) or labels (classifiers) to OUT,
    in input order, on every GPU. Progress on stderr; interrupted, the same command resumes."""
    from trtforge.job.run import Options, run_job

    command = ["trtforge", "run", *sys.argv[2:]] if _is_cli_process() else ["trtforge", "run", str(artifact),
                                                                             str(input_path), "--out", str(out)]
    options = Options(column=column, id_column=id_column, devices=devices, cpu_workers=cpu_workers,
                      format=output_format, on_bad_row=on_bad_row, shard_rows=shard_rows,
                      tokenizer_processes=tokenizer_processes, prompt=prompt, pair_column=pair_column,
                      ray=ray_address, ray_cpus=ray_cpus, quiet=quiet,
                      verbose=verbose,
                      command=command)
    run_job(artifact, input_path, out, options)


@main.group()
def export() -> None:
    """Write an artifact in a form other services load."""


@export.command("triton")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.argument("repo", type=click.Path(path_type=Path))
@click.option("--gpus", type=click.IntRange(min=1, max=MAX_GPUS), default=1, show_default=True,
              help="GPUs per instance group of the GPU models.")
@_common
@guarded
def export_triton(artifact: Path, repo: Path, gpus: int, quiet: bool, verbose: bool) -> None:
    """Write a Triton Inference Server model repository REPO from ARTIFACT: the FP16 ONNX
    (onnxruntime_onnx, TensorRT accelerator), TensorRT plans (tensorrt_plan), and a Python-backend
    model running the CPU graph. Every config is checked against Triton's schema and the graph."""
    from trtforge.triton import export_triton as write_repository

    models = write_repository(artifact, repo, gpus=gpus)
    if not quiet:
        for model in models:
            click.echo(f"  {model.name:<28} {model.config.platform or model.config.backend}")
        click.echo(f"wrote {repo} ({len(models)} models; {repo / 'README.md'} says what each is)")


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest and the verification as JSON.")
@_common
@guarded
def inspect(artifact: Path, as_json: bool, quiet: bool, verbose: bool) -> None:
    """Summarise ARTIFACT (OUT/<name>) and verify every file's sha256 against its manifest."""
    from trtforge.manifest import read_manifest, verify_files

    manifest = read_manifest(artifact)
    problems = verify_files(artifact, manifest)
    if as_json:
        click.echo(json.dumps({"manifest": manifest, "problems": problems}, indent=2, default=str))
    elif not quiet:
        click.echo(_summary(artifact, manifest, problems))
    if problems:
        _fail(f"{artifact}: {len(problems)} file(s) fail verification: {problems[0]}; "
              f"rebuild with `{manifest.get('reproduce', 'trtforge build RECIPE')} --force`", 1)


def _summary(artifact: Path, manifest: dict[str, Any], problems: list[str]) -> str:
    """What `inspect` prints. Every value comes from the manifest, so each line is made printable and
    a field of an unexpected shape reads as such instead of failing."""
    from trtforge.store import MANIFEST, sha256_file

    def line(label: str, render: Callable[[], str]) -> str:
        try:
            return printable(f"  {label:<9} {render()}")
        except (KeyError, TypeError, AttributeError, ValueError):
            return f"  {label:<9} (unreadable in this manifest)"

    parity = manifest["parity"]
    lines = [
        printable(f"{manifest['name']}  ({artifact})"),
        line("model", lambda: f"{manifest['model']['source']}  [{manifest['model']['task']}]"),
        line("built", lambda: f"{manifest['created']} with trtforge {manifest['versions'].get('trtforge')}, "
             f"torch {manifest['versions'].get('torch')}, onnxruntime {manifest['versions'].get('onnxruntime')}"),
        line("shapes", lambda: ", ".join(f"{k} {v}" for k, v in manifest["shapes"].items())),
        line("inputs", lambda: ", ".join(f"{t['name']}:{t['dtype']}" for t in manifest["io"].get("inputs", []))),
        line("outputs", lambda: ", ".join(f"{t['name']}:{t['dtype']}" for t in manifest["io"].get("outputs", []))),
        line("stages", lambda: ", ".join(f"{k} {v['status']}" for k, v in manifest["stages"].items())),
        line("parity", lambda: f"{'PASSED' if parity['passed'] else 'FAILED'}: " + ", ".join(
            f"{r['stage']} {'pass' if r['passed'] else ('FAIL' if r['checked'] else 'not checked')}"
            for r in parity["results"])),
    ]
    if manifest.get("text"):
        lines.append(line("text", lambda: f"tokenizer {manifest['text']['tokenizer']}/, truncation at "
                          f"{manifest['text']['max_length']} tokens, pooling "
                          + (f"{manifest['text']['pooling']['mode']}"
                             f"{' + L2 normalize' if manifest['text']['pooling']['normalize'] else ''}"
                             if manifest["text"]["pooling"] else "none (the model's outputs as they are)")))
    if manifest.get("fp16"):
        lines.append(line("fp16", lambda: f"kept in FP32: ops {manifest['fp16']['kept_ops']}, "
                          f"{len(manifest['fp16']['kept_nodes'])} nodes"))
    for engine in manifest["engines"]:
        lines.append(line("engine", lambda e=engine: f"{e['backend']}/{e['target']}: {e['status']}"))
    lines.append(line("files", lambda: f"{len(manifest['files'])} files, "
                      + ("all sha256 verified" if not problems else f"{len(problems)} FAILED verification")))
    lines.extend(printable(f"    ! {p}") for p in problems)
    lines.append(line("manifest", lambda: f"sha256 {sha256_file(artifact / MANIFEST)} (pin this to trust the rest)"))
    lines.append(line("reproduce", lambda: manifest["reproduce"]))
    return "\n".join(lines)
