"""Retrieval metrics against a brute-force reference and hand-computed tiny examples.

Run: cd /work/main && .venv/bin/python -m pytest -q tests/test_retrieval.py
"""

import numpy as np
import pytest

from modalign.eval.retrieval import (
    bidirectional_retrieval,
    chance_recall_at_1,
    retrieval_metrics,
    retrieval_ranks,
    zero_shot_accuracy,
)


def brute_force_ranks(query, gallery, query_groups, gallery_groups):
    """Plain reference: sort each query's gallery by (-score, is_relevant), irrelevant first on ties."""
    ranks, aps = [], []
    for q, qg in zip(query.tolist(), query_groups.tolist()):
        items = []
        for g, gg in zip(gallery.tolist(), gallery_groups.tolist()):
            score = sum(a * b for a, b in zip(q, g))
            items.append((-score, gg == qg))
        items.sort(key=lambda item: (item[0], item[1]))
        hits, precisions, first = 0, [], None
        for position, (_, is_relevant) in enumerate(items, start=1):
            if is_relevant:
                hits += 1
                precisions.append(hits / position)
                if first is None:
                    first = position
        ranks.append(first)
        aps.append(sum(precisions) / len(precisions))
    return np.array(ranks), np.array(aps)


def tied_problem(seed, n_query, n_gallery, dim=4, n_groups=4):
    """Integer-valued embeddings (exact float32 scores, many ties), duplicate gallery rows, few groups."""
    rng = np.random.default_rng(seed)
    n_distinct = max(1, n_gallery // 2)
    distinct = rng.integers(-2, 3, size=(n_distinct, dim)).astype(np.float32)
    gallery = distinct[rng.integers(0, n_distinct, size=n_gallery)]  # repeats rows
    gallery_groups = rng.integers(0, n_groups, size=n_gallery)
    query = rng.integers(-2, 3, size=(n_query, dim)).astype(np.float32)
    query[: n_query // 3] = gallery[rng.integers(0, n_gallery, size=n_query // 3)]
    query_groups = rng.choice(np.unique(gallery_groups), size=n_query)
    return query, gallery, query_groups, gallery_groups


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("block_size", [1, 7, 2048])
def test_matches_brute_force_with_ties(seed, block_size):
    query, gallery, query_groups, gallery_groups = tied_problem(seed, n_query=23, n_gallery=41)
    expected_rank, expected_ap = brute_force_ranks(query, gallery, query_groups, gallery_groups)
    result = retrieval_ranks(query, gallery, query_groups, gallery_groups, block_size=block_size)
    assert result["rank"].dtype == np.int64 and result["ap"].dtype == np.float64
    np.testing.assert_array_equal(result["rank"], expected_rank)
    np.testing.assert_allclose(result["ap"], expected_ap, rtol=0, atol=1e-12)


@pytest.mark.parametrize("block_size", [1, 5, 16, 100])
def test_matches_brute_force_more_gallery_groups(block_size):
    # Many groups, so some queries have exactly one relevant item; Nq > Ng.
    problem = tied_problem(11, n_query=50, n_gallery=30, dim=3, n_groups=12)
    query, gallery, query_groups, gallery_groups = problem
    expected_rank, expected_ap = brute_force_ranks(query, gallery, query_groups, gallery_groups)
    result = retrieval_ranks(query, gallery, query_groups, gallery_groups, block_size=block_size)
    np.testing.assert_array_equal(result["rank"], expected_rank)
    np.testing.assert_allclose(result["ap"], expected_ap, rtol=0, atol=1e-12)


def test_continuous_data_independent_of_block_size():
    rng = np.random.default_rng(3)
    query = rng.standard_normal((40, 16)).astype(np.float32)
    gallery = rng.standard_normal((55, 16)).astype(np.float32)
    query_groups = rng.integers(0, 5, size=40)
    gallery_groups = np.arange(55) % 5
    expected_rank, expected_ap = brute_force_ranks(
        query.astype(np.float64), gallery.astype(np.float64), query_groups, gallery_groups
    )
    for block_size in (1, 3, 40):
        result = retrieval_ranks(query, gallery, query_groups, gallery_groups, block_size=block_size)
        np.testing.assert_array_equal(result["rank"], expected_rank)
        np.testing.assert_allclose(result["ap"], expected_ap, atol=1e-12)


def test_hand_example_single_query():
    # scores 3, 1, 2, 2, 0; relevant (group 0) = items 1, 2, 4.
    # Pessimistic order: item0 (3, irr), item3 (2, irr), item2 (2, rel), item1 (1, rel), item4 (0, rel)
    # -> relevant at positions 3, 4, 5: rank 3, AP = (1/3 + 2/4 + 3/5) / 3 = 43/90.
    query = np.array([[1.0]])
    gallery = np.array([[3.0], [1.0], [2.0], [2.0], [0.0]])
    result = retrieval_ranks(query, gallery, np.array([0]), np.array([1, 0, 0, 1, 0]))
    assert result["rank"].tolist() == [3]
    assert result["ap"][0] == pytest.approx(43 / 90)


@pytest.mark.parametrize("score", [1.0, -1.0, 0.75, 2.0**-140, -(2.0**-149), 3e38])
def test_adjacent_float32_scores_are_not_ties(score):
    # Gallery scores: s (relevant) and the next float32 below s (irrelevant) -> relevant first, rank 1.
    # Swapped groups -> the relevant item is second, rank 2, AP 1/2.
    s = np.float32(score)
    below = np.nextafter(s, np.float32(-np.inf))
    gallery = np.array([[below], [s]], dtype=np.float32)
    result = retrieval_ranks(np.ones((1, 1), np.float32), gallery, np.array([0]), np.array([1, 0]))
    assert result["rank"].tolist() == [1]
    result = retrieval_ranks(np.ones((1, 1), np.float32), gallery, np.array([1]), np.array([1, 0]))
    assert result["rank"].tolist() == [2] and result["ap"][0] == 0.5


def test_signed_zero_scores_tie():
    # Scores +0.0 and -0.0 are equal, so the relevant one ranks second whichever it is.
    gallery = np.array([[0.0], [-0.0]], dtype=np.float32)
    for query_group in (0, 1):
        query = np.ones((1, 1), np.float32)
        result = retrieval_ranks(query, gallery, np.array([query_group]), np.array([0, 1]))
        assert result["rank"].tolist() == [2]


def test_hand_example_bidirectional():
    # modality = text = identity, groups [0, 0, 1].
    # Query 0: scores [1, 0, 0]; item0 rel at 1, tie at 0 puts item2 (irr) at 2, item1 (rel) at 3
    #   -> rank 1, AP = (1/1 + 2/3) / 2 = 5/6. Query 1 is symmetric: 5/6. Query 2: rank 1, AP 1.
    # Both directions: R@1 = 1, mAP = (5/6 + 5/6 + 1) / 3 = 8/9, median and mean rank 1.
    eye = np.eye(3)
    metrics, per_example = bidirectional_retrieval(eye, eye, np.array([0, 0, 1]))
    for direction in ("m2t", "t2m"):
        assert per_example[f"{direction}_rank"].tolist() == [1, 1, 1]
        np.testing.assert_allclose(per_example[f"{direction}_ap"], [5 / 6, 5 / 6, 1])
        for k in (1, 5, 10):
            assert per_example[f"{direction}_r{k}"].tolist() == [1.0, 1.0, 1.0]
        assert metrics[f"{direction}_R@1"] == 1.0
        assert metrics[f"{direction}_mAP"] == pytest.approx(8 / 9)
        assert metrics[f"{direction}_median_rank"] == 1.0
        assert metrics[f"{direction}_mean_rank"] == 1.0
    assert set(per_example) == {
        f"{d}_{m}" for d in ("m2t", "t2m") for m in ("rank", "ap", "r1", "r5", "r10")
    }


def test_bidirectional_directions_differ():
    # A collapsed modality encoder: both sensor rows equal text 0.
    modality = np.array([[1.0, 0.0], [1.0, 0.0]])
    text = np.array([[1.0, 0.0], [0.0, 1.0]])
    # m2t: both queries score texts [1, 0]: query 0 rank 1, query 1 rank 2 (AP 1/2).
    # t2m: text 0 scores [1, 1] (tie, irrelevant first) -> rank 2; text 1 scores [0, 0] -> rank 2.
    metrics, per_example = bidirectional_retrieval(modality, text, np.array([0, 1]))
    assert per_example["m2t_rank"].tolist() == [1, 2]
    assert per_example["t2m_rank"].tolist() == [2, 2]
    assert metrics["m2t_R@1"] == 0.5 and metrics["t2m_R@1"] == 0.0


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("block_size", [1, 4, 5])
def test_constant_embeddings_rank_last(seed, block_size):
    # All rows equal a non-exact float vector; with 33 rows BLAS edge kernels can round identical
    # columns differently (seen for seeds 1-3 with OpenBLAS), which must not break the tie.
    # Distinct groups: 32 irrelevant items tie with the one relevant item -> rank 33, AP 1/33.
    rng = np.random.default_rng(seed)
    v = rng.standard_normal(256).astype(np.float32)
    v /= np.linalg.norm(v)
    constant = np.tile(v, (33, 1))
    metrics, per_example = bidirectional_retrieval(constant, constant, np.arange(33), block_size=block_size)
    for direction in ("m2t", "t2m"):
        assert (per_example[f"{direction}_rank"] == 33).all()
        np.testing.assert_allclose(per_example[f"{direction}_ap"], 1 / 33)
        assert metrics[f"{direction}_R@10"] == 0.0


def test_constant_embeddings_small_groups():
    # Groups of two: 4 irrelevant then 2 relevant at positions 5, 6 -> rank 5, AP = (1/5 + 2/6)/2 = 4/15.
    constant = np.ones((6, 3)) / np.sqrt(3)
    result = retrieval_ranks(constant, constant, np.array([0, 0, 1, 1, 2, 2]), np.array([0, 0, 1, 1, 2, 2]))
    assert result["rank"].tolist() == [5] * 6
    np.testing.assert_allclose(result["ap"], 4 / 15)


def test_retrieval_metrics_hand_example():
    # ranks [1, 2, 3, 10, 20]: R@1 = 1/5, R@5 = 3/5, R@10 = 4/5, median 3, mean 36/5 = 7.2;
    # mAP = (1 + .5 + .25 + .1 + .05) / 5 = 0.38.
    metrics = retrieval_metrics(np.array([1, 2, 3, 10, 20]), np.array([1, 0.5, 0.25, 0.1, 0.05]), prefix="x_")
    assert metrics == pytest.approx(
        {"x_R@1": 0.2, "x_R@5": 0.6, "x_R@10": 0.8, "x_median_rank": 3.0, "x_mean_rank": 7.2, "x_mAP": 0.38}
    )
    assert all(type(value) is float for value in metrics.values())


def test_zero_shot_accuracy_hand_example():
    # class 0 = [1, 0], class 1 = [0, 1].
    # [1, 0] -> 0 (label 0, correct); [0, 1] -> 1 (label 0, wrong); [1, 1] -> tie -> 0 (label 1, wrong);
    # [2, 1] -> 0 (label -1, ignored). Accuracy 1/3.
    modality = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 1.0]])
    class_text = np.eye(2)
    accuracy, correct = zero_shot_accuracy(modality, class_text, np.array([0, 0, 1, -1]))
    assert accuracy == pytest.approx(1 / 3)
    np.testing.assert_array_equal(correct, [1.0, 0.0, 0.0, np.nan])


def test_zero_shot_accuracy_rejects_out_of_range_labels():
    with pytest.raises(ValueError, match="labels"):
        zero_shot_accuracy(np.eye(2), np.eye(2), np.array([0, 2]))


def test_chance_recall_at_1_hand_example():
    # groups [0, 0, 1, 2]: group sizes per item 2, 2, 1, 1 -> mean 1.5 over N = 4 -> 0.375.
    assert chance_recall_at_1(np.array([0, 0, 1, 2])) == pytest.approx(0.375)
    assert chance_recall_at_1(np.arange(10)) == pytest.approx(0.1)


def test_query_without_relevant_item_is_named():
    with pytest.raises(ValueError, match="query 2 "):
        retrieval_ranks(np.eye(3), np.eye(3), np.array([0, 1, 5]), np.array([0, 1, 2]))


@pytest.mark.parametrize(
    "query, gallery, query_groups, gallery_groups, match",
    [
        (np.ones(3), np.ones((3, 3)), np.zeros(3, int), np.zeros(3, int), "query must be 2-D"),
        (np.ones((2, 3)), np.ones((3, 4)), np.zeros(2, int), np.zeros(3, int), "dim"),
        (np.ones((2, 3)), np.ones((3, 3)), np.zeros(3, int), np.zeros(3, int), "query_groups"),
        (np.ones((2, 3)), np.ones((3, 3)), np.zeros(2, int), np.zeros(2, int), "gallery_groups"),
        (np.ones((2, 3)), np.ones((3, 3)), np.zeros(2), np.zeros(3, int), "integer"),
        (np.full((2, 3), np.nan), np.ones((3, 3)), np.zeros(2, int), np.zeros(3, int), "NaN"),
    ],
)
def test_shape_validation(query, gallery, query_groups, gallery_groups, match):
    with pytest.raises(ValueError, match=match):
        retrieval_ranks(query, gallery, query_groups, gallery_groups)


def test_bad_block_size_and_mismatched_pairs():
    with pytest.raises(ValueError, match="block_size"):
        retrieval_ranks(np.eye(2), np.eye(2), np.arange(2), np.arange(2), block_size=0)
    with pytest.raises(ValueError, match="equal shapes"):
        bidirectional_retrieval(np.eye(3), np.eye(3)[:2], np.arange(3))


def paired_problem(seed, n, dim=3, n_groups=None, n_distinct=None):
    """A paired set with many exact ties: integer embeddings, duplicate rows on both sides (shared
    across groups too), groups of size 1 upwards."""
    rng = np.random.default_rng(seed)
    n_distinct = n_distinct or max(1, n // 2)
    n_groups = n_groups or max(1, n // 3)
    pool = rng.integers(-2, 3, size=(n_distinct, dim)).astype(np.float32)
    modality = pool[rng.integers(0, n_distinct, size=n)]
    text = pool[rng.integers(0, n_distinct, size=n)]
    groups = rng.integers(0, n_groups, size=n) * 7 - 3  # arbitrary, unsorted ids
    return modality, text, groups


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("block_size", [1, 3, 8, 64])
def test_one_product_count_matches_sorting_reference(seed, block_size):
    # bidirectional_retrieval scores S = modality @ text.T once, in tiles, and counts; retrieval_ranks
    # sorts each direction's own product. Both must give the same ranks and APs, ties included.
    from modalign.eval.retrieval import _counted_bidirectional

    n = 10 + 9 * seed
    modality, text, groups = paired_problem(seed, n, n_distinct=max(2, n // (1 + seed % 3)))
    counted = _counted_bidirectional(modality, text, groups, block_size)
    assert counted is not None  # exact this way: the sort fallback is not what is tested here
    for direction, query, gallery in (("m2t", modality, text), ("t2m", text, modality)):
        expected_rank, expected_ap = brute_force_ranks(query, gallery, groups, groups)
        np.testing.assert_array_equal(counted[f"{direction}_rank"], expected_rank)
        np.testing.assert_allclose(counted[f"{direction}_ap"], expected_ap, rtol=0, atol=1e-12)


@pytest.mark.parametrize("block_size", [2, 16, 2048])
def test_one_product_count_continuous_data_equals_sorting(block_size):
    # Continuous embeddings, all distinct, groups of 1-5; exact agreement with the sorting path.
    rng = np.random.default_rng(7)
    modality = rng.standard_normal((300, 16)).astype(np.float32)
    text = modality + rng.standard_normal((300, 16)).astype(np.float32)
    modality /= np.linalg.norm(modality, axis=1, keepdims=True)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    groups = rng.integers(0, 120, size=300)
    _, per_example = bidirectional_retrieval(modality, text, groups, block_size=block_size)
    for direction, query, gallery in (("m2t", modality, text), ("t2m", text, modality)):
        reference = retrieval_ranks(query, gallery, groups, groups, block_size=block_size)
        np.testing.assert_array_equal(per_example[f"{direction}_rank"], reference["rank"])
        np.testing.assert_allclose(per_example[f"{direction}_ap"], reference["ap"], rtol=0, atol=1e-12)


def test_large_groups_fall_back_to_sorting():
    # A group larger than MAX_COUNTED_RELEVANT is ranked by sorting, with the same answers.
    from modalign.eval import retrieval

    modality, text, _ = paired_problem(3, 80)
    groups = np.repeat([0, 1], 40)
    assert 40 > retrieval.MAX_COUNTED_RELEVANT
    assert retrieval._counted_bidirectional(modality, text, groups, 16) is None
    _, per_example = bidirectional_retrieval(modality, text, groups, block_size=16)
    expected_rank, expected_ap = brute_force_ranks(modality, text, groups, groups)
    np.testing.assert_array_equal(per_example["m2t_rank"], expected_rank)
    np.testing.assert_allclose(per_example["m2t_ap"], expected_ap, rtol=0, atol=1e-12)
