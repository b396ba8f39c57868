"""Cross-modal retrieval metrics over groups of relevant items, as pure numpy functions.

Two items are relevant to each other iff their group ids are equal (e.g. identical caption,
identical structured facts, same label). Scores are dot products of L2-normalised embeddings,
computed as float32 matmuls, `block_size` query rows at a time so memory stays
O(block_size x Ng).

Ties are broken pessimistically, exactly on the computed scores: an irrelevant item whose score
equals a relevant item's score ranks before it. Identical gallery rows are scored once, so they get
bit-identical scores (BLAS kernels can otherwise round identical columns differently), and a model
that maps everything to one embedding gets the worst possible rank rather than a lucky one.

Used by the training loop, the CLI, the report and the tests; no torch here.
"""

from collections.abc import Sequence

import numpy as np

DEFAULT_KS = (1, 5, 10)


def _as_embeddings(x: np.ndarray, name: str) -> np.ndarray:
    """Check a [N, D] embedding matrix; return it as C-contiguous float32."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D [N, D], got shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"{name} must be a numeric array, got dtype {x.dtype}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf (after casting to float32)")
    return x


def _as_groups(groups: np.ndarray, n: int, name: str) -> np.ndarray:
    """Check a [N] integer group-id vector of length n."""
    groups = np.asarray(groups)
    if groups.ndim != 1 or groups.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},), got {groups.shape}")
    if not (np.issubdtype(groups.dtype, np.integer) or groups.dtype == np.bool_):
        raise ValueError(f"{name} must be integer group ids, got dtype {groups.dtype}")
    return groups.astype(np.int64, copy=False)


def _check_block_size(block_size: int) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    return int(block_size)


def _unique_rows(gallery: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Distinct rows [Nu, D] of gallery [Ng, D] and the index [Ng] mapping back (None if all distinct)."""
    unique, inverse = np.unique(gallery, axis=0, return_inverse=True)
    if unique.shape[0] == gallery.shape[0]:
        return gallery, None
    return np.ascontiguousarray(unique), inverse.reshape(-1)


def _block_scores(query_block: np.ndarray, unique: np.ndarray, inverse: np.ndarray | None) -> np.ndarray:
    """Dot products [B, Ng] float32; identical gallery rows get bit-identical scores."""
    scores = query_block @ unique.T  # (B, Nu)
    return scores if inverse is None else scores[:, inverse]  # (B, Ng)


def _relevance_in_ranking_order(scores: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """Whether the item at each position of each query's pessimistic ranking is relevant.

    scores [B, Ng] float32, relevant [B, Ng] bool -> [B, Ng] bool, column j = position j + 1.

    Sorting keys are the float32 scores widened to float64, with each relevant score nudged down by
    |s| * 2**-30 + 2**-160: less than the gap to the next lower float32 (>= |s| * 2**-24, or 2**-149
    near zero), so a relevant item still beats every lower score but loses every tie, and its key is
    no longer a float32 value, which marks it relevant after the sort. Exact for finite scores.
    """
    keys = scores.astype(np.float64)  # (B, Ng)
    del scores  # the caller passes a temporary; free it before the sort
    rows, cols = np.nonzero(relevant)
    relevant_scores = keys[rows, cols]  # (R,)
    if not np.isfinite(relevant_scores).all():
        raise ValueError("a relevant score overflowed float32; are the embeddings L2-normalised?")
    keys[rows, cols] = relevant_scores - (np.abs(relevant_scores) * 2.0**-30 + 2.0**-160)
    keys.sort(axis=1)
    return (keys != keys.astype(np.float32))[:, ::-1]  # descending: best score first


def retrieval_ranks(
    query: np.ndarray,
    gallery: np.ndarray,
    query_groups: np.ndarray,
    gallery_groups: np.ndarray,
    block_size: int = 2048,
) -> dict[str, np.ndarray]:
    """Per-query rank of the first relevant gallery item and average precision.

    Args:
        query: [Nq, D] L2-normalised query embeddings.
        gallery: [Ng, D] L2-normalised gallery embeddings; score = dot product (float32).
        query_groups: [Nq] int group ids of the queries.
        gallery_groups: [Ng] int group ids of the gallery; relevant iff the ids are equal.
        block_size: query rows scored at a time; memory is O(block_size x Ng).

    Returns:
        "rank": [Nq] int64, 1-based rank of the first relevant item
            (= 1 + number of irrelevant items scoring >= the best relevant score).
        "ap": [Nq] float64, average precision over all relevant items.
        Ties rank irrelevant items before relevant ones.

    Raises:
        ValueError: on bad shapes, non-finite embeddings, or a query with no relevant gallery item
            (the message names the first such query index).
    """
    query = _as_embeddings(query, "query")
    gallery = _as_embeddings(gallery, "gallery")
    if query.shape[1] != gallery.shape[1]:
        raise ValueError(f"query dim {query.shape[1]} != gallery dim {gallery.shape[1]}")
    n_query, n_gallery = query.shape[0], gallery.shape[0]
    query_groups = _as_groups(query_groups, n_query, "query_groups")
    gallery_groups = _as_groups(gallery_groups, n_gallery, "gallery_groups")
    block_size = _check_block_size(block_size)

    missing = np.flatnonzero(~np.isin(query_groups, gallery_groups))
    if missing.size:
        raise ValueError(
            f"query {missing[0]} (group {query_groups[missing[0]]}) has no relevant gallery item "
            f"({missing.size} such queries in total)"
        )

    unique, inverse = _unique_rows(gallery)
    rank = np.empty(n_query, dtype=np.int64)
    ap = np.empty(n_query, dtype=np.float64)
    for start in range(0, n_query, block_size):
        stop = min(start + block_size, n_query)
        relevant = query_groups[start:stop, None] == gallery_groups[None, :]  # (B, Ng)
        in_order = _relevance_in_ranking_order(_block_scores(query[start:stop], unique, inverse), relevant)
        rows, positions = np.nonzero(in_order)  # (R,), positions 0-based
        n_relevant = np.bincount(rows, minlength=stop - start)  # (B,)
        row_start = np.concatenate(([0], np.cumsum(n_relevant)[:-1]))  # (B,)
        hits = np.arange(rows.shape[0]) - row_start[rows] + 1  # (R,) relevant items up to here
        rank[start:stop] = positions[row_start] + 1
        precision_sum = np.bincount(rows, weights=hits / (positions + 1), minlength=stop - start)
        ap[start:stop] = precision_sum / n_relevant
    return {"rank": rank, "ap": ap}


def retrieval_metrics(
    ranks: np.ndarray, ap: np.ndarray, prefix: str = "", ks: Sequence[int] = DEFAULT_KS
) -> dict[str, float]:
    """Aggregate per-query ranks and APs.

    Args:
        ranks: [N] 1-based rank of the first relevant item.
        ap: [N] average precision per query.
        prefix: prepended to every key (e.g. "m2t_").
        ks: cut-offs for recall.

    Returns:
        f"{prefix}R@{k}" (fraction of queries with rank <= k) for each k,
        f"{prefix}median_rank", f"{prefix}mean_rank", f"{prefix}mAP".
    """
    ranks = np.asarray(ranks)
    ap = np.asarray(ap, dtype=np.float64)
    if ranks.ndim != 1 or ranks.shape != ap.shape:
        raise ValueError(f"ranks and ap must be 1-D of equal length, got {ranks.shape} and {ap.shape}")
    if ranks.size == 0:
        raise ValueError("ranks is empty")
    ks = tuple(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
        raise ValueError(f"ks must be positive ints, got {ks!r}")
    metrics = {f"{prefix}R@{k}": float(np.mean(ranks <= k)) for k in ks}
    metrics[f"{prefix}median_rank"] = float(np.median(ranks))
    metrics[f"{prefix}mean_rank"] = float(np.mean(ranks))
    metrics[f"{prefix}mAP"] = float(np.mean(ap))
    return metrics


def bidirectional_retrieval(
    modality: np.ndarray,
    text: np.ndarray,
    groups: np.ndarray,
    block_size: int = 2048,
    ks: Sequence[int] = DEFAULT_KS,
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Sensor->text ("m2t_") and text->sensor ("t2m_") retrieval over one paired set.

    Args:
        modality: [N, D] L2-normalised sensor embeddings.
        text: [N, D] L2-normalised text embeddings, paired row by row with modality.
        groups: [N] int group ids; items with the same id are relevant to each other.
        block_size: query rows scored at a time.
        ks: recall cut-offs.

    Returns:
        metrics: retrieval_metrics of both directions, keys prefixed "m2t_" and "t2m_".
        per_example: [N] arrays "m2t_rank", "t2m_rank" (int64), "m2t_ap", "t2m_ap" and
            f"{d}_r{k}" for each direction d and k in ks (0/1 float64).
    """
    modality = np.asarray(modality)
    text = np.asarray(text)
    if modality.ndim != 2 or modality.shape != text.shape:
        raise ValueError(
            f"modality and text must both be [N, D] with equal shapes, got {modality.shape} and {text.shape}"
        )
    groups = _as_groups(groups, modality.shape[0], "groups")
    metrics: dict[str, float] = {}
    per_example: dict[str, np.ndarray] = {}
    for direction, query, gallery in (("m2t", modality, text), ("t2m", text, modality)):
        result = retrieval_ranks(query, gallery, groups, groups, block_size=block_size)
        metrics.update(retrieval_metrics(result["rank"], result["ap"], prefix=f"{direction}_", ks=ks))
        per_example[f"{direction}_rank"] = result["rank"]
        per_example[f"{direction}_ap"] = result["ap"]
        for k in ks:
            per_example[f"{direction}_r{k}"] = (result["rank"] <= k).astype(np.float64)
    return metrics, per_example


def zero_shot_accuracy(
    modality: np.ndarray, class_text: np.ndarray, labels: np.ndarray
) -> tuple[float, np.ndarray]:
    """Classify each embedding as the class whose text embedding scores highest.

    Args:
        modality: [N, D] L2-normalised sensor embeddings.
        class_text: [K, D] one L2-normalised text embedding per class.
        labels: [N] int class index in [0, K), or -1 for unknown (ignored).

    Returns:
        accuracy over examples with a known label (NaN if there are none), and
        correct: [N] float64, 1.0/0.0 per example, NaN where the label is unknown.
        Ties go to the lowest class index.
    """
    modality = _as_embeddings(modality, "modality")
    class_text = _as_embeddings(class_text, "class_text")
    if modality.shape[1] != class_text.shape[1]:
        raise ValueError(f"modality dim {modality.shape[1]} != class_text dim {class_text.shape[1]}")
    n_classes = class_text.shape[0]
    if n_classes == 0:
        raise ValueError("class_text has no classes")
    labels = _as_groups(labels, modality.shape[0], "labels")
    if labels.size and (labels.min() < -1 or labels.max() >= n_classes):
        raise ValueError(f"labels must be in [-1, {n_classes}), got range [{labels.min()}, {labels.max()}]")

    unique, inverse = _unique_rows(class_text)
    predicted = np.argmax(_block_scores(modality, unique, inverse), axis=1)  # (N,)
    known = labels >= 0
    correct = np.full(labels.shape[0], np.nan)
    correct[known] = (predicted[known] == labels[known]).astype(np.float64)
    accuracy = float(np.mean(correct[known])) if known.any() else float("nan")
    return accuracy, correct


def chance_recall_at_1(groups: np.ndarray) -> float:
    """Expected R@1 of a uniformly random ranking of the set against itself.

    groups: [N] int group ids. Returns mean over items of (#items in its group) / N.
    """
    groups = np.asarray(groups)
    if groups.ndim != 1 or groups.size == 0:
        raise ValueError(f"groups must be a non-empty 1-D array, got shape {groups.shape}")
    _, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    return float(np.mean(counts[inverse.reshape(-1)]) / groups.size)
