"""Parity reports for people and CI: JSON, Markdown (a pull request or CI summary) and JUnit XML."""

from __future__ import annotations

import json
from typing import Any
from xml.etree import ElementTree as ET

from trtforge.compare import ParityResult

REPORT_FILES = ("reports/parity.json", "reports/parity.md", "reports/parity.junit.xml")


def parity_section(results: list[tuple[str, ParityResult]]) -> dict[str, Any]:
    """The manifest's `parity`: passed only when every checked result passed."""
    checked = [r for _, r in results if r.checked]
    return {
        "passed": bool(checked) and all(r.passed for r in checked),
        "results": [{"stage": stage, **result.as_dict()} for stage, result in results],
    }


def render_reports(name: str, parity: dict[str, Any], context: dict[str, Any]) -> dict[str, str]:
    return {
        REPORT_FILES[0]: json.dumps({"name": name, **context, "parity": parity}, indent=2, default=str) + "\n",
        REPORT_FILES[1]: markdown(name, parity, context),
        REPORT_FILES[2]: junit(name, parity),
    }


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.2e}"
    return str(value)


def markdown(name: str, parity: dict[str, Any], context: dict[str, Any]) -> str:
    verdict = "PASSED" if parity["passed"] else "FAILED"
    lines = [f"# Parity: {name} — {verdict}", ""]
    for key, value in context.items():
        lines.append(f"- **{key}**: {value}")
    lines.append("")
    for result in parity["results"]:
        status = ("pass" if result["passed"] else "FAIL") if result["checked"] else "not checked"
        lines += [f"## {result['stage']}: {result['candidate']} vs {result['reference']} — {status}", ""]
        if result.get("note"):
            lines += [result["note"], ""]
        if not result["outputs"]:
            continue
        lines += ["| output | shape | compared | max abs | max rel | mean abs | cosine | NaN/Inf | argmax | atol / rtol | verdict |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in result["outputs"]:
            verdict_cell = "pass" if row["passed"] else "FAIL: " + "; ".join(row["failures"])
            lines.append("| " + " | ".join([
                row["output"], row["shape_label"], "×".join(map(str, row["shape"])), _fmt(row["max_abs"]),
                _fmt(row["max_rel"]), _fmt(row["mean_abs"]), f"{row['cosine']:.6f}", str(row["nonfinite"]),
                _fmt(row["argmax_agreement"]), f"{row['atol']:g} / {row['rtol']:g}", verdict_cell]) + " |")
        lines.append("")
    lines.append("Tolerance: an element passes when within atol or rtol (Polygraphy, element-wise); per-token "
                 "outputs are compared at unpadded positions only.")
    return "\n".join(lines) + "\n"


def junit(name: str, parity: dict[str, Any]) -> str:
    suites = ET.Element("testsuites", name=f"trtforge parity: {name}")
    for result in parity["results"]:
        cases = result["outputs"] or [None]
        suite = ET.SubElement(suites, "testsuite", name=f"{result['stage']}: {result['candidate']}",
                              tests=str(len(cases)),
                              failures=str(sum(1 for r in result["outputs"] if not r["passed"])),
                              skipped="0" if result["checked"] else str(len(cases)))
        for row in cases:
            case_name = f"{row['output']}@{row['shape_label']}" if row else "engine"
            case = ET.SubElement(suite, "testcase", classname=f"{name}.{result['stage']}", name=case_name)
            if not result["checked"]:
                ET.SubElement(case, "skipped", message=result.get("note") or "not checked")
            elif row and not row["passed"]:
                failure = ET.SubElement(case, "failure", message="; ".join(row["failures"]))
                failure.text = json.dumps(row, default=str)
    ET.indent(suites)
    return ET.tostring(suites, encoding="unicode", xml_declaration=True) + "\n"
