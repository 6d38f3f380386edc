"""The panel's task options, read from the task registry (:mod:`MedDiffFMLib.tasks.registry`).

The registry says which parameters each task takes, their types, bounds and defaults. This
module adds only what is the panel's own: which parameter-node field shows which parameter
(:data:`PANEL_FIELDS`). From the two it derives the first-run values of the parameter node, the
defaults a task choice applies, the fields each task shows, and the parameters sent to a task.

Defaults are applied only when the user picks a task in the menu (:func:`choose_task`), never
when a scene is loaded or the task is set from Python: the task whose defaults the current
options hold is stored in the parameter node (:data:`OPTIONS_TASK_PARAMETER`), so a re-chosen
task keeps the user's edits and a saved scene keeps its settings.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from MedDiffFMLib.tasks.registry import TASKS, ParamSpec, task_spec

# Parameter-node field -> library parameter name (each field has one widget in the .ui file).
PANEL_FIELDS: dict[str, str] = {
    "steps": "steps",
    "strength": "strength",
    "noiseLevel": "noise_level",
    "noiseFraction": "noise_fraction",
    "inpaintContent": "content",
    "contrastPhase": "contrast_phase",
    "seed": "seed",
    "windowSize": "window",
    "overlap": "overlap",
    "batchSize": "batch_size",
    "precision": "precision",
}
DEFAULT_TASK = next(iter(TASKS))
OPTIONS_TASK_PARAMETER = "MedDiffFM.OptionsTask"


def tasks_with(field: str) -> list[str]:
    """The tasks that take the field's parameter, in registry order."""
    name = PANEL_FIELDS[field]
    return [t for t, spec in TASKS.items() if name in spec.params]


def field_spec(field: str) -> ParamSpec:
    """The parameter spec of a field (from the first task that takes it)."""
    return TASKS[tasks_with(field)[0]].params[PANEL_FIELDS[field]]


def field_range(field: str) -> tuple[float, float]:
    """The widest (minimum, maximum) any task allows for the field (the widget's range)."""
    specs = [TASKS[t].params[PANEL_FIELDS[field]] for t in tasks_with(field)]
    return min(s.minimum for s in specs), max(s.maximum for s in specs)


def field_choices(field: str) -> tuple:
    """The allowed values of a text field (the union over tasks, in first-seen order)."""
    out: list = []
    for t in tasks_with(field):
        for c in TASKS[t].params[PANEL_FIELDS[field]].choices or ():
            if c not in out:
                out.append(c)
    return tuple(out)


def first_run_value(field: str) -> Any:
    """The field's value in a new parameter node: the default task's default where it takes the
    parameter, else the default of the first task that does."""
    tasks = tasks_with(field)
    task = DEFAULT_TASK if DEFAULT_TASK in tasks else tasks[0]
    return TASKS[task].params[PANEL_FIELDS[field]].default


def task_fields(task: str) -> list[str]:
    """The fields the task uses (the panel shows only these)."""
    params = task_spec(task).params
    return [f for f, name in PANEL_FIELDS.items() if name in params]


def task_defaults(task: str) -> dict[str, Any]:
    """field -> the task's default, for the fields it uses."""
    params = task_spec(task).params
    return {f: params[PANEL_FIELDS[f]].default for f in task_fields(task)}


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, Enum) else value


def parameters(task: str, panel: Any) -> dict[str, Any]:
    """The library parameters of ``task`` from the panel's fields (only those the task takes)."""
    return {PANEL_FIELDS[f]: _plain(getattr(panel, f)) for f in task_fields(task)}


def choose_task(panel: Any, scripted_node: Any) -> bool:
    """The user picked ``panel.task`` in the menu: set that task's defaults, unless the options
    already belong to it. ``panel``: the parameter node wrapper (attributes by field name);
    ``scripted_node``: its vtkMRMLScriptedModuleNode. True when defaults were applied."""
    task = _plain(panel.task)
    if scripted_node.GetParameter(OPTIONS_TASK_PARAMETER) == task:
        return False
    for field, value in task_defaults(task).items():
        current = getattr(panel, field)
        setattr(panel, field, type(current)(value) if isinstance(current, Enum) else value)
    scripted_node.SetParameter(OPTIONS_TASK_PARAMETER, task)
    return True


def adopt_options(panel: Any, scripted_node: Any) -> None:
    """A parameter node made before options were tracked, or a new one: its options belong to
    its current task (nothing is reset)."""
    if not scripted_node.GetParameter(OPTIONS_TASK_PARAMETER):
        scripted_node.SetParameter(OPTIONS_TASK_PARAMETER, _plain(panel.task))
