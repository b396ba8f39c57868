"""Property-based fuzzing (hypothesis) of the data reader and the align config edge.

The promise: bad input either works correctly or fails with ONE line naming the file, key or value
(UserError in-process; exit 2 and `modalign: error: ...` on the command line) -- never a traceback,
never a run directory marked completed.

    test_read_npz_fuzz      400 cases through read_npz(): 40 valid small datasets (NPZ + JSONL/JSON
                            captions [+ prompts]; every harmless variation: id kinds, dtypes, unicode
                            and 10k-char captions, hash split, ...), then 12 per mutation (30: NaN/Inf,
                            duplicate ids, empty/unknown splits, count mismatches, wrong dtypes,
                            object/ragged arrays, bad lengths, caption problems, missing keys, ...),
                            each applied first and followed by 0-2 random others
    test_config_edge_fuzz   200 random override lists for the align recipe through what `modalign
                            train` does before training: compose, to_container, check_resolved (before
                            the run dir exists), then read_settings and the (small) demo data load
    test_generated_bad_cases_through_cli
                            six such bad cases, fixed, through the real CLI (run concurrently)

Every generated case has an oracle: a mutation or override that must be rejected must raise a
one-line UserError naming the file (data) or a key/value (config), with the expected fragment when
it is the only one; cases without one must load (and equal what was written) or pass. The inputs of
the bugs this fuzzing found earlier (corrupt zip member headers, captions with U+0085/U+2028/U+2029,
a captions path that is a directory, deeply nested JSON, lone surrogates in captions, line breaks in
ids, groups and sections set to scalars or deleted, unchecked optimizer values, NaN) are generated
like any other input since they were fixed; their regression tests stay in test_npz.py and
test_cli.py. Deterministic (derandomize=True); `-s` prints the number of generated cases.

Run: .venv/bin/python -m pytest -q tests/test_fuzz.py
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st

from conftest import TINY, run_cli
from modalign.data.npz import ARRAYS, hash_split, read_npz
from modalign.data.paired import SPLITS, PairedData
from modalign.errors import UserError, one_line

VALID_EXAMPLES = 40  # read_npz cases of valid data (every harmless variation)
PER_FOCUS = 12  # read_npz cases per mutation (30 of them)
CONFIG_EXAMPLES = 200
COUNTS: dict[str, int] = {}

FUZZ = dict(deadline=None, derandomize=True, database=None, print_blob=True,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                   HealthCheck.data_too_large, HealthCheck.large_base_example,
                                   HealthCheck.filter_too_much])
# Shrinking a failing dataset case can take minutes: report it as generated (its note() describes it,
# and the printed @reproduce_failure blob replays it).
NO_SHRINK = [Phase.explicit, Phase.reuse, Phase.generate]

# Text for ids, split and label names, which error messages quote: line breaks and other controls
# included (a message quoting them stays one line), no NUL (numpy's str arrays drop trailing NULs),
# no lone surrogates (not text). Captions may hold anything a JSON string can, line and paragraph
# separators (U+0085, U+2028, U+2029) included; lone surrogates are a mutation (bad_caption_value).
NAME_CHARS = st.characters(codec="utf-8", exclude_categories=("Cs",), exclude_characters="\x00")
CAPTION_CHARS = st.characters(codec="utf-8", exclude_categories=("Cs",))
SPECIALS = ["🙂👩‍🔬", "עברית ‏שלום", "a\u0301e\u0308", "日本語", "ﷺ", "\u200b",  # emoji, RTL, combining, CJK
            "x\ty", "\x00nul", "\\\"'{}[]", "مرحبا"]


def one_line_error(e: UserError) -> str:
    msg = str(e)
    assert msg.strip(), "empty error message"
    assert len(msg.splitlines()) == 1, f"error is not one line: {msg!r}"
    assert "Traceback" not in msg, msg
    return msg


# --- choices: hypothesis draws when fuzzing, a seeded Random for the fixed CLI cases --------------
class Pick:
    def __init__(self, data=None, seed: int = 0):
        self.data, self.rnd = data, random.Random(seed)

    def int(self, lo: int, hi: int) -> int:
        return self.data.draw(st.integers(lo, hi)) if self.data else self.rnd.randint(lo, hi)

    def choice(self, seq):
        seq = list(seq)
        return self.data.draw(st.sampled_from(seq)) if self.data else self.rnd.choice(seq)

    def rare(self, k: int) -> bool:
        """True about once in k+1 draws. (Hypothesis favours the first option and small integers,
        so the common outcome comes first.)"""
        return self.choice([False] * k + [True])

    def bool(self) -> bool:
        return self.data.draw(st.booleans()) if self.data else self.rnd.random() < 0.5

    def float(self, lo: float, hi: float) -> float:
        if self.data:
            return self.data.draw(st.floats(lo, hi, allow_nan=False, allow_infinity=False))
        return self.rnd.uniform(lo, hi)

    def text(self, chars, max_size: int = 12, min_size: int = 0) -> str:
        if self.data:
            return self.data.draw(st.text(chars, min_size=min_size, max_size=max_size))
        return self.rnd.choice(SPECIALS[:-3])[:max_size] or "x"

    def unique_texts(self, n: int, max_size: int = 6) -> list[str]:
        if self.data:
            return self.data.draw(st.lists(st.text(NAME_CHARS, max_size=max_size), min_size=n, max_size=n, unique=True))
        return [f"{self.rnd.choice(SPECIALS[:6])}-{i}" for i in range(n)]


# --- a dataset on disk, as a model ---------------------------------------------------------------
@dataclass
class Case:
    n: int
    T: int
    arrays: dict  # name -> what np.savez gets (object arrays allowed)
    rows: list  # caption entries: {"id", "captions" | "caption", ["facts"]} dicts, raw str lines, or "" (blank)
    fmt: str = "jsonl"  # jsonl | json
    ensure_ascii: bool = True
    prompts: dict | None = None
    compressed: bool = False
    stem: str = "data"
    subdir: str = ""
    captions_elsewhere: bool = False
    json_raw: str | None = None  # replaces the .json captions text
    file_op: str | None = None  # a file-level mutation, applied after writing
    file_arg: int = 0
    applied: list = field(default_factory=list)  # (mutation, None | [alternatives]) in order
    touched: set = field(default_factory=set)  # arrays / sample ids a mutation changed (change each once)

    # the written files, set by write()
    npz: Path | None = None
    captions: Path | None = None

    @property
    def rejects(self) -> list:
        return [(name, alts) for name, alts in self.applied if alts is not None]


def id_strs(arr) -> list[str]:
    arr = np.asarray(arr)
    if arr.dtype.kind == "S":
        return [x.decode("utf-8") for x in arr]
    if arr.dtype.kind in "iu":
        return [str(int(x)) for x in arr]
    return [str(x) for x in arr]


def caption_rows(case: Case) -> list[dict]:
    return [r for r in case.rows if isinstance(r, dict)]


def row_captions(row: dict) -> list[str]:
    return row["captions"] if "captions" in row else [row["caption"]]


def base_case(p: Pick, focus: str | None = None) -> Case:
    """A valid small dataset, with the harmless variations a user may have (dtypes, id kinds, unicode
    and very long captions, JSON or JSONL captions, facts, labels, prompts, hash split). It has what
    the `focus` mutation needs (e.g. labels and prompts for "prompts")."""
    rng = np.random.default_rng(p.int(0, 2**32 - 1))
    n, T = p.int(12, 30), p.int(2, 8)
    kinds = {"t_mismatch": "both", "token_ids": p.choice(["id", "both"])}.get(focus) or p.choice(["id", "cont", "both"])

    id_style = p.choice(["plain", "int", "text", "unicode", "bytes"])
    if id_style == "plain":
        ids = np.array([f"s{i:03d}" for i in range(n)])
    elif id_style == "unicode":  # emoji, RTL, combining marks, zero-width space
        ids = np.array([f"{p.choice(SPECIALS[:6])}-{i}" for i in range(n)])
    elif id_style == "int":
        offset, step = p.int(0, 1000), p.int(1, 50)
        ids = (offset + step * np.arange(n)).astype(p.choice([np.int64, np.int32, np.uint16]))
    elif id_style == "text":
        ids = np.array(p.unique_texts(n), dtype=str)
    else:
        ids = np.array([f"r{i}".encode() for i in range(n)], dtype="S")
    sids = id_strs(ids)
    arrays: dict = {"ids": ids}

    hs = hash_split(np.array(sids, dtype=str))
    if focus != "hash_split" and p.bool() and all((hs == s).any() for s in SPLITS):
        pass  # no split array: the sha256 split, which covers all three splits here
    else:
        n_val, n_test = p.int(1, 3), p.int(1, 3)
        split = np.array(["train"] * (n - n_val - n_test) + ["val"] * n_val + ["test"] * n_test)
        arrays["split"] = split[rng.permutation(n)]

    lengths = rng.integers(1, T + 1, n) if p.bool() else np.full(n, T)
    if lengths.min() < T or focus == "drop_lengths" or p.bool():
        arrays["lengths"] = lengths.astype(p.choice([np.int64, np.int32, np.uint8]))
    pad = np.arange(T)[None, :] >= lengths[:, None]
    if kinds in ("id", "both"):
        V = p.int(2, 20)
        tid = rng.integers(1, V, (n, T))
        tid[pad] = 0
        arrays["tokens_id"] = tid.astype(p.choice([np.int64, np.int32, np.uint8, np.int16]))
        if p.bool():
            arrays["vocab"] = np.array(["<pad>"] + [f"{p.choice(SPECIALS[:6])}{k}" for k in range(1, V + p.int(0, 3))])
    if kinds in ("cont", "both"):
        C = p.int(1, 3)
        x = rng.standard_normal((n, T, C))
        if p.bool():
            x[pad] = 0.0
        arrays["tokens_cont"] = x.astype(p.choice([np.float32, np.float64, np.float16]))
        if p.bool():  # integer or boolean features are numbers too
            arrays["tokens_cont"] = (x > 0).astype(p.choice([np.int64, np.bool_]))
    if p.bool():
        arrays["globals"] = rng.standard_normal((n, p.int(1, 3))).astype(p.choice([np.float32, np.float64]))

    prompts = None
    if focus in ("bad_labels", "prompts") or p.bool():
        K = p.int(1, 4)
        arrays["labels"] = rng.integers(-1, K, n).astype(p.choice([np.int64, np.int8]))
        if focus == "prompts" or p.bool():
            names = p.unique_texts(K, max_size=8)
            arrays["label_names"] = np.array(names, dtype=str)
            if focus == "prompts" or p.bool():
                prompts = {name: ([f"a sample of {name}", f"{name}!"] if p.bool() else f"this is {name}")
                           for name in names}

    with_facts = p.bool()
    rows: list = []
    for i, sid in enumerate(sids):
        caps = []
        for _ in range(p.int(1, 3)):
            style = p.choice(["plain", "plain", "unicode", "special", "long"])
            if style == "plain":
                c = f"caption {len(caps)} of sample {sid}"
            elif style == "unicode":
                c = p.text(CAPTION_CHARS, max_size=40)
            elif style == "special":
                c = p.choice(SPECIALS) + " " + p.text(CAPTION_CHARS, max_size=5)
            else:
                c = (p.text(CAPTION_CHARS, max_size=8) + " long caption ") * p.int(750, 900)  # 10k+ chars
            caps.append(c if c.strip() else "x" + c)
        row: dict = {"id": int(ids[i]) if id_style == "int" and p.bool() else sid}
        if len(caps) == 1 and p.bool():
            row["caption"] = caps[0]
        else:
            row["captions"] = caps
        if with_facts:
            row["facts"] = {"i": i, "what": p.choice(SPECIALS[:5]), "seconds": int(lengths[i])}
        rows.append(row)
        if p.rare(9):
            rows.append("")  # blank lines are skipped
    if p.bool():
        order = rng.permutation(len(rows))
        rows = [rows[k] for k in order]

    fmt = "jsonl" if focus == "dup_caption_row" else p.choice(["jsonl", "jsonl", "json"])
    return Case(n=n, T=T, arrays=arrays, rows=rows, fmt=fmt,
                ensure_ascii=p.bool(), prompts=prompts, compressed=p.bool(),
                stem=p.choice(["data", "my data", "dätä-🙂", "x.y"]), subdir=p.choice(["", "sub dir", "ünï"]),
                captions_elsewhere=p.rare(4))


# --- mutations: each returns None (the data stays valid) or the alternatives of the error message -
# An alternative is a tuple of fragments that must all appear in the one-line error.
def _present(case: Case, keys) -> list[str]:
    return [k for k in keys if k in case.arrays and k not in case.touched]


def _sample_rows(case: Case) -> list[dict]:
    return [r for r in caption_rows(case) if "id" in r and str(r["id"]) not in case.touched]


def _obj(seq) -> np.ndarray:
    out = np.empty(len(seq), dtype=object)
    out[:] = list(seq)
    return out


def m_nonfinite(case, p):
    key = p.choice(_present(case, ("tokens_cont", "globals", "tokens_id", "lengths", "labels")))
    arr = np.asarray(case.arrays[key])
    arr = arr.astype(arr.dtype if arr.dtype.kind == "f" else np.float64)
    idx = tuple(p.int(0, s - 1) for s in arr.shape)
    arr[idx] = p.choice([np.nan, np.inf, -np.inf])
    case.arrays[key] = arr
    case.touched.add(key)
    if key in ("tokens_cont", "globals"):  # anywhere, padding included
        return [(f"'{key}'", "non-finite")]
    return [(f"'{key}'", "dtype")]  # NaN makes an integer array float


def m_dup_ids(case, p):
    ids = np.array(case.arrays["ids"])
    i = p.int(0, len(ids) - 1)
    j = p.choice([k for k in range(len(ids)) if k != i])
    ids[j] = ids[i]
    case.arrays["ids"] = ids
    case.touched.add("ids")
    return [("duplicate", f"'{id_strs(ids[i:i + 1])[0]}'")]


def _explicit_split(case) -> np.ndarray:
    if "split" not in case.arrays:
        case.arrays["split"] = hash_split(np.array(id_strs(case.arrays["ids"]), dtype=str))
    return np.array(case.arrays["split"], dtype=object)


def m_empty_split(case, p):
    split = _explicit_split(case)
    s = p.choice(SPLITS)
    split[split == s] = p.choice([t for t in SPLITS if t != s])
    case.arrays["split"] = np.array(list(split), dtype=str)
    case.touched.add("split")
    return [("split", f"'{s}'", "empty")]


def m_unknown_split(case, p):
    split = _explicit_split(case)
    name = p.choice(["training", "dev", "Train", "TEST", "", " train", "validation", "tëst", "🙂",
                     p.text(NAME_CHARS, max_size=8)])
    if name in SPLITS:
        name = name + "_"
    split[p.int(0, len(split) - 1)] = name
    case.arrays["split"] = np.array(list(split), dtype=str)
    case.touched.add("split")
    return [("unknown split name", f"'{name}'")]


def m_count_mismatch(case, p):
    key = p.choice(_present(case, ("split", "tokens_id", "tokens_cont", "lengths", "globals", "labels", "ids")))
    arr = case.arrays[key]
    k = p.int(1, 3)
    case.touched.add(key)
    if key == "ids":
        case.arrays[key] = arr[:-k]  # their captions now name unknown ids (or the hash split changes)
        return [("ids",)]
    case.arrays[key] = arr[:-k] if p.bool() else np.concatenate([arr, arr[-k:]])
    return [(f"'{key}'", "samples")]


def _dtype_options(case) -> list:
    options = []
    for key in _present(case, ("tokens_id", "tokens_cont", "lengths", "globals", "labels")):
        options.append((key, "str"))
    for key in _present(case, ("tokens_id", "lengths", "labels")):
        options += [(key, "float"), (key, "bool")]
    for key in _present(case, ("tokens_cont", "globals")):
        options.append((key, "complex"))
    for key in _present(case, ("split", "label_names", "vocab")):
        options.append((key, "int"))
    if "ids" in case.arrays and "ids" not in case.touched:
        options += [("ids", "float"), ("ids", "datetime"), ("ids", "bool")]
    return options


def m_wrong_dtype(case, p):
    key, how = p.choice(_dtype_options(case))
    arr = np.asarray(case.arrays[key])
    if how == "str":
        new = arr.astype(str)
    elif how == "float":
        new = np.arange(len(arr)) + 0.5 if key == "ids" else arr.astype(np.float64)
    elif how == "bool":
        new = np.ones(arr.shape, dtype=bool)
    elif how == "complex":
        new = arr.astype(np.complex128)
    elif how == "int":
        new = np.arange(len(arr))
    else:
        new = np.datetime64("2024-01-01") + np.arange(len(arr))
    case.arrays[key] = new
    case.touched.add(key)
    return [(f"'{key}'", "dtype")]


def m_object_array(case, p):
    key = p.choice(_present(case, ("ids", "split", "tokens_id", "tokens_cont", "lengths", "globals", "labels",
                                   "label_names", "vocab")))
    arr = np.asarray(case.arrays[key])
    if key in ("tokens_id", "tokens_cont") and p.bool():  # ragged: each sample cut to its own length
        case.arrays[key] = _obj([arr[i, : 1 + i % arr.shape[1]] for i in range(len(arr))])
    else:
        case.arrays[key] = _obj(arr.tolist())
    case.touched.add(key)
    return [(f"'{key}'", "object")]


def m_bad_lengths(case, p):
    lengths = np.asarray(case.arrays.get("lengths", np.full(case.n, case.T))).astype(np.int64)
    i = p.int(0, len(lengths) - 1)
    v = p.choice([0, -p.int(1, 5), case.T + p.int(1, 100), -2**40, 2**40])
    lengths[i] = v
    case.arrays["lengths"] = lengths
    case.touched.add("lengths")
    return [("'lengths'", f"is {v},")]


def m_drop_lengths(case, p):
    lengths = np.asarray(case.arrays.pop("lengths"))
    case.touched.add("lengths")
    if "tokens_id" in case.arrays and (lengths < case.T).any():
        return [("'tokens_id'", "padding")]  # without lengths every sample is T long: the padding 0s are inside
    return None


def m_token_ids(case, p):
    tid = np.asarray(case.arrays["tokens_id"]).astype(np.int64)
    lengths = np.asarray(case.arrays.get("lengths", np.full(case.n, case.T)))
    i = p.int(0, case.n - 1)
    t = p.int(0, int(lengths[i]) - 1)
    how = p.choice(["zero", "negative"] + (["beyond"] if "vocab" in case.arrays else []))
    case.touched.add("tokens_id")
    if how == "zero":
        tid[i, t] = 0
        alts = [("'tokens_id'", "id 0 (padding)")]
    elif how == "negative":
        tid[i, p.int(0, case.T - 1)] = -p.int(1, 5)
        alts = [("'tokens_id'", "negative")]
    else:
        tid[i, t] = len(case.arrays["vocab"]) + p.int(0, 3)
        alts = [("'tokens_id'", "vocabulary")]
    case.arrays["tokens_id"] = tid
    return alts


def m_t_mismatch(case, p):
    x = np.asarray(case.arrays["tokens_cont"])
    k = p.int(1, 3)
    if p.bool() or x.shape[1] <= k:
        case.arrays["tokens_cont"] = np.concatenate([x, np.zeros((x.shape[0], k, x.shape[2]), x.dtype)], axis=1)
    else:
        case.arrays["tokens_cont"] = x[:, :-k]
    case.touched.update({"tokens_cont", "tokens_id"})
    return [("'tokens_id' has T=",)]


def m_wrong_ndim(case, p):
    key = p.choice(_present(case, ("ids", "split", "tokens_id", "tokens_cont", "lengths", "globals", "labels")))
    arr = np.asarray(case.arrays[key])
    if key == "tokens_cont" and p.bool():
        case.arrays[key] = arr[..., 0]
    elif key == "globals" and p.bool():
        case.arrays[key] = arr[:, 0]
    elif key == "ids" and p.bool():
        case.arrays[key] = np.asarray(arr[0])  # a 0-d array
    else:
        case.arrays[key] = arr[..., None]
    case.touched.add(key)
    return [(f"'{key}'", "shape")]


def m_bad_labels(case, p):
    labels = np.asarray(case.arrays["labels"]).astype(np.int64)
    K = len(case.arrays["label_names"]) if "label_names" in case.arrays else None
    v = p.choice([-2, -p.int(3, 100), (K or 4) + p.int(0, 5)])
    labels[p.int(0, len(labels) - 1)] = v
    case.arrays["labels"] = labels
    case.touched.add("labels")
    if v < -1 or (K is not None and v >= K):
        return [("'labels'", "must lie in")]
    return None  # without label_names the classes are 0..max: a large label is a new class


def m_hash_split(case, p):
    case.arrays.pop("split")
    case.touched.add("split")
    hs = hash_split(np.array(id_strs(case.arrays["ids"]), dtype=str))
    if all((hs == s).any() for s in SPLITS):
        return None
    return [("no 'split' array", "sha256")]


def m_missing_caption(case, p):
    row = p.choice(_sample_rows(case))
    case.rows.remove(row)
    case.touched.add(str(row["id"]))
    return [("have no captions",)]


def m_unknown_caption_id(case, p):
    sid = "zz-unknown-" + p.text(NAME_CHARS, max_size=6)
    case.rows.insert(p.int(0, len(case.rows)), {"id": sid, "captions": ["a caption without a sample"]})
    case.touched.add(sid)
    return [("unknown sample id", f"'{sid}'")]


def m_dup_caption_row(case, p):
    row = p.choice(_sample_rows(case))
    case.rows.insert(p.int(0, len(case.rows)), dict(row))
    case.touched.add(str(row["id"]))
    return [("already has captions", f"'{row['id']}'")]


def m_blank_caption(case, p):
    row = p.choice(_sample_rows(case))
    caps = list(row_captions(row))
    caps[p.int(0, len(caps) - 1)] = p.choice(["", " ", "\t\n", "\u3000", "\u00a0 \u2003", " \r\n "])
    row.pop("caption", None)
    row["captions"] = caps
    case.touched.add(str(row["id"]))
    return [("empty", f"'{row['id']}'")]


def m_bad_caption_value(case, p):
    row = p.choice(_sample_rows(case))
    sid = str(row["id"])
    bad = p.choice([3, None, True, 1.5, [], {}, ["ok", 7], ["ok", None], [["nested"]], [{"a": 1}],
                    ["a lone surrogate \ud800 in it"]])
    row.pop("caption", None)
    row["captions"] = bad
    case.touched.add(sid)
    if bad == ["a lone surrogate \ud800 in it"]:
        case.ensure_ascii = True  # JSON writes it escaped ("\ud800"); raw, it is not UTF-8 at all
        return [("not valid Unicode", f"'{sid}'")]
    return [("caption", f"'{sid}'")]


def m_bad_row(case, p):
    if case.fmt == "json":
        how = p.choice(["truncated", "list", "unknown key"])
        if how == "unknown key":
            row = p.choice(_sample_rows(case))
            row["text"] = "x"  # written in the {id: {...}} form, which allows captions/caption/facts only
            case.touched.add(str(row["id"]))
            return [("unknown key 'text'",)]
        case.json_raw = "[1, 2, 3]" if how == "list" else '{"' + "a" * p.int(0, 5)
        return [("expected a JSON object",)] if how == "list" else [("bad JSON",)]
    k = p.int(0, len(case.rows))
    how = p.choice(["truncated", "not object", "unknown key", "no id", "id type", "both", "facts type"])
    if how in ("unknown key", "no id", "id type", "both", "facts type"):
        row = p.choice(_sample_rows(case))
        case.touched.add(str(row["id"]))
        sid = str(row["id"])
        if how == "unknown key":
            row[p.choice(["text", "Captions", "label", "🙂"])] = "x"
            return [("unknown key",)]
        if how == "no id":
            del row["id"]
            return [("missing key 'id'",)]
        if how == "id type":
            row["id"] = p.choice([1.5, True, None, [1], {"a": 1}])
            return [("'id' is",)]
        if how == "both":
            caps = row_captions(row)
            row["captions"], row["caption"] = caps, caps[0]
            return [("both 'captions' and 'caption'", f"'{sid}'")]
        row["facts"] = p.choice([[1, 2], "walking", 3, True])
        return [("'facts'", "expected an object")]
    if how == "truncated":
        text = json.dumps({"id": "zz", "captions": ["never closed"]})
        case.rows.insert(k, text[:p.int(1, len(text) - 1)])
        return [("bad JSON",)]
    case.rows.insert(k, json.dumps(p.choice([[1, 2], "a string", 3, None, True])))
    return [("expected a JSON object",)]


def m_partial_facts(case, p):
    rows = _sample_rows(case)
    if any("facts" in r for r in rows):
        row = p.choice([r for r in rows if "facts" in r])
        del row["facts"]
    else:
        row = p.choice(rows)
        row["facts"] = {"only": "this one"}
    case.touched.add(str(row["id"]))
    return [("'facts'", "every sample or none")]


def m_unknown_array(case, p):
    name = p.choice(["token_ids", "tokens", "label", "mask", "Ids", "splits", "global", "lenghts",
                     p.text(st.characters(min_codepoint=97, max_codepoint=122), min_size=1, max_size=8)])
    if name in ARRAYS:
        name += "_x"
    case.arrays[name] = np.zeros(case.n)
    return [("unknown array", f"'{name}'")]


def m_missing_required(case, p):
    if p.bool():
        del case.arrays["ids"]
        return [("required array 'ids' is missing",)]
    case.arrays.pop("tokens_id", None)
    case.arrays.pop("tokens_cont", None)
    case.arrays.pop("vocab", None)
    return [("neither 'tokens_id' nor 'tokens_cont'",)]


def m_prompts(case, p):
    names = list(case.arrays["label_names"])
    how = p.choice(["missing", "unknown", "empty", "no names"])
    if how == "missing":
        del case.prompts[p.choice(names)]
        return [("no prompts for label",)]
    if how == "unknown":
        case.prompts["zz-" + p.text(NAME_CHARS, max_size=5)] = ["who is this"]
        return [("prompts for unknown label",)]
    if how == "empty":
        case.prompts[p.choice(names)] = p.choice(["", [], [" "], ["ok", 5]])
        return [("prompt",)]
    del case.arrays["label_names"]
    case.touched.add("label_names")
    return [("class prompts need 'label_names'",)]


def m_no_samples(case, p):
    for key in list(case.arrays):
        if key not in ("label_names", "vocab"):
            case.arrays[key] = case.arrays[key][:0]
    case.rows = []
    case.touched.update(case.arrays)
    return [("no samples",), ("sha256",)]


def m_zero_positions(case, p):
    for key in ("tokens_id", "tokens_cont"):
        if key in case.arrays:
            case.arrays[key] = case.arrays[key][:, :0]
    case.touched.update(case.arrays)
    return [("'lengths'", "outside 1..0")]


def m_file(case, p):
    ops = ["no captions", "not utf8", "truncate npz", "not npz", "npy", "empty npz"]
    if not case.captions_elsewhere:
        ops.append("both caption files")
    case.file_op = p.choice(ops)
    case.file_arg = p.int(0, 10**6)
    return {"no captions": [("no captions file",), ("captions file not found",)],
            "both caption files": [("both",)],
            "not utf8": [("not UTF-8",)],
            "truncate npz": [("corrupt",), ("not an .npz",)],
            "not npz": [("not an .npz",)],
            "npy": [("single .npy array",)],
            "empty npz": [("not an .npz",)]}[case.file_op]


def m_file_op(op: str, expected: list[tuple]):
    """A mutation that damages the files one way (the inputs of bugs fixed earlier)."""
    def mutation(case, p):
        case.file_op = op
        case.file_arg = p.int(0, 10**6)
        return expected
    return mutation


def _any_touched(case) -> bool:
    return bool(case.touched) or case.file_op is not None or any(a is not None for _, a in case.applied)


# name -> (applies to the case?, mutation)
PER_SAMPLE = ("split", "tokens_id", "tokens_cont", "lengths", "globals", "labels")
MUTATIONS = {
    "nonfinite": (lambda c: bool(_present(c, PER_SAMPLE[1:])), m_nonfinite),
    "dup_ids": (lambda c: "ids" in c.arrays and "ids" not in c.touched, m_dup_ids),
    "empty_split": (lambda c: "split" not in c.touched and "ids" not in c.touched, m_empty_split),
    "unknown_split": (lambda c: "split" not in c.touched and "ids" not in c.touched, m_unknown_split),
    "count_mismatch": (lambda c: bool(_present(c, PER_SAMPLE + ("ids",))), m_count_mismatch),
    "wrong_dtype": (lambda c: bool(_dtype_options(c)), m_wrong_dtype),
    "object_array": (lambda c: bool(_present(c, ("ids",) + PER_SAMPLE[:4])), m_object_array),
    "bad_lengths": (lambda c: "lengths" not in c.touched and "ids" not in c.touched
                    and bool(_present(c, ("tokens_id", "tokens_cont"))), m_bad_lengths),
    "drop_lengths": (lambda c: bool(_present(c, ("lengths",))) and not {"tokens_id", "ids"} & c.touched,
                     m_drop_lengths),
    "token_ids": (lambda c: bool(_present(c, ("tokens_id",))) and not {"lengths", "ids"} & c.touched, m_token_ids),
    "t_mismatch": (lambda c: bool(_present(c, ("tokens_id",))) and bool(_present(c, ("tokens_cont",))), m_t_mismatch),
    "wrong_ndim": (lambda c: bool(_present(c, ("ids",) + PER_SAMPLE[:4])), m_wrong_ndim),
    "bad_labels": (lambda c: bool(_present(c, ("labels",))) and "label_names" not in c.touched, m_bad_labels),
    "hash_split": (lambda c: bool(_present(c, ("split",))) and "ids" not in c.touched and "split" not in c.touched,
                   m_hash_split),
    "missing_caption": (lambda c: bool(_sample_rows(c)), m_missing_caption),
    "unknown_caption_id": (lambda c: True, m_unknown_caption_id),
    "dup_caption_row": (lambda c: c.fmt == "jsonl" and bool(_sample_rows(c)), m_dup_caption_row),
    "blank_caption": (lambda c: bool(_sample_rows(c)), m_blank_caption),
    "bad_caption_value": (lambda c: bool(_sample_rows(c)), m_bad_caption_value),
    "bad_row": (lambda c: bool(_sample_rows(c)) and c.json_raw is None, m_bad_row),
    "partial_facts": (lambda c: bool(_sample_rows(c)), m_partial_facts),
    "unknown_array": (lambda c: True, m_unknown_array),
    "missing_required": (lambda c: True, m_missing_required),
    "prompts": (lambda c: c.prompts is not None and bool(_present(c, ("label_names",))), m_prompts),
    "no_samples": (lambda c: not _any_touched(c), m_no_samples),
    "zero_positions": (lambda c: not _any_touched(c), m_zero_positions),
    "file": (lambda c: c.file_op is None, m_file),
    "captions_dir": (lambda c: c.file_op is None, m_file_op("captions dir", [("cannot read the captions",)])),
    "zip_compression": (lambda c: c.file_op is None, m_file_op("compression", [("is corrupt",)])),
    "deep_json": (lambda c: c.file_op is None, m_file_op("deep json", [("nested too deeply",), ("bad JSON",)])),
}


def mutate(case: Case, p: Pick, names: list[str], extra: int = 0) -> Case:
    """Apply the named mutations, then up to `extra` random applicable ones."""
    for name in names:
        assert MUTATIONS[name][0](case), (name, describe(case))
        case.applied.append((name, MUTATIONS[name][1](case, p)))
    for _ in range(p.int(0, extra)):
        if "ids" not in case.arrays:
            break  # rejected whatever else changes; most mutations need the ids
        name = p.choice([m for m, (applies, _) in MUTATIONS.items() if applies(case)])
        case.applied.append((name, MUTATIONS[name][1](case, p)))
    return case


# --- writing and checking --------------------------------------------------------------------------
def write(case: Case, root: Path) -> Path:
    d = root / case.subdir if case.subdir else root
    d.mkdir(parents=True, exist_ok=True)
    npz = d / f"{case.stem}.npz"
    with open(npz, "wb") as f:  # a file object: numpy appends no second ".npz"
        (np.savez_compressed if case.compressed else np.savez)(f, **case.arrays)

    if case.captions_elsewhere:
        (d / "texts").mkdir(exist_ok=True)
        cap = d / "texts" / f"captions.{case.fmt}"
    else:
        cap = npz.with_suffix(f".{case.fmt}")
    dumps = lambda obj: json.dumps(obj, ensure_ascii=case.ensure_ascii)  # noqa: E731
    if case.fmt == "jsonl":
        text = "".join((r if isinstance(r, str) else dumps(r)) + "\n" for r in case.rows)
    elif case.json_raw is not None:
        text = case.json_raw
    else:
        mapping = {}
        for r in caption_rows(case):
            rest = {k: v for k, v in r.items() if k != "id"}  # {id: captions} or {id: {captions, facts}}
            plain = len(rest) == 1 and "facts" not in rest and "text" not in rest
            mapping[str(r["id"])] = next(iter(rest.values())) if plain else rest
        text = dumps(mapping)
    cap.write_text(text, encoding="utf-8")
    if case.prompts is not None:
        npz.with_suffix(".prompts.json").write_text(dumps(case.prompts), encoding="utf-8")

    op, arg = case.file_op, case.file_arg
    if op == "no captions":
        cap.unlink()
    elif op == "both caption files":
        other = npz.with_suffix(".json" if case.fmt == "jsonl" else ".jsonl")
        other.write_text(text, encoding="utf-8")
    elif op == "not utf8":
        raw = cap.read_bytes()
        k = arg % (len(raw) + 1)
        cap.write_bytes(raw[:k] + b"\xff\xfe\xc3" + raw[k:])
    elif op == "truncate npz":
        raw = npz.read_bytes()
        npz.write_bytes(raw[: arg % len(raw)])
    elif op == "not npz":
        npz.write_bytes(random.Random(arg).randbytes(1 + arg % 300).replace(b"PK", b"pk").lstrip(b"\x93"))
    elif op == "npy":
        with open(npz, "wb") as f:
            np.save(f, np.zeros((case.n, case.T), np.float32))
    elif op == "empty npz":
        npz.write_bytes(b"")
    elif op == "captions dir":  # the captions path is a directory
        cap.unlink()
        cap.mkdir()
    elif op == "compression":  # a member whose header names a compression method zipfile cannot read
        raw = bytearray(npz.read_bytes())
        raw[raw.index(b"PK\x01\x02") + 10] = 99 + arg % 100
        npz.write_bytes(bytes(raw))
    elif op == "deep json":  # a caption line nested deeper than the JSON parser's recursion limit
        cap.write_text("[" * (100_000 + arg) + "\n" + text, encoding="utf-8")
    case.npz, case.captions = npz, cap
    return npz


def load(case: Case):
    return read_npz(str(case.npz), captions=str(case.captions) if case.captions_elsewhere else None)


def describe(case: Case) -> str:
    arrays = {k: f"{getattr(v, 'dtype', '?')}{tuple(getattr(v, 'shape', ()))}" for k, v in case.arrays.items()}
    return (f"n={case.n} T={case.T} fmt={case.fmt} ascii={case.ensure_ascii} file={case.file_op} "
            f"elsewhere={case.captions_elsewhere} mutations={[n for n, _ in case.applied]} arrays={arrays}")


def check_error(case: Case, e: UserError) -> None:
    msg = one_line_error(e)
    files = [case.npz.name, case.captions.name, case.npz.with_suffix(".prompts.json").name]
    assert any(f in msg for f in files), f"the error names no file ({files}): {msg!r}"
    rejects = case.rejects
    if len(rejects) == 1:
        name, alts = rejects[0]
        # a quoted id with a line break appears with a space there (modalign.errors.one_line)
        assert any(all(one_line(frag) in msg for frag in alt) for alt in alts), \
            f"mutation {name}: expected {alts} in the error, got {msg!r}"


def check_loaded(case: Case, data: PairedData) -> None:
    """The data loaded: it must be exactly what was written, and valid."""
    a = case.arrays
    assert isinstance(data, PairedData)
    data.validate()
    sids = id_strs(a["ids"])
    n, T = len(sids), case.T
    assert data.ids.tolist() == sids and len(data) == n
    split = np.asarray(a["split"]).astype(str) if "split" in a else hash_split(np.array(sids, dtype=str))
    assert data.split.tolist() == split.tolist()
    assert all((data.split == s).any() for s in SPLITS)
    lengths = np.asarray(a.get("lengths", np.full(n, T))).astype(np.int64)
    assert data.lengths.dtype == np.int64 and np.array_equal(data.lengths, lengths)
    assert data.lengths.min() >= 1 and data.lengths.max() <= data.seq_len == T
    for key, dtype in (("tokens_id", np.int64), ("tokens_cont", np.float32), ("globals", np.float32),
                       ("labels", np.int64)):
        got = getattr(data, key)
        if key not in a:
            assert got is None, key
            continue
        want = np.asarray(a[key]).astype(dtype)
        assert got.dtype == dtype and got.shape == want.shape and np.array_equal(got, want), key
        assert len(got) == n
    for key in ("tokens_cont", "globals"):
        if getattr(data, key) is not None:
            assert np.isfinite(getattr(data, key)).all()
    assert data.label_names == (None if "label_names" not in a else np.asarray(a["label_names"]).tolist())
    assert data.vocab == (None if "vocab" not in a else np.asarray(a["vocab"]).tolist())
    rows = {str(r["id"]): r for r in caption_rows(case)}
    assert data.captions == [row_captions(rows[s]) for s in sids]  # unicode and 10k-char captions intact
    if any("facts" in r for r in rows.values()):
        assert data.facts == [rows[s]["facts"] for s in sids]
    else:
        assert data.facts is None
    if case.prompts is not None:
        want = [[v] if isinstance(v, str) else v for v in (case.prompts[k] for k in data.label_names)]
        assert data.class_prompts == want
    assert len(data.fingerprint()) == 64
    for protocol in ("exact_text", "same_facts", "same_label"):
        if protocol == "exact_text" or (protocol == "same_facts" and data.facts is not None) or \
                (protocol == "same_label" and data.labels is not None):
            assert data.group_ids(protocol).shape == (n,)
    for s in SPLITS:
        assert len(data.subset(s)) == int((split == s).sum())


def run_case(case: Case, root: Path) -> str:
    """read_npz on the case; asserts the oracle. -> "ok" or "error"."""
    write(case, root)
    try:
        data = load(case)
    except UserError as e:
        check_error(case, e)
        assert case.rejects, f"valid data was rejected: {e}"
        return "error"
    assert not case.rejects, f"bad data was accepted: {case.rejects}"
    check_loaded(case, data)
    return "ok"


def one_data_case(root: Path, focus: str | None, p: Pick) -> None:
    case = base_case(p, focus)
    if focus:
        mutate(case, p, [focus], extra=2)
    note(describe(case))
    d = Path(tempfile.mkdtemp(dir=root))  # a fresh directory per example
    try:
        outcome = run_case(case, d)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    COUNTS["data"] = COUNTS.get("data", 0) + 1
    COUNTS[f"data_{outcome}"] = COUNTS.get(f"data_{outcome}", 0) + 1
    for name, _ in case.applied:
        COUNTS[f"data_mut_{name}"] = COUNTS.get(f"data_mut_{name}", 0) + 1
    if case.file_op:
        COUNTS[f"data_file_{case.file_op}"] = COUNTS.get(f"data_file_{case.file_op}", 0) + 1
    try:
        text = " ".join(id_strs(case.arrays["ids"])) if "ids" in case.arrays else ""
    except (TypeError, ValueError, AttributeError):  # mutated ids (wrong ndim, object arrays)
        text = ""
    if any(ch in text for ch in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"):
        COUNTS["data_id_line_break"] = COUNTS.get("data_id_line_break", 0) + 1


@settings(max_examples=VALID_EXAMPLES, phases=NO_SHRINK, **FUZZ)
@given(st.data())
def _fuzz_valid_npz(root: Path, data) -> None:
    one_data_case(root, None, Pick(data))


@settings(max_examples=PER_FOCUS, phases=NO_SHRINK, **FUZZ)
@given(st.data())
def _fuzz_bad_npz(root: Path, focus: str, data) -> None:
    one_data_case(root, focus, Pick(data))


def test_read_npz_fuzz(tmp_path, record_property):
    """VALID_EXAMPLES valid datasets, and PER_FOCUS cases for each mutation (first, plus 0-2 random others)."""
    for k in [k for k in COUNTS if k.startswith("data")]:
        del COUNTS[k]
    _fuzz_valid_npz(tmp_path)
    for focus in MUTATIONS:
        _fuzz_bad_npz(tmp_path, focus)
    n = COUNTS.get("data", 0)
    print(f"\nread_npz fuzz: {n} generated cases, {COUNTS.get('data_ok', 0)} loaded, "
          f"{COUNTS.get('data_error', 0)} one-line errors")
    record_property("generated_cases", n)
    assert n >= VALID_EXAMPLES + PER_FOCUS * len(MUTATIONS)
    assert COUNTS.get("data_ok", 0) >= VALID_EXAMPLES and COUNTS.get("data_error", 0) >= 200
    unused = [m for m in MUTATIONS if not COUNTS.get(f"data_mut_{m}")]
    assert not unused, f"mutations never generated: {unused}"
    # the inputs of bugs fixed earlier are generated, not excluded
    for key in ("data_id_line_break",):
        assert COUNTS.get(key), f"never generated: {key}"


# --- config ----------------------------------------------------------------------------------------
PARSE_ERROR = object()  # the override does not parse
# raw value -> what Hydra parses it to
GARBAGE = [("abc", "abc"), ("1.5", 1.5), ("true", True), ("false", False), ("[1,2]", [1, 2]), ("[]", []),
           ("{a:1}", {"a": 1}), ("null", None), ("'5'", "5"), ("1e3", 1000.0), ("-7", -7), ("0", 0),
           ("日本", PARSE_ERROR), ("🙂x", PARSE_ERROR), ("'a b'", "a b"), ("x" * 10_000, "x" * 10_000),
           ("ab=c", PARSE_ERROR), ("'ünï 🙂 עברית'", "ünï 🙂 עברית"), ("nan", float("nan"))]

INT, FLOAT, BOOL, CHOICE, STR, SPECIAL = "int", "float", "bool", "choice", "str", "special"

# key -> (type, arg): int -> minimum (None = any); float -> (min, max, min exclusive, max exclusive);
# choice -> options; str -> may be empty / may be null; special -> (ok ints, bad if <= 0, else maybe)
COMMON = {
    "seed": (INT, None),
    **{f"trainer.{k}": (INT, lo) for k, lo in (("max_steps", 1), ("batch_size", 2), ("accumulate", 1),
                                               ("eval_every", 1), ("log_every", 1), ("checkpoint_every", 0),
                                               ("keep_checkpoints", 0), ("threads", 0), ("early_stop_patience", 0),
                                               ("max_nonfinite_skips", 0))},
    "trainer.grad_clip": (FLOAT, (0, None, False, False)),
    "trainer.precision": (CHOICE, ("auto", "fp32", "bf16", "fp16")),
    "trainer.monitor_mode": (CHOICE, ("max", "min")),
    "trainer.on_nonfinite": (CHOICE, ("stop", "skip")),
    "trainer.optim.warmup_steps": (INT, 0),
    "trainer.optim.eps": (FLOAT, (1e-12, None, False, False)),
    "trainer.optim.min_lr_ratio": (FLOAT, (0, 1, False, False)),
    **{f"trainer.optim.{g}.{k}": (FLOAT, (0, None, False, False)) for g in ("encoder", "heads", "logit_scale")
       for k in ("lr", "weight_decay")},
    "eval.split": (CHOICE, SPLITS),
    "eval.protocol": (CHOICE, ("auto", "exact_text", "same_facts", "same_label")),
    "eval.export_embeddings": (BOOL, None),
    "eval.batch_size": (INT, 1),
    "text.precision": (CHOICE, ("auto", "fp32", "bf16")),
    "text.batch_size": (INT, 1),
    "text.model": (STR, (True, False)),
    "text.cache_dir": (STR, (True, True)),
    "name": (STR, (False, False)),
    "outputs": (STR, (False, False)),
    "loss.kind": (CHOICE, ("clip", "siglip")),
    "loss.queue_size": (INT, 0),
    "loss.queue_weight": (FLOAT, (0, None, False, False)),
    "loss.mlm_ratio": (FLOAT, (0, 1, False, False)),
    "loss.mlm_weight": (FLOAT, (0, None, False, False)),
    "loss.init_temperature": (FLOAT, (1e-4, None, False, False)),
    "loss.max_logit_scale": (FLOAT, (1, None, False, False)),
    "encoder.width": (SPECIAL, tuple(range(8, 257, 8))),  # any multiple of 8 divides by every ok heads value
    "encoder.heads": (SPECIAL, (1, 2, 4, 8)),
    "encoder.kernel_size": (SPECIAL, (1, 3, 5, 7, 9)),
    "encoder.depth": (INT, 1),
    "encoder.dropout": (FLOAT, (0, 1, False, False)),
    "encoder.pooling": (CHOICE, ("cls", "mean")),
    "encoder.kind": (CHOICE, ("transformer", "cnn")),
    "head.embed_dim": (INT, 1),
    "head.text_projection": (BOOL, None),
    # demo data: checked when the data is built (cheap here: the sizes are kept small)
    "data.n_train": (INT, 1), "data.n_val": (INT, 1), "data.n_test": (INT, 1),
    "data.seed": (INT, 0),
    "data.difficulty": (CHOICE, ("easy", "medium", "hard")),
    "data.captions_per_sample": (SPECIAL, tuple(range(1, 11))),
    "data.max_events": (INT, 1),
}
HEAD_KEYS = {
    "linear": {},
    "mlp": {"head.layers": (SPECIAL, (2, 3)), "head.hidden": (INT, 1), "head.dropout": (FLOAT, (0, 1, False, True))},
    "registers": {"head.registers": (SPECIAL, tuple(range(4, 33))), "head.overlap": (SPECIAL, (1, 2, 3, 4)),
                  "head.depth": (INT, 1), "head.heads": (SPECIAL, (1, 2, 4, 8)), "head.mlp_ratio": (INT, 1),
                  "head.dropout": (FLOAT, (0, 1, False, True)),
                  "head.nested_dropout": (CHOICE, ("uniform", "geometric", "none")),
                  "head.geometric_p": (FLOAT, (0, 1, True, False)), "head.aux_weight": (FLOAT, (0, None, False, False)),
                  "head.aux_target": (CHOICE, ("globals", "pooled", "auto"))},
}
GROUPS = {"loss": ("clip", "siglip"), "head": ("linear", "mlp", "registers"), "encoder": ("transformer", "cnn"),
          "trainer": ("default", "smoke"), "text": ("minilm",), "env": ("local",)}
# small demo data by default, so that building it is cheap; the fuzzed data.* keys come after and win
SMALL_DATA = ["data.n_train=16", "data.n_val=6", "data.n_test=6", "data.max_events=12", "data.captions_per_sample=2"]
BIG_INT_KEYS = ("data.n_train", "data.n_val", "data.n_test", "data.max_events")  # kept small when valid


@dataclass
class Override:
    text: str
    status: str  # ok | bad | maybe
    fragments: tuple = ()  # bad: any of these must be in the error


def judge(spec, value) -> str:
    """ok | bad | maybe for a parsed value of a key with `spec`."""
    kind, arg = spec
    if value is PARSE_ERROR:
        return "bad"
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if kind == INT:
        return "ok" if is_int and (arg is None or value >= arg) else "bad"
    if kind == SPECIAL:
        if not is_int or value <= 0:
            return "bad"
        return "ok" if value in arg else "maybe"
    if kind == FLOAT:
        lo, hi, lo_open, hi_open = arg
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:  # NaN
            return "bad"
        if value < lo or (lo_open and value == lo) or (hi is not None and (value > hi or (hi_open and value == hi))):
            return "bad"
        return "ok"
    if kind == BOOL:
        return "ok" if isinstance(value, bool) else "bad"
    if kind == CHOICE:
        return "ok" if isinstance(value, str) and value in arg else "bad"
    empty_ok, null_ok = arg
    if value is None:
        return "ok" if null_ok else "bad"
    return "ok" if isinstance(value, str) and (value or empty_ok) else "bad"


def value_for(p: Pick, key: str, spec) -> tuple[str, object]:
    """(raw override value, parsed value): valid, out of range, or garbage."""
    kind, arg = spec
    mode = p.choice(["ok", "ok", "ok", "edge", "garbage"])
    if mode == "garbage":
        return p.choice(GARBAGE)
    if kind in (INT, SPECIAL):
        lo = (arg if arg is not None else -2**31) if kind == INT else 1
        if key in BIG_INT_KEYS and mode == "ok":
            v = p.int(lo, 24)
        elif mode == "ok":
            v = p.choice(arg) if kind == SPECIAL else p.int(lo, lo + p.choice([3, 300, 10**12]))
        else:
            v = p.int(-10**6, lo - 1) if kind == INT and arg is not None else p.choice([0, -1, -p.int(2, 10**9)])
        return str(v), v
    if kind == FLOAT:
        lo, hi, _, _ = arg
        if mode == "ok":
            v = round(p.float(lo + 0.001, (hi if hi is not None else lo + 1000) - 0.001), 3)
            v = max(v, lo + 0.001)
        else:
            v = round(lo - p.float(0.001, 1000), 3) if hi is None or p.bool() else round(hi + p.float(0.001, 10), 3)
        raw = p.choice([f"{v}", f"{v:.3e}"]) if v else "0.0"
        return raw, float(raw)
    if kind == BOOL:
        v = p.choice(["true", "false", "True", "FALSE"]) if mode == "ok" else p.choice(["yes", "1", "0", "on", "null"])
        return v, {"true": True, "false": False, "yes": "yes", "1": 1, "0": 0, "on": "on", "null": None}[v.lower()]
    if kind == CHOICE:
        if mode == "ok":
            v = p.choice(arg)
            return v, v
        v = p.choice(["nope", "FP32", "none ", "Max", "fp8", "lstm", "ünï", "x" * 300, "train,val"])
        return (v, PARSE_ERROR) if v in ("ünï", "train,val") else (v, v.strip())
    # str
    if mode == "ok" or p.bool():
        s = p.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc", "Zl", "Zp"),
                                 exclude_characters="'\"\\$"), max_size=20)
        if p.rare(5):
            s = (s or "x") * p.int(500, 1000)  # very long
        return f"'{s}'", s
    return p.choice([("''", ""), ("null", None), ("12", 12), ("[a,b]", ["a", "b"]), ("日本", PARSE_ERROR)])


def gen_overrides(p: Pick) -> list[Override]:
    out: list[Override] = []
    used: set[str] = set()
    blocked: set[str] = set()  # config sections deleted or set to a scalar

    def leaf_frags(key, raw):
        return (key.split(".")[-1], raw[:50]) if raw else (key.split(".")[-1],)

    head = "mlp"
    if p.bool():  # group choices
        for group in p.choice([["head"], ["loss"], ["encoder"], ["trainer"], ["head", "encoder"], ["text", "env"]]):
            if p.rare(4):
                bad = p.choice(["nope", "MLP", "lstm", "mlp2", "defaults", "demo"])
                out.append(Override(f"{group}={bad}", "bad", (bad,)))
            elif p.rare(6):  # not an option name at all
                bad = p.choice(["5", "null", "[1,2]", "1.5", "true"])
                out.append(Override(f"{group}={bad}", "bad", (f"'{group}' must name one of its options",)))
            else:
                option = p.choice(GROUPS[group])
                head = option if group == "head" else head
                out.append(Override(f"{group}={option}", "ok"))
            used.add(group)

    keys = {**COMMON, **HEAD_KEYS[head]}
    for _ in range(p.int(0, 4)):
        how = p.choice(["set"] * 6 + ["typo", "unknown", "plus", "plusplus", "delete", "other head", "head.kind",
                                      "section", "betas"])
        key = p.choice(sorted(keys))
        if key in used or any(key.startswith(b + ".") for b in blocked):
            continue
        used.add(key)
        if how == "set":
            raw, value = value_for(p, key, keys[key])
            out.append(Override(f"{key}={raw}", judge(keys[key], value), leaf_frags(key, raw)))
        elif how == "typo":
            parts = key.split(".")
            leaf = parts[-1]
            leaf = p.choice([leaf + "z", leaf[:-1], leaf.upper(), leaf.replace("_", "-") + "_"])
            typo = ".".join(parts[:-1] + [leaf])
            if typo not in keys:
                out.append(Override(f"{typo}=3", "bad", (leaf,)))
        elif how == "unknown":
            name = p.choice(["foo", "bar.baz", "trainer.foo", "eval.x", "max_steps", "lr"])
            prefix = p.choice(["", "+", "++"])
            out.append(Override(f"{prefix}{name}=1", "bad", tuple(name.split("."))))
        elif how == "plus":  # + on an existing key: Hydra refuses to append
            out.append(Override(f"+{key}=1", "bad", (key.split(".")[-1],)))
        elif how == "plusplus":
            raw, value = value_for(p, key, keys[key])
            out.append(Override(f"++{key}={raw}", judge(keys[key], value), leaf_frags(key, raw)))
        elif how == "delete":
            if key.startswith("data."):
                continue  # the data defaults would build 10,000 samples: slow, not wrong
            # name/outputs/seed are required; Hydra cannot delete a null (text.cache_dir); the rest fall
            # back to their defaults
            status = "bad" if key in ("name", "outputs", "text.cache_dir", "seed") else "ok"
            out.append(Override(f"~{key}", status, (key.split(".")[-1],)))
        elif how == "section":  # a config section set to a scalar or deleted
            section = p.choice(["eval", "trainer", "loss", "text", "env", "trainer.optim", "trainer.optim.encoder"])
            if section in used or any(u.startswith(section + ".") for u in used) or \
                    any(section.startswith(b + ".") or section == b for b in blocked):
                continue
            used.add(section)
            blocked.add(section)  # later overrides of its keys would fail for another reason
            raw = p.choice(["5", "null", "'x'"]) if p.bool() else None
            text = f"~{section}" if raw is None else f"{section}={raw}"
            if section == "trainer.optim.encoder" and raw is None:
                status = "maybe"  # deleting one component's settings falls back to nothing: refused, or not
            else:
                status = "bad"
            frag = "trainer.optim" if section.startswith("trainer.optim") else section
            out.append(Override(text, status, (f"'{frag}'",)))
        elif how == "betas":
            if "trainer.optim.betas" in used or any("trainer.optim.betas".startswith(b + ".") for b in blocked):
                continue
            used.add("trainer.optim.betas")
            b0, b1 = p.choice([0.9, 0.5, 1.5, -0.1, 1.0]), p.choice([0.999, 0.95, 2.0])
            ok = 0 <= b0 <= 0.999999 and 0 <= b1 <= 0.999999
            out.append(Override(f"trainer.optim.betas=[{b0},{b1}]", "ok" if ok else "bad", ("betas",)))
        elif how == "other head":
            others = {k: s for h, ks in HEAD_KEYS.items() if h != head for k, s in ks.items() if k not in keys}
            if others:
                other = p.choice(sorted(others))
                out.append(Override(f"{other}=2", "bad", (other.split(".")[-1],)))
        else:
            if "head.kind" in used:
                continue  # a second head.kind would override the first
            used.add("head.kind")
            bad = p.choice(["nope", "transformer", "Linear", "mlp "])
            if bad.strip() != head:
                out.append(Override(f"head.kind={bad}", "bad" if bad.strip() not in GROUPS["head"] else "maybe",
                                    ("kind", bad.strip())))
    if p.rare(9) and not any(o.text.lstrip("+~").startswith("data.") for o in out):
        out.append(Override("data=npz", "bad", ("path",)))  # data.path is required
    return out


def config_edge(overrides: list[str]) -> None:
    """What `modalign train` does with the overrides before it trains: the edge before the run dir
    (compose, to_container, check_resolved), then the recipe's read_settings and data load."""
    from omegaconf import OmegaConf

    from modalign.recipes.align import headline_protocol, load_data
    from modalign.recipes.config import compose, to_container
    from modalign.recipes.launch import check_resolved, root_config
    from modalign.recipes.settings import read_settings

    cfg = compose(overrides, root_config("align"))
    resolved = check_resolved(to_container(cfg, ""), overrides, "align")
    cfg = OmegaConf.create(resolved)  # as start_run hands it to the recipe
    settings_ = read_settings(cfg)
    data = load_data(cfg).validate()
    headline_protocol(data, settings_.eval.protocol)


@settings(max_examples=CONFIG_EXAMPLES, **FUZZ)
@given(st.data())
def _fuzz_config(data) -> None:
    p = Pick(data)
    ovs = gen_overrides(p)
    texts = [o.text for o in ovs]
    full = texts if any(t.startswith("data=") for t in texts) else SMALL_DATA + texts
    note(f"overrides: {texts}")
    bad = [o for o in ovs if o.status == "bad"]
    try:
        config_edge(full)
        outcome = "ok"
    except UserError as e:
        msg = one_line_error(e)
        assert bad or any(o.status == "maybe" for o in ovs), f"valid overrides were rejected: {msg}"
        names = {frag for o in ovs for frag in o.fragments} | {part for o in ovs for part in
                                                                o.text.lstrip("+~").split("=")[0].split(".")}
        assert any(f and f in msg for f in names), f"the error names no key or value of {texts}: {msg!r}"
        if len(bad) == 1 and not any(o.status == "maybe" for o in ovs):
            assert any(f in msg for f in bad[0].fragments), f"expected one of {bad[0].fragments} in {msg!r}"
        outcome = "error"
    else:
        assert not bad, f"bad overrides were accepted: {[o.text for o in bad]}"
    COUNTS["config"] = COUNTS.get("config", 0) + 1
    COUNTS[f"config_{outcome}"] = COUNTS.get(f"config_{outcome}", 0) + 1


def test_config_edge_fuzz(record_property):
    for k in [k for k in COUNTS if k.startswith("config")]:
        del COUNTS[k]
    _fuzz_config()
    n = COUNTS.get("config", 0)
    print(f"\nconfig fuzz: {n} generated override lists, {COUNTS.get('config_ok', 0)} accepted, "
          f"{COUNTS.get('config_error', 0)} one-line errors")
    record_property("generated_cases", n)
    assert n >= CONFIG_EXAMPLES
    assert COUNTS.get("config_ok", 0) >= 30 and COUNTS.get("config_error", 0) >= 60


# --- a few generated bad cases through the real CLI -------------------------------------------------
def _cli_data_case(seed: int, mutations: list[str]) -> Case:
    p = Pick(seed=seed)
    case = base_case(p, mutations[0])
    case.subdir, case.stem, case.captions_elsewhere, case.file_op = "", "bad", False, None
    return mutate(case, p, mutations)


CLI_CASES = [
    # (case id, seed, a data case's mutations or None, overrides, a fragment of the error line)
    ("data-nan-in-tokens-cont", 1, ["nonfinite"], [], "'tokens_cont' has 1 non-finite"),
    ("data-duplicate-unicode-id", 0, ["dup_ids"], [], "duplicate sample id 'a\u0301e\u0308-22'"),
    ("data-ragged-tokens-cont", 1, ["object_array"], [], "'tokens_cont' is a ragged/object array"),
    ("config-float-batch-size", 0, None, ["trainer.batch_size=1.5"], "'trainer.batch_size' must be an integer"),
    ("config-list-embed-dim", 0, None, ["head.embed_dim=[1,2]"], "'head.embed_dim' must be an integer"),
    ("config-negative-n-train", 0, None, ["data.n_train=-1"], "n_train"),  # fails once the run dir exists
]


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory, cache_dir) -> dict:
    """Every CLI_CASES case as `modalign train --quiet ...` in its own directory, run concurrently
    (a failed start costs about 2 s of imports): case id -> (CompletedProcess, cwd)."""
    from concurrent.futures import ThreadPoolExecutor

    def run(case_id, seed, mutations, overrides):
        cwd = tmp_path_factory.mktemp(case_id)
        args = ["train", "--quiet", "trainer.max_steps=2", "trainer.batch_size=4", "trainer.eval_every=1"]
        if mutations is not None:
            case = _cli_data_case(seed, mutations)
            assert case.rejects, case.applied
            args += ["data=npz", f"data.path={write(case, cwd / 'data')}"]
        else:
            args += [o for o in TINY if not o.startswith("trainer.")]
        return case_id, (run_cli(args + overrides, cwd, cache_dir), cwd)

    with ThreadPoolExecutor(max_workers=3) as pool:
        return dict(pool.map(lambda c: run(*c[:4]), CLI_CASES))


@pytest.mark.parametrize("case_id,fragment", [(c[0], c[4]) for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_generated_bad_cases_through_cli(case_id, fragment, cli_results):
    p, cwd = cli_results[case_id]
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert len(lines) == 1 and lines[0].startswith("modalign: error:"), p.stderr
    assert "Traceback" not in p.stderr and fragment in lines[0], p.stderr
    if case_id.startswith("data-"):
        assert "bad.npz" in lines[0], lines[0]
    runs = cwd / "outputs" / "runs"
    left = sorted(runs.iterdir()) if runs.exists() else []
    completed = [r for r in left if (r / "run.json").exists() and '"completed"' in (r / "run.json").read_text()]
    assert not completed, f"a run dir is marked completed: {completed}"
    assert not left, f"a failed start left run directories: {left}"
