"""Seedable synthetic CT phantoms of the head and neck, the chest and the abdomen (family v2).

The phantoms feed the tests, the demo, CPU training and the benchmarks. Each one is a
CT-like image in Hounsfield units with a TotalSegmentator-style label map, built from simple
analytic shapes (ellipsoids, tubes, superellipse layers, sloping rib arcs) and smooth random
fields, all vectorised numpy. Held-out evaluation uses a different family, built by other
code; this one is for training.

Geometry
--------
Arrays are indexed ``(k, j, i) = (z, y, x)``. The body lives in RAS millimetres and a grid
samples it: any spacing, any orientation (``ijk_to_ras``), any extent. The default matrix
(:func:`default_ijk_to_ras`) is an axial DICOM series (``i`` towards the patient's left,
``j`` posterior, ``k`` superior) centred at RAS 0. With ``fov_fill`` the body is scaled to
the grid's field of view (a miniature body on a small grid); without it the body has its
adult size and the grid shows part of it (:func:`training_phantom` draws such cases).

Each voxel is the mean of sub-samples through its slab along k (the slice profile) and, on
coarse pixels, through its footprint, with an in-plane point-spread: a thick slice is the
slab mean of thin ones. Labels are decided at the voxel centre, by closed-form tests of its
position in the anatomy frame, so a structure lands at the same RAS place on every grid.

Variation (each one can be switched off, :class:`Variation`): smooth random deformation,
organ shape, size and position, body habitus, texture at three scales, partial volume, slab
profile and contrast phase (native, arterial, portal venous). Images are noise-free unless
``noise_hu`` asks for CT noise (:func:`add_ct_noise`).

Modules: :mod:`.params` (checks, switches, per-seed parameters), :mod:`.tissues` (HU per
phase), :mod:`.fields` (random fields), :mod:`.canvas` (frame and painting), :mod:`.trunk`,
:mod:`.thorax`, :mod:`.head`, :mod:`.spine` (anatomy), :mod:`.render` (image formation),
:mod:`.noise`, :mod:`.lesions`, :mod:`.make` (:func:`make_phantom`) and :mod:`.cases`
(:func:`training_phantom`).
"""

from .cases import training_phantom
from .lesions import LESION_ORGANS, insert_lesions
from .make import default_ijk_to_ras, make_phantom
from .noise import add_ct_noise
from .params import REGIONS, Variation
from .tissues import PHASES
from .types import Lesion, Phantom

__all__ = [
    "REGIONS",
    "PHASES",
    "Phantom",
    "Lesion",
    "Variation",
    "make_phantom",
    "training_phantom",
    "add_ct_noise",
    "insert_lesions",
    "default_ijk_to_ras",
    "LESION_ORGANS",
]
