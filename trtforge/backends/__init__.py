"""Engine backends behind one interface (see base.py): onnxruntime (CUDA, CPU), tensorrt, tensorrt-rtx."""
