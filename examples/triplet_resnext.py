"""Triplet training with inception and ResNeXt blocks: case study 04, "loss stuck at the margin".

Case study 04 trained a face-embedding network on offline triplets with
``TripletMarginLoss(margin=0.2)``. Its loss sat at 0.2 — the margin — and it tried, in order:
normalising the input, semi-hard negatives (neither helped), replacing its inception blocks by
ResNeXt blocks (the loss fell), and finally fixing the pool rule of its triplet construction,
which had removed both the anchor and the positive from an identity's pool of images (more
triplets from the same images; validation rate up from about 75% to 92%).

This script re-runs that story on synthetic identities (or a real folder) with embedkit's pieces:

* **Networks.** Two embedding networks of the same depth and stem, both conv-BN-ReLU:
  ``inception`` — inception-style blocks (1×1, 1×1→3×3, 1×1→3×3→3×3 and pool→1×1 branches,
  concatenated) *without* a residual path; ``resnext`` — ResNeXt bottleneck blocks (1×1,
  grouped 3×3, 1×1) *with* an identity path. A linear embedding on top; the loss
  L2-normalises it (FaceNet).
* **Input.** ``raw``: pixel values 0–255 as read from an image file; ``norm``: each channel
  standardised with the training images' mean and standard deviation.
* **Triplets.** Each epoch :func:`embedkit.samplers.build_triplets` builds the epoch's
  (anchor, positive, negative) triplets offline, by the old pool rule (``both_removed``:
  ``n // 2`` pairs from an identity of ``n`` images) or the fixed one (``one_removed``:
  ``n - 1``), with ``random`` negatives or ``semihard`` ones mined from the network's
  embeddings of the training images at the start of the epoch.
* **Loss.** ``TripletMarginLoss(margin=0.2)`` on each batch of triplets: the anchors are the
  queries and the batch's positives and negatives the reference set (``ref_embeddings``), so
  each anchor is compared with its own positive and with every image of another identity in
  the batch, its offline negative among them. ``random`` runs average over all those triplets
  (``mining="all"``, the expectation over random negatives); ``semihard`` runs keep, per
  anchor-positive pair, the nearest negative farther than the positive
  (``mining="semi_hard"``, FaceNet's rule) — offline *and* online semi-hard mining.

The runs, and why these six tell the story (each changes one thing the case study changed):

1. ``inception-raw-random`` — the case study's starting point (old pool rule throughout 1–5);
2. ``inception-norm-random`` — its first attempt: normalised input;
3. ``inception-norm-semihard`` — its second attempt on top: semi-hard negatives;
4. ``resnext-raw-random`` — the architecture change alone, on the starting recipe;
5. ``resnext-norm-semihard`` — the architecture change with both attempts;
6. ``resnext-norm-semihard-fixed`` — run 5 with the fixed pool rule (the last update).

Every step feeds ``LossMonitor`` (the loss and its ``active_triplet_fraction``;
``loss_at_margin``) and ``EmbeddingHealthMonitor`` (the batch's embeddings with their labels;
``complete_collapse`` and the rest); every ``window`` steps they are read and the health
monitor reset, and each diagnosis is recorded with the step it first fired. After every epoch
the network is evaluated on identities it never saw, with FaceNet's definitions on
L2-normalised embeddings: the distance threshold ``d`` is the best-accuracy threshold on
balanced pairs of *validation* identities (LFW protocol), then on the *test* identities
VAL(d) = true accepts / same-identity pairs and FAR(d) = false accepts / different-identity
pairs, and VAL@FAR=1e-3 (the threshold set on the test pairs' own impostor distances). No
checkpoint is selected: the table shows the last epoch.

The training identities have 2, 3 or 4 images each (a third of them each), the shape of the
case study's data (4,307 images of 1,436 identities in the full run), which is where the pool
rule matters. The synthetic images are 32×32.

    python examples/triplet_resnext.py --quick                 # about 2.5 minutes on 2 CPU cores
    python examples/triplet_resnext.py                         # the full run (1,436 identities)
    python examples/triplet_resnext.py --data-dir root --quick # a real root/<identity>/<image> folder

``--quick`` checks the pipeline end to end; it is too short to learn features that carry to new
identities (its AUCs are near 0.5). The full run took 27 minutes on a 2-core CPU shared with
other jobs. On a CPU busy with other work, ``OMP_NUM_THREADS=1`` can be several times faster
than the default threads (the inception blocks' many small convolutions wait on each other).

Writes ``report.json``, ``report.md`` and figures into ``--out`` and prints a table.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

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
from embedkit.datasets import IdentityImages, load_image_folder, split_identities, synthetic_identities
from embedkit.evaluation.verification import make_pairs, val_far_at_threshold

MARGIN = 0.2  # the case study's margin
FAR_TARGET = 1e-3
VAL_AT_FAR = "val@far=0.001"

# ------------------------------------------------------------------------------------ configuration


@dataclass(frozen=True)
class Config:
    """Sizes of one run. ``FULL`` has the case study's 4,307 training images of 1,436 identities."""

    train_identities: int  # with 2, 3 or 4 images each, a third of them each
    val_identities: int  # 4 images each; they only set the distance threshold
    test_identities: int  # 4 images each
    image_size: int = 32
    width: int = 24  # channels of the first stage; doubled at each later stage
    blocks: tuple[int, ...] = (2, 2, 2)  # blocks per stage, for both networks
    cardinality: int = 4  # groups of the ResNeXt 3x3 convolution
    embedding_dim: int = 64
    epochs: int = 20
    batch_triplets: int = 64  # triplets per step (3x as many images)
    lr: float = 1e-3
    window: int = 20  # steps between two readings of the monitors
    max_impostors: int = 200_000  # test pairs of different identities (all same-identity pairs are kept)


FULL = Config(train_identities=1436, val_identities=150, test_identities=300, epochs=20)
QUICK = Config(
    train_identities=180,
    val_identities=40,
    test_identities=80,
    width=16,
    embedding_dim=32,
    epochs=5,
    window=10,
    max_impostors=50_000,
)

Arch = Literal["inception", "resnext"]
Inputs = Literal["raw", "norm"]
Negatives = Literal["random", "semihard"]
Rule = Literal["both_removed", "one_removed"]


@dataclass(frozen=True)
class Run:
    """One training: architecture, input scaling, negatives and pool rule."""

    arch: Arch
    inputs: Inputs
    negatives: Negatives
    rule: Rule = "both_removed"
    step: str = ""  # which update of the case study it stands for

    @property
    def name(self) -> str:
        return f"{self.arch}-{self.inputs}-{self.negatives}" + (
            "-fixed" if self.rule == "one_removed" else ""
        )


RUNS = (
    Run("inception", "raw", "random", step="start (2025-04-05)"),
    Run("inception", "norm", "random", step="normalised input (2025-04-10)"),
    Run("inception", "norm", "semihard", step="+ semi-hard negatives (2025-04-10)"),
    Run("resnext", "raw", "random", step="ResNeXt blocks alone (2025-04-14)"),
    Run("resnext", "norm", "semihard", step="ResNeXt + both attempts (2025-04-14)"),
    Run("resnext", "norm", "semihard", "one_removed", step="+ fixed pool rule (2025-05-12)"),
)

# ------------------------------------------------------------------------------------ data


@dataclass
class TripletData:
    """Training, validation and test identities (pairwise disjoint), images in [0, 1]."""

    train: IdentityImages
    val: IdentityImages
    test: IdentityImages
    source: str
    notes: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, Any]:
        sizes = np.bincount(np.bincount(self.train.labels.numpy()))
        return {
            "train_identities": self.train.num_identities,
            "train_images": len(self.train),
            "train_identities_by_image_count": {str(n): int(c) for n, c in enumerate(sizes) if c},
            "val_identities": self.val.num_identities,
            "val_images": len(self.val),
            "test_identities": self.test.num_identities,
            "test_images": len(self.test),
        }


def case_study_shape(labels: Tensor, seed: int) -> np.ndarray:
    """Rows that keep 2, 3 or 4 images of each identity (a third of the identities each).

    Parameters
    ----------
    labels : Tensor of shape (n_images,)
        Identity labels, at least 4 images per identity.
    seed : int
        Seed of which identity keeps how many and which images.

    Returns
    -------
    ndarray of int64
        Sorted row indices.
    """
    values = labels.numpy()
    identities = np.unique(values)
    rng = np.random.default_rng(seed)
    keep = np.resize(np.array([2, 3, 4]), identities.size)[rng.permutation(identities.size)]
    rows = []
    for identity, k in zip(identities, keep, strict=True):
        own = np.flatnonzero(values == identity)
        if own.size < 4:
            raise ValueError(f"identity {identity} has {own.size} images; case_study_shape needs 4 or more")
        rows.append(rng.choice(own, k, replace=False))
    return np.sort(np.concatenate(rows))


def load_data(config: Config, data_dir: Path | None, seed: int) -> TripletData:
    """Synthetic identities shaped like the case study's data (or a folder), split by identity."""
    data_seed, shape_seed = (int(s) for s in np.random.SeedSequence(seed).generate_state(2))
    notes = []
    sizes = (config.train_identities, config.val_identities, config.test_identities)
    if data_dir is None:
        total = sum(sizes)
        data = synthetic_identities(total, 4, size=config.image_size, seed=data_seed)
        source = f"synthetic: {total} identities x 4 images, {config.image_size}px"
        train_rows, val_rows, test_rows = split_identities(data.labels, sizes, seed=seed)
        train = data.subset(train_rows, relabel=True)
        train = train.subset(case_study_shape(train.labels, shape_seed))
        notes.append(
            "training identities keep 2, 3 or 4 of their images (a third each), as in the case study"
        )
    else:
        data = load_image_folder(data_dir, size=config.image_size, min_images=2)
        source = (
            f"folder {data_dir}: {data.num_identities} identities with 2 or more images, {len(data)} images, "
            f"resized to {config.image_size}px"
        )
        if data.num_identities < 6:
            raise SystemExit(
                f"--data-dir {data_dir}: needs at least 6 identities with 2 or more images "
                f"(training, validation and test identities are disjoint); found {data.num_identities}"
            )
        # The configured proportions, scaled to the folder's identities; at least 2 each.
        share = np.array(sizes, dtype=np.float64) / sum(sizes)
        val_n = max(2, round(share[1] * data.num_identities))
        test_n = max(2, round(share[2] * data.num_identities))
        train_rows, val_rows, test_rows = split_identities(data.labels, (None, val_n, test_n), seed=seed)
        train = data.subset(train_rows, relabel=True)
        notes.append(
            f"{train.num_identities} / {val_n} / {test_n} identities train / set the threshold / test"
        )
    val = data.subset(val_rows, relabel=True)
    test = data.subset(test_rows, relabel=True)
    # No identity in two parts (names are unique per identity).
    names = [set(part.identity_names) for part in (train, val, test)]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2]), (
        "an identity is in two parts"
    )
    return TripletData(train=train, val=val, test=test, source=source, notes=notes)


class InputScaling(nn.Module):
    """``raw``: 0–255 pixel values (as read from a file); ``norm``: per-channel standardised.

    Parameters
    ----------
    kind : {"raw", "norm"}
        Which input the network sees.
    train_images : Tensor of shape (n_images, 3, height, width)
        Training images in [0, 1]; their per-channel mean and std define ``norm``.
    """

    mean: Tensor
    std: Tensor

    def __init__(self, kind: Inputs, train_images: Tensor) -> None:
        super().__init__()
        if kind == "raw":
            mean, std = torch.zeros(3), torch.full((3,), 1 / 255)
        else:
            mean, std = train_images.mean(dim=(0, 2, 3)), train_images.std(dim=(0, 2, 3))
        self.register_buffer("mean", mean.view(1, 3, 1, 1))
        self.register_buffer("std", std.view(1, 3, 1, 1))

    def forward(self, images: Tensor) -> Tensor:
        return (images - self.mean) / self.std


# ------------------------------------------------------------------------------------ networks


def _cbr(c_in: int, c_out: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]


class InceptionBlock(nn.Module):
    """Four branches concatenated, no residual path: 1×1; 1×1→3×3; 1×1→3×3→3×3; max-pool→1×1."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        b = c_out // 4
        self.branches = nn.ModuleList(
            [
                nn.Sequential(*_cbr(c_in, b, 1)),
                nn.Sequential(*_cbr(c_in, b, 1), *_cbr(b, b, 3)),
                nn.Sequential(*_cbr(c_in, b // 2, 1), *_cbr(b // 2, b, 3), *_cbr(b, b, 3)),
                nn.Sequential(nn.MaxPool2d(3, 1, 1), *_cbr(c_in, c_out - 3 * b, 1)),
            ]
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([branch(x) for branch in self.branches], dim=1)


class ResNeXtBlock(nn.Module):
    """Bottleneck 1×1 → grouped 3×3 → 1×1, added to the identity (a 1×1 projection when widths differ)."""

    def __init__(self, c_in: int, c_out: int, cardinality: int) -> None:
        super().__init__()
        mid = c_out // 2
        self.body = nn.Sequential(
            *_cbr(c_in, mid, 1),
            *_cbr(mid, mid, 3, groups=cardinality),
            nn.Conv2d(mid, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        )
        self.skip: nn.Module = (
            nn.Identity()
            if c_in == c_out
            else nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        )

    def forward(self, x: Tensor) -> Tensor:
        # The identity path lets a block pass its input through when it has nothing to add.
        return torch.relu(self.body(x) + self.skip(x))


class EmbeddingNet(nn.Module):
    """Input scaling, a stride-2 stem, stages of blocks (max-pool between stages), a linear embedding.

    Parameters
    ----------
    arch : {"inception", "resnext"}
        The block type.
    scaling : InputScaling
        Applied to the images in [0, 1] first.
    config : Config
        ``width``, ``blocks``, ``cardinality``, ``embedding_dim``.

    Shapes: images (batch, 3, H, W) in [0, 1] → embeddings (batch, embedding_dim), not normalised.
    """

    def __init__(self, arch: Arch, scaling: InputScaling, config: Config) -> None:
        super().__init__()
        width = config.width
        if width % 4 or width % (2 * config.cardinality):
            raise ValueError(
                f"config.width={width} must be a multiple of 4 (inception branches) and of "
                f"2 x cardinality = {2 * config.cardinality} (ResNeXt groups)"
            )
        layers: list[nn.Module] = [scaling, *_cbr(3, width, 3, stride=2)]
        c = width
        for stage, count in enumerate(config.blocks):
            c_out = width * 2**stage
            if stage:
                layers.append(nn.MaxPool2d(2))
            for _ in range(count):
                block = (
                    InceptionBlock(c, c_out)
                    if arch == "inception"
                    else ResNeXtBlock(c, c_out, config.cardinality)
                )
                layers.append(block)
                c = c_out
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, config.embedding_dim)]
        self.net = nn.Sequential(*layers)

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)


@torch.no_grad()
def embed(model: nn.Module, images: Tensor, batch_size: int = 512) -> Tensor:
    """Embeddings of ``images`` in eval mode, batch by batch."""
    model.eval()
    return torch.cat([model(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


# ------------------------------------------------------------------------------------ monitors


def loss_at_margin_from(
    steps: np.ndarray, losses: np.ndarray, window: int, tolerance: float = 0.05
) -> int | None:
    """The first step from which ``window`` consecutive losses all lie within ``tolerance x MARGIN``.

    An account of "the loss sits at the margin" independent of the monitors, to compare their
    firing step with. Parameters: ``steps`` and ``losses`` of shape (n_steps,). Returns the
    step, or None.
    """
    near = np.abs(losses - MARGIN) <= tolerance * MARGIN
    run = 0
    for i, ok in enumerate(near):
        run = run + 1 if ok else 0
        if run == window:
            return int(steps[i - window + 1])
    return None


# ------------------------------------------------------------------------------------ evaluation


@dataclass
class Pairs:
    """Validation pairs (balanced, for the threshold) and test pairs (all genuine, sampled impostors)."""

    val: tuple[np.ndarray, np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray, np.ndarray]

    @classmethod
    def of(cls, data: TripletData, config: Config, seed: int) -> Pairs:
        val_genuine = _genuine_pair_count(data.val.labels.numpy())
        return cls(
            val=make_pairs(data.val.labels, max_impostors=val_genuine, seed=seed),
            test=make_pairs(data.test.labels, max_impostors=config.max_impostors, seed=seed),
        )


def _genuine_pair_count(labels: np.ndarray) -> int:
    counts = np.bincount(labels)
    return int((counts * (counts - 1) // 2).sum())


def pair_distances(embeddings: Tensor, pairs: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    """Euclidean distance between the L2-normalised embeddings of each pair, shape (n_pairs,)."""
    z = F.normalize(embeddings.double(), dim=1)
    first, second = (torch.from_numpy(p).to(z.device) for p in pairs[:2])
    return (z[first] - z[second]).norm(dim=1).cpu().numpy()


def evaluate(model: nn.Module, data: TripletData, pairs: Pairs, device: torch.device) -> dict[str, Any]:
    """Threshold on validation identities, then VAL/FAR and VAL@FAR=1e-3 on test identities."""
    val_d = pair_distances(embed(model, data.val.images.to(device)), pairs.val)
    val_report = ek.verification_metrics(-val_d, pairs.val[2], far_targets=(FAR_TARGET,))
    # Best accuracy on balanced pairs, as a distance: accept d <= threshold.
    # -inf when rejecting every validation pair is best (e.g. all distances equal): accept nothing.
    threshold = -float(val_report["best_threshold"])
    test_d = pair_distances(embed(model, data.test.images.to(device)), pairs.test)
    genuine = pairs.test[2]
    at_threshold = val_far_at_threshold(test_d, genuine, threshold if math.isfinite(threshold) else -1.0)
    test_report = ek.verification_metrics(-test_d, genuine, far_targets=(FAR_TARGET,))
    return {
        "threshold": threshold,
        # Rates keep their counts (true accepts / same pairs); NaN when FAR=1e-3 is unmeasurable.
        "val": at_threshold.rate("val"),
        "far": at_threshold.rate("far"),
        VAL_AT_FAR: test_report.rate("tar@far=0.001") or test_report["tar@far=0.001"],
        "auc": test_report["auc"],
        "eer": test_report["eer"],
        "mean_genuine_distance": float(test_d[genuine].mean()),
        "mean_impostor_distance": float(test_d[~genuine].mean()),
        "val_threshold_accuracy": val_report.rate("best_accuracy"),
    }


# ------------------------------------------------------------------------------------ training


def triplet_counts(labels: Tensor) -> dict[str, int]:
    """Triplets per epoch under each pool rule: the counted and the built number."""
    counts = {}
    for rule in ("both_removed", "one_removed"):
        built = ek.build_triplets(labels, rule=rule, seed=0).num_triplets
        counted = ek.count_triplets(labels, rule=rule)
        assert built == counted, f"{rule}: build_triplets gave {built} triplets, count_triplets {counted}"
        counts[rule] = built
    return counts


def train(
    run: Run, data: TripletData, pairs: Pairs, config: Config, device: torch.device, seed: int, show: bool
) -> dict[str, Any]:
    """Train one network on offline triplets; evaluate after every epoch."""
    torch.manual_seed(seed)  # the same initial weights for every run of one architecture
    model = EmbeddingNet(run.arch, InputScaling(run.inputs, data.train.images), config).to(device)
    loss_fn = ek.TripletMarginLoss(MARGIN, mining="semi_hard" if run.negatives == "semihard" else "all")
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    monitors = Monitors(config.window)
    images, labels = data.train.images.to(device), data.train.labels.to(device)
    per_epoch = ek.count_triplets(data.train.labels, rule=run.rule)
    steps_per_epoch = math.ceil(per_epoch / config.batch_triplets)
    g = torch.Generator().manual_seed(seed)
    epochs: list[dict[str, Any]] = []
    step = 0
    diverged = None
    start = time.perf_counter()
    with progress(config.epochs * steps_per_epoch, run.name, show) as bar:
        for epoch in range(1, config.epochs + 1):
            # Offline triplets for this epoch; semi-hard negatives from the current network.
            embeddings = embed(model, images) if run.negatives == "semihard" else None
            triplets = ek.build_triplets(
                data.train.labels,
                rule=run.rule,
                negatives="semi_hard" if embeddings is not None else "random",
                embeddings=embeddings,
                margin=MARGIN,
                seed=seed * 10_000 + epoch,
            )
            order = torch.randperm(triplets.num_triplets, generator=g)
            rows = torch.from_numpy(triplets.indices)[order].to(device)
            first_step = step + 1
            losses, active = [], []
            model.train()
            for begin in range(0, len(rows), config.batch_triplets):
                batch = rows[begin : begin + config.batch_triplets]
                b = len(batch)
                # Anchors, positives and negatives in one pass: shared batch-norm statistics.
                z = model(images[batch.T.reshape(-1)])
                y = labels[batch.T.reshape(-1)]
                if not bool(torch.isfinite(z).all()):
                    diverged = {"step": step + 1, "epoch": epoch, "reason": "non-finite embeddings"}
                    break
                loss = loss_fn(z[:b], y[:b], ref_embeddings=z[b:], ref_labels=y[b:])
                optimizer.zero_grad()
                loss.backward()
                step += 1
                monitors.update(step, loss_fn, z.detach(), y)
                optimizer.step()
                losses.append(loss.item())
                active.append(float(loss_fn.last_stats["active_triplet_fraction"]))
                bar.update()
                bar.set_postfix_str(f"epoch {epoch} loss {losses[-1]:.3f}")
            if diverged is not None:
                print(f"{run.name}: diverged at step {diverged['step']} ({diverged['reason']})")
                break
            scores = evaluate(model, data, pairs, device)
            epochs.append(
                {
                    "epoch": epoch,
                    "first_step": first_step,
                    "step": step,
                    "triplets": triplets.num_triplets,
                    "semi_hard_negatives": triplets.num_semi_hard if embeddings is not None else None,
                    "loss": float(np.mean(losses)),
                    "active_triplet_fraction": float(np.mean(active)),
                    **scores,
                    "diagnoses": monitors.fired_between(first_step, step),
                }
            )
    monitors.finish(step)
    if epochs:  # a reading after the last epoch belongs to it
        epochs[-1]["diagnoses"] = monitors.fired_between(epochs[-1]["first_step"], step)
    loss_steps, loss_values = monitors.losses.history.series("loss")
    return {
        "run": run,
        "model": model,
        "monitors": monitors,
        "epochs": epochs,
        "steps": step,
        "steps_per_epoch": steps_per_epoch,
        "diverged": diverged,
        "diagnoses": monitors.diagnoses(),
        "loss_at_margin_from_step": loss_at_margin_from(loss_steps, loss_values, config.window),
        "training_seconds": time.perf_counter() - start,
    }


# ------------------------------------------------------------------------------------ report

TABLE_HEADERS = (
    "run",
    "pool rule",
    "triplets/epoch",
    "loss (first, last epoch)",
    "active",
    "d",
    "VAL(d)",
    "FAR(d)",
    "VAL@FAR=1e-3",
    "AUC",
    "diagnoses (first step)",
    "train s",
)

_RULE_NAMES = {"both_removed": "old (both removed)", "one_removed": "fixed (one removed)"}


def _rate(value: Any) -> str:
    """A Rate as its value with counts, NaN as "n/a"."""
    if isinstance(value, ek.Rate):
        return f"{value.value:.3f} ({value.hits}/{value.total})"
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def table_rows(results: dict[str, dict[str, Any]]) -> list[list[str]]:
    rows = []
    for name, r in results.items():
        fired = ", ".join(f"{d['code']} ({d['step']})" for d in r["diagnoses"] if d["severity"] != "info")
        if r["diverged"] is not None:
            fired = ", ".join(filter(None, [f"diverged ({r['diverged']['step']})", fired]))
        if not r["epochs"]:
            rows.append(
                [name, _RULE_NAMES[r["run"].rule], "-", "-", "-", "-", "-", "-", "-", "-", fired, "-"]
            )
            continue
        first, last = r["epochs"][0], r["epochs"][-1]
        rows.append(
            [
                name,
                _RULE_NAMES[r["run"].rule],
                str(last["triplets"]),
                f"{first['loss']:.3f}, {last['loss']:.3f}",
                f"{last['active_triplet_fraction']:.2f}",
                f"{last['threshold']:.3f}",
                _rate(last["val"]),
                _rate(last["far"]),
                _rate(last[VAL_AT_FAR]),
                f"{last['auc']:.3f}",
                fired or "none",
                f"{r['training_seconds']:.0f}",
            ]
        )
    return rows


def figures(out: Path, results: dict[str, dict[str, Any]]) -> list[str]:
    """Loss and active fraction per step with the diagnoses marked; VAL/FAR per epoch; embedding health."""
    plt = pyplot()
    if plt is None:
        return []
    from embedkit.plotting import plot_history

    written = []
    n = len(results)
    fig, axes = plt.subplots(n, 2, figsize=(11, 2.5 * n), squeeze=False, sharex="row")
    for row, (name, r) in enumerate(results.items()):
        history = r["monitors"].losses.history
        events = [(d["step"], d["code"]) for d in r["diagnoses"] if d["severity"] != "info"]
        ax = plot_history(history, ["loss"], ax=axes[row, 0], events=events, ylabel="triplet loss")
        ax.axhline(MARGIN, color="black", linestyle="--", linewidth=1)
        ax.set_title(f"{name}: loss per step (dashed: margin {MARGIN:g})", fontsize=9)
        ax = plot_history(
            history, ["active_triplet_fraction"], ax=axes[row, 1], events=events, ylabel="active triplets"
        )
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{name}: fraction of active triplets", fontsize=9)
    written.append(save(fig, out / "triplet_history.png"))

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, r in results.items():
        epochs = [e["epoch"] for e in r["epochs"]]
        style = "--" if r["run"].arch == "inception" else "-"
        for ax, key in zip(axes, ("val", "far", VAL_AT_FAR), strict=True):
            values = [_value(e[key]) for e in r["epochs"]]
            ax.plot(epochs, values, style, marker="o", markersize=3, label=name)
    for ax, title in zip(
        axes,
        ("VAL(d): true accepts / same pairs", "FAR(d): false accepts / different pairs", "VAL@FAR=1e-3"),
        strict=True,
    ):
        ax.set_title(f"{title}\n(test identities, d from validation identities)", fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    written.append(save(fig, out / "triplet_val_far.png"))

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for name, r in results.items():
        history = r["monitors"].history
        style = "--" if r["run"].arch == "inception" else "-"
        for ax, key in zip(axes, ("health/mean_pairwise_cosine", "health/effective_rank"), strict=True):
            if key in history.keys:
                steps, values = history.series(key)
                ax.plot(steps, values, style, label=name)
    axes[0].axhline(0.98, color="grey", linestyle=":", label="complete_collapse threshold")
    axes[0].set_title("mean pairwise cosine of a window's embeddings", fontsize=9)
    axes[1].set_title("effective rank of a window's embeddings", fontsize=9)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    written.append(save(fig, out / "triplet_health.png"))
    return written


def _value(x: Any) -> float:
    return x.value if isinstance(x, ek.Rate) else float("nan") if x is None else float(x)


def markdown(report: dict[str, Any], table: str, written: list[str]) -> str:
    counts = report["triplet_counts"]
    lines = [
        "# Triplet training with inception and ResNeXt blocks (case study 04)",
        "",
        f"Command: `{report['command']}`  ",
        f"Device: {report['device']}; data: {report['data']['source']}; "
        f"total time {report['seconds']:.0f} s.",
        "",
        f"Offline triplets per epoch on the {report['data']['counts']['train_images']} training images: "
        f"old pool rule (anchor and positive both removed) {counts['both_removed']}, fixed rule (only the "
        f"anchor removed) {counts['one_removed']} (+{counts['one_removed'] - counts['both_removed']}).",
        "",
        "Last epoch of every run; d is the distance threshold (best accuracy on balanced pairs of the "
        "validation identities), VAL(d) and FAR(d) are measured on the test identities "
        f"({report['test_pairs']['genuine']} same-identity, {report['test_pairs']['impostor']} "
        "different-identity pairs).",
        "",
        table,
        "",
        "## Per run",
        "",
    ]
    for name, r in report["runs"].items():
        lines += [f"### {name}", "", f"{r['description']}.", ""]
        if r["loss_at_margin_from_step"] is not None:
            lines += [
                f"The loss sat within 5% of the margin for {report['config']['window']} consecutive steps "
                f"from step {r['loss_at_margin_from_step']}.",
                "",
            ]
        if r["diverged"] is not None:
            lines += [f"**Diverged** at step {r['diverged']['step']} ({r['diverged']['reason']}).", ""]
        if not r["diagnoses"]:
            lines.append("No diagnosis fired.")
        for d in r["diagnoses"]:
            lines.append(
                f"- **{d['code']}** ({d['severity']}, {d['monitor']} monitor) first at step {d['step']}, "
                f"in {d['windows_fired']} of {d['windows']} windows: {d['message']}"
            )
        lines += [
            "",
            "| epoch | loss | active | d | VAL(d) | FAR(d) | VAL@FAR=1e-3 | diagnoses |",
            "|---" * 8 + "|",
        ]
        for e in r["epochs"]:
            lines.append(
                f"| {e['epoch']} | {e['loss']:.4f} | {e['active_triplet_fraction']:.3f} | "
                f"{e['threshold']:.3f} | "
                f"{_rate(e['val'])} | {_rate(e['far'])} | {_rate(e[VAL_AT_FAR])} | "
                f"{', '.join(e['diagnoses']) or '-'} |"
            )
        lines.append("")
    lines += ["## Figures", ""] + [f"![{name}]({name})" for name in written]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ main


def run(
    config: Config,
    *,
    data_dir: Path | None,
    device: torch.device,
    out: Path,
    seed: int,
    show: bool = True,
    runs: tuple[Run, ...] = RUNS,
) -> dict[str, Any]:
    """The whole experiment; returns the report written to ``out/report.json``."""
    start = time.perf_counter()
    data = load_data(config, data_dir, seed)
    print(f"data: {data.source}")
    print("  " + ", ".join(f"{k} {v}" for k, v in data.counts().items()))
    counts = triplet_counts(data.train.labels)
    print(f"triplets per epoch: old pool rule {counts['both_removed']}, fixed rule {counts['one_removed']}")
    pairs = Pairs.of(data, config, seed)

    results: dict[str, dict[str, Any]] = {}
    for spec in runs:
        result = train(spec, data, pairs, config, device, seed, show)
        results[spec.name] = result
        last = result["epochs"][-1] if result["epochs"] else None
        fired = ", ".join(d["code"] for d in result["diagnoses"]) or "none"
        summary = (
            f"loss {last['loss']:.3f}, VAL {_rate(last['val'])}, FAR {_rate(last['far'])}"
            if last
            else "no epoch"
        )
        print(f"{spec.name}: {summary}, diagnoses: {fired}")

    table = markdown_table(TABLE_HEADERS, table_rows(results))
    report: dict[str, Any] = {
        "command": command_line(),
        "device": str(device),
        "seed": seed,
        "config": dataclasses.asdict(config),
        "data": {"source": data.source, "counts": data.counts(), "notes": data.notes},
        "triplet_counts": counts,
        "margin": MARGIN,
        "test_pairs": {"genuine": int(pairs.test[2].sum()), "impostor": int((~pairs.test[2]).sum())},
        "runs": {
            name: {
                "description": f"{r['run'].step}: {r['run'].arch} blocks, {r['run'].inputs} input, "
                f"{r['run'].negatives} negatives, {_RULE_NAMES[r['run'].rule]} pool rule",
                "arch": r["run"].arch,
                "inputs": r["run"].inputs,
                "negatives": r["run"].negatives,
                "rule": r["run"].rule,
                "steps": r["steps"],
                "steps_per_epoch": r["steps_per_epoch"],
                "training_seconds": r["training_seconds"],
                "parameters": sum(p.numel() for p in r["model"].parameters()),
                "diverged": r["diverged"],
                "loss_at_margin_from_step": r["loss_at_margin_from_step"],
                "diagnoses": r["diagnoses"],
                "epochs": r["epochs"],
            }
            for name, r in results.items()
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    for name, r in results.items():
        r["monitors"].history.to_csv(out / f"monitors_{name}.csv")
    written = figures(out, results)
    report["figures"] = written
    report["seconds"] = time.perf_counter() - start
    write_report(out, report, markdown(report, table, written))
    print()
    print(table)
    print(f"\nwrote {out}/report.json, report.md and {len(written)} figures in {report['seconds']:.0f} s")
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser(__doc__ or "").parse_args(argv)
    config = QUICK if args.quick else FULL
    out = args.out or Path("out") / ("triplet_resnext-quick" if args.quick else "triplet_resnext")
    torch.use_deterministic_algorithms(True, warn_only=True)
    return run(config, data_dir=args.data_dir, device=resolve_device(args.device), out=out, seed=args.seed)


if __name__ == "__main__":
    main()
