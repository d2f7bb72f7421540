"""Sharded evaluation under torch.distributed: two gloo processes, each holding a reference shard.

The merged k-NN must be knn's result on the concatenated shards (indices exactly, ties
in index order, with uneven and empty shards), and the sharded retrieval report the report
of retrieval_metrics on the concatenated queries and references.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from embedkit.evaluation import Report, knn, retrieval_metrics, sharded_knn, sharded_retrieval_metrics
from embedkit.evaluation.search import LabelTieOrder, _search_distinct
from test_distributed_losses import WORLD, init_gloo, run_two_processes

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="forks two gloo processes")

DIM = 8
QUERY_SPLIT = (9, 6)
SHARD_SPLITS = {"uneven": (23, 17), "empty": (30, 0)}
CASES = [
    (metric, backend)
    for metric in ("cosine", "dot", "euclidean", "squared_euclidean")
    for backend in ("torch", "faiss")
]


def _rows(split: tuple[int, ...], rank: int) -> slice:
    start = sum(split[:rank])
    return slice(start, start + split[rank])


def _data(n_ref: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(n_ref)
    centres = torch.randn(5, DIM, generator=gen)
    ref_labels = torch.randint(0, 5, (n_ref,), generator=gen)
    query_labels = torch.randint(0, 5, (sum(QUERY_SPLIT),), generator=gen)
    reference = centres[ref_labels] + torch.randn(n_ref, DIM, generator=gen)
    queries = centres[query_labels] + torch.randn(len(query_labels), DIM, generator=gen)
    return queries, query_labels, reference, ref_labels


def _tied() -> tuple[torch.Tensor, torch.Tensor]:
    """Integer vectors, each repeated in both shards: exactly equal dot products."""
    gen = torch.Generator().manual_seed(5)
    base = torch.randint(0, 3, (6, DIM), generator=gen).float()
    reference = torch.cat([base, base[:4], base])  # 16 rows: shards (8, 8) split the copies
    queries = torch.randint(0, 3, (sum(QUERY_SPLIT), DIM), generator=gen).float()
    return queries, reference


def _tied_labels() -> tuple[torch.Tensor, torch.Tensor]:
    """Labels that make exact copies of a vector relevant to some queries and not to others."""
    gen = torch.Generator().manual_seed(6)
    return torch.randint(0, 3, (sum(QUERY_SPLIT),), generator=gen), torch.randint(0, 3, (16,), generator=gen)


def _collapsed() -> tuple[torch.Tensor, torch.Tensor]:
    """600 rows holding 3 distinct vectors (a collapsed embedding), 6 labels: ties settled by counting."""
    gen = torch.Generator().manual_seed(7)
    vectors = torch.randn(3, DIM, generator=gen)
    return vectors[torch.randint(0, 3, (600,), generator=gen)], torch.randint(0, 6, (600,), generator=gen)


def _plain(report: Report) -> dict:
    return {**report.to_dict(), "cmc": report.curves["cmc"].tolist()}


def _worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    init_gloo(rank, world_size, init_file)
    try:
        out: dict[str, object] = {}
        q_rows = _rows(QUERY_SPLIT, rank)
        for split_name, split in SHARD_SPLITS.items():
            queries, query_labels, reference, ref_labels = _data(sum(split))
            shard = reference[_rows(split, rank)]
            for metric, backend in CASES:
                out[f"{split_name}/{metric}/{backend}"] = sharded_knn(
                    queries[q_rows], shard, 5, metric=metric, backend=backend
                )
            out[f"{split_name}/self"] = sharded_knn(None, shard, 4, exclude_self=True, backend="torch")
            out[f"{split_name}/self_numpy"] = sharded_knn(None, shard.numpy(), 4, exclude_self=True)
            out[f"{split_name}/retrieval_self"] = _plain(
                sharded_retrieval_metrics(shard, ref_labels[_rows(split, rank)], ks=(1, 3, 50))
            )
            out[f"{split_name}/retrieval"] = _plain(
                sharded_retrieval_metrics(
                    queries[q_rows], query_labels[q_rows], shard, ref_labels[_rows(split, rank)], ks=(1, 5)
                )
            )
        queries, reference = _tied()
        shard = reference[_rows((8, 8), rank)]
        for backend in ("torch", "faiss"):
            out[f"tied/{backend}"] = sharded_knn(queries[q_rows], shard, 7, metric="dot", backend=backend)
            query_labels, ref_labels = _tied_labels()
            ref_labels = ref_labels[_rows((8, 8), rank)]
            out[f"tied_retrieval/{backend}"] = _plain(
                sharded_retrieval_metrics(
                    queries[q_rows], query_labels[q_rows], shard, ref_labels, ks=(1, 3), backend=backend
                )
            )
            out[f"tied_retrieval_self/{backend}"] = _plain(
                sharded_retrieval_metrics(shard, ref_labels, ks=(1, 3), backend=backend)
            )
        collapsed, collapsed_labels = _collapsed()
        rows = _rows((350, 250), rank)
        out["collapsed_self"] = _plain(
            sharded_retrieval_metrics(collapsed[rows], collapsed_labels[rows], ks=(1, 10, 100))
        )
        torch.save(out, Path(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    tmp_path = tmp_path_factory.mktemp("sharded_eval")
    run_two_processes(_worker, tmp_path)
    return [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


@pytest.mark.parametrize("split_name", list(SHARD_SPLITS))
@pytest.mark.parametrize(("metric", "backend"), CASES)
def test_sharded_knn_equals_knn_on_the_whole_reference(
    results: list[dict], split_name: str, metric: str, backend: str
) -> None:
    queries, _, reference, _ = _data(sum(SHARD_SPLITS[split_name]))
    scores, indices = knn(queries, reference, 5, metric=metric, backend=backend)  # type: ignore[arg-type]
    for rank in range(WORLD):
        got_scores, got_indices = results[rank][f"{split_name}/{metric}/{backend}"]
        rows = _rows(QUERY_SPLIT, rank)
        assert got_indices.tolist() == indices[rows].tolist()
        assert got_scores.dtype == scores.dtype
        torch.testing.assert_close(got_scores, scores[rows], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("split_name", list(SHARD_SPLITS))
def test_sharded_self_search_excludes_each_row_globally(results: list[dict], split_name: str) -> None:
    split = SHARD_SPLITS[split_name]
    _, _, reference, _ = _data(sum(split))
    scores, indices = knn(reference, None, 4, exclude_self=True, backend="torch")
    for rank in range(WORLD):
        rows = _rows(split, rank)
        got_scores, got_indices = results[rank][f"{split_name}/self"]
        assert got_indices.tolist() == indices[rows].tolist()
        torch.testing.assert_close(got_scores, scores[rows], rtol=1e-5, atol=1e-5)
        numpy_scores, numpy_indices = results[rank][f"{split_name}/self_numpy"]
        assert numpy_indices.tolist() == indices[rows].tolist()  # numpy in, numpy out
        assert type(numpy_scores).__module__ == "numpy"


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_ties_across_shards_come_in_global_index_order(results: list[dict], backend: str) -> None:
    queries, reference = _tied()
    scores, indices = knn(queries, reference, 7, metric="dot", backend=backend)
    for rank in range(WORLD):
        got_scores, got_indices = results[rank][f"tied/{backend}"]
        rows = _rows(QUERY_SPLIT, rank)
        assert got_indices.tolist() == indices[rows].tolist()
        assert got_scores.tolist() == scores[rows].tolist()
    # The test has ties to break: equal scores within a row's returned list, across the shards.
    assert any(len(set(row)) < len(row) for row in scores.tolist())


def _assert_same_report(got: dict, want: dict) -> None:
    assert got["counts"] == want["counts"]
    assert got["metrics"].keys() == want["metrics"].keys()
    for key, value in want["metrics"].items():
        if isinstance(value, dict):  # a Rate: exact counts, chance up to summation order
            assert (got["metrics"][key]["hits"], got["metrics"][key]["total"]) == (
                value["hits"],
                value["total"],
            ), key
            assert got["metrics"][key]["chance"] == pytest.approx(value["chance"], rel=1e-9), key
        else:
            assert got["metrics"][key] == pytest.approx(value, rel=1e-9), key
    assert got["cmc"] == pytest.approx(want["cmc"], rel=1e-9)


@pytest.mark.parametrize("split_name", list(SHARD_SPLITS))
def test_sharded_retrieval_report_equals_the_single_process_report(
    results: list[dict], split_name: str
) -> None:
    queries, query_labels, reference, ref_labels = _data(sum(SHARD_SPLITS[split_name]))
    self_report = _plain(retrieval_metrics(reference, ref_labels, ks=(1, 3, 50)))
    report = _plain(retrieval_metrics(queries, query_labels, reference, ref_labels, ks=(1, 5)))
    for rank in range(WORLD):
        _assert_same_report(results[rank][f"{split_name}/retrieval_self"], self_report)
        _assert_same_report(results[rank][f"{split_name}/retrieval"], report)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_ties_between_relevant_and_irrelevant_follow_retrievals_rule(
    results: list[dict], backend: str
) -> None:
    queries, reference = _tied()
    query_labels, ref_labels = _tied_labels()
    report = _plain(
        retrieval_metrics(queries, query_labels, reference, ref_labels, ks=(1, 3), backend=backend)
    )
    self_report = _plain(retrieval_metrics(reference, ref_labels, ks=(1, 3), backend=backend))
    for rank in range(WORLD):
        _assert_same_report(results[rank][f"tied_retrieval/{backend}"], report)
        _assert_same_report(results[rank][f"tied_retrieval_self/{backend}"], self_report)


def test_a_collapsed_embedding_is_settled_by_counting_on_each_shard(results: list[dict]) -> None:
    embeddings, labels = _collapsed()
    for rows in (slice(0, 350), slice(350, 600)):  # each shard takes the counting path
        order = LabelTieOrder(labels.numpy(), labels[rows].numpy())
        found = _search_distinct(
            embeddings, embeddings[rows], 100, metric="cosine", exclude_self=False, tie_order=order,
            score_dtype=torch.float32,
        )  # fmt: skip
        assert found is not None
    want = _plain(retrieval_metrics(embeddings, labels, ks=(1, 10, 100)))
    for rank in range(WORLD):
        _assert_same_report(results[rank]["collapsed_self"], want)


def test_one_process_is_the_single_process_api() -> None:
    queries, query_labels, reference, ref_labels = _data(20)
    got = sharded_knn(queries, reference, 3)
    want = knn(queries, reference, 3)
    assert got[1].tolist() == want[1].tolist()
    _assert_same_report(
        _plain(sharded_retrieval_metrics(queries, query_labels, reference, ref_labels)),
        _plain(retrieval_metrics(queries, query_labels, reference, ref_labels)),
    )
    with pytest.raises(ValueError, match="queries=None"):
        sharded_knn(queries, reference, 3, exclude_self=True)
    with pytest.raises(ValueError, match="backend"):
        sharded_knn(queries, reference, 3, backend="faiss-hnsw")
    with pytest.raises(ValueError, match="dot"):
        sharded_retrieval_metrics(queries, query_labels, metric="dot")
