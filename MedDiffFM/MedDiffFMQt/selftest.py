"""The module's self-test, run inside Slicer ("Reload and Test", or ctest through
``slicer_add_python_unittest``). The node round trip needs no PyTorch; the tiny-model run needs
it and reports itself as skipped, without failing, when PyTorch is missing.
"""

import os

import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleTest


def _module():
    """The loaded MedDiffFM module (imported when a test runs, after it has finished loading)."""
    import MedDiffFM

    return MedDiffFM


class MedDiffFMTest(ScriptedLoadableModuleTest):
    """Runs in Slicer (Reload and Test, or ctest). The node round trip needs no PyTorch; the tiny
    model run needs it and reports itself as skipped (without failing) when it is missing."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_NodeRoundTrip()
        self.setUp()
        import importlib.util

        if importlib.util.find_spec("torch") is None:
            # "Reload and Test" calls runTest() directly, outside a unittest runner: raising
            # SkipTest here would show as a failure, so say it and return.
            self.delayDisplay("Tiny model test skipped: PyTorch is not installed (press Apply once to install it)")
            return
        self.test_TinyModelDenoise()

    def _syntheticVolume(self):
        import numpy as np

        rng = np.random.default_rng(0)
        kk, jj, ii = np.mgrid[0:12, 0:24, 0:24]
        body = ((jj - 12) ** 2 + (ii - 12) ** 2) < 100
        array = (np.where(body, 40, -1000) + rng.normal(0, 20, body.shape)).astype(np.int16)
        ijkToRas = np.array([[-0.9, 0.05, 0.0, 10.0], [0.0, -0.85, 0.1, -20.0], [0.0, 0.0, 2.5, 5.0], [0, 0, 0, 1.0]])
        node = slicer.util.addVolumeFromArray(array, ijkToRas, name="SyntheticCT")
        return node, array, ijkToRas

    def test_NodeRoundTrip(self):
        """The module's node logic with a stand-in runner (no PyTorch needed)."""
        import numpy as np

        from MedDiffFMLib.tasks.base import TaskResult
        from MedDiffFMLib.volume import Volume
        from MedDiffFMSlicer import nodes

        self.delayDisplay("Node round trip")
        node, array, ijkToRas = self._syntheticVolume()
        vol = nodes.volume_from_node(node)
        self.assertTrue(np.array_equal(vol.array, array.astype(np.float32)))
        self.assertTrue(np.allclose(vol.ijk_to_ras, ijkToRas))

        def runner(task, request, model=None, **kwargs):
            image = request.image
            zmap = np.abs(image.array - image.array.mean()) / image.array.std()
            return TaskResult(volumes={"anomaly_map": Volume(zmap.astype(np.float32), image.ijk_to_ras)},
                              segmentations={"anomaly": Volume(zmap > 4, image.ijk_to_ras)}, summary="ok")

        outputs = nodes.process(node, "anomaly", runner=runner)
        self.assertEqual(set(outputs), {"anomaly_map", "anomaly_segmentation"})
        self.assertTrue(np.allclose(nodes.ijk_to_ras_of(outputs["anomaly_map"]), ijkToRas))
        self.assertTrue(np.array_equal(slicer.util.arrayFromVolume(node), array))
        _module().MedDiffFMLogic.showResults(node, outputs, show3D=True)
        self.delayDisplay("Node round trip passed")

    def _tinyModelDirectory(self):
        """A model directory with the library's 'tiny' preset and random weights."""
        import tempfile

        model = os.environ.get("MEDDIFFFM_TEST_MODEL")
        if model:
            return model
        import torch

        from MedDiffFMLib.checkpoint import save_model
        from MedDiffFMLib.networks import FoundationUNet, preset

        torch.manual_seed(0)
        net = FoundationUNet(preset("tiny"))
        directory = os.path.join(tempfile.mkdtemp(prefix="meddifffm-test-", dir=slicer.app.temporaryPath), "tiny")
        save_model(directory, net.cfg, net.state_dict())
        return directory

    def test_TinyModelDenoise(self):
        import numpy as np

        self.delayDisplay("Denoising a synthetic CT with a tiny model in the worker process")
        logic = _module().MedDiffFMLogic()
        logic.ensureDependencies(askConfirmation=False)
        node, array, ijkToRas = self._syntheticVolume()
        outputs = logic.process(node, "denoise", model=self._tinyModelDirectory(), device="cpu", steps=2)
        denoised = outputs["denoised"]
        self.assertEqual(slicer.util.arrayFromVolume(denoised).shape, array.shape)
        self.assertTrue(np.allclose(slicer.util.arrayFromVolume(node), array))
        self.assertTrue(np.isfinite(slicer.util.arrayFromVolume(denoised)).all())
        shNode = slicer.mrmlScene.GetSubjectHierarchyNode()
        self.assertEqual(shNode.GetItemParent(shNode.GetItemByDataNode(denoised)),
                         shNode.GetItemParent(shNode.GetItemByDataNode(node)))
        self.delayDisplay("Tiny model test passed")
