"""Text embeddings the user computed with a model of their own choice: `text=precomputed`.

    modalign train text=precomputed text.path=EMB.npz

EMB.npz holds two arrays (docs/data.md, "Your own text embeddings"):

    texts       (U,)    str    every caption and class prompt the data uses (extra texts are fine)
    embeddings  (U, D)  float  one vector per text, row i for texts[i]

The file is checked as NPZ data is (one line naming the file and what is wrong: a missing array,
a duplicate text, a non-finite or all-zero row, a text of the data with no vector), and its sha256
is the text side's identity: run.json records it, and `modalign compare` refuses runs whose text
sides differ. No torch here.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from modalign.errors import UserError


def _short(text: str, n: int = 60) -> str:
    return repr(text if len(text) <= n else text[: n - 3] + "...")


def read_precomputed(path: str | Path) -> tuple[dict[str, int], np.ndarray, str]:
    """-> ({text: row}, embeddings (U, D) float32, sha256 of the file), validated."""
    p = Path(path).expanduser()
    where = f"text.path={path}"
    if not p.is_file():
        raise UserError(f"{where}: no such file")
    try:
        with np.load(p, allow_pickle=False) as z:
            missing = [k for k in ("texts", "embeddings") if k not in z.files]
            if missing:
                raise UserError(f"{where}: no '{missing[0]}' array (has: {', '.join(z.files) or 'none'}); "
                                "expected texts (U,) and embeddings (U, D)")
            texts, emb = z["texts"], z["embeddings"]
    except UserError:
        raise
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise UserError(f"{where}: an array holds Python objects; save 'texts' as a str array "
                            "(np.array(texts, dtype=str)) and 'embeddings' as floats") from None
        raise UserError(f"{where}: not a readable .npz file ({e})") from None
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise UserError(f"{where}: not a readable .npz file ({type(e).__name__}: {e})") from None
    if texts.ndim != 1 or texts.dtype.kind != "U":
        raise UserError(f"{where}: 'texts' must be a 1-D array of strings, got shape {texts.shape} dtype {texts.dtype}")
    if emb.ndim != 2 or emb.dtype.kind not in "fiu" or emb.shape[1] == 0:
        raise UserError(f"{where}: 'embeddings' must be a 2-D array of numbers (U, D), got shape {emb.shape} "
                        f"dtype {emb.dtype}")
    if emb.shape[0] != texts.shape[0]:
        raise UserError(f"{where}: 'embeddings' has {emb.shape[0]} rows but 'texts' has {texts.shape[0]}")
    emb = emb.astype(np.float32)
    bad = ~np.isfinite(emb).all(axis=1)
    if bad.any():
        i = int(np.argmax(bad))
        raise UserError(f"{where}: 'embeddings' row {i} ({_short(str(texts[i]))}) is not finite "
                        f"({int(bad.sum())} such rows)")
    zero = ~(emb != 0).any(axis=1)
    if zero.any():
        i = int(np.argmax(zero))
        raise UserError(f"{where}: 'embeddings' row {i} ({_short(str(texts[i]))}) is all zeros: it has no direction")
    index: dict[str, int] = {}
    for i, t in enumerate(texts.tolist()):
        if t in index:
            raise UserError(f"{where}: the text {_short(t)} appears twice (rows {index[t]} and {i})")
        index[t] = i
    from modalign.runs.provenance import sha256_file

    return index, emb, sha256_file(p)


def lookup(path: str | Path, wanted: list[str]) -> tuple[np.ndarray, dict]:
    """The vectors of `wanted` texts, in order. -> (embeddings (len(wanted), D) float32,
    identity {"model": "precomputed:<sha16>", "path", "sha256", "dim"})."""
    index, emb, sha = read_precomputed(path)
    absent = [t for t in wanted if t not in index]
    if absent:
        raise UserError(f"text.path={path}: {len(absent)} of the data's {len(wanted)} captions and prompts have "
                        f"no vector there, e.g. {_short(absent[0])}")
    rows = np.fromiter((index[t] for t in wanted), dtype=np.int64, count=len(wanted))
    return emb[rows], {"model": f"precomputed:{sha[:16]}", "path": str(Path(path).expanduser().resolve()),
                       "sha256": sha, "dim": int(emb.shape[1])}
