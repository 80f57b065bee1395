"""Parity: run a reference and candidates on the same inputs through Polygraphy's Comparator, gate each
output with the tolerance policy, and keep the metrics a reader needs to judge the gap.

The gate for one output at one shape passes when Polygraphy's element-wise check passes (every
element within atol or rtol), nothing is NaN/Inf where the reference is finite, the cosine similarity
reaches `min_cosine`, and, for logits, the argmax agrees on at least `min_argmax_agreement` of rows.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from trtforge.recipe import Tolerance

Feed = dict[str, np.ndarray]
InferFn = Callable[[Feed], Mapping[str, np.ndarray]]


@dataclass(frozen=True)
class OutputParity:
    output: str
    shape_label: str  # min, opt or max
    shape: tuple[int, ...]
    atol: float
    rtol: float
    max_abs: float
    max_rel: float
    mean_abs: float
    cosine: float
    nonfinite: int
    reference_nonfinite: int
    argmax_agreement: float | None
    failures: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.failures


@dataclass(frozen=True)
class ParityResult:
    """One candidate against one reference, every output at every shape."""

    candidate: str
    reference: str
    outputs: tuple[OutputParity, ...]
    checked: bool = True
    note: str = ""
    timings_ms: dict[str, float] = field(default_factory=dict)
    error: str = ""

    @property
    def passed(self) -> bool:
        return self.checked and not self.error and all(o.passed for o in self.outputs)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["passed"] = self.passed
        for out, row in zip(self.outputs, data["outputs"]):
            row["passed"] = out.passed
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ParityResult:
        rows = tuple(OutputParity(**{k: (tuple(v) if k in ("shape", "failures") else v)
                                     for k, v in row.items() if k != "passed"}) for row in data["outputs"])
        return cls(candidate=data["candidate"], reference=data["reference"], outputs=rows,
                   checked=data.get("checked", True), note=data.get("note", ""),
                   timings_ms=data.get("timings_ms", {}), error=data.get("error", ""))


def function_runner(name: str, fn: InferFn, inputs: Mapping[str, tuple[str, tuple[int | None, ...]]]) -> Any:
    """A Polygraphy runner around any feed -> outputs function (PyTorch, an engine backend).

    `inputs` maps each input name to its numpy dtype name and shape (None for dynamic axes).
    """
    from polygraphy.backend.base import BaseRunner
    from polygraphy.common import TensorMetadata

    class FunctionRunner(BaseRunner):
        def __init__(self) -> None:
            super().__init__(name=name, prefix="trtforge")

        def get_input_metadata_impl(self) -> TensorMetadata:
            meta = TensorMetadata()
            for input_name, (dtype, shape) in inputs.items():
                meta.add(input_name, np.dtype(dtype), shape)
            return meta

        def infer_impl(self, feed_dict: Feed) -> OrderedDict[str, np.ndarray]:
            start = time.perf_counter()
            outputs = OrderedDict((k, np.asarray(v)) for k, v in fn(dict(feed_dict)).items())
            self.inference_time = time.perf_counter() - start
            return outputs

    return FunctionRunner()


def compare(reference: Any, candidates: list[Any], feeds: dict[str, Feed], *, tolerance: Tolerance,
            logits: tuple[str, ...] = (), padded_outputs: tuple[str, ...] = ()) -> list[ParityResult]:
    """Run every runner on every feed (one feed per shape label) and gate each candidate's outputs.

    `padded_outputs` have a sequence axis: they are compared at the positions the feed's attention_mask
    marks valid. Padded positions hold values no consumer reads, and FP16 error there is several times
    larger than at real tokens (PyTorch's own FP16 shows the same), so gating on them would only
    measure noise.
    """
    from polygraphy.comparator import Comparator
    from polygraphy.comparator.compare import SimpleCompareFunc
    from polygraphy.logger import G_LOGGER

    labels = list(feeds)
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
        run_results = Comparator.run([reference, *candidates], data_loader=[feeds[k] for k in labels])
        for _, iterations in run_results:
            for label, iteration in zip(labels, iterations):
                valid = feeds[label].get("attention_mask")
                for name in padded_outputs if valid is not None else ():
                    iteration[name] = iteration[name][valid.astype(bool)]
        names = sorted({n for _, its in run_results for it in its for n in it})
        compare_func = SimpleCompareFunc(
            atol={"": tolerance.atol, **{n: tolerance.for_output(n)[0] for n in names}},
            rtol={"": tolerance.rtol, **{n: tolerance.for_output(n)[1] for n in names}},
            check_error_stat="elemwise", infinities_compare_equal=False)
        accuracy = Comparator.compare_accuracy(run_results, compare_func=compare_func,
                                               comparisons=[(0, i + 1) for i in range(len(candidates))])

    reference_iterations = run_results[reference.name]
    results = []
    for candidate in candidates:
        per_iteration = accuracy[0][(reference.name, candidate.name)]  # one AccuracyResult per compare func
        rows = []
        for label, ref_it, cand_it, verdicts in zip(labels, reference_iterations, run_results[candidate.name],
                                                    per_iteration):
            for output in ref_it:
                atol, rtol = tolerance.for_output(output)
                rows.append(output_parity(output, label, cand_it[output], ref_it[output], atol=atol, rtol=rtol,
                                          within_tolerance=bool(verdicts[output]), tolerance=tolerance,
                                          is_logits=output in logits))
        timings = {label: 1e3 * it.runtime for label, it in zip(labels, run_results[candidate.name])}
        results.append(ParityResult(candidate=candidate.name, reference=reference.name, outputs=tuple(rows),
                                    timings_ms=timings))
    return results


def output_parity(output: str, label: str, candidate: np.ndarray, reference: np.ndarray, *, atol: float,
                  rtol: float, within_tolerance: bool, tolerance: Tolerance, is_logits: bool) -> OutputParity:
    cand = candidate.astype(np.float64)
    ref = reference.astype(np.float64)
    failures = []
    if cand.shape != ref.shape:
        return OutputParity(output, label, tuple(ref.shape), atol, rtol, *(float("nan"),) * 4, -1, -1, None,
                            (f"shape {cand.shape} != reference {ref.shape}",))
    nonfinite = int((~np.isfinite(cand)).sum())
    ref_nonfinite = int((~np.isfinite(ref)).sum())
    diff = np.abs(cand - ref)
    max_abs = float(np.nanmax(diff)) if diff.size else 0.0
    # Relative to |reference|, floored at atol: near-zero references would make it meaningless.
    rel = diff / np.maximum(np.abs(ref), max(atol, np.finfo(np.float32).tiny))
    max_rel = float(np.nanmax(rel)) if rel.size else 0.0
    mean_abs = float(np.nanmean(diff)) if diff.size else 0.0
    cosine = _cosine(cand, ref)
    agreement = None
    if is_logits and ref.ndim >= 2:
        agreement = float((cand.argmax(-1) == ref.argmax(-1)).mean())

    if nonfinite > ref_nonfinite:
        failures.append(f"{nonfinite} NaN/Inf values (reference has {ref_nonfinite})")
    if not within_tolerance:
        failures.append(f"max abs error {max_abs:.3g} exceeds atol {atol:g} where rel error exceeds rtol {rtol:g}")
    if not cosine >= tolerance.min_cosine:
        failures.append(f"cosine similarity {cosine:.6f} below {tolerance.min_cosine}")
    if agreement is not None and agreement < tolerance.min_argmax_agreement:
        failures.append(f"argmax agreement {agreement:.3f} below {tolerance.min_argmax_agreement}")
    return OutputParity(output, label, tuple(ref.shape), atol, rtol, max_abs, max_rel, mean_abs, cosine,
                        nonfinite, ref_nonfinite, agreement, tuple(failures))


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel(), b.ravel()
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("nan")
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    return float(np.dot(a, b) / (na * nb))
