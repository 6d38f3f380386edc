"""Reading and writing volumes and label maps with exact geometry.

One reader per format:

* NIfTI (``.nii``, ``.nii.gz``): nibabel. ``img.affine`` (nibabel's choice between sform and
  qform) is already voxel-centre ``ijk -> RAS``, so it is ``ijk_to_ras`` as is; the data are
  (i, j, k) and are transposed to (k, j, i). Scale factors (``scl_slope``/``scl_inter``) are
  applied for images; integer label maps keep their stored integer type.
* NRRD (``.nrrd``, ``.nhdr``), MetaImage (``.mha``, ``.mhd``) and DICOM series (a folder):
  SimpleITK. ITK geometry is LPS: ``lps = origin + Direction @ diag(spacing) @ ijk``; RAS is
  LPS with the first two coordinates negated, so ``ijk_to_ras[:3, :3] = F @ Direction @
  diag(spacing)`` and ``ijk_to_ras[:3, 3] = F @ origin`` with ``F = diag(-1, -1, 1)``.
  ``sitk.GetArrayFromImage`` is already (k, j, i). For DICOM, SimpleITK (GDCM) applies the
  rescale slope and intercept, so values are HU.

Writing: NIfTI with nibabel (sform and qform both set, code 1 "scanner", units mm); ``.nrrd``
(gzip) and ``.mha`` with SimpleITK. Detached-header formats (``.nhdr``, ``.mhd``) and DICOM
are read-only here. Every write goes to a temporary file in the target folder that then
replaces the target (``os.replace``), so a failed or interrupted write leaves no partial
output and no temporary file (:class:`StagedWrites` does the same for several files at once).

Label names travel in a JSON sidecar next to the label map: ``<stem>.labels.json`` (for
``liver.nii.gz`` that is ``liver.labels.json``), mapping label value (as a string) to name,
e.g. ``{"5": "liver"}``.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
from pathlib import Path
from typing import Mapping

import numpy as np

from .geometry import validate_ijk_to_ras
from .volume import Volume

logger = logging.getLogger(__name__)

NIFTI_EXTENSIONS = (".nii", ".nii.gz")
ITK_EXTENSIONS = (".nrrd", ".nhdr", ".mha", ".mhd")
READ_EXTENSIONS = NIFTI_EXTENSIONS + ITK_EXTENSIONS
WRITE_EXTENSIONS = (".nii", ".nii.gz", ".nrrd", ".mha")
LABELS_SIDECAR_SUFFIX = ".labels.json"

_LPS_RAS = np.diag([-1.0, -1.0, 1.0])


# --------------------------------------------------------------------------- helpers


def _extension(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return path.suffix.lower()


def _stem(path: Path) -> str:
    ext = _extension(path)
    return path.name[: len(path.name) - len(ext)] if ext else path.name


def label_sidecar_path(path: str | os.PathLike) -> Path:
    """Where the label-name sidecar of ``path`` lives: ``<folder>/<stem>.labels.json``."""
    p = Path(path)
    if p.is_dir():
        return p.parent / (p.name + LABELS_SIDECAR_SUFFIX)
    return p.parent / (_stem(p) + LABELS_SIDECAR_SUFFIX)


def _unsupported(path: Path, supported: tuple[str, ...], verb: str) -> ValueError:
    return ValueError(
        f"cannot {verb} {str(path)!r}: unsupported extension {_extension(path) or '(none)'!r}; "
        f"supported: {', '.join(supported)}" + (" or a DICOM series folder" if verb == "read" else "")
    )


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


# --------------------------------------------------------------------------- NIfTI (nibabel)


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


# --------------------------------------------------------------------------- ITK (SimpleITK)


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
    m[:3, :3] = _LPS_RAS @ d * spacing
    m[:3, 3] = _LPS_RAS @ origin
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


def _write_itk(tmp: str, array_kji: np.ndarray, ijk_to_ras: np.ndarray, compress: bool) -> None:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array_kji)  # (k, j, i) -> size (i, j, k)
    spacing = np.linalg.norm(ijk_to_ras[:3, :3], axis=0)  # (i, j, k)
    d_lps = _LPS_RAS @ (ijk_to_ras[:3, :3] / spacing)
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(v) for v in _LPS_RAS @ ijk_to_ras[:3, 3]])
    image.SetDirection([float(v) for v in d_lps.ravel()])
    sitk.WriteImage(image, tmp, compress)


# --------------------------------------------------------------------------- public API


def _load(path: str | os.PathLike, labels: bool) -> Volume:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no such file or folder: {str(p)!r}")
    if p.is_dir():
        array, m = _sitk_to_volume(_read_dicom_series(p), p)
        return Volume(array, m)
    ext = _extension(p)
    if ext in NIFTI_EXTENSIONS:
        return _read_nifti(p, labels)
    if ext in ITK_EXTENSIONS:
        array, m = _sitk_to_volume(_read_itk(p), p)
        return Volume(array, m)
    raise _unsupported(p, READ_EXTENSIONS, "read")


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
        a = a.astype(_label_dtype(a))
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


def _label_dtype(a: np.ndarray) -> np.dtype:
    if a.size == 0:
        return np.dtype(np.uint8)
    lo, hi = a.min(), a.max()
    for dt in (np.uint8, np.int16, np.int32):
        info = np.iinfo(dt)
        if info.min <= lo and hi <= info.max:
            return np.dtype(dt)
    raise ValueError(f"label values [{lo}, {hi}] do not fit in int32")


def _prepare(volume: Volume) -> tuple[np.ndarray, np.ndarray]:
    """The array as it is written (dtype chosen as :func:`write_volume` says) and the checked matrix."""
    m = validate_ijk_to_ras(volume.ijk_to_ras)
    a = np.asarray(volume.array)
    if a.ndim != 3:
        raise ValueError(f"can only write 3-D (k, j, i) arrays, got shape {a.shape}")
    if a.dtype == bool:
        a = a.astype(np.uint8)
    elif np.issubdtype(a.dtype, np.integer):
        dt = _label_dtype(a)
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
        ext = _extension(p)
        if ext not in WRITE_EXTENSIONS:
            raise _unsupported(p, WRITE_EXTENSIONS, "write")
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

        self._stage(p, _extension(p) or ".txt", _write)

    def _stage(self, target: Path, ext: str, write) -> None:
        folder = target.parent
        if not folder.is_dir():
            raise FileNotFoundError(f"output folder does not exist: {str(folder)!r}")
        if target.is_dir():
            raise IsADirectoryError(f"output {str(target)!r} is an existing folder, not a file")
        tmp = None
        try:
            for _ in range(100):
                name = folder / f".{_stem(target)}.{secrets.token_hex(6)}.tmp{ext}"
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
