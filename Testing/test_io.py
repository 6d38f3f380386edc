import json
import logging
import os

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from MedDiffFMLib.geometry import make_ijk_to_ras, voxel_to_ras
from MedDiffFMLib.io import label_sidecar_path, read_labelmap, read_volume, write_volume
from MedDiffFMLib.volume import Volume

from conftest import euler_rotation

FORMATS = [".nii", ".nii.gz", ".nrrd", ".mha"]
LPS = np.diag([-1.0, -1.0, 1.0])


GEOMETRIES = {
    "oblique": make_ijk_to_ras((1.5, 1.2, 1.0), (-12.5, 33.25, -101.0), euler_rotation(0.25, -0.4, 0.9)),
    "anisotropic": make_ijk_to_ras((3.0, 0.8, 0.7), (120.0, -80.5, 40.0)),
    "flipped": make_ijk_to_ras((2.0, 0.9, 0.6), (5.0, 6.0, 7.0), np.diag([-1.0, 1.0, -1.0])),
    "oblique_flipped": make_ijk_to_ras((2.5, 0.7, 0.8), (1.0, 2.0, 3.0), euler_rotation(0.1, 0.2, 0.3) @ np.diag([1.0, -1.0, 1.0])),
}


def _image(shape=(5, 6, 7), seed=0):
    return (np.random.default_rng(seed).normal(size=shape) * 500.0).astype(np.float32)


@pytest.mark.parametrize("ext", FORMATS)
@pytest.mark.parametrize("geom", list(GEOMETRIES))
def test_round_trip(tmp_path, ext, geom):
    m = GEOMETRIES[geom]
    a = _image()
    path = tmp_path / f"vol{ext}"
    write_volume(path, Volume(a, m))
    v = read_volume(path)
    assert v.array.dtype == np.float32 and v.array.shape == a.shape
    assert np.array_equal(v.array, a)  # bit-identical
    np.testing.assert_allclose(v.ijk_to_ras, m, atol=1e-5, rtol=0)
    assert sorted(os.listdir(tmp_path)) == [f"vol{ext}"]  # no temp files left


@pytest.mark.parametrize("ext", FORMATS)
def test_labelmap_round_trip_with_sidecar(tmp_path, ext):
    m = GEOMETRIES["oblique"]
    lab = np.zeros((4, 5, 6), np.int64)
    lab[1:3, 2:4, 1:5] = 5
    lab[0, 0, 0] = 255
    names = {5: "liver", 255: "body"}
    path = tmp_path / f"seg{ext}"
    write_volume(path, Volume(lab, m), label_names=names)
    assert label_sidecar_path(path) == tmp_path / "seg.labels.json"
    assert json.loads((tmp_path / "seg.labels.json").read_text(encoding="utf-8")) == {"5": "liver", "255": "body"}
    v, got = read_labelmap(path)
    assert np.issubdtype(v.array.dtype, np.integer) and v.array.dtype == np.uint8
    assert np.array_equal(v.array, lab)
    assert got == names
    np.testing.assert_allclose(v.ijk_to_ras, m, atol=1e-5, rtol=0)


def test_labelmap_dtypes_and_no_sidecar(tmp_path):
    m = GEOMETRIES["anisotropic"]
    lab = np.zeros((3, 4, 5), np.int32)
    lab[0, 0, 0] = -3
    lab[1, 1, 1] = 1000
    write_volume(tmp_path / "neg.nrrd", Volume(lab, m))
    v, names = read_labelmap(tmp_path / "neg.nrrd")
    assert v.array.dtype == np.int16 and np.array_equal(v.array, lab) and names is None
    write_volume(tmp_path / "mask.nii.gz", Volume(lab > 0, m))
    v, _ = read_labelmap(tmp_path / "mask.nii.gz")
    assert v.array.dtype == np.uint8 and np.array_equal(v.array, (lab > 0).astype(np.uint8))
    # a float file holding whole numbers is accepted as labels, fractions are not
    write_volume(tmp_path / "f.nii", Volume(lab.astype(np.float32), m))
    v, _ = read_labelmap(tmp_path / "f.nii")
    assert np.issubdtype(v.array.dtype, np.integer) and np.array_equal(v.array, lab)
    write_volume(tmp_path / "g.nii", Volume(np.full((2, 2, 2), 0.5, np.float32), m))
    with pytest.raises(ValueError, match="non-integer"):
        read_labelmap(tmp_path / "g.nii")


def test_cross_check_nibabel_write_simpleitk_read(tmp_path):
    """Our NIfTI path (nibabel) and ITK agree on where each voxel is in RAS."""
    m = GEOMETRIES["oblique_flipped"]
    a = _image(seed=1)
    path = tmp_path / "x.nii.gz"
    write_volume(path, Volume(a, m))
    img = sitk.ReadImage(str(path))
    arr = sitk.GetArrayFromImage(img)
    assert np.array_equal(arr, a)
    for ijk in [(0, 0, 0), (6, 0, 0), (0, 5, 0), (0, 0, 4), (3, 2, 1), (6, 5, 4)]:
        ras_itk = LPS @ np.asarray(img.TransformIndexToPhysicalPoint(ijk))
        np.testing.assert_allclose(ras_itk, voxel_to_ras(m, ijk)[0], atol=1e-4)
        assert arr[ijk[2], ijk[1], ijk[0]] == a[ijk[2], ijk[1], ijk[0]]


def test_cross_check_simpleitk_write_nibabel_read(tmp_path):
    """A NIfTI written by ITK reads (through nibabel) with ITK's voxel positions."""
    img = sitk.GetImageFromArray(_image(seed=2))
    img.SetSpacing((0.7, 0.9, 2.5))
    img.SetOrigin((10.0, -20.0, 30.0))
    d_lps = euler_rotation(0.3, 0.1, -0.6)
    img.SetDirection(d_lps.ravel().tolist())
    path = tmp_path / "itk.nii.gz"
    sitk.WriteImage(img, str(path))
    v = read_volume(path)
    assert np.array_equal(v.array, sitk.GetArrayFromImage(img))
    for ijk in [(0, 0, 0), (6, 5, 4), (1, 4, 2)]:
        ras_itk = LPS @ np.asarray(img.TransformIndexToPhysicalPoint(ijk))
        np.testing.assert_allclose(voxel_to_ras(v.ijk_to_ras, ijk)[0], ras_itk, atol=1e-4)


def test_cross_check_nrrd_against_nibabel_expectation(tmp_path):
    """Our NRRD path (SimpleITK, LPS) places voxels where nibabel's affine says they are."""
    m = GEOMETRIES["oblique"]
    a = _image(seed=3)
    write_volume(tmp_path / "x.nrrd", Volume(a, m))
    expect = nib.Nifti1Image(a.transpose(2, 1, 0), m)  # nibabel: (i, j, k) data, RAS affine
    img = sitk.ReadImage(str(tmp_path / "x.nrrd"))
    assert img.GetSize() == expect.shape
    for ijk in [(0, 0, 0), (6, 5, 4), (2, 3, 1)]:
        ras_nib = nib.affines.apply_affine(expect.affine, ijk)
        ras_itk = LPS @ np.asarray(img.TransformIndexToPhysicalPoint(ijk))
        np.testing.assert_allclose(ras_itk, ras_nib, atol=1e-6)
        assert sitk.GetArrayViewFromImage(img)[ijk[2], ijk[1], ijk[0]] == np.asanyarray(expect.dataobj)[ijk]
    # and the known LPS -> RAS sign flip for an identity-direction ITK image
    img = sitk.GetImageFromArray(np.zeros((2, 3, 4), np.float32))
    img.SetSpacing((0.5, 0.6, 2.0))
    img.SetOrigin((10.0, 20.0, 30.0))
    sitk.WriteImage(img, str(tmp_path / "lps.mha"))
    v = read_volume(tmp_path / "lps.mha")
    np.testing.assert_allclose(v.ijk_to_ras[:3, 3], [-10.0, -20.0, 30.0])
    np.testing.assert_allclose(v.ijk_to_ras[:3, :3], np.diag([-0.5, -0.6, 2.0]))


def _write_dicom_series(folder, hu, spacing_ijk, origin_lps, d_lps, series_uid, slope=2.0, intercept=-1024.0):
    """A CT series written slice by slice; ITK stores (HU - intercept) / slope."""
    os.makedirs(folder, exist_ok=True)
    img = sitk.GetImageFromArray(hu)
    img.SetSpacing(spacing_ijk)
    img.SetOrigin(origin_lps)
    img.SetDirection(np.asarray(d_lps).ravel().tolist())
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    orient = "\\".join(f"{x:.10f}" for x in list(d_lps[:, 0]) + list(d_lps[:, 1]))
    for k in range(img.GetDepth()):
        s = img[:, :, k]
        pos = "\\".join(f"{x:.10f}" for x in img.TransformIndexToPhysicalPoint((0, 0, k)))
        for tag, value in [
            ("0008|0060", "CT"), ("0008|0016", "1.2.840.10008.5.1.4.1.1.2"),
            ("0020|000d", "1.2.826.0.1.1"), ("0020|000e", series_uid),
            ("0008|0018", f"{series_uid}.{k + 1}"), ("0020|0013", str(k + 1)),
            ("0020|0037", orient), ("0020|0032", pos), ("0018|0050", f"{spacing_ijk[2]}"),
            ("0028|1052", f"{intercept}"), ("0028|1053", f"{slope}"),
        ]:
            s.SetMetaData(tag, value)
        writer.SetFileName(os.path.join(folder, f"{series_uid}_{k:03d}.dcm"))
        writer.Execute(s)


def test_dicom_series(tmp_path, caplog):
    rng = np.random.default_rng(4)
    hu = (rng.integers(-512, 1000, size=(4, 6, 5)) * 2).astype(np.int16)  # even: exact with slope 2
    d_lps = euler_rotation(0.0, 0.0, 0.35)
    folder = tmp_path / "dicom"
    _write_dicom_series(folder, hu, (0.7, 0.8, 3.0), (10.0, -20.0, 30.0), d_lps, "1.2.826.0.1.2")
    # a second, smaller series in the same folder: the larger one must be read
    _write_dicom_series(folder, hu[:2], (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3), "1.2.826.0.1.3")
    with caplog.at_level(logging.WARNING, logger="MedDiffFMLib.io"):
        v = read_volume(folder)
    assert "2 DICOM series" in caplog.text
    assert v.array.dtype == np.float32
    assert np.array_equal(v.array, hu.astype(np.float32))
    expect = make_ijk_to_ras((3.0, 0.8, 0.7), LPS @ np.array([10.0, -20.0, 30.0]), LPS @ d_lps)
    np.testing.assert_allclose(v.ijk_to_ras, expect, atol=1e-5)


def test_squeeze_singleton_4d_and_refuse_others(tmp_path):
    m = GEOMETRIES["anisotropic"]
    a = _image((3, 4, 5))
    nib.save(nib.Nifti1Image(a.transpose(2, 1, 0)[..., None], m), str(tmp_path / "t1.nii"))
    v = read_volume(tmp_path / "t1.nii")
    assert np.array_equal(v.array, a)
    nib.save(nib.Nifti1Image(np.stack([a.transpose(2, 1, 0)] * 2, -1), m), str(tmp_path / "t2.nii"))
    with pytest.raises(ValueError, match="not a 3-D"):
        read_volume(tmp_path / "t2.nii")
    nib.save(nib.Nifti1Image(np.zeros((4, 5), np.float32), np.eye(4)), str(tmp_path / "flat.nii"))
    with pytest.raises(ValueError, match="not a 3-D"):
        read_volume(tmp_path / "flat.nii")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5), np.float32)), str(tmp_path / "flat.nrrd"))
    with pytest.raises(ValueError, match="not a 3-D"):
        read_volume(tmp_path / "flat.nrrd")
    flat = Volume(a, m)
    flat.array = np.zeros((4, 5), np.float32)  # a Volume edited into 2-D after construction
    with pytest.raises(ValueError, match="3-D"):
        write_volume(tmp_path / "bad.nii", flat)
    with pytest.raises(ValueError, match="3-D"):
        Volume(np.zeros((2, 2), np.float32), np.eye(4))


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_volume(tmp_path / "missing.nii.gz")
    (tmp_path / "x.png").write_bytes(b"\x89PNG")
    with pytest.raises(ValueError, match="unsupported extension"):
        read_volume(tmp_path / "x.png")
    with pytest.raises(ValueError, match="unsupported extension"):
        write_volume(tmp_path / "x.png", Volume(_image(), np.eye(4)))
    for name in ["bad.nii.gz", "bad.nii", "bad.nrrd", "bad.mha"]:
        (tmp_path / name).write_bytes(b"this is not an image" * 10)
        with pytest.raises(ValueError, match="could not read"):
            read_volume(tmp_path / name)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no DICOM series"):
        read_volume(tmp_path / "empty")
    m = np.eye(4)
    m[0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        write_volume(tmp_path / "nan.nrrd", Volume(_image(), m))
    with pytest.raises(ValueError, match="absurd spacing"):
        write_volume(tmp_path / "tiny.nii", Volume(_image(), make_ijk_to_ras((1e-6, 1.0, 1.0))))
    assert not any(p.name.startswith(("nan", "tiny", ".")) for p in tmp_path.iterdir())


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    import MedDiffFMLib.io.write as mio

    target = tmp_path / "out.nrrd"
    write_volume(target, Volume(_image(), GEOMETRIES["oblique"]))
    before = target.read_bytes()

    def boom(tmp, *args, **kwargs):
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(mio, "_write_itk", boom)
    with pytest.raises(OSError, match="disk full"):
        write_volume(target, Volume(_image(seed=9), GEOMETRIES["oblique"]))
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.nrrd"]
