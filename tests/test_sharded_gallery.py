"""Sharded identification under torch.distributed: two gloo processes, each enrolling a gallery shard.

The reports of a ShardedGallery must be those of one Gallery that enrolled the concatenated
shards and was given the concatenated probes: ranks, CMC and open-set counts exactly (ties
included, with the pessimistic rule), scores up to the last place (exact pair-by-pair scores
against matrix-product ones). Shards are even, uneven, empty, and split identities between
the processes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from embedkit.evaluation import Gallery, Report, ShardedGallery
from test_distributed_losses import WORLD, init_gloo, run_two_processes

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="forks two gloo processes")

DIM = 8
N_GALLERY = 40
N_PROBES = 30
GALLERY_SPLITS = {"even": (20, 20), "uneven": (31, 9), "empty": (0, 40)}
PROBE_SPLITS = {"even": (15, 15), "uneven": (18, 12), "empty": (30, 0)}
METRICS = ("cosine", "dot", "euclidean", "squared_euclidean")
TEMPLATES = ("none", "mean")
RANKS = (1, 2, 5)
FPIR = (0.1, 0.5)


def _rows(split: tuple[int, ...], rank: int) -> slice:
    start = sum(split[:rank])
    return slice(start, start + split[rank])


def _data() -> tuple[torch.Tensor, np.ndarray, torch.Tensor, np.ndarray]:
    """Gallery and probes with exact ties: rows duplicated under another identity, in the other shard.

    Labels are strings; identities 0-9 are enrolled (images spread over both halves of the
    gallery), 10-11 are not (non-mated probes).
    """
    gen = torch.Generator().manual_seed(3)
    centres = torch.randn(12, DIM, generator=gen)
    gallery_labels = torch.randint(0, 10, (N_GALLERY,), generator=gen)
    gallery = centres[gallery_labels] + 0.8 * torch.randn(N_GALLERY, DIM, generator=gen)
    probe_labels = torch.randint(0, 12, (N_PROBES,), generator=gen)
    probes = centres[probe_labels] + 0.8 * torch.randn(N_PROBES, DIM, generator=gen)
    for row, copy in ((2, 33), (5, 25), (11, 38)):  # exact duplicates under other identities
        gallery[copy] = gallery[row]
        gallery_labels[copy] = (gallery_labels[row] + 1) % 10
    for probe, row in ((0, 2), (1, 25), (2, 11)):  # probes equal to a duplicated image: a tie at the top
        probes[probe] = gallery[row] * 1.5  # (a multiple: the same cosine for both identities)
        probe_labels[probe] = gallery_labels[row]
    probes[3] = gallery[5]  # dot, euclidean: an exact tie too
    probe_labels[3] = gallery_labels[5]
    return (
        gallery,
        np.array([f"id{v}" for v in gallery_labels.tolist()]),
        probes,
        np.array([f"id{v}" for v in probe_labels.tolist()]),
    )


def _templates() -> np.ndarray:
    """Probe template ids: pairs of rows of the same label, some pairs split between the processes."""
    _, _, _, probe_labels = _data()
    order = np.argsort(probe_labels, kind="stable")
    template = np.empty(N_PROBES, dtype=np.int64)
    template[order] = np.arange(N_PROBES) // 2
    same = probe_labels[order][0::2] == probe_labels[order][1::2]
    template[order[1::2][~same]] += 1000  # a pair of two labels: two templates
    return template


def _plain(reports: dict[str, Report]) -> dict:
    return {
        name: {**r.to_dict(), "curves": {k: np.asarray(v).tolist() for k, v in r.curves.items()}}
        for name, r in reports.items()
    }


def _error(call: object) -> str:
    try:
        call()  # type: ignore[operator]
    except (TypeError, ValueError, NotImplementedError) as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


def _worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    init_gloo(rank, world_size, init_file)
    try:
        out: dict[str, object] = {}
        gallery, gallery_labels, probes, probe_labels = _data()
        image_ids = np.array([f"g{i}" for i in range(N_GALLERY)])
        probe_ids = np.array([f"p{i}" for i in range(N_PROBES)])
        for g_name, g_split in GALLERY_SPLITS.items():
            g_rows = _rows(g_split, rank)
            for p_name, p_split in PROBE_SPLITS.items():
                p_rows = _rows(p_split, rank)
                for metric in METRICS:
                    for template in TEMPLATES:
                        sharded = ShardedGallery(metric=metric, chunk_size=7).enrol(
                            gallery[g_rows],
                            gallery_labels[g_rows],
                            template=template,  # type: ignore[arg-type]
                        )
                        out[f"{g_name}/{p_name}/{metric}/{template}"] = _plain(
                            sharded.evaluate(
                                probes[p_rows], probe_labels[p_rows], ranks=RANKS, fpir_targets=FPIR
                            )
                        )
        g_rows, p_rows = _rows(GALLERY_SPLITS["uneven"], rank), _rows(PROBE_SPLITS["uneven"], rank)
        for template in TEMPLATES:
            sharded = ShardedGallery().enrol(
                gallery[g_rows].numpy(),
                gallery_labels[g_rows],
                template=template,
                image_ids=image_ids[g_rows],  # type: ignore[arg-type]
            )
            out[f"templates/{template}"] = _plain(
                sharded.evaluate(
                    probes[p_rows].numpy(),
                    probe_labels[p_rows],
                    ranks=RANKS,
                    fpir_targets=FPIR,
                    image_ids=probe_ids[p_rows],
                    template_ids=_templates()[p_rows],
                )
            )
            out[f"identify/{template}"] = sharded.identify(probes[p_rows], probe_labels[p_rows]).to_dict()
            out[f"labels/{template}"] = sharded.labels.tolist()
        sharded = ShardedGallery().enrol(gallery[g_rows], gallery_labels[g_rows])
        # Errors: raised on every process, naming the process that caused them; nothing hangs.
        out["error/dim"] = _error(
            lambda: sharded.identify(probes[p_rows, : DIM - rank], probe_labels[p_rows])
        )
        out["error/labels"] = _error(
            lambda: sharded.identify(probes[p_rows], probe_labels[p_rows][: None if rank else -1])
        )
        out["error/ranks"] = _error(
            lambda: sharded.identify(probes[p_rows], probe_labels[p_rows], ranks=(1, 2 + rank))
        )
        out["error/ids"] = _error(
            lambda: sharded.identify(
                probes[p_rows], probe_labels[p_rows], image_ids=probe_ids[p_rows] if rank else None
            )
        )
        out["error/verification"] = _error(
            lambda: sharded.evaluate(probes[p_rows], probe_labels[p_rows], verification=True)
        )
        out["error/template"] = _error(
            lambda: ShardedGallery().enrol(
                gallery[g_rows], gallery_labels[g_rows], template=("none", "mean")[rank]
            )  # type: ignore[arg-type]
        )
        out["error/shared_image"] = _error(
            lambda: (
                ShardedGallery()
                .enrol(gallery[g_rows], gallery_labels[g_rows], image_ids=image_ids[g_rows])
                .identify(probes[p_rows], probe_labels[p_rows], image_ids=image_ids[p_rows])
            )
        )
        torch.save(out, Path(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    tmp_path = tmp_path_factory.mktemp("sharded_gallery")
    run_two_processes(_worker, tmp_path, timeout=120.0)
    return [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


def _assert_same_report(got: dict, want: dict) -> None:
    """Counts, rates and curves of ranks exactly; scores up to the last place of float32."""
    assert got.keys() == want.keys()
    for name in want:
        g, w = got[name], want[name]
        assert g["counts"] == w["counts"], name
        assert g["metrics"].keys() == w["metrics"].keys(), name
        for key, value in w["metrics"].items():
            if isinstance(value, dict):  # a Rate
                assert (g["metrics"][key]["hits"], g["metrics"][key]["total"]) == (
                    value["hits"],
                    value["total"],
                ), key
                if value["chance"] is None:
                    assert g["metrics"][key]["chance"] is None, key
                else:
                    assert g["metrics"][key]["chance"] == pytest.approx(value["chance"], rel=1e-9), key
            else:
                assert g["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
        for key, curve in w["curves"].items():
            if key == "threshold":
                assert g["curves"][key] == pytest.approx(curve, rel=1e-5, abs=1e-6), key
            else:
                assert g["curves"][key] == curve, (name, key)
        assert g["notes"][0].startswith("sharded over 2 processes")
        assert g["notes"][1:] == w["notes"], name


def _single(metric: str = "cosine", template: str = "none", **kwargs: object) -> dict:
    gallery, gallery_labels, probes, probe_labels = _data()
    single = Gallery(metric=metric).enrol(gallery, gallery_labels, template=template)  # type: ignore[arg-type]
    return _plain(single.evaluate(probes, probe_labels, ranks=RANKS, fpir_targets=FPIR, **kwargs))  # type: ignore[arg-type]


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("metric", METRICS)
def test_sharded_reports_equal_the_single_process_reports(
    results: list[dict], metric: str, template: str
) -> None:
    want = _single(metric, template)
    assert set(want) == {"identification", "open_set"}
    for g_name in GALLERY_SPLITS:
        for p_name in PROBE_SPLITS:
            for rank in range(WORLD):
                _assert_same_report(results[rank][f"{g_name}/{p_name}/{metric}/{template}"], want)


@pytest.mark.parametrize("metric", METRICS)
def test_exact_ties_across_shards_rank_the_true_identity_second(metric: str) -> None:
    # Probes 0-3 score exactly as much for an identity enrolled in the other shard as for their own
    # (duplicated images; for cosine the scaled probes too): the pessimistic rule ranks them second,
    # so the single-process reference really has ties that the sharded ranks must reproduce.
    gallery, gallery_labels, probes, probe_labels = _data()
    single = Gallery(metric=metric).enrol(gallery, gallery_labels)  # type: ignore[arg-type]
    for probe in (0, 2) if metric == "dot" else (0, 1, 2, 3):  # dot: another identity beats 1 and 3
        report = single.identify(probes[probe : probe + 1], probe_labels[probe : probe + 1], ranks=(1, 2))
        assert (report.rate("rank-1").hits, report.rate("rank-2").hits) == (0, 1), (metric, probe)


def test_identities_are_split_between_the_processes() -> None:
    _, gallery_labels, _, _ = _data()
    for split in GALLERY_SPLITS.values():
        if 0 in split:
            continue
        first, second = (set(gallery_labels[_rows(split, rank)]) for rank in range(WORLD))
        assert first & second  # the combination of an identity's images is exercised


@pytest.mark.parametrize("template", TEMPLATES)
def test_probe_templates_and_image_ids(results: list[dict], template: str) -> None:
    gallery, gallery_labels, probes, probe_labels = _data()
    single = Gallery().enrol(
        gallery.numpy(),
        gallery_labels,
        template=template,
        image_ids=[f"g{i}" for i in range(N_GALLERY)],  # type: ignore[arg-type]
    )
    want = _plain(
        single.evaluate(
            probes.numpy(),
            probe_labels,
            ranks=RANKS,
            fpir_targets=FPIR,
            image_ids=[f"p{i}" for i in range(N_PROBES)],
            template_ids=_templates(),
        )
    )
    assert want["identification"]["counts"]["probe_templates"] < N_PROBES
    identified = single.identify(probes, probe_labels).to_dict()
    for rank in range(WORLD):
        _assert_same_report(results[rank][f"templates/{template}"], want)
        got = results[rank][f"identify/{template}"]
        assert got["counts"] == identified["counts"]
        assert {k: v["hits"] for k, v in got["metrics"].items() if isinstance(v, dict)} == {
            k: v["hits"] for k, v in identified["metrics"].items() if isinstance(v, dict)
        }
        assert results[rank][f"labels/{template}"] == single.labels.tolist()


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("dim", "ValueError: process 1: probes have dimension 7 but the gallery embeddings have 8"),
        ("labels", "ValueError: process 0: labels has"),
        ("ranks", "ValueError: every process must pass the same ranks"),
        ("ids", "ValueError: image_ids were given on process(es) 1 only"),
        (
            "verification",
            "ValueError: process 0 (and 1 other process(es)): verification=True is not available",
        ),
        ("template", "ValueError: every process must pass the same template"),
        ("shared_image", "ValueError: 30 image id(s) are both enrolled"),
    ],
)
def test_errors_are_raised_on_every_process(results: list[dict], case: str, expected: str) -> None:
    for rank in range(WORLD):
        assert results[rank][f"error/{case}"].startswith(expected), results[rank][f"error/{case}"]


def test_one_process_is_the_single_process_gallery() -> None:
    gallery, gallery_labels, probes, probe_labels = _data()
    for template in TEMPLATES:
        sharded = ShardedGallery(metric="euclidean").enrol(gallery, gallery_labels, template=template)  # type: ignore[arg-type]
        got = _plain(sharded.evaluate(probes, probe_labels, ranks=RANKS, fpir_targets=FPIR))
        want = _single("euclidean", template)
        for report in got.values():
            report["notes"] = ["sharded over 2 processes", *report["notes"][1:]]
        _assert_same_report(got, want)
        assert "ShardedGallery" in repr(sharded)
    with pytest.raises(NotImplementedError, match="does not verify"):
        sharded.verify(probes, probe_labels)
    with pytest.raises(ValueError, match="labels has 3 entries but embeddings has 40 rows"):
        ShardedGallery().enrol(gallery, gallery_labels[:3])
    with pytest.raises(ValueError, match="gallery is empty"):
        ShardedGallery().identify(probes, probe_labels)
    with pytest.raises(ValueError, match="every process's shard of the gallery is empty"):
        ShardedGallery().enrol(gallery[:0], gallery_labels[:0])
    with pytest.raises(ValueError, match="template"):
        ShardedGallery().enrol(gallery, gallery_labels, template="median")  # type: ignore[arg-type]
