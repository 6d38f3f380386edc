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

from .common import (ITK_EXTENSIONS, LABELS_SIDECAR_SUFFIX, NIFTI_EXTENSIONS, READ_EXTENSIONS,  # noqa: F401
                     WRITE_EXTENSIONS, label_sidecar_path)
from .read import read_label_names, read_labelmap, read_mask, read_volume  # noqa: F401
from .write import StagedWrites, write_volume  # noqa: F401

__all__ = ["read_volume", "read_labelmap", "read_mask", "read_label_names", "write_volume", "StagedWrites",
           "label_sidecar_path", "READ_EXTENSIONS", "WRITE_EXTENSIONS"]
