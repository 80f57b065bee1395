"""What a stage may ask of the build that runs it: a small Protocol, so that stages depend on
these few names and not on the pipeline (pipeline.py imports the stages, never the reverse)."""

from __future__ import annotations

from typing import Any, Protocol

from trtforge.progress import Progress
from trtforge.recipe import Recipe
from trtforge.store import StageCache


class BuildContext(Protocol):
    recipe: Recipe  # with what the model's config filled in (preflight)
    cache: StageCache
    progress: Progress

    @property
    def keys(self) -> dict[str, str]: ...  # each stage's cache key

    @property
    def loaded(self) -> Any: ...  # the model, loaded once (models.LoadedModel)

    @property
    def reference(self) -> Any: ...  # PyTorch FP32 outputs at the validation shapes (validate.Reference)

    @property
    def reproduce(self) -> str: ...  # the command that rebuilds the artifact

    @property
    def source_as_written(self) -> str: ...  # the model source as the recipe names it

    def export_result(self) -> dict[str, Any]: ...  # the export stage's result (io, text, model facts)
