"""Writers: NIfTI with nibabel, ``.nrrd`` and ``.mha`` with SimpleITK; all or none
(:class:`StagedWrites`)."""

from __future__ import annotations

import errno
import json
import os
import secrets
from pathlib import Path
from typing import Mapping

import numpy as np

from ..geometry import validate_ijk_to_ras
from ..volume import Volume
from .common import (LPS_RAS, NIFTI_EXTENSIONS, WRITE_EXTENSIONS, extension, label_dtype, label_sidecar_path, stem,
                     unsupported)


def _write_nifti(tmp: str, array_kji: np.ndarray, ijk_to_ras: np.ndarray) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(array_kji.transpose(2, 1, 0), ijk_to_ras)
    img.set_data_dtype(array_kji.dtype)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(ijk_to_ras, code=1)
    img.set_sform(ijk_to_ras, code=1)
    # No scaling: data are written in their own dtype.
    img.header.set_slope_inter(1.0, 0.0)
    nib.save(img, tmp)


def _write_itk(tmp: str, array_kji: np.ndarray, ijk_to_ras: np.ndarray, compress: bool) -> None:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array_kji)  # (k, j, i) -> size (i, j, k)
    spacing = np.linalg.norm(ijk_to_ras[:3, :3], axis=0)  # (i, j, k)
    d_lps = LPS_RAS @ (ijk_to_ras[:3, :3] / spacing)
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(v) for v in LPS_RAS @ ijk_to_ras[:3, 3]])
    image.SetDirection([float(v) for v in d_lps.ravel()])
    sitk.WriteImage(image, tmp, compress)


def _prepare(volume: Volume) -> tuple[np.ndarray, np.ndarray]:
    """The array as it is written (dtype chosen as :func:`write_volume` says) and the checked matrix."""
    m = validate_ijk_to_ras(volume.ijk_to_ras)
    a = np.asarray(volume.array)
    if a.ndim != 3:
        raise ValueError(f"can only write 3-D (k, j, i) arrays, got shape {a.shape}")
    if a.dtype == bool:
        a = a.astype(np.uint8)
    elif np.issubdtype(a.dtype, np.integer):
        dt = label_dtype(a)
        a = a.astype(dt, copy=False) if a.dtype != dt else a
    elif np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float32, copy=False)
    else:
        raise ValueError(f"cannot write an array of dtype {a.dtype}")
    return np.ascontiguousarray(a), m


class StagedWrites:
    """Several files written all or none.

    :meth:`add` writes each file to a temporary file beside its target (named
    ``.<stem>.<random>.tmp<ext>``, created with the usual permissions, i.e. 0666 less the
    umask); :meth:`commit` renames them all into place (``os.replace``). On any error,
    interrupt or :meth:`discard` before the commit, every temporary file is removed and no
    target is touched. As a context manager it discards on an exception and commits
    otherwise. Error messages name the target, never the temporary file.
    """

    def __init__(self) -> None:
        self._staged: list[tuple[Path, Path]] = []  # (temporary, target)

    def __enter__(self) -> "StagedWrites":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.commit()
        else:
            self.discard()
        return False

    @property
    def targets(self) -> list[Path]:
        return [target for _, target in self._staged]

    def add(self, path: str | os.PathLike, volume: Volume, label_names: Mapping[int, str] | None = None, *,
            compress: bool = True) -> None:
        """Stage ``volume`` for ``path`` (and its label-name sidecar with ``label_names``);
        the same rules as :func:`write_volume`."""
        p = Path(path)
        ext = extension(p)
        if ext not in WRITE_EXTENSIONS:
            raise unsupported(p, WRITE_EXTENSIONS, "write")
        a, m = _prepare(volume)
        if ext in NIFTI_EXTENSIONS:
            self._stage(p, ext, lambda tmp: _write_nifti(tmp, a, m))
        else:
            self._stage(p, ext, lambda tmp: _write_itk(tmp, a, m, compress))
        if label_names is not None:
            text = json.dumps({str(int(k)): str(v) for k, v in sorted(label_names.items())}, indent=1) + "\n"
            self.add_text(label_sidecar_path(p), text)

    def add_text(self, path: str | os.PathLike, text: str) -> None:
        """Stage a UTF-8 text file (a JSON sidecar, a report)."""
        p = Path(path)

        def _write(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)

        self._stage(p, extension(p) or ".txt", _write)

    def _stage(self, target: Path, ext: str, write) -> None:
        folder = target.parent
        if not folder.is_dir():
            raise FileNotFoundError(f"output folder does not exist: {str(folder)!r}")
        if target.is_dir():
            raise IsADirectoryError(f"output {str(target)!r} is an existing folder, not a file")
        tmp = None
        try:
            for _ in range(100):
                name = folder / f".{stem(target)}.{secrets.token_hex(6)}.tmp{ext}"
                self._staged.append((name, target))  # known before it exists: an interrupt cleans it up
                try:
                    # O_EXCL: never reuse someone else's file; mode 0666 less the umask
                    os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
                    tmp = name
                    break
                except FileExistsError:
                    self._staged.pop()
            if tmp is None:
                raise FileExistsError(f"could not create a temporary file in {str(folder)!r}")
            write(str(tmp))
        except BaseException as e:
            self.discard()
            if not isinstance(e, Exception) or tmp is None:
                raise
            # say what failed in terms of the target: the temporary file no longer exists
            text = (e.strerror if isinstance(e, OSError) and e.strerror else str(e)).replace(str(tmp), str(target))
            if isinstance(e, OSError):
                raise OSError(e.errno or errno.EIO, f"could not write {str(target)!r}: {text}") from None
            kind = ValueError if isinstance(e, ValueError) else RuntimeError
            raise kind(f"could not write {str(target)!r}: {text}") from None

    def commit(self) -> list[Path]:
        """Rename every staged file into place; returns the targets."""
        staged, self._staged = self._staged, []
        try:
            for tmp, target in staged:
                os.replace(tmp, target)
        except BaseException:
            self._staged = [(t, target) for t, target in staged if t.exists()]
            self.discard()
            raise
        return [target for _, target in staged]

    def discard(self) -> None:
        """Remove every staged temporary file (targets are untouched)."""
        staged, self._staged = self._staged, []
        for tmp, _ in staged:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def write_volume(
    path: str | os.PathLike,
    volume: Volume,
    label_names: Mapping[int, str] | None = None,
    *,
    compress: bool = True,
) -> None:
    """Write a volume to ``.nii``, ``.nii.gz`` (nibabel), ``.nrrd`` or ``.mha`` (SimpleITK).

    Floating-point arrays are written as float32; bool and integer arrays (label maps,
    masks) as uint8 when all values fit in [0, 255], else int16, else int32. The write is
    atomic (:class:`StagedWrites`: a temporary file in the same folder, then ``os.replace``;
    nothing is left behind on failure). With ``label_names``, a ``<stem>.labels.json``
    sidecar is written in the same all-or-nothing step; without, an existing sidecar is left
    untouched. Files get the usual permissions (0666 less the umask).

    Args:
        compress: gzip the voxel data of ``.nrrd`` / ``.mha`` (NIfTI compression is chosen by
            ``.nii.gz`` vs ``.nii``).
    """
    with StagedWrites() as staged:
        staged.add(path, volume, label_names, compress=compress)
