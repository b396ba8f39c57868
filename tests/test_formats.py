"""Data in HDF5, Parquet and .npy directories (modalign.data.formats), read lazily (DiskArray):
the same data, fingerprints and batches as NPZ in memory; one-line errors for bad files;
`modalign convert` and a training run on data that stays on disk."""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import run_cli
from modalign.data import arrays
from modalign.data.batches import EpochSampler, PairedTensors, Prefetcher
from modalign.data.formats import convert, read_data, write_data
from modalign.data.npz import read_npz, write_npz
from modalign.data.paired import PairedData
from modalign.errors import UserError

N, T, C = 40, 7, 3
FORMATS = ["data.h5", "data.parquet", "data_npy", "copy.npz"]


def _data(n: int = N) -> PairedData:
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, T + 1, n)
    tokens_id = rng.integers(1, 6, size=(n, T))
    tokens_id[np.arange(T)[None, :] >= lengths[:, None]] = 0
    return PairedData(
        name="toy", source="memory", ids=np.array([f"s{i}" for i in range(n)]),
        split=np.array((["train"] * 6 + ["val", "test"]) * (n // 8)), lengths=lengths.astype(np.int64),
        captions=[[f"caption {i % 5}", f"another {i}"] for i in range(n)],
        tokens_id=tokens_id.astype(np.int64), tokens_cont=rng.standard_normal((n, T, C)).astype(np.float32),
        globals=rng.standard_normal((n, 2)).astype(np.float32), labels=(np.arange(n) % 2).astype(np.int64),
        label_names=["even", "odd"], class_prompts=[["an even sample"], ["an odd sample", "odd one"]],
        facts=[{"parity": i % 2} for i in range(n)], vocab=["<pad>", "a", "b", "c", "d", "e"],
    ).validate()


@pytest.fixture
def npz(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("MODALIGN_CACHE", str(tmp_path / "cache"))
    write_npz(_data(), tmp_path / "data.npz")
    return tmp_path / "data.npz"


@pytest.mark.parametrize("out", FORMATS)
def test_every_format_reads_back_the_same_data(npz, out):
    ref = read_npz(str(npz))
    _, fmt = convert(str(npz), str(npz.parent / out))
    for lazy in (True, False):
        got = read_data(str(npz.parent / out), lazy=lazy)
        assert got.lazy == (lazy and fmt != "npz")
        assert got.ids.tolist() == ref.ids.tolist() and got.split.tolist() == ref.split.tolist()
        assert got.captions == ref.captions and got.facts == ref.facts
        assert got.label_names == ref.label_names and got.vocab == ref.vocab and got.class_prompts == ref.class_prompts
        for key in ("lengths", "labels", "tokens_id", "tokens_cont", "globals"):
            a, b = arrays.materialize(getattr(got, key)), getattr(ref, key)
            assert a.dtype == b.dtype and np.array_equal(a, b), key
        # the fingerprint is the same bytes streamed: a converted data set stays comparable
        assert got.fingerprint() == ref.fingerprint()
        for s in ("train", "val", "test"):
            assert got.subset(s).fingerprint() == ref.subset(s).fingerprint()
        assert got.vocab_size == ref.vocab_size and got.seq_len == T and got.n_cont == C


def _tensors(data: PairedData) -> PairedTensors:
    rows = np.zeros((len(data), 1), np.int64)
    return PairedTensors(data, rows, torch.zeros(1, 4), torch.zeros(1, dtype=torch.long))


@pytest.mark.parametrize("out", ["data.h5", "data.parquet", "data_npy"])
def test_batches_from_disk_equal_batches_in_memory(npz, out):
    """The sampler's batches (with prefetch, through epoch boundaries and a jump as on resume)
    are bit-identical to the in-memory path's, and the train split stays on disk."""
    convert(str(npz), str(npz.parent / out))
    ref = _tensors(read_npz(str(npz)).subset("train"))
    lazy = _tensors(read_data(str(npz.parent / out), lazy=True).subset("train"))
    assert arrays.is_lazy(lazy.tokens_cont) and lazy.prefetch == 4
    # rows stored contiguously are read ahead by the kernel (posix_fadvise), Parquet by a thread
    assert lazy.kernel_readahead == (out != "data.parquet")
    a, b = EpochSampler(ref, 8, seed=3, token_noise=True), EpochSampler(lazy, 8, seed=3, token_noise=True)
    assert (b._ahead is None) == lazy.kernel_readahead
    try:
        for step in [*range(12), 40, 41, 2, 3]:  # 3 batches an epoch; 40: a jump; 2: back again
            x, y = a.batch(step), b.batch(step)
            assert x.keys() == y.keys()
            for k in x:
                assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), (step, k)
        first = [lazy.batch(torch.arange(s, min(s + 5, lazy.n))) for s in range(0, lazy.n, 5)]
        assert [f["tokens_cont"].shape[0] for f in first] == [5] * (lazy.n // 5) + ([lazy.n % 5] if lazy.n % 5 else [])
    finally:
        b.close()
    if b._ahead is not None:
        assert all(not t.is_alive() for t in b._ahead.pool._threads)


def test_prefetcher_returns_what_the_function_returns_and_raises_its_errors():
    calls = []

    def fn(step):
        calls.append(step)
        if step == 7:
            raise UserError("step 7 is bad")
        return {"step": step}

    p = Prefetcher(fn, depth=2)
    try:
        assert [p.get(s)["step"] for s in (0, 1, 2, 5)] == [0, 1, 2, 5]
        with pytest.raises(UserError, match="step 7"):
            p.get(7)
    finally:
        p.close()
    assert calls[:3] == [0, 1, 2]  # read ahead in order


def test_streamed_checks_are_cached_by_size_and_mtime(npz):
    h5 = npz.parent / "data.h5"
    convert(str(npz), str(h5))
    first = read_data(str(h5), lazy=True).subset("train").fingerprint()
    assert len(list(arrays.cache_dir().iterdir())) >= 2  # the validation pass and the train fingerprint
    stat = h5.stat()
    with h5py.File(h5, "r+") as f:  # change one value in place: same size
        f["tokens_cont"][0, 0, 0] += 1.0
    os.utime(h5, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the old mtime: the cache cannot tell
    assert read_data(str(h5), lazy=True).subset("train").fingerprint() == first
    os.utime(h5, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # a new mtime: hashed again
    assert read_data(str(h5), lazy=True).subset("train").fingerprint() != first


def _h5(path: Path, **datasets):
    with h5py.File(path, "w") as f:
        for k, v in datasets.items():
            if isinstance(v, dict):
                f.create_group(k)
            elif v.dtype.kind == "U":
                f.create_dataset(k, data=v.astype(object), dtype=h5py.string_dtype())
            else:
                f.create_dataset(k, data=v)
    return path


def _base(n: int = 16) -> dict:
    rng = np.random.default_rng(1)
    return {"ids": np.array([f"s{i}" for i in range(n)]), "split": np.array(["train", "train", "val", "test"] * (n // 4)),
            "tokens_cont": rng.standard_normal((n, 5, 2)).astype(np.float32)}


def _captions(path: Path, n: int = 16):
    path.with_suffix(".jsonl").write_text("".join(json.dumps({"id": f"s{i}", "caption": f"c {i}"}) + "\n" for i in range(n)))


def _text(p):
    p.write_text("hello")
    return p


def _bad_nan(p):
    b = _base()
    b["tokens_cont"][9, 3, 1] = np.nan
    return _h5(p, **b)


def _bad_zero_id(p):
    b = _base()
    ids = np.ones((16, 5), np.int64)
    ids[4, 2] = 0
    return _h5(p, **b, tokens_id=ids)


BAD = [  # (case, writer of the bad file, fragment of the one-line error)
    ("not-hdf5", _text, "not an HDF5 file"),
    ("unknown-dataset", lambda p: _h5(p, **_base(), token_cont=_base()["tokens_cont"]), "unknown array 'token_cont' (did you mean 'tokens_cont'?)"),
    ("group", lambda p: _h5(p, **_base(), globals={}), "'globals' is a group"),
    ("strings-as-features", lambda p: _h5(p, **{**_base(), "tokens_cont": np.array(["a"] * 16)}), "'tokens_cont'"),
    ("nan-on-disk", _bad_nan, "'tokens_cont' has non-finite values (NaN/Inf), first in sample 's9' at index (3, 1)"),
    ("zero-id-on-disk", _bad_zero_id, "id 0 (padding) inside the length of sample 's4'"),
    ("wrong-rows", lambda p: _h5(p, **{**_base(), "globals": np.zeros((15, 2), np.float32)}), "'globals' has 15 samples but 'ids' has 16"),
]


@pytest.mark.parametrize("case,write,fragment", BAD, ids=[b[0] for b in BAD])
def test_bad_hdf5_is_one_line(tmp_path, monkeypatch, case, write, fragment):
    monkeypatch.setenv("MODALIGN_CACHE", str(tmp_path / "cache"))
    p = write(tmp_path / "bad.h5")
    _captions(p)
    with pytest.raises(UserError) as e:
        read_data(str(p), lazy=True)
    assert fragment in str(e.value) and str(p) in str(e.value) and "\n" not in str(e.value)


def test_bad_parquet_and_npy_directories_are_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("MODALIGN_CACHE", str(tmp_path / "cache"))
    b = _base()
    variable = pa.table({"ids": b["ids"], "split": b["split"], "tokens_cont": [list(r.reshape(-1)) for r in b["tokens_cont"]]})
    pq.write_table(variable, tmp_path / "var.parquet")
    nulls = pa.table({"ids": pa.array([*b["ids"][:-1], None]), "split": b["split"],
                      "tokens_cont": pa.FixedShapeTensorArray.from_numpy_ndarray(b["tokens_cont"])})
    pq.write_table(nulls, tmp_path / "nulls.parquet")
    (tmp_path / "dir").mkdir()
    np.save(tmp_path / "dir" / "ids.npy", b["ids"])
    np.save(tmp_path / "dir" / "tokens_cont.npy", b["tokens_cont"])
    (tmp_path / "dir" / "notes.txt").write_text("x")
    (tmp_path / "obj").mkdir()
    np.save(tmp_path / "obj" / "ids.npy", np.array(list(b["ids"]), dtype=object), allow_pickle=True)
    cases = [("var.parquet", "expected a fixed-shape tensor or fixed-size list per sample"),
             ("nulls.parquet", "column 'ids' has 1 null values"),
             ("dir", "'notes.txt' is not an .npy file"),
             ("obj", "an object array, and modalign does not unpickle data")]
    for name, fragment in cases:
        _captions(tmp_path / name)
        with pytest.raises(UserError) as e:
            read_data(str(tmp_path / name))
        assert fragment in str(e.value) and "\n" not in str(e.value), (name, str(e.value))


def test_write_data_refuses_an_unknown_format(tmp_path):
    with pytest.raises(UserError, match=r"unknown data format '\.csv'"):
        write_data(_data(), str(tmp_path / "x.csv"))


def test_convert_cli_then_train_on_disk(tmp_path, cache_dir):
    """`modalign convert` NPZ -> HDF5, a run on it with the data left on disk, and its split
    fingerprints equal to a run on the NPZ: the two runs are comparable."""
    data = _data(96)
    write_npz(data, tmp_path / "d.npz")
    p = run_cli(["convert", str(tmp_path / "d.npz"), str(tmp_path / "d.h5")], tmp_path, cache_dir)
    assert p.returncode == 0, p.stderr
    assert "wrote" in p.stdout and "96 samples" in p.stdout and (tmp_path / "d.h5").exists()
    assert not list(tmp_path.glob(".*partial*"))
    p = run_cli(["convert", str(tmp_path / "d.npz"), str(tmp_path / "d.csv")], tmp_path, cache_dir)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "d.csv" in p.stderr, p.stderr
    fps = {}
    for name, extra in (("d.npz", []), ("d.h5", ["data.lazy=true"])):
        p = run_cli(["train", "--quiet", "data=file", f"data.path={tmp_path / name}", *extra, "trainer.max_steps=4",
                     "trainer.batch_size=16", "trainer.eval_every=2", "encoder=cnn"], tmp_path, cache_dir)
        assert p.returncode == 0, p.stderr
        info = json.loads((tmp_path / p.stdout.strip().splitlines()[-1] / "run.json").read_text())
        assert info["status"] == "completed" and info["data"]["on_disk"] == (name == "d.h5")
        fps[name] = {s: v["fingerprint"] for s, v in info["data"]["splits"].items()}
    assert fps["d.npz"] == fps["d.h5"]


def test_docs_examples_of_the_three_formats_run(tmp_path, monkeypatch):
    """The copyable example of docs/data.md writes files that read back as the same data."""
    import re

    docs = Path(__file__).resolve().parents[1] / "docs" / "data.md"
    example = next(b for b in re.findall(r"```python\n(.*?)```", docs.read_text(), flags=re.S) if "h5py.File" in b)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MODALIGN_CACHE", str(tmp_path / "cache"))
    exec(compile(example, str(docs), "exec"), {})
    got = {}
    for name in ("mydata.h5", "mydata.parquet", "mydata_npy"):
        Path(Path(name).stem + ".jsonl").write_text(
            "".join(json.dumps({"id": f"rec{i:03d}", "caption": f"rec {i}"}) + "\n" for i in range(30)))
        data = read_data(name, lazy=True)
        assert data.lazy and len(data) == 30 and data.label_names == ["sitting", "walking", "running"]
        got[name] = data.fingerprint()
    assert len(set(got.values())) == 1


def test_a_killed_conversion_leaves_no_output_and_the_next_one_completes(tmp_path, cache_dir):
    """SIGKILL after the first chunk of arrays is written: OUT does not exist (only its temporary
    name), and converting again writes a complete OUT that reads back as the input."""
    write_npz(_data(96), tmp_path / "d.npz")
    out = tmp_path / "d.h5"
    p = run_cli(["convert", "--quiet", str(tmp_path / "d.npz"), str(out)], tmp_path, cache_dir,
                env_extra={"MODALIGN_FAULTS": "kill:convert_chunk@1"})
    assert p.returncode == -9, (p.returncode, p.stderr)
    assert not out.exists() and (tmp_path / ".d.h5.partial").exists()
    p = run_cli(["convert", "--quiet", str(tmp_path / "d.npz"), str(out)], tmp_path, cache_dir)
    assert p.returncode == 0, p.stderr
    assert not (tmp_path / ".d.h5.partial").exists()
    assert read_data(str(out), lazy=True).fingerprint() == read_npz(str(tmp_path / "d.npz")).fingerprint()


def test_bad_lazy_and_prefetch_settings_are_one_line(npz):
    with pytest.raises(UserError, match=r"'data.lazy'='maybe' must be auto, true or false"):
        read_data(str(npz), lazy="maybe")
    with pytest.raises(UserError, match=r"'data.prefetch'=-1 must be an integer >= 0"):
        read_data(str(npz), prefetch=-1)
    with pytest.raises(UserError, match="data file not found"):
        read_data(str(npz.parent / "absent.h5"))
