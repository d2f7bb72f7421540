"""Every loss and miner against a slow reference written as plainly as its paper.

Each reference below is an explicit Python loop over anchors, pairs or triplets,
with scalar arithmetic and the formula from the loss's docstring; autograd through
those scalars gives the reference gradient. This is a second oracle independent of
pytorch-metric-learning, and the only one for what PML lacks: semi-hard mining
(TensorFlow Addons' rule) and the margin-softmax ``temperature``.
"""

from __future__ import annotations

import math

import pytest
import torch

import embedkit as ek
from _loss_helpers import (
    LAYOUTS,
    SEEDS,
    assert_close,
    make_batch,
    make_reference_set,
    one_thread,  # noqa: F401 (an autouse fixture)
    value_and_grads,
)
from embedkit.mining import (
    hardest_pairs,
    multi_similarity_pairs,
    pair_masks,
    semi_hard_negatives,
    sorted_negatives,
)

N, D = 10, 5


# -- plain building blocks -----------------------------------------------------------


def norm(u):
    return torch.sqrt(torch.dot(u, u))


def cosine(u, v):
    return torch.dot(u, v) / (norm(u) * norm(v))


def distance(u, v, metric="euclidean", normalize=True):
    if metric == "cosine":
        return 1 - cosine(u, v)
    if normalize:
        u, v = u / norm(u), v / norm(v)
    squared = torch.dot(u - v, u - v)
    return squared if metric == "squared_euclidean" else torch.sqrt(squared)


def pairs(x, y, r=None, ry=None):
    """(i, j, is_positive) for every pair: i over queries, j over references, i != j in self mode."""
    ref_labels = y if r is None else ry
    for i in range(len(x)):
        for j in range(len(ref_labels)):
            if r is None and i == j:
                continue
            yield i, j, bool(y[i] == ref_labels[j])


def softplus(v):
    return torch.log(1 + torch.exp(v))


def total(values):
    return sum(values, torch.zeros((), dtype=torch.float64))


def mean(values):
    return total(values) / len(values) if values else torch.zeros((), dtype=torch.float64)


def batches(*, with_reference=False):
    """Small float64 batches, one per seed, alternating the layouts; optionally with a reference set."""
    for seed in SEEDS:
        x, y = make_batch(LAYOUTS[seed % len(LAYOUTS)], N, D, seed)
        if with_reference:
            r, ry = make_reference_set(y, N + 3, D, seed)
            yield x, y, r, ry
        else:
            yield x, y, None, None


def check_pair_loss(loss, reference, *, with_reference=False):
    """Compare ``loss`` with ``reference(x, y, r, ry)`` in value and gradient on every batch."""
    for x, y, r, ry in batches(with_reference=with_reference):
        check_pair_batch(loss, reference, x, y, r, ry)


def check_pair_batch(loss, reference, x, y, r, ry):
    tensors = (x,) if r is None else (x, r)

    def ours(*t):
        return loss(t[0], y) if r is None else loss(t[0], y, ref_embeddings=t[1], ref_labels=ry)

    def slow(*t):
        return reference(t[0], y, None if r is None else t[1], ry)

    v_ours, g_ours = value_and_grads(ours, *tensors)
    v_slow, g_slow = value_and_grads(slow, *tensors)
    assert_close(v_ours, v_slow, "value")
    for g_o, g_s in zip(g_ours, g_slow, strict=True):
        assert_close(g_o, g_s, "gradient")


# -- contrastive -----------------------------------------------------------------------


def contrastive_loop(pos_margin, neg_margin, metric="euclidean", normalize=True):
    def reference(x, y, r, ry):
        refs = x if r is None else r
        pos, neg = [], []
        for i, j, positive in pairs(x, y, r, ry):
            d = distance(x[i], refs[j], metric, normalize)
            loss = torch.relu(d - pos_margin) if positive else torch.relu(neg_margin - d)
            if loss > 0:  # averaged over active pairs only
                (pos if positive else neg).append(loss)
        return mean(pos) + mean(neg)

    return reference


@pytest.mark.parametrize("with_reference", [False, True], ids=["self", "ref"])
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(pos_margin=0.0, neg_margin=1.0),
        dict(pos_margin=0.3, neg_margin=1.2),
        dict(pos_margin=0.1, neg_margin=0.8, metric="cosine"),
        dict(pos_margin=0.2, neg_margin=1.5, metric="squared_euclidean"),
        dict(pos_margin=1.0, neg_margin=3.0, normalize=False),
    ],
    ids=["default", "margins", "cosine", "squared", "unnormalized"],
)
def test_contrastive_equals_loop(kwargs, with_reference):
    kwargs = dict(kwargs)  # the parameter dict is shared between test cases
    metric = kwargs.pop("metric", "euclidean")
    loss = ek.ContrastiveLoss(**kwargs, distance=metric)
    check_pair_loss(loss, contrastive_loop(**kwargs, metric=metric), with_reference=with_reference)


# -- triplet ---------------------------------------------------------------------------


def triplet_loop(margin, mining, metric="euclidean", normalize=True, soft=False):
    def hinge(v):
        return softplus(v) if soft else torch.relu(v)

    def reference(x, y, r, ry):
        refs, ref_labels = (x, y) if r is None else (r, ry)
        d = [[distance(x[i], refs[j], metric, normalize) for j in range(len(refs))] for i in range(len(x))]
        losses = []
        for a in range(len(x)):
            positives = [p for p in range(len(refs)) if ref_labels[p] == y[a] and (r is not None or p != a)]
            negatives = [n for n in range(len(refs)) if ref_labels[n] != y[a]]
            if not positives or not negatives:
                continue
            if mining in ("all", "batch_all"):
                losses += [hinge(d[a][p] - d[a][n] + margin) for p in positives for n in negatives]
            elif mining == "batch_hard":
                hardest_p = max(positives, key=lambda p: d[a][p].item())
                hardest_n = min(negatives, key=lambda n: d[a][n].item())
                losses.append(hinge(d[a][hardest_p] - d[a][hardest_n] + margin))
            else:  # semi_hard: nearest negative farther than p, else the farthest negative
                for p in positives:
                    farther = [n for n in negatives if d[a][n] > d[a][p]]
                    if farther:
                        n = min(farther, key=lambda n: d[a][n].item())
                    else:
                        n = max(negatives, key=lambda n: d[a][n].item())
                    losses.append(hinge(d[a][p] - d[a][n] + margin))
        if mining == "batch_all":
            losses = [v for v in losses if v > 0]
        return mean(losses)

    return reference


@pytest.mark.parametrize("with_reference", [False, True], ids=["self", "ref"])
@pytest.mark.parametrize("mining", ["all", "batch_all", "batch_hard", "semi_hard"])
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(margin=0.2),
        dict(margin=0.0, soft=True),
        dict(margin=0.3, metric="cosine"),
        dict(margin=0.5, metric="squared_euclidean"),
        dict(margin=1.0, normalize=False),
    ],
    ids=["default", "soft", "cosine", "squared", "unnormalized"],
)
def test_triplet_equals_loop(kwargs, mining, with_reference):
    loss = ek.TripletMarginLoss(
        kwargs["margin"],
        mining=mining,
        distance=kwargs.get("metric", "euclidean"),
        normalize=kwargs.get("normalize", True),
        soft_margin=kwargs.get("soft", False),
    )
    check_pair_loss(loss, triplet_loop(mining=mining, **kwargs), with_reference=with_reference)


def test_semi_hard_triplet_on_a_hand_made_line():
    # Points on a line: anchor 0 at 0, positive at 1, negatives at 0.5, 2 and 3 (unnormalised).
    x = torch.tensor([[0.0], [1.0], [0.5], [2.0], [3.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 2, 3])
    loss = ek.TripletMarginLoss(2.5, mining="semi_hard", normalize=False)
    # Pair (0, 1): d_ap = 1, nearest negative farther than 1 is at 2 -> [1 - 2 + 2.5] = 1.5.
    # Pair (1, 0): d_ap = 1, negatives at 0.5, 1, 2 -> only 2 is strictly farther -> 1.5.
    assert loss(x, y).item() == pytest.approx(1.5, rel=1e-12)


# -- InfoNCE family --------------------------------------------------------------------


def similarity_rows(x, y, r, ry):
    """For each query i: the list of (similarity, is_positive) over its references."""
    refs = x if r is None else r
    rows = [[] for _ in range(len(x))]
    for i, j, positive in pairs(x, y, r, ry):
        rows[i].append((cosine(x[i], refs[j]), positive))
    return rows


def has_both_pair_kinds(rows):
    return any(p for row in rows for _, p in row) and any(not p for row in rows for _, p in row)


def supcon_loop(temperature):
    def reference(x, y, r, ry):
        rows = similarity_rows(x, y, r, ry)
        if not has_both_pair_kinds(rows):
            return x.sum() * 0
        per_anchor = []
        for row in rows:
            positives = [s for s, p in row if p]
            if not positives:
                continue
            denominator = sum(torch.exp(s / temperature) for s, _ in row)
            per_anchor.append(-mean([torch.log(torch.exp(s / temperature) / denominator) for s in positives]))
        return mean(per_anchor)

    return reference


def ntxent_loop(temperature):
    def reference(x, y, r, ry):
        rows = similarity_rows(x, y, r, ry)
        if not has_both_pair_kinds(rows):
            return x.sum() * 0
        per_pair = []
        for row in rows:
            negatives = sum(torch.exp(s / temperature) for s, p in row if not p)
            for s, p in row:
                if p:
                    e = torch.exp(s / temperature)
                    per_pair.append(-torch.log(e / (e + negatives)))
        return mean(per_pair)

    return reference


@pytest.mark.parametrize("with_reference", [False, True], ids=["self", "ref"])
@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_supcon_equals_loop(temperature, with_reference):
    check_pair_loss(ek.SupConLoss(temperature), supcon_loop(temperature), with_reference=with_reference)


@pytest.mark.parametrize("with_reference", [False, True], ids=["self", "ref"])
@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_ntxent_equals_loop(temperature, with_reference):
    check_pair_loss(ek.NTXentLoss(temperature), ntxent_loop(temperature), with_reference=with_reference)


# -- multi-similarity and circle --------------------------------------------------------


def multi_similarity_loop(alpha, beta, base, mining, epsilon):
    def reference(x, y, r, ry):
        per_anchor = []
        for row in similarity_rows(x, y, r, ry):
            positives = [s for s, p in row if p]
            negatives = [s for s, p in row if not p]
            if mining:  # eq. 5-6, judged on the unmined pairs of the same anchor
                hardest_positive = min((s.item() for s in positives), default=math.inf)
                hardest_negative = max((s.item() for s in negatives), default=-math.inf)
                negatives = [s for s in negatives if s + epsilon > hardest_positive]
                positives = [s for s in positives if s - epsilon < hardest_negative]
            pos_term = torch.log(1 + total(torch.exp(-alpha * (s - base)) for s in positives)) / alpha
            neg_term = torch.log(1 + total(torch.exp(beta * (s - base)) for s in negatives)) / beta
            per_anchor.append(pos_term + neg_term)
        return mean(per_anchor)

    return reference


@pytest.mark.parametrize("with_reference", [False, True], ids=["self", "ref"])
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(alpha=2.0, beta=50.0, base=0.5, mining=False, epsilon=0.1),
        dict(alpha=2.0, beta=50.0, base=0.5, mining=True, epsilon=0.1),
        dict(alpha=1.0, beta=10.0, base=0.2, mining=True, epsilon=0.4),
    ],
    ids=["unmined", "mined", "mined-wide"],
)
def test_multi_similarity_equals_loop(kwargs, with_reference):
    loss = ek.MultiSimilarityLoss(
        kwargs["alpha"], kwargs["beta"], kwargs["base"], mining=kwargs["mining"], epsilon=kwargs["epsilon"]
    )
    check_pair_loss(loss, multi_similarity_loop(**kwargs), with_reference=with_reference)


def circle_loop(m, gamma):
    def reference(x, y, r, ry):
        per_anchor = []
        for row in similarity_rows(x, y, r, ry):
            positives = [s for s, p in row if p]
            negatives = [s for s, p in row if not p]
            if not positives or not negatives:
                continue
            # The weights alpha are constants (detached), as in the authors' code.
            pos = sum(torch.exp(-gamma * max(1 + m - s.item(), 0.0) * (s - (1 - m))) for s in positives)
            neg = sum(torch.exp(gamma * max(s.item() + m, 0.0) * (s - m)) for s in negatives)
            per_anchor.append(torch.log(1 + neg * pos))
        return mean(per_anchor)

    return reference


@pytest.mark.parametrize("with_reference", [False, True], ids=["self", "ref"])
@pytest.mark.parametrize("m, gamma", [(0.4, 80.0), (0.25, 16.0)])
def test_circle_equals_loop(m, gamma, with_reference):
    check_pair_loss(ek.CircleLoss(m, gamma), circle_loop(m, gamma), with_reference=with_reference)


# -- classifier losses --------------------------------------------------------------------


def classifier_batches():
    for seed in SEEDS:
        x, y = make_batch(LAYOUTS[seed % len(LAYOUTS)], N, D, seed, contiguous=True)
        yield x, y, int(y.max()) + 2, seed


def check_classifier_loss(make_loss, reference):
    for x, y, num_classes, seed in classifier_batches():
        loss = make_loss(num_classes).double()
        name = "proxies" if isinstance(loss, ek.ProxyAnchorLoss) else "weight"
        param = getattr(loss, name)
        g = torch.Generator().manual_seed(seed)
        param.data = torch.randn(param.shape, generator=g, dtype=torch.float64)
        check_classifier_batch(loss, name, reference, x, y)


def check_classifier_batch(loss, name, reference, x, y):
    def ours(e, w):
        return torch.func.functional_call(loss, {name: w}, (e, y))

    def slow(e, w):
        return reference(e, y, w)

    v_ours, g_ours = value_and_grads(ours, x, getattr(loss, name))
    v_slow, g_slow = value_and_grads(slow, x, getattr(loss, name))
    assert_close(v_ours, v_slow, "value")
    assert_close(g_ours[0], g_slow[0], "gradient w.r.t. embeddings")
    assert_close(g_ours[1], g_slow[1], f"gradient w.r.t. {name}")


def margin_softmax_loop(target_with_margin, scale, temperature, sub_centers=1):
    def reference(x, y, weight):
        per_sample = []
        num_classes = len(weight) // sub_centers
        for i in range(len(x)):
            logits = []
            for c in range(num_classes):
                cos_c = max(
                    (cosine(x[i], weight[c * sub_centers + k]) for k in range(sub_centers)),
                    key=lambda v: v.item(),
                )
                f = target_with_margin(cos_c) if c == y[i] else cos_c
                logits.append(scale * f / temperature)
            per_sample.append(-torch.log(torch.exp(logits[y[i]]) / sum(torch.exp(v) for v in logits)))
        return mean(per_sample)

    return reference


def arcface_margin(m):
    def f(cos_theta):
        theta = torch.acos(cos_theta)
        return torch.cos(theta + m) if theta <= math.pi - m else cos_theta - m * math.sin(m)

    return f


@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("margin, scale", [(0.5, 64.0), (1.2, 10.0)])
def test_arcface_equals_loop(margin, scale, temperature):
    check_classifier_loss(
        lambda c: ek.ArcFaceLoss(c, D, margin=margin, scale=scale, temperature=temperature),
        margin_softmax_loop(arcface_margin(margin), scale, temperature),
    )


@pytest.mark.parametrize("temperature", [1.0, 0.5])
@pytest.mark.parametrize("sub_centers", [2, 3])
def test_subcenter_arcface_equals_loop(sub_centers, temperature):
    check_classifier_loss(
        lambda c: ek.SubCenterArcFaceLoss(c, D, sub_centers=sub_centers, scale=20.0, temperature=temperature),
        margin_softmax_loop(arcface_margin(0.5), 20.0, temperature, sub_centers),
    )


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_cosface_equals_loop(temperature):
    check_classifier_loss(
        lambda c: ek.CosFaceLoss(c, D, margin=0.35, scale=30.0, temperature=temperature),
        margin_softmax_loop(lambda cos: cos - 0.35, 30.0, temperature),
    )


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_normalized_softmax_equals_loop(temperature):
    check_classifier_loss(
        lambda c: ek.NormalizedSoftmaxLoss(c, D, scale=20.0, temperature=temperature),
        margin_softmax_loop(lambda cos: cos, 20.0, temperature),
    )


def proxy_anchor_loop(margin, alpha):
    def reference(x, y, proxies):
        positive_terms, negative_terms = [], []
        for c in range(len(proxies)):
            sims = [(cosine(x[i], proxies[c]), bool(y[i] == c)) for i in range(len(x))]
            positives = [s for s, p in sims if p]
            if positives:
                positive_terms.append(
                    torch.log(1 + total(torch.exp(-alpha * (s - margin)) for s in positives))
                )
            negative_terms.append(
                torch.log(1 + total(torch.exp(alpha * (s + margin)) for s, p in sims if not p))
            )
        # Positive term over proxies with samples in the batch, negative term over all proxies.
        return sum(positive_terms) / len(positive_terms) + sum(negative_terms) / len(proxies)

    return reference


@pytest.mark.parametrize("margin, alpha", [(0.1, 32.0), (0.3, 8.0)])
def test_proxy_anchor_equals_loop(margin, alpha):
    check_classifier_loss(
        lambda c: ek.ProxyAnchorLoss(c, D, margin=margin, alpha=alpha), proxy_anchor_loop(margin, alpha)
    )


# -- mining functions ---------------------------------------------------------------------


def tied_matrix(seed, n=9, m=None, low=0, high=5):
    """A small integer-valued float64 matrix: many exact ties, to pin down the tie rules."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (n, n if m is None else m), generator=g).to(torch.float64)


def label_sets(seed, n=9, m=11):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 3, (n,), generator=g), torch.randint(0, 4, (m,), generator=g)


def loop_masks(labels, ref_labels=None):
    ref = labels if ref_labels is None else ref_labels
    positive = [[bool(labels[i] == ref[j]) and (ref_labels is not None or i != j) for j in range(len(ref))]
                for i in range(len(labels))]  # fmt: skip
    negative = [[bool(labels[i] != ref[j]) for j in range(len(ref))] for i in range(len(labels))]
    return torch.tensor(positive, dtype=torch.bool), torch.tensor(negative, dtype=torch.bool)


def mining_inputs():
    """(matrix, positive mask, negative mask) in self and reference mode, with ties and empty rows."""
    for seed in SEEDS:
        y, ry = label_sets(seed)
        yield (tied_matrix(seed), *loop_masks(y))
        yield (tied_matrix(seed, m=11), *loop_masks(y, ry))
        # Rows without positives or negatives: one class only / all distinct.
        yield (tied_matrix(seed, n=4), *loop_masks(torch.zeros(4, dtype=torch.long)))
        yield (tied_matrix(seed, n=4), *loop_masks(torch.arange(4)))


@pytest.mark.parametrize("seed", SEEDS)
def test_pair_masks_equal_loop(seed):
    y, ry = label_sets(seed)
    for ours, expected in [(pair_masks(y), loop_masks(y)), (pair_masks(y, ry), loop_masks(y, ry))]:
        assert torch.equal(ours[0], expected[0])
        assert torch.equal(ours[1], expected[1])


def test_hardest_pairs_equal_loop():
    for d, pos, neg in mining_inputs():
        hardest_p, hardest_n, valid = hardest_pairs(d, pos, neg)
        for a in range(len(d)):
            ps = [float(d[a, j]) for j in range(d.shape[1]) if pos[a, j]]
            ns = [float(d[a, j]) for j in range(d.shape[1]) if neg[a, j]]
            assert bool(valid[a]) == bool(ps and ns)
            assert float(hardest_p[a]) == (max(ps) if ps and ns else 0.0)
            assert float(hardest_n[a]) == (min(ns) if ps and ns else 0.0)


def test_sorted_negatives_equal_loop():
    for d, _, neg in mining_inputs():
        values, count = sorted_negatives(d, neg)
        for a in range(len(d)):
            ns = sorted(float(d[a, j]) for j in range(d.shape[1]) if neg[a, j])
            assert int(count[a]) == len(ns)
            assert values[a].tolist() == ns + [math.inf] * (d.shape[1] - len(ns))


def test_semi_hard_negatives_equal_loop():
    for d, pos, neg in mining_inputs():
        chosen, valid = semi_hard_negatives(d, pos, neg)
        for a in range(len(d)):
            ns = [float(d[a, j]) for j in range(d.shape[1]) if neg[a, j]]
            for p in range(d.shape[1]):
                expected_valid = bool(pos[a, p]) and bool(ns)
                assert bool(valid[a, p]) == expected_valid
                if not expected_valid:
                    assert float(chosen[a, p]) == 0.0
                    continue
                farther = [v for v in ns if v > float(d[a, p])]  # strictly farther
                assert float(chosen[a, p]) == (min(farther) if farther else max(ns))


@pytest.mark.parametrize("epsilon", [0.0, 0.5, 1.0])
def test_multi_similarity_pairs_equal_loop(epsilon):
    for s, pos, neg in mining_inputs():
        keep_pos, keep_neg = multi_similarity_pairs(s, pos, neg, epsilon)
        for a in range(len(s)):
            ps = [float(s[a, j]) for j in range(s.shape[1]) if pos[a, j]]
            ns = [float(s[a, j]) for j in range(s.shape[1]) if neg[a, j]]
            for j in range(s.shape[1]):
                v = float(s[a, j])
                assert bool(keep_neg[a, j]) == (bool(neg[a, j]) and bool(ps) and v + epsilon > min(ps))
                assert bool(keep_pos[a, j]) == (bool(pos[a, j]) and bool(ns) and v - epsilon < max(ns))


def test_semi_hard_gradient_flows_to_the_chosen_negative_only():
    # d is a leaf here: the gradient of the chosen value must land on the chosen entry.
    d = torch.tensor([[0.0, 1.0, 0.5, 2.0, 3.0]], dtype=torch.float64, requires_grad=True)
    pos = torch.tensor([[False, True, False, False, False]])
    neg = torch.tensor([[False, False, True, True, True]])
    chosen, valid = semi_hard_negatives(d, pos, neg)
    assert chosen[0, 1].item() == 2.0 and bool(valid[0, 1])
    chosen[0, 1].backward()
    assert d.grad.tolist() == [[0.0, 0.0, 0.0, 1.0, 0.0]]


def test_positive_indices_list_each_anchors_positives_in_order():
    from embedkit.mining import positive_indices

    generator = torch.Generator().manual_seed(0)
    for n, m in ((7, 7), (5, 9), (4, 1)):
        mask = torch.rand(n, m, generator=generator) < 0.4
        index, valid = positive_indices(mask)
        assert index.shape == valid.shape == (n, int(mask.sum(1).max()))
        for row in range(n):
            assert index[row][valid[row]].tolist() == mask[row].nonzero().flatten().tolist()
    index, valid = positive_indices(torch.zeros(3, 4, dtype=torch.bool))
    assert index.shape == valid.shape == (3, 0)


def test_soft_margin_triplet_blocks_stay_within_half_the_distance_matrix():
    from embedkit.losses.triplet import _anchor_blocks

    for n, p, m in ((4000, 3, 4000), (256, 3, 256), (12, 11, 12), (3, 40, 50)):
        blocks = _anchor_blocks(torch.zeros(n, p), torch.zeros(n, m))
        rows = [len(range(n)[b]) for b in blocks]
        assert sum(rows) == n
        # Within N×M / 2 entries, unless a single anchor's P×M is more (P > N / 2).
        assert max(rows) * p * m <= max(n * m // 2, p * m)
