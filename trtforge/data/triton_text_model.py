"""Triton Python-backend model written by `trtforge export triton`: text in, the model's outputs
out. Tokenizes with tokenizer.json (truncating at text.json's max_length, the length the artifact
was validated up to; the model's default prompt first, where it names one), runs model.onnx with
onnxruntime on the CPU, and applies text.json's pooling as sentence-transformers does (the pooling
mode over real tokens, its Dense layers from modules/, L2 normalisation, truncate_dim).
Everything it needs lies beside it; it does not import trtforge (so its pooling repeats
trtforge.tokens.pool: CI checks both against sentence-transformers' pooling computed from PyTorch)."""

import json
import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils
from tokenizers import Tokenizer


class TritonPythonModel:
    def initialize(self, args):
        here = Path(__file__).parent
        self.text = json.loads((here / "text.json").read_text())
        self.tokenizer = Tokenizer.from_file(str(here / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_length=self.text["max_length"])
        pad = json.loads((here / "tokenizer_config.json").read_text()).get("pad_token") or "[PAD]"
        self.tokenizer.enable_padding(pad_id=self.tokenizer.token_to_id(pad) or 0, pad_token=pad)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(here / "model.onnx"), options, providers=["CPUExecutionProvider"])
        self.outputs = [o["name"] for o in json.loads(args["model_config"])["output"]]
        self.dense = load_dense(here, self.text.get("pooling"))  # sentence-transformers' Dense layers
        default = self.text.get("default_prompt_name")
        self.prefix = (self.text.get("prompts") or {}).get(default, "") if default else ""

    def execute(self, requests):
        responses = []
        for request in requests:
            raw = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy().reshape(-1)
            texts = [self.prefix + (t.decode("utf-8") if isinstance(t, bytes) else str(t)) for t in raw]
            encodings = self.tokenizer.encode_batch(texts)
            feed = {"input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
                    "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
                    "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64)}
            feed = {name: feed[name] for name in self.text["inputs"]}
            try:
                results = self.session.run(None, feed)
            except Exception as e:  # the client gets the error, the model keeps serving
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e))))
                continue
            values = [np.asarray(r, dtype=np.float32) for r in results]
            pooling = self.text.get("pooling")
            if pooling:
                values = [self.pool(values[0], feed["attention_mask"], pooling)]
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(n, v) for n, v in zip(self.outputs, values)]))
        return responses

    def pool(self, hidden, mask, pooling):
        mask = mask.astype(np.float32)[..., None]
        mode = pooling["mode"]
        if mode in ("mean", "mean_sqrt_len"):
            count = np.clip(mask.sum(axis=1), 1e-9, None)
            pooled = (hidden * mask).sum(axis=1) / (count if mode == "mean" else np.sqrt(count))
        elif mode == "weightedmean":
            positions = mask * np.arange(1, hidden.shape[1] + 1, dtype=np.float32)[None, :, None]
            pooled = (hidden * positions).sum(axis=1) / np.clip(positions.sum(axis=1), 1e-9, None)
        elif mode == "cls":
            pooled = hidden[:, 0]
        elif mode == "lasttoken":
            last = np.clip(mask[..., 0].sum(axis=1).astype(np.int64) - 1, 0, None)
            pooled = hidden[np.arange(len(hidden)), last]
        else:
            pooled = np.where(mask > 0, hidden, -1e9).max(axis=1)
        for weight, bias, activation in self.dense:
            pooled = pooled @ weight.T + (bias if bias is not None else 0)
            pooled = ACTIVATIONS[activation](pooled)
        if pooling.get("normalize"):
            pooled = pooled / np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)
        if pooling.get("truncate_dim"):
            pooled = pooled[:, :pooling["truncate_dim"]]
        return pooled.astype(np.float32)


ACTIVATIONS = {"identity": lambda x: x, "tanh": np.tanh, "relu": lambda x: np.maximum(x, 0),
               "sigmoid": lambda x: 1 / (1 + np.exp(-x)),
               "gelu": lambda x: 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))}


def load_dense(here, pooling):
    layers = []
    for layer in (pooling or {}).get("dense", []):
        with np.load(here / layer["file"], allow_pickle=False) as arrays:
            layers.append((arrays["weight"], arrays["bias"] if "bias" in arrays else None, layer["activation"]))
    return layers
