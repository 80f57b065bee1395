"""Checks that need the model's config but not its weights; they run before anything is written.

recipe.py checks what the recipe alone can tell. Here the model's config (a JSON file, or
transformers' defaults for random weights: cheap to load) settles what the recipe leaves open and
refuses what contradicts it, each with one line that names the key, the value and the limit:

- `[model] config` keys that the model's config does not have (a typo builds a different model),
  values of the wrong type, sizes and counts below 1, and combinations the model's own code
  rejects (the model is built on the meta device: no memory, no weights);
- a `[shapes] sequence` longer than the model's position embeddings;
- an image size other than the one the model was made for (and the default when the recipe has none);
- validation inputs that would not fit in this machine's memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import os
import re
from collections.abc import Iterator
from typing import Any

from trtforge.errors import EnvironmentProblem, RecipeError
from trtforge.recipe import Recipe, Shapes
from trtforge.tasks import task_spec

# Encoder-decoders whose forward needs decoder inputs (BART-like models derive them from input_ids and
# export as they are): what trtforge's tasks feed is not enough for them.
NEEDS_DECODER_INPUTS = {"t5", "mt5", "umt5", "longt5", "switch_transformers"}
# Config keys that must be above zero: epsilons (LayerNorm's eps of -1 passes PyTorch, not ONNX Runtime).
POSITIVE = re.compile(r"(_eps|_epsilon|^eps|^epsilon)$")
# Config keys that count or size something: a value below 1 makes no model.
COUNT_OR_SIZE = re.compile(r"^(num|n)_|(_size|_layers?|_heads?|_dim|_positions|_embeddings|_labels|_embd|_ctx|"
                           r"_channels)$|^(dim|vocab_size)$")
# Architectures whose position ids start after the padding index: max_position_embeddings minus
# this many positions are usable (RoBERTa's 514 embeddings hold 512 tokens).
RESERVED_POSITIONS = {"roberta": 2, "xlm-roberta": 2, "camembert": 2, "longformer": 2, "xlm-roberta-xl": 2}
# Without [shapes] sequence: 1 .. the model's positions, optimised for this length.
DEFAULT_OPT_SEQUENCE = 128
# Share of this machine's memory that validation's largest PyTorch FP32 forward may take.
MEMORY_SHARE = 0.5


def preflight(recipe: Recipe) -> Recipe:
    """The recipe with the model's defaults filled in; RecipeError for anything that contradicts the model."""
    with _quiet_transformers():  # its config warnings are repeated when the model loads
        check_overrides(recipe, model_config(recipe, with_overrides=False))
        config = model_config(recipe, with_overrides=True)  # built the way load_model builds it
        check_task_fits(recipe, config)
        instantiate_on_meta(recipe, config)
    shapes = resolve_shapes(recipe, config)
    check_memory(recipe, config, shapes)
    return dataclasses.replace(recipe, shapes=shapes)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging

    before = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(before)


def model_config(recipe: Recipe, *, with_overrides: bool) -> Any:
    """The model's config as the recipe's source defines it, with or without the recipe's overrides."""
    import transformers

    spec = recipe.model
    overrides = spec.config if with_overrides else {}
    try:
        if spec.is_random:
            return transformers.AutoConfig.for_model(spec.architecture, **overrides)
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        return transformers.AutoConfig.from_pretrained(spec.source, revision=spec.revision,
                                                       trust_remote_code=spec.trust_remote_code,
                                                       local_files_only=offline or spec.local_dir is not None,
                                                       **overrides)
    except (OSError, ValueError) as e:
        raise EnvironmentProblem(f"could not read the config of model {spec.source!r}: {str(e).splitlines()[0]}; "
                                 "check [model] source (a local directory needs config.json)") from None


def _error(recipe: Recipe, key: str, problem: str, fix: str) -> RecipeError:
    return RecipeError(recipe.path, key, problem, fix)


def check_overrides(recipe: Recipe, config: Any) -> None:
    defaults = config.to_dict()
    known = sorted(set(defaults) | set(getattr(config, "attribute_map", {})))
    kind = type(config).__name__
    for key, value in recipe.model.config.items():
        where = f"model.config.{key}"
        if key not in defaults and not hasattr(config, key):
            close = difflib.get_close_matches(key, known, n=3)
            raise _error(recipe, where, f"{kind} has no key {key!r}",
                         f"did you mean {' or '.join(close)}?" if close else "remove it (see the model's config.json)")
        default = getattr(config, key, None)
        if not _same_kind(default, value):
            raise _error(recipe, where, f"expected {_kind(default)} like the model's default {default!r}, "
                         f"got {type(value).__name__} {value!r}", "fix its type")
        if isinstance(value, int) and not isinstance(value, bool) and COUNT_OR_SIZE.search(key) and value < 1:
            raise _error(recipe, where, f"{value} is below the minimum of 1 (it counts or sizes part of the model)",
                         "use a positive value")
        if isinstance(value, dict) and not isinstance(default, dict):
            takes = _kind(default) if default is not None else "a value"
            raise _error(recipe, where, f"is a table, but {kind}.{key} takes {takes}", "write a single value")
        if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
            raise _error(recipe, where, f"{value} is not a finite number", "use a finite value")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and POSITIVE.search(key) and value <= 0:
            raise _error(recipe, where, f"{value} must be above 0 (an epsilon or a scale divides by it)",
                         "use a small positive value such as 1e-12")


def _same_kind(default: Any, value: Any) -> bool:
    if default is None:
        return isinstance(value, (bool, int, float, str, list, dict))
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    if isinstance(default, (list, tuple)):
        return isinstance(value, list)
    return isinstance(value, type(default))


def _kind(default: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            tuple: "a list", dict: "a table"}.get(type(default), type(default).__name__)


def check_task_fits(recipe: Recipe, config: Any) -> None:
    """Model and task combinations that export cannot take, refused with the real fix (the dynamo
    exporter fixes neither of these)."""
    kind = type(config).__name__
    if config.model_type in NEEDS_DECODER_INPUTS and recipe.model.task != "causal-lm":
        raise _error(recipe, "model.task", f"{kind} is an encoder-decoder model, and trtforge exports encoder-only and "
                     f"decoder-only models (task {recipe.model.task} would need the decoder's inputs too)",
                     "use an encoder-only model (BERT, RoBERTa, MPNet, ...) for embeddings; exporting an "
                     "encoder-decoder's encoder alone is not supported yet")
    batch_max = recipe.shapes.batch[2]
    if recipe.model.task == "sequence-classification" and getattr(config, "pad_token_id", 0) is None and batch_max > 1:
        eos = getattr(config, "eos_token_id", None)
        eos = eos[0] if isinstance(eos, list) and eos else eos
        vocab = getattr(config, "vocab_size", None)
        fits = isinstance(eos, int) and (not isinstance(vocab, int) or eos < vocab)
        value = f"pad_token_id = {eos}" if fits else f"pad_token_id = <a token id below vocab_size {vocab}>"
        raise _error(recipe, "model.config", f"{kind} has no pad_token_id, and its classifier finds each row's last "
                     f"token by it, so batches above 1 (the recipe's max is {batch_max}) cannot be classified",
                     f"add `{value}` to [model] config (the end-of-text id, as GPT-2 fine-tunes do), or "
                     "use [shapes] batch = [1, 1, 1]")


def instantiate_on_meta(recipe: Recipe, config: Any) -> None:
    """Build the model without memory, so that combinations its code rejects (a hidden size that
    the head count does not divide, say) fail here rather than after the export cache is written."""
    import torch
    import transformers

    auto = getattr(transformers, task_spec(recipe.model.task).auto_class)
    try:
        with torch.device("meta"):
            model = auto.from_config(config, trust_remote_code=recipe.model.trust_remote_code,
                                     attn_implementation="eager")
    except KeyError as e:  # an unknown name looked up in a table: an activation, a norm, a layer type
        raise _error(recipe, "model.config", f"the model's code has no {e.args[0]!r} (an unknown name in a "
                     "config value such as hidden_act)", "use a value the model's code knows") from None
    except (ValueError, TypeError, AssertionError, RuntimeError, ZeroDivisionError, AttributeError,
            IndexError, NotImplementedError) as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise _error(recipe, "model.config", f"the model's code rejects this config: {message[:300]}",
                     "fix the [model] config values it names") from None
    weights = 4 * sum(p.numel() for p in model.parameters())  # FP32, as loaded and exported
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if weights > MEMORY_SHARE * total:
        raise _error(recipe, "model.config", f"the model has {weights / 4e9:.1f} G parameters ({weights / 2**30:.0f} GiB "
                     f"in FP32), above the limit of {MEMORY_SHARE * total / 2**30:.0f} GiB (half of this machine's "
                     "memory)", "use smaller sizes (vocab_size, hidden_size, layers)")


def resolve_shapes(recipe: Recipe, config: Any) -> Shapes:
    shapes = recipe.shapes
    if shapes.extent_name == "image":
        size = getattr(config, "image_size", None)
        size = size[0] if isinstance(size, (list, tuple)) and len(set(size)) == 1 else size
        if shapes.extent is None:
            if not isinstance(size, int):
                raise _error(recipe, "shapes.image", "missing, and the model's config has no square image_size",
                             "add `image = [size, size, size]` to [shapes]")
            return dataclasses.replace(shapes, extent=(size, size, size))
        if isinstance(size, int) and set(shapes.extent) != {size}:
            raise _error(recipe, "shapes.image", f"{list(shapes.extent)} contradicts the model's image_size {size} "
                         "(its position embeddings are fixed)", f"write image = [{size}, {size}, {size}] or leave it out")
        return shapes
    positions = getattr(config, "max_position_embeddings", None)
    usable = positions - RESERVED_POSITIONS.get(config.model_type, 0) if isinstance(positions, int) and positions > 0 else None
    if shapes.extent is None:
        if usable is None:
            raise _error(recipe, "shapes.sequence", "missing, and the model's config has no max_position_embeddings",
                         "add `sequence = [min, opt, max]` to [shapes]")
        return dataclasses.replace(shapes, extent=(1, min(DEFAULT_OPT_SEQUENCE, usable), usable))
    if usable is not None:
        if shapes.extent[2] > usable:
            raise _error(recipe, "shapes.sequence", f"max {shapes.extent[2]} is above the model's {usable} positions "
                         f"(max_position_embeddings = {positions})", f"use a max of at most {usable}")
    return shapes


def _largest(config: Any, keys: tuple[str, ...], default: int) -> int:
    """The first of `keys` the config has, as one number: per-stage lists (Swin's num_heads,
    ConvNeXt's hidden_sizes) count by their largest entry."""
    for key in keys:
        value = getattr(config, key, None)
        if isinstance(value, (list, tuple)):
            value = max((v for v in value if isinstance(v, (int, float))), default=None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return int(value)
    return default


def check_memory(recipe: Recipe, config: Any, shapes: Shapes) -> None:
    """Refuse validation shapes whose PyTorch FP32 forward would take more than a share of this
    machine's memory: a rough upper estimate of one layer's live activations."""
    from trtforge.stages.validate import validation_shapes

    hidden = _largest(config, ("hidden_size", "dim", "n_embd"), 768)
    heads = _largest(config, ("num_attention_heads", "n_heads", "num_heads"), 12)
    patch = _largest(config, ("patch_size",), 16)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for label, (batch, extent) in validation_shapes(shapes).items():
        tokens = (extent // patch) ** 2 + 1 if shapes.extent_name == "image" else extent
        needed = 4 * batch * tokens * (16 * hidden + 2 * heads * tokens)
        if needed > MEMORY_SHARE * total:
            key = "shapes.batch" if label == "max-batch" else f"shapes.{shapes.extent_name}"
            raise _error(recipe, key, f"validation at batch {batch} x {shapes.extent_name} {extent} needs about "
                         f"{needed / 2**30:.0f} GiB, above the limit of {MEMORY_SHARE * total / 2**30:.0f} GiB "
                         f"(half of this machine's memory)", "use a smaller max")
