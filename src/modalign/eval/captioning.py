"""Captioning metrics: BLEU-1..4, ROUGE-L and CIDEr-D through pycocoevalcap, one function each.

    scores = caption_scores(predictions, references)   # {"bleu_4": 31.2, ...}, per-example arrays

Every value is on the 0-100 scale papers and the COCO leaderboard use (CIDEr-D can pass 100).
Texts are lower-cased and split into words by a plain regex (pycocoevalcap's own tokenizer needs
Java; for BLEU, ROUGE-L and CIDEr-D the two agree on plain captions). CIDEr-D's document frequencies
come from the references of the evaluated set, as in the COCO evaluation.

- `bleu_n` is corpus BLEU (n-gram counts pooled over the set, brevity penalty of the whole set);
  its per-example column `bleu_4` holds sentence BLEU-4, whose mean is not the corpus value.
- `rouge_l` and `cider_d` are the means of their per-example columns.
- METEOR 1.5 runs the jar pycocoevalcap ships (with its English paraphrase table) and needs a
  Java runtime (`meteor_available()`); without one it is listed as unavailable with the reason,
  never reported as 0. Its split value is the jar's aggregate, not the mean of its column. SPICE (and SPIDEr) download Stanford CoreNLP at run time, which
  modalign never does: they are not computed.
"""

from __future__ import annotations

import math
import re
import shutil
from collections import Counter

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


def meteor(predictions: list[str], references: list[list[str]]) -> tuple[float, np.ndarray]:
    """-> (METEOR 1.5 over the split ×100, per-example METEOR ×100), through pycocoevalcap's jar
    (Java; the English paraphrase table ships with the package). Raises RuntimeError when Java is
    missing or the jar fails."""
    ok, why = meteor_available()
    if not ok:
        raise RuntimeError(why)
    from pycocoevalcap.meteor.meteor import Meteor

    if not predictions:
        return float("nan"), np.zeros(0)
    gts, res = _inputs(predictions, references)
    scorer = Meteor()
    try:
        corpus, per = scorer.compute_score(gts, res)
    except (OSError, ValueError) as e:
        raise RuntimeError(f"METEOR failed: {e}") from None
    finally:
        del scorer  # stops the Java process
    return 100.0 * float(corpus), 100.0 * np.asarray(per, dtype=np.float64)


def caption_scores(predictions: list[str], references: list[list[str]], with_meteor: bool = False,
                   ) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """-> (summary metrics, per-example columns) for one evaluated split. with_meteor: also METEOR
    (a Java start-up, ~4 s; the caller checks `meteor_available()` first)."""
    corpus, bleu4 = bleu(predictions, references)
    rouge = rouge_l(predictions, references)
    cider = cider_d(predictions, references)
    metrics = dict(corpus)
    metrics["rouge_l"] = float(rouge.mean()) if len(rouge) else float("nan")
    metrics["cider_d"] = float(cider.mean()) if len(cider) else float("nan")
    lengths = np.array([len(tokenize(p).split()) for p in predictions], dtype=np.float64)
    metrics["pred_words"] = float(lengths.mean()) if len(lengths) else float("nan")
    metrics["distinct_preds"] = float(len(set(predictions)) / max(1, len(predictions)))
    per = {"cider_d": cider, "bleu_4": bleu4, "rouge_l": rouge}
    if with_meteor:
        metrics["meteor"], per["meteor"] = meteor(predictions, references)
    return metrics, per


def unavailable(with_meteor: bool) -> dict[str, str]:
    """Metrics a captioning paper might expect that this run did not compute, with the reason."""
    out = {"spice": "SPICE (and SPIDEr) download Stanford CoreNLP at run time; modalign never downloads"}
    ok, why = meteor_available()
    if not with_meteor:
        out["meteor"] = "not requested (eval.meteor=false)"
    elif not ok:
        out["meteor"] = why
    return out


def _ngrams(words: list[str], n: int = 4) -> Counter:
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


class CiderD:
    """CIDEr-D with document frequencies fixed from a reference corpus (the reward of self-critical
    training: a batch's score must not depend on which other samples share the batch). With the
    corpus equal to the scored set's references it equals pycocoevalcap's CIDEr-D (a test).

        reward = CiderD(train_references).scores(predictions, references)   # ×100 per example
    """

    def __init__(self, corpus: list[list[str]], n: int = 4, sigma: float = 6.0):
        self.n, self.sigma = n, sigma
        self.df: Counter = Counter()
        for refs in corpus:
            self.df.update({g for r in refs for g in _ngrams(tokenize(r).split(), n)})
        self.log_docs = math.log(float(max(1, len(corpus))))

    def _vec(self, counts: Counter):
        vec: list[dict] = [{} for _ in range(self.n)]
        norm = [0.0] * self.n
        length = 0
        for g, tf in counts.items():
            k = len(g) - 1
            w = tf * (self.log_docs - math.log(max(1.0, self.df.get(g, 0.0))))
            vec[k][g] = w
            norm[k] += w * w
            if k == 1:  # pycocoevalcap's length counts bigrams; kept for equality with it
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    def score(self, prediction: str, references: list[str]) -> float:
        v, nv, lv = self._vec(_ngrams(tokenize(prediction).split(), self.n))
        total = np.zeros(self.n)
        for r in references:
            vr, nr, lr = self._vec(_ngrams(tokenize(r).split(), self.n))
            penalty = math.exp(-((lv - lr) ** 2) / (2 * self.sigma ** 2))
            for k in range(self.n):
                val = sum(min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, w in v[k].items())
                if nv[k] and nr[k]:
                    val /= nv[k] * nr[k]
                total[k] += val * penalty
        return 100.0 * 10.0 * float(total.mean()) / max(1, len(references))

    def scores(self, predictions: list[str], references: list[list[str]]) -> np.ndarray:
        return np.array([self.score(p, r) for p, r in zip(predictions, references)], dtype=np.float64)
