"""Text embeddings the user computed with a model of their own choice: `text=precomputed`.

    modalign train text=precomputed text.path=EMB.npz

EMB.npz holds vectors by text, by sample id, or both (docs/data.md, "Your own text side"):

    texts          (U,)    str    every caption and class prompt the data uses (extra texts are fine)
    embeddings     (U, D)  float  one vector per text, row i for texts[i]
    ids            (M,)    str    sample ids whose caption vector is given by id (optional)
    id_embeddings  (M, D)  float  the text vector of sample ids[i], used for all its captions

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


class Precomputed:
    """A validated EMB.npz: vectors by text and/or by sample id, and the file's sha256."""

    def __init__(self, path: str | Path, by_text: dict[str, int], text_vectors: np.ndarray,
                 by_id: dict[str, int], id_vectors: np.ndarray, sha256: str):
        self.path, self.by_text, self.text_vectors = path, by_text, text_vectors
        self.by_id, self.id_vectors, self.sha256 = by_id, id_vectors, sha256
        self.dim = int((text_vectors if len(by_text) else id_vectors).shape[1])

    def texts(self, wanted: list[str]) -> np.ndarray:
        """The vectors of `wanted` texts, in order (len(wanted), D); one line if one is absent."""
        absent = [t for t in wanted if t not in self.by_text]
        if absent:
            raise UserError(f"text.path={self.path}: {len(absent)} of the data's {len(wanted)} captions and prompts "
                            f"{'without a vector by sample id ' if self.by_id else ''}have no vector there, "
                            f"e.g. {_short(absent[0])}")
        rows = np.fromiter((self.by_text[t] for t in wanted), dtype=np.int64, count=len(wanted))
        return self.text_vectors[rows] if len(wanted) else np.zeros((0, self.dim), np.float32)

    def samples(self, ids: list[str]) -> np.ndarray:
        """The vectors of sample ids that have one, in order (len(ids), D)."""
        rows = np.fromiter((self.by_id[i] for i in ids), dtype=np.int64, count=len(ids))
        return self.id_vectors[rows] if len(ids) else np.zeros((0, self.dim), np.float32)

    def identity(self) -> dict:
        """run.json's text record: the file's sha256 is the text side's identity."""
        return {"model": f"precomputed:{self.sha256[:16]}", "path": str(Path(self.path).expanduser().resolve()),
                "sha256": self.sha256, "dim": self.dim}


def read_precomputed(path: str | Path) -> Precomputed:
    """EMB.npz, validated: texts (U,) + embeddings (U, D), and/or ids (M,) + id_embeddings (M, D)."""
    p = Path(path).expanduser()
    where = f"text.path={path}"
    if not p.is_file():
        raise UserError(f"{where}: no such file")
    known = ("texts", "embeddings", "ids", "id_embeddings")
    try:
        with np.load(p, allow_pickle=False) as z:
            unknown = [k for k in z.files if k not in known]
            if unknown:
                raise UserError(f"{where}: unknown array '{unknown[0]}' (known: {', '.join(known)})")
            pairs = [("texts", "embeddings"), ("ids", "id_embeddings")]
            for a, b in pairs:
                if (a in z.files) != (b in z.files):
                    have, missing = (a, b) if a in z.files else (b, a)
                    raise UserError(f"{where}: '{have}' without '{missing}'; give both")
            if not any(a in z.files for a, _ in pairs):
                raise UserError(f"{where}: no 'texts' array (has: {', '.join(z.files) or 'none'}); "
                                "expected texts (U,) and embeddings (U, D), and/or ids (M,) and id_embeddings (M, D)")
            arrays = {k: z[k] for k in z.files}
    except UserError:
        raise
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise UserError(f"{where}: an array holds Python objects; save 'texts' as a str array "
                            "(np.array(texts, dtype=str)) and 'embeddings' as floats") from None
        raise UserError(f"{where}: not a readable .npz file ({e})") from None
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise UserError(f"{where}: not a readable .npz file ({type(e).__name__}: {e})") from None
    by_text, text_vectors = _keyed(where, arrays, "texts", "embeddings", "text")
    by_id, id_vectors = _keyed(where, arrays, "ids", "id_embeddings", "sample id")
    if by_text and by_id and text_vectors.shape[1] != id_vectors.shape[1]:
        raise UserError(f"{where}: 'embeddings' have {text_vectors.shape[1]} dimensions but 'id_embeddings' "
                        f"{id_vectors.shape[1]}; both sides must come from one model")
    from modalign.runs.provenance import sha256_file

    return Precomputed(path, by_text, text_vectors, by_id, id_vectors, sha256_file(p))


def _keyed(where: str, arrays: dict, key_name: str, vec_name: str, what: str) -> tuple[dict[str, int], np.ndarray]:
    if key_name not in arrays:
        return {}, np.zeros((0, 0), np.float32)
    keys, emb = arrays[key_name], arrays[vec_name]
    if keys.ndim != 1 or keys.dtype.kind != "U":
        raise UserError(f"{where}: '{key_name}' must be a 1-D array of strings, got shape {keys.shape} dtype {keys.dtype}")
    if emb.ndim != 2 or emb.dtype.kind not in "fiu" or emb.shape[1] == 0:
        raise UserError(f"{where}: '{vec_name}' must be a 2-D array of numbers ({key_name[0].upper()}, D), got shape "
                        f"{emb.shape} dtype {emb.dtype}")
    if emb.shape[0] != keys.shape[0]:
        raise UserError(f"{where}: '{vec_name}' has {emb.shape[0]} rows but '{key_name}' has {keys.shape[0]}")
    emb = emb.astype(np.float32)
    bad = ~np.isfinite(emb).all(axis=1)
    if bad.any():
        i = int(np.argmax(bad))
        raise UserError(f"{where}: '{vec_name}' row {i} ({_short(str(keys[i]))}) is not finite "
                        f"({int(bad.sum())} such rows)")
    zero = ~(emb != 0).any(axis=1)
    if zero.any():
        i = int(np.argmax(zero))
        raise UserError(f"{where}: '{vec_name}' row {i} ({_short(str(keys[i]))}) is all zeros: it has no direction")
    index: dict[str, int] = {}
    for i, t in enumerate(keys.tolist()):
        if t in index:
            raise UserError(f"{where}: the {what} {_short(t)} appears twice (rows {index[t]} and {i})")
        index[t] = i
    return index, emb


def lookup(path: str | Path, wanted: list[str]) -> tuple[np.ndarray, dict]:
    """The vectors of `wanted` texts, in order. -> (embeddings (len(wanted), D) float32,
    identity {"model": "precomputed:<sha16>", "path", "sha256", "dim"})."""
    pre = read_precomputed(path)
    return pre.texts(wanted), pre.identity()
