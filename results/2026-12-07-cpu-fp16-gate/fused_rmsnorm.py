"""How an FP16 graph's error depends on ONNX Runtime's fusions, on the CPU provider.

    python fused_rmsnorm.py ARTIFACT      (an artifact's model.onnx and model.fp16.onnx are compared)

Runs the artifact's FP32 graph (the reference) and its FP16 graph on the same token ids, at each graph
optimization level and with the RMSNorm fusion disabled, and prints the max abs error of each.
"""

import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

artifact = Path(sys.argv[1])
ids = np.random.default_rng(0).integers(100, 30000, (2, 16)).astype(np.int64)
reference = ort.InferenceSession(str(artifact / "model.onnx"), providers=["CPUExecutionProvider"])
feed = {i.name: (ids if "ids" in i.name else np.ones_like(ids)) for i in reference.get_inputs()}
want = reference.run(None, feed)[0]
print(f"onnxruntime {ort.__version__}, {artifact / 'model.fp16.onnx'} against the FP32 graph, ids (2, 16)")
for level in ("ORT_DISABLE_ALL", "ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL"):
    for disabled in ([], ["SimplifiedLayerNormFusion"]):
        if disabled and level != "ORT_ENABLE_ALL":
            continue
        options = ort.SessionOptions()
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        options.log_severity_level = 3
        label = level + (f" without {disabled[0]}" if disabled else "")
        try:
            session = ort.InferenceSession(str(artifact / "model.fp16.onnx"), options,
                                           providers=["CPUExecutionProvider"], disabled_optimizers=disabled)
        except Exception as e:  # some versions refuse a level outright
            print(f"  {label:52s} session refused: {str(e).splitlines()[0][:120]}")
            continue
        got = session.run(None, feed)[0]
        print(f"  {label:52s} max abs error {np.abs(got.astype(np.float64) - want).max():.4g}")
