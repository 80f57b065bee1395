"""What trtforge refuses, and what it never touches: bad recipes, output paths it does not own,
tampered artifacts and caches, killed builds and workers. Each case is run the way a user would
(the CLI, a real build) and asserts the exit code, the one-line message, and what is on disk after."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import trtforge
from tests.conftest import tiny_recipe_text
from trtforge.cli import main
from trtforge.errors import ArtifactError, CompatibilityError
from trtforge.manifest import read_manifest, verify_files

ROOT = Path(__file__).resolve().parents[1]
BERT = tiny_recipe_text("bert")
CPU = "[engines]\nbackends = ['onnxruntime-cpu']\n"


def cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def tree(path: Path) -> dict[str, bytes]:
    """Every file under `path` with its content: to assert that nothing changed."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def assert_one_line_refusal(code: int, stderr: str, *words: str) -> None:
    lines = stderr.strip().splitlines()
    assert code == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


# --- bad recipes: every key's type, range and cross-key rule ----------------------------------------------

def sub(old: str, new: str) -> str:
    assert old in BERT
    return BERT.replace(old, new)


CONFIG = "{ num_hidden_layers = 2, hidden_size = 32, num_attention_heads = 2, intermediate_size = 64, " \
         "vocab_size = 1000, max_position_embeddings = 64 }"

BAD_RECIPES = [
    # [model]
    (sub('name = "tiny-bert"', 'name = "tiny-bert\\n"'), "model.name", "not a plain artifact name"),
    (sub('name = "tiny-bert"', f'name = "{"a" * 300}"'), "model.name", "the limit is 100"),
    (sub('name = "tiny-bert"', 'name = ".trtforge"'), "model.name", "start with a letter or digit"),
    (sub('name = "tiny-bert"', 'name = ".tmp-x"'), "model.name", "start with a letter or digit"),
    (sub('name = "tiny-bert"', 'name = "x.bench"'), "model.name", "reserves"),
    (sub('name = "tiny-bert"', 'name = "x.failed"'), "model.name", "reserves"),
    (sub('source = "random"', "source = 1"), "model.source", "expected a string"),
    (sub('architecture = "bert"', "architecture = ['bert']"), "model.architecture", "expected a string"),
    (sub('task = "feature-extraction"', "task = 3"), "model.task", "expected a string"),
    (sub(CONFIG, '"big"'), "model.config", "expected a table"),
    (sub("num_hidden_layers = 2,", "num_layerz = 2,"), "model.config.num_layerz", "did you mean"),
    (sub("hidden_size = 32,", 'hidden_size = "big",'), "model.config.hidden_size", "expected an integer"),
    (sub("vocab_size = 1000", "vocab_size = 0"), "model.config.vocab_size", "below the minimum of 1"),
    (sub("num_hidden_layers = 2", "num_hidden_layers = 0"), "model.config.num_hidden_layers", "below the minimum"),
    (sub("hidden_size = 32,", "hidden_size = 33,"), "model.config", "rejects this config"),
    (sub('source = "random"', 'source = "random"\nrevision = 5'), "model.revision", "expected a string"),
    (sub('source = "random"', 'source = "random"\ntrust_remote_code = "yes"'), "model.trust_remote_code", "boolean"),
    (sub('source = "random"', 'source = "random"\nseed = -1'), "model.seed", "outside [0, 4294967295]"),
    # [shapes]
    (sub("batch = [1, 2, 4]", "batch = [1, 2, 1000000000]"), "shapes.batch", "above the limit of 65536"),
    (sub("batch = [1, 2, 4]", "batch = [1, 2.5, 4]"), "shapes.batch", "three integers"),
    (sub("batch = [1, 2, 4]", "batch = [1, 2, 4, 8]"), "shapes.batch", "three integers"),
    (sub("batch = [1, 2, 4]", "batch = [0, 2, 4]"), "shapes.batch", "1 <= min"),
    (sub("sequence = [1, 16, 32]", "sequence = [1, 16, 65]"), "shapes.sequence", "above the model's 64 positions"),
    (sub("sequence = [1, 16, 32]", "sequence = [16, 1, 32]"), "shapes.sequence", "min <= opt <= max"),
    (sub("sequence = [1, 16, 32]", 'sequence = "long"'), "shapes.sequence", "expected a list"),
    # [export]
    (BERT + "[export]\nexporter = 'magic'\n", "export.exporter", "unknown exporter"),
    (BERT + "[export]\nopset = 99\n", "export.opset", "outside [17, 21]"),
    # [validate] and the gates of [fp16] and [engines.check]
    (BERT + "[validate]\natol = nan\n", "validate.atol", "finite"),
    (BERT + "[validate]\nrtol = nan\n", "validate.rtol", "finite"),
    (BERT + "[validate]\natol = inf\n", "validate.atol", "finite"),
    (BERT + "[validate]\nrtol = -0.1\n", "validate.rtol", "must be >= 0"),
    (BERT + "[validate]\nmin_cosine = 1.5\n", "validate.min_cosine", "within [0, 1]"),
    (BERT + "[validate]\nmin_cosine = nan\n", "validate.min_cosine", "finite"),
    (BERT + "[validate]\nmin_argmax_agreement = -1.0\n", "validate.min_argmax_agreement", "within [0, 1]"),
    (BERT + "[validate]\nseed = 'x'\n", "validate.seed", "expected an integer"),
    (BERT + "[validate.outputs.logitz]\natol = 0.1\n", "validate.outputs.logitz", "no such output"),
    (BERT + "[validate.outputs.last_hidden_state]\natol = nan\n", "validate.outputs.last_hidden_state.atol", "finite"),
    (BERT + "[fp16]\nenabled = 1\n", "fp16.enabled", "expected a boolean"),
    (BERT + "[fp16]\natol = nan\n", "fp16.atol", "finite"),
    (BERT + "[fp16]\nkeep_fp32_ops = [1]\n", "fp16.keep_fp32_ops", "op types"),
    (BERT + "[fp16]\nmax_fallback_rounds = -5\n", "fp16.max_fallback_rounds", "outside [0, 64]"),
    (BERT + "[fp16]\nmystery = 1\n", "fp16.mystery", "unknown key"),
    # [engines]
    (BERT + "[engines]\nbackends = 'auto'\n", "engines.backends", "expected a list"),
    (BERT + "[engines]\nbackends = ['onnxruntime-cpu', 'onnxruntime-cpu']\n", "engines.backends", "twice"),
    (BERT + "[engines]\nrtx_targets = [90]\n", "engines.rtx_targets", "list of strings"),
    (BERT + "[engines]\nrtx_targets = ['sm89', 'SM89']\n", "engines.rtx_targets", "twice"),
    (BERT + "[engines]\ngpus = [-1]\n", "engines.gpus", "GPU indices"),
    (BERT + "[engines]\nhardware_compatibility = 'all'\n", "engines.hardware_compatibility", "unknown level"),
    (BERT + "[engines]\nbuilder_optimization_level = 9\n", "engines.builder_optimization_level", "outside [0, 5]"),
    (BERT + "[engines]\ncuda_graph = 'yes'\n", "engines.cuda_graph", "boolean"),
    (BERT + "[engines.check]\natol = nan\n", "engines.check.atol", "finite"),
    (BERT + "[[engines.profiles]]\nbatch = [1, 1, 1]\n", "engines.profiles[0].sequence", "missing required key"),
    (BERT + "[[engines.profiles]]\nbatch = [1, 1, 1]\nsequence = [1, 1, 1]\nimage = [1, 1, 1]\n",
     "engines.profiles[0].image", "unknown key"),
]


@pytest.mark.parametrize(("text", "key", "words"), BAD_RECIPES, ids=[f"{k}:{w}" for _, k, w in BAD_RECIPES])
def test_bad_recipe_is_refused_before_anything_is_written(tmp_path, text, key, words):
    recipe = tmp_path / "bad.toml"
    recipe.write_text(text)
    out = tmp_path / "out"
    code, _, stderr = cli("build", str(recipe), "--out", str(out))
    assert_one_line_refusal(code, stderr, f"[{key}]", words)
    assert not out.exists()


def test_image_size_comes_from_the_config_and_a_contradiction_names_both_values(tmp_path):
    vit = tiny_recipe_text("vit").replace("image = [32, 32, 32]\n", "")
    recipe = tmp_path / "vit.toml"
    recipe.write_text(vit)
    code, _, stderr = cli("build", str(recipe), "--out", str(tmp_path / "out"))
    assert code == 0, stderr
    manifest = read_manifest(tmp_path / "out" / "tiny-vit")
    assert manifest["shapes"]["image"] == [32, 32, 32]  # the config's image_size, not a 224 default
    assert manifest["io"]["inputs"][0]["shape"][2:] == ["image", "image"]

    recipe.write_text(vit.replace("[shapes]", "[shapes]\nimage = [224, 224, 224]"))
    code, _, stderr = cli("build", str(recipe), "--out", str(tmp_path / "out2"))
    assert_one_line_refusal(code, stderr, "[shapes.image]", "[224, 224, 224]", "image_size 32")
    assert not (tmp_path / "out2").exists()


def test_the_sequence_range_defaults_to_the_models_positions(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(sub("sequence = [1, 16, 32]\n", ""))
    code, _, stderr = cli("build", str(recipe), "--out", str(tmp_path / "out"))
    assert code == 0, stderr
    assert read_manifest(tmp_path / "out" / "tiny-bert")["shapes"]["sequence"] == [1, 64, 64]  # 64 positions


def test_a_refusal_from_the_lock_holder_leaves_no_lock_behind(tmp_path):
    """An existing output directory with other artifacts: a refused recipe adds nothing to it."""
    out = tmp_path / "out"
    (out / ".trtforge" / "other").mkdir(parents=True)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    recipe = tmp_path / "bad.toml"
    recipe.write_text(sub("vocab_size = 1000", "vocab_size = 0"))
    code, _, _ = cli("build", str(recipe), "--out", str(out))
    assert code == 2 and sorted(p.relative_to(out) for p in out.rglob("*")) == before


# --- the output directory: only what trtforge owns -----------------------------------------------------

def test_a_user_folder_named_like_the_artifact_is_never_replaced(tmp_path):
    user = tmp_path / "recipes"
    user.mkdir()
    recipe = user / "r.toml"
    recipe.write_text(sub('name = "tiny-bert"', 'name = "recipes"'))
    (user / "notes.txt").write_text("mine")
    before = tree(user)
    os.chdir(tmp_path)
    code, _, stderr = cli("build", "recipes/r.toml", "--out", ".")
    assert_one_line_refusal(code, stderr, "recipes exists and is not a trtforge artifact named 'recipes'")
    assert tree(user) == before
    assert not (tmp_path / ".trtforge").exists()


def test_a_local_model_named_like_the_artifact_is_never_replaced(tmp_path):
    import transformers

    config = transformers.BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=1000, max_position_embeddings=64)
    transformers.BertModel(config).save_pretrained(tmp_path / "mymodel")
    before = tree(tmp_path / "mymodel")
    recipe = tmp_path / "r.toml"
    recipe.write_text(BERT.replace('name = "tiny-bert"', 'name = "mymodel"').replace('source = "random"',
                      'source = "./mymodel"').replace('architecture = "bert"\n', "").replace(f"config = {CONFIG}\n", ""))
    os.chdir(tmp_path)
    code, _, stderr = cli("build", "r.toml", "--out", ".")
    assert_one_line_refusal(code, stderr, "mymodel exists and is not a trtforge artifact")
    assert tree(tmp_path / "mymodel") == before


@pytest.mark.parametrize("obstacle", ["file", "symlink", "foreign-artifact"])
def test_anything_else_at_the_artifact_path_is_refused(tmp_path, obstacle):
    out = tmp_path / "out"
    out.mkdir()
    target = out / "tiny-bert"
    if obstacle == "file":
        target.write_text("x")
    elif obstacle == "symlink":
        (tmp_path / "elsewhere").mkdir()
        target.symlink_to(tmp_path / "elsewhere")
    else:  # a trtforge artifact, but of another name
        target.mkdir()
        (target / "manifest.json").write_text(json.dumps({"schema": "trtforge.manifest/2", "name": "other"}))
    recipe = tmp_path / "r.toml"
    recipe.write_text(BERT)
    code, _, stderr = cli("build", str(recipe), "--out", str(out))
    assert_one_line_refusal(code, stderr, "not a trtforge artifact named 'tiny-bert'")
    assert not (out / ".trtforge").exists()


def test_bench_refuses_a_foreign_results_directory_and_bad_options_before_building(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(BERT + CPU)
    out = tmp_path / "out"
    (out / "tiny-bert.bench").mkdir(parents=True)
    (out / "tiny-bert.bench" / "thesis.tex").write_text("mine")
    code, _, stderr = cli("bench", str(recipe), "--out", str(out), "--cpu", "1")
    assert_one_line_refusal(code, stderr, "thesis.tex", "--results")
    assert not (out / "tiny-bert").exists()
    code, _, stderr = CliRunner().invoke(main, ["bench", str(recipe), "--out", str(tmp_path / "o2"),
                                                "--batches", "1,x"]).exit_code, "", ""
    assert code == 2 and not (tmp_path / "o2").exists()


@pytest.mark.parametrize("case", ["under-a-file", "symlink-loop", "read-only"])
def test_unusable_output_directories_get_one_line(tmp_path, case):
    recipe = tmp_path / "r.toml"
    recipe.write_text(BERT)
    if case == "under-a-file":
        (tmp_path / "file").write_text("x")
        out, words = tmp_path / "file" / "out", "regular file"
    elif case == "symlink-loop":
        (tmp_path / "loop").symlink_to(tmp_path / "loop")
        out, words = tmp_path / "loop" / "out", "symbolic link"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only directories")
        (tmp_path / "ro").mkdir(mode=0o555)
        out, words = tmp_path / "ro" / "out", "writable"
    code, _, stderr = cli("build", str(recipe), "--out", str(out))
    assert_one_line_refusal(code, stderr, words)


def test_a_full_disk_is_an_environment_error_not_an_export_problem(tmp_path):
    """The file-size limit makes writes fail as on a full disk (EFBIG instead of ENOSPC)."""
    import resource

    recipe = tmp_path / "r.toml"
    recipe.write_text(BERT)

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    process = subprocess.run([sys.executable, "-m", "trtforge", "build", str(recipe), "--out", str(tmp_path / "out")],
                             preexec_fn=limit, capture_output=True, text=True, timeout=120,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    last = process.stderr.strip().splitlines()[-1]
    assert process.returncode == 2 and last.startswith("error: File too large (") and "dynamo" not in last
    assert not (tmp_path / "out").exists()  # the lock and cache directories it made are gone again


# --- integrity: copies, verified reuse, no re-blessing --------------------------------------------------

ENGINE = "engines/onnxruntime-cpu/cpu/model.onnx"


def test_artifact_files_are_copies_not_links_into_the_cache(built):
    _, out = built
    cache_inodes = {p.stat().st_ino for p in (out / ".trtforge").rglob("*") if p.is_file()}
    for path in (out / "tiny-bert").rglob("*"):
        if path.is_file():
            assert path.stat().st_nlink == 1 and path.stat().st_ino not in cache_inodes


@pytest.mark.parametrize("same_size", [True, False])
def test_a_replaced_engine_is_rebuilt_never_re_blessed(copy, same_size):
    recipe, out = copy
    engine = out / "tiny-bert" / ENGINE
    original = engine.read_bytes()
    cache_before = tree(out / ".trtforge")
    forged = (b"\x00" * len(original)) if same_size else original[: len(original) // 2]
    engine.write_bytes(forged)
    assert cli("inspect", str(out / "tiny-bert"))[0] == 1

    code, _, stderr = cli("build", str(recipe), "--out", str(out))
    assert code == 0 and "fails verification" in stderr and "up to date" not in stderr
    assert engine.read_bytes() == original
    cache_after = tree(out / ".trtforge")
    # The cache was never written through the artifact: its entries are as they were (the record
    # of the manifest published, which pins the rebuilt one, is not an entry).
    assert {k: v for k, v in cache_after.items() if not k.endswith("published.json")} == \
        {k: v for k, v in cache_before.items() if not k.endswith("published.json")}
    code, stdout, _ = cli("inspect", str(out / "tiny-bert"))
    assert code == 0 and "all sha256 verified" in stdout


def test_a_corrupted_cache_entry_is_dropped_and_rebuilt(copy):
    recipe, out = copy
    [cached] = (out / ".trtforge" / "tiny-bert").glob("fp16-*/model.fp16.onnx")
    data = bytearray(cached.read_bytes())
    data[200] ^= 0xFF
    cached.write_bytes(bytes(data))
    shutil.rmtree(out / "tiny-bert")  # the artifact is gone; the cache must not be trusted blindly
    code, _, stderr = cli("build", str(recipe), "--out", str(out))
    assert code == 0, stderr
    assert re.search(r"cache entry fp16-\w+ fails verification \(model.fp16.onnx: sha256 mismatch\); rebuilding",
                     stderr)
    manifest = read_manifest(out / "tiny-bert")
    assert verify_files(out / "tiny-bert", manifest) == [] and not manifest["stages"]["fp16"]["cached"]


def test_leftovers_of_killed_builds_are_not_artifacts_and_are_cleaned(copy):
    recipe, out = copy
    staging = out / ".tmp-tiny-bert.0123abcd"
    shutil.copytree(out / "tiny-bert", staging)
    (out / ".tmp-tiny-bert.old.89abcdef").mkdir()
    other = out / ".tmp-tiny-bert-2.0123abcd"  # another artifact's: not ours to remove
    other.mkdir()
    code, _, stderr = cli("inspect", str(staging))
    assert_one_line_refusal(code, stderr, "temporary directory")
    assert cli("build", str(recipe), "--out", str(out))[0] == 0
    assert not staging.exists() and not (out / ".tmp-tiny-bert.old.89abcdef").exists() and other.exists()


def test_a_build_killed_between_swap_and_cleanup_leaves_the_new_artifact(copy, monkeypatch):
    """The swap is one exchange: the artifact's name never points at nothing."""
    from trtforge import store
    from trtforge.pipeline import Build
    from trtforge.recipe import load_recipe

    recipe, out = copy
    recipe.write_text(recipe.read_text() + "[validate]\natol = 2e-4\n")  # a real change: a new artifact
    real_rmtree = shutil.rmtree

    def killed(path, *args, **kwargs):
        if Path(path).name.startswith(".tmp-tiny-bert.") and (Path(path) / "manifest.json").exists():
            raise KeyboardInterrupt  # the build dies right after the exchange
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(store.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        Build(load_recipe(recipe), out).run()
    monkeypatch.undo()
    manifest = read_manifest(out / "tiny-bert")
    assert manifest["parity"]["results"][0]["outputs"][0]["atol"] == 2e-4  # the new one is in place
    assert verify_files(out / "tiny-bert", manifest) == []
    assert Build(load_recipe(recipe), out).run().up_to_date
    assert not list(out.glob(".tmp-tiny-bert.*"))


def _worker_pids(out: Path) -> list[int]:
    """Engine worker processes whose job lies under `out`."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().split(b"\x00")
            except OSError:
                continue
            if b"trtforge.backends.worker" in cmdline and any(str(out).encode() in a for a in cmdline):
                pids.append(int(proc.name))
    return pids


def _start_build(recipe: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "trtforge", "build", str(recipe), "--out", str(out), *extra],
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_worker(out: Path, build: subprocess.Popen) -> int:
    deadline = time.time() + 120
    while time.time() < deadline:
        pids = _worker_pids(out)
        if pids:
            return pids[0]
        assert build.poll() is None, build.communicate()
        time.sleep(0.02)
    raise AssertionError("no engine worker started")


def _gone(pid: int, within: float = 10.0) -> bool:
    deadline = time.time() + within
    while time.time() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split()[2]
        except OSError:
            return True
        if state == "Z":  # exited, not yet reaped by its (dead) parent's reaper
            return True
        time.sleep(0.05)
    return False


def test_a_killed_engine_worker_never_replaces_a_passing_artifact(copy):
    recipe, out = copy
    before = tree(out / "tiny-bert")
    build = _start_build(recipe, out, "--force")
    os.kill(_wait_for_worker(out, build), signal.SIGKILL)
    _, stderr = build.communicate(timeout=120)
    assert build.returncode == 1
    assert f"FAILED  {out / 'tiny-bert.failed'}" in stderr and "passing artifact" in stderr
    assert tree(out / "tiny-bert") == before  # the passing artifact, byte for byte
    failed = read_manifest(out / "tiny-bert.failed")
    [entry] = failed["engines"]
    assert entry["status"] == "failed" and "killed by SIGKILL" in entry["error"]
    assert ENGINE not in failed["files"]  # no earlier build's engine under a failed entry
    assert f"{entry['dir']}/worker.log" in failed["files"]
    assert verify_files(out / "tiny-bert.failed", failed) == []

    # The next good build supersedes the failed one.
    assert cli("build", str(recipe), "--out", str(out), "--force")[0] == 0
    assert not (out / "tiny-bert.failed").exists()


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT])
def test_engine_workers_die_with_their_build(copy, how):
    recipe, out = copy
    build = _start_build(recipe, out, "--force")
    worker = _wait_for_worker(out, build)
    build.send_signal(how)
    _, stderr = build.communicate(timeout=60)
    assert build.returncode == (-signal.SIGKILL if how == signal.SIGKILL else 130), stderr[-2000:]
    assert _gone(worker), "the engine worker outlived its build"


def test_ctrl_c_that_a_stage_swallowed_and_carried_on_from_still_stops_the_build(tmp_path, tiny_recipe, monkeypatch):
    """A library that catches KeyboardInterrupt and goes on (Polygraphy's lazy imports do) must not turn
    Ctrl-C into a build that finishes: the stage stops, nothing of it is cached, nothing is published."""
    from trtforge.stages import steps

    recipe, out = tiny_recipe("bert"), tmp_path / "out"
    validate = steps.validate

    def swallowing(*args, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the handler raises here
        except:  # noqa: E722 -- the library's bare except, reproduced
            pass
        return validate(*args, **kwargs)

    monkeypatch.setattr(steps, "validate", swallowing)
    code, _, stderr = cli("build", str(recipe), "--out", str(out))
    assert code == 130 and stderr.strip().splitlines()[-1].startswith("error: interrupted;"), stderr
    assert not (out / "tiny-bert").exists()

    monkeypatch.setattr(steps, "validate", validate)
    assert cli("build", str(recipe), "--out", str(out))[0] == 0
    stages = read_manifest(out / "tiny-bert")["stages"]
    assert stages["export"]["cached"] and not stages["validate"]["cached"]  # the interrupted stage ran again


def test_a_waiting_build_says_for_whom_and_gives_up(copy):
    recipe, out = copy
    lock_path = out / ".trtforge" / "tiny-bert" / "lock"
    with lock_path.open("a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        lock.write("pid 4242, since yesterday\n")
        lock.flush()
        build = _start_build(recipe, out, "--wait", "1")
        _, stderr = build.communicate(timeout=60)
    assert build.returncode == 2
    assert "waiting for the build of tiny-bert that holds" in stderr and "pid 4242" in stderr
    assert stderr.strip().splitlines()[-1].startswith("error: gave up after 1 s waiting")


def test_a_failed_artifact_says_failed_again_when_up_to_date(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(BERT + "[validate]\natol = 0.0\nrtol = 0.0\n")
    assert cli("build", str(recipe), "--out", str(tmp_path / "out"))[0] == 1
    code, _, stderr = cli("build", str(recipe), "--out", str(tmp_path / "out"))
    assert code == 1 and "up to date" in stderr and "FAILED" in stderr


def test_publish_failed_replaces_the_passing_artifact_when_asked(copy):
    recipe, out = copy
    recipe.write_text(recipe.read_text() + "[validate]\natol = 0.0\nrtol = 0.0\n")
    assert cli("build", str(recipe), "--out", str(out))[0] == 1
    assert read_manifest(out / "tiny-bert")["parity"]["passed"] and (out / "tiny-bert.failed").is_dir()
    assert cli("build", str(recipe), "--out", str(out), "--publish-failed")[0] == 1
    assert not read_manifest(out / "tiny-bert")["parity"]["passed"]


# --- manifests: validated before use ---------------------------------------------------------------------

def _tamper(artifact: Path, change) -> None:
    path = artifact / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


MANIFEST_TAMPERING = {
    "traversal": (lambda m: m["files"].update({"../../etc/passwd": {"size": 1, "sha256": "0" * 64}}),
                  "not a relative path inside the artifact"),
    "absolute": (lambda m: m["files"].update({"/etc/passwd": {"size": 1, "sha256": "0" * 64}}),
                 "not a relative path inside the artifact"),
    "dot-segments": (lambda m: m["files"].update({"engines/./x": {"size": 1, "sha256": "0" * 64}}),
                     "not a relative path"),
    "bad-sha": (lambda m: m["files"]["model.onnx"].update(sha256="abc"), "needs a size and a sha256"),
    "negative-size": (lambda m: m["files"]["model.onnx"].update(size=-1), "needs a size and a sha256"),
    "engine-dir-elsewhere": (lambda m: m["engines"][0].update(dir="../other"), "dir '../other'"),
    "engine-file-elsewhere": (lambda m: m["engines"][0].update(file="model.onnx"), "is not the onnxruntime-cpu"),
    "engine-file-unlisted": (lambda m: m["files"].pop(ENGINE), "is not listed in files"),
    "unknown-backend": (lambda m: m["engines"][0].update(backend="magic"), "no known backend"),
    "target-path": (lambda m: m["engines"][0].update(target="../x"), "not a plain name"),
    "role-unlisted": (lambda m: m["roles"].update({"onnx-fp32": "nope.onnx"}), "which files does not list"),
    "no-files": (lambda m: m.pop("files"), "'files' is missing"),
    "files-a-list": (lambda m: m.update(files=[]), "'files' is missing or not dict"),
    "parity-not-bool": (lambda m: m["parity"].update(passed="yes"), "parity.passed"),
    "schema": (lambda m: m.update(schema="trtforge.manifest/1"), "this trtforge reads"),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_TAMPERING))
def test_a_tampered_manifest_is_refused_by_inspect_and_load(copy, case):
    _, out = copy
    artifact = out / "tiny-bert"
    change, words = MANIFEST_TAMPERING[case]
    _tamper(artifact, change)
    code, _, stderr = cli("inspect", str(artifact))
    assert_one_line_refusal(code, stderr, words)
    with pytest.raises(ArtifactError, match=re.escape(words)):
        trtforge.load(artifact, "cpu")


@pytest.mark.parametrize(("content", "words"), [(b"[]", "JSON list, not an object"), (b"\xff\xfe{}", "not UTF-8"),
                                                  (b"{", "not valid JSON")])
def test_an_unreadable_manifest_is_one_line_and_exit_2(copy, content, words):
    _, out = copy
    (out / "tiny-bert" / "manifest.json").write_bytes(content)
    assert_one_line_refusal(*cli("inspect", str(out / "tiny-bert"))[::2], words)


def test_files_that_are_links_or_unlisted_fail_verification(copy, tmp_path):
    _, out = copy
    artifact = out / "tiny-bert"
    outside = tmp_path / "outside.onnx"
    shutil.copy(artifact / "model.onnx", outside)
    (artifact / "model.onnx").unlink()
    (artifact / "model.onnx").symlink_to(outside)  # same bytes, but not inside the artifact
    (artifact / "extra.bin").write_bytes(b"smuggled")
    code, stdout, stderr = cli("inspect", str(artifact))
    assert code == 1
    assert "model.onnx: not a regular file inside" in stdout and "extra.bin: not listed in the manifest" in stdout


def test_load_verifies_every_file_of_the_engine_directory(copy):
    _, out = copy
    log = out / "tiny-bert" / "engines/onnxruntime-cpu/cpu/build.log"
    log.write_text(log.read_text() + "edited")
    with pytest.raises(ArtifactError, match="build.log: size"):
        trtforge.load(out / "tiny-bert", "cpu")


def test_a_hostile_reproduce_field_is_printed_escaped(copy):
    _, out = copy
    _tamper(out / "tiny-bert", lambda m: m.update(reproduce="trtforge build x\x1b[2J\x1b[H\rPASSED"))
    code, stdout, _ = cli("inspect", str(out / "tiny-bert"))
    assert code == 0 and "\x1b" not in stdout and "\r" not in stdout and "\\x1b[2J" in stdout


def test_the_manifest_is_portable_and_says_which_file_is_which(built):
    _, out = built
    manifest = read_manifest(out / "tiny-bert")
    text = (out / "tiny-bert" / "manifest.json").read_text()
    assert str(out.parent) not in text and "/tmp" not in text  # no path of the build machine
    assert manifest["model"]["source"] == "random" and manifest["recipe"]["file"] == "r.toml"
    assert manifest["roles"]["onnx-fp32"] == "model.onnx" and manifest["roles"]["onnx-fp16"] == "model.fp16.onnx"
    assert manifest["roles"]["engine:onnxruntime-cpu/cpu"] == ENGINE and manifest["onnx"]["opset"] == 17
    import onnx

    assert onnx.load(str(out / "tiny-bert" / "model.onnx"), load_external_data=False).doc_string == \
        "exported by trtforge from random"


# --- CPU engines, auto, and the loader's advice ------------------------------------------------------------

def test_auto_can_be_combined_with_the_cpu_engine(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(BERT + "[engines]\nbackends = ['auto', 'onnxruntime-cpu']\n")
    code, _, stderr = cli("build", str(recipe), "--out", str(tmp_path / "out"))
    assert code == 0, stderr
    assert "onnxruntime-cpu" in {e["backend"] for e in read_manifest(tmp_path / "out" / "tiny-bert")["engines"]}


def test_loading_on_the_cpu_without_a_cpu_engine_says_how_to_get_one(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(BERT)
    assert cli("build", str(recipe), "--out", str(tmp_path / "out"))[0] == 0
    with pytest.raises(CompatibilityError, match='add "onnxruntime-cpu" to the recipe\'s \\[engines\\] backends'):
        trtforge.load(tmp_path / "out" / "tiny-bert", "cpu")
    code, _, stderr = cli("bench", str(recipe), "--out", str(tmp_path / "out"), "--cpu", "1")
    assert code == 2 and 'add "onnxruntime-cpu"' in stderr.strip().splitlines()[-1]  # after the (no-op) build
