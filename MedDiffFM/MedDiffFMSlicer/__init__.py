"""Slicer-side helpers of the MedDiffFM module that need MRML and VTK but not Qt.

``nodes``: MRML nodes <-> MedDiffFMLib volumes and results. ``headless``: a MRML scene with the
volumes, segmentations and subject hierarchy logics, for batch runs and tests without the
Slicer application (``pip install slicer-core``).
"""
