"""The benchmark: every task at clinical grids beside classical baselines, in one run.

Layout: :mod:`.options` (what a run measures), :mod:`.cases` (phantoms on oblique clinical
grids, the held-out family by default and the training family as its own section),
:mod:`.baselines` (classical methods), :mod:`.restoration` / :mod:`.detection` /
:mod:`.generation` (the sections), :mod:`.rows` and :mod:`.report` (the table),
:mod:`.cli` (``meddiff-fm benchmark``). Every measure is in :mod:`MedDiffFMLib.metrics`;
the model runs only through :func:`MedDiffFMLib.tasks.run_task`.
"""

from .cli import DESCRIPTION, add_arguments, main
from .options import SECTIONS, BenchmarkOptions, parse_sections, parse_steps
from .report import format_markdown, format_table, to_jsonable, write_json
from .rows import METRICS, find_row
from .runner import resolve_controlnet, run_benchmark

__all__ = ["SECTIONS", "METRICS", "BenchmarkOptions", "run_benchmark", "format_table", "format_markdown",
           "write_json", "to_jsonable", "find_row", "parse_sections", "parse_steps", "resolve_controlnet",
           "add_arguments", "main", "DESCRIPTION"]
