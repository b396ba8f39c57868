"""Figures of one run, from metrics.jsonl rows and embeddings. matplotlib only, no torch."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(rows: list[dict], split: str) -> dict[str, tuple[list, list]]:
    out: dict[str, tuple[list, list]] = defaultdict(lambda: ([], []))
    for r in rows:
        if r["split"] == split:
            out[r["name"]][0].append(r["step"])
            out[r["name"]][1].append(r["value"])
    return out


def plot_run_curves(rows: list[dict], out_dir: Path) -> list[Path]:
    """loss.png: the train loss terms; metrics.png: validation retrieval metrics over steps."""
    plt = _plt()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    train = _series(rows, "train")
    loss_names = [n for n in train if n == "loss" or n.startswith(("clip", "siglip", "queue", "mlm", "rec_",
                                                                   "vq_commit", "vq_codebook"))]
    if loss_names:
        fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
        for n in loss_names:
            ax[0].plot(*train[n], label=n, lw=1.5 if n == "loss" else 1)
        ax[0].set(xlabel="step", ylabel="loss", title="training loss terms")
        ax[0].legend(fontsize=8)
        if "temperature" in train:
            ax[1].plot(*train["temperature"], color="tab:purple")
            ax[1].set(xlabel="step", ylabel="temperature", title="learned temperature (1 / logit scale)")
        fig.tight_layout()
        fig.savefig(out_dir / "loss.png", dpi=110)
        plt.close(fig)
        written.append(out_dir / "loss.png")
    val = _series(rows, "val")
    if "total_loss" in val:  # a reconstruction run: its validation losses
        fig, ax = plt.subplots(figsize=(7, 4))
        for n in ("total_loss", "rec_tokens", "rec_globals", "rec_ce", "rec_mse"):
            if n in val:
                ax.plot(*val[n], marker="o", ms=3, label=n)
        ax.set(xlabel="step", ylabel="loss", title="validation reconstruction losses", yscale="log")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "metrics.png", dpi=110)
        plt.close(fig)
        written.append(out_dir / "metrics.png")
    if "cider_d" in val:  # a captioning run: its metrics, and the fusion's gates and soft-token norms
        fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
        for n in ("cider_d", "bleu_4", "rouge_l"):
            if n in val:
                ax[0].plot(*val[n], marker="o", ms=3, label=n)
        ax[0].set(xlabel="step", ylabel="x100", title="validation captioning metrics")
        ax[0].legend(fontsize=8)
        gates = [n for n in val if n.startswith("gate/")]
        for n in gates:
            ax[1].plot(*val[n], marker="o", ms=3, label=n.removeprefix("gate/"))
        if "soft_norm_ratio" in val:
            ax[1].plot(*val["soft_norm_ratio"], marker="s", ms=3, color="black", ls="--", label="soft/text norm")
        ax[1].axhline(0, color="#999", lw=0.8)
        ax[1].set(xlabel="step", title="gates and soft-token norm ratio")
        if gates or "soft_norm_ratio" in val:
            ax[1].legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(out_dir / "metrics.png", dpi=110)
        plt.close(fig)
        written.append(out_dir / "metrics.png")
    names = [n for n in val if n.endswith("R@1") or n == "zeroshot_acc"]
    if names:
        fig, ax = plt.subplots(figsize=(7, 4))
        for n in names:
            protocol = n.split("/")[0] if "/" in n else "headline"
            ax.plot(*val[n], marker="o", ms=3, label=n, ls="--" if n.split("/")[-1].startswith("t2m") else "-",
                    color={"headline": "tab:blue", "exact_text": "tab:orange", "same_label": "tab:green",
                           "same_facts": "tab:red"}.get(protocol, "tab:purple") if n != "zeroshot_acc" else "black")
        ax.set(xlabel="step", ylabel="value", title="validation R@1 (solid m2t, dashed t2m) and zero-shot accuracy",
               ylim=(0, 1))
        ax.legend(fontsize=7, ncol=2, loc="center right")
        fig.tight_layout()
        fig.savefig(out_dir / "metrics.png", dpi=110)
        plt.close(fig)
        written.append(out_dir / "metrics.png")
    return written


def plot_similarity(modality: np.ndarray, text: np.ndarray, path: Path, title: str) -> Path:
    """Heatmap of cosine similarities, modality (n, D) rows x text (n, D) columns; the diagonal
    holds the true pairs."""
    plt = _plt()
    s = modality @ text.T  # (n, n)
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    im = ax.imshow(s, cmap="viridis")
    ax.set(xlabel="caption", ylabel="sensor window", title=title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_codebook_usage(counts: np.ndarray, path: Path) -> Path:
    """Bar chart of how often each code was chosen on the evaluated split, most used first.
    counts (K,) int."""
    plt = _plt()
    order = np.sort(counts)[::-1]
    fig, ax = plt.subplots(figsize=(7, 3.4))
    ax.bar(np.arange(len(order)), order, width=1.0, color="tab:blue")
    used = int((counts > 0).sum())
    ax.set(xlabel="code (sorted by use)", ylabel="assignments", yscale="log" if order.max() > 0 else "linear",
           title=f"codebook usage: {used} of {len(counts)} codes used")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_reconstructions(ids, rec_ids, cont, rec_cont, mask, sample_ids, path: Path) -> Path:
    """A few samples, true vs reconstructed: token ids (B, T) as points, continuous channel 0 (B, T, C)
    as lines, over each sample's valid positions (mask (B, T))."""
    plt = _plt()
    n = len(mask)
    fig, axes = plt.subplots(n, 1, figsize=(8, 1.9 * n), squeeze=False)
    for i, ax in enumerate(axes[:, 0]):
        t = np.flatnonzero(mask[i])
        if ids is not None:
            ax.plot(t, ids[i, t], "o", ms=4, label="token id", color="tab:blue")
            ax.plot(t, rec_ids[i, t], "x", ms=5, label="reconstructed id", color="tab:red")
            ax.set_ylabel("id")
        if cont is not None and cont.shape[2] > 0:
            ax2 = ax.twinx() if ids is not None else ax
            ax2.plot(t, cont[i, t, 0], "-", lw=1, color="tab:green", label="feature 0")
            ax2.plot(t, rec_cont[i, t, 0], "--", lw=1, color="tab:orange", label="reconstructed")
        ax.set_title(str(sample_ids[i]), fontsize=9, loc="left")
    axes[0, 0].legend(fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel("position")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
