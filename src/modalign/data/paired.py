"""The paired data model: N modality samples, each with an id, captions, a split, and optional
label and facts. Pure numpy; no torch.

One shape covers sensor event streams, wearable time series, audio frames and collider events:

    tokens_id    [N, T]     int64, categorical token ids, 0 = padding (ids start at 1)
    tokens_cont  [N, T, C]  float32, continuous token features, zeros at padding
    lengths      [N]        int64, valid tokens per sample (1..T); positions >= length are padding
    globals      [N, G]     float32, per-sample global features (optional)

At least one of tokens_id and tokens_cont is present. tokens_id, tokens_cont and globals may be
DiskArrays (modalign.data.arrays: HDF5, Parquet, .npy directories): they stay on disk, splits are
views, and validation and fingerprints stream them in bounded chunks.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from modalign.data import arrays
from modalign.errors import UserError

SPLITS = ("train", "val", "test")


@dataclass
class PairedData:
    name: str
    source: str  # file (or generator) the data came from; named in every error message
    ids: np.ndarray  # [N] str
    split: np.ndarray  # [N] str, one of SPLITS
    lengths: np.ndarray  # [N] int64
    captions: list[list[str]]  # N lists, each with >= 1 caption
    tokens_id: np.ndarray | None = None  # [N, T] int64
    tokens_cont: np.ndarray | None = None  # [N, T, C] float32
    globals: np.ndarray | None = None  # [N, G] float32
    labels: np.ndarray | None = None  # [N] int64, -1 = unknown
    label_names: list[str] | None = None  # [K]
    class_prompts: list[list[str]] | None = None  # [K] lists of prompts for zero-shot classification
    facts: list[dict[str, Any]] | None = None  # N dicts: the structured facts the captions say
    vocab: list[str] | None = None  # names of token ids, index = id (0 = "<pad>")
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def seq_len(self) -> int:
        arr = self.tokens_id if self.tokens_id is not None else self.tokens_cont
        return int(arr.shape[1])

    @property
    def n_cont(self) -> int:
        return 0 if self.tokens_cont is None else int(self.tokens_cont.shape[2])

    @property
    def n_globals(self) -> int:
        return 0 if self.globals is None else int(self.globals.shape[1])

    @property
    def vocab_size(self) -> int:
        if self.tokens_id is None:
            return 0
        if self.vocab is not None:
            return len(self.vocab)
        return arrays.array_max(self.tokens_id) + 1

    @property
    def lazy(self) -> bool:
        """True if some per-sample array stays on disk (read by rows when a batch needs it)."""
        return any(arrays.is_lazy(a) for a in (self.tokens_id, self.tokens_cont, self.globals))

    def subset(self, split: str) -> "PairedData":
        """The samples of one split, in file order."""
        idx = np.flatnonzero(self.split == split)
        return self.take(idx)

    def take(self, idx: np.ndarray) -> "PairedData":
        def pick(a):
            return arrays.take(a, idx)

        return PairedData(
            name=self.name, source=self.source, ids=self.ids[idx], split=self.split[idx],
            lengths=self.lengths[idx], captions=[self.captions[i] for i in idx],
            tokens_id=pick(self.tokens_id), tokens_cont=pick(self.tokens_cont),
            globals=pick(self.globals), labels=pick(self.labels), label_names=self.label_names,
            class_prompts=self.class_prompts,
            facts=None if self.facts is None else [self.facts[i] for i in idx],
            vocab=self.vocab, meta=self.meta,
        )

    def fingerprint(self) -> str:
        """sha256 over sample ids, arrays and captions: equal iff two runs saw the same samples."""
        key = self._disk_key("fingerprint")
        if key is not None:
            cached = arrays.cache_get(key)
            if cached is not None:
                return cached
        h = hashlib.sha256()
        h.update("\n".join(self.ids.tolist()).encode())
        for a in (self.lengths, self.tokens_id, self.tokens_cont, self.globals, self.labels):
            if a is not None:
                for _, chunk in arrays.chunks(a):  # streamed from disk: the same bytes as in memory
                    h.update(np.ascontiguousarray(chunk).tobytes())
        h.update(json.dumps(self.captions, ensure_ascii=False).encode())
        digest = h.hexdigest()
        if key is not None:
            arrays.cache_put(key, digest)
        return digest

    def _disk_key(self, what: str) -> str | None:
        """A cache key for a result over on-disk arrays: their files' identities (path, size, mtime),
        the rows this data holds of them, and the in-memory parts; None if nothing is on disk."""
        if not self.lazy:
            return None
        h = hashlib.sha256(what.encode())
        h.update("\n".join(self.ids.tolist()).encode())
        h.update(np.ascontiguousarray(self.lengths).tobytes())
        if self.labels is not None:
            h.update(np.ascontiguousarray(self.labels).tobytes())
        h.update(json.dumps(self.captions, ensure_ascii=False).encode())
        for a in (self.tokens_id, self.tokens_cont, self.globals):
            if arrays.is_lazy(a):
                h.update(json.dumps(a.identity()).encode())
                h.update(b"all" if a.base_rows is None else a.base_rows.tobytes())
            elif a is not None:
                h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()

    def group_ids(self, protocol: str) -> np.ndarray:
        """[N] int64 relevance groups: two samples are relevant to each other iff equal.

        exact_text  samples whose first captions are identical
        same_facts  samples whose facts are identical (falls back to error if facts are absent)
        same_label  samples with the same label
        """
        if protocol == "exact_text":
            keys = [c[0] for c in self.captions]
        elif protocol == "same_facts":
            if self.facts is None:
                raise UserError(f"{self.source}: protocol 'same_facts' needs per-sample facts, and this data has none")
            keys = [json.dumps(f, sort_keys=True) for f in self.facts]
        elif protocol == "same_label":
            if self.labels is None:
                raise UserError(f"{self.source}: protocol 'same_label' needs labels, and this data has none")
            groups = self.labels.astype(np.int64).copy()
            unknown = groups < 0
            groups[unknown] = groups.max(initial=-1) + 1 + np.arange(int(unknown.sum()))  # each unknown alone
            return groups
        else:
            raise UserError(f"unknown relevance protocol '{protocol}' (expected exact_text, same_facts, same_label)")
        _, inv = np.unique(np.asarray(keys, dtype=object).astype(str), return_inverse=True)
        return inv.astype(np.int64)

    def validate(self) -> "PairedData":
        """Check shapes, values and splits; raise UserError with one line naming the problem."""
        src = self.source
        n = len(self.ids)
        if n == 0:
            raise UserError(f"{src}: no samples")
        if self.tokens_id is None and self.tokens_cont is None:
            raise UserError(f"{src}: neither 'tokens_id' nor 'tokens_cont' is present; give at least one")
        named = {"split": self.split, "lengths": self.lengths, "tokens_id": self.tokens_id,
                 "tokens_cont": self.tokens_cont, "globals": self.globals, "labels": self.labels}
        for key, arr in named.items():
            if arr is not None and len(arr) != n:
                raise UserError(f"{src}: '{key}' has {len(arr)} samples but 'ids' has {n}")
        if len(self.captions) != n:
            raise UserError(f"{src}: {len(self.captions)} caption entries for {n} samples")
        if self.facts is not None and len(self.facts) != n:
            raise UserError(f"{src}: {len(self.facts)} facts entries for {n} samples")

        uniq, counts = np.unique(self.ids, return_counts=True)
        if (counts > 1).any():
            dup = uniq[counts > 1][0]
            raise UserError(f"{src}: duplicate sample id '{dup}' ({counts[counts > 1][0]} times)")

        bad_split = sorted(set(self.split.tolist()) - set(SPLITS))
        if bad_split:
            raise UserError(f"{src}: unknown split name '{bad_split[0]}' (expected one of {', '.join(SPLITS)})")
        sizes = {s: int((self.split == s).sum()) for s in SPLITS}
        for s in SPLITS:
            if sizes[s] == 0:
                shown = ", ".join(f"{k}={v}" for k, v in sizes.items())
                raise UserError(f"{src}: split '{s}' is empty ({shown})")

        if self.tokens_id is not None:
            _check_kind(src, "tokens_id", self.tokens_id, "iu", ndim=2)
        if self.tokens_cont is not None:
            _check_kind(src, "tokens_cont", self.tokens_cont, "fiu", ndim=3)
        if self.globals is not None:
            _check_kind(src, "globals", self.globals, "fiu", ndim=2)
        if self.tokens_id is not None and self.tokens_cont is not None:
            if self.tokens_id.shape[1] != self.tokens_cont.shape[1]:
                raise UserError(f"{src}: 'tokens_id' has T={self.tokens_id.shape[1]} positions but "
                                f"'tokens_cont' has T={self.tokens_cont.shape[1]}")
        _check_kind(src, "lengths", self.lengths, "iu", ndim=1)
        T = self.seq_len
        bad = (self.lengths < 1) | (self.lengths > T)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise UserError(f"{src}: 'lengths' of sample '{self.ids[i]}' is {int(self.lengths[i])}, outside 1..{T}")
        key = self._disk_key("validated")
        cached = arrays.cache_get(key) if key is not None else None
        if cached is None:  # on-disk arrays: one streamed pass per file version
            _check_values(self)
            if key is not None:  # with the largest token id, which vocab_size would stream the ids again for
                ids = self.tokens_id
                cached = "ok" + (f" {ids._stats['max']}" if arrays.is_lazy(ids) and "max" in ids._stats else "")
                arrays.cache_put(key, cached)
        elif arrays.is_lazy(self.tokens_id) and len(cached.split()) == 2:
            self.tokens_id._stats["max"] = int(cached.split()[1])
        if self.tokens_id is not None and self.vocab is not None and arrays.array_max(self.tokens_id) >= len(self.vocab):
            raise UserError(f"{src}: 'tokens_id' has id {arrays.array_max(self.tokens_id)} but the vocabulary "
                            f"has {len(self.vocab)} entries")

        for i, caps in enumerate(self.captions):
            if not isinstance(caps, list) or len(caps) == 0:
                raise UserError(f"{src}: sample '{self.ids[i]}' has no captions")
            for j, c in enumerate(caps):
                if not isinstance(c, str):
                    raise UserError(f"{src}: caption {j} of sample '{self.ids[i]}' is {type(c).__name__}, not a string")
                try:
                    c.encode("utf-8")
                except UnicodeEncodeError as e:  # a lone surrogate ("\ud800" in JSON): not text
                    raise UserError(f"{src}: caption {j} of sample '{self.ids[i]}' is not valid Unicode "
                                    f"(a lone surrogate at character {e.start})") from None
                if not c.strip():
                    raise UserError(f"{src}: caption {j} of sample '{self.ids[i]}' is empty")

        if self.labels is not None:
            _check_kind(src, "labels", self.labels, "iu", ndim=1)
            k = len(self.label_names) if self.label_names is not None else int(self.labels.max()) + 1
            if (self.labels < -1).any() or (self.labels >= k).any():
                raise UserError(f"{src}: 'labels' must lie in -1..{k - 1} (-1 = unknown)")
            if self.class_prompts is not None and len(self.class_prompts) != k:
                raise UserError(f"{src}: {len(self.class_prompts)} class prompt lists for {k} labels")
        return self


def _check_values(data: PairedData) -> None:
    """Finite features, ids >= 1 inside each length: the checks that read every value."""
    src = data.source
    for key in ("tokens_cont", "globals"):
        arr = getattr(data, key)
        if arr is None:
            continue
        for start, chunk in arrays.chunks(arr):
            bad = ~np.isfinite(chunk)
            if bad.any():
                first = np.argwhere(bad)[0]
                total = int(bad.sum()) if not arrays.is_lazy(arr) else None
                count = f"{total} non-finite values" if total is not None else "non-finite values"
                raise UserError(f"{src}: '{key}' has {count} (NaN/Inf), first in sample "
                                f"'{data.ids[start + first[0]]}' at index {tuple(int(i) for i in first[1:])}")
    if data.tokens_id is not None:
        largest = 0
        for start, chunk in arrays.chunks(data.tokens_id):
            largest = max(largest, int(chunk.max()) if chunk.size else 0)
            if (chunk < 0).any():
                i = start + int(np.argwhere(chunk < 0)[0][0])
                raise UserError(f"{src}: 'tokens_id' has negative ids (sample '{data.ids[i]}'); ids start at 1, 0 is padding")
            lengths = data.lengths[start: start + len(chunk)]
            valid = np.arange(chunk.shape[1])[None, :] < lengths[:, None]
            zero = (chunk == 0) & valid
            if zero.any():
                i = start + int(np.argwhere(zero)[0][0])
                raise UserError(f"{src}: 'tokens_id' has id 0 (padding) inside the length of sample "
                                f"'{data.ids[i]}'; ids start at 1")
        if arrays.is_lazy(data.tokens_id):
            data.tokens_id._stats["max"] = largest  # this pass saw every id: array_max need not read them again


def _check_kind(src: str, key: str, arr: np.ndarray, kinds: str, ndim: int) -> None:
    if arr.dtype.kind not in kinds:
        want = {"iu": "integers", "fiu": "numbers"}[kinds]
        raise UserError(f"{src}: '{key}' has dtype {arr.dtype}, expected {want}")
    if arr.ndim != ndim:
        raise UserError(f"{src}: '{key}' has shape {tuple(arr.shape)}, expected {ndim} dimensions")
