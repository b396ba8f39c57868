"""Batches for training and evaluation: from tensors in memory, or gathered from disk by rows.

The order of training batches is a pure function of (seed, step): epoch e's permutation and its
caption choices come from a generator seeded with (seed, e). A resumed run therefore sees exactly
the batches the uninterrupted run would have seen, with no sampler state to save. Because the
order is known ahead, data that stays on disk (DiskArray) is read a few steps ahead, bounded to
that many batches: rows stored contiguously (.npy, uncompressed HDF5) by asking the kernel to read
them into the page cache (posix_fadvise), so no thread of ours takes CPU from the training step;
other backends (compressed HDF5, Parquet) by one background thread (`Prefetcher`).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import numpy as np
import torch

from modalign.data.arrays import gather, is_lazy
from modalign.data.paired import PairedData

PREFETCH = 4  # batches read ahead when the data stays on disk (data.prefetch)


class PairedTensors:
    """One split as tensors, plus the index of each sample's captions in a text-embedding table.

    caption_rows [N, K] int64: row in the text table of caption k of sample i (-1 = no such caption),
    caption_groups: the caption table's group id per row (identical text = same group).
    text_table holds either text vectors (align: [U, D]) or token ids padded with -1 (fuse: [U, L],
    `token_text`): then a batch's text is cut to its own longest caption, and `caption_lengths`
    gives the length a sampler can group batches by.
    features [N, F]: optional per-sample features computed ahead (a frozen encoder's), in the batch
    as "features".
    """

    def __init__(self, data: PairedData, caption_rows: np.ndarray, text_table: torch.Tensor,
                 caption_groups: torch.Tensor, token_text: bool = False, features: torch.Tensor | None = None):
        n, t = len(data), data.seq_len
        self.n, self.seq_len = n, t
        self.ids = data.ids
        self.lazy = data.lazy  # some arrays stay on disk: batches gather their rows
        self.prefetch = int(data.meta.get("prefetch", PREFETCH)) if self.lazy else 0
        self._disk = [a for a in (data.tokens_id, data.tokens_cont, data.globals) if is_lazy(a)]
        self.kernel_readahead = bool(self._disk) and all(a.can_advise for a in self._disk)

        def held(a):  # None (absent: zeros per batch), a DiskArray, or a tensor
            return None if a is None else a if is_lazy(a) else torch.as_tensor(a)

        self.tokens_id, self.tokens_cont, self.globals = held(data.tokens_id), held(data.tokens_cont), held(data.globals)
        self.lengths = torch.as_tensor(data.lengths)
        self.labels = torch.as_tensor(data.labels) if data.labels is not None else None
        self.caption_rows = torch.as_tensor(caption_rows)  # (N, K)
        self.n_captions = (self.caption_rows >= 0).sum(1)  # (N,)
        self.text_table = text_table  # (U, text_dim)
        self.caption_groups = caption_groups  # (U,)
        self.token_text = token_text
        self.text_lengths = (text_table >= 0).sum(1) if token_text else None  # (U,) tokens per caption
        self.features = features  # (N, F) or None

    def caption_lengths(self, idx: torch.Tensor, caption_k: torch.Tensor) -> torch.Tensor | None:
        """(B,) token lengths of caption k of samples idx (None when the text is not token ids)."""
        if self.text_lengths is None:
            return None
        return self.text_lengths[self.caption_rows[idx, caption_k]]

    def batch(self, idx: torch.Tensor, caption_k: torch.Tensor | None = None) -> dict:
        """idx (B,) sample indices; caption_k (B,) which caption of each (default: the first)."""
        k = caption_k if caption_k is not None else torch.zeros_like(idx)
        rows = self.caption_rows[idx, k]
        # cut the columns that are padding in every sample of the batch: the demo's windows use 24 of
        # 64 positions on average, and a batch's longest about 55, so this saves ~15% of each step
        lengths = self.lengths[idx]
        t = int(lengths.max())
        b = len(idx)
        text = self.text_table[rows]
        if self.token_text:  # token ids padded with -1: pad to this batch's longest caption only
            text = text[:, : int(self.text_lengths[rows].max())]
        out = {
            "index": idx,
            "tokens_id": self._rows(self.tokens_id, idx, t) if self.tokens_id is not None
            else torch.zeros(b, t, dtype=torch.int64),
            "tokens_cont": self._rows(self.tokens_cont, idx, t) if self.tokens_cont is not None
            else torch.zeros(b, t, 0),
            "globals": self._rows(self.globals, idx) if self.globals is not None else torch.zeros(b, 0),
            "mask": torch.arange(t)[None, :] < lengths[:, None],  # (B, t)
            "text": text,
            "groups": self.caption_groups[rows],
        }
        if self.features is not None:
            out["features"] = self.features[idx]
        return out

    def advise(self, idx: torch.Tensor) -> None:
        """The rows of a coming batch: the kernel starts reading them (kernel_readahead only)."""
        for a in self._disk:
            a.advise(idx.numpy())

    @staticmethod
    def _rows(a, idx: torch.Tensor, t: int | None = None) -> torch.Tensor:
        if is_lazy(a):
            rows = torch.from_numpy(gather(a, idx.numpy()))
            return rows[:, :t].contiguous() if t is not None else rows
        return a[idx, :t] if t is not None else a[idx]

    def eval_batches(self, batch_size: int):
        for start in range(0, self.n, batch_size):
            yield self.batch(torch.arange(start, min(start + batch_size, self.n)))


class EpochSampler:
    """Shuffled batches without replacement; caption paraphrase drawn per sample per epoch.

    bucket > 0 (token captions only): each epoch's order is cut into groups of `bucket` batches, each
    group sorted by caption length and cut into batches, and the batches shuffled, so a batch pads
    to little more than its own captions (transformers' `group_by_length`, megabatches)."""

    def __init__(self, data: PairedTensors, batch_size: int, seed: int, accumulate: int = 1,
                 shard: slice | None = None, token_noise: bool = False, bucket: int = 0):
        from modalign.errors import UserError

        if bucket and data.text_lengths is None:
            raise UserError(f"config: 'trainer.bucket_by_length'={bucket} groups batches by caption length in "
                            f"tokens, which only the fuse recipe has (set it to 0)")
        self.bucket = bucket
        self.data, self.batch_size, self.seed = data, min(batch_size, data.n), seed
        self.shard = shard  # distributed: this rank's slice of every global batch (None = all of it)
        # per-token uniform values for the masked-modeling mask, drawn for the global batch from
        # (seed, step): the same positions are hidden whatever the number of ranks
        self.token_noise = token_noise
        self.accumulate = accumulate  # micro-batches per optimizer step
        self.steps_per_epoch = data.n // self.batch_size  # micro-batches; the ragged last one is dropped
        self._epochs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # epoch -> (permutation, caption k)
        # data on disk: the next `prefetch` batches are read ahead while this one trains
        self._ahead = None
        self._advised = -1  # kernel read-ahead: the last micro-step whose rows were advised
        if data.prefetch > 0 and not data.kernel_readahead:
            self._ahead = Prefetcher(self._batch, data.prefetch)

    def close(self) -> None:
        if self._ahead is not None:
            self._ahead.close()

    def epoch_of(self, step: int) -> int:
        """The epoch of optimizer step `step`."""
        return step * self.accumulate // self.steps_per_epoch

    def batch(self, micro_step: int) -> dict:
        """The batch of micro-step `micro_step` (the same whether or not it was read ahead)."""
        if self._ahead is not None:
            return self._ahead.get(micro_step)
        if self.data.kernel_readahead and self.data.prefetch > 0:
            last = micro_step + self.data.prefetch
            # in order, only the newest step is new; after a jump, every step up to `last`
            start = self._advised + 1 if micro_step <= self._advised <= last else micro_step + 1
            for s in range(start, last + 1):
                self.data.advise(self._index(s))
            self._advised = last
        return self._batch(micro_step)

    def _epoch_state(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(permutation, caption index per sample) of an epoch; the three nearest epochs are kept
        (reading ahead may reach into the next one)."""
        state = self._epochs.get(epoch)
        if state is None:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            perm = torch.randperm(self.data.n, generator=g)
            u = torch.rand(self.data.n, generator=g)
            k = (u * self.data.n_captions).long()  # k uniform over each sample's captions
            if self.bucket:
                perm = self._by_length(perm, k, g)
            state = (perm, k)
            self._epochs[epoch] = state
            for e in sorted(self._epochs, key=lambda e: abs(e - epoch), reverse=True)[: max(0, len(self._epochs) - 3)]:
                del self._epochs[e]
        return state

    def _by_length(self, perm: torch.Tensor, k: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """perm (N,) -> the same samples with each group of `bucket` batches sorted by caption
        length (longest first) and the epoch's batches in a shuffled order."""
        bs, steps = self.batch_size, self.steps_per_epoch
        order, rest = perm[: steps * bs], perm[steps * bs:]
        lengths = self.data.caption_lengths(order, k[order])
        group = self.bucket * bs
        parts = []
        for start in range(0, len(order), group):
            chunk = order[start:start + group]
            parts.append(chunk[torch.sort(lengths[start:start + group], descending=True, stable=True).indices])
        batches = torch.cat(parts).view(steps, bs)
        return torch.cat([batches[torch.randperm(steps, generator=g)].flatten(), rest])

    def _index(self, micro_step: int) -> torch.Tensor:
        """The sample indices of a micro-step's batch (this rank's share under torchrun)."""
        epoch, pos = divmod(micro_step, self.steps_per_epoch)
        idx = self._epoch_state(epoch)[0][pos * self.batch_size:(pos + 1) * self.batch_size]
        return idx[self.shard] if self.shard is not None else idx

    def _batch(self, micro_step: int) -> dict:
        epoch, pos = divmod(micro_step, self.steps_per_epoch)
        perm, k = self._epoch_state(epoch)
        idx = perm[pos * self.batch_size:(pos + 1) * self.batch_size]  # the global batch
        noise = None
        if self.token_noise:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + micro_step)
            noise = torch.rand(len(idx), self.data.seq_len, generator=g)  # (B_global, T)
        if self.shard is not None:
            idx = idx[self.shard]  # every rank draws the same global batch and keeps its own rows
            noise = noise[self.shard] if noise is not None else None
        batch = self.data.batch(idx, k[idx])
        if noise is not None:
            batch["token_noise"] = noise[:, : batch["mask"].shape[1]]
        return batch


class Prefetcher:
    """fn(step) for the next `depth` steps, computed in order by one background thread.

    get(step) returns fn(step) and queues step+1 .. step+depth; a step that was not queued (the
    first, or a jump) drops the queue. fn only ever runs in the worker thread, so the state it keeps
    (the sampler's epoch permutation) is never shared; at most depth + 1 results are held."""

    def __init__(self, fn: Callable[[int], dict], depth: int):
        self.fn, self.depth = fn, depth
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="modalign-prefetch")
        self.pending: dict[int, Future] = {}

    def get(self, step: int) -> dict:
        fut = self.pending.pop(step, None)
        if fut is None:
            for f in self.pending.values():
                f.cancel()
            self.pending.clear()
            fut = self.pool.submit(self.fn, step)
        for s in [s for s in self.pending if s < step]:
            self.pending.pop(s).cancel()
        for s in range(step + 1, step + 1 + self.depth):
            if s not in self.pending:
                self.pending[s] = self.pool.submit(self.fn, s)
        return fut.result()

    def close(self) -> None:
        for f in self.pending.values():
            f.cancel()
        self.pending.clear()
        self.pool.shutdown(wait=True, cancel_futures=True)
