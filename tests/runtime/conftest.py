"""The runtime tests' shared artifact (a tiny BERT classifier with an onnxruntime-cpu engine) and
helpers."""

from __future__ import annotations

import pytest

from tests.conftest import tiny_recipe_text
from trtforge.pipeline import Build
from trtforge.recipe import load_recipe
from trtforge.runtime import WorkerDied


@pytest.fixture(scope="session")
def artifact(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rt")
    text = tiny_recipe_text("bert", extra="[engines]\nbackends = ['onnxruntime-cpu']\n")
    (tmp / "r.toml").write_text(text.replace('"feature-extraction"', '"sequence-classification"'))
    result = Build(load_recipe(tmp / "r.toml"), tmp / "out").run()
    assert result.passed
    return result.artifact


def outcomes(futures, timeout: float) -> list[str]:
    """Each future's outcome: "ok", or the message of the WorkerDied it raised (any other error fails
    the test). Messages, not the errors: their tracebacks would keep the futures, and the results
    in the runtime's shared memory, alive."""
    settled = []
    for future in futures:
        try:
            future.result(timeout=timeout)
            settled.append("ok")
        except WorkerDied as e:
            settled.append(str(e))
    return settled
