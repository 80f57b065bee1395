from __future__ import annotations

import numpy as np
import onnx
import pytest
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from tests.conftest import tiny_recipe_text
from trtforge.models import load_model, make_inputs
from trtforge.recipe import FP16Spec, Tolerance, load_recipe
from trtforge.stages.export import export_onnx
from trtforge.stages.fp16 import convert, make_fp16
from trtforge.stages.validate import Reference


def _ops_and_types(path):
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    types = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.value_info) + list(model.graph.output)}
    return model, types


def test_fp16_graph_keeps_io_types_and_layernorm_in_fp32(tmp_path, write_recipe):
    recipe = load_recipe(write_recipe(tiny_recipe_text("bert")))
    loaded = load_model(recipe.model)
    fp32 = export_onnx(loaded, recipe.shapes, recipe.export, tmp_path / "model.onnx", source="random")
    fp16 = convert(fp32, tmp_path / "model.fp16.onnx", keep_ops=("LayerNormalization",), keep_nodes=[])
    model, types = _ops_and_types(fp16)
    assert all(i.type.tensor_type.elem_type == TensorProto.INT64 for i in model.graph.input)
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    layernorms = [n for n in model.graph.node if n.op_type == "LayerNormalization"]
    assert layernorms and all(types[n.output[0]] == TensorProto.FLOAT for n in layernorms)
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    assert matmuls and all(types[n.output[0]] == TensorProto.FLOAT16 for n in matmuls)
    # No constant became +-inf (the attention mask's float32 minimum is clamped to -65504).
    for init in model.graph.initializer:
        assert np.isfinite(numpy_helper.to_array(init)).all(), init.name


def test_fully_masked_rows_stay_finite_in_fp16(tmp_path, write_recipe):
    """HF masks add finfo(float32).min; as FP16 -inf a fully masked row becomes NaN. Clamped, it does not."""
    recipe = load_recipe(write_recipe(tiny_recipe_text("bert")))
    loaded = load_model(recipe.model)
    fp32 = export_onnx(loaded, recipe.shapes, recipe.export, tmp_path / "model.onnx", source="random")
    fp16 = convert(fp32, tmp_path / "model.fp16.onnx", keep_ops=("LayerNormalization",), keep_nodes=[])
    feed = make_inputs(loaded, 2, 8, seed=0)
    feed["attention_mask"][1] = 0
    out = ort.InferenceSession(str(fp16), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    assert np.isfinite(out).all()


def _overflowing_graph(path):
    """y = ((x * 400)^2) / 1e5: fine in FP32, but the square passes 65504 (FP16's max) for |x| > 0.64."""
    nodes = [
        helper.make_node("Mul", ["x", "k400"], ["scaled"], name="scale"),
        helper.make_node("Mul", ["scaled", "scaled"], ["squared"], name="square"),
        helper.make_node("Div", ["squared", "k1e5"], ["y"], name="shrink"),
    ]
    graph = helper.make_graph(
        nodes, "overflow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])],
        [numpy_helper.from_array(np.array(400.0, np.float32), "k400"),
         numpy_helper.from_array(np.array(1e5, np.float32), "k1e5")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_fallback_keeps_the_overflowing_nodes_in_fp32(tmp_path):
    fp32 = _overflowing_graph(tmp_path / "overflow.onnx")
    rng = np.random.default_rng(0)
    feeds = {label: {"x": rng.standard_normal((b, 16)).astype(np.float32)} for label, b in
             (("min", 1), ("opt", 4), ("max", 8))}
    reference = Reference(feeds, {k: {"y": ((f["x"] * 400.0) ** 2 / 1e5).astype(np.float32)} for k, f in feeds.items()},
                          signature={"x": ("float32", (None, 16))})
    spec = FP16Spec(keep_fp32_ops=(), tolerance=Tolerance(atol=1e-2, rtol=1e-2))

    result = make_fp16(fp32, tmp_path / "overflow.fp16.onnx", reference, spec)

    assert result.parity.passed
    assert not result.rounds[0].passed and "first node whose FP16 output has Inf" in result.rounds[0].reason
    assert result.kept_nodes[0] == "square"
    assert set(result.kept_nodes) == {"square", "shrink"}, result.rounds
    assert result.rounds[-1].passed and len(result.rounds) == 3
    # The output is now finite and close to the FP32 reference.
    y = ort.InferenceSession(str(tmp_path / "overflow.fp16.onnx"),
                             providers=["CPUExecutionProvider"]).run(None, feeds["max"])[0]
    np.testing.assert_allclose(y, reference.outputs_for("max")["y"], rtol=1e-2, atol=1e-2)


def test_fallback_gives_up_after_max_rounds(tmp_path):
    fp32 = _overflowing_graph(tmp_path / "overflow.onnx")
    feeds = {"opt": {"x": np.full((2, 16), 3.0, np.float32)}}
    reference = Reference(feeds, {"opt": {"y": ((feeds["opt"]["x"] * 400.0) ** 2 / 1e5).astype(np.float32)}},
                          signature={"x": ("float32", (None, 16))})
    spec = FP16Spec(keep_fp32_ops=(), max_fallback_rounds=0, tolerance=Tolerance(atol=1e-2, rtol=1e-2))
    result = make_fp16(fp32, tmp_path / "o16.onnx", reference, spec)
    assert not result.parity.passed and len(result.rounds) == 1


def test_the_fast_float16_clamp_matches_onnxruntimes_bit_for_bit():
    """clamp_to_float16 replaces onnxruntime's convert_np_to_float16 during conversion: same bits on
    ordinary weights and on every edge (tiny, huge, zero, signed zero, NaN, infinities)."""
    from onnxruntime.transformers.float16 import convert_np_to_float16

    from trtforge.stages.fp16 import clamp_to_float16

    rng = np.random.default_rng(0)
    edges = np.array([0.0, -0.0, 1e-9, -1e-9, 5.96e-08, -5.96e-08, 6e-8, 65504.0, -65504.0, 70000.0, -7e5, 3.4e38,
                      np.inf, -np.inf, np.nan, 1.0, -2.5], dtype=np.float32)
    spread = rng.standard_normal(100_000) * 10.0 ** rng.integers(-9, 6, 100_000)
    for values in (edges, edges.astype(np.float64), spread, spread.astype(np.float32)):
        ours, theirs = clamp_to_float16(values), convert_np_to_float16(values)
        assert ours.dtype == theirs.dtype == np.float16
        assert ours.tobytes() == theirs.tobytes()


def test_the_culprit_search_works_when_the_fp16_graph_lacks_an_intermediate(tmp_path):
    """Conversion can rename or fold an FP32 graph's intermediate (a held-out MPNet's GELU Div output
    was gone): the search compares the tensors both graphs compute instead of failing the build."""
    from trtforge.stages.fp16 import find_culprits

    fp32 = _overflowing_graph(tmp_path / "overflow.onnx")
    fp16 = convert(fp32, tmp_path / "overflow.fp16.onnx", keep_ops=(), keep_nodes=[])
    model = onnx.load(str(fp16))
    original = next(n for n in model.graph.node if n.name == "square").output[0]
    renamed = original + "_renamed"
    for node in model.graph.node:
        node.output[:] = [renamed if o == original else o for o in node.output]
        node.input[:] = [renamed if i == original else i for i in node.input]
    onnx.save(model, str(fp16))
    feed = {"x": np.full((2, 16), 3.0, np.float32)}
    culprits, reason = find_culprits(fp32, fp16, feed, kept=[])
    assert culprits and reason  # found from the tensors both graphs still compute


def test_duplicate_casts_from_older_onnxruntime_are_dropped(tmp_path):
    """onnxruntime 1.31 (the CUDA wheel on the device) casts a tensor once per FP32-kept reader, all
    under one name: the graph failed to load (Qwen2's rotary embedding feeds Cos and Sin). The graph
    that converter makes is rebuilt here as it makes it; after the fix it loads and computes the same."""
    from trtforge.stages.fp16 import _drop_duplicate_casts

    def cast():
        return helper.make_node("Cast", ["h"], ["h_cast_to_fp32"], to=TensorProto.FLOAT, name="h_cast_to_fp32_node")

    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16, name="in"),
         helper.make_node("Add", ["x16", "x16"], ["h"], name="add"),
         cast(), helper.make_node("Cos", ["h_cast_to_fp32"], ["c"], name="cos"),
         cast(), helper.make_node("Sin", ["h_cast_to_fp32"], ["s"], name="sin"),
         helper.make_node("Add", ["c", "s"], ["y"], name="out")],
        "dup", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "dup.onnx"
    onnx.save(model, str(path))
    with pytest.raises(Exception, match="same node name"):
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    _drop_duplicate_casts(model)
    assert [n.name for n in model.graph.node].count("h_cast_to_fp32_node") == 1
    onnx.save(model, str(path))
    x = np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)
    y = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, np.cos(2 * x) + np.sin(2 * x), atol=2e-3)
