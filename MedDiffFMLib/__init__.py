"""MedDiffFMLib: a 3D CT diffusion foundation model (after MedDiff-FM) and its six tasks.

Pure Python on torch, MONAI and numpy. Never imports slicer, qt or vtk, so the same code runs
inside 3D Slicer, from a shell (``meddiff-fm``) and under ``torchrun``.

Array convention everywhere: a volume is a float32 numpy array indexed (k, j, i) = (z, y, x)
in Hounsfield units, plus a 4x4 ``ijk_to_ras`` matrix (Slicer's convention: the origin is the
centre of voxel (0, 0, 0), columns are the i, j, k axes scaled by the spacing in mm).
"""

__version__ = "0.1.0"
