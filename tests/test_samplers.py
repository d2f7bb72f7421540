"""PKSampler: batch structure, coverage, determinism, resume, sharding, policies and errors."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, Dataset

from embedkit.samplers import PKSampler
from test_distributed_losses import run_two_processes


def long_tailed(num_classes: int = 60, seed: int = 0) -> np.ndarray:
    """Zipf-like class sizes from 1 to ~40, shuffled into dataset order."""
    rng = np.random.default_rng(seed)
    sizes = np.maximum(1, (40 / np.arange(1, num_classes + 1) ** 0.8).astype(int))
    labels = np.repeat(rng.permutation(num_classes) * 7 + 3, sizes)  # non-contiguous label ids
    return rng.permutation(labels)


def check_batches(batches: np.ndarray, labels: np.ndarray, p: int, k: int) -> None:
    """Every batch: p * k indices, k consecutive of one class, p distinct classes."""
    assert batches.ndim == 2 and batches.shape[1] == p * k
    assert batches.min() >= 0 and batches.max() < labels.size
    blocks = labels[batches].reshape(batches.shape[0], p, k)
    assert (blocks == blocks[:, :, :1]).all(), "a chunk mixes classes"
    classes = np.sort(blocks[:, :, 0], axis=1)
    assert (classes[:, 1:] != classes[:, :-1]).all(), "a batch repeats a class"


def reference_epoch_length(labels: np.ndarray, p: int, k: int) -> tuple[int, bool]:
    """Slow reference: max(smallest B with sum(min(m_c, B)) <= B p, p-th largest m_c), and
    whether all chunks fit (no class has more chunks than that)."""
    _, counts = np.unique(labels, return_counts=True)
    chunks = [max(1, math.ceil(c / k)) for c in counts]
    b = 1
    while sum(min(m, b) for m in chunks) > b * p:
        b += 1
    b = max(b, sorted(chunks, reverse=True)[p - 1])
    return b, max(chunks) <= b


def as_list(sampler: PKSampler) -> list[list[int]]:
    return list(iter(sampler))


# -- batch structure and coverage ---------------------------------------------------
@pytest.mark.parametrize(("p", "k"), [(8, 4), (5, 1), (3, 7), (16, 2)])
def test_batches_hold_p_distinct_classes_times_k(p: int, k: int) -> None:
    labels = long_tailed()
    sampler = PKSampler(labels, p, k, seed=1)
    batches = np.array(as_list(sampler))
    check_batches(batches, labels, p, k)
    assert len(batches) == len(sampler) == sampler.num_batches


def test_every_sample_appears_when_the_distribution_allows() -> None:
    labels = long_tailed()
    sampler = PKSampler(labels, 8, 4, seed=3)
    assert sampler.covers_all_samples
    for epoch in range(3):
        sampler.set_epoch(epoch)
        seen = np.unique(np.concatenate(as_list(sampler)))
        np.testing.assert_array_equal(seen, np.arange(labels.size))


def test_epoch_length_matches_the_slow_reference() -> None:
    for seed in range(5):
        labels = long_tailed(num_classes=30 + 10 * seed, seed=seed)
        for p, k in [(4, 2), (10, 3), (25, 5)]:
            sampler = PKSampler(labels, p, k)
            expected, covers = reference_epoch_length(labels, p, k)
            assert sampler.num_batches == expected
            assert sampler.covers_all_samples == covers
            if max(np.unique(labels, return_counts=True)[1]) * p <= labels.size:
                assert covers  # no class above 1/p of the samples: always covered


def test_epoch_runs_while_p_classes_have_chunks_left() -> None:
    # One class, p=1: every batch is one chunk of it, and the epoch covers all of it.
    sampler = PKSampler(np.zeros(10, dtype=np.int64), 1, 4, seed=0)
    batches = np.array(as_list(sampler))
    assert batches.shape == (3, 4) and sampler.covers_all_samples
    assert set(batches.ravel().tolist()) == set(range(10))
    # p equal to the number of classes: every batch holds all of them, and the epoch
    # lasts until the smallest runs out (5 batches), not a single batch.
    labels = np.repeat(np.arange(3), [10, 20, 30])
    sampler = PKSampler(labels, 3, 2, seed=0)
    assert sampler.num_batches == 5 and not sampler.covers_all_samples
    seen = set(np.concatenate(as_list(sampler)).tolist())
    assert set(range(10)) <= seen and len(seen) == 30


def test_dominant_class_is_capped_and_the_rest_is_covered() -> None:
    # Class 0 holds 400 of 460 samples: at most one of its chunks fits per batch.
    labels = np.concatenate([np.zeros(400, dtype=np.int64), np.repeat(np.arange(1, 31), 2)])
    sampler = PKSampler(labels, 4, 2, seed=0)
    assert not sampler.covers_all_samples
    # 200 chunks of class 0, 30 of others: B = 30 / 3 = 10 batches, class 0 in all.
    assert sampler.num_batches == 10
    batches = np.array(as_list(sampler))
    check_batches(batches, labels, 4, 2)
    assert ((labels[batches] == 0).sum(axis=1) == 2).all()
    seen = np.unique(batches)
    assert set(np.flatnonzero(labels != 0)) <= set(seen.tolist())
    # A new epoch draws a different subset of the capped class.
    sampler.set_epoch(1)
    other = np.unique(np.concatenate(as_list(sampler)))
    assert set(seen.tolist()) != set(other.tolist())


def test_chunks_do_not_repeat_samples_of_classes_with_at_least_k() -> None:
    labels = np.repeat(np.arange(12), [5, 6, 7, 9, 4, 4, 5, 11, 13, 4, 6, 7])
    batches = np.array(as_list(PKSampler(labels, 3, 4, seed=2)))
    chunks = batches.reshape(-1, 4)
    assert all(np.unique(chunk).size == 4 for chunk in chunks)


def test_same_seed_and_epoch_give_the_same_batches() -> None:
    labels = long_tailed()
    a = PKSampler(labels, 6, 3, seed=11)
    b = PKSampler(labels, 6, 3, seed=11)
    a.set_epoch(4)
    b.set_epoch(4)
    assert as_list(a) == as_list(b)
    assert as_list(a) == as_list(a)  # iterating again repeats the epoch
    b.set_epoch(5)
    assert as_list(a) != as_list(b)
    assert as_list(a) != as_list(PKSampler(labels, 6, 3, seed=12, num_replicas=1))
    # The global numpy RNG is neither read nor advanced.
    np.random.seed(0)  # noqa: NPY002 - the legacy global RNG is what must stay untouched
    before = np.random.get_state()[1].copy()  # type: ignore[index]  # noqa: NPY002
    as_list(PKSampler(labels, 6, 3, seed=11))
    np.testing.assert_array_equal(np.random.get_state()[1], before)  # type: ignore[index]  # noqa: NPY002


def test_labels_as_list_array_or_tensor_give_the_same_plan() -> None:
    labels = long_tailed()
    plans = [
        as_list(PKSampler(x, 5, 2, seed=0))
        for x in (labels.tolist(), labels, torch.from_numpy(labels), labels.astype(np.int32))
    ]
    assert all(plan == plans[0] for plan in plans)


def test_names_and_their_integer_codes_give_the_same_plan() -> None:
    labels = long_tailed()
    names = np.array([f"person_{c:03d}" for c in labels])  # sorted like the codes
    mixed = np.array([("id", int(c)) if c % 2 else int(c) for c in labels], dtype=object)
    plan = as_list(PKSampler(labels, 5, 2, seed=0))
    assert as_list(PKSampler(names, 5, 2, seed=0)) == plan
    assert as_list(PKSampler(names.tolist(), 5, 2, seed=0)) == plan
    mixed_sampler = PKSampler(mixed, 5, 2, seed=0)  # unorderable: codes by first appearance
    check_batches(np.array(as_list(mixed_sampler)), labels, 5, 2)


def test_string_labels_are_named_in_messages_and_dropped_classes() -> None:
    labels = ["ann"] * 4 + ["bob"] * 4 + ["cy"] * 1
    sampler = PKSampler(labels, 2, 2, small_classes="drop")
    np.testing.assert_array_equal(sampler.dropped_classes, ["cy"])
    with pytest.raises(ValueError, match=r"label cy \(1 sample\)"):
        PKSampler(labels, 2, 2, small_classes="error")


def test_a_state_does_not_load_into_a_sampler_of_other_names() -> None:
    saved = PKSampler(["a", "a", "b", "b"], 2, 2).state_dict()
    PKSampler(["a", "a", "b", "b"], 2, 2).load_state_dict(saved)
    with pytest.raises(ValueError, match="same labels"):
        PKSampler(["a", "a", "c", "c"], 2, 2).load_state_dict(saved)


# -- small-class policy -----------------------------------------------------------
def test_replace_tops_small_classes_up_with_their_own_samples() -> None:
    labels = np.array([0] * 8 + [1] * 8 + [2] * 2 + [3] * 1 + [4] * 6)
    sampler = PKSampler(labels, 2, 4, seed=0)
    batches = np.array(as_list(sampler))
    check_batches(batches, labels, 2, 4)
    assert sampler.covers_all_samples
    assert set(np.unique(batches)) == set(range(labels.size))
    chunks = batches.reshape(-1, 4)
    singleton = chunks[labels[chunks[:, 0]] == 3]
    np.testing.assert_array_equal(singleton, np.full_like(singleton, 18))


def test_drop_leaves_small_classes_out() -> None:
    labels = np.array([0] * 8 + [1] * 8 + [2] * 2 + [3] * 1 + [4] * 6)
    sampler = PKSampler(labels, 2, 4, small_classes="drop", seed=0)
    np.testing.assert_array_equal(sampler.dropped_classes, [2, 3])
    assert sampler.num_classes == 3
    batches = np.array(as_list(sampler))
    check_batches(batches, labels, 2, 4)
    assert not np.isin(labels[batches], [2, 3]).any()
    assert set(np.unique(batches)) == set(np.flatnonzero(~np.isin(labels, [2, 3])).tolist())


def test_error_policy_names_the_small_classes() -> None:
    labels = np.array([0] * 8 + [1] * 8 + [2] * 2 + [3] * 1)
    with pytest.raises(
        ValueError, match=r"2 class\(es\) have fewer than k=4.*label 2 \(2 samples\).*label 3"
    ):
        PKSampler(labels, 2, 4, small_classes="error")
    PKSampler(labels, 2, 1, small_classes="error")  # with k=1 no class is small
    with pytest.raises(ValueError, match="label 3"):
        PKSampler(labels, 2, 2, small_classes="error")


# -- errors -------------------------------------------------------------------------
def test_p_larger_than_eligible_classes_names_both_numbers() -> None:
    labels = np.repeat(np.arange(5), [4, 4, 4, 1, 1])
    with pytest.raises(ValueError, match=r"p=6 is larger than the number of eligible classes, 5"):
        PKSampler(labels, 6, 2)
    with pytest.raises(ValueError, match=r"p=4 .* eligible classes, 3 .*5 classes, of which 2 have fewer"):
        PKSampler(labels, 4, 2, small_classes="drop")


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"k": 0}, ValueError, r"k must lie in \[1, inf\); got 0"),
        ({"p": 0}, ValueError, r"p must lie in \[1, inf\); got 0"),
        ({"k": 2.0}, TypeError, "k must be an integer"),
        ({"seed": -1}, ValueError, "seed must lie"),
        ({"small_classes": "pad"}, ValueError, "small_classes must be one of"),
        (
            {"num_replicas": 2, "rank": 2},
            ValueError,
            r"rank must lie in \[0, num_replicas - 1\] = \[0, 1\]; got 2",
        ),
        ({"num_replicas": 0}, ValueError, "num_replicas must lie"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, error: type[Exception], pattern: str) -> None:
    arguments = {"labels": np.repeat(np.arange(4), 3), "p": 2, "k": 2, **kwargs}
    with pytest.raises(error, match=pattern):
        PKSampler(**arguments)


@pytest.mark.parametrize(
    ("labels", "error", "pattern"),
    [
        (np.zeros((4, 2), dtype=np.int64), ValueError, r"labels must be 1-D.*\(4, 2\)"),
        (np.array([0.0, 1.0, 1.0]), TypeError, "labels must hold integers; got dtype float64"),
        (torch.tensor([0.0, 1.0]), TypeError, "labels must have an integer dtype"),
        ("abc", TypeError, "labels must be a 1-D sequence of labels"),
        (["a", 1.5], TypeError, r"labels\[1\] is float 1.5"),
        ([], ValueError, "labels is empty"),
        (np.array([True, False]), TypeError, "labels must hold integers"),
    ],
)
def test_bad_labels_are_named(labels: object, error: type[Exception], pattern: str) -> None:
    with pytest.raises(error, match=pattern):
        PKSampler(labels, 1, 1)


# -- resume -------------------------------------------------------------------------
def test_resume_mid_epoch_gives_exactly_the_remaining_batches() -> None:
    labels = long_tailed()
    sampler = PKSampler(labels, 6, 3, seed=7)
    sampler.set_epoch(2)
    full = as_list(sampler)
    iterator = iter(sampler)
    consumed = [next(iterator) for _ in range(5)]
    assert consumed == full[:5]
    state = sampler.state_dict()
    assert state["epoch"] == 2 and state["batches_done"] == 5

    fresh = PKSampler(labels.tolist(), 6, 3, seed=0)  # seed comes from the state
    fresh.load_state_dict(state)
    assert len(fresh) == len(full) - 5
    fresh.set_epoch(2)  # the usual loop calls set_epoch first: the resume point stays
    assert as_list(fresh) == full[5:]
    assert len(fresh) == len(full)  # the next pass is a full epoch again
    assert as_list(fresh) == full


def test_resume_at_an_explicit_batch_count_and_at_epoch_end() -> None:
    labels = long_tailed()
    sampler = PKSampler(labels, 6, 3, seed=7)
    full = as_list(sampler)
    other = PKSampler(labels, 6, 3, seed=7)
    other.load_state_dict(sampler.state_dict(batches_done=3))
    assert as_list(other) == full[3:]
    other.load_state_dict(sampler.state_dict())  # saved after a complete epoch
    assert len(other) == 0 and as_list(other) == []
    other.load_state_dict(sampler.state_dict(batches_done=3))
    other.set_epoch(1)  # moving to another epoch drops the resume point
    assert len(other) == len(full)
    with pytest.raises(ValueError, match="batches_done must lie"):
        sampler.state_dict(batches_done=len(full) + 1)


def test_load_state_dict_rejects_a_state_from_different_data() -> None:
    labels = long_tailed()
    state = PKSampler(labels, 6, 3).state_dict()
    changed = labels.copy()
    changed[[0, 1]] = changed[[1, 0]] if changed[0] != changed[1] else (changed[0], changed[0] + 1)
    with pytest.raises(ValueError, match="saved for different labels"):
        PKSampler(changed, 6, 3).load_state_dict(state)
    with pytest.raises(ValueError, match="saved with p=6 but this sampler has p=5"):
        PKSampler(labels, 5, 3).load_state_dict(state)
    with pytest.raises(ValueError, match=r"num_replicas=1 .* num_replicas=2"):
        PKSampler(labels, 6, 3, num_replicas=2, rank=0).load_state_dict(state)
    with pytest.raises(ValueError, match="missing key"):
        PKSampler(labels, 6, 3).load_state_dict({"epoch": 0})
    with pytest.raises(TypeError, match="state_dict must be a mapping"):
        PKSampler(labels, 6, 3).load_state_dict([1, 2])  # type: ignore[arg-type]
    # States hold plain Python values, safe for torch.save and json.
    assert all(isinstance(v, (int, str)) for v in state.values())


# -- distributed --------------------------------------------------------------------
@pytest.mark.parametrize("replicas", [2, 3])
def test_shards_are_disjoint_equal_length_and_cover_the_plan(replicas: int) -> None:
    labels = long_tailed()
    shards = [PKSampler(labels, 5, 3, seed=4, num_replicas=replicas, rank=r) for r in range(replicas)]
    single = PKSampler(labels, 5, 3, seed=4)
    lengths = {len(s) for s in shards}
    assert len(lengths) == 1
    (length,) = lengths
    assert length == math.ceil(single.num_batches / replicas)
    plan = shards[0].global_plan()
    batches = [np.array(as_list(s)) for s in shards]
    for rank, shard in enumerate(batches):
        np.testing.assert_array_equal(shard, plan[rank::replicas])
        check_batches(shard, labels, 5, 3)
    # Every global batch goes to exactly one rank; padding rows repeat the first batches.
    own = single.global_plan()
    np.testing.assert_array_equal(plan[: own.shape[0]], own)
    np.testing.assert_array_equal(plan[own.shape[0] :], own[: plan.shape[0] - own.shape[0]])


@pytest.mark.parametrize("replicas", [2, 3])
def test_shards_split_an_exact_layout_into_disjoint_sample_sets(replicas: int) -> None:
    # 36 classes × 4 samples, p=6, k=4: 36 chunks = 6 batches, no top-up and no padding.
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(36), 4))
    sets = [
        set(np.concatenate(as_list(PKSampler(labels, 6, 4, num_replicas=replicas, rank=r))).tolist())
        for r in range(replicas)
    ]
    assert sum(len(s) for s in sets) == labels.size
    assert set().union(*sets) == set(range(labels.size))


def test_a_state_saved_by_rank_0_resumes_every_rank() -> None:
    labels = long_tailed()
    ranks = [PKSampler(labels, 5, 3, seed=4, num_replicas=3, rank=r) for r in range(3)]
    full = [as_list(s) for s in ranks]
    iterator = iter(ranks[0])
    for _ in range(2):
        next(iterator)
    state = ranks[0].state_dict()
    for rank in range(3):
        resumed = PKSampler(labels, 5, 3, num_replicas=3, rank=rank)
        resumed.load_state_dict(state)
        assert as_list(resumed) == full[rank][2:]


def test_replicas_and_rank_are_read_from_torch_distributed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 3)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 2)
    labels = long_tailed()
    sampler = PKSampler(labels, 4, 2)
    assert (sampler.num_replicas, sampler.rank) == (3, 2)
    explicit = PKSampler(labels, 4, 2, num_replicas=2, rank=1)  # passed values win
    assert (explicit.num_replicas, explicit.rank) == (2, 1)


def test_without_torch_distributed_there_is_one_replica() -> None:
    assert not torch.distributed.is_initialized()
    sampler = PKSampler(long_tailed(), 4, 2)
    assert (sampler.num_replicas, sampler.rank) == (1, 0)


# -- DataLoader ---------------------------------------------------------------------
class IndexDataset(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> int:
        return index


def test_dataloader_with_two_workers_yields_the_sampler_batches() -> None:
    labels = long_tailed()
    sampler = PKSampler(labels, 4, 3, seed=5)
    sampler.set_epoch(1)
    loader = DataLoader(IndexDataset(labels.size), batch_sampler=sampler, num_workers=2)
    assert len(loader) == len(sampler)
    got = [batch.tolist() for batch in loader]
    assert got == as_list(sampler)
    check_batches(np.array(got), labels, 4, 3)


# -- properties over random label distributions -------------------------------------
@st.composite
def label_layouts(draw: st.DrawFn) -> tuple[np.ndarray, int, int]:
    kind = draw(st.sampled_from(["long_tail", "singletons", "single_class", "uniform"]))
    k = draw(st.integers(1, 5))
    if kind == "single_class":
        sizes = [draw(st.integers(1, 40))]
    elif kind == "singletons":
        sizes = [1] * draw(st.integers(1, 60))
    elif kind == "long_tail":
        c = draw(st.integers(2, 50))
        alpha = draw(st.floats(0.3, 2.5))
        top = draw(st.integers(1, 80))
        sizes = [max(1, int(top / (i + 1) ** alpha)) for i in range(c)]
    else:
        sizes = draw(st.lists(st.integers(1, 12), min_size=1, max_size=40))
    seed = draw(st.integers(0, 2**16))
    labels = np.random.default_rng(seed).permutation(np.repeat(np.arange(len(sizes)) * 3 - 5, sizes))
    p = draw(st.integers(1, len(sizes)))
    return labels, p, k


@settings(max_examples=50, deadline=None)
@given(layout=label_layouts(), seed=st.integers(0, 1000), epoch=st.integers(0, 5))
def test_plan_properties_hold_for_random_label_distributions(
    layout: tuple[np.ndarray, int, int], seed: int, epoch: int
) -> None:
    labels, p, k = layout
    sampler = PKSampler(labels, p, k, seed=seed)
    sampler.set_epoch(epoch)
    batches = np.array(as_list(sampler)).reshape(-1, p * k)
    check_batches(batches, labels, p, k)
    assert batches.shape[0] == len(sampler) == reference_epoch_length(labels, p, k)[0]
    # Coverage: every sample when allowed; otherwise every sample of the uncapped classes.
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    chunks = np.maximum(1, -(-counts // k))
    must_see = chunks[inverse] <= sampler.num_batches
    assert sampler.covers_all_samples == bool(must_see.all())
    assert set(np.flatnonzero(must_see).tolist()) <= set(np.unique(batches).tolist())
    # Determinism, resume and shards.
    again = PKSampler(labels, p, k, seed=seed)
    again.set_epoch(epoch)
    half = len(batches) // 2
    again.load_state_dict(sampler.state_dict(batches_done=half))
    np.testing.assert_array_equal(np.array(as_list(again)).reshape(-1, p * k), batches[half:])
    shards = [PKSampler(labels, p, k, seed=seed, num_replicas=2, rank=r) for r in range(2)]
    for shard in shards:
        shard.set_epoch(epoch)
    a, b = (np.array(as_list(s)).reshape(-1, p * k) for s in shards)
    assert a.shape == b.shape
    merged = np.empty((2 * a.shape[0], p * k), dtype=np.int64)
    merged[0::2], merged[1::2] = a, b
    np.testing.assert_array_equal(merged[: batches.shape[0]], batches)


def class_pair_counts(class_rows: np.ndarray, num_classes: int) -> np.ndarray:
    rows = np.sort(class_rows, axis=1)
    i, j = np.triu_indices(rows.shape[1], 1)
    _, counts = np.unique((rows[:, i] * num_classes + rows[:, j]).ravel(), return_counts=True)
    return counts


def test_classes_meet_as_often_as_in_independent_random_batches() -> None:
    # A structured arrangement can put the same two classes together in many batches
    # of an epoch (fewer distinct negatives); the plan must look like random batches.
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 200, size=20_000)
    sampler = PKSampler(labels, 16, 4, seed=0)
    plan = sampler.global_plan()
    ours = class_pair_counts(labels[plan[:, ::4]], 200)
    weights = np.bincount(labels) / labels.size
    baseline = class_pair_counts(
        np.stack([rng.choice(200, size=16, replace=False, p=weights) for _ in range(plan.shape[0])]), 200
    )
    assert ours.max() <= baseline.max() + 3
    assert ours.size >= 0.95 * baseline.size  # as many distinct pairs


def _distributed_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        sampler = PKSampler(long_tailed(), 4, 2, seed=9)  # num_replicas and rank from torch.distributed
        sampler.set_epoch(3)
        np.save(f"{out_dir}/rank{rank}.npy", np.array(list(sampler)))
        np.save(f"{out_dir}/meta{rank}.npy", np.array([sampler.num_replicas, sampler.rank]))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.skipif(sys.platform != "linux", reason="forks two gloo processes")
def test_two_real_gloo_processes_get_disjoint_equal_shards(tmp_path: Path) -> None:
    # From the suite's fork server, like every two-process test: forking the test process
    # itself left a later fork-server start hanging on torch 2.1.
    run_two_processes(_distributed_worker, tmp_path)
    single = PKSampler(long_tailed(), 4, 2, seed=9)
    single.set_epoch(3)
    own = single.global_plan()
    shards = [np.load(tmp_path / f"rank{r}.npy") for r in range(2)]
    for rank in range(2):
        np.testing.assert_array_equal(np.load(tmp_path / f"meta{rank}.npy"), [2, rank])
    assert shards[0].shape == shards[1].shape
    merged = np.empty((2 * shards[0].shape[0], shards[0].shape[1]), dtype=np.int64)
    merged[0::2], merged[1::2] = shards
    np.testing.assert_array_equal(merged[: own.shape[0]], own)
