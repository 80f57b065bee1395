from __future__ import annotations

import pytest

from tests.conftest import tiny_recipe_text
from trtforge.errors import RecipeError
from trtforge.recipe import load_recipe
from trtforge.stages.validate import validation_shapes

GOOD = tiny_recipe_text("bert")


def test_good_recipe_parses_with_defaults(write_recipe):
    recipe = load_recipe(write_recipe(GOOD + "[validate]\natol = 1e-3\n[validate.outputs.last_hidden_state]\nrtol = 0.5\n"))
    assert recipe.model.name == "tiny-bert"
    assert recipe.shapes.batch == (1, 2, 4) and recipe.shapes.extent == (1, 16, 32)
    assert validation_shapes(recipe.shapes) == {"opt": (2, 16), "min": (1, 1), "max-batch": (4, 8),
                                                "max-sequence": (2, 32)}
    assert recipe.validate.tolerance.for_output("last_hidden_state") == (1e-3, 0.5)
    assert recipe.validate.tolerance.for_output("other") == (1e-3, 1e-3)
    assert recipe.fp16.enabled and "LayerNormalization" in recipe.fp16.keep_fp32_ops


def test_recipe_hash_changes_with_content(write_recipe):
    a = load_recipe(write_recipe(GOOD, "a.toml"))
    b = load_recipe(write_recipe(GOOD.replace("[1, 2, 4]", "[1, 2, 8]"), "b.toml"))
    assert a.hash != b.hash


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        ("[model\nname=", None, "malformed TOML"),
        (GOOD + "colour = 'red'\n", "shapes.colour", "unknown key"),
        (GOOD.replace('name = "tiny-bert"', 'name = "../escape"'), "model.name", "path separators"),
        (GOOD.replace('name = "tiny-bert"', 'name = "a/b"'), "model.name", "path separators"),
        (GOOD.replace('name = "tiny-bert"', "name = 7"), "model.name", "expected a string"),
        (GOOD.replace("batch = [1, 2, 4]", "batch = [8, 4, 2]"), "shapes.batch", "min <= opt <= max"),
        (GOOD.replace("batch = [1, 2, 4]", "batch = [1, 2]"), "shapes.batch", "three integers"),
        (GOOD.replace("batch = [1, 2, 4]", "batch = [0, 2, 4]"), "shapes.batch", "1 <= min"),
        (GOOD.replace('task = "feature-extraction"', 'task = "translation"'), "model.task", "unknown task"),
        (GOOD.replace('architecture = "bert"', 'architecture = "bertt"'), "model.architecture", "unknown architecture"),
        (GOOD.replace('architecture = "bert"\n', ""), "model.architecture", "needs an architecture"),
        (GOOD.replace('source = "random"', 'source = "./no/such/dir"'), "model.source", "does not exist"),
        (GOOD.replace('source = "random"', 'source = "package:no_such_pkg_xyz"'), "model.source", "not installed"),
        (GOOD.replace("sequence = [1, 16, 32]", "image = [1, 16, 32]"), "shapes.image", "no image axis"),
        (GOOD + "[validate]\natol = -1.0\n", "validate.atol", "must be >= 0"),
        (GOOD + "[validate]\natol = true\n", "validate.atol", "boolean"),
        (GOOD + "[engines]\nbackends = ['tensorrt', 'cuda-magic']\n", "engines.backends", "unknown backend"),
        (GOOD + "[engines]\nrtx_targets = ['sm90']\n", "engines.rtx_targets", "no sm90"),
        (GOOD + "[engines]\ngpus = 'some'\n", "engines.gpus", "all"),
        (GOOD + "[export]\nopset = 11\n", "export.opset", "17"),
        (GOOD + "[[engines.profiles]]\nbatch = [4, 2, 1]\nsequence = [1, 2, 3]\n", "engines.profiles[0].batch",
         "min <= opt <= max"),
        (GOOD.replace("[shapes]", "[shape]"), "shapes", "missing section"),
    ],
)
def test_bad_recipes_name_file_key_and_fix(write_recipe, text, key, words):
    path = write_recipe(text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    message = str(info.value)
    assert str(path) in message
    assert words in message
    if key:
        assert f"[{key}]" in message
    assert "\n" not in message and ";" in message  # one line: the problem; the fix


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(tmp_path / "nope.toml")


def test_local_source_is_resolved_relative_to_the_recipe(tmp_path, write_recipe):
    (tmp_path / "weights").mkdir()
    recipe = load_recipe(write_recipe(GOOD.replace('source = "random"', 'source = "weights"')))
    assert recipe.model.local_dir == (tmp_path / "weights").resolve()
