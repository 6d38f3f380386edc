"""Output paths: planned and checked before any work, written all or none after it.

A command first lists every file it will write (:func:`plan`, side outputs included) and
:func:`check_paths` refuses, before anything is computed, an output that

* has an extension the writers do not know,
* is an existing folder, or lies in a folder that is missing or cannot be written to,
* is one of the command's inputs (image, mask, anatomy, reference), also through a link, or
* is the same file as another output (a side output ``<stem>_<name>`` included).

After the work, :func:`write_all` writes every output to a temporary file beside it and
renames them into place together (``io.StagedWrites``): a failure or a stop signal before
that leaves neither outputs nor temporary files behind.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

from .errors import UsageError, hold_signals

# What the writers (io.write_volume) accept, longest first so ".nii.gz" wins over ".gz".
WRITE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha")
READ_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def split_name(path: Path, extensions: Sequence[str] = READ_EXTENSIONS) -> tuple[str, str]:
    """(stem, extension) of a file name; the extension is "" when it is none of ``extensions``."""
    name = path.name
    for ext in extensions:
        if name.lower().endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)], name[-len(ext):]
    return name, ""


def output_extension(path: Path) -> str:
    """The writer extension of an output path; a one-line error for anything else."""
    stem, ext = split_name(path, WRITE_EXTENSIONS)
    if not ext:
        raise UsageError(f"output {str(path)!r} has an unknown extension; use .nii.gz, .nii, .nrrd or .mha")
    return ext


@dataclass(frozen=True)
class Planned:
    """One file a command will write.

    Attributes:
        path: where it goes.
        what: the option or output it stands for, for messages ("--output", "reconstruction").
        key: (kind, name) of the task output it holds, or None for other files.
    """

    path: Path
    what: str
    key: Optional[tuple[str, str]] = None


def beside(main: Path, suffix: str, ext: Optional[str] = None) -> Path:
    """``<folder>/<stem>_<suffix><ext>`` next to ``main`` (its own extension by default)."""
    ext = ext or output_extension(main)
    return main.with_name(f"{main.name[: -len(ext)]}_{suffix}{ext}")


def plan(main: Path, outputs: Iterable[tuple[str, str, bool]]) -> list[Planned]:
    """Files for a task's outputs: the primary volume at ``main``, every other output beside it.

    Args:
        outputs: (kind, name, primary) per output ("volume" or "segmentation").
    """
    ext = output_extension(main)
    planned = []
    for kind, name, primary in outputs:
        if primary and kind == "volume":
            planned.append(Planned(main, "--output", (kind, name)))
        else:
            planned.append(Planned(beside(main, name, ext), f"the {name} {kind} written beside --output",
                                   (kind, name)))
    return planned


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.normcase(os.path.realpath(a)) == os.path.normcase(os.path.realpath(b))


def _probe_writable(folder: Path) -> Optional[str]:
    """None if a file can be created in ``folder`` (tried for real: permissions, read-only
    file systems and root's rights all count), else the reason."""
    probe = folder / f".meddifffm-write-test-{secrets.token_hex(6)}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        return e.strerror or str(e)
    try:
        os.close(fd)
    finally:  # also when a stop signal arrives here
        try:
            os.unlink(probe)
        except OSError:
            pass
    return None


def check_paths(planned: Sequence[Planned], inputs: Mapping[str, Optional[str | os.PathLike]]) -> None:
    """Refuse any planned output that cannot or must not be written (see the module docs).

    Args:
        planned: the outputs, from :func:`plan` or built by the command.
        inputs: option name -> path of every input the command reads (None entries skipped).
    """
    given = {what: Path(p) for what, p in inputs.items() if p is not None}
    folders_ok: set[str] = set()
    for n, out in enumerate(planned):
        p = out.path
        if p.is_dir():
            raise UsageError(f"{out.what} {str(p)!r} is an existing folder; give a file name")
        for what, src in given.items():
            if _same_file(p, src):
                raise UsageError(f"{out.what} {str(p)!r} is the {what} file; writing it would destroy the input. "
                                 "Choose another output name")
        for other in planned[:n]:
            if _same_file(p, other.path):
                raise UsageError(f"{out.what} and {other.what} are the same file {str(p)!r}; choose another "
                                 "output name")
        folder = p.parent if str(p.parent) else Path(".")
        key = os.path.realpath(folder)
        if key in folders_ok:
            continue
        if not folder.exists():
            raise UsageError(f"the folder of {out.what} {str(p)!r} does not exist: {str(folder)!r}")
        if not folder.is_dir():
            raise UsageError(f"the folder of {out.what} {str(p)!r} is not a folder: {str(folder)!r}")
        reason = _probe_writable(folder)
        if reason is not None:
            raise UsageError(f"cannot write {out.what} {str(p)!r}: the folder {str(folder)!r} is not writable "
                             f"({reason})")
        folders_ok.add(key)


def write_all(files: Sequence[tuple[Path, object, Optional[Mapping[int, str]]]]) -> list[Path]:
    """Write (path, Volume or text, label names or None) items all or none; returns the paths.

    Stop signals interrupt the writing of the temporary files (which are then removed); once
    every file is written, the renames run to the end whatever arrives.
    """
    from .. import io

    with io.StagedWrites() as staged:
        for path, content, names in files:
            if isinstance(content, str):
                staged.add_text(path, content)
            else:
                staged.add(path, content, names)
        hold_signals()  # the commit (renames) runs as the with-block ends
    return [path for path, _, _ in files]
