"""The artifact's text interface: the model's tokenizer files, its post-processing, and the limit
up to which it was validated, so that a service can send text without guessing any of them.

    OUT/<name>/tokenizer/   the tokenizer as transformers saves it (tokenizer.json and friends)
    OUT/<name>/text.json    {"tokenizer": "tokenizer", "max_length": <the validated max sequence>,
                             "inputs": [...], "pooling": {"mode": "mean", "normalize": true} | null}

Pooling is what sentence-transformers would apply to this model, read from the model's own
`modules.json` and `1_Pooling/config.json` (mean, CLS or max over real tokens, then L2 normalisation
where a Normalize module follows); models without them have none, and their outputs are returned as
the graph gives them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TOKENIZER_DIR = "tokenizer"
TEXT_CONFIG = "text.json"
POOLING_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max"}


def pooling_of(model_dir: Path | None) -> dict[str, Any] | None:
    """sentence-transformers' pooling for a model directory, or None where it declares none."""
    if model_dir is None or not (model_dir / "modules.json").is_file():
        return None
    modules = json.loads((model_dir / "modules.json").read_text())
    kinds = {m.get("type", "").rsplit(".", 1)[-1]: m.get("path", "") for m in modules}
    if "Pooling" not in kinds:
        return None
    config = json.loads((model_dir / kinds["Pooling"] / "config.json").read_text())
    modes = [mode for key, mode in POOLING_MODES.items() if config.get(key)]
    if len(modes) != 1:
        return None  # several concatenated poolings: not supported, outputs stay per token
    return {"mode": modes[0], "normalize": "Normalize" in kinds, "source": "sentence-transformers modules.json"}


def save_tokenizer(tokenizer: Any, directory: Path, *, max_length: int) -> bool:
    """Save a fast tokenizer (one that writes tokenizer.json); False for slow ones, which are not packaged.

    The saved files truncate exactly as text.json says, at `max_length` (the validated sequence
    max), and do not pad: a consumer that loads tokenizer.json alone (the tokenizers library), or
    tokenizer_config.json through transformers, cuts texts where the artifact was validated, not
    at whatever length the tokenizer object last truncated to."""
    import copy

    if tokenizer is None or not getattr(tokenizer, "is_fast", False):
        return False
    shipped = copy.deepcopy(tokenizer)
    shipped.model_max_length = max_length
    shipped.backend_tokenizer.no_padding()
    shipped.backend_tokenizer.enable_truncation(max_length)
    shipped.save_pretrained(directory)
    return (directory / "tokenizer.json").is_file()


def text_config(*, max_length: int, inputs: list[str], pooling: dict[str, Any] | None,
                labels: list[str] | None = None) -> dict[str, Any]:
    config = {"tokenizer": TOKENIZER_DIR, "max_length": max_length, "inputs": inputs, "pooling": pooling,
              "truncation": "texts longer than max_length tokens are cut to it: the artifact was validated up to it"}
    if labels is not None:  # a classifier's label names by id (its config's id2label)
        config["labels"] = labels
    return config


LABEL_TASKS = ("sequence-classification", "image-classification")


def label_names(config: Any) -> list[str]:
    """A classifier's label names in id order, from its config's id2label (LABEL_<i> where unnamed)."""
    names = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    return [names.get(i, f"LABEL_{i}") for i in range(int(getattr(config, "num_labels", len(names)) or len(names)))]


def pool(hidden: Any, mask: Any, pooling: dict[str, Any]) -> Any:
    """sentence-transformers' pooling of per-token states (batch, tokens, hidden) over real tokens,
    in FP32, where the states are (a worker's GPU): a torch tensor for a torch tensor, a numpy array
    for a numpy array."""
    import torch

    states = torch.as_tensor(hidden).float()
    weights = torch.as_tensor(mask, device=states.device).float().unsqueeze(-1)
    if pooling["mode"] == "mean":
        pooled = (states * weights).sum(1) / weights.sum(1).clamp_min(1e-9)
    elif pooling["mode"] == "cls":
        pooled = states[:, 0]
    else:
        pooled = states.masked_fill(weights == 0, -1e9).amax(1)
    if pooling.get("normalize"):
        pooled = torch.nn.functional.normalize(pooled, dim=1)
    return pooled if isinstance(hidden, torch.Tensor) else pooled.numpy()
