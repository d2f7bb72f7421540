"""Face fine-tuning with very-low-resolution probes: case studies 01–03, every recipe side by side.

The set-up of the case studies, on synthetic identities (or a real folder):

* a gallery of high-resolution (HR) images; probes are very-low-resolution (VLR)
  images passed through a small learned super-resolution network (DSR) first;
* a backbone "pretrained" on HR images of identities disjoint from the fine-tuning set;
* then each recipe the case studies tried fine-tunes a copy of it on DSR outputs:

  1. ``pretrained`` — no fine-tuning (the baseline);
  2. ``arcface-s32-m0.3`` and ``arcface-s8-m0.1-t4`` — an ArcFace head at scale 32 /
     margin 0.3, then the case study's "fix" at scale 8 / margin 0.1 / temperature 4
     (case study 02), validated on the head's top-1 accuracy;
  3. ``paired`` — training that makes each DSR image match *its own* HR image
     (InfoNCE whose only positive is the pair), validated on the paired DSR↔HR
     similarity (case study 03's trap);
  4. ``supcon`` — multi-positive contrastive fine-tuning (``SupConLoss`` of DSR
     embeddings against HR references, every image of an identity a positive) on
     ``PKSampler`` batches, validated gallery-probe (case study 03's fix).

Every step feeds embedkit's monitors (``ClassCollapseMonitor`` on the heads' logits,
``EmbeddingHealthMonitor`` with the paired HR embeddings, ``LossMonitor``); every
``window`` steps they are read and reset, and each diagnosis is recorded with the step
it first fired. Each recipe is evaluated on held-out images: an HR gallery and DSR
probes, disjoint images of the fine-tuning identities (``Gallery`` with image ids).

    python examples/face_finetune.py --quick                 # about 2 minutes on 2 CPU cores
    python examples/face_finetune.py                         # the full run (518 identities)
    python examples/face_finetune.py --data-dir root --quick # a real root/<identity>/<image> folder

Writes ``report.json``, ``report.md`` and figures into ``--out`` and prints a table.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
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
from torch import Tensor, nn

import embedkit as ek
from embedkit.datasets import (
    IdentityImages,
    load_image_folder,
    split_identities,
    split_images,
    synthetic_identities,
    very_low_resolution,
)

# ------------------------------------------------------------------------------------ configuration


@dataclass(frozen=True)
class Config:
    """Sizes of one run. ``FULL`` follows the case study (518 fine-tuning identities)."""

    pretrain_identities: int
    finetune_identities: int
    images_per_identity: int
    hr_size: int = 32
    vlr_size: int = 8
    width: int = 32  # channels of the backbone's first stage
    embedding_dim: int = 128
    dsr_epochs: int = 10
    pretrain_epochs: int = 20
    finetune_epochs: int = 12
    batch_size: int = 64  # DSR images per fine-tuning step (each with its HR pair)
    p: int = 16  # identities per PK batch (fine-tuning supcon, pretraining)
    k: int = 4
    window: int = 20  # steps between two readings of the monitors
    lr: float = 3e-4  # backbone, fine-tuning
    head_lr: float = 1e-3
    pretrain_lr: float = 5e-3
    temperature: float = 0.1  # of the InfoNCE losses
    # Images of each fine-tuning identity held out per evaluation part.
    val_gallery: int = 1
    val_probe: int = 1
    test_gallery: int = 2
    test_probe: int = 2
    grid_probes: int = 6

    @property
    def held_out(self) -> int:
        return self.val_gallery + self.val_probe + self.test_gallery + self.test_probe


FULL = Config(pretrain_identities=1000, finetune_identities=518, images_per_identity=16, dsr_epochs=4)
QUICK = Config(
    pretrain_identities=400,
    finetune_identities=80,
    images_per_identity=12,
    width=16,
    embedding_dim=64,
    dsr_epochs=4,
    pretrain_epochs=8,
    finetune_epochs=8,
    window=10,
    test_gallery=1,
    test_probe=2,
)

# ------------------------------------------------------------------------------------ data


@dataclass
class FaceData:
    """Every split of one run, on the run's device. HR images, their VLR versions, labels, ids."""

    pretrain: IdentityImages  # identities disjoint from all below
    pretrain_vlr: Tensor
    train: IdentityImages  # fine-tuning identities (labels 0..C-1), training images
    train_vlr: Tensor
    val_gallery: IdentityImages
    val_probe: IdentityImages
    val_probe_vlr: Tensor
    test_gallery: IdentityImages
    test_probe: IdentityImages
    test_probe_vlr: Tensor
    source: str
    notes: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {
            "pretrain_identities": self.pretrain.num_identities,
            "pretrain_images": len(self.pretrain),
            "finetune_identities": self.train.num_identities,
            "train_images": len(self.train),
            "val_gallery_images": len(self.val_gallery),
            "val_probe_images": len(self.val_probe),
            "test_gallery_images": len(self.test_gallery),
            "test_probe_images": len(self.test_probe),
        }


def load_data(config: Config, data_dir: Path | None, seed: int) -> FaceData:
    """Synthetic identities (or a folder), split without leakage, with VLR versions of every image.

    Identities: pretraining and fine-tuning sets are disjoint. Images: each fine-tuning
    identity's images are split into training, validation gallery/probe and test
    gallery/probe images, pairwise disjoint (checked again by the Gallery's image ids).
    """
    if config.images_per_identity <= config.held_out:
        raise ValueError(
            f"images_per_identity={config.images_per_identity} leaves no training image: "
            f"{config.held_out} images per identity are held out for validation and test"
        )
    data_seed, vlr_seed = (int(s) for s in np.random.SeedSequence(seed).generate_state(2))
    notes = []
    if data_dir is None:
        total = config.pretrain_identities + config.finetune_identities
        data = synthetic_identities(total, config.images_per_identity, size=config.hr_size, seed=data_seed)
        source = f"synthetic: {total} identities x {config.images_per_identity} images, {config.hr_size}px"
        pretrain_rows, finetune_rows = split_identities(
            data.labels, (config.pretrain_identities, None), seed=seed
        )
    else:
        data = load_image_folder(data_dir, size=config.hr_size)
        source = (
            f"folder {data_dir}: {data.num_identities} identities, {len(data)} images, "
            f"resized to {config.hr_size}px"
        )
        # Fine-tuning identities need a training image besides the held-out ones.
        counts = torch.bincount(data.labels, minlength=len(data.identity_names))
        eligible = (counts >= config.held_out + 1).nonzero().squeeze(1).numpy()
        if eligible.size < 2:
            raise SystemExit(
                f"--data-dir {data_dir}: fine-tuning needs at least 2 identities with "
                f"{config.held_out + 1} or more images (training + {config.held_out} held out); "
                f"found {eligible.size}"
            )
        wanted = min(config.finetune_identities, max(2, eligible.size // 2))
        chosen = np.random.default_rng(seed).choice(eligible, wanted, replace=False)
        is_finetune = np.isin(data.labels.numpy(), chosen)
        finetune_rows, pretrain_rows = np.flatnonzero(is_finetune), np.flatnonzero(~is_finetune)
        if np.unique(data.labels.numpy()[pretrain_rows]).size < 2:
            raise SystemExit(
                f"--data-dir {data_dir}: pretraining needs at least 2 identities besides the {wanted} "
                "fine-tuning ones"
            )
        notes.append(
            f"{wanted} identities with at least {config.held_out + 1} images fine-tune and are evaluated; "
            "the others pretrain the backbone"
        )
    vlr = very_low_resolution(data.images, config.vlr_size, seed=vlr_seed)
    finetune = data.subset(finetune_rows, relabel=True)
    finetune_vlr = vlr[torch.from_numpy(finetune_rows)]
    parts = split_images(
        finetune.labels,
        (None, config.val_gallery, config.val_probe, config.test_gallery, config.test_probe),
        seed=seed,
    )
    train, val_gallery, val_probe, test_gallery, test_probe = (finetune.subset(rows) for rows in parts)
    pretrain = data.subset(pretrain_rows, relabel=True)
    # No leakage: no image in two parts, no identity both pretrained on and fine-tuned.
    every_image = np.concatenate(
        [part.image_ids for part in (train, val_gallery, val_probe, test_gallery, test_probe)]
    )
    assert np.unique(every_image).size == every_image.size == len(finetune), "an image is in two parts"
    assert not set(pretrain.identity_names) & set(finetune.identity_names), "an identity is in both sets"
    return FaceData(
        pretrain=pretrain,
        pretrain_vlr=vlr[torch.from_numpy(pretrain_rows)],
        train=train,
        train_vlr=finetune_vlr[torch.from_numpy(parts[0])],
        val_gallery=val_gallery,
        val_probe=val_probe,
        val_probe_vlr=finetune_vlr[torch.from_numpy(parts[2])],
        test_gallery=test_gallery,
        test_probe=test_probe,
        test_probe_vlr=finetune_vlr[torch.from_numpy(parts[4])],
        source=source,
        notes=notes,
    )


# ------------------------------------------------------------------------------------ networks


def _conv(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class Backbone(nn.Module):
    """A small face-recognition CNN: three stages of two 3×3 convolutions, a linear embedding."""

    def __init__(self, image_size: int, width: int, embedding_dim: int) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            *_conv(3, w), *_conv(w, w), nn.MaxPool2d(2),
            *_conv(w, 2 * w), *_conv(2 * w, 2 * w), nn.MaxPool2d(2),
            *_conv(2 * w, 4 * w), *_conv(4 * w, 4 * w), nn.MaxPool2d(2),
        )  # fmt: skip
        side = image_size // 8
        self.embed = nn.Sequential(
            nn.Flatten(), nn.Linear(4 * w * side * side, embedding_dim), nn.BatchNorm1d(embedding_dim)
        )

    def forward(self, images: Tensor) -> Tensor:
        """(n, 3, H, W) in [0, 1] → (n, embedding_dim)."""
        return self.embed(self.features((images - 0.5) / 0.25))


class DSR(nn.Module):
    """Super-resolution: bilinear upsampling plus a learned residual of five 3×3 convolutions."""

    def __init__(self, hr_size: int, channels: int = 32) -> None:
        super().__init__()
        self.hr_size = hr_size
        layers: list[nn.Module] = [nn.Conv2d(3, channels, 3, padding=1), nn.ReLU(inplace=True)]
        for _ in range(3):
            layers += [nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(channels, 3, 3, padding=1))
        self.body = nn.Sequential(*layers)

    def forward(self, vlr: Tensor) -> Tensor:
        """(n, 3, h, w) → (n, 3, hr_size, hr_size), clamped to [0, 1]."""
        up = F.interpolate(vlr, size=(self.hr_size, self.hr_size), mode="bilinear", align_corners=False)
        return (up + self.body(up)).clamp(0, 1)


def batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Shuffled row indices in batches (the last, smaller one dropped)."""
    order = torch.randperm(n, generator=generator)
    for start in range(0, n - batch_size + 1, batch_size):
        yield order[start : start + batch_size]


@torch.no_grad()
def embed(model: nn.Module, images: Tensor, batch_size: int = 512) -> Tensor:
    """Embeddings of ``images`` in eval mode, batch by batch."""
    model.eval()
    return torch.cat([model(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


@torch.no_grad()
def super_resolve(dsr: DSR, vlr: Tensor, batch_size: int = 1024) -> Tensor:
    dsr.eval()
    return torch.cat([dsr(vlr[i : i + batch_size]) for i in range(0, len(vlr), batch_size)])


def psnr(a: Tensor, b: Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images in [0, 1]."""
    return float(10 * torch.log10(1 / F.mse_loss(a, b)))


def train_dsr(
    data: FaceData, config: Config, device: torch.device, seed: int, show: bool
) -> tuple[DSR, dict[str, Any]]:
    """Train the DSR on the pretraining identities' (VLR, HR) pairs (never on fine-tuning images)."""
    torch.manual_seed(seed)
    dsr = DSR(config.hr_size).to(device)
    optimizer = torch.optim.Adam(dsr.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    hr, vlr = data.pretrain.images.to(device), data.pretrain_vlr.to(device)
    steps = config.dsr_epochs * (len(hr) // 64)
    start = time.perf_counter()
    with progress(steps, "DSR (VLR -> HR)", show) as bar:
        for _ in range(config.dsr_epochs):
            dsr.train()
            for rows in batches(len(hr), 64, g):
                rows = rows.to(device)
                loss = F.l1_loss(dsr(vlr[rows]), hr[rows])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                bar.update()
                bar.set_postfix_str(f"L1 {loss.item():.4f}")
    probes_hr = data.test_probe.images.to(device)
    probes_vlr = data.test_probe_vlr.to(device)
    bilinear = F.interpolate(probes_vlr, size=probes_hr.shape[-2:], mode="bilinear", align_corners=False)
    summary = {
        "psnr_dsr_db": psnr(super_resolve(dsr, probes_vlr), probes_hr),
        "psnr_bilinear_db": psnr(bilinear.clamp(0, 1), probes_hr),
        "training_seconds": time.perf_counter() - start,
    }
    return dsr, summary


def pretrain_backbone(
    data: FaceData, config: Config, device: torch.device, seed: int, show: bool
) -> tuple[Backbone, dict[str, Any]]:
    """Pretrain on HR images of the pretraining identities: ArcFace on P×K batches."""
    torch.manual_seed(seed)
    model = Backbone(config.hr_size, config.width, config.embedding_dim).to(device)
    head = ek.ArcFaceLoss(data.pretrain.num_identities, config.embedding_dim, margin=0.3, scale=16.0).to(
        device
    )
    optimizer = torch.optim.AdamW(
        [*model.parameters(), *head.parameters()], lr=config.pretrain_lr, weight_decay=5e-4
    )
    p = min(2 * config.p, data.pretrain.num_identities)  # a small folder may have fewer identities
    sampler = ek.PKSampler(data.pretrain.labels, p, config.k, seed=seed)
    images, labels = data.pretrain.images.to(device), data.pretrain.labels.to(device)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.pretrain_lr, total_steps=config.pretrain_epochs * len(sampler)
    )
    start = time.perf_counter()
    losses = []
    with progress(config.pretrain_epochs * len(sampler), "pretraining (HR, ArcFace)", show) as bar:
        for epoch in range(config.pretrain_epochs):
            sampler.set_epoch(epoch)
            model.train()
            for rows in sampler:
                rows_t = torch.as_tensor(rows, device=device)
                loss = head(model(images[rows_t]), labels[rows_t])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
                losses.append(loss.item())
                bar.update()
                bar.set_postfix_str(f"loss {losses[-1]:.3f}")
    return model, {
        "loss_first_epoch": float(np.mean(losses[: len(sampler)])),
        "loss_last_epoch": float(np.mean(losses[-len(sampler) :])),
        "training_seconds": time.perf_counter() - start,
    }


# ------------------------------------------------------------------------------------ recipes


@dataclass(frozen=True)
class Recipe:
    """One way of fine-tuning: its loss, its batches and what it is validated on."""

    name: str
    description: str
    kind: str  # "none", "arcface", "paired" or "supcon"
    validated_on: str  # "head_top1", "paired_similarity" or "gallery_rank1"
    scale: float = 0.0
    margin: float = 0.0
    temperature: float = 1.0


RECIPES = (
    Recipe("pretrained", "no fine-tuning (baseline)", "none", "none"),
    Recipe(
        "arcface-s32-m0.3",
        "ArcFace head, scale 32, margin 0.3, on DSR images (case study 02, before)",
        "arcface",
        "head_top1",
        scale=32.0,
        margin=0.3,
    ),
    Recipe(
        "arcface-s8-m0.1-t4",
        "ArcFace head, scale 8, margin 0.1, temperature 4 (case study 02, after)",
        "arcface",
        "head_top1",
        scale=8.0,
        margin=0.1,
        temperature=4.0,
    ),
    Recipe(
        "paired",
        "each DSR image pulled to its own HR pair only (InfoNCE over pairs); validated on paired similarity "
        "(case study 03, the trap)",
        "paired",
        "paired_similarity",
    ),
    Recipe(
        "supcon",
        "SupConLoss of DSR images against HR references, every image of an identity a positive, "
        "PKSampler batches; validated gallery-probe (case study 03, the fix)",
        "supcon",
        "gallery_rank1",
    ),
)


def cosine_rows(a: Tensor, b: Tensor) -> Tensor:
    """cos(a_i, b_i) for every row i."""
    return F.cosine_similarity(a.double(), b.double(), dim=1)


def validate(
    model: nn.Module, head: ek.ArcFaceLoss | None, dsr_val: Tensor, data: FaceData, device: torch.device
) -> dict[str, float]:
    """The three validation metrics of the case studies, on the validation images."""
    gallery = embed(model, data.val_gallery.images.to(device))
    probes = embed(model, dsr_val)
    probe_hr = embed(model, data.val_probe.images.to(device))
    labels = data.val_probe.labels.to(device)
    identification = (
        ek.Gallery()
        .enrol(gallery, data.val_gallery.labels, image_ids=data.val_gallery.image_ids)
        .identify(probes, data.val_probe.labels, ranks=(1,), image_ids=data.val_probe.image_ids)
    )
    out = {
        "paired_similarity": float(cosine_rows(probes, probe_hr).mean()),
        "gallery_rank1": identification["rank-1"],
    }
    if head is not None:
        out["head_top1"] = float((head.logits(probes).argmax(dim=1) == labels).double().mean())
    return out


def finetune(
    recipe: Recipe,
    pretrained: Backbone,
    data: FaceData,
    dsr_images: dict[str, Tensor],
    config: Config,
    device: torch.device,
    seed: int,
    show: bool,
) -> tuple[Backbone, dict[str, Any], Monitors | None]:
    """Fine-tune a copy of the pretrained backbone with ``recipe``; return the validated checkpoint."""
    model = copy.deepcopy(pretrained)
    if recipe.kind == "none":
        return model, {"training_seconds": 0.0, "validation": [], "selected_epoch": 0, "diverged": None}, None
    torch.manual_seed(seed)
    num_classes = len(data.train.identity_names)  # labels 0..C-1 of the fine-tuning identities
    head = None
    if recipe.kind == "arcface":
        head = ek.ArcFaceLoss(
            num_classes,
            config.embedding_dim,
            margin=recipe.margin,
            scale=recipe.scale,
            temperature=recipe.temperature,
        ).to(device)
        loss_fn: ek.Loss = head
    else:
        loss_fn = ek.SupConLoss(config.temperature)
    groups = [{"params": model.parameters(), "lr": config.lr}]
    if head is not None:
        groups.append({"params": head.parameters(), "lr": config.head_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=5e-4)
    monitors = Monitors(config.window, num_classes if head is not None else None)

    hr, lr_images = data.train.images.to(device), dsr_images["train"]
    labels = data.train.labels.to(device)
    g = torch.Generator().manual_seed(seed)
    # Every recipe takes the same number of steps of batch_size DSR images per epoch.
    steps_per_epoch = len(hr) // config.batch_size
    if recipe.kind == "supcon":
        p = min(config.batch_size // config.k, num_classes)
        sampler = ek.PKSampler(data.train.labels, p, config.k, seed=seed)

    def epoch_batches(epoch: int) -> Iterator[Tensor]:
        if recipe.kind == "supcon":
            sampler.set_epoch(epoch)
            # A PK epoch covers every image and so holds more batches: stop at steps_per_epoch.
            return (torch.as_tensor(rows) for rows in itertools.islice(sampler, steps_per_epoch))
        # Shuffled batches, as the case studies' DataLoader(shuffle=True).
        return batches(len(hr), config.batch_size, g)

    best: tuple[float, int, dict[str, Tensor]] | None = None
    validation = []
    diverged: dict[str, Any] | None = None
    step = 0
    start = time.perf_counter()
    with progress(config.finetune_epochs * steps_per_epoch, f"fine-tuning {recipe.name}", show) as bar:
        for epoch in range(1, config.finetune_epochs + 1):
            for rows in epoch_batches(epoch):
                model.train()
                rows = rows.to(device)
                b = len(rows)
                # DSR images and their HR pairs in one pass: shared batch-norm statistics.
                both = model(torch.cat([lr_images[rows], hr[rows]]))
                z, z_hr = both[:b], both[b:]
                y = labels[rows]
                if not bool(torch.isfinite(both).all()):
                    diverged = {"step": step + 1, "epoch": epoch, "reason": "non-finite embeddings"}
                    break
                if recipe.kind == "arcface":
                    loss = loss_fn(z, y)  # the case study: logits = arcface(sr_embeddings, labels)
                elif recipe.kind == "paired":
                    loss = loss_fn(
                        z, rows, ref_embeddings=z_hr, ref_labels=rows
                    )  # the pair is the only positive
                else:
                    loss = loss_fn(z, y, ref_embeddings=z_hr, ref_labels=y)
                if not bool(torch.isfinite(loss)):
                    diverged = {"step": step + 1, "epoch": epoch, "reason": f"loss {loss.item()}"}
                    break
                optimizer.zero_grad()
                loss.backward()
                with torch.no_grad():  # before the step: the head the loss used
                    logits = head.last_logits if head is not None else None  # kept by the loss, no matmul
                    monitors.update(step + 1, loss_fn, z.detach(), y, paired=z_hr.detach(), logits=logits)
                optimizer.step()
                step += 1
                bar.update()
                bar.set_postfix_str(f"epoch {epoch} loss {loss.item():.3f}")
            if diverged is not None:
                # A diverged run is reported, not fatal: the last validated checkpoint is evaluated.
                print(f"{recipe.name}: diverged at step {diverged['step']} ({diverged['reason']})")
                break
            scores = validate(model, head, dsr_images["val_probe"], data, device)
            validation.append({"epoch": epoch, "step": step, **scores})
            if best is None or scores[recipe.validated_on] > best[0]:
                best = (scores[recipe.validated_on], epoch, copy.deepcopy(model.state_dict()))
    monitors.finish(step)
    if best is None:  # diverged in the first epoch: nothing was validated but the starting weights
        best = (math.nan, 0, pretrained.state_dict())
    model.load_state_dict(best[2])
    return (
        model,
        {
            "training_seconds": time.perf_counter() - start,
            "validation": validation,
            "selected_epoch": best[1],
            "diverged": diverged,
        },
        monitors,
    )


# ------------------------------------------------------------------------------------ evaluation


def evaluate(
    model: nn.Module, data: FaceData, dsr_probes: Tensor, device: torch.device, *, hr_probes: bool = False
) -> dict[str, Any]:
    """HR gallery, DSR probes (or HR probes): identification, verification, similarities, top-5 matches."""
    gallery = embed(model, data.test_gallery.images.to(device))
    probe_hr = embed(model, data.test_probe.images.to(device))
    probes = probe_hr if hr_probes else embed(model, dsr_probes)
    reports = (
        ek.Gallery()
        .enrol(gallery, data.test_gallery.labels, image_ids=data.test_gallery.image_ids)
        .evaluate(
            probes,
            data.test_probe.labels,
            ranks=(1, 5, 10),
            far_targets=(1e-3,),
            image_ids=data.test_probe.image_ids,
            verification=True,
        )
    )
    identification, verification = reports["identification"], reports["verification"]
    scores, matches = ek.knn(probes, gallery, k=min(5, len(gallery)))
    matches = matches.cpu().numpy()
    return {
        # With HR probes the "pair" is the probe itself: nothing to measure.
        "paired_similarity": math.nan if hr_probes else float(cosine_rows(probes, probe_hr).mean()),
        "same_identity_similarity": verification["mean_genuine_score"],
        "different_identity_similarity": verification["mean_impostor_score"],
        "rank-1": identification.rate("rank-1"),
        "rank-5": identification.rate("rank-5"),
        "rank-10": identification.rate("rank-10"),
        # Unmeasurable below 1,000 impostor pairs (a value at FAR 0, with a note): shown as n/a.
        "tar@far=0.001": verification["tar@far=0.001"]
        if verification.counts["impostor_pairs"] >= 1000
        else math.nan,
        "eer": verification["eer"],
        "auc": verification["auc"],
        "identification": identification,
        "verification": verification,
        "top5": {
            "indices": matches,
            "scores": scores.cpu().numpy(),
            "correct": data.test_gallery.labels.numpy()[matches] == data.test_probe.labels.numpy()[:, None],
        },
    }


# ------------------------------------------------------------------------------------ report

TABLE_HEADERS = (
    "recipe",
    "paired sim",
    "same-id sim",
    "diff-id sim",
    "rank-1",
    "rank-5",
    "TAR@FAR=1e-3",
    "EER",
    "diagnoses (first step)",
    "train s",
)


def table_rows(results: dict[str, dict[str, Any]]) -> list[list[str]]:
    rows = []
    for name, r in results.items():
        # Info notes are shown too, marked: the paired shortcut is one when identities still separate.
        fired = ", ".join(
            f"{d['code']} ({d['step']}{', info' if d['severity'] == 'info' else ''})"
            for d in r["diagnoses"] or ()
        )
        if r["diverged"] is not None:
            fired = ", ".join(filter(None, [f"diverged ({r['diverged']['step']})", fired]))
        rows.append(
            [
                name,
                f"{r['paired_similarity']:.3f}",
                f"{r['same_identity_similarity']:.3f}",
                f"{r['different_identity_similarity']:.3f}",
                str(r["rank-1"]),
                str(r["rank-5"]),
                _number(r["tar@far=0.001"]),
                _number(r["eer"]),
                fired or ("n/a" if r["monitors"] is None else "none"),
                f"{r['training_seconds']:.0f}",
            ]
        )
    return rows


def _number(x: float) -> str:
    """Three decimals, or "n/a" for NaN (e.g. TAR at a FAR finer than the impostor pairs allow)."""
    return "n/a" if math.isnan(x) else f"{x:.3f}"


def figures(out: Path, results: dict[str, dict[str, Any]], data: FaceData, dsr_probes: Tensor) -> list[str]:
    """CMC, score histograms, monitor histories, validation curves and top-5 match grids."""
    plt = pyplot()
    if plt is None:
        return []
    from embedkit.plotting import plot_cmc, plot_history, plot_matches, plot_score_distributions

    written = []
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, (name, r) in enumerate(results.items()):
        cmc = r["identification"].curves["cmc"][:20]
        plot_cmc(cmc, ax=ax, label=name, chance=1 / data.test_gallery.num_identities if i == 0 else None)
    ax.set_title("CMC: DSR probes against the HR gallery (held-out images)")
    written.append(save(fig, out / "cmc.png"))

    cols = min(3, len(results))
    rows = math.ceil(len(results) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, (name, r) in zip(axes.flat, results.items(), strict=False):
        v = r["verification"]
        plot_score_distributions(v, ax=ax)
        ax.set_title(f"{name}: EER {r['eer']:.3f}")
    for ax in list(axes.flat)[len(results) :]:
        ax.axis("off")
    written.append(save(fig, out / "scores.png"))

    for name, r in results.items():
        monitors = r["monitors"]
        if monitors is None:
            continue
        events = [(d["step"], d["code"]) for d in r["diagnoses"] if d["severity"] != "info"]
        panels = [
            (["loss"], "training loss (every step)", None),
            (
                [
                    "health/paired_similarity",
                    "health/same_identity_similarity",
                    "health/different_identity_similarity",
                ],
                "cosine (DSR vs HR)",
                None,
            ),
            (["health/effective_rank"], "effective rank", None),
        ]
        if monitors.collapse is not None:
            panels.append(
                (
                    ["collapse/top1_accuracy", "collapse/dominant_class_share"],
                    "training top-1 / dominant class share",
                    1 / monitors.num_classes,
                )
            )
        fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.6 * len(panels)), sharex=True, squeeze=False)
        for ax, (keys, ylabel, chance) in zip(axes[:, 0], panels, strict=True):
            # The loss of every step (the loss monitor's own history); the rest once per window.
            history = monitors.losses.history if keys == ["loss"] else monitors.history
            keys = [k for k in keys if k in history.keys]
            plot_history(history, keys, ax=ax, events=events, ylabel=ylabel, chance=chance)
        axes[0, 0].set_title(f"{name}: monitors every {monitors.window} steps, diagnoses marked")
        written.append(save(fig, out / f"monitors_{name}.png"))

    trained = {n: r for n, r in results.items() if r["validation"]}
    if trained:
        fig, axes = plt.subplots(1, len(trained), figsize=(4.2 * len(trained), 3.4), squeeze=False)
        for ax, (name, r) in zip(axes[0], trained.items(), strict=True):
            epochs = [v["epoch"] for v in r["validation"]]
            for key in ("paired_similarity", "gallery_rank1", "head_top1"):
                if key in r["validation"][0]:
                    style = "-" if key == r["validated_on"] else "--"
                    ax.plot(epochs, [v[key] for v in r["validation"]], style, marker="o", label=key)
            ax.axvline(r["selected_epoch"], color="grey", linestyle=":", label="selected")
            ax.set_title(f"{name}\nvalidated on {r['validated_on']} (solid)", fontsize=9)
            ax.set_xlabel("epoch")
            ax.set_ylim(-0.02, 1.02)
            ax.legend(fontsize=7)
        written.append(save(fig, out / "validation.png"))

    shown = _grid_probes(data.test_probe.labels.numpy(), len(next(iter(results.values()))["top5"]["indices"]))
    for name, r in results.items():
        top5 = r["top5"]
        fig = plot_matches(
            dsr_probes[shown].cpu(),
            data.test_gallery.images,
            top5["indices"][shown],
            top5["correct"][shown],
            scores=top5["scores"][shown],
            max_probes=len(shown),
        )
        fig.suptitle(f"{name}: DSR probes and their top-5 HR gallery matches (green = same identity)")
        written.append(save(fig, out / f"matches_{name}.png"))
    return written


def _grid_probes(labels: np.ndarray, limit: int, count: int = 6) -> np.ndarray:
    """The first probe of the first ``count`` identities: the same probes in every recipe's grid."""
    _, first = np.unique(labels, return_index=True)
    return np.sort(first)[: min(count, limit)]


def markdown(report: dict[str, Any], table: str, written: list[str]) -> str:
    lines = [
        "# Face fine-tuning with DSR probes (case studies 01–03)",
        "",
        f"Command: `{report['command']}`  ",
        f"Device: {report['device']}; data: {report['data']['source']}; "
        f"total time {report['seconds']:.0f} s.",
        "",
        "Evaluation: held-out HR gallery images against DSR probes of other images of the same identities "
        f"({report['data']['counts']['test_gallery_images']} gallery, "
        f"{report['data']['counts']['test_probe_images']} probes, "
        f"{report['data']['counts']['finetune_identities']} identities; rank-k chance = k / identities).",
        "",
        table,
        "",
        f"DSR: PSNR {report['dsr']['psnr_dsr_db']:.2f} dB on test probes (bilinear upsampling "
        f"{report['dsr']['psnr_bilinear_db']:.2f} dB). "
        f"Pretrained backbone on HR probes (no DSR): rank-1 {report['pretrained_hr_probes']['rank-1']}.",
        "",
        "## Diagnoses raised during training",
        "",
    ]
    for name, r in report["recipes"].items():
        lines.append(f"### {name}")
        lines.append("")
        lines.append(
            f"{r['description']}. Validated on `{r['validated_on']}`, "
            f"checkpoint of epoch {r['selected_epoch']}."
        )
        lines.append("")
        if r["diverged"] is not None:
            d = r["diverged"]
            lines += [
                f"**Diverged** at step {d['step']} (epoch {d['epoch']}: {d['reason']}); training "
                f"stopped and the checkpoint of epoch {r['selected_epoch']} was evaluated "
                "(0 = the pretrained weights).",
                "",
            ]
        if r["diagnoses"] is None:
            lines.append("No training, no monitors.")
        elif not r["diagnoses"]:
            lines.append("No diagnosis fired.")
        for d in r["diagnoses"] or []:
            lines.append(
                f"- **{d['code']}** ({d['severity']}, {d['monitor']} monitor) first at step {d['step']}, "
                f"in {d['windows_fired']} of {d['windows']} windows: {d['message']}"
            )
        lines.append("")
    lines += ["## Figures", ""] + [f"![{name}]({name})" for name in written]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ main


def run(
    config: Config, *, data_dir: Path | None, device: torch.device, out: Path, seed: int, show: bool = True
) -> dict[str, Any]:
    """The whole experiment; returns the report written to ``out/report.json``."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    data = load_data(config, data_dir, seed)
    print(f"data: {data.source}")
    print("  " + ", ".join(f"{k} {v}" for k, v in data.counts().items()))
    dsr, dsr_summary = train_dsr(data, config, device, seed, show)
    print(
        f"DSR: PSNR {dsr_summary['psnr_dsr_db']:.2f} dB (bilinear {dsr_summary['psnr_bilinear_db']:.2f} dB)"
    )
    # The DSR is frozen: its outputs are computed once.
    dsr_images = {
        "train": super_resolve(dsr, data.train_vlr.to(device)),
        "val_probe": super_resolve(dsr, data.val_probe_vlr.to(device)),
        "test_probe": super_resolve(dsr, data.test_probe_vlr.to(device)),
    }
    pretrained, pretrain_summary = pretrain_backbone(data, config, device, seed, show)
    hr_baseline = evaluate(pretrained, data, dsr_images["test_probe"], device, hr_probes=True)
    print(f"pretrained backbone, HR probes: rank-1 {hr_baseline['rank-1']}")

    results: dict[str, dict[str, Any]] = {}
    for recipe in RECIPES:
        model, training, monitors = finetune(recipe, pretrained, data, dsr_images, config, device, seed, show)
        result = evaluate(model, data, dsr_images["test_probe"], device)
        result.update(training)
        result.update(
            description=recipe.description,
            validated_on=recipe.validated_on,
            monitors=monitors,
            diagnoses=None if monitors is None else monitors.diagnoses(),
        )
        results[recipe.name] = result
        fired = ", ".join(d["code"] for d in result["diagnoses"] or []) or "none"
        print(
            f"{recipe.name}: rank-1 {result['rank-1']}, "
            f"paired {result['paired_similarity']:.3f}, diagnoses: {fired}"
        )

    table = markdown_table(TABLE_HEADERS, table_rows(results))
    report: dict[str, Any] = {
        "command": command_line(),
        "device": str(device),
        "seed": seed,
        "config": dataclasses.asdict(config),
        "data": {"source": data.source, "counts": data.counts(), "notes": data.notes},
        "dsr": dsr_summary,
        "pretraining": pretrain_summary,
        "pretrained_hr_probes": _summary(hr_baseline),
        "recipes": {
            name: {
                **_summary(r),
                "description": r["description"],
                "validated_on": r["validated_on"],
                "selected_epoch": r["selected_epoch"],
                "diverged": r["diverged"],
                "training_seconds": r["training_seconds"],
                "validation": r["validation"],
                "diagnoses": r["diagnoses"],
                "identification": r["identification"].to_dict(),
                "verification": r["verification"].to_dict(),
            }
            for name, r in results.items()
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    for name, r in results.items():
        if r["monitors"] is not None:
            r["monitors"].history.to_csv(out / f"monitors_{name}.csv")
    written = figures(out, results, data, dsr_images["test_probe"])
    report["figures"] = written
    report["seconds"] = time.perf_counter() - start
    write_report(out, report, markdown(report, table, written))
    print()
    print(table)
    print(f"\nwrote {out}/report.json, report.md and {len(written)} figures in {report['seconds']:.0f} s")
    return report


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "paired_similarity",
        "same_identity_similarity",
        "different_identity_similarity",
        "rank-1",
        "rank-5",
        "rank-10",
        "tar@far=0.001",
        "eer",
        "auc",
    )
    return {k: result[k] for k in keys}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser(__doc__ or "").parse_args(argv)
    config = QUICK if args.quick else FULL
    out = args.out or Path("out") / ("face_finetune-quick" if args.quick else "face_finetune")
    torch.use_deterministic_algorithms(True, warn_only=True)
    return run(config, data_dir=args.data_dir, device=resolve_device(args.device), out=out, seed=args.seed)


if __name__ == "__main__":
    main()
