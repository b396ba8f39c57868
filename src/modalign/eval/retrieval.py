"""Cross-modal retrieval metrics over groups of relevant items, as pure numpy functions.

Two items are relevant to each other iff their group ids are equal (e.g. identical caption,
identical structured facts, same label). Scores are dot products of L2-normalised embeddings,
computed as float32 matmuls.

Ties are broken pessimistically, exactly on the computed scores: an irrelevant item whose score
equals a relevant item's score ranks before it. Identical rows are scored once, so they get
bit-identical scores (BLAS kernels can otherwise round identical columns differently), and a model
that maps everything to one embedding gets the worst possible rank rather than a lucky one.

Two ways to the same ranks and APs:
- `bidirectional_retrieval` (a paired set, both directions) computes the score matrix
  S = modality @ text.T once, in block_size x block_size tiles, and for every query counts the
  gallery items scoring >= each of its relevant items' scores: m2t along the rows of S, t2m along
  the columns. Memory O(block_size² + N x largest group); time about 1.2-1.4x one N x N matmul
  with one relevant item per query (BENCHMARKS.md). Groups larger than MAX_COUNTED_RELEVANT
  (e.g. same-label relevance) go the sorting way instead.
- `retrieval_ranks` (any query and gallery sets) sorts each block of block_size query rows against
  the whole gallery: memory O(block_size x Ng), time O(Nq Ng log Ng). It is also the reference the
  tests hold the counting path to.

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


# The counting path makes up to one compare-and-count pass over the scores per relevant item; a
# pass costs about 0.2 of the matmul and sorting about 8x it (BENCHMARKS.md), so beyond ~32
# relevant items per query sorting is as fast.
MAX_COUNTED_RELEVANT = 32
_HASH_MULTIPLIERS = np.random.default_rng(0x5EED).integers(1, 2**63, size=4096, dtype=np.uint64) | np.uint64(1)


def _dedup(x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Distinct rows of x [N, D] and the index [N] into them (None when all rows are distinct).

    -0.0 and 0.0 count as equal. A 64-bit multiplicative hash of each row's bits rules out duplicates
    in one cheap pass; only when two hashes collide does np.unique(axis=0) settle it exactly."""
    x = x + np.float32(0.0)  # -0.0 -> 0.0
    bits = x.view(np.uint32).astype(np.uint64)  # (N, D)
    multipliers = np.resize(_HASH_MULTIPLIERS, x.shape[1])
    with np.errstate(over="ignore"):
        hashes = (bits * multipliers).sum(axis=1)  # (N,) wraps modulo 2**64
    if np.unique(hashes).shape[0] == x.shape[0]:
        return x, None
    return _unique_rows(x)


def _block_edges(key: np.ndarray, items: np.ndarray, block_size: int) -> np.ndarray:
    """Edges of consecutive blocks of rows, each holding about block_size items (items [P]: how many
    items use each row) and cut where `key` (the rows' non-decreasing group key) changes, when a
    change lies within block_size more rows."""
    n = key.shape[0]
    changes = np.flatnonzero(key[1:] != key[:-1]) + 1
    cumulative = np.cumsum(items)
    edges = [0]
    while edges[-1] < n:
        done = cumulative[edges[-1] - 1] if edges[-1] else 0
        nominal = max(int(np.searchsorted(cumulative, done + block_size)), edges[-1] + 1)
        if nominal >= n:
            edges.append(n)
            break
        i = np.searchsorted(changes, nominal)
        cut = int(changes[i]) if i < changes.shape[0] and changes[i] < nominal + block_size else nominal
        edges.append(cut)
    return np.asarray(edges)


class _Side:
    """One side of the paired set (modality or text) as distinct vectors in tile order.

    vectors [P, D]: the distinct rows, ordered by the first item (in group order) that uses each;
    of_item [N]: each item's row in `vectors`; edges: block edges over the rows; per block the item
    indices whose vector lies in it and their local row (None when the block's rows are the items).
    """

    def __init__(self, x: np.ndarray, item_rank: np.ndarray, item_key: np.ndarray, block_size: int):
        distinct, inverse = _dedup(x)
        n = x.shape[0]
        inverse = np.arange(n) if inverse is None else inverse
        by_rank = np.argsort(item_rank)  # items in group order
        first_vectors, first_at = np.unique(inverse[by_rank], return_index=True)
        order = first_vectors[np.argsort(first_at)]  # distinct vectors by first use in group order
        new_position = np.empty(order.shape[0], dtype=np.int64)
        new_position[order] = np.arange(order.shape[0])
        self.vectors = np.ascontiguousarray(distinct[order])
        self.of_item = new_position[inverse]  # (N,)
        self.distinct = distinct.shape[0] == n
        key = item_key[by_rank[np.sort(first_at)]]  # group key of each vector's first item
        self.edges = _block_edges(key, np.bincount(self.of_item, minlength=order.shape[0]), block_size)
        self.block_of = np.searchsorted(self.edges, np.arange(self.vectors.shape[0]), side="right") - 1
        items_by_vector = np.argsort(self.of_item, kind="stable")
        bounds = np.searchsorted(self.of_item[items_by_vector], self.edges)
        self.items = [items_by_vector[bounds[b]:bounds[b + 1]] for b in range(len(self.edges) - 1)]
        self.local = [None if self.distinct else self.of_item[it] - self.edges[b] for b, it in enumerate(self.items)]

    @property
    def n_blocks(self) -> int:
        return len(self.edges) - 1


def _counted_bidirectional(
    modality: np.ndarray, text: np.ndarray, groups: np.ndarray, block_size: int
) -> dict[str, np.ndarray] | None:
    """m2t and t2m ranks and APs from one score matrix S = modality @ text.T, computed once in tiles.

    For each query and each of its relevant items it counts the gallery items scoring >= that
    relevant item's score; ranks and APs follow from the counts (see `_ranks_from_counts`). The
    relevant scores (thresholds) are read from the tiles that hold them in a first pass; the second
    pass computes every tile again with the same call, checks it reproduces them bit for bit, and
    counts rows (m2t) and columns (t2m). Returns None when it cannot be exact this way, so the
    caller falls back to sorting: a group larger than MAX_COUNTED_RELEVANT or a BLAS that does not
    reproduce a tile.
    """
    n = groups.shape[0]
    _, group_index, group_size = np.unique(groups, return_inverse=True, return_counts=True)
    group_index = group_index.reshape(-1)
    n_relevant = group_size[group_index]  # (N,) relevant items per query, either direction
    r_max = int(n_relevant.max())
    if r_max > MAX_COUNTED_RELEVANT:
        return None
    by_group = np.argsort(group_index, kind="stable")  # items in group order
    item_rank = np.empty(n, dtype=np.int64)
    item_rank[by_group] = np.arange(n)
    rows = _Side(modality, item_rank, group_index, block_size)
    cols = _Side(text, item_rank, group_index, block_size)

    # Every relevant pair (i, j): same group; k_i = position of j in i's group, k_j = that of i.
    start = np.concatenate(([0], np.cumsum(group_size)[:-1]))[group_index[by_group]]  # (N,) group start, group order
    size = n_relevant[by_group]
    pair_i = np.repeat(by_group, size)  # (R,)
    k = np.arange(pair_i.shape[0]) - np.repeat(np.cumsum(size) - size, size)  # (R,) 0..size-1
    pair_j = by_group[np.repeat(start, size) + k]
    k_i = k  # j is the k-th member of i's group
    k_j = item_rank[pair_i] - start[item_rank[pair_i]]  # i's position in its group

    p, q = rows.of_item[pair_i], cols.of_item[pair_j]
    tile_of_pair = rows.block_of[p] * cols.n_blocks + cols.block_of[q]
    pair_order = np.argsort(tile_of_pair, kind="stable")
    tiles, tile_start = np.unique(tile_of_pair[pair_order], return_index=True)
    tile_stop = np.append(tile_start[1:], pair_order.shape[0])
    relevant_pairs = {int(t): pair_order[a:b] for t, a, b in zip(tiles, tile_start, tile_stop)}

    buffer = np.empty(block_size * block_size * 4, dtype=np.float32)  # blocks may run to ~2x block_size

    def tile(b: int, c: int) -> np.ndarray:
        r0, r1, c0, c1 = rows.edges[b], rows.edges[b + 1], cols.edges[c], cols.edges[c + 1]
        out = buffer[: (r1 - r0) * (c1 - c0)].reshape(r1 - r0, c1 - c0)
        return np.matmul(rows.vectors[r0:r1], cols.vectors[c0:c1].T, out=out)

    # Each query's relevant scores, ascending, padded with +inf: (N, R_max) rows, (R_max, N) columns.
    row_threshold = np.full((n, r_max), np.inf, dtype=np.float32)
    col_threshold = np.full((r_max, n), np.inf, dtype=np.float32)
    row_count = np.zeros((n, r_max), dtype=np.int64)
    col_count = np.zeros((r_max, n), dtype=np.int64)
    mask = np.empty(block_size * block_size, dtype=np.bool_)

    def count(b: int, c: int, scores: np.ndarray) -> None:
        """Add tile (b, c)'s counts, item by item, in chunks of block_size a side (many items can
        share one distinct vector)."""
        for r0 in range(0, rows.items[b].shape[0], block_size):
            row_items = rows.items[b][r0:r0 + block_size]
            by_row = scores[r0:r0 + block_size] if rows.local[b] is None else scores[rows.local[b][r0:r0 + block_size]]
            r_rows = int(n_relevant[row_items].max())
            row_thresholds = row_threshold[row_items, :r_rows]  # (n_r, r_rows)
            for c0 in range(0, cols.items[c].shape[0], block_size):
                col_items = cols.items[c][c0:c0 + block_size]
                x = by_row[:, c0:c0 + block_size] if cols.local[c] is None else by_row[:, cols.local[c][c0:c0 + block_size]]
                m = mask[: x.size].reshape(x.shape)
                row_count[row_items, :r_rows] += _count_at_least(x, row_thresholds, 1, m)
                r_cols = int(n_relevant[col_items].max())
                col_count[:r_cols, col_items] += _count_at_least(x, col_threshold[:r_cols, col_items].T, 0, m).T

    # First pass: the tiles holding relevant pairs, for their scores. A tile that holds all the
    # relevant pairs of its rows and of its columns (the usual diagonal tile) is counted at once.
    row_block_tiles = np.bincount(tiles // cols.n_blocks, minlength=rows.n_blocks)  # relevant tiles per block
    col_block_tiles = np.bincount(tiles % cols.n_blocks, minlength=cols.n_blocks)
    pair_score = np.empty(pair_i.shape[0], dtype=np.float32)
    done = set()
    for t, idx in relevant_pairs.items():
        b, c = divmod(t, cols.n_blocks)
        scores = tile(b, c)
        pair_score[idx] = scores[p[idx] - rows.edges[b], q[idx] - cols.edges[c]]
        if not np.isfinite(pair_score[idx]).all():
            raise ValueError("a relevant score overflowed float32; are the embeddings L2-normalised?")
        row_threshold[pair_i[idx], k_i[idx]] = pair_score[idx]
        col_threshold[k_j[idx], pair_j[idx]] = pair_score[idx]
        if row_block_tiles[b] == 1 and col_block_tiles[c] == 1:
            row_threshold[rows.items[b]] = np.sort(row_threshold[rows.items[b]], axis=1)
            col_threshold[:, cols.items[c]] = np.sort(col_threshold[:, cols.items[c]], axis=0)
            count(b, c, scores)
            done.add(t)
    row_threshold.sort(axis=1)
    col_threshold.sort(axis=0)

    # Second pass: every other tile, computed again by the same call; a tile with relevant pairs must
    # reproduce their scores bit for bit (else None: the caller sorts instead).
    for b in range(rows.n_blocks):
        for c in range(cols.n_blocks):
            t = b * cols.n_blocks + c
            if t in done:
                continue
            scores = tile(b, c)
            idx = relevant_pairs.get(t)
            if idx is not None and not np.array_equal(
                scores[p[idx] - rows.edges[b], q[idx] - cols.edges[c]], pair_score[idx]
            ):
                return None
            count(b, c, scores)
    m2t = _ranks_from_counts(row_threshold, row_count)
    t2m = _ranks_from_counts(col_threshold.T, col_count.T)
    return {"m2t_rank": m2t[0], "m2t_ap": m2t[1], "t2m_rank": t2m[0], "t2m_ap": t2m[1]}


def _count_at_least(x: np.ndarray, thresholds: np.ndarray, axis: int, mask: np.ndarray) -> np.ndarray:
    """How many scores of each row (axis=1) or column (axis=0) of x are >= each of its thresholds.

    x [A, B] float32; thresholds [A or B, R], each line ascending and +inf padded (a +inf threshold
    counts 0); mask: a scratch bool array shaped like x. -> [A or B, R] int64. One compare-and-count
    pass per threshold, except that when few scores reach a line's lowest threshold (a model that
    ranks well), the other thresholds are counted among those few alone."""
    def count(line_thresholds: np.ndarray) -> np.ndarray:
        np.greater_equal(x, line_thresholds[:, None] if axis == 1 else line_thresholds[None, :], out=mask)
        return np.add.reduce(mask.view(np.uint8), axis=axis, dtype=np.int32)

    n_lines, r = thresholds.shape
    out = np.empty((n_lines, r), dtype=np.int64)
    out[:, 0] = count(thresholds[:, 0])  # the lowest
    if r == 1:
        return out
    if int(out[:, 0].sum()) > x.size // 16:  # dense: one pass per threshold
        for k in range(1, r):
            out[:, k] = count(thresholds[:, k])
        return out
    flat = np.flatnonzero(mask)  # the scores >= their line's lowest threshold (flat: 2-D nonzero is slow)
    values = x.reshape(-1)[flat] if x.flags.c_contiguous else x[np.divmod(flat, x.shape[1])]
    line = flat // x.shape[1] if axis == 1 else flat % x.shape[1]
    for k in range(1, r):
        out[:, k] = np.bincount(line[values >= thresholds[line, k]], minlength=n_lines)
    return out


def _ranks_from_counts(threshold: np.ndarray, count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rank of the first relevant item and AP from counts.

    threshold [N, R]: each query's relevant scores, +inf padded; count [N, R]: gallery items scoring
    >= each. With the relevant scores sorted descending s_1 >= ... >= s_R, the k-th relevant item
    sits at position k + (irrelevant items scoring >= s_k), ties going to the irrelevant items;
    irrelevant >= s_k = count_k - (relevant >= s_k)."""
    valid = np.isfinite(threshold)
    score = np.where(valid, threshold, -np.inf)
    order = np.argsort(-score, axis=1, kind="stable")
    score = np.take_along_axis(score, order, axis=1)  # (N, R) descending, padding last
    count = np.take_along_axis(count, order, axis=1)
    valid = np.take_along_axis(valid, order, axis=1)
    relevant_at_least = (score[:, None, :] >= score[:, :, None]).sum(axis=2)  # (N, R); padding is -inf
    k = np.arange(1, threshold.shape[1] + 1)
    position = np.where(valid, k[None, :] + count - relevant_at_least, 1)  # (N, R), 1 where padded
    rank = position[:, 0].astype(np.int64)
    ap = np.where(valid, k[None, :] / position, 0.0).sum(axis=1) / valid.sum(axis=1)
    return rank, ap


def bidirectional_retrieval(
    modality: np.ndarray,
    text: np.ndarray,
    groups: np.ndarray,
    block_size: int = 2048,
    ks: Sequence[int] = DEFAULT_KS,
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Sensor->text ("m2t_") and text->sensor ("t2m_") retrieval over one paired set.

    Both directions come from one score matrix, computed in tiles and counted (see the module
    docstring); the same ranks and APs as `retrieval_ranks` per direction.

    Args:
        modality: [N, D] L2-normalised sensor embeddings.
        text: [N, D] L2-normalised text embeddings, paired row by row with modality.
        groups: [N] int group ids; items with the same id are relevant to each other.
        block_size: the side of a score tile (the sorting fallback: query rows at a time).
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
    block_size = _check_block_size(block_size)
    ranks = None
    if modality.shape[0]:
        ranks = _counted_bidirectional(
            _as_embeddings(modality, "modality"), _as_embeddings(text, "text"), groups, block_size
        )
    if ranks is None:
        ranks = {}
        for direction, query, gallery in (("m2t", modality, text), ("t2m", text, modality)):
            result = retrieval_ranks(query, gallery, groups, groups, block_size=block_size)
            ranks[f"{direction}_rank"], ranks[f"{direction}_ap"] = result["rank"], result["ap"]
    metrics: dict[str, float] = {}
    per_example: dict[str, np.ndarray] = {}
    for direction in ("m2t", "t2m"):
        rank, ap = ranks[f"{direction}_rank"], ranks[f"{direction}_ap"]
        metrics.update(retrieval_metrics(rank, ap, prefix=f"{direction}_", ks=ks))
        per_example[f"{direction}_rank"] = rank
        per_example[f"{direction}_ap"] = ap
        for k in ks:
            per_example[f"{direction}_r{k}"] = (rank <= k).astype(np.float64)
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
