"""The metric registry: for every metric modalign records, whether higher or lower is better, the
facts/scores.parquet column whose mean over examples it is, whether it is a headline metric of its
recipe, and its display name. Report, compare, criteria, runs, variants and the sweep table read
it here; nothing else guesses from a metric's name. No torch.

Names. A metric is recorded as `<split>/<leaf>` in metrics.jsonl and summary.json (`test/m2t_R@1`);
a leaf may carry a prefix: the relevance protocol when it is not the run's headline one
(`exact_text/m2t_R@1`), or a register count (`registers_2/t2m_mAP`). The registry is keyed by the
leaf's last part; the prefix carries over to the per-example column (`exact_text/m2t_r1`).

    >>> spec("test/exact_text/m2t_R@5").column
    'exact_text/m2t_r5'
    >>> larger_is_better("val/total_loss")
    False
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SPLITS = ("test/", "val/", "train/")


@dataclass(frozen=True)
class MetricSpec:
    name: str  # the leaf as recorded, prefix included (e.g. "exact_text/m2t_R@1")
    direction: str  # "max" | "min" | "none" (a diagnostic with no better side: learning rates, norms)
    column: str | None  # the per-example column whose mean it is; None when it is not a mean over examples
    display: str  # what tables and plots call it

    @property
    def larger_is_better(self) -> bool:
        return self.direction != "min"


# (pattern over the leaf's last part, direction, column template or None, display template).
# First match wins. \1 in templates is the pattern's first group.
_RULES: list[tuple[str, str, str | None, str]] = [
    (r"(m2t|t2m)_R@(\d+)", "max", r"\1_r\2", r"\1 R@\2"),
    (r"(m2t|t2m)_mAP", "max", r"\1_ap", r"\1 mAP"),
    (r"(m2t|t2m)_mean_rank", "min", r"\1_rank", r"\1 mean rank"),
    (r"(m2t|t2m)_median_rank", "min", None, r"\1 median rank"),
    (r"zeroshot_acc", "max", "zeroshot_correct", "zero-shot accuracy"),
    (r"token_acc", "max", "token_acc", "token accuracy"),
    (r"(rec_ce|rec_mse|rec_tokens|rec_globals|total_loss|vq_commit|vq_codebook)", "min", r"\1", r"\1"),
    (r"vq_(perplexity|usage)", "max", None, r"codebook \1"),
    (r"vq_restarted", "none", None, "codes restarted"),
    (r"cider_d", "max", "cider_d", "CIDEr-D"),
    (r"bleu_4", "max", "bleu_4", "BLEU-4"),
    (r"bleu_(\d)", "max", None, r"BLEU-\1"),
    (r"rouge_l", "max", "rouge_l", "ROUGE-L"),
    (r"meteor", "max", None, "METEOR"),
    (r"xe", "min", "xe", "caption cross-entropy"),
    (r"reliance_gap", "max", "reliance_gap", "reliance gap (nats/token)"),
    (r"first_token_jsd", "max", "first_token_jsd", "first-token JSD to the batch mean"),
    (r"ppl_ratio", "min", None, "perplexity after / before"),
    (r"ppl(_before|_after)?", "min", None, r"perplexity\1"),
    (r"exact_match", "max", None, "continuations unchanged"),
    (r"(loss|clip|clip_m2t|clip_t2m|siglip|queue|mlm|reg_rec_\w+)", "min", None, r"\1"),
    (r"temperature", "none", None, "temperature"),
    (r"logit_scale", "none", None, "logit scale"),
    (r"loss_scale", "none", None, "fp16 loss scale"),
    (r"nonfinite_skips", "min", None, "non-finite steps skipped"),
    (r"\w*seconds", "min", None, r"\g<0>"),
]
_COMPILED = [(re.compile(p + r"$"), d, c, s) for p, d, c, s in _RULES]

# The metrics a recipe's tables lead with, the optimized one first.
HEADLINE = {"align": ("m2t_R@1", "t2m_R@1", "zeroshot_acc"),
            "autoencode": ("total_loss", "rec_tokens", "rec_globals"),
            "fuse": ("cider_d", "bleu_4", "rouge_l")}
# What `modalign train` prints after a run: the headline and the secondary protocol's R@1.
PRINTED = {"align": ("m2t_R@1", "t2m_R@1", "zeroshot_acc", "exact_text/m2t_R@1", "exact_text/t2m_R@1"),
           "autoencode": ("total_loss", "rec_tokens", "token_acc", "rec_mse", "rec_globals", "vq_perplexity",
                          "vq_usage")}


def leaf(name: str) -> str:
    """'test/exact_text/m2t_R@1' -> 'exact_text/m2t_R@1' (the split prefix removed)."""
    return name.split("/", 1)[1] if name.startswith(SPLITS) else name


def full_name(name: str) -> str:
    """'m2t_R@1' -> 'test/m2t_R@1'; a name with a split prefix stays as it is."""
    return name if name.startswith(SPLITS) else f"test/{name}"


def spec(name: str) -> MetricSpec:
    """The registry's entry for a metric name (split prefix optional). Unknown names (gradient
    norms, learning rates, a plugin's own terms) have direction "none" and no column."""
    rest = leaf(name)
    prefix, _, last = rest.rpartition("/")
    if prefix.startswith(("grad_norm", "lr")) or last.startswith(("grad_norm", "lr")):
        return MetricSpec(rest, "none", None, rest)
    for pattern, direction, column, display in _COMPILED:
        m = pattern.match(last)
        if m:
            pre = f"{prefix}/" if prefix else ""
            col = pre + m.expand(column) if column is not None else None
            return MetricSpec(rest, direction, col, pre + m.expand(display))
    return MetricSpec(rest, "none", None, rest)


def larger_is_better(name: str) -> bool:
    """True unless the registry says lower is better (losses, errors, ranks, seconds)."""
    return spec(name).larger_is_better


def per_example_column(name: str) -> str | None:
    """The facts/scores.parquet column whose mean over examples is `name`, or None (median rank,
    codebook perplexity, logit scale: not means over examples)."""
    return spec(name).column


def headline(recipe: str | None) -> tuple[str, ...]:
    """The recipe's headline test metrics (leaf names), the default optimized one first."""
    return HEADLINE.get(recipe or "align", HEADLINE["align"])


def default_metric(recipe: str | None) -> str:
    """The metric a sweep or report of this recipe optimizes unless told otherwise (test/...)."""
    return full_name(headline(recipe)[0])


def mode(name: str) -> str:
    """'max' or 'min': the optimization direction of `name` (Hydra sweeps, criteria bands)."""
    return "max" if larger_is_better(name) else "min"
