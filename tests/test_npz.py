"""The NPZ reader/writer: round trip, the docs example, and one-line UserErrors for bad input.

Run: .venv/bin/python -m pytest -q tests/test_npz.py
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from modalign.data.npz import hash_split, read_npz, write_npz
from modalign.data.paired import PairedData
from modalign.errors import UserError

DOCS = Path(__file__).resolve().parents[1] / "docs" / "data.md"
N, T, C = 12, 6, 2


def _arrays(n: int = N) -> dict[str, np.ndarray]:
    """A small valid dataset: n samples (12: split 8/2/2), both token kinds."""
    rng = np.random.default_rng(0)
    lengths = np.resize([6, 5, 4, 3, 6, 6, 2, 1, 6, 4, 5, 6], n)
    tokens_id = rng.integers(1, 5, size=(n, T))
    tokens_id[np.arange(T)[None, :] >= lengths[:, None]] = 0
    return {
        "ids": np.array([f"s{i}" for i in range(n)]),
        "split": np.array(["train"] * (n - 4) + ["val"] * 2 + ["test"] * 2),
        "tokens_id": tokens_id,
        "tokens_cont": rng.standard_normal((n, T, C)),
        "lengths": lengths,
        "globals": rng.standard_normal((n, 3)),
        "labels": np.arange(n) % 2,
    }


def _write(tmp_path: Path, arrays: dict | None = None, lines: list[str] | None = None, **changes) -> Path:
    """Write DATA.npz with `arrays` (plus `changes`; None deletes a key) and DATA.jsonl beside it."""
    arrays = dict(_arrays() if arrays is None else arrays)
    for key, value in changes.items():
        if value is None:
            arrays.pop(key, None)
        else:
            arrays[key] = value
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    if lines is None:
        ids = dict.fromkeys(str(i) for i in arrays.get("ids", []))
        lines = [json.dumps({"id": i, "captions": [f"caption of {i}"]}) for i in ids]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    return path


def _full_data() -> PairedData:
    a = _arrays()
    return PairedData(
        name="toy", source="memory", ids=a["ids"], split=a["split"], lengths=a["lengths"].astype(np.int64),
        captions=[[f"caption {i}", f"another {i}"] for i in range(N)],
        tokens_id=a["tokens_id"].astype(np.int64), tokens_cont=a["tokens_cont"].astype(np.float32),
        globals=a["globals"].astype(np.float32), labels=a["labels"].astype(np.int64),
        label_names=["even", "odd"], class_prompts=[["an even sample"], ["an odd sample", "odd one"]],
        facts=[{"parity": i % 2, "i": i} for i in range(N)], vocab=["<pad>", "a", "b", "c", "d"],
    ).validate()


@pytest.mark.parametrize("captions", [None, "caps.json", "caps.jsonl"])
def test_round_trip(tmp_path, captions):
    data = _full_data()
    cap = None if captions is None else str(tmp_path / captions)
    write_npz(data, str(tmp_path / "toy.npz"), captions=cap)
    back = read_npz(str(tmp_path / "toy.npz"), captions=cap)
    assert back.name == "toy"
    for key in ("ids", "split", "lengths", "tokens_id", "tokens_cont", "globals", "labels"):
        a, b = getattr(data, key), getattr(back, key)
        assert a.dtype == b.dtype and np.array_equal(a, b), key
    for key in ("captions", "label_names", "class_prompts", "facts", "vocab"):
        assert getattr(data, key) == getattr(back, key), key
    assert back.fingerprint() == data.fingerprint()


def test_dtypes_and_defaults(tmp_path):
    a = _arrays(60)  # enough ids that the sha256 split fills val and test
    path = _write(tmp_path, a, split=None, lengths=None, tokens_id=None,
                  tokens_cont=a["tokens_cont"].astype(np.float64), labels=a["labels"].astype(np.int8))
    data = read_npz(str(path))
    assert data.tokens_cont.dtype == np.float32 and data.labels.dtype == np.int64
    assert data.lengths.dtype == np.int64 and (data.lengths == T).all()
    assert data.meta["split_from"] == "sha256 of id"
    assert np.array_equal(data.split, hash_split(a["ids"]))


def test_hash_split_is_80_10_10():
    split = hash_split(np.array([f"id{i}" for i in range(10000)]))
    share = {s: (split == s).mean() for s in ("train", "val", "test")}
    assert abs(share["train"] - 0.8) < 0.02 and abs(share["val"] - 0.1) < 0.02
    assert np.array_equal(split, hash_split(np.array([f"id{i}" for i in range(10000)])))


def test_json_captions_single_string(tmp_path):
    path = _write(tmp_path)
    (tmp_path / "data.jsonl").unlink()
    (tmp_path / "data.json").write_text(json.dumps({f"s{i}": f"caption {i}" for i in range(N)}))
    assert read_npz(str(path)).captions[3] == ["caption 3"]


def test_docs_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.S)
    example = next(b for b in blocks if "np.savez" in b)
    monkeypatch.chdir(tmp_path)
    exec(compile(example, str(DOCS), "exec"), {})
    data = read_npz("mydata.npz")
    assert len(data) == 30 and data.tokens_id is None and data.n_cont == 3
    assert data.class_prompts is not None and data.facts is not None
    for s in ("train", "val", "test"):
        assert len(data.subset(s)) > 0


def _ragged(tmp_path):
    ragged = np.empty(N, dtype=object)
    ragged[:] = [np.zeros((int(n), C)) for n in _arrays()["lengths"]]
    return _write(tmp_path, tokens_cont=ragged)


def _tokens_with_zero(tmp_path):
    a = _arrays()
    a["tokens_id"][2, 1] = 0
    return _write(tmp_path, a)


def _with(key, fn):
    def make(tmp_path):
        a = _arrays()
        a[key] = fn(a[key])
        return _write(tmp_path, a)
    return make


def _lines(fn):
    def make(tmp_path):
        lines = [json.dumps({"id": f"s{i}", "captions": [f"caption {i}"]}) for i in range(N)]
        return _write(tmp_path, lines=fn(lines))
    return make


def _set(arr, index, value):
    arr = arr.copy()
    arr[index] = value
    return arr


def _corrupt(tmp_path):
    path = _write(tmp_path)
    path.write_text("this is not a zip archive\n")
    return path


def _truncated(tmp_path):
    path = _write(tmp_path)
    path.write_bytes(path.read_bytes()[:300])
    return path


def _json_bad(tmp_path):
    path = _write(tmp_path)
    (tmp_path / "data.jsonl").unlink()
    (tmp_path / "data.json").write_text('{\n "s0": ["a"],\n "s1": ["b"]\n "s2": ["c"]\n}\n')
    return path


def _prompts_unknown_label(tmp_path):
    path = _write(tmp_path, label_names=np.array(["even", "odd"]))
    (tmp_path / "data.prompts.json").write_text(json.dumps({"even": ["x"], "odd": ["y"], "other": ["z"]}))
    return path


BAD = {
    # name: (make(tmp_path) -> npz path, file named in the message ("npz" | "jsonl" | "json" | "prompts"), text)
    "count_mismatch": (lambda p: _write(p, lengths=_arrays()["lengths"][:-1]), "npz", "'lengths' has 11 samples but 'ids' has 12"),
    "duplicate_ids": (_with("ids", lambda x: _set(x, 1, "s0")), "npz", "duplicate sample id 's0'"),
    "nan": (_with("tokens_cont", lambda x: _set(x, (3, 2, 1), np.nan)), "npz", "non-finite values (NaN/Inf), first in sample 's3'"),
    "inf": (_with("globals", lambda x: _set(x, (5, 0), np.inf)), "npz", "'globals' has 1 non-finite"),
    "empty_split": (_with("split", lambda x: _set(x, slice(10, 12), "val")), "npz", "split 'test' is empty"),
    "unknown_split": (_with("split", lambda x: _set(x.astype("U16"), 0, "training")), "npz", "unknown split name 'training'"),
    "ragged": (_ragged, "npz", "'tokens_cont' is a ragged/object array, and modalign does not unpickle"),
    "object_ids": (lambda p: _write(p, ids=np.array([f"s{i}" for i in range(N)], dtype=object)), "npz", "dtype=str"),
    "caption_not_string": (_lines(lambda l: l[:4] + ['{"id": "s4", "captions": ["ok", 7]}'] + l[5:]), "jsonl:5", "caption 1 of sample 's4' is a number, not a string"),
    "empty_caption": (_lines(lambda l: l[:2] + ['{"id": "s2", "caption": "  "}'] + l[3:]), "jsonl:3", "caption 0 of sample 's2' is empty"),
    "missing_captions": (_lines(lambda l: l[:7] + l[8:]), "jsonl", "1 of 12 sample ids have no captions, first 's7'"),
    "unknown_caption_id": (_lines(lambda l: l + ['{"id": "s99", "caption": "x"}']), "jsonl:13", "unknown sample id 's99'"),
    "duplicate_caption_id": (_lines(lambda l: l + ['{"id": "s1", "caption": "x"}']), "jsonl:13", "sample 's1' already has captions"),
    "bad_json_line": (_lines(lambda l: l[:5] + ['{"id": "s5", "captions": ["a",]}'] + l[6:]), "jsonl:6", "bad JSON"),
    "bad_json_file": (_json_bad, "json:4", "bad JSON"),
    "partial_facts": (_lines(lambda l: ['{"id": "s0", "caption": "a", "facts": {"x": 1}}'] + l[1:]), "jsonl", "1 of 12 samples have 'facts'"),
    "wrong_dtype": (lambda p: _write(p, tokens_cont=np.full((N, T, C), "x")), "npz", "'tokens_cont' has dtype <U1, expected numbers"),
    "float_token_ids": (_with("tokens_id", lambda x: x.astype(float)), "npz", "'tokens_id' has dtype float64, expected integers"),
    "cont_2d": (_with("tokens_cont", lambda x: x[..., 0]), "npz", "expected [N, T, C]; for one channel use x[..., None]"),
    "missing_file": (lambda p: p / "nope.npz", "nope.npz", "data file not found"),
    "corrupt_npz": (_corrupt, "npz", "not an .npz archive (not a zip file)"),
    "truncated_npz": (_truncated, "npz", "corrupt or truncated .npz archive"),
    "id0_inside_length": (_tokens_with_zero, "npz", "id 0 (padding) inside the length of sample 's2'"),
    "length_zero": (_with("lengths", lambda x: _set(x, 4, 0)), "npz", "'lengths' of sample 's4' is 0, outside 1..6"),
    "length_too_long": (_with("lengths", lambda x: _set(x, 4, T + 1)), "npz", "'lengths' of sample 's4' is 7, outside 1..6"),
    "unknown_array": (lambda p: _write(p, token_ids=_arrays()["tokens_id"]), "npz", "unknown array 'token_ids' (did you mean 'tokens_id'?)"),
    "missing_ids": (lambda p: _write(p, ids=None, lines=[]), "npz", "required array 'ids' is missing"),
    "no_tokens": (lambda p: _write(p, tokens_id=None, tokens_cont=None), "npz", "neither 'tokens_id' nor 'tokens_cont'"),
    "hash_split_empty": (lambda p: _write(p, split=None), "npz", "no 'split' array, and the sha256 split of the 12 ids leaves 'val' empty"),
    "no_captions_file": (lambda p: (_write(p), (p / "data.jsonl").unlink())[0], "npz", "no captions file beside it"),
    "prompts_unknown_label": (_prompts_unknown_label, "prompts", "prompts for unknown label 'other'"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_user_error(tmp_path, case):
    make, file, text = BAD[case]
    path = make(tmp_path)
    with pytest.raises(UserError) as info:
        read_npz(str(path))
    msg = str(info.value)
    stem, _, line = file.partition(":")
    named = {"npz": str(path), "jsonl": str(tmp_path / "data.jsonl"), "json": str(tmp_path / "data.json"),
             "prompts": str(tmp_path / "data.prompts.json")}.get(stem, str(tmp_path / stem))
    assert "\n" not in msg
    assert msg.startswith(named + (f":{line}:" if line else ":")), msg
    assert text in msg, msg


# found by tests/test_fuzz.py ----------------------------------------------------------------------
def test_line_separator_characters_in_captions_round_trip(tmp_path):
    ids = [f"s{i}" for i in range(N)]
    lines = [json.dumps({"id": i, "captions": [f"one\u2028two\u2029three\u0085 of {i}"]}, ensure_ascii=False)
             for i in ids]
    data = read_npz(str(_write(tmp_path, lines=lines)))
    assert data.captions[0] == ["one\u2028two\u2029three\u0085 of s0"]


@pytest.mark.parametrize("make, expected", [
    (lambda p: (p.parent / "data.jsonl").unlink() or (p.parent / "data.jsonl").mkdir(), "cannot read the captions"),
    (lambda p: (p.parent / "data.jsonl").write_text(
        json.dumps({"id": "s0", "captions": ["\ud800"]}) + "\n"
        + "\n".join(json.dumps({"id": f"s{i}", "captions": ["c"]}) for i in range(1, N)) + "\n"),
     "is not valid Unicode"),
    (lambda p: (p.parent / "data.jsonl").write_text("[" * 100_000 + "\n"), "nested too deeply"),
    # the same in the JSON form of the captions (found by tests/test_fuzz.py)
    (lambda p: (p.parent / "data.jsonl").unlink() or (p.parent / "data.json").write_text("[" * 100_000),
     "nested too deeply"),
])
def test_unreadable_captions_are_one_line(tmp_path, make, expected):
    path = _write(tmp_path)
    make(path)
    with pytest.raises(UserError) as e:
        read_npz(str(path)).validate()
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_unknown_compression_method_in_the_npz_is_one_line(tmp_path):
    path = _write(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[raw.index(b"PK\x01\x02") + 10] = 99  # the central directory's compression method
    path.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=r"data.npz: array '\w+' is corrupt"):
        read_npz(str(path))
