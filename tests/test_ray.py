"""`trtforge run --ray local` on a real local Ray instance (127.0.0.1, 2 CPUs), against the
single-host `trtforge run` on the same input: same rows, ids, values and shards; a tampered
artifact is refused before any row. Each run is a process of its own, under a timeout, and stops
the Ray instance it started."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.test_run import minilm, table, texts, tiny_classifier, trtforge, vectors  # noqa: F401 (fixtures)

pytest.importorskip("ray", reason="needs the ray extra: pip install 'trtforge[ray]'")
RAY = ["--ray", "local", "--ray-cpus", "2", "--devices", "cpu"]


def parquet_input(path: Path, rows: list) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": [f"doc-{i}" for i in range(len(rows))], "text": rows}), path, row_group_size=300)
    return path


def test_the_ray_pipeline_writes_what_the_single_host_run_writes(minilm, tmp_path):  # noqa: F811
    rows = texts(1500, seed=3)
    rows[7], rows[1100] = "", None  # bad rows: left out and listed by both paths alike
    source = parquet_input(tmp_path / "in.parquet", rows)
    common = [str(minilm), str(source), "--id-column", "id", "--on-bad-row", "skip", "--shard-rows", "512", "-q"]
    single = trtforge("run", *common, "--out", str(tmp_path / "single"), "--devices", "cpu", timeout=300)
    assert single.returncode == 0, single.stderr
    ray = trtforge("run", *common, "--out", str(tmp_path / "ray"), *RAY, timeout=400)
    assert ray.returncode == 0, ray.stderr[-3000:]
    a, b = table(tmp_path / "single"), table(tmp_path / "ray")
    assert b.num_rows == a.num_rows == 1498
    assert b.column("row").to_pylist() == a.column("row").to_pylist()  # input order, every row once
    assert b.column("id").to_pylist() == a.column("id").to_pylist()
    np.testing.assert_allclose(vectors(b.column("embedding")), vectors(a.column("embedding")), atol=1e-6)
    record = {name: json.loads((tmp_path / name / "_run.json").read_text()) for name in ("single", "ray")}
    assert [s["rows"] for s in record["ray"]["shards"]] == [512, 512, 476]
    assert [b["row"] for s in record["ray"]["shards"] for b in s["bad_rows"]] == [7, 1100]
    assert [s["tokens"] for s in record["ray"]["shards"]] == [s["tokens"] for s in record["single"]["shards"]]
    assert record["ray"]["summary"]["devices"] == "ray:local"
    assert record["ray"]["complete"] and record["single"]["complete"]


def test_a_tampered_artifact_is_refused_by_the_ray_run_before_any_row(minilm, tmp_path):  # noqa: F811
    artifact = tmp_path / "minilm"
    shutil.copytree(minilm, artifact)
    engine = next(p for p in artifact.rglob("*.onnx") if p.is_file())
    engine.write_bytes(engine.read_bytes()[:-8] + b"tampered")
    source = parquet_input(tmp_path / "in.parquet", texts(50, seed=4))
    result = trtforge("run", str(artifact), str(source), "--out", str(tmp_path / "out"), *RAY, timeout=400)
    assert result.returncode != 0
    assert "sha256" in result.stderr or "does not match" in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "out").exists()  # nothing half-written left behind


def test_a_classifier_through_ray_gives_the_single_host_labels(tiny_classifier, tmp_path):  # noqa: F811
    rows = texts(900, seed=5)
    source = parquet_input(tmp_path / "in.parquet", rows)
    common = [str(tiny_classifier), str(source), "--shard-rows", "400", "-q"]
    single = trtforge("run", *common, "--out", str(tmp_path / "single"), "--devices", "cpu", timeout=300)
    assert single.returncode == 0, single.stderr
    ray = trtforge("run", *common, "--out", str(tmp_path / "ray"), *RAY, "--cpu-workers", "2", timeout=400)
    assert ray.returncode == 0, ray.stderr[-3000:]
    a, b = table(tmp_path / "single"), table(tmp_path / "ray")
    assert b.column("row").to_pylist() == a.column("row").to_pylist() == list(range(900))
    assert b.column("label").to_pylist() == a.column("label").to_pylist()
    np.testing.assert_allclose(vectors(b.column("logits")), vectors(a.column("logits")), atol=1e-5)
    np.testing.assert_allclose(b.column("score").to_numpy(), a.column("score").to_numpy(), atol=1e-6)


def _written(out: Path) -> int:
    try:
        return len(json.loads((out / "_run.json").read_text())["shards"])
    except (OSError, ValueError, KeyError):
        return 0


def _actors(driver: int, name: str) -> list[int]:
    """The pids under `driver` (the run, which started the Ray instance) of its actors of class
    `name` (Ray titles an actor's process ray::...NAME...), from /proc."""
    parents, titles = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            titles[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            pass

    def under(pid: int) -> bool:
        while pid > 1:
            pid = parents.get(pid, 0)
            if pid == driver:
                return True
        return False

    return [pid for pid, title in titles.items() if name in title and under(pid)]


def test_an_inference_actor_killed_mid_job_is_restarted_and_every_row_is_written_once(minilm, tmp_path):  # noqa: F811
    import os
    import signal
    import subprocess
    import sys
    import time

    rows = texts(3000, seed=6)
    source = parquet_input(tmp_path / "in.parquet", rows)
    out = tmp_path / "ray"
    command = [sys.executable, "-m", "trtforge", "run", str(minilm), str(source), "--out", str(out),
               "--shard-rows", "250", "-q", *RAY, "--cpu-workers", "2"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = None
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None and killed is None:
            written = _written(out)
            actors = _actors(process.pid, "TrtforgeModel")
            if written >= 1 and actors:  # mid-job: some shards written, the actors at work
                killed = actors[0]
                os.kill(killed, signal.SIGKILL)
            time.sleep(0.2)
        _, stderr = process.communicate(timeout=400)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
    assert killed is not None, "the job ended before an actor could be killed mid-way; give it more rows"
    assert process.returncode == 0, stderr[-3000:]
    record = json.loads((out / "_run.json").read_text())
    assert len(record["shards"]) == 12 and record["complete"]
    got = table(out)
    assert got.column("row").to_pylist() == list(range(3000))  # every row, once, in order
    single = trtforge("run", str(minilm), str(source), "--out", str(tmp_path / "single"), "--devices", "cpu",
                      "--shard-rows", "250", "-q", timeout=300)
    assert single.returncode == 0, single.stderr
    np.testing.assert_allclose(vectors(got.column("embedding")), vectors(table(tmp_path / "single").column("embedding")),
                               atol=1e-6)


def test_an_interrupted_ray_run_resumes_keeping_its_shards_to_the_single_host_output(minilm, tmp_path):  # noqa: F811
    import os
    import signal
    import subprocess
    import sys
    import time

    source = parquet_input(tmp_path / "in.parquet", texts(2000, seed=7))
    out = tmp_path / "ray"
    args = [str(minilm), str(source), "--out", str(out), "--shard-rows", "200", *RAY]
    process = subprocess.Popen([sys.executable, "-m", "trtforge", "run", *args], start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None and _written(out) < 1:
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C: the run and the Ray instance it started
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
    assert process.returncode == 130, stderr[-3000:]
    kept = json.loads((out / "_run.json").read_text())["shards"]
    # Shards come back one block at a time: Ctrl-C after the first keeps a few. A pipeline whose blocks
    # are larger than a shard (4,096 rows here, before) returns the whole job at once and keeps most.
    assert 1 <= len(kept) <= 5
    resumed = trtforge("run", *args, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming: {len(kept)} shard(s)" in resumed.stderr
    record = json.loads((out / "_run.json").read_text())
    assert record["shards"][:len(kept)] == kept  # the shards written before are kept, not rewritten
    single = trtforge("run", str(minilm), str(source), "--out", str(tmp_path / "single"), "--devices", "cpu",
                      "--shard-rows", "200", "-q", timeout=300)
    assert single.returncode == 0, single.stderr
    a, b = table(tmp_path / "single"), table(out)
    assert b.column("row").to_pylist() == list(range(2000))
    np.testing.assert_allclose(vectors(b.column("embedding")), vectors(a.column("embedding")), atol=1e-6)


def test_a_resumed_ray_job_does_not_read_again_the_parquet_files_it_wrote_every_row_of(tmp_path):
    from trtforge.job.inputs import Source
    from trtforge.job.raydata import unread

    folder = tmp_path / "in"
    folder.mkdir()
    for name, rows in (("a", 300), ("b", 0), ("c", 300), ("d", 400)):
        parquet_input(folder / f"{name}.parquet", texts(rows, seed=1) if rows else [])
    source = Source.open(folder, max_chars=1000)
    a, b, c, d = source.files
    assert unread(source, 0) == ([a, b, c, d], 0)
    assert unread(source, 299) == ([a, b, c, d], 0)  # a file partly written is read again, its rows counted off
    assert unread(source, 300) == ([c, d], 300)  # the empty file goes with the written one before it
    assert unread(source, 600) == ([d], 600)
    assert unread(source, 1000) == ([], 1000)

    (tmp_path / "t.txt").write_text("one\ntwo\n")
    text = Source.open(tmp_path / "t.txt", max_chars=1000)
    assert unread(text, 1) == (text.files, 0)  # lines are counted only by reading them


def test_every_actor_refuses_a_tampered_artifact_in_its_constructor(minilm, tmp_path):  # noqa: F811
    """Model (the inference actor, also users' map_batches class) and Tokenize load the artifact
    through the checked loader: a changed engine or tokenizer is refused before any row, on every
    actor and every restart, whoever built the pipeline (not only `trtforge run --ray`'s driver)."""
    from trtforge.job.raydata import Model, Tokenize

    engine_copy, tokenizer_copy = tmp_path / "engine", tmp_path / "tokenizer"
    for copy in (engine_copy, tokenizer_copy):
        shutil.copytree(minilm, copy)
    engine = next(p for p in engine_copy.rglob("*.onnx") if p.is_file())
    engine.write_bytes(engine.read_bytes()[:-8] + b"tampered")
    vocab = next(tokenizer_copy.rglob("tokenizer.json"))
    vocab.write_text(vocab.read_text().replace('"[UNK]"', '"[UNKNOWN]"', 1))
    with pytest.raises(Exception, match="sha256|does not match"):
        Model(str(engine_copy))
    with pytest.raises(Exception, match="sha256|does not match"):
        Tokenize(str(tokenizer_copy))
    with pytest.raises(Exception, match="sha256|does not match"):
        Model(str(tokenizer_copy))


USER_PIPELINE = """
import sys
import numpy as np
import ray
from trtforge.job.raydata import Model

if __name__ == "__main__":
    artifact, source, out = sys.argv[1:4]
    ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", num_cpus=2, log_to_driver=False)
    try:
        # the example of docs/run.md, with CPU actors for this machine
        ds = ray.data.read_parquet(source)
        ds.map_batches(Model, fn_constructor_kwargs={"artifact": artifact, "keep": ["id"]}, batch_size=512,
                       num_cpus=0.5, compute=ray.data.ActorPoolStrategy(size=2)).write_parquet(out)
        rows = ray.data.read_parquet(out).take_all()
        np.savez(out + ".npz", id=np.array([r["id"] for r in rows]), embedding=np.stack([r["embedding"] for r in rows]))
    finally:
        ray.shutdown()
"""


def test_model_in_a_users_own_pipeline_writes_the_single_host_embeddings(minilm, tmp_path):  # noqa: F811
    """The documented `Model` example (map_batches on a Parquet dataset, write_parquet from the
    actors): every row once, with the id it was given and the single-host run's embedding."""
    import subprocess
    import sys

    rows = texts(1200, seed=5)
    source = parquet_input(tmp_path / "in.parquet", rows)
    single = trtforge("run", str(minilm), str(source), "--id-column", "id", "--devices", "cpu", "-q",
                      "--out", str(tmp_path / "single"), timeout=300)
    assert single.returncode == 0, single.stderr
    script = tmp_path / "pipeline.py"
    script.write_text(USER_PIPELINE)
    out = tmp_path / "users"
    done = subprocess.run([sys.executable, str(script), str(minilm), str(source), str(out)], capture_output=True,
                          text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    got = np.load(f"{out}.npz")
    expected = table(tmp_path / "single")
    ids = expected.column("id").to_pylist()
    assert len(ids) == 1200 and sorted(got["id"].tolist()) == sorted(ids)  # every row once
    place = {name: i for i, name in enumerate(got["id"].tolist())}
    np.testing.assert_allclose(got["embedding"][[place[name] for name in ids]], vectors(expected.column("embedding")),
                               atol=1e-6)


def test_model_names_a_kept_column_the_dataset_lacks(minilm):  # noqa: F811
    from trtforge.job.raydata import Model

    model = Model(str(minilm), keep=["doc_id"])
    try:
        batch = {"text": np.array(["a sentence", "another one"], dtype=object), "id": np.array(["a", "b"], dtype=object)}
        with pytest.raises(ValueError, match=r"keep=\['doc_id'\].*has \['id', 'text'\]"):
            model(batch)
        model.keep = ("id",)
        out = model(batch)
        assert out["id"].tolist() == ["a", "b"] and out["embedding"].shape == (2, 384)
    finally:
        model.runtime.close()


def test_model_reads_token_blocks_of_several_widths_as_ray_joins_them(minilm):  # noqa: F811
    """Tokenize pads each block to its own longest row; where a user's pipeline gives Model a batch
    larger than Tokenize's, Ray joins blocks of different widths into a column of rows (an object
    array, as Ray Data 2.60 does: checked by hand). Model reads both forms to the same embeddings as
    from the texts themselves."""
    from trtforge.job.raydata import IDS, Model, Tokenize

    short, long = texts(6, seed=8), [t * 4 for t in texts(5, seed=9)]
    tokenize, model = Tokenize(str(minilm)), Model(str(minilm))
    try:
        blocks = [tokenize({"text": np.array(part, dtype=object)}) for part in (short, long)]
        assert blocks[0][IDS].shape[1] != blocks[1][IDS].shape[1]
        joined = {name: np.concatenate([b[name] for b in blocks]) for name in blocks[0] if name != IDS}
        joined[IDS] = np.empty(len(short) + len(long), dtype=object)
        joined[IDS][:] = [row for b in blocks for row in b[IDS]]
        from_texts = model({"text": np.array(short + long, dtype=object)})["embedding"]
        np.testing.assert_allclose(model(joined)["embedding"], from_texts, atol=1e-6)
        np.testing.assert_allclose(np.concatenate([model(b)["embedding"] for b in blocks]), from_texts, atol=1e-6)
    finally:
        model.runtime.close()
