"""Loading a recipe's model (hub id, local directory or random weights) and making inputs for it.

torch and transformers are imported inside the functions that need them, so that the CLI and the
cache check start without them.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from trtforge.errors import EnvironmentProblem
from trtforge.recipe import ModelSpec
from trtforge.tasks import TaskSpec, TensorSpec, task_spec

CORPUS = Path(__file__).with_name("data") / "corpus.txt"


def source_fingerprint(spec: ModelSpec) -> dict[str, str]:
    """What identifies the weights, cheaply and without importing torch: a content hash of a local
    directory, the cached snapshot revision of a hub id, or the config and seed of a random model."""
    if spec.is_random:
        blob = json.dumps({"architecture": spec.architecture, "config": spec.config, "seed": spec.seed},
                          sort_keys=True)
        return {"kind": "random", "sha256": hashlib.sha256(blob.encode()).hexdigest()}
    if spec.local_dir is not None:
        if not (spec.local_dir / "config.json").is_file():  # before hashing what may be a whole tree
            raise EnvironmentProblem(f"[model] source {spec.source!r} is a directory without config.json, so not a "
                                     "model directory; point it at the folder that holds config.json and the weights")
        return {"kind": "local", "sha256": hash_directory(spec.local_dir)}  # content, not where it lies
    return {"kind": "hub", "id": spec.source, "revision": _hub_revision(spec)}


def hash_directory(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and ".cache" not in p.parts):
        digest.update(str(file.relative_to(path)).encode())
        with file.open("rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def _hub_revision(spec: ModelSpec) -> str:
    """The commit of the snapshot that from_pretrained would load (the local cache when offline)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        path = snapshot_download(spec.source, revision=spec.revision, local_files_only=offline,
                                 allow_patterns=["*.json", "*.txt", "*.model", "*.safetensors"])
    except LocalEntryNotFoundError:
        raise EnvironmentProblem(
            f"model {spec.source!r} is not in the local Hugging Face cache and the hub is offline or unreachable; "
            "download it where the hub is reachable or set [model] source to a local directory") from None
    except Exception as e:  # network errors come in many types; all mean the same to the user
        raise EnvironmentProblem(
            f"could not reach the Hugging Face hub for {spec.source!r} ({type(e).__name__}); "
            "set HF_HUB_OFFLINE=1 to use the local cache, or point [model] source at a local directory") from None
    return Path(path).name


@dataclass
class LoadedModel:
    """An FP32 model in eval mode, with its tokenizer when it has one, and its tensor declarations."""

    spec: ModelSpec
    task: TaskSpec
    model: Any  # transformers PreTrainedModel
    tokenizer: Any | None

    @cached_property
    def inputs(self) -> tuple[TensorSpec, ...]:
        accepted = inspect.signature(self.model.forward).parameters
        extra = tuple(t for t, attr in self.task.optional_inputs
                      if t.name in accepted and getattr(self.model.config, attr, 0))
        return self.task.inputs + extra

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self.task.outputs

    def export_module(self) -> Any:
        """The model behind a positional forward(input_0, input_1, ...) returning a tuple of outputs.

        transformers 5 models cannot be traced directly (their forward takes keyword arguments that the
        tracer would pass twice), so a thin wrapper maps positions to names.
        """
        import torch

        names = [t.name for t in self.inputs]
        outputs = [t.name for t in self.outputs]
        model, kwargs = self.model, dict(self.task.forward_kwargs)

        class ByPosition(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
                result = self.model(**dict(zip(names, args)), **kwargs, return_dict=True)
                return tuple(result[name] for name in outputs)

        return ByPosition().eval()

    def run_torch(self, feed: dict[str, np.ndarray], *, device: str = "cpu") -> dict[str, np.ndarray]:
        import torch

        with torch.inference_mode():
            args = [torch.from_numpy(feed[t.name]).to(device) for t in self.inputs]
            result = self.export_module()(*args)
        return {t.name: r.float().cpu().numpy() for t, r in zip(self.outputs, result)}


def load_model(spec: ModelSpec) -> LoadedModel:
    import torch
    import transformers

    task = task_spec(spec.task)
    auto = getattr(transformers, task.auto_class)
    # Eager attention exports to the MatMul/Softmax pattern that ONNX Runtime's optimizer fuses.
    options: dict[str, Any] = {"attn_implementation": "eager"}
    tokenizer = None
    try:
        if spec.is_random:
            config = transformers.AutoConfig.for_model(spec.architecture, **spec.config)
            torch.manual_seed(spec.seed)
            model = auto.from_config(config, trust_remote_code=spec.trust_remote_code, **options)
        else:
            common = {"revision": spec.revision, "trust_remote_code": spec.trust_remote_code}
            model = auto.from_pretrained(spec.source, **spec.config, **common, **options)
            if not task.is_image:
                tokenizer = transformers.AutoTokenizer.from_pretrained(spec.source, **common)
    except OSError as e:
        raise EnvironmentProblem(f"could not load model {spec.source!r}: {str(e).splitlines()[0]}; "
                                 "check [model] source (a local directory needs config.json and weights)") from None
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise EnvironmentProblem(f"model {spec.source!r} needs code from its repository; set "
                                     "trust_remote_code = true in [model] if you trust it") from None
        raise EnvironmentProblem(f"could not load model {spec.source!r} for task {spec.task}: "
                                 f"{str(e).splitlines()[0]}; check [model] task and config") from None
    model.eval()
    return LoadedModel(spec=spec, task=task, model=model, tokenizer=tokenizer)


def make_inputs(loaded: LoadedModel, batch: int, extent: int, *, seed: int) -> dict[str, np.ndarray]:
    """Inputs of one shape: real tokenized text where there is a tokenizer, real padding always.

    Row 0 fills the sequence; the other rows have random lengths, so attention masks hold real padding.
    """
    rng = np.random.default_rng(seed)
    config = loaded.model.config
    if loaded.task.is_image:
        channels = getattr(config, "num_channels", 3)
        return {"pixel_values": rng.standard_normal((batch, channels, extent, extent), dtype=np.float32)}

    lengths = np.concatenate([[extent], rng.integers(max(1, extent // 4), extent + 1, size=batch - 1)])
    if loaded.tokenizer is not None:
        ids, mask, types = _tokenize(loaded.tokenizer, lengths, extent, rng)
    else:
        vocab = int(getattr(config, "vocab_size"))
        ids = rng.integers(0, vocab, size=(batch, extent), dtype=np.int64)
        mask = (np.arange(extent)[None, :] < lengths[:, None]).astype(np.int64)
        pad = getattr(config, "pad_token_id", None) or 0
        ids = np.where(mask == 1, ids, pad)
        types = np.zeros_like(ids)
    feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    return {t.name: feed[t.name] for t in loaded.inputs}


def _tokenize(tokenizer: Any, lengths: np.ndarray, extent: int,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    sentences = CORPUS.read_text().splitlines()
    rows = []
    for length in lengths:
        # Enough sentences to fill the row, in a random order, truncated to the row's length.
        order = rng.permutation(len(sentences))
        text = " ".join(sentences[i] for i in np.resize(order, max(1, int(length) // 8 + 1)))
        encoded = tokenizer(text, truncation=True, max_length=int(length))
        # A length below the tokenizer's special tokens comes back longer than asked: cut it.
        rows.append({key: value[: int(length)] for key, value in encoded.items()})
    padded = tokenizer.pad(rows, padding="max_length", max_length=extent, return_tensors="np")
    ids = padded["input_ids"].astype(np.int64)
    mask = padded["attention_mask"].astype(np.int64)
    types = padded.get("token_type_ids", np.zeros_like(ids)).astype(np.int64)
    return ids, mask, types


def dynamic_axes(tensors: tuple[TensorSpec, ...]) -> dict[str, dict[int, str]]:
    return {t.name: {i: axis for i, axis in enumerate(t.axes) if axis} for t in tensors}
