"""The benchmark's table as plain text (the CLI), Markdown (the model card) and JSON."""

from __future__ import annotations

import json
import math
import os
import textwrap
from collections import OrderedDict
from pathlib import Path
from typing import Optional

import numpy as np

from .options import FAMILY_TITLES, SECTION_TITLES, SECTIONS
from .rows import METRICS


def _cell(rec: Optional[dict]) -> str:
    if rec is None or rec["mean"] is None:
        return "-"
    decimals = METRICS[rec["metric"]][1]
    text = f"{rec['mean']:.{decimals}f}" if math.isfinite(rec["mean"]) else str(rec["mean"])
    if rec["std"] is not None:
        text += f" ± {rec['std']:.{decimals}f}"
    return text


def section_tables(result: dict):
    """Per (family, section) present: (family, section, header, body rows of strings)."""
    rows = result["rows"]
    for family in OrderedDict.fromkeys(r["family"] for r in rows):
        for section in SECTIONS:
            recs = [r for r in rows if r["family"] == family and r["section"] == section]
            if not recs:
                continue
            metric_keys = sorted(OrderedDict.fromkeys(r["metric"] for r in recs), key=list(METRICS).index)
            keys = list(OrderedDict.fromkeys((r["condition"], r["method"]) for r in recs))
            conditions = list(OrderedDict.fromkeys(c for c, _ in keys))
            conditions.sort(key=lambda c: c.startswith("all "))  # pooled rows ("all volumes", ...) last
            keys.sort(key=lambda k: conditions.index(k[0]))  # stable: methods keep their order
            index = {(r["condition"], r["method"], r["metric"]): r for r in recs}
            header = ["condition", "method"] + [METRICS[m][0] for m in metric_keys] + ["n"]
            body = []
            for condition, method in keys:
                cells = [index.get((condition, method, m)) for m in metric_keys]
                n = max((c["n"] for c in cells if c is not None and c["metric"] != "seconds"), default=0)
                body.append([condition, method] + [_cell(c) for c in cells] + [str(n)])
            yield family, section, header, body


def _title(family: str, section: str) -> str:
    return f"{SECTION_TITLES[section]} ({FAMILY_TITLES[family]})"


def _intro(meta: dict) -> str:
    return (f"Model {meta['model']}; {meta['cases']} case(s) per section and family (synthesis: per region), "
            f"seeds from {meta['seed_start']}, "
            f"clinical grids (in-plane {meta['inplane_mm'][0]:g}-{meta['inplane_mm'][1]:g} mm, slices "
            f"{meta['slice_mm'][0]:g}-{meta['slice_mm'][1]:g} mm, oblique), field of view {meta['fov_mm']} mm "
            "(k, j, i). Mean ± sample std over cases. Synthetic phantoms: these numbers are not clinical results.")


def format_table(result: dict) -> str:
    """The plain-text table printed by the CLI."""
    lines = ["MedDiffFM benchmark", textwrap.fill(_intro(result["meta"]), 110)]
    captions = dict(result.get("captions", {}))
    for family, section, header, body in section_tables(result):
        widths = [max(len(h), *(len(r[c]) for r in body)) for c, h in enumerate(header)]
        lines += ["", f"== {_title(family, section)} =="]
        caption = captions.pop(section, None)  # once, at the section's first table
        if caption:
            lines.append(textwrap.fill(caption, 110))
        lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in body]
    if result.get("notes"):
        lines += ["", "Notes:"] + [f"  - {n}" for n in result["notes"]]
    return "\n".join(lines)


def format_markdown(result: dict) -> str:
    out = ["# MedDiffFM benchmark", "", _intro(result["meta"]), "", f"Command: `{result['meta']['command']}`"]
    captions = dict(result.get("captions", {}))
    for family, section, header, body in section_tables(result):
        out += ["", f"## {_title(family, section)}", ""]
        caption = captions.pop(section, None)
        if caption:
            out += [caption, ""]
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "|".join("---" for _ in header) + "|")
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in body]
    if result.get("notes"):
        out += ["", "## Notes", ""] + [f"- {n}" for n in result["notes"]]
    return "\n".join(out) + "\n"


def to_jsonable(obj):
    """NaN / inf -> None, numpy scalars -> Python, tuples -> lists (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write through a temporary file in the same folder: a failed write leaves no file."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.part")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)
    return p


def write_json(result: dict, path: str | os.PathLike) -> Path:
    return write_text_atomic(path, json.dumps(to_jsonable(result), indent=1, allow_nan=False) + "\n")
