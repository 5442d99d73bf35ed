"""Writing a run's results: ``report.md``, ``report.html`` (self-contained, plots embedded as
base64 PNGs), one PNG per figure, and ``results.json``."""

from __future__ import annotations

import base64
import html
import json
import math
import os
from collections.abc import Sequence
from typing import Any

from .result import ClaimResult

__all__ = ["sources_table", "verdict_table", "write_report"]

_BADGE = {"supported": "#2e7d32", "not supported": "#c62828", "inconclusive": "#ef6c00",
          "unavailable": "#616161"}


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)  # JSON has no inf/nan
    if hasattr(obj, "item"):  # numpy / torch scalars
        return _jsonable(obj.item())
    return obj


def verdict_table(results: Sequence[ClaimResult]) -> list[list[str]]:
    """Claim, verdict (with its lean), every check's interval against its threshold."""
    rows = [["claim", "verdict", "interval over seeds vs threshold"]]
    rows += [[r.title, r.shown_verdict, r.reason] for r in results]
    return rows


def sources_table(results: Sequence[ClaimResult]) -> list[list[str]]:
    """Claim, what the source reported (with its reference), and how ours compares."""
    rows = [["claim", "the source reported", "ours against it"]]
    rows += [[r.title, f"{r.source.get('reference', '')}: {r.source.get('reported', '')}",
              r.agreement] for r in results if r.source]
    return rows


def _md_table(rows: list[list[str]]) -> str:
    if not rows:
        return ""
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows[1:]]
    return "\n".join(out) + "\n"


def _html_table(rows: list[list[str]]) -> str:
    if not rows:
        return ""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                   for row in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_report(results: Sequence[ClaimResult], out: str,
                 header: dict[str, Any]) -> dict[str, str]:
    """Write every output file into ``out``; returns ``{kind: path}``."""
    os.makedirs(out, exist_ok=True)
    for r in results:
        for name, png in r.figures.items():
            with open(os.path.join(out, f"{name}.png"), "wb") as fh:
                fh.write(png)
    paths = {"json": os.path.join(out, "results.json"), "md": os.path.join(out, "report.md"),
             "html": os.path.join(out, "report.html")}
    with open(paths["json"], "w") as fh:
        json.dump(_jsonable({"run": header, "claims": [r.to_json() for r in results]}), fh,
                  indent=1)
        fh.write("\n")
    with open(paths["md"], "w") as fh:
        fh.write(_markdown(results, header))
    with open(paths["html"], "w") as fh:
        fh.write(_html(results, header))
    return paths


def _run_line(header: dict[str, Any]) -> str:
    return (f"Command: `{header['command']}` · data: {header['data']} · size: {header['size']} · "
            f"first seed: {header.get('base_seed', 0)} · "
            f"torch {header['torch']} · batchnorm {header['batchnorm']} · machine: "
            f"{header['machine']} · total {header['seconds']:.0f} s")


def _markdown(results: Sequence[ClaimResult], header: dict[str, Any]) -> str:
    parts = ["# Batch normalization: the claims, measured\n", _run_line(header) + "\n",
             _RULE + "\n", "## Verdicts\n", _md_table(verdict_table(results)),
             "## The sources' figures beside ours\n", _md_table(sources_table(results))]
    for r in results:
        parts += [f"## {r.title} — **{r.shown_verdict}**\n", f"*Claim.* {r.claim}\n",
                  f"*Setup.* {r.setup}\n", f"*Criterion.* {r.criterion}\n",
                  f"*Measured.* {r.reason} ({r.seconds:.1f} s)\n", _md_table(r.table)]
        if r.detail:
            parts.append(_md_table(r.detail))
        if r.source:
            parts += [f"*Source.* {r.source['reference']}: {r.source['reported']} "
                      f"({r.source['url'] or 'no page'})\n", f"*Ours against it.* {r.agreement}\n"]
        parts += [f"![{name}]({name}.png)\n" for name in r.figures]
    return "\n".join(parts)


_RULE = ("Every verdict comes from an interval over seeds: the smallest to the largest per-seed "
         "value (with fewer than 10 seeds; from 10 on, a 90% bootstrap interval of the median). "
         "*Supported* means the whole interval clears the claim's threshold, *not supported* that "
         "none of it does, *inconclusive* that it straddles the threshold; the word in brackets "
         "is the side the median over seeds falls on. A claim of several checks is supported "
         "when all are, not supported when none is.")

_CSS = ("body{font-family:sans-serif;max-width:960px;margin:2em auto;line-height:1.4}"
        "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px}"
        ".v{color:#fff;padding:2px 8px;border-radius:4px}img{max-width:100%}")


def _lean(r: ClaimResult) -> str:
    return f"(leans {html.escape(r.lean)})" if r.verdict == "inconclusive" else ""


def _html(results: Sequence[ClaimResult], header: dict[str, Any]) -> str:
    def badge(v: str) -> str:
        return f'<span class="v" style="background:{_BADGE.get(v, "#000")}">{html.escape(v)}</span>'

    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'>",
             "<title>Batch normalization: the claims, measured</title>",
             f"<style>{_CSS}</style></head><body>",
             "<h1>Batch normalization: the claims, measured</h1>",
             f"<p>{html.escape(_run_line(header))}</p>",
             f"<p>{html.escape(_RULE.replace('*', ''))}</p><h2>Verdicts</h2>"]
    rows = "".join(f"<tr><td><a href='#{r.name}'>{html.escape(r.title)}</a></td>"
                   f"<td>{badge(r.verdict)} {_lean(r)}</td><td>{html.escape(r.reason)}</td></tr>"
                   for r in results)
    parts.append("<table><tr><th>claim</th><th>verdict</th><th>interval over seeds vs "
                 f"threshold</th></tr>{rows}</table>")
    parts += ["<h2>The sources' figures beside ours</h2>", _html_table(sources_table(results))]
    for r in results:
        parts += [f"<h2 id='{r.name}'>{html.escape(r.title)} {badge(r.verdict)} {_lean(r)}</h2>",
                  f"<p><b>Claim.</b> {html.escape(r.claim)}</p>",
                  f"<p><b>Setup.</b> {html.escape(r.setup)}</p>",
                  f"<p><b>Criterion.</b> {html.escape(r.criterion)}</p>",
                  f"<p><b>Measured.</b> {html.escape(r.reason)} ({r.seconds:.1f} s)</p>",
                  _html_table(r.table), _html_table(r.detail)]
        if r.source:
            parts += [f"<p><b>Source.</b> {html.escape(r.source['reference'])}: "
                      f"{html.escape(r.source['reported'])} "
                      f"({html.escape(r.source['url'] or 'no page')})</p>",
                      f"<p><b>Ours against it.</b> {html.escape(r.agreement)}</p>"]
        for name, png in r.figures.items():
            data = base64.b64encode(png).decode("ascii")
            parts.append(f"<p><img alt='{name}' src='data:image/png;base64,{data}'></p>")
    parts.append("</body></html>\n")
    return "\n".join(parts)
