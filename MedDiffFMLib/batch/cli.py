"""``meddiff-fm batch``: the command line of cohort inference."""

from __future__ import annotations

import argparse
import sys
from typing import Any

DESCRIPTION = ("Run one task on every case of a CSV or JSON manifest. Under torchrun (RANK / WORLD_SIZE) or "
               "Slurm (SLURM_PROCID / SLURM_NTASKS) each process takes every WORLD_SIZE-th case; finished cases "
               "are skipped on a rerun, failed ones are recorded and retried.")


def add_cli(sub) -> None:
    """Register ``meddiff-fm batch`` on the CLI's subparsers."""
    from ..tasks.registry import TASKS

    p = sub.add_parser(
        "batch", help="run one task over a cohort (CSV / JSON manifest), sharded under torchrun or Slurm",
        description=DESCRIPTION,
        epilog="Task options (e.g. --steps, --seed, --backend) follow the task's own command: "
               "meddiff-fm batch MANIFEST --task denoise --out DIR --steps 2. Many GPUs: "
               "torchrun --nproc_per_node 8 -m MedDiffFMLib.cli batch ...")
    p.add_argument("manifest", help="CSV or JSON manifest: image, and optionally id, mask, anatomy, region")
    p.add_argument("--task", required=True, choices=tuple(TASKS), help="the task to run on every case")
    p.add_argument("--out", required=True, help="output folder (cases/, failed/, logs/, report.jsonl, report.csv)")
    p.add_argument("--region", default=None, help="region for rows without one (default: guessed per image)")
    p.add_argument("--model", default=None, help="foundation model directory or registry id")
    p.add_argument("--controlnet", default=None, help="ControlNet directory or registry id (superres, lesion, "
                                                      "inpaint; default: the registered one)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (under torchrun: this rank's GPU)")
    p.add_argument("--integer-hu", action="store_true", help="write HU images as int16, rounded to whole HU "
                                                             "(half the size; exact for integer HU)")
    p.add_argument("--no-retry-failed", dest="retry_failed", action="store_false",
                   help="keep the record of cases that failed before instead of running them again")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_all_task_options(p.add_argument_group("task options (each applies to the tasks that take it; "
                                               "defaults: the task's own)"))
    p.set_defaults(func=_cmd_batch)


def _add_all_task_options(group) -> None:
    """Every task's parameters as options, each once; unset ones keep the task's default."""
    from ..tasks.registry import TASKS

    users: dict[str, list[str]] = {}
    for task in TASKS.values():
        for name in task.params:
            users.setdefault(name, []).append(task.name)
    for name, tasks in users.items():
        spec = TASKS[tasks[0]].params[name]
        flag = "--" + name.replace("_", "-")
        kw: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS}
        if spec.type is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw.update(type=spec.type, choices=spec.choices, nargs=spec.length)
        scope = "every task" if len(tasks) == len(TASKS) else ", ".join(tasks)
        group.add_argument(flag, help=f"{spec.help} ({scope})", **kw)


def _cmd_batch(args) -> int:
    from ..tasks.registry import TASKS

    all_names = {n for t in TASKS.values() for n in t.params}
    given = {n: getattr(args, n) for n in all_names if hasattr(args, n)}
    foreign = sorted(set(given) - set(TASKS[args.task].params))
    if foreign:
        raise ValueError(f"task {args.task!r} takes no option(s) "
                         f"{', '.join('--' + n.replace('_', '-') for n in foreign)}")
    params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in given.items()}
    from . import run_batch

    try:
        summary = run_batch(args.manifest, args.task, params, args.out, model=args.model,
                            controlnet=args.controlnet, device=args.device, region=args.region,
                            as_integer_hu=args.integer_hu, retry_failed=args.retry_failed, progress=not args.quiet)
    except KeyboardInterrupt:
        print("\ninterrupted: finished cases are kept; run the same command again to resume", file=sys.stderr)
        return 130
    line = (f"batch rank {summary.rank}/{summary.world}: {summary.done} done, {summary.skipped} already done, "
            f"{summary.failed} failed")
    if summary.report:
        line += f"; report {summary.report[0]} and {summary.report[1].name}"
    print(line)
    return 1 if summary.failed else 0
