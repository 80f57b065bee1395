"""The decoder embedder of tests/test_sentence_transformers.py's GPU test, built on the CPU backend."""
import shutil, sys
from pathlib import Path
sys.path.insert(0, ".")
import onnxruntime
from tests.test_sentence_transformers import build, st_model
root = Path(sys.argv[1]); shutil.rmtree(root, ignore_errors=True)
done = build(root, st_model(root, "st-model", "lasttoken", normalize=True, architecture="qwen2"))
print(f"onnxruntime {onnxruntime.__version__}: trtforge build exit {done.returncode}", done.stderr.strip()[-400:])
