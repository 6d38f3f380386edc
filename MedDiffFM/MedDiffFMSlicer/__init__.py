"""What the MedDiffFM module decides and does to the scene, without Qt (MRML, VTK and the library
only), so that it is tested on the ``slicer-core`` wheel against a real MRML scene:

* ``taskoptions``: the panel's task options, first-run values and defaults, from the task registry;
* ``nodes``: nodes -> task request, and the one run path (``process``);
* ``outputs`` / ``display``: results -> nodes beside the input; terminology, anomaly map, 3D;
* ``run``: the worker job a GUI polls, the logged console command, the GPU-memory check;
* ``segments``: the mask segment list, kept current through the segmentation's segment events;
* ``models``: installed models (size, SHA-256), import, remove, the models folder;
* ``dependencies``: what to install on the first Apply, never replacing PyTorch;
* ``sampledata``: the synthetic phantom registered in Sample Data;
* ``headless``: a MRML scene without the Slicer application (batch runs, tests).
"""
