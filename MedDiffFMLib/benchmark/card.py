"""The model card's and the README's measured sections, written from benchmark results.

``python -m MedDiffFMLib.benchmark.card RESULTS.json [RESULTS.json ...]`` merges the results
of one or more benchmark runs (sections may be run in separate processes), judges each target
of the demo weights on the held-out family, and rewrites the text between the markers

* ``<!-- weights:begin -->`` / ``<!-- weights:end -->`` (model card: ids, versions, sizes, sha256),
* ``<!-- results:begin -->`` / ``<!-- results:end -->`` (model card: targets and every table),
* ``<!-- headline:begin -->`` / ``<!-- headline:end -->`` (README: one line per task).

``scripts/model_card.sh`` runs the benchmark and then this, so the numbers in both files come
from one run of one command; nothing in them is typed by hand.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from .options import PARABOLIC, SECTION_TITLES, SLAB_TV, UNPHASED_SYNTHESIS
from .report import format_markdown, write_text_atomic
from .rows import find_row

FAMILY = "heldout"  # the targets are judged on data the weights never saw
MIN_CASES = 5
SYNTHESIS_GROUPS = ("bone", "lung", "liver", "kidney", "spleen", "muscle")


@dataclass
class Verdict:
    """One target: what it asks, what was measured, and whether that meets it (None: not measured)."""

    section: str
    target: str
    measured: str
    met: Optional[bool]

    @property
    def label(self) -> str:
        return {True: "met", False: "missed", None: "not measured"}[self.met]


# ---------------------------------------------------------------- merging runs
def merge_results(results: Sequence[dict]) -> dict:
    """One result from several runs of the same model (rows, captions, notes and commands joined).
    The same model is the same weights (``model_sha256``), wherever the runs found them; results
    without the checksum compare the model's path.

    Raises:
        ValueError: the runs measured different models, or the same row twice.
    """
    if not results:
        raise ValueError("no benchmark results to merge")
    models = {r["meta"].get("model_sha256") or r["meta"]["model"] for r in results}
    if len(models) > 1:
        raise ValueError(f"the results come from different models: {sorted(models)}")
    seen, rows = set(), []
    for r in results:
        for row in r["rows"]:
            key = (row["family"], row["section"], row["condition"], row["method"], row["metric"])
            if key in seen:
                raise ValueError(f"the same row is in two results: {key}")
            seen.add(key)
            rows.append(row)
    # the held-out run's settings head the card: the targets are judged on its cases
    main = next((r for r in results if FAMILY in r["meta"].get("families", [FAMILY])), results[0])
    meta = dict(main["meta"])
    meta["command"] = " ; ".join(r["meta"]["command"] for r in results)
    counts = sorted({int(r["meta"]["cases"]) for r in results if FAMILY in r["meta"].get("families", [FAMILY])})
    if len(counts) > 1:  # sections run with different numbers of cases
        meta["cases"] = f"{counts[0]}-{counts[-1]}"
    captions = {}
    for r in results:
        captions.update(r.get("captions", {}))
    return {"meta": meta, "rows": rows, "captions": captions,
            "notes": [n for r in results for n in r.get("notes", [])]}


# ---------------------------------------------------------------- the targets
def _mean(result, section, condition, method, metric) -> Optional[float]:
    row = find_row(result, FAMILY, section, condition, method, metric)
    return None if row is None or row["mean"] is None else float(row["mean"])


def _n(result, section, condition, method, metric) -> int:
    row = find_row(result, FAMILY, section, condition, method, metric)
    return 0 if row is None else int(row["n"] or 0)


def _conditions(result, section: str, suffix: str) -> list[str]:
    out = []
    for r in result["rows"]:
        if r["family"] == FAMILY and r["section"] == section and r["condition"].endswith(suffix) \
                and r["condition"] not in out:
            out.append(r["condition"])
    return out


def _fmt(v: Optional[float], decimals: int = 2) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:.{decimals}f}"


def _fmt_against(v: Optional[float], meets: Callable[[float], bool], decimals: int = 3) -> str:
    """``v`` with as many decimals as it takes (up to 6) for the printed number to meet the
    target exactly when ``v`` does: a missed 0.8996 against ">= 0.9" reads 0.8996, not 0.900.
    Every number a target judges is printed this way."""
    if v is None or not math.isfinite(v):
        return "-"
    while decimals < 6 and meets(float(f"{v:.{decimals}f}")) != meets(v):
        decimals += 1
    return f"{v:.{decimals}f}"


def _all(flags: Sequence[Optional[bool]]) -> Optional[bool]:
    if not flags or any(f is None for f in flags):
        return None
    return all(flags)


def _cases_note(n: int) -> str:
    return "" if n >= MIN_CASES else f" (n = {n} < {MIN_CASES})"


def _denoise(result) -> list[Verdict]:
    levels = _conditions(result, "denoise", " HU noise")
    model = "model (DiffPIR)"
    out = []
    for other, margin, what in (("non-local means, estimated sigma", 0.0, "non-local means with sigma estimated"),
                                ("Gaussian (tuned sigma)", 1.0, "the tuned Gaussian + 1 dB")):
        parts, flags, n = [], [], MIN_CASES
        ok = lambda gap, margin=margin: gap >= margin  # noqa: E731
        for c in levels:
            m, o = _mean(result, "denoise", c, model, "psnr_db"), _mean(result, "denoise", c, other, "psnr_db")
            n = min(n, _n(result, "denoise", c, model, "psnr_db"))
            gap = None if m is None or o is None else m - o
            parts.append(f"{c.split()[0]} HU: {_fmt(m)} vs {_fmt(o)} dB ({_fmt_against(gap, ok, 2)})")
            flags.append(None if gap is None else ok(gap))
        out.append(Verdict("denoise", f"PSNR >= {what}", "; ".join(parts) + _cases_note(n), _all(flags)))
    parts, flags = [], []
    sharp = lambda e: abs(e - 1.0) <= 0.15  # noqa: E731
    for c in levels:
        e = _mean(result, "denoise", c, model, "edge_ratio")
        parts.append(f"{c.split()[0]} HU: {_fmt_against(e, sharp)}")
        flags.append(None if e is None else sharp(e))
    out.append(Verdict("denoise", "edge sharpness within 15% of the truth", "; ".join(parts), _all(flags)))
    change = _mean(result, "denoise", "noise-free input", model, "rms_change_hu")
    unchanged = lambda c: c <= 1.0  # noqa: E731
    out.append(Verdict("denoise", "a noise-free image comes back unchanged (<= 1 HU RMS)",
                       f"{_fmt_against(change, unchanged, 2)} HU RMS", None if change is None else unchanged(change)))
    return out


def _superres(result) -> list[Verdict]:
    model = "model (ControlNet)"
    parts, flags, slab, slab_flags, n = [], [], [], [], MIN_CASES
    gain_ok, exact = (lambda gap: gap >= 1.0), (lambda err: err <= 0.5)
    for c in _conditions(result, "superres", ")"):
        m, cubic = _mean(result, "superres", c, model, "psnr_db"), _mean(result, "superres", c, "cubic interpolation",
                                                                          "psnr_db")
        n = min(n, _n(result, "superres", c, model, "psnr_db"))
        factor = c.split()[0]
        gap = None if m is None or cubic is None else m - cubic
        parabolic = _mean(result, "superres", c, PARABOLIC, "psnr_db")
        tv = _mean(result, "superres", c, SLAB_TV, "psnr_db")
        weight = _mean(result, "superres", c, model, "model_weight")
        parts.append(f"{factor}: {_fmt(m)} vs cubic {_fmt(cubic)} dB ({_fmt_against(gap, gain_ok, 2)}; classical "
                     f"slabs alone: total-variation {_fmt(tv)} dB, parabolic {_fmt(parabolic)} dB; model detail weight "
                     f"{_fmt(weight)})")
        flags.append(None if gap is None else gain_ok(gap))
        err = _mean(result, "superres", c, model, "slab_max_error_hu")
        slab.append(f"{factor}: {_fmt_against(err, exact, 2)} HU")
        slab_flags.append(None if err is None else exact(err))
    return [Verdict("superres", "PSNR >= cubic interpolation + 1 dB", "; ".join(parts) + _cases_note(n), _all(flags)),
            Verdict("superres", "slab means exact (max error <= 0.5 HU)", "; ".join(slab), _all(slab_flags))]


def _anomaly(result) -> list[Verdict]:
    with_labels, without, organ = "model, with anatomy labels", "model, no labels", "organ-median deviation (labels)"
    a_l = _mean(result, "anomaly", "lesion cases", with_labels, "voxel_auroc")
    a_n = _mean(result, "anomaly", "lesion cases", without, "voxel_auroc")
    a_o = _mean(result, "anomaly", "lesion cases", organ, "voxel_auroc")
    n = _n(result, "anomaly", "lesion cases", with_labels, "voxel_auroc")
    v_l = _mean(result, "anomaly", "all volumes", with_labels, "volume_auroc")
    v_n = _mean(result, "anomaly", "all volumes", without, "volume_auroc")
    f_l = _mean(result, "anomaly", "healthy cases", with_labels, "flagged_ml")
    f_n = _mean(result, "anomaly", "healthy cases", without, "flagged_ml")
    both = lambda a, b, ok: None if a is None or b is None else (ok(a) and ok(b))  # noqa: E731
    voxel_ok, volume_ok, few_ml = (lambda v: v >= 0.9), (lambda v: v >= 0.95), (lambda v: v < 5.0)
    gap = None if a_l is None or a_o is None else a_l - a_o
    ahead = lambda g: g >= 0.0  # noqa: E731
    return [
        Verdict("anomaly", "voxel AUROC >= 0.9, with and without labels",
                f"with labels {_fmt_against(a_l, voxel_ok)}, without {_fmt_against(a_n, voxel_ok)}{_cases_note(n)}",
                both(a_l, a_n, voxel_ok)),
        Verdict("anomaly", "voxel AUROC >= the organ-median baseline (both with labels)",
                f"{_fmt(a_l, 3)} vs {_fmt(a_o, 3)} ({_fmt_against(gap, ahead)})", None if gap is None else ahead(gap)),
        Verdict("anomaly", "volume AUROC >= 0.95",
                f"with labels {_fmt_against(v_l, volume_ok)}, without {_fmt_against(v_n, volume_ok)}",
                both(v_l, v_n, volume_ok)),
        Verdict("anomaly", "< 5 ml flagged on healthy volumes",
                f"with labels {_fmt_against(f_l, few_ml, 2)} ml, without {_fmt_against(f_n, few_ml, 2)} ml",
                both(f_l, f_n, few_ml)),
    ]


def _synthesis(result) -> list[Verdict]:
    parts, flags = [], []
    unphased = []  # what a user gets without naming the phase, shown beside the verdict (not judged)
    share_ok = lambda share: share >= 0.8  # noqa: E731
    for g in SYNTHESIS_GROUPS:
        m = _mean(result, "synthesis", g, "model", "threshold_dice")
        c = _mean(result, "synthesis", g, "real phantom (ceiling)", "threshold_dice")
        u = _mean(result, "synthesis", g, UNPHASED_SYNTHESIS, "threshold_dice")
        if u is not None and c:
            unphased.append(f"{g} {u / c:.2f}")
        if m is None or c is None:  # not in these fields of view: judged on the groups present
            parts.append(f"{g}: not present")
            continue
        # each group is present in the cases of its own region only: its count goes with it
        few = _cases_note(_n(result, "synthesis", g, "model", "threshold_dice"))
        parts.append((f"{g}: {m:.2f} / {c:.2f} = {_fmt_against(m / c, share_ok, 2)}" if c > 0 else f"{g}: ceiling 0")
                     + few)
        flags.append(c > 0 and share_ok(m / c))
    note = f" (contrast phase not given: {', '.join(unphased)})" if unphased else ""
    return [Verdict("synthesis", "threshold Dice >= 0.8 x the real phantom's, per group",
                    "; ".join(parts) + note, _all(flags))]


def _inpaint(result) -> list[Verdict]:
    model = "model (RePaint + lesion ControlNet)"
    d = _mean(result, "inpaint", "healthy content", model, "abs_delta_mean_hu")
    s = _mean(result, "inpaint", "healthy content", model, "std_ratio")
    n = _n(result, "inpaint", "healthy content", model, "abs_delta_mean_hu")
    d_in = _mean(result, "inpaint", "healthy content", "input (unchanged)", "abs_delta_mean_hu")
    level_ok, texture_ok = (lambda d: d <= 15.0), (lambda s: abs(s - 1.0) <= 0.5)
    return [Verdict("inpaint", "|mask mean - ring mean| <= 15 HU (healthy content)",
                    f"{_fmt_against(d, level_ok, 1)} HU (the unchanged input: {_fmt(d_in, 1)} HU){_cases_note(n)}",
                    None if d is None else level_ok(d)),
            Verdict("inpaint", "texture std within 50% of the ring's", f"ratio {_fmt_against(s, texture_ok, 2)}",
                    None if s is None else texture_ok(s))]


def _lesion(result) -> list[Verdict]:
    out = []
    own = [r for r in result["rows"] if r["family"] == FAMILY and r["section"] == "lesion"
           and r["condition"] == "the family's own lesions"]
    for metric, what, decimals in (("abs_contrast_hu", "|contrast|", 1), ("threshold_dice", "threshold Dice", 2)):
        m = _mean(result, "lesion", "generated in the mask", "model (lesion ControlNet)", metric)
        n = _n(result, "lesion", "generated in the mask", "model (lesion ControlNet)", metric)
        values = [v for r in own if r["metric"] == metric for v in r["values"] if v is not None]
        if m is None or not values:
            out.append(Verdict("lesion", f"{what} within the range of the family's own lesions",
                               f"model {_fmt(m, decimals)}", None))
            continue
        lo, hi = min(values), max(values)
        out.append(Verdict("lesion", f"{what} within the range of the family's own lesions",
                           f"model {m:.{decimals}f}; the family's lesions {lo:.{decimals}f}-{hi:.{decimals}f}"
                           f"{_cases_note(n)}", lo <= m <= hi))
    return out


TARGETS: dict[str, Callable[[dict], list[Verdict]]] = {
    "denoise": _denoise, "superres": _superres, "anomaly": _anomaly, "synthesis": _synthesis,
    "inpaint": _inpaint, "lesion": _lesion,
}


def verdicts(result: dict) -> list[Verdict]:
    """Every target, judged on the held-out family (not measured where its section is missing)."""
    present = {r["section"] for r in result["rows"] if r["family"] == FAMILY}
    out = []
    for section, judge in TARGETS.items():
        if section in present:
            out += judge(result)
        else:
            out.append(Verdict(section, "every target of the section", "section not run", None))
    return out


# ---------------------------------------------------------------- the Markdown
def results_markdown(result: dict) -> str:
    """The model card's results: targets, then every table of the run."""
    meta = result["meta"]
    lines = ["## Results at clinical grids", "",
             f"Generated by `scripts/model_card.sh` from one benchmark run (`{meta['command']}`). Model "
             f"`{Path(str(meta['model'])).name}`, {meta['cases']} case(s) per section on the held-out family "
             "(synthesis: per region). The targets are judged on the held-out family (`MedDiffFMLib/heldout`, other "
             "code and primitives than the training phantoms); the training family's tables are labelled as such. "
             "Synthetic phantoms: not clinical results.",
             "", "### Against the targets", "", "| task | target | measured (held-out, mean over cases) | |",
             "|---|---|---|---|"]
    cell = lambda text: text.replace("|", "\\|")  # noqa: E731  (a bar inside a cell ends it)
    for v in verdicts(result):
        lines.append(f"| {SECTION_TITLES[v.section]} | {cell(v.target)} | {cell(v.measured)} | {v.label} |")
    tables = format_markdown(result).split("\n")
    start = next((i for i, t in enumerate(tables) if t.startswith("## ")), len(tables))
    lines += [""] + ["#" + t if t.startswith("## ") else t for t in tables[start:]]
    return "\n".join(lines).rstrip() + "\n"


def headline_markdown(result: dict) -> str:
    """The README's lines: per task, how many targets are met, with the numbers."""
    by_section: dict[str, list[Verdict]] = {}
    for v in verdicts(result):
        by_section.setdefault(v.section, []).append(v)
    lines = [f"Measured by `scripts/model_card.sh` on the held-out phantom family at clinical grids "
             f"({result['meta']['cases']} cases per task, for synthesis per region; details and every baseline in the "
             "model card):", ""]
    for section, vs in by_section.items():
        met = sum(v.met is True for v in vs)
        judged = sum(v.met is not None for v in vs)
        if not judged:
            lines.append(f"- **{SECTION_TITLES[section]}**: not measured in this run.")
            continue
        facts = "; ".join(f"{v.target}: {v.measured} ({v.label})" for v in vs)
        lines.append(f"- **{SECTION_TITLES[section]}**, {met} of {judged} targets met: {facts}.")
    return "\n".join(lines) + "\n"


def weights_markdown(registry: dict, root: Path) -> str:
    """The model card's table of the bundled weights, from ``models.json``."""
    lines = ["| id | version | kind | file | sha256 (full value in `models.json`) |", "|---|---|---|---|---|"]
    for m in registry["models"]:
        path = root / m["path"] / "model.safetensors" if "path" in m else None
        size = f"{path.stat().st_size / 1e6:.1f} MB" if path is not None and path.is_file() else "-"
        kind = "foundation model" if m.get("kind") == "base" else f"ControlNet ({m.get('task', '?')})"
        digest = str(m.get("sha256", ""))[:16]
        lines.append(f"| `{m['id']}` | {m.get('version', '-')} | {kind} | {size} | `{digest}…` |")
    return "\n".join(lines) + "\n"


def replace_between(text: str, name: str, body: str) -> str:
    """``text`` with what lies between the ``name`` markers replaced by ``body``.

    Raises:
        ValueError: the markers are missing or not in order.
    """
    pattern = re.compile(rf"(<!-- {name}:begin -->\n)(.*?)(<!-- {name}:end -->)", re.S)
    if not pattern.search(text):
        raise ValueError(f"no '<!-- {name}:begin -->' ... '<!-- {name}:end -->' markers")
    return pattern.sub(lambda m: m.group(1) + body + m.group(3), text, count=1)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m MedDiffFMLib.benchmark.card", description=__doc__.split("\n")[0])
    p.add_argument("results", nargs="+", help="benchmark JSON files (meddiff-fm benchmark -o ...)")
    p.add_argument("--card", default="Resources/models/MODEL_CARD.md", help="model card to update")
    p.add_argument("--readme", default="README.md", help="README to update")
    p.add_argument("--registry", default="Resources/models.json", help="registry of the bundled weights")
    args = p.parse_args(argv)
    try:
        result = merge_results([json.loads(Path(f).read_text(encoding="utf-8")) for f in args.results])
        registry_path = Path(args.registry)
        registry = json.loads(registry_path.read_text(encoding="utf-8"))
        card, readme = Path(args.card), Path(args.readme)
        card_text = replace_between(card.read_text(encoding="utf-8"), "weights",
                                    weights_markdown(registry, registry_path.parent))
        card_text = replace_between(card_text, "results", results_markdown(result))
        readme_text = replace_between(readme.read_text(encoding="utf-8"), "headline", headline_markdown(result))
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_text_atomic(card, card_text)
    write_text_atomic(readme, readme_text)
    judged = verdicts(result)
    print(f"wrote {card} and {readme}: {sum(v.met is True for v in judged)} of {len(judged)} targets met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
