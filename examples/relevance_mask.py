"""Relevance mask for motion alarms: case study 05, with ground truth the case study never had.

A fixed camera; an alarm should fire for relevant motion (people, vehicles) and not for
irrelevant motion (swaying foliage, a flickering lamp, a lighting change, sensor noise).
The case study's pipeline, on synthetic sequences whose relevant motion is known per pixel
(``embedkit.datasets.synthetic_sequences``):

* stage 1 — motion detection by frame differencing: the mean absolute colour difference
  of consecutive frames, smoothed over 3×3 pixels, above a fixed threshold;
* phase 1 — contrastive pretraining of a small convolutional encoder: anchor and
  positive are two frames of one sequence, negatives frames of the other sequences
  (``TripletMarginLoss``), watched by ``EmbeddingHealthMonitor`` and ``LossMonitor``;
* phase 2 — segmentation fine-tuning on the motion masks as pseudo-labels (no ground
  truth is used for training), each frame alone as input, in four variants:

  - ``coarse-bce`` — the case study's head: logits at 1/8 of the input side (its 32×32
    head on 224×224 masks was 1/7), upsampled bilinearly, binary cross-entropy;
  - ``coarse-dice`` — the same head, cross-entropy plus soft Dice;
  - ``full-bce`` — a U-Net decoder at the full input resolution, cross-entropy;
  - ``full-dice`` — the full-resolution decoder, cross-entropy plus soft Dice.

Evaluation on held-out sequences, against the ground truth: pixel IoU; every connected
motion region of stage 1 called relevant when the model's mean probability over it is
at least 0.5, with the accuracy on relevant and on irrelevant regions as counts, a Wilson
interval and a verdict against the 50 % line the case study used; the same for the
untrained network (random weights) and for stage 1 alone; and the mean score and mean
distance from 0.5 — the "confidence" the case study read as progress.

This example has no real-data mode: it needs per-pixel ground truth of relevant motion,
which a ``root/<identity>/<image>`` folder does not hold. ``--data-dir`` is refused.

    python examples/relevance_mask.py --quick --device cpu   # 3-4 minutes on 2 shared CPU cores
    python examples/relevance_mask.py --device cpu           # the full run: 26 CPU-minutes

Writes ``report.json``, ``report.md`` and figures into ``--out`` and prints a table.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from _shared import (
    Monitors,
    command_line,
    markdown_table,
    parser,
    progress,
    pyplot,
    resolve_device,
    save,
    write_report,
)
from scipy import ndimage
from torch import Tensor, nn

import embedkit as ek
from embedkit.datasets import CameraSequences, synthetic_sequences
from embedkit.evaluation import roc_auc
from embedkit.evaluation.report import Rate
from embedkit.monitors import chance_verdict, wilson_interval

# ------------------------------------------------------------------------------------ configuration


@dataclass(frozen=True)
class Config:
    """Sizes of one run and the fixed settings of stage 1 (chosen before any run, never tuned)."""

    train_sequences: int
    val_sequences: int
    test_sequences: int
    frames: int = 8
    size: int = 64
    width: int = 12  # channels of the encoder's first stage
    embedding_dim: int = 64
    pretrain_epochs: int = 6
    pretrain_batch: int = 16  # sequences per contrastive step, two frames each
    margin: float = 0.2
    finetune_epochs: int = 4
    batch_size: int = 16  # frames per segmentation step
    lr: float = 1e-3
    window: int = 10  # contrastive steps between two readings of the monitors
    # Mean absolute colour difference after 3×3 smoothing: 25/255, the usual OpenCV
    # frame-differencing threshold (0.05 fired on 14 % of a still scene's pixels at noise 0.05).
    motion_threshold: float = 25 / 255
    min_region: int = 3  # pixels; smaller motion specks are not regions
    coarse_stride: int = 8
    confidence: float = 0.95
    figure_frames: int = 5


FULL = Config(
    train_sequences=200, val_sequences=40, test_sequences=120, width=8, pretrain_epochs=8, finetune_epochs=5
)
QUICK = Config(
    train_sequences=48,
    val_sequences=12,
    test_sequences=40,
    width=8,
    embedding_dim=32,
    pretrain_epochs=4,
    finetune_epochs=2,
    window=4,
)

VARIANTS = {
    "coarse-bce": ("coarse", False, "the case study's head: 1/8 resolution upsampled, cross-entropy"),
    "coarse-dice": ("coarse", True, "the same coarse head, cross-entropy + soft Dice"),
    "full-bce": ("full", False, "U-Net decoder at full resolution, cross-entropy"),
    "full-dice": ("full", True, "U-Net decoder at full resolution, cross-entropy + soft Dice"),
}
CASE_STUDY, FIX = "coarse-bce", "full-dice"

# ------------------------------------------------------------------------------------ data


@dataclass
class Split:
    """One part of the sequences with its stage-1 motion masks (frames 1..T-1 against their previous)."""

    data: CameraSequences
    motion: Tensor  # (n, T-1, H, W) bool

    def inputs(self) -> Tensor:
        """The frames the motion masks belong to, flattened: (n · (T-1), 3, H, W)."""
        return self.data.frames[:, 1:].flatten(0, 1)

    def targets(self) -> Tensor:
        return self.motion.flatten(0, 1)

    def truth(self) -> Tensor:
        return self.data.relevant[:, 1:].flatten(0, 1)


def motion_masks(frames: Tensor, threshold: float) -> Tensor:
    """Stage 1: frame differencing.

    Parameters
    ----------
    frames : Tensor of shape (n, T, 3, H, W)
    threshold : float
        On the mean absolute colour difference after a 3×3 box filter (the filter
        removes most single-pixel sensor noise).

    Returns
    -------
    Tensor of shape (n, T - 1, H, W), bool
        Motion at frame ``t`` against frame ``t - 1``, for ``t = 1..T-1``.
    """
    difference = (frames[:, 1:] - frames[:, :-1]).abs().mean(dim=2)
    n, t, h, w = difference.shape
    smooth = F.avg_pool2d(difference.reshape(n * t, 1, h, w), 3, stride=1, padding=1, count_include_pad=False)
    return smooth.reshape(n, t, h, w) > threshold


def load_data(config: Config, data_dir: Path | None, seed: int) -> dict[str, Split]:
    """Synthetic sequences split into training, validation and test sequences (disjoint scenes)."""
    if data_dir is not None:
        raise SystemExit(
            f"--data-dir {data_dir}: this example has no real-data mode. It measures relevance against "
            "per-pixel ground truth of relevant motion, which an image folder does not have; run it "
            "without --data-dir (built-in synthetic sequences)."
        )
    total = config.train_sequences + config.val_sequences + config.test_sequences
    (data_seed,) = (int(s) for s in np.random.SeedSequence(seed).generate_state(1))
    data = synthetic_sequences(total, config.frames, size=config.size, seed=data_seed)
    bounds = np.cumsum([0, config.train_sequences, config.val_sequences, config.test_sequences])
    splits = {}
    for name, lo, hi in zip(("train", "val", "test"), bounds[:-1], bounds[1:], strict=True):
        part = data.subset(np.arange(lo, hi))
        splits[name] = Split(part, motion_masks(part.frames, config.motion_threshold))
    ids = np.concatenate([s.data.sequence_ids for s in splits.values()])
    assert np.unique(ids).size == ids.size == total, "a sequence is in two splits"
    return splits


def data_summary(splits: dict[str, Split]) -> dict[str, Any]:
    """Counts, and how well stage 1 alone matches the ground truth (pixels of frames 1..T-1)."""
    out: dict[str, Any] = {}
    for name, s in splits.items():
        motion, truth = s.targets(), s.truth()
        out[name] = {
            "sequences": len(s.data),
            "frames": int(motion.shape[0]),
            "sequences_without_objects": int((s.data.num_objects == 0).sum()),
            "relevant_pixel_fraction": float(truth.float().mean()),
            "motion_pixel_fraction": float(motion.float().mean()),
            "motion_pixels_on_relevant_objects": float((motion & truth).sum() / motion.sum().clamp_min(1)),
        }
    return out


# ------------------------------------------------------------------------------------ networks


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
    )  # fmt: skip


class Encoder(nn.Module):
    """Four stages at strides 1, 2, 4, 8 with width, 2·, 4·, 8·width channels; returns every stage."""

    def __init__(self, width: int) -> None:
        super().__init__()
        w = width
        self.stages = nn.ModuleList(
            [_block(3, w), _block(w, 2 * w), _block(2 * w, 4 * w), _block(4 * w, 8 * w)]
        )
        self.channels = [w, 2 * w, 4 * w, 8 * w]

    def forward(self, images: Tensor) -> list[Tensor]:
        """(n, 3, H, W) in [0, 1] → feature maps at strides 1, 2, 4, 8."""
        x = (images - 0.5) / 0.25
        features = []
        for i, stage in enumerate(self.stages):
            x = stage(F.max_pool2d(x, 2) if i else x)
            features.append(x)
        return features


class Embedder(nn.Module):
    """Phase 1: the encoder, global average pooling and a linear projection."""

    def __init__(self, encoder: Encoder, embedding_dim: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.project = nn.Linear(encoder.channels[-1], embedding_dim)

    def forward(self, images: Tensor) -> Tensor:
        """(n, 3, H, W) → (n, embedding_dim)."""
        return self.project(self.encoder(images)[-1].mean(dim=(2, 3)))


class Segmenter(nn.Module):
    """Phase 2: the encoder and a head giving one relevance logit per input pixel.

    ``head="coarse"``: a 1×1 convolution on the stride-8 features, upsampled bilinearly
    to the input size (the case study's 32×32 head). ``head="full"``: a U-Net decoder
    that upsamples step by step, joining each encoder stage, to a logit per pixel.
    """

    def __init__(self, encoder: Encoder, head: str) -> None:
        super().__init__()
        if head not in ("coarse", "full"):
            raise ValueError(f"head must be 'coarse' or 'full'; got {head!r}")
        self.encoder, self.head = encoder, head
        c = encoder.channels
        if head == "coarse":
            self.out = nn.Conv2d(c[3], 1, 1)
        else:
            self.up = nn.ModuleList(
                [_block(c[3] + c[2], c[2]), _block(c[2] + c[1], c[1]), _block(c[1] + c[0], c[0])]
            )
            self.out = nn.Conv2d(c[0], 1, 1)

    def forward(self, images: Tensor) -> Tensor:
        """(n, 3, H, W) → logits (n, H, W)."""
        features = self.encoder(images)
        x = features[-1]
        if self.head == "full":
            for up, skip in zip(self.up, reversed(features[:-1]), strict=True):
                x = up(torch.cat([F.interpolate(x, size=skip.shape[-2:], mode="bilinear"), skip], dim=1))
        logits = self.out(x)
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]


@torch.no_grad()
def probabilities(model: Segmenter, images: Tensor, batch_size: int = 64) -> Tensor:
    """Relevance probabilities (n, H, W) in eval mode, batch by batch, on the CPU."""
    model.eval()
    device = next(model.parameters()).device
    return torch.cat(
        [
            torch.sigmoid(model(images[i : i + batch_size].to(device))).cpu()
            for i in range(0, len(images), batch_size)
        ]
    )


@torch.no_grad()
def embed(model: Embedder, images: Tensor, batch_size: int = 128) -> Tensor:
    model.eval()
    device = next(model.parameters()).device
    return torch.cat(
        [model(images[i : i + batch_size].to(device)).cpu() for i in range(0, len(images), batch_size)]
    )


def batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Shuffled row indices in batches (the last, smaller one dropped)."""
    order = torch.randperm(n, generator=generator)
    for start in range(0, n - batch_size + 1, batch_size):
        yield order[start : start + batch_size]


# ------------------------------------------------------------------------------------ phase 1


def sequence_retrieval(model: Embedder, split: Split) -> float:
    """Precision@1 of finding another frame of the same sequence: what phase 1 optimises."""
    frames = split.data.frames
    labels = torch.arange(len(frames)).repeat_interleave(frames.shape[1])
    metrics = ek.retrieval_metrics(embed(model, frames.flatten(0, 1)), labels, ks=(1,))
    return float(metrics["precision@1"])


def pretrain(
    splits: dict[str, Split], config: Config, device: torch.device, seed: int, show: bool
) -> tuple[Encoder, dict[str, Any], Monitors]:
    """Phase 1: anchor and positive from one sequence, negatives from the others (triplet loss)."""
    torch.manual_seed(seed)
    model = Embedder(Encoder(config.width), config.embedding_dim).to(device)
    untrained_retrieval = sequence_retrieval(model, splits["test"])
    loss_fn = ek.TripletMarginLoss(config.margin, mining="all")
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    frames = splits["train"].data.frames
    n, t = frames.shape[:2]
    g = torch.Generator().manual_seed(seed)
    monitors = Monitors(config.window)
    steps_per_epoch = n // config.pretrain_batch
    losses: list[float] = []
    step = 0
    start = time.perf_counter()
    with progress(config.pretrain_epochs * steps_per_epoch, "phase 1: contrastive", show) as bar:
        for epoch in range(config.pretrain_epochs):
            for rows in batches(n, config.pretrain_batch, g):
                # Two distinct frames of each sequence: the anchor and its positive.
                first = torch.randint(0, t, (len(rows),), generator=g)
                second = (first + torch.randint(1, t, (len(rows),), generator=g)) % t
                images = torch.cat([frames[rows, first], frames[rows, second]]).to(device)
                labels = torch.cat([rows, rows]).to(device)
                model.train()
                z = model(images)
                loss = loss_fn(z, labels)
                optimizer.zero_grad()
                loss.backward()
                step += 1
                monitors.update(step, loss_fn, z.detach(), labels)  # before the step: the embeddings scored
                optimizer.step()
                losses.append(loss.item())
                bar.update()
                bar.set_postfix_str(f"epoch {epoch + 1} loss {losses[-1]:.3f}")
    monitors.finish(step)
    summary = {
        "loss": losses,
        "loss_first_epoch": float(np.mean(losses[:steps_per_epoch])),
        "loss_last_epoch": float(np.mean(losses[-steps_per_epoch:])),
        "steps": step,
        "sequence_precision@1_untrained": untrained_retrieval,
        "sequence_precision@1_pretrained": sequence_retrieval(model, splits["test"]),
        "training_seconds": time.perf_counter() - start,
        "diagnoses": monitors.diagnoses(),
    }
    return model.encoder, summary, monitors


# ------------------------------------------------------------------------------------ phase 2


def segmentation_loss(logits: Tensor, targets: Tensor, dice: bool) -> Tensor:
    """Binary cross-entropy, plus the soft Dice loss ``1 - 2|P∩T| / (|P| + |T|)`` over the batch."""
    loss = F.binary_cross_entropy_with_logits(logits, targets)
    if dice:
        p = torch.sigmoid(logits)
        loss = loss + 1 - (2 * (p * targets).sum() + 1) / (p.sum() + targets.sum() + 1)
    return loss


def iou(predicted: Tensor, truth: Tensor) -> float:
    """Pooled intersection over union of two boolean masks of any shape (NaN when both are empty)."""
    union = int((predicted | truth).sum())
    return int((predicted & truth).sum()) / union if union else math.nan


def finetune(
    name: str,
    encoder: Encoder,
    splits: dict[str, Split],
    config: Config,
    device: torch.device,
    seed: int,
    show: bool,
) -> tuple[Segmenter, dict[str, Any]]:
    """Phase 2: fine-tune a copy of the pretrained encoder with a new head on the motion pseudo-labels."""
    head, dice, _ = VARIANTS[name]
    torch.manual_seed(seed)
    model = Segmenter(copy.deepcopy(encoder), head).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    images, targets = splits["train"].inputs(), splits["train"].targets().float()
    val_images, val_targets = splits["val"].inputs(), splits["val"].targets()
    # Start every head at the pseudo-labels' prior (Lin et al., 2017): with ~5 % motion pixels a
    # head starting at p = 0.5 spends its first epochs learning the background rate.
    with torch.no_grad():
        prior = float(targets.mean().clamp(1e-4, 1 - 1e-4))
        bias = model.out.bias
        assert bias is not None  # both heads end in a convolution with a bias
        bias.fill_(math.log(prior / (1 - prior)))
    g = torch.Generator().manual_seed(seed)
    steps_per_epoch = len(images) // config.batch_size
    epochs = []
    start = time.perf_counter()
    with progress(config.finetune_epochs * steps_per_epoch, f"phase 2: {name}", show) as bar:
        for epoch in range(1, config.finetune_epochs + 1):
            losses = []
            for rows in batches(len(images), config.batch_size, g):
                model.train()
                loss = segmentation_loss(model(images[rows].to(device)), targets[rows].to(device), dice)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                bar.update()
                bar.set_postfix_str(f"epoch {epoch} loss {losses[-1]:.3f}")
            # Validation on pseudo-labels only, as the case study could: no ground truth in training.
            p = probabilities(model, val_images)
            epochs.append(
                {
                    "epoch": epoch,
                    "train_loss": float(np.mean(losses)),
                    "val_loss": float(segmentation_loss(torch.logit(p, eps=1e-6), val_targets.float(), dice)),
                    "val_iou_vs_motion": iou(p >= 0.5, val_targets),
                }
            )
    return model, {"epochs": epochs, "training_seconds": time.perf_counter() - start}


# ------------------------------------------------------------------------------------ evaluation


@dataclass
class Regions:
    """Connected stage-1 motion regions of the test frames and what each truly is."""

    labels: np.ndarray  # (frames, H, W) int: 0 outside regions, k for region k
    relevant: np.ndarray  # (regions,) bool
    cause: np.ndarray  # (regions,) str: "object", "distractor", "lighting" or "noise"
    sizes: np.ndarray  # (regions,) pixels

    def counts(self) -> dict[str, int]:
        causes = {c: int((self.cause == c).sum()) for c in ("object", "distractor", "lighting", "noise")}
        return {"regions": int(self.relevant.size), "relevant": int(self.relevant.sum()), **causes}


def motion_regions(split: Split, min_region: int) -> Regions:
    """Label 8-connected motion regions frame by frame; a region is relevant when most of it is object.

    A difference image shows an object where it is *and* where it was, so a region's
    truth is read from the objects' footprints in both frames. Irrelevant regions are
    attributed to a distractor (swaying or flickering area) when most of them lie on
    one, else to a lighting step when their frame has one, else to sensor noise.
    """
    motion = split.targets().numpy()
    frames, h, w = motion.shape
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True  # 8-connected within a frame, never across frames
    labels, count = ndimage.label(motion, structure=structure)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    keep = sizes >= min_region
    keep[0] = False
    new = np.cumsum(keep) * keep  # renumber the kept regions 1..K, the rest 0
    labels = new[labels]
    k = int(keep.sum())
    rel = split.data.relevant
    objects = (rel[:, 1:] | rel[:, :-1]).flatten(0, 1).numpy()
    distractors = split.data.distractors[:, 1:].flatten(0, 1).numpy()
    flat = labels.ravel()
    size = np.bincount(flat, minlength=k + 1)[1:]
    on_objects = np.bincount(flat, weights=objects.ravel(), minlength=k + 1)[1:]
    on_distractors = np.bincount(flat, weights=distractors.ravel(), minlength=k + 1)[1:]
    frame_of = np.zeros(k + 1, dtype=np.int64)
    frame_of[flat] = np.repeat(np.arange(frames), h * w)
    lighting = split.data.lighting_changes[:, 1:].flatten().numpy()[frame_of[1:]]
    relevant = on_objects >= size / 2
    cause = np.where(
        relevant,
        "object",
        np.where(on_distractors >= size / 2, "distractor", np.where(lighting, "lighting", "noise")),
    )
    return Regions(labels, relevant, cause, size)


def region_rates(scores: np.ndarray, regions: Regions, confidence: float) -> dict[str, Any]:
    """Accuracy on relevant, irrelevant and all regions, each against the 50 % line."""
    called = scores >= 0.5
    correct = called == regions.relevant
    out = {}
    for key, rows in (
        ("relevant_regions", regions.relevant),
        ("irrelevant_regions", ~regions.relevant),
        ("all_regions", np.ones_like(regions.relevant)),
    ):
        rate = Rate(int(correct[rows].sum()), int(rows.sum()), chance=0.5)
        low, high = (
            wilson_interval(rate.hits, rate.total, confidence=confidence) if rate.total else (math.nan,) * 2
        )
        out[key] = {
            **rate.to_dict(),
            "ci_low": low,
            "ci_high": high,
            "confidence": confidence,
            "verdict": chance_verdict(rate, confidence=confidence),
        }
    # Irrelevant regions called irrelevant, per cause: which false alarms remain.
    out["irrelevant_rejected_by_cause"] = {
        c: Rate(int((~called[regions.cause == c]).sum()), int((regions.cause == c).sum())).to_dict()
        for c in ("distractor", "lighting", "noise")
    }
    return out


def evaluate(probability: Tensor | None, split: Split, regions: Regions, confidence: float) -> dict[str, Any]:
    """Pixel IoU against the ground truth and against motion, region accuracies, mean confidence.

    ``probability=None`` is stage 1 alone: every motion pixel called relevant.
    """
    motion, truth = split.targets(), split.truth()
    p = motion.float() if probability is None else probability
    predicted = p >= 0.5
    flat = regions.labels.ravel()
    k = regions.relevant.size
    scores = (
        np.bincount(flat, weights=p.numpy().ravel().astype(np.float64), minlength=k + 1)[1:] / regions.sizes
    )
    return {
        "iou_vs_truth": iou(predicted, truth),
        "iou_vs_motion": iou(predicted, motion),
        "predicted_pixel_fraction": float(predicted.float().mean()),
        "precision_vs_truth": float((predicted & truth).sum() / predicted.sum().clamp_min(1)),
        "recall_vs_truth": float((predicted & truth).sum() / truth.sum().clamp_min(1)),
        **region_rates(scores, regions, confidence),
        # Threshold-free: does the score rank relevant regions above irrelevant ones at all?
        "region_auc": roc_auc(scores, regions.relevant) if 0 < regions.relevant.sum() < k else math.nan,
        "mean_region_score": float(scores.mean()) if k else math.nan,
        "mean_region_decisiveness": float(np.abs(scores - 0.5).mean()) if k else math.nan,
        "mean_pixel_score": float(p.mean()),
        "region_scores": scores,
    }


# ------------------------------------------------------------------------------------ report

TABLE_HEADERS = (
    "model",
    "IoU vs truth",
    "IoU vs motion",
    "relevant regions",
    "irrelevant regions",
    "all regions (95% CI)",
    "vs 50%",
    "region AUC",
    "mean score",
    "train s",
)


def _rate(r: dict[str, Any]) -> str:
    return f"{r['hits']}/{r['total']} = {_percent(r['value'])}"


def _percent(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _number(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def table_rows(models: dict[str, dict[str, Any]]) -> list[list[str]]:
    rows = []
    for name, r in models.items():
        a = r["all_regions"]
        rows.append(
            [
                name,
                _number(r["iou_vs_truth"]),
                _number(r["iou_vs_motion"]),
                _rate(r["relevant_regions"]),
                _rate(r["irrelevant_regions"]),
                f"{_rate(a)} [{_percent(a['ci_low'])}, {_percent(a['ci_high'])}]",
                a["verdict"].replace("_", " "),
                _number(r["region_auc"]),
                _number(r["mean_region_score"]),
                "-" if r.get("training_seconds") is None else f"{r['training_seconds']:.0f}",
            ]
        )
    return rows


def figures(
    out: Path,
    split: Split,
    models: dict[str, dict[str, Any]],
    maps: dict[str, Tensor],
    pretraining: dict[str, Any],
    monitors: Monitors,
    count: int,
) -> list[str]:
    """Frame / motion / truth / predictions grid, training curves, region accuracies."""
    plt = pyplot()
    if plt is None:
        return []
    from embedkit.plotting import plot_history

    written = []
    # Frames that show both a relevant object and a distractor, spread over the test set.
    truth, distract = split.truth(), split.data.distractors[:, 1:].flatten(0, 1)
    both = ((truth.flatten(1).sum(1) > 20) & (distract.flatten(1).sum(1) > 20)).nonzero().squeeze(1)
    pool = both if len(both) >= count else (truth.flatten(1).sum(1) > 0).nonzero().squeeze(1)
    shown = (
        pool[torch.linspace(0, len(pool) - 1, min(count, len(pool))).long()].tolist() if len(pool) else [0]
    )
    columns = [
        ("frame", None),
        ("motion (stage 1)", split.targets()),
        ("ground truth", truth),
        *((f"{name}", maps[name]) for name in maps),
    ]
    fig, axes = plt.subplots(
        len(shown), len(columns), figsize=(1.9 * len(columns), 2.0 * len(shown)), squeeze=False
    )
    frames = split.inputs()
    for row, i in enumerate(shown):
        for col, (title, values) in enumerate(columns):
            ax = axes[row, col]
            if values is None:
                ax.imshow(frames[i].permute(1, 2, 0).numpy())
            else:
                ax.imshow(values[i].float().numpy(), vmin=0, vmax=1, cmap="magma")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=8)
    fig.suptitle("test frames: input, stage-1 motion, truth, and relevance probability per model", fontsize=9)
    written.append(save(fig, out / "comparison.png"))

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    steps = np.arange(1, len(pretraining["loss"]) + 1)
    axes[0].plot(steps, pretraining["loss"], lw=0.8)
    events = [(d["step"], d["code"]) for d in pretraining["diagnoses"] if d["severity"] != "info"]
    for s, code in events:
        axes[0].axvline(s, color="red", linestyle=":")
        axes[0].text(s, axes[0].get_ylim()[1], code, rotation=90, va="top", fontsize=7, color="red")
    axes[0].set_title("phase 1: triplet loss (diagnoses in red)", fontsize=9)
    axes[0].set_xlabel("step")
    keys = [k for k in ("health/effective_rank",) if k in monitors.history.keys]
    if keys:
        plot_history(monitors.history, keys, ax=axes[1], events=events, ylabel="effective rank")
        axes[1].set_title(f"phase 1: embedding health every {monitors.window} steps", fontsize=9)
    for name, r in models.items():
        if "epochs" in r:
            epochs = [e["epoch"] for e in r["epochs"]]
            line = axes[2].plot(
                epochs, [e["val_loss"] for e in r["epochs"]], marker="o", label=f"{name} val loss"
            )
            axes[2].plot(
                epochs,
                [e["train_loss"] for e in r["epochs"]],
                "--",
                color=line[0].get_color(),
                label=f"{name} train",
            )
    axes[2].set_title("phase 2: loss on motion pseudo-labels", fontsize=9)
    axes[2].set_xlabel("epoch")
    axes[2].legend(fontsize=6)
    written.append(save(fig, out / "training.png"))

    fig, ax = plt.subplots(figsize=(8, 3.8))
    names = list(models)
    for j, key in enumerate(("relevant_regions", "irrelevant_regions", "all_regions")):
        heights = [models[n][key]["value"] for n in names]
        low = [models[n][key]["value"] - models[n][key]["ci_low"] for n in names]
        high = [models[n][key]["ci_high"] - models[n][key]["value"] for n in names]
        ax.bar(np.arange(len(names)) + (j - 1) * 0.27, heights, 0.27, yerr=[low, high], capsize=2, label=key)
    ax.axhline(0.5, color="grey", linestyle="--", label="50% (the case study's chance line)")
    ax.set_xticks(np.arange(len(names)), names, fontsize=7, rotation=15)
    ax.set_ylabel("region accuracy (95% Wilson CI)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7)
    written.append(save(fig, out / "regions.png"))
    return written


def markdown(report: dict[str, Any], table: str, written: list[str]) -> str:
    counts = report["regions"]
    drift = report["confidence_drift"]
    pre = report["pretraining"]
    lines = [
        "# Relevance mask for motion alarms (case study 05)",
        "",
        f"Command: `{report['command']}`  ",
        f"Device: {report['device']}; data: {report['data']['source']}; "
        f"total time {report['seconds']:.0f} s.",
        "",
        f"Test set: {report['data']['splits']['test']['sequences']} sequences, "
        f"{report['data']['splits']['test']['frames']} frames; {counts['regions']} stage-1 motion regions "
        f"({counts['relevant']} relevant: objects; irrelevant: {counts['distractor']} distractor, "
        f"{counts['lighting']} lighting, {counts['noise']} noise). A region is called relevant when the "
        "model's mean probability over it is at least 0.5. IoU is pooled over all test pixels at "
        "threshold 0.5. Region AUC: the chance that a relevant region scores above an irrelevant one "
        "(0.5 = no relevance information; threshold-free).",
        "",
        table,
        "",
        "## The confidence the case study read as progress",
        "",
        f"Mean region score: untrained {drift['untrained']['mean_region_score']:.3f}, "
        f"{CASE_STUDY} {drift[CASE_STUDY]['mean_region_score']:.3f}, "
        f"{FIX} {drift[FIX]['mean_region_score']:.3f}; "
        f"mean distance from 0.5: untrained {drift['untrained']['mean_region_decisiveness']:.3f}, "
        f"{CASE_STUDY} {drift[CASE_STUDY]['mean_region_decisiveness']:.3f}, "
        f"{FIX} {drift[FIX]['mean_region_decisiveness']:.3f}. A score moving away from 0.5 says nothing "
        "about being right: compare the region accuracies and their intervals in the table.",
        "",
        "## Phase 1 (contrastive pretraining)",
        "",
        f"Triplet loss (margin {report['config']['margin']}) {pre['loss_first_epoch']:.4f} in the first "
        f"epoch, {pre['loss_last_epoch']:.4f} in the last. Finding another frame of the same test sequence "
        f"(precision@1): untrained {pre['sequence_precision@1_untrained']:.3f}, "
        f"pretrained {pre['sequence_precision@1_pretrained']:.3f}.",
        "",
    ]
    diagnoses = report["pretraining"]["diagnoses"]
    if not diagnoses:
        lines.append("No diagnosis fired.")
    for d in diagnoses:
        lines.append(
            f"- **{d['code']}** ({d['severity']}, {d['monitor']} monitor) first at step {d['step']}, "
            f"in {d['windows_fired']} of {d['windows']} windows: {d['message']}"
        )
    lines += ["", "## Phase 2 (segmentation on motion pseudo-labels)", ""]
    for name, r in report["models"].items():
        if "epochs" not in r:
            continue
        e = r["epochs"]
        lines.append(
            f"- **{name}** ({r['description']}): "
            f"train loss {e[0]['train_loss']:.4f} → {e[-1]['train_loss']:.4f}, "
            f"val loss {e[0]['val_loss']:.4f} → {e[-1]['val_loss']:.4f}, val IoU vs motion "
            f"{_number(e[0]['val_iou_vs_motion'])} → {_number(e[-1]['val_iou_vs_motion'])}; "
            f"predicted-relevant pixels {_percent(r['predicted_pixel_fraction'])} of the test frames."
        )
    lines += ["", "## Irrelevant regions rejected, by cause", ""]
    causes = ("distractor", "lighting", "noise")
    rows = [
        [name, *(_rate(r["irrelevant_rejected_by_cause"][c]) for c in causes)]
        for name, r in report["models"].items()
    ]
    lines += [markdown_table(("model", *causes), rows), ""]
    lines += ["## Figures", ""] + [f"![{name}]({name})" for name in written]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ main


def run(
    config: Config, *, data_dir: Path | None, device: torch.device, out: Path, seed: int, show: bool = True
) -> dict[str, Any]:
    """The whole experiment; returns the report written to ``out/report.json``."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    splits = load_data(config, data_dir, seed)
    summary = data_summary(splits)
    source = (
        f"synthetic: {sum(len(s.data) for s in splits.values())} sequences x {config.frames} frames, "
        f"{config.size}px"
    )
    print(f"data: {source}")
    test = splits["test"]
    regions = motion_regions(test, config.min_region)
    print("  test regions: " + ", ".join(f"{k} {v}" for k, v in regions.counts().items()))

    torch.manual_seed(seed)
    untrained = Segmenter(Encoder(config.width), "full").to(device)
    models: dict[str, dict[str, Any]] = {
        "motion only": {
            "description": "stage 1 alone: every motion region relevant",
            "training_seconds": None,
        },
        "untrained": {"description": "full-resolution decoder, random weights", "training_seconds": None},
    }
    maps = {"untrained": probabilities(untrained, test.inputs())}
    encoder, pretraining, monitors = pretrain(splits, config, device, seed, show)
    fired = ", ".join(d["code"] for d in pretraining["diagnoses"]) or "none"
    print(
        f"phase 1: loss {pretraining['loss_first_epoch']:.4f} -> {pretraining['loss_last_epoch']:.4f}, "
        f"diagnoses: {fired}"
    )
    for name, (_, _, description) in VARIANTS.items():
        model, training = finetune(name, encoder, splits, config, device, seed, show)
        maps[name] = probabilities(model, test.inputs())
        models[name] = {"description": description, **training}
    for name in models:
        models[name].update(evaluate(maps.get(name), test, regions, config.confidence))
        r = models[name]
        print(
            f"{name}: IoU vs truth {_number(r['iou_vs_truth'])}, all regions {_rate(r['all_regions'])} "
            f"({r['all_regions']['verdict']})"
        )

    table = markdown_table(TABLE_HEADERS, table_rows(models))
    report: dict[str, Any] = {
        "command": command_line(),
        "device": str(device),
        "seed": seed,
        "config": dataclasses.asdict(config),
        "data": {"source": source, "splits": summary},
        "regions": regions.counts(),
        "pretraining": {k: v for k, v in pretraining.items()},
        "models": {name: {k: v for k, v in r.items() if k != "region_scores"} for name, r in models.items()},
        "confidence_drift": {
            name: {
                k: models[name][k]
                for k in ("mean_region_score", "mean_region_decisiveness", "mean_pixel_score")
            }
            for name in models
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    monitors.history.to_csv(out / "monitors_pretraining.csv")
    written = figures(out, test, models, maps, pretraining, monitors, config.figure_frames)
    report["figures"] = written
    report["seconds"] = time.perf_counter() - start
    write_report(out, report, markdown(report, table, written))
    print()
    print(table)
    print(f"\nwrote {out}/report.json, report.md and {len(written)} figures in {report['seconds']:.0f} s")
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser(
        __doc__ or "",
        data_dir_help="not supported: the example needs per-pixel ground truth, which an image folder "
        "does not hold (it runs on built-in synthetic sequences)",
    ).parse_args(argv)
    config = QUICK if args.quick else FULL
    out = args.out or Path("out") / ("relevance_mask-quick" if args.quick else "relevance_mask")
    torch.use_deterministic_algorithms(True, warn_only=True)
    return run(config, data_dir=args.data_dir, device=resolve_device(args.device), out=out, seed=args.seed)


if __name__ == "__main__":
    main()
