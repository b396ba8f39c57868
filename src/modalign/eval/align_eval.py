"""Evaluation of an alignment model on one split: embeddings in, metrics and per-example scores out.

The metrics themselves are the numpy functions of `modalign.eval.retrieval`; this module only
embeds. Metric names: the headline protocol's retrieval metrics are unprefixed (`m2t_R@1`,
`t2m_mAP`, ...); every other protocol's carry its name (`exact_text/m2t_R@1`); zero-shot
classification is `zeroshot_acc`. run.json's eval.protocol says which protocol is the headline.
"""

from __future__ import annotations

import numpy as np
import torch

from modalign.data.batches import PairedTensors
from modalign.eval.retrieval import bidirectional_retrieval, zero_shot_accuracy

PROTOCOL_VERSION = 1  # bump when a metric's definition changes: runs of different versions are not comparable


@torch.no_grad()
def embed_split(model, data: PairedTensors, batch_size: int = 1024,
                device: torch.device | None = None) -> tuple[np.ndarray, np.ndarray]:
    """-> modality (N, D), text (N, D) float32 on the host, L2-normalised; text = each sample's
    first caption. Batches go to `device` (the model's)."""
    from modalign.train.device import to_device

    model.eval()
    ms, ts = [], []
    for batch in data.eval_batches(batch_size):
        batch = to_device(batch, device or torch.device("cpu"))
        ms.append(model.encode_modality(batch).embedding.float().cpu())
        ts.append(model.encode_text(batch["text"]).float().cpu())
    return torch.cat(ms).numpy(), torch.cat(ts).numpy()


@torch.no_grad()
def class_embeddings(model, prompt_text: torch.Tensor, prompt_class: torch.Tensor, n_classes: int) -> np.ndarray:
    """prompt_text (P, text_dim) frozen prompt embeddings, prompt_class (P,) -> (K, D): the
    normalised mean of each class's projected prompts."""
    model.eval()
    z = model.encode_text(prompt_text)  # (P, D)
    out = torch.zeros(n_classes, z.shape[1], device=z.device).index_add_(0, prompt_class.to(z.device), z)
    return torch.nn.functional.normalize(out, dim=-1).cpu().numpy()


def evaluate_embeddings(modality: np.ndarray, text: np.ndarray, groups: dict[str, np.ndarray],
                        headline: str, class_text: np.ndarray | None = None,
                        labels: np.ndarray | None = None) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """modality, text (N, D); groups: protocol -> (N,) relevance groups; headline: the protocol
    whose metrics are unprefixed. -> (metrics, per-example columns)."""
    metrics: dict[str, float] = {}
    per_example: dict[str, np.ndarray] = {}
    for protocol, g in groups.items():
        prefix = "" if protocol == headline else f"{protocol}/"
        m, ex = bidirectional_retrieval(modality, text, g)
        metrics.update({prefix + k: float(v) for k, v in m.items()})
        per_example.update({prefix + k: v for k, v in ex.items()})
    if class_text is not None and labels is not None:
        acc, correct = zero_shot_accuracy(modality, class_text, labels)
        metrics["zeroshot_acc"] = float(acc)
        per_example["zeroshot_correct"] = correct
    return metrics, per_example


@torch.no_grad()
def prefix_retrieval(model, data: PairedTensors, groups: np.ndarray, batch_size: int = 1024,
                     device: torch.device | None = None) -> dict[str, float]:
    """Retrieval with the first k registers of an ordered head kept, k = 1..model.head.n_overlap.
    groups (N,): the headline relevance groups. -> {"registers_{k}/m2t_R@1": ..., ...}: R@1, R@5
    and mAP in both directions for each k."""
    head = model.head
    out: dict[str, float] = {}
    saved = head.keep
    try:
        for k in range(1, head.n_overlap + 1):
            head.keep = k
            m, t = embed_split(model, data, batch_size, device)
            metrics, _ = bidirectional_retrieval(m, t, groups, ks=(1, 5))
            for name in ("m2t_R@1", "m2t_R@5", "m2t_mAP", "t2m_R@1", "t2m_R@5", "t2m_mAP"):
                out[f"registers_{k}/{name}"] = float(metrics[name])
    finally:
        head.keep = saved
    return out
