"""Rendering the report's tables: Markdown (with the runs left out and why), CSV, JSON, LaTeX."""
from __future__ import annotations

import csv
import io
import json
from typing import Optional

from .tables import MISSING, format_number, row_label


def _digits(key: str) -> Optional[int]:
    """Fixed decimals where the quantity has a customary precision."""
    if "bleu" in key or key.startswith("delta_") or key == "params_m":
        return 2
    if "ln_ppl" in key or key.startswith("p_"):
        return 3
    if key.startswith("ppl") or key.startswith("paper_ppl"):
        return 2
    return None


def _cell(key: str, v) -> str:
    if isinstance(v, tuple):
        mean, sd, n = v
        if mean is None:
            return MISSING
        d = _digits(key)
        return format_number(mean, d) + (f" ± {format_number(sd, d)}" if sd is not None else "")
    if key.startswith("delta_") and isinstance(v, float):
        return f"{v:+.2f}"
    if isinstance(v, float) and _digits(key) is not None:
        return format_number(v, _digits(key))
    if key == "variant":
        return row_label(v)
    if key == "window" and v == "":
        return MISSING
    return format_number(v)


def _plain(v):
    if isinstance(v, tuple):
        mean, sd, n = v
        return {"mean": mean, "sd": sd, "n": n}
    return v


def render_markdown(tables: list, excluded: list) -> str:
    out = []
    for t in tables:
        out.append(f"### {t.title}\n")
        out.append("| " + " | ".join(h for _, h in t.columns) + " |")
        out.append("|" + "---|" * len(t.columns))
        for r in t.rows:
            out.append("| " + " | ".join(_cell(k, r.get(k)) for k, _ in t.columns) + " |")
        out.append(f"\n*{t.caption}*\n")
    if excluded:
        out.append("### Runs not used\n")
        out += [f"- `{p}`: {why}" for p, why in excluded]
        out.append("")
    return "\n".join(out)


def render_csv(tables: list) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["table", "row", "column", "value", "sd", "n"])
    for t in tables:
        for r in t.rows:
            for k, _ in t.columns:
                if k == "variant":
                    continue
                v = r.get(k)
                if isinstance(v, tuple):
                    w.writerow([t.key, r["variant"], k, "" if v[0] is None else v[0], "" if v[1] is None else v[1], v[2]])
                else:
                    w.writerow([t.key, r["variant"], k, "" if v is None else v, "", ""])
    return buf.getvalue()


def render_json(tables: list, excluded: list) -> str:
    return json.dumps({"tables": [{"key": t.key, "title": t.title, "caption": t.caption,
                                   "columns": [{"key": k, "header": h} for k, h in t.columns],
                                   "rows": [{k: _plain(v) for k, v in r.items()} for r in t.rows]}
                                  for t in tables],
                       "excluded": [{"path": p, "reason": why} for p, why in excluded]}, indent=2, default=str)


def render_latex(tables: list) -> str:
    def esc(s: str) -> str:
        return (s.replace("\\", "\\textbackslash{}").replace("_", "\\_").replace("%", "\\%").replace("&", "\\&")
                .replace("#", "\\#").replace("±", "$\\pm$").replace("Δ", "$\\Delta$").replace("µ", "$\\mu$")
                .replace("×", "$\\times$").replace("–", "--"))
    out = []
    for t in tables:
        out.append("\\begin{table}[t]\\centering\\small")
        out.append("\\begin{tabular}{" + "l" + "r" * (len(t.columns) - 1) + "}\\toprule")
        out.append(" & ".join(esc(h) for _, h in t.columns) + " \\\\ \\midrule")
        for r in t.rows:
            out.append(" & ".join(esc(_cell(k, r.get(k))) for k, _ in t.columns) + " \\\\")
        out.append("\\bottomrule\\end{tabular}")
        out.append(f"\\caption{{{esc(t.caption)}}}\\end{{table}}\n")
    return "\n".join(out)

