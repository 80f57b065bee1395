"""Stage 1: export the model to ONNX with dynamic batch and sequence (or image) axes."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

from trtforge.errors import TrtforgeError
from trtforge.models import LoadedModel, dynamic_axes, make_inputs
from trtforge.recipe import ExportSpec, Shapes

# Above this many bytes of weights the graph keeps them in a side file (protobuf's limit is 2 GiB).
EXTERNAL_DATA_THRESHOLD = 1 << 30


class ExportError(TrtforgeError):
    """The exporter or the ONNX checker rejected the model."""


def export_onnx(loaded: LoadedModel, shapes: Shapes, spec: ExportSpec, path: Path, *, source: str) -> Path:
    """Write `path` (and `path.data` for large models); check it with the ONNX checker and shape
    inference. Returns the path."""
    import onnx
    import torch

    # A sample of at least 2 on every dynamic axis, so the tracer cannot specialise on a size of 1.
    batch = max(2, min(shapes.batch[1], shapes.batch[2]))
    extent = max(2, min(shapes.extent[1], shapes.extent[2]))
    if shapes.extent_name == "image":
        extent = shapes.extent[1]
    sample = make_inputs(loaded, batch, extent, seed=0)
    args = tuple(torch.from_numpy(sample[t.name]) for t in loaded.inputs)
    module = loaded.export_module()
    names = [t.name for t in loaded.inputs], [t.name for t in loaded.outputs]
    axes = dynamic_axes(loaded.inputs + loaded.outputs)
    try:
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")  # tracer warnings about Python control flow are expected
            if spec.exporter == "dynamo":
                shapes_by_input = {f"args_{i}": {k: torch.export.Dim.AUTO for k in axes[n]}
                                   for i, n in enumerate(names[0])}
                program = torch.onnx.export(module, args, dynamo=True, input_names=names[0],
                                            output_names=names[1], opset_version=spec.opset,
                                            dynamic_shapes=(tuple(shapes_by_input.values()),))
                model = program.model_proto
            else:
                buffer = io.BytesIO()  # in memory: no copy of the graph written and read back
                torch.onnx.export(module, args, buffer, dynamo=False, input_names=names[0],
                                  output_names=names[1], opset_version=spec.opset, dynamic_axes=axes,
                                  do_constant_folding=True)
                model = onnx.load_from_string(buffer.getvalue())
    except OSError:
        raise  # the disk, not the exporter: the CLI says which path and why
    except Exception as e:  # the exporters raise many unrelated types
        raise ExportError(f"ONNX export failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}; "
                          "try [export] exporter = \"dynamo\" or a different opset") from e

    model.doc_string = f"exported by trtforge from {source}"  # as the recipe names it: no build-machine path
    large = weight_bytes(model) > EXTERNAL_DATA_THRESHOLD
    if not large:  # checked in memory: no second copy of the graph on disk
        check_onnx_model(model, path.name)
    onnx.save_model(model, str(path), save_as_external_data=large, all_tensors_to_one_file=True,
                    location=path.name + ".data" if large else None)
    if large:
        check_onnx(path)
    return path


def weight_bytes(model: object) -> int:
    """The bytes of a graph's initializers: what decides whether it fits in one protobuf (2 GiB);
    computing the whole message's ByteSize costs a serialisation's time."""
    return sum(len(t.raw_data) or 4 * len(t.float_data) for t in model.graph.initializer)  # type: ignore[attr-defined]


def check_onnx_model(model: object, name: str) -> None:
    import onnx

    try:
        onnx.checker.check_model(model, full_check=True)  # the checker and strict shape inference, one pass
    except Exception as e:
        raise ExportError(f"{name} fails the ONNX checker: {str(e).splitlines()[0][:300]}") from e


def check_onnx(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path))
        onnx.shape_inference.infer_shapes_path(str(path), str(path.with_suffix(".shapes.onnx")), strict_mode=True)
    except Exception as e:
        raise ExportError(f"{path.name} fails the ONNX checker: {str(e).splitlines()[0][:300]}") from e
    finally:
        path.with_suffix(".shapes.onnx").unlink(missing_ok=True)
