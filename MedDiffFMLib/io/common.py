"""What reading and writing share: file extensions, the label-name sidecar, label dtypes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

NIFTI_EXTENSIONS = (".nii", ".nii.gz")
ITK_EXTENSIONS = (".nrrd", ".nhdr", ".mha", ".mhd")
READ_EXTENSIONS = NIFTI_EXTENSIONS + ITK_EXTENSIONS
WRITE_EXTENSIONS = (".nii", ".nii.gz", ".nrrd", ".mha")
LABELS_SIDECAR_SUFFIX = ".labels.json"

LPS_RAS = np.diag([-1.0, -1.0, 1.0])


def extension(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return path.suffix.lower()


def stem(path: Path) -> str:
    ext = extension(path)
    return path.name[: len(path.name) - len(ext)] if ext else path.name


def label_sidecar_path(path: str | os.PathLike) -> Path:
    """Where the label-name sidecar of ``path`` lives: ``<folder>/<stem>.labels.json``."""
    p = Path(path)
    if p.is_dir():
        return p.parent / (p.name + LABELS_SIDECAR_SUFFIX)
    return p.parent / (stem(p) + LABELS_SIDECAR_SUFFIX)


def unsupported(path: Path, supported: tuple[str, ...], verb: str) -> ValueError:
    return ValueError(
        f"cannot {verb} {str(path)!r}: unsupported extension {extension(path) or '(none)'!r}; "
        f"supported: {', '.join(supported)}" + (" or a DICOM series folder" if verb == "read" else "")
    )


def label_dtype(a: np.ndarray) -> np.dtype:
    if a.size == 0:
        return np.dtype(np.uint8)
    lo, hi = a.min(), a.max()
    for dt in (np.uint8, np.int16, np.int32):
        info = np.iinfo(dt)
        if info.min <= lo and hi <= info.max:
            return np.dtype(dt)
    raise ValueError(f"label values [{lo}, {hi}] do not fit in int32")
