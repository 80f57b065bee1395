"""trtforge: Hugging Face model -> validated ONNX -> FP16 engines per GPU, with parity reports."""

__version__ = "0.1.0"
