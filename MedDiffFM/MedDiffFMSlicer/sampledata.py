"""The synthetic sample for Sample Data: a phantom CT (not a patient) and a drawn mask.

The files ship with the module (``Resources/SampleData/``), so a new user can try every task in
two clicks without a download: *Sample Data → MedDiffFM → synthetic chest*, then Apply (the mask
segmentation is there for lesion generation and inpainting). The phantom uses a held-out seed
(:data:`MedDiffFMLib.demo.HELD_OUT_SEED`; the demo weights were trained on seeds below 10 000)
and every name says it is synthetic. :func:`write_sample` made the files
(``python -m MedDiffFMSlicer.sampledata`` from the ``MedDiffFM`` folder, with slicer-core).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

SAMPLE_FOLDER = os.path.join("Resources", "SampleData")
SAMPLE_NAME = "MedDiffFM synthetic chest (phantom, not a patient)"
VOLUME_FILE = "MedDiffFM-SyntheticChest.nrrd"
MASK_FILE = "MedDiffFM-SyntheticChest-mask.seg.nrrd"
VOLUME_NODE_NAME = "SyntheticChest (phantom)"
MASK_NODE_NAME = "SyntheticChest mask"
SHAPE_KJI = (40, 96, 96)
SPACING_KJI = (3.0, 1.5, 1.5)


@dataclass(frozen=True)
class SampleFile:
    file_name: str
    node_name: str
    file_type: str
    sha256: str


# SHA-256 of the shipped files (Sample Data checks them); test_sampledata recomputes them.
FILES = (
    SampleFile(VOLUME_FILE, VOLUME_NODE_NAME, "VolumeFile",
               "d9ac3038edd062c55817cf27d934745642321d9006e48013ef40f2891fcf6b24"),
    SampleFile(MASK_FILE, MASK_NODE_NAME, "SegmentationFile",
               "f71aa09a8aab4b4181f336128d745c544f852defcd4ea633a19d64f561dbe1c7"),
)


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sources(module_dir: str) -> list[dict]:
    """Keyword arguments for ``SampleData.SampleDataLogic.registerCustomSampleDataSource``
    (files given as ``file://`` URIs of the shipped copies)."""
    from pathlib import Path

    folder = Path(module_dir) / SAMPLE_FOLDER
    return [{
        "sampleName": SAMPLE_NAME,
        "uris": [(folder / f.file_name).resolve().as_uri() for f in FILES],
        "fileNames": [f.file_name for f in FILES],
        "nodeNames": [f.node_name for f in FILES],
        "loadFileTypes": [f.file_type for f in FILES],
        "checksums": [f"SHA256:{f.sha256}" for f in FILES],
        "thumbnailFileName": str(Path(module_dir) / "Resources" / "Icons" / "MedDiffFM.png"),
    }]


def write_sample(out_dir: str) -> dict[str, str]:
    """Make the phantom and its mask and write them with Slicer's own writers; file -> SHA-256."""
    import numpy as np

    from MedDiffFMLib.demo import HELD_OUT_SEED
    from MedDiffFMLib.phantoms import make_phantom
    from MedDiffFMLib.volume import Volume

    import slicer

    from .headless import create_scene
    from .outputs import new_segmentation_node, new_volume_node

    phantom = make_phantom("chest", shape_kji=SHAPE_KJI, spacing_kji=SPACING_KJI, seed=HELD_OUT_SEED, lesions=0)
    hu = np.clip(np.round(phantom.hu), -1024, 3071).astype(np.int16)
    scene = create_scene().scene
    ct = new_volume_node(scene, Volume(hu, phantom.ijk_to_ras), VOLUME_NODE_NAME)
    ct.SetAttribute("MedDiffFM.synthetic", "phantom, not a patient")
    # A ball deep inside soft tissue (the point farthest from anything else), where a lesion can
    # be generated or inpainted.
    from scipy import ndimage

    soft = (phantom.clean_hu > -200) & (phantom.clean_hu < 200) & (phantom.labels > 0)
    depth = ndimage.distance_transform_edt(soft, sampling=SPACING_KJI)
    centre = np.unravel_index(int(np.argmax(depth)), depth.shape)
    radius = min(10.0, 0.8 * float(depth[centre]))
    k, j, i = np.indices(hu.shape)
    r2 = sum(((a - c) * s) ** 2 for a, c, s in zip((k, j, i), centre, SPACING_KJI))
    mask = (r2 <= radius ** 2) & soft
    seg = new_segmentation_node(scene, {"mask": Volume(mask, phantom.ijk_to_ras)}, {}, MASK_NODE_NAME, ct)
    os.makedirs(out_dir, exist_ok=True)
    written = {}
    for node, name, cls in ((ct, VOLUME_FILE, "vtkMRMLVolumeArchetypeStorageNode"),
                            (seg, MASK_FILE, "vtkMRMLSegmentationStorageNode")):
        storage = getattr(slicer, cls)()
        storage.SetScene(scene)
        storage.SetUseCompression(True)
        path = os.path.join(out_dir, name)
        storage.SetFileName(path)
        if not storage.WriteData(node):
            raise RuntimeError(f"could not write {path}")
        written[name] = sha256(path)
    return written


if __name__ == "__main__":
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name, digest in write_sample(os.path.join(here, SAMPLE_FOLDER)).items():
        print(digest, name)
