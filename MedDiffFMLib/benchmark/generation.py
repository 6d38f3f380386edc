"""Sections that generate content: synthesis from anatomy, inpainting and lesion generation."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .. import anatomy, metrics
from ..volume import Volume
from . import baselines
from .options import BACKGROUND_NOISE_HU, REGIONS, UNPHASED_SYNTHESIS
from .task_facts import primary_volume

INPAINT_RADIUS_MM = 8.0
CAPTIONS = {
    "synthesis": (
        "Synthesis conditioned on the phantom's label map, on the case's clinical grid, for as many cases of each "
        "region as the other sections have cases (each organ group lives in one region). Per organ group present "
        "(>= 0.5% of the body): the Dice against the conditioning mask of a nearest-mean threshold segmentation "
        "(each body voxel gets the group whose mean HU in the real phantom is nearest; a stand-in for a segmenter). "
        "'real phantom' is that segmentation's ceiling; 'Dice / ceiling' is the model's fraction of it. 'model' is "
        "told the case's contrast phase, as a user asks for one; 'model, phase not given' runs on the task's "
        "defaults."),
    "inpaint": (
        f"Mask: an ellipsoid (up to {INPAINT_RADIUS_MM:g} mm) deep inside a lesion-free organ (liver, spleen, kidney, "
        f"lung or brain) of the case with {BACKGROUND_NOISE_HU:g} HU noise; healthy content asked for. Ring: organ "
        "voxels within one radius around the mask. Ideal: |mask mean - ring mean| near 0 and texture std ratio near "
        "1 (the unchanged input shows both); outside identical must be 1."),
    "lesion": (
        "Same kind of mask. |contrast| = |mean in the mask - ring mean|; threshold Dice: voxels near the mask that "
        "differ from the ring mean by more than half the contrast (in its direction) against the mask. The family's "
        "own lesions, measured the same way, give the range a lesion should fall in."),
}


def synthesis_case_indices(cases: int) -> range:
    """The case indices synthesis runs: ``cases`` of every region, because its targets are per
    organ group and each group lives in one region (with regions cycling over ``cases`` alone, 5
    cases held one abdomen: kidney and liver were judged on one case each)."""
    return range(int(cases) * len(REGIONS))


def run_synthesis(ctx, family: str) -> None:
    from ..tasks import TaskRequest
    from ..tasks.registry import TASKS

    default_phase = TASKS["synthesize"].params["contrast_phase"].default
    for i in synthesis_case_indices(ctx.opts.cases):
        case = ctx.case(family, i)
        body = case.body
        groups, _ = anatomy.group_map(case.labels, case.label_names)
        reported = baselines.main_groups(groups, body)
        means = baselines.class_means(case.clean_hu, groups, body, case.region, reported)
        ceiling_seg = baselines.nearest_mean_segmentation(case.clean_hu, means, body, case.region)
        ceiling = {v: metrics.dice(ceiling_seg == v, (groups == v) & body) for v in reported}
        for v in reported:
            ctx.add(family, "synthesis", baselines.group_name(v), "real phantom (ceiling)", case.name,
                    threshold_dice=ceiling[v])
        ctx.add(family, "synthesis", "all groups (mean)", "real phantom (ceiling)", case.name,
                threshold_dice=float(np.mean(list(ceiling.values()))))
        runs = {}  # contrast phase -> (result, seconds): a case in the default phase is sampled once
        for method, phase in (("model", case.phase), (UNPHASED_SYNTHESIS, None)):
            sampled_phase = phase or default_phase
            if sampled_phase not in runs:
                params = ctx.params("synthesis", **({"contrast_phase": phase} if phase else {}))
                runs[sampled_phase] = ctx.run_model(
                    "synthesis", TaskRequest(anatomy=case.label_volume(), anatomy_names=case.label_names,
                                             region=case.region, params=params))
            res, secs = runs[sampled_phase]
            model_seg = baselines.nearest_mean_segmentation(primary_volume("synthesize", res).array, means, body,
                                                            case.region)
            dices = []
            for v in reported:
                dices.append(metrics.dice(model_seg == v, (groups == v) & body))
                ctx.add(family, "synthesis", baselines.group_name(v), method, case.name, threshold_dice=dices[-1],
                        ceiling_fraction=dices[-1] / ceiling[v] if ceiling[v] > 0 else None)
            ctx.add(family, "synthesis", "all groups (mean)", method, case.name, threshold_dice=float(np.mean(dices)),
                    seconds=secs)
            ctx.log(f"synthesis {case.name} ({method}): {secs:.1f} s")


def _local_cases(ctx, family: str):
    """(case, noisy image, mask, ring, near, organ name) per case with room for a mask (cached)."""
    from ..heldout.regions import LESION_ORGANS

    for i in range(ctx.opts.cases):
        key = ("local", family, i)
        if key not in ctx._cases:
            case = ctx.case(family, i)
            values = {name: v for v, name in case.label_names.items()}
            candidates = [values[n] for n in LESION_ORGANS[case.region] if n in values]
            try:
                mask, label = baselines.organ_ellipsoid_mask(case.labels, case.spacing_kji, candidates,
                                                             INPAINT_RADIUS_MM)
            except ValueError:
                ctx.notes.append(f"{case.name}: no lesion organ in the field of view; inpainting and lesion "
                                 "generation skip it")
                ctx._cases[key] = None
                continue
            organ = case.labels == label
            radius = max(baselines.equivalent_radius_mm(mask, case.voxel_ml), 2.0 * float(case.spacing_kji.max()))
            ring = baselines.organ_ring(mask, organ, case.spacing_kji, radius)
            near = baselines.near_mask(mask, case.spacing_kji, radius)
            image = case.noisy(BACKGROUND_NOISE_HU, case.seed + 5)
            ctx._cases[key] = (case, image, mask, ring, near, case.label_names[label])
        if ctx._cases[key] is not None:
            yield ctx._cases[key]


def _masked_request(ctx, section: str, case, image, mask, **params):
    from ..tasks import TaskRequest

    return TaskRequest(image=case.volume(image), region=case.region, mask=Volume(mask.astype(np.uint8),
                                                                                  case.ijk_to_ras),
                       params=ctx.params(section, **params))


def run_inpaint(ctx, family: str) -> None:
    for case, image, mask, ring, near, organ in _local_cases(ctx, family):
        before = metrics.region_contrast(image, mask, ring)
        ctx.add(family, "inpaint", "healthy content", "input (unchanged)", case.name,
                abs_delta_mean_hu=abs(before["contrast"]), std_ratio=before["std_ratio"])
        res, secs = ctx.run_model("inpaint", _masked_request(ctx, "inpaint", case, image, mask, content="healthy"))
        out = primary_volume("inpaint", res).array
        after = metrics.region_contrast(out, mask, ring)
        ctx.add(family, "inpaint", "healthy content", "model (RePaint + lesion ControlNet)", case.name,
                abs_delta_mean_hu=abs(after["contrast"]), std_ratio=after["std_ratio"],
                outside_identical=metrics.identical_fraction(out, image, ~mask), seconds=secs)
        ctx.log(f"inpaint {case.name} ({organ}, {int(mask.sum())} voxels): {secs:.1f} s")


def run_lesion(ctx, family: str) -> None:
    for case, image, mask, ring, near, organ in _local_cases(ctx, family):
        res, secs = ctx.run_model("lesion", _masked_request(ctx, "lesion", case, image, mask))
        out = primary_volume("lesion", res).array
        ctx.add(family, "lesion", "generated in the mask", "model (lesion ControlNet)", case.name,
                abs_contrast_hu=abs(metrics.region_contrast(out, mask, ring)["contrast"]),
                threshold_dice=metrics.threshold_dice(out, mask, ring, near),
                outside_identical=metrics.identical_fraction(out, image, ~mask), seconds=secs)
        ctx.add(family, "lesion", "generated in the mask", "input (no lesion)", case.name,
                abs_contrast_hu=abs(metrics.region_contrast(image, mask, ring)["contrast"]),
                threshold_dice=metrics.threshold_dice(image, mask, ring, near))
        _family_lesions(ctx, family, case)
        ctx.log(f"lesion {case.name} ({organ}, {int(mask.sum())} voxels): {secs:.1f} s")


def _family_lesions(ctx, family: str, case) -> None:
    """The family's own lesions of this case (its lesion version), each measured like a generated one."""
    index = next(i for i in range(ctx.opts.cases) if ctx.case(family, i) is case)
    try:
        lesion_case = ctx.case(family, index, lesions=True)
    except ValueError:
        return
    image = lesion_case.noisy(BACKGROUND_NOISE_HU, lesion_case.seed + 1)
    components, count = ndimage.label(lesion_case.lesion_mask)
    spacing = lesion_case.spacing_kji
    for c in range(1, count + 1):
        lesion = components == c
        organ_label = int(np.bincount(lesion_case.labels[lesion]).argmax())
        radius = max(baselines.equivalent_radius_mm(lesion, lesion_case.voxel_ml), 2.0 * float(spacing.max()))
        ring = baselines.organ_ring(lesion, (lesion_case.labels == organ_label) & ~lesion_case.lesion_mask, spacing,
                                    radius)
        if not ring.any():
            continue
        ctx.add(family, "lesion", "the family's own lesions", "phantom lesions (each)", f"{lesion_case.name} #{c}",
                abs_contrast_hu=abs(metrics.region_contrast(image, lesion, ring)["contrast"]),
                threshold_dice=metrics.threshold_dice(image, lesion, ring, baselines.near_mask(lesion, spacing,
                                                                                                 radius)))
