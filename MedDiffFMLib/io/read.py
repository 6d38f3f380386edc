"""Readers: NIfTI with nibabel; NRRD, MetaImage and DICOM series with SimpleITK (see the
package's notes on geometry)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from ..geometry import validate_ijk_to_ras
from ..volume import Volume
from .common import (ITK_EXTENSIONS, LPS_RAS, NIFTI_EXTENSIONS, READ_EXTENSIONS, extension, label_dtype,
                     label_sidecar_path, unsupported)

logger = logging.getLogger(__name__)


class _ComplexImage(ValueError):
    """A complex-valued file: refused with its own message, not as "corrupt"."""


def _to_3d(array: np.ndarray, path: Path, axes: str) -> np.ndarray:
    """Drop trailing singleton dimensions beyond the third; refuse anything not 3-D."""
    a = array
    while a.ndim > 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim != 3:
        raise ValueError(
            f"{str(path)!r} is not a 3-D volume: its data have shape {array.shape} ({axes}); "
            "only 3-D images (or 4-D with a single volume) are supported"
        )
    return a


def _read_nifti(path: Path, labels: bool) -> Volume:
    import nibabel as nib

    try:
        img = nib.load(str(path))
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            raise ValueError(f"not a NIfTI image ({type(img).__name__})")
        if np.dtype(img.get_data_dtype()).kind == "c":
            raise _ComplexImage(f"{str(path)!r} holds complex values ({img.get_data_dtype()}); "
                                "only real-valued images are supported")
        if labels:
            data = np.asanyarray(img.dataobj)  # stored dtype unless the header asks for scaling
        else:
            data = img.get_fdata(dtype=np.float32, caching="unchanged")
        affine = np.asarray(img.affine, dtype=np.float64)
    except (FileNotFoundError, _ComplexImage):
        raise
    except Exception as e:  # nibabel raises many types for corrupt/truncated files
        raise ValueError(f"could not read NIfTI file {str(path)!r} (corrupt or truncated?): {e}") from e
    data = _to_3d(np.asarray(data), path, "i, j, k, ...")
    array = np.ascontiguousarray(data.transpose(2, 1, 0))
    try:
        validate_ijk_to_ras(affine)
    except ValueError as e:
        raise ValueError(f"{str(path)!r} has an invalid geometry: {e}") from e
    return Volume(array, affine)



def _sitk_to_volume(image, path: Path) -> tuple[np.ndarray, np.ndarray]:
    import SimpleITK as sitk

    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(
            f"{str(path)!r} has {image.GetNumberOfComponentsPerPixel()} components per voxel; "
            "only scalar volumes are supported"
        )
    dim = image.GetDimension()
    size = image.GetSize()  # (i, j, k, ...)
    if dim < 3 or (dim > 3 and any(s != 1 for s in size[3:])):
        raise ValueError(
            f"{str(path)!r} is not a 3-D volume: its size is {size} (i, j, k, ...); "
            "only 3-D images (or 4-D with a single volume) are supported"
        )
    array = sitk.GetArrayFromImage(image)  # (..., k, j, i)
    if array.dtype.kind == "c":
        raise ValueError(f"{str(path)!r} holds complex values ({array.dtype}); only real-valued images are supported")
    array = array.reshape(array.shape[-3:]) if dim > 3 else array
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)[:3]
    origin = np.asarray(image.GetOrigin(), dtype=np.float64)[:3]
    d = np.asarray(image.GetDirection(), dtype=np.float64).reshape(dim, dim)[:3, :3]
    m = np.eye(4)
    m[:3, :3] = LPS_RAS @ d * spacing
    m[:3, 3] = LPS_RAS @ origin
    try:
        validate_ijk_to_ras(m)
    except ValueError as e:
        raise ValueError(f"{str(path)!r} has an invalid geometry: {e}") from e
    return np.ascontiguousarray(array), m


def _read_itk(path: Path):
    import SimpleITK as sitk

    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise ValueError(f"could not read {str(path)!r} (corrupt or unreadable?): {e}") from e


def _read_dicom_series(folder: Path):
    import SimpleITK as sitk

    try:
        series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)) or ()
    except RuntimeError as e:
        raise ValueError(f"could not scan {str(folder)!r} for DICOM series: {e}") from e
    if not series_ids:
        raise ValueError(f"no DICOM series found in folder {str(folder)!r}")
    files = {sid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid) for sid in series_ids}
    chosen = max(series_ids, key=lambda s: len(files[s]))
    if len(series_ids) > 1:
        logger.warning(
            "%s holds %d DICOM series (%s); reading %s, the one with the most slices (%d)",
            folder, len(series_ids), ", ".join(f"{s}: {len(files[s])} files" for s in series_ids),
            chosen, len(files[chosen]),
        )
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files[chosen])
    try:
        return reader.Execute()
    except RuntimeError as e:
        raise ValueError(f"could not read DICOM series {chosen} in {str(folder)!r}: {e}") from e


def _load(path: str | os.PathLike, labels: bool) -> Volume:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no such file or folder: {str(p)!r}")
    if p.is_dir():
        array, m = _sitk_to_volume(_read_dicom_series(p), p)
        return Volume(array, m)
    ext = extension(p)
    if ext in NIFTI_EXTENSIONS:
        return _read_nifti(p, labels)
    if ext in ITK_EXTENSIONS:
        array, m = _sitk_to_volume(_read_itk(p), p)
        return Volume(array, m)
    raise unsupported(p, READ_EXTENSIONS, "read")


def read_volume(path: str | os.PathLike) -> Volume:
    """Read an image as float32 (HU for CT) with its ``ijk_to_ras``.

    Accepts ``.nii``, ``.nii.gz`` (nibabel), ``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``
    (SimpleITK) and a folder holding a DICOM series (SimpleITK ImageSeriesReader; rescale
    slope/intercept applied; if the folder holds several series the one with the most files
    is read and a warning is logged).

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: unsupported extension, not 3-D (a 4-D image with one volume is squeezed),
            several components per voxel, corrupt file, or invalid geometry.
    """
    vol = _load(path, labels=False)
    if vol.array.dtype != np.float32:
        vol.array = vol.array.astype(np.float32)
    return vol


def read_labelmap(path: str | os.PathLike) -> tuple[Volume, dict[int, str] | None]:
    """Read a label map, keeping an integer dtype, and its label names if a sidecar exists.

    The array keeps the file's integer type (bool becomes uint8). A floating-point file is
    accepted only when every value is a whole number; it is then converted to the smallest
    of uint8 / int16 / int32 that holds it.

    Returns:
        (volume, names): ``names`` maps label value -> name, read from ``<stem>.labels.json``
        next to the file, or None when there is no sidecar (callers then use the
        TotalSegmentator v2 names).
    """
    vol = _load(path, labels=True)
    a = vol.array
    if a.dtype == bool:
        a = a.astype(np.uint8)
    elif not np.issubdtype(a.dtype, np.integer):
        if not np.all(np.isfinite(a)) or not np.array_equal(a, np.rint(a)):
            raise ValueError(f"{str(path)!r} is not a label map: it holds non-integer values")
        a = a.astype(label_dtype(a))
    vol.array = a
    return vol, read_label_names(label_sidecar_path(path))


def read_mask(path: str | os.PathLike) -> Volume:
    """Read a mask of any numeric type: every non-zero voxel is inside (so 0/1, 0/255 and
    0/0.5 masks all work). Returns a bool volume.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: as :func:`read_volume`, or the mask holds NaN or infinite values.
    """
    vol = _load(path, labels=True)
    a = np.asarray(vol.array)
    if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
        raise ValueError(f"the mask {str(path)!r} holds NaN or infinite values; a mask is 0 outside and "
                         "non-zero inside")
    vol.array = a != 0
    return vol


def read_label_names(sidecar: str | os.PathLike) -> dict[int, str] | None:
    """Label names from a ``.labels.json`` sidecar, or None if the file does not exist."""
    p = Path(sidecar)
    if not p.is_file():
        return None
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
        if not isinstance(raw, dict):
            raise ValueError("expected a JSON object {\"<value>\": \"<name>\"}")
        return {int(k): str(v) for k, v in raw.items()}
    except (ValueError, TypeError) as e:
        raise ValueError(f"invalid label-name sidecar {str(p)!r}: {e}") from e
