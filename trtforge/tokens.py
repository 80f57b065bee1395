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
MODULES_DIR = "modules"  # sentence-transformers modules' weights (Dense), as .npz
TEXT_CONFIG = "text.json"


class ModulesError(ValueError):
    """A sentence-transformers layout trtforge does not reproduce (the build refuses it)."""


def pooling_of(model_dir: Path | None, modules_out: Path | None = None) -> dict[str, Any] | None:
    """What sentence-transformers does after the transformer for a model directory, read from its
    own `modules.json` and each module's folder, or None where it declares no pooling:

        {"mode": cls|mean|max|lasttoken|mean_sqrt_len|weightedmean, "normalize": bool,
         "dense": [{"file", "in", "out", "activation"}], "truncate_dim": int | None, "source": ...}

    applied in that order (pooling, each Dense, Normalize; then the first truncate_dim values, as
    sentence-transformers' encode does). Dense weights are written as .npz files under
    `modules_out` (the artifact's modules/ folder). A module or option whose semantics trtforge
    does not reproduce raises ModulesError naming it: never guessed."""
    if model_dir is None or not (model_dir / "modules.json").is_file():
        return None
    modules = json.loads((model_dir / "modules.json").read_text())
    kinds = [(str(m.get("type", "")).rsplit(".", 1)[-1], str(m.get("path", ""))) for m in modules]
    if not any(kind == "Pooling" for kind, _ in kinds):
        for kind, _ in kinds[1:]:
            if kind not in ("Normalize",):
                raise ModulesError(f"modules.json: module {kind} without a Pooling module is not supported")
        return None
    if kinds[0][0] != "Transformer":
        raise ModulesError(f"modules.json: the first module is {kinds[0][0]}, not a Transformer; trtforge exports "
                           "Hugging Face transformers only")
    pooling: dict[str, Any] = {"normalize": False, "dense": [], "truncate_dim": None,
                               "source": "sentence-transformers modules.json"}
    order = [kind for kind, _ in kinds[1:]]
    expected = ["Pooling"] + ["Dense"] * order.count("Dense") + ["Normalize"] * order.count("Normalize")
    if order != expected or order.count("Normalize") > 1:
        raise ModulesError(f"modules.json: modules {' -> '.join(order)}; trtforge reproduces Transformer -> Pooling "
                           "-> Dense (any number) -> Normalize (optional), in that order")
    for index, (kind, rel) in enumerate(kinds[1:], 1):
        folder = model_dir / rel
        if kind == "Pooling":
            pooling["mode"] = _pooling_mode(json.loads((folder / "config.json").read_text()))
        elif kind == "Dense":
            pooling["dense"].append(_dense(folder, index, modules_out))
        else:
            pooling["normalize"] = True
    config = _read_json(model_dir / "config_sentence_transformers.json")
    if config.get("truncate_dim") is not None:
        pooling["truncate_dim"] = int(config["truncate_dim"])
    return pooling


def prompts_of(model_dir: Path | None) -> dict[str, Any]:
    """The model's named prompts (config_sentence_transformers.json), prepended to texts as
    sentence-transformers does: {"prompts": {name: text}, "default_prompt_name": name | None}."""
    config = _read_json(model_dir / "config_sentence_transformers.json") if model_dir else {}
    prompts = {str(k): str(v) for k, v in (config.get("prompts") or {}).items()}
    default = config.get("default_prompt_name")
    if default is not None and default not in prompts:
        raise ModulesError(f"config_sentence_transformers.json: default_prompt_name {default!r} is not one of its "
                           f"prompts {sorted(prompts)}")
    return {"prompts": prompts, "default_prompt_name": default}


def cross_encoder_of(model_dir: Path | None) -> dict[str, Any] | None:
    """A sentence-transformers CrossEncoder's scoring (config_sentence_transformers.json): the
    activation on its logits, or None where the folder is not a CrossEncoder's."""
    config = _read_json(model_dir / "config_sentence_transformers.json") if model_dir else {}
    if config.get("model_type") != "CrossEncoder":
        return None
    name = str(config.get("activation_fn") or "torch.nn.modules.linear.Identity").rsplit(".", 1)[-1]
    if name not in ACTIVATIONS:
        raise ModulesError(f"config_sentence_transformers.json: CrossEncoder activation {config.get('activation_fn')!r} "
                           f"is not supported (supported: {', '.join(ACTIVATIONS)})")
    return {"activation": ACTIVATIONS[name]}


def activate(name: str, values: Any) -> Any:
    """A named activation (ACTIVATIONS' values) on a numpy array."""
    import numpy as np
    import torch

    return _activate(name, torch.from_numpy(np.asarray(values, dtype=np.float32))).numpy()


def prompt_text(text: dict[str, Any], name: str | None) -> str:
    """The prompt to put before each text: the one named, else the model's default, else none."""
    prompts = text.get("prompts") or {}
    if name is None:
        name = text.get("default_prompt_name")
        if name is None:
            return ""
    if name not in prompts:
        known = ", ".join(sorted(prompts)) or "none"
        raise ValueError(f"prompt {name!r} is not one of the model's prompts ({known})")
    return prompts[name]


_POOLING_KEYS = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean", "pooling_mode_max_tokens": "max",
                 "pooling_mode_lasttoken": "lasttoken", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
                 "pooling_mode_weightedmean_tokens": "weightedmean"}
_NEW_MODES = {"cls": "cls", "mean": "mean", "max": "max", "lasttoken": "lasttoken", "mean_sqrt_len_tokens": "mean_sqrt_len",
              "weightedmean": "weightedmean"}
ACTIVATIONS = {"Identity": "identity", "Tanh": "tanh", "ReLU": "relu", "Sigmoid": "sigmoid", "GELU": "gelu"}


def _pooling_mode(config: dict[str, Any]) -> str:
    if config.get("include_prompt") is False:
        raise ModulesError("1_Pooling: include_prompt = false (prompt tokens left out of the pooling) is not supported")
    if "pooling_mode" in config:  # sentence-transformers 6: one name
        modes = [config["pooling_mode"]] if isinstance(config["pooling_mode"], str) else list(config["pooling_mode"])
        found = [_NEW_MODES.get(m) for m in modes]
    else:  # earlier: one flag per mode
        found = [mode for key, mode in _POOLING_KEYS.items() if config.get(key)]
        modes = found
    if len(found) != 1 or found[0] is None:
        raise ModulesError(f"1_Pooling: pooling {modes!r} is not supported; trtforge pools with exactly one of "
                           f"{', '.join(_NEW_MODES)}")
    return found[0]


def _dense(folder: Path, index: int, modules_out: Path | None) -> dict[str, Any]:
    import numpy as np

    config = json.loads((folder / "config.json").read_text())
    activation = ACTIVATIONS.get(str(config.get("activation_function", "")).rsplit(".", 1)[-1])
    if activation is None:
        raise ModulesError(f"{folder.name}: Dense activation {config.get('activation_function')!r} is not supported "
                           f"(supported: {', '.join(ACTIVATIONS)})")
    weights = _module_weights(folder)
    weight = weights["linear.weight"]
    bias = weights.get("linear.bias")
    if weight.shape != (config["out_features"], config["in_features"]):
        raise ModulesError(f"{folder.name}: weight of shape {tuple(weight.shape)}, not (out_features, in_features)")
    name = f"{MODULES_DIR}/{index}_dense.npz"
    if modules_out is not None:
        modules_out.mkdir(parents=True, exist_ok=True)
        arrays = {"weight": weight.astype(np.float32)}
        if bias is not None:
            arrays["bias"] = bias.astype(np.float32)
        np.savez(modules_out / Path(name).name, **arrays)
    return {"file": name, "in": int(config["in_features"]), "out": int(config["out_features"]),
            "bias": bias is not None, "activation": activation}


def _module_weights(folder: Path) -> dict[str, Any]:
    if (folder / "model.safetensors").is_file():
        from safetensors.numpy import load_file

        return load_file(str(folder / "model.safetensors"))
    if (folder / "pytorch_model.bin").is_file():
        import torch

        return {k: v.numpy() for k, v in torch.load(folder / "pytorch_model.bin", weights_only=True).items()}
    raise ModulesError(f"{folder.name}: no model.safetensors or pytorch_model.bin beside its config.json")


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


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
                labels: list[str] | None = None, prompts: dict[str, Any] | None = None,
                cross_encoder: dict[str, Any] | None = None) -> dict[str, Any]:
    config = {"tokenizer": TOKENIZER_DIR, "max_length": max_length, "inputs": inputs, "pooling": pooling,
              "truncation": "texts longer than max_length tokens are cut to it: the artifact was validated up to it"}
    if cross_encoder is not None:  # a sentence-transformers CrossEncoder: pairs in, activated scores out
        config["cross_encoder"] = cross_encoder
    if prompts and prompts.get("prompts"):  # sentence-transformers' named prompts, prepended to the text
        config["prompts"] = prompts["prompts"]
        config["default_prompt_name"] = prompts.get("default_prompt_name")
    if labels is not None:  # a classifier's label names by id (its config's id2label)
        config["labels"] = labels
    return config


LABEL_TASKS = ("sequence-classification", "image-classification")


def label_names(config: Any) -> list[str]:
    """A classifier's label names in id order, from its config's id2label (LABEL_<i> where unnamed)."""
    names = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    return [names.get(i, f"LABEL_{i}") for i in range(int(getattr(config, "num_labels", len(names)) or len(names)))]


def pool(hidden: Any, mask: Any, pooling: dict[str, Any], dense: list[tuple[Any, Any, str]] = ()) -> Any:
    """sentence-transformers' pooling of per-token states (batch, tokens, hidden) over real tokens
    (right-padded rows), then its Dense layers (`dense`: (weight, bias, activation) as load_dense
    gives them), Normalize, and truncate_dim, in FP32 where the states are (a worker's GPU): a
    torch tensor for a torch tensor, a numpy array for a numpy array."""
    import torch

    states = torch.as_tensor(hidden).float()
    weights = torch.as_tensor(mask, device=states.device).float().unsqueeze(-1)
    mode = pooling["mode"]
    if mode in ("mean", "mean_sqrt_len"):
        count = weights.sum(1).clamp_min(1e-9)
        pooled = (states * weights).sum(1) / (count if mode == "mean" else count.sqrt())
    elif mode == "weightedmean":  # weights rising with the position, 1 for the first token
        positions = weights * torch.arange(1, states.shape[1] + 1, device=states.device, dtype=states.dtype)[None, :, None]
        pooled = (states * positions).sum(1) / positions.sum(1).clamp_min(1e-9)
    elif mode == "cls":
        pooled = states[:, 0]
    elif mode == "lasttoken":  # the last real token of each row
        last = (weights.squeeze(-1).sum(1).long() - 1).clamp_min(0)
        pooled = states[torch.arange(states.shape[0], device=states.device), last]
    else:
        pooled = states.masked_fill(weights == 0, -1e9).amax(1)
    for weight, bias, activation in dense:
        pooled = torch.nn.functional.linear(pooled, torch.as_tensor(weight, device=pooled.device),
                                            None if bias is None else torch.as_tensor(bias, device=pooled.device))
        pooled = _activate(activation, pooled)
    if pooling.get("normalize"):
        pooled = torch.nn.functional.normalize(pooled, dim=1)
    if pooling.get("truncate_dim"):
        pooled = pooled[:, :pooling["truncate_dim"]]
    return pooled if isinstance(hidden, torch.Tensor) else pooled.numpy()


def embedding_width(pooling: dict[str, Any], hidden: int) -> int:
    """The length of a pooled embedding: the hidden size, or the last Dense layer's, cut at truncate_dim."""
    width = pooling["dense"][-1]["out"] if pooling.get("dense") else hidden
    return min(width, pooling["truncate_dim"]) if pooling.get("truncate_dim") else width


def load_dense(artifact: Path, pooling: dict[str, Any] | None, device: Any = "cpu") -> list[tuple[Any, Any, str]]:
    """The Dense layers' weights of an artifact's pooling, as torch tensors on `device` (files
    verified by the caller, as verified_text_config does)."""
    import numpy as np
    import torch

    layers = []
    for layer in (pooling or {}).get("dense", []):
        with np.load(artifact / layer["file"], allow_pickle=False) as arrays:
            bias = torch.from_numpy(arrays["bias"]).to(device) if "bias" in arrays else None
            layers.append((torch.from_numpy(arrays["weight"]).to(device), bias, layer["activation"]))
    return layers


def _activate(name: str, values: Any) -> Any:
    import torch

    functions = {"tanh": torch.tanh, "relu": torch.relu, "sigmoid": torch.sigmoid, "gelu": torch.nn.functional.gelu}
    return values if name == "identity" else functions[name](values)
