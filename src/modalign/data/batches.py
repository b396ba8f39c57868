"""Batches for training and evaluation, held in memory as tensors.

The order of training batches is a pure function of (seed, step): epoch e's permutation and its
caption choices come from a generator seeded with (seed, e). A resumed run therefore sees exactly
the batches the uninterrupted run would have seen, with no sampler state to save.
"""

from __future__ import annotations

import numpy as np
import torch

from modalign.data.paired import PairedData


class PairedTensors:
    """One split as tensors, plus the index of each sample's captions in a text-embedding table.

    caption_rows [N, K] int64: row in the text table of caption k of sample i (-1 = no such caption),
    caption_groups: the caption table's group id per row (identical text = same group).
    """

    def __init__(self, data: PairedData, caption_rows: np.ndarray, text_table: torch.Tensor,
                 caption_groups: torch.Tensor):
        n, t = len(data), data.seq_len
        self.n, self.seq_len = n, t
        self.ids = data.ids
        self.tokens_id = torch.as_tensor(data.tokens_id if data.tokens_id is not None
                                         else np.zeros((n, t), np.int64))
        self.tokens_cont = (torch.as_tensor(data.tokens_cont) if data.tokens_cont is not None
                            else torch.zeros(n, t, 0))
        self.globals = torch.as_tensor(data.globals) if data.globals is not None else torch.zeros(n, 0)
        lengths = torch.as_tensor(data.lengths)
        self.lengths = lengths
        self.mask = torch.arange(t)[None, :] < lengths[:, None]  # (N, T)
        self.labels = torch.as_tensor(data.labels) if data.labels is not None else None
        self.caption_rows = torch.as_tensor(caption_rows)  # (N, K)
        self.n_captions = (self.caption_rows >= 0).sum(1)  # (N,)
        self.text_table = text_table  # (U, text_dim)
        self.caption_groups = caption_groups  # (U,)

    def batch(self, idx: torch.Tensor, caption_k: torch.Tensor | None = None) -> dict:
        """idx (B,) sample indices; caption_k (B,) which caption of each (default: the first)."""
        k = caption_k if caption_k is not None else torch.zeros_like(idx)
        rows = self.caption_rows[idx, k]
        # cut the columns that are padding in every sample of the batch: the demo's windows use 24 of
        # 64 positions on average, and a batch's longest about 55, so this saves ~15% of each step
        t = int(self.lengths[idx].max())
        return {
            "index": idx,
            "tokens_id": self.tokens_id[idx, :t],
            "tokens_cont": self.tokens_cont[idx, :t],
            "globals": self.globals[idx],
            "mask": self.mask[idx, :t],
            "text": self.text_table[rows],
            "groups": self.caption_groups[rows],
        }

    def eval_batches(self, batch_size: int):
        for start in range(0, self.n, batch_size):
            yield self.batch(torch.arange(start, min(start + batch_size, self.n)))


class EpochSampler:
    """Shuffled batches without replacement; caption paraphrase drawn per sample per epoch."""

    def __init__(self, data: PairedTensors, batch_size: int, seed: int, accumulate: int = 1,
                 shard: slice | None = None, token_noise: bool = False):
        self.data, self.batch_size, self.seed = data, min(batch_size, data.n), seed
        self.shard = shard  # distributed: this rank's slice of every global batch (None = all of it)
        # per-token uniform values for the masked-modeling mask, drawn for the global batch from
        # (seed, step): the same positions are hidden whatever the number of ranks
        self.token_noise = token_noise
        self.accumulate = accumulate  # micro-batches per optimizer step
        self.steps_per_epoch = data.n // self.batch_size  # micro-batches; the ragged last one is dropped
        self._epoch, self._perm, self._k = -1, None, None

    def epoch_of(self, step: int) -> int:
        """The epoch of optimizer step `step`."""
        return step * self.accumulate // self.steps_per_epoch

    def batch(self, micro_step: int) -> dict:
        epoch, pos = divmod(micro_step, self.steps_per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm = torch.randperm(self.data.n, generator=g)
            u = torch.rand(self.data.n, generator=g)
            self._k = (u * self.data.n_captions).long()  # (N,) uniform over each sample's captions
            self._epoch = epoch
        idx = self._perm[pos * self.batch_size:(pos + 1) * self.batch_size]  # the global batch
        noise = None
        if self.token_noise:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + micro_step)
            noise = torch.rand(len(idx), self.data.seq_len, generator=g)  # (B_global, T)
        if self.shard is not None:
            idx = idx[self.shard]  # every rank draws the same global batch and keeps its own rows
            noise = noise[self.shard] if noise is not None else None
        batch = self.data.batch(idx, self._k[idx])
        if noise is not None:
            batch["token_noise"] = noise[:, : batch["mask"].shape[1]]
        return batch
