"""Captioning metrics: BLEU-1..4, ROUGE-L and CIDEr-D through pycocoevalcap, one function each.

    scores = caption_scores(predictions, references)   # {"bleu_4": 31.2, ...}, per-example arrays

Every value is on the 0-100 scale papers and the COCO leaderboard use (CIDEr-D can pass 100).
Texts are lower-cased and split into words by a plain regex (pycocoevalcap's own tokenizer needs
Java; for BLEU, ROUGE-L and CIDEr-D the two agree on plain captions). CIDEr-D's document frequencies
come from the references of the evaluated set, as in the COCO evaluation.

- `bleu_n` is corpus BLEU (n-gram counts pooled over the set, brevity penalty of the whole set);
  its per-example column `bleu_4` holds sentence BLEU-4, whose mean is not the corpus value.
- `rouge_l` and `cider_d` are the means of their per-example columns.
- METEOR needs a Java runtime (`meteor_available()`); without one it is reported as unavailable
  with the reason, never as 0. SPICE (and SPIDEr) download Stanford CoreNLP at run time, which
  modalign never does: they are not computed.
"""

from __future__ import annotations

import re
import shutil

import numpy as np

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def tokenize(text: str) -> str:
    return " ".join(_WORD.findall(text.lower()))


def _inputs(predictions: list[str], references: list[list[str]]):
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference lists")
    # an empty prediction scores 0; pycocoevalcap needs at least one word to count, so give it one
    # that no reference can contain
    gts = {i: [tokenize(r) for r in refs] or [""] for i, refs in enumerate(references)}
    res = {i: [tokenize(p) or "<empty>"] for i, p in enumerate(predictions)}
    return gts, res


def bleu(predictions: list[str], references: list[list[str]]) -> tuple[dict[str, float], np.ndarray]:
    """-> ({bleu_1..bleu_4: corpus BLEU ×100}, per-example sentence BLEU-4 ×100)."""
    from pycocoevalcap.bleu.bleu import Bleu

    if not predictions:
        return {f"bleu_{n}": float("nan") for n in range(1, 5)}, np.zeros(0)
    gts, res = _inputs(predictions, references)
    corpus, per = Bleu(4).compute_score(gts, res, verbose=0)
    return ({f"bleu_{n + 1}": 100.0 * float(v) for n, v in enumerate(corpus)},
            100.0 * np.asarray(per[3], dtype=np.float64))


def rouge_l(predictions: list[str], references: list[list[str]]) -> np.ndarray:
    """Per-example ROUGE-L (F-measure, beta 1.2) ×100."""
    from pycocoevalcap.rouge.rouge import Rouge

    if not predictions:
        return np.zeros(0)
    gts, res = _inputs(predictions, references)
    _, per = Rouge().compute_score(gts, res)
    return 100.0 * np.asarray(per, dtype=np.float64)


def cider_d(predictions: list[str], references: list[list[str]]) -> np.ndarray:
    """Per-example CIDEr-D ×100 (document frequencies from these references)."""
    from pycocoevalcap.cider.cider import Cider

    if not predictions:
        return np.zeros(0)
    gts, res = _inputs(predictions, references)
    _, per = Cider().compute_score(gts, res)
    return 100.0 * np.asarray(per, dtype=np.float64)


def meteor_available() -> tuple[bool, str]:
    """-> (available, reason when not)."""
    if shutil.which("java") is None:
        return False, "METEOR needs a Java runtime (e.g. the system package default-jre-headless); none on PATH"
    return True, ""


def caption_scores(predictions: list[str], references: list[list[str]]) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """-> (summary metrics, per-example columns) for one evaluated split."""
    corpus, bleu4 = bleu(predictions, references)
    rouge = rouge_l(predictions, references)
    cider = cider_d(predictions, references)
    metrics = dict(corpus)
    metrics["rouge_l"] = float(rouge.mean()) if len(rouge) else float("nan")
    metrics["cider_d"] = float(cider.mean()) if len(cider) else float("nan")
    lengths = np.array([len(tokenize(p).split()) for p in predictions], dtype=np.float64)
    metrics["pred_words"] = float(lengths.mean()) if len(lengths) else float("nan")
    metrics["distinct_preds"] = float(len(set(predictions)) / max(1, len(predictions)))
    return metrics, {"cider_d": cider, "bleu_4": bleu4, "rouge_l": rouge}
