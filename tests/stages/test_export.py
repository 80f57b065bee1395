from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tests.conftest import tiny_recipe_text
from trtforge.models import load_model, make_inputs
from trtforge.recipe import load_recipe
from trtforge.stages.export import export_onnx


@pytest.mark.parametrize("arch", ["bert", "gpt2", "vit", "distilbert"])
def test_export_has_dynamic_axes_and_matches_pytorch_at_two_shapes(tmp_path, write_recipe, arch):
    recipe = load_recipe(write_recipe(tiny_recipe_text(arch)))
    loaded = load_model(recipe.model)
    path = export_onnx(loaded, recipe.shapes, recipe.export, tmp_path / "model.onnx", source="random")

    graph = onnx.load(str(path)).graph
    first = graph.input[0].type.tensor_type.shape.dim
    assert first[0].dim_param == "batch"
    if arch != "vit":
        assert first[1].dim_param == "sequence"
    assert [o.name for o in graph.output] == [t.name for t in loaded.outputs]

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    extents = [(32, 32), (32, 32)] if arch == "vit" else [(16, 16), (5, 32)]
    for batch, (extent, _) in zip((1, 3), extents):
        feed = make_inputs(loaded, batch, extent if arch == "vit" else (7 if batch == 1 else 29), seed=batch)
        got = session.run(None, feed)
        want = loaded.run_torch(feed)
        for out, value in zip(loaded.outputs, got):
            assert value.shape == want[out.name].shape
            np.testing.assert_allclose(value, want[out.name], atol=1e-4, rtol=1e-3)


def test_dynamo_exporter_also_works(tmp_path, write_recipe):
    recipe = load_recipe(write_recipe(tiny_recipe_text("bert", extra="[export]\nexporter = 'dynamo'\nopset = 18\n")))
    loaded = load_model(recipe.model)
    path = export_onnx(loaded, recipe.shapes, recipe.export, tmp_path / "model.onnx", source="random")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = make_inputs(loaded, 3, 11, seed=0)
    np.testing.assert_allclose(session.run(None, feed)[0], loaded.run_torch(feed)["last_hidden_state"],
                               atol=1e-4, rtol=1e-3)
