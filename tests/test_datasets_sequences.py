"""Synthetic fixed-camera sequences: shapes, determinism, exact ground truth, real irrelevant motion."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from embedkit.datasets import CameraSequences, synthetic_sequences


@pytest.fixture(scope="module")
def scenes() -> CameraSequences:
    return synthetic_sequences(24, 6, size=32, seed=5)


def _differencing(frames: torch.Tensor, threshold: float = 0.05) -> torch.Tensor:
    """Naive motion detection: mean absolute colour difference of consecutive frames, 3×3 smoothed."""
    d = (frames[:, 1:] - frames[:, :-1]).abs().mean(dim=2)
    n, t, h, w = d.shape
    d = F.avg_pool2d(d.reshape(n * t, 1, h, w), 3, stride=1, padding=1, count_include_pad=False)
    return d.reshape(n, t, h, w) > threshold


def test_shapes_dtypes_and_ids(scenes) -> None:
    assert scenes.frames.shape == (24, 6, 3, 32, 32) and scenes.frames.dtype == torch.float32
    assert 0 <= float(scenes.frames.min()) and float(scenes.frames.max()) <= 1
    for mask in (scenes.relevant, scenes.distractors):
        assert mask.shape == (24, 6, 32, 32) and mask.dtype == torch.bool
    assert scenes.lighting_changes.shape == (24, 6) and scenes.lighting_changes.dtype == torch.bool
    assert not scenes.lighting_changes[:, 0].any()  # a step is between two frames
    assert scenes.num_objects.dtype == torch.int64 and 0 <= int(scenes.num_objects.min())
    assert int(scenes.num_objects.max()) <= 3
    assert scenes.sequence_ids[7] == "seq00007" and len(set(scenes.sequence_ids.tolist())) == 24
    assert len(scenes) == 24 and scenes.num_frames == 6 and scenes.image_size == (32, 32)
    # Objects and distractors never claim the same pixel.
    assert not (scenes.relevant & scenes.distractors).any()


def test_deterministic_for_a_seed_and_different_across_seeds(scenes) -> None:
    again = synthetic_sequences(24, 6, size=32, seed=5)
    for name in ("frames", "relevant", "distractors", "lighting_changes", "num_objects"):
        assert torch.equal(getattr(scenes, name), getattr(again, name)), name
    other = synthetic_sequences(24, 6, size=32, seed=6)
    assert not torch.allclose(scenes.frames, other.frames)


def test_ground_truth_covers_exactly_the_relevant_objects() -> None:
    """Same seed without objects: the frames differ exactly on the ground-truth pixels."""
    with_objects = synthetic_sequences(40, 5, size=32, seed=1, max_objects=3)
    without = synthetic_sequences(40, 5, size=32, seed=1, max_objects=0)
    assert not without.relevant.any() and int(without.num_objects.sum()) == 0
    changed = (with_objects.frames != without.frames).any(dim=2)
    truth = with_objects.relevant
    assert truth.any()
    assert not (changed & ~truth).any()  # nothing outside the objects changed
    # Inside, every pixel changed but where both renderings clamp to the same bound.
    assert int((changed & truth).sum()) >= 0.99 * int(truth.sum())
    # Sequences with no object have an empty ground truth, the others a non-empty one.
    has_pixels = truth.flatten(1).any(dim=1)
    assert torch.equal(
        has_pixels[with_objects.num_objects == 0], torch.zeros_like(has_pixels[with_objects.num_objects == 0])
    )
    assert has_pixels[with_objects.num_objects > 0].float().mean() > 0.9  # objects may leave the frame


def test_objects_move() -> None:
    data = synthetic_sequences(30, 4, size=32, seed=2, max_objects=2)
    moving = data.num_objects > 0
    footprints = data.relevant[moving]
    assert not torch.equal(footprints[:, 0], footprints[:, -1])
    # The centre of mass of a single-object sequence shifts from the first frame to the last.
    single = (data.num_objects == 1).nonzero().squeeze(1)
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    for i in single.tolist():
        m = data.relevant[i].float()
        if bool((m.flatten(1).sum(1) > 0).all()):
            cx = (m * xs).flatten(1).sum(1) / m.flatten(1).sum(1)
            cy = (m * ys).flatten(1).sum(1) / m.flatten(1).sum(1)
            assert float(torch.hypot(cx[-1] - cx[0], cy[-1] - cy[0])) > 1.0


def test_irrelevant_motion_changes_pixels_outside_the_ground_truth() -> None:
    """Frame differencing fires off the objects: on distractors, lighting steps and noise."""
    data = synthetic_sequences(48, 6, size=32, seed=3)
    motion = _differencing(data.frames)
    objects = data.relevant[:, 1:] | data.relevant[:, :-1]  # where an object is or was
    false_alarm = motion & ~objects
    assert false_alarm.any()
    assert (false_alarm & data.distractors[:, 1:]).sum() > 100
    # Without objects at all, motion is still detected: every detection is a false alarm.
    still = synthetic_sequences(48, 6, size=32, seed=3, max_objects=0)
    assert _differencing(still.frames).float().mean() > 0.005
    # And each source alone makes pixels change.
    quiet = {"max_objects": 0, "noise": 0.0, "sway": 0.0, "flicker": 0.0, "lighting": 0.0}
    base = synthetic_sequences(16, 6, size=32, seed=4, **quiet)
    for source, value in (("sway", 1.0), ("flicker", 1.0), ("lighting", 1.0), ("noise", 0.1)):
        data = synthetic_sequences(16, 6, size=32, seed=4, **{**quiet, source: value})
        assert not torch.equal(
            data.frames[:, 1:] - data.frames[:, :-1], base.frames[:, 1:] - base.frames[:, :-1]
        )
        assert _differencing(data.frames, 0.02).any(), source


def test_a_quiet_scene_is_static_up_to_the_slow_drift() -> None:
    quiet = synthetic_sequences(
        8, 5, size=32, seed=0, max_objects=0, noise=0.0, sway=0.0, flicker=0.0, lighting=0.0
    )
    assert not quiet.distractors.any() and not quiet.lighting_changes.any()
    # Only the global gain drifts (at most 10 % over the sequence): no detection at 0.05.
    assert not _differencing(quiet.frames).any()


def test_subset() -> None:
    data = synthetic_sequences(6, 3, size=16, seed=0)
    part = data.subset([4, 1])
    assert part.sequence_ids.tolist() == ["seq00004", "seq00001"]
    assert torch.equal(part.frames[0], data.frames[4]) and torch.equal(part.relevant[1], data.relevant[1])
    mask = np.zeros(6, dtype=bool)
    mask[2] = True
    assert data.subset(mask).sequence_ids.tolist() == ["seq00002"]
    with pytest.raises(ValueError, match="index must lie in"):
        data.subset([6])
    with pytest.raises(TypeError, match="index must be 1-D integers"):
        data.subset([0.5])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_sequences": 0}, ValueError, "num_sequences"),
        ({"num_sequences": 2.0}, TypeError, "num_sequences"),
        ({"num_frames": 1}, ValueError, "num_frames"),
        ({"size": 8}, ValueError, "size"),
        ({"seed": -1}, ValueError, "seed"),
        ({"max_objects": -1}, ValueError, "max_objects"),
        ({"noise": -0.1}, ValueError, "noise"),
        ({"sway": 1.5}, ValueError, "sway"),
        ({"flicker": "often"}, TypeError, "flicker"),
        ({"lighting": float("nan")}, ValueError, "lighting"),
    ],
)
def test_argument_errors(kwargs, error, match) -> None:
    arguments = {"num_sequences": 2, "num_frames": 3, "size": 16, **kwargs}
    with pytest.raises(error, match=match):
        synthetic_sequences(**arguments)


def test_container_checks_its_fields(scenes) -> None:
    with pytest.raises(ValueError, match="relevant must be a bool tensor"):
        CameraSequences(
            scenes.frames, scenes.relevant.float(), scenes.distractors, scenes.lighting_changes,
            scenes.num_objects, scenes.sequence_ids,
        )  # fmt: skip
    with pytest.raises(TypeError, match="frames must be a floating-point tensor"):
        CameraSequences(
            scenes.frames[0], scenes.relevant, scenes.distractors, scenes.lighting_changes,
            scenes.num_objects, scenes.sequence_ids,
        )  # fmt: skip
    with pytest.raises(ValueError, match="sequence_ids must be unique"):
        CameraSequences(
            scenes.frames, scenes.relevant, scenes.distractors, scenes.lighting_changes,
            scenes.num_objects, np.array(["seq"] * 24),
        )  # fmt: skip
