"""Patches of consecutive time steps as the encoder's tokens (PatchTST-style).

A long continuous series (audio frames, IMU at 50-100 Hz, current signatures) as one token per step
makes attention cost grow with the length squared and gives each token one sample's worth of
information. With `encoder.patch_size=P` (and `encoder.patch_stride=S`, default P), windows of P
steps x C channels become one token each, embedded by the encoder's linear map of continuous
features:

    tokens_cont (B, T, C), mask (B, T)  ->  patches (B, N, P * (C + 1)), patch mask (B, N)

with N = 1 + ceil((T - P) / S) (1 when T <= P). Each step of a patch carries its C values and a
validity flag (1 at a real step, 0 at padding), so a partial last patch, padded with zeros to P
steps, is told apart from a patch of real zeros; a patch is valid when any of its steps is.
`revin=True` first normalizes every series, per channel, by the mean and standard deviation of its
valid steps (RevIN's instance normalization with its learnable per-channel affine), which removes
each series' level and scale.

`auto_patch_size` is how `encoder.patch_size=auto` is chosen (docs/data.md says why).
"""

from __future__ import annotations

import math

import torch
from torch import nn

AUTO_MAX_UNPATCHED = 64  # series up to this long keep one token per step under `auto`
AUTO_TOKENS = 32  # `auto` aims at about this many patches per series


def patch_count(length: int, size: int, stride: int) -> int:
    """Patches of `size` steps every `stride` steps that cover `length` steps (the last may be partial)."""
    if length <= size:
        return 1
    return 1 + math.ceil((length - size) / stride)


def auto_patch_size(seq_len: int, categorical: bool) -> int:
    """`encoder.patch_size=auto`: 0 (one token per step) for categorical tokens or series of at most
    64 steps, else the power of two nearest seq_len / 32, within [2, 64]: about 32 tokens per series,
    where attention over the tokens costs little next to the rest of the step."""
    if categorical or seq_len <= AUTO_MAX_UNPATCHED:
        return 0
    return int(min(64, max(2, 2 ** round(math.log2(seq_len / AUTO_TOKENS)))))


class Patching(nn.Module):
    """(B, T, C) steps -> (B, N, P * (C + 1)) patches, and the step mask -> the patch mask."""

    def __init__(self, size: int, stride: int, channels: int, revin: bool = False, eps: float = 1e-5):
        super().__init__()
        if size < 1 or not 1 <= stride <= size:
            raise ValueError(f"patch size {size} and stride {stride}: need 1 <= stride <= size")
        self.size, self.stride, self.channels, self.eps = size, stride, channels, eps
        self.revin = revin
        if revin:  # RevIN's learnable affine, per channel, applied after the instance normalization
            self.affine_weight = nn.Parameter(torch.ones(channels))
            self.affine_bias = nn.Parameter(torch.zeros(channels))

    @property
    def features(self) -> int:
        """Features per patch token: C values and a validity flag for each of its P steps."""
        return self.size * (self.channels + 1)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        """Pad dim 1 (time) with zeros so the last patch is whole."""
        length = x.shape[1]
        n = patch_count(length, self.size, self.stride)
        extra = (n - 1) * self.stride + self.size - length
        if extra == 0:
            return x
        pad = torch.zeros(x.shape[0], extra, *x.shape[2:], dtype=x.dtype, device=x.device)
        return torch.cat([x, pad], dim=1)

    def _windows(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) -> (B, N, P, ...) windows of the padded series."""
        w = self._pad(x).unfold(1, self.size, self.stride)  # (B, N, ..., P)
        return w.movedim(-1, 2)

    def mask(self, mask: torch.Tensor) -> torch.Tensor:
        """(B, T) step mask -> (B, N) patch mask: a patch is valid when any of its steps is."""
        return self._windows(mask).any(dim=2)

    def normalize(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """RevIN: each series' channels to zero mean and unit variance over its valid steps (then
        the learnable affine); padded steps stay zero. Without revin: x with padding zeroed."""
        m = mask[:, :, None].to(x.dtype)  # (B, T, 1)
        x = x * m
        if not self.revin:
            return x
        count = m.sum(1, keepdim=True).clamp_min(1.0)  # (B, 1, 1)
        mean = x.sum(1, keepdim=True) / count
        var = (((x - mean) * m) ** 2).sum(1, keepdim=True) / count
        x = (x - mean) / torch.sqrt(var + self.eps)
        return (x * self.affine_weight + self.affine_bias) * m

    def targets(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B, N, P * C): what masked modeling reconstructs for each patch (the values
        the encoder sees, without the validity flags; zeros at padded steps)."""
        w = self._windows(self.normalize(x, mask))  # (B, N, P, C)
        return w.reshape(w.shape[0], w.shape[1], -1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (patches (B, N, P * (C + 1)), patch mask (B, N))."""
        valid = mask[:, :, None].to(x.dtype)
        steps = torch.cat([self.normalize(x, mask), valid], dim=-1)  # (B, T, C + 1)
        w = self._windows(steps)  # (B, N, P, C + 1)
        return w.reshape(w.shape[0], w.shape[1], -1), self.mask(mask)
