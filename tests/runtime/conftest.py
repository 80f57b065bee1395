"""The runtime tests' shared artifact: a tiny BERT classifier with an onnxruntime-cpu engine."""

from __future__ import annotations

import pytest

from tests.conftest import tiny_recipe_text
from trtforge.pipeline import Build
from trtforge.recipe import load_recipe


@pytest.fixture(scope="session")
def artifact(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rt")
    text = tiny_recipe_text("bert", extra="[engines]\nbackends = ['onnxruntime-cpu']\n")
    (tmp / "r.toml").write_text(text.replace('"feature-extraction"', '"sequence-classification"'))
    result = Build(load_recipe(tmp / "r.toml"), tmp / "out").run()
    assert result.passed
    return result.artifact
