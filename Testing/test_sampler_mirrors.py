"""The mirror self-ensemble: every estimate averaged over mirror images of the volume's content
(image, anatomy and control flipped together, each estimate flipped back; the coordinates stay)."""

import numpy as np
import pytest
import torch

from MedDiffFMLib import anatomy
from MedDiffFMLib.networks import preset
from MedDiffFMLib.sampling import MIRROR_AXES, Condition, MirrorEnsemble, PatchSampler, SamplerOptions, mirrored
from MedDiffFMLib.tasks import TaskRequest, check_params, run_task
from MedDiffFMLib.volume import Volume

from conftest import task_grid
from sampler_helpers import Recorder, global_coords, noise


LIVER_CHANNEL = anatomy.GROUP_NAMES.index("liver")
LIVER = 2 + LIVER_CHANNEL  # its value in a group map (0 outside, 1 body only)


def _tissue_and_place_field(x_t, t, coords, anat, region):
    """An estimate from a voxel's tissue and its window coordinates, not from the image."""
    return 0.5 * anat[:, LIVER_CHANNEL:LIVER_CHANNEL + 1] + 0.2 * coords[:, 2:3] + 0.3 * coords[:, :1] + 0 * x_t


@pytest.mark.parametrize("shape", [(16, 16, 16), (40, 23, 9)])
def test_tissue_flips_with_the_image_and_the_coordinates_stay(shape):
    # anatomy flipped with the image and every estimate flipped back: the tissue term comes back
    # in place in every view. The coordinate channels stay, so each view's coordinate term lands
    # mirrored: the k term cancels over the k mirror images, and the i term over the i ones.
    groups = torch.zeros(shape, dtype=torch.int8)
    groups[2:shape[0] // 2, 3:shape[1] - 2, 1:shape[2] // 2] = LIVER
    cond = Condition(anatomy=groups)
    c = global_coords(shape)
    liver = (groups == LIVER).float()
    x = noise(shape)
    views = {}
    for m in (1, 2, 8):
        net = Recorder(fn=_tissue_and_place_field, cfg=preset("tiny"))
        views[m] = (PatchSampler(net, SamplerOptions(batch_size=3, mirrors=m)).predict_eps(x, 500, cond), net)
    torch.testing.assert_close(views[1][0], 0.5 * liver + 0.2 * c[2] + 0.3 * c[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(views[2][0], 0.5 * liver + 0.2 * c[2], atol=1e-5, rtol=0)  # the k mirror first
    torch.testing.assert_close(views[8][0], 0.5 * liver, atol=1e-5, rtol=0)
    # 8 views, each seeing its own mirror image of the input
    windows = len(views[1][1].windows())
    seen = [w[0] for w in views[8][1].windows()]
    assert len(seen) == 8 * windows
    if windows == 1:
        for k, axes in enumerate(MIRROR_AXES):
            torch.testing.assert_close(seen[k], x.flip(list(axes)) if axes else x)


def test_a_direction_dependent_estimate_averages_over_its_mirror_images():
    # the next slice, in the mirror image along k, is the previous one: two views average both
    def next_slice(x_t, t, coords, anat, region):
        return torch.cat([x_t[:, :, 1:], x_t[:, :, -1:]], dim=2)

    shape = (16, 16, 16)
    x = noise(shape)
    one = PatchSampler(Recorder(fn=next_slice, cfg=preset("tiny")), SamplerOptions()).predict_eps(x, 500, Condition())
    two = PatchSampler(Recorder(fn=next_slice, cfg=preset("tiny")), SamplerOptions(mirrors=2)).predict_eps(
        x, 500, Condition())
    torch.testing.assert_close(one[:-1], x[1:])
    torch.testing.assert_close(two[1:-1], (x[2:] + x[:-2]) / 2)


def test_mirrored_conditions_flip_back_to_the_original():
    anat = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    control = torch.randn(1, 3, 4, 5)
    cond = Condition(spacing=(2.0, 1.0, 0.5), region=2, anatomy=anat, control=control,
                     coord_range=[(-1.0, 0.0), (0.0, 1.0), (-0.5, 0.5)])
    m = mirrored(cond, (0, 2))
    assert m.coord_range == cond.coord_range  # the windows keep their place
    assert torch.equal(m.anatomy, anat.flip([1, 3])) and torch.equal(m.control, control.flip([1, 3]))
    assert m.spacing == cond.spacing and m.region == cond.region
    back = mirrored(m, (0, 2))
    assert torch.equal(back.anatomy, anat) and back.control.equal(control)


def test_progress_counts_the_windows_of_every_view():
    sampler = PatchSampler(Recorder(fn=_tissue_and_place_field, cfg=preset("tiny")),
                           SamplerOptions(batch_size=2, mirrors=4))
    shape = (40, 23, 9)
    den = sampler.denoiser(Condition(), shape)
    assert isinstance(den, MirrorEnsemble)
    reports = []
    den(noise(shape), 500, on_window=lambda d, n: reports.append((d, n)))
    windows = len(sampler.layout(shape).slices)
    assert reports[-1] == (4 * windows, 4 * windows)
    assert [d for d, _ in reports] == sorted(d for d, _ in reports)


@pytest.mark.parametrize("bad", [0, 3, 5, 16])
def test_mirror_counts_other_than_1_2_4_8_are_refused(bad):
    with pytest.raises(ValueError, match="mirrors"):
        check_params("denoise", {"mirrors": bad})
    with pytest.raises(ValueError, match="mirrors"):
        SamplerOptions(mirrors=bad)


def test_denoising_with_mirrors_keeps_the_grid_and_runs_every_view(tiny_model_dir, task_phantom, network_calls):
    image = Volume(task_phantom.hu.copy(), task_grid())
    req = lambda m: TaskRequest(image=image, region="abdomen", params={"mirrors": m, "noise_level": 20.0})  # noqa: E731
    one = run_task("denoise", req(1), tiny_model_dir, device="cpu")
    calls_one = sum(network_calls)
    network_calls.clear()
    four = run_task("denoise", req(4), tiny_model_dir, device="cpu")
    assert sum(network_calls) == 4 * calls_one
    a, b = one.volumes["denoised"], four.volumes["denoised"]
    assert np.array_equal(b.ijk_to_ras, image.ijk_to_ras) and b.array.shape == image.shape
    assert not np.array_equal(a.array, b.array)
