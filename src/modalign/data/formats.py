"""Paired data in four file formats, one layout: the arrays of docs/data.md under their names, the
captions in DATA.jsonl (or DATA.json) beside the data, class prompts in DATA.prompts.json.

    DATA.npz        an NPZ archive (read into memory; modalign.data.npz)
    DATA.h5         HDF5 (h5py): one dataset per array at the root of the file
    DATA.parquet    Parquet (pyarrow): one row per sample; ids, split, lengths, labels as plain
                    columns, tokens_id / tokens_cont / globals as fixed-shape tensor (or fixed-size
                    list) columns; label_names and vocab in the file's "modalign" metadata (JSON)
    DATA/           a directory of .npy files, one per array (memory-mapped)

HDF5, Parquet and .npy directories are read lazily: ids, splits, lengths and labels are read at
once, tokens_id / tokens_cont / globals stay on disk as DiskArrays and a batch reads its rows
(`data.lazy`, default auto: lazy when those arrays exceed LAZY_ABOVE bytes). Validation and the
one-line errors are those of NPZ. `convert` writes any format from any other, streaming.
"""

from __future__ import annotations

import difflib
import json
import shutil
from pathlib import Path

import numpy as np

from modalign.data.arrays import (DiskArray, H5Backend, ParquetBackend, RowsBackend, chunks, is_lazy,
                                  materialize, npy_rows)
from modalign.data.npz import (ARRAYS, _one_line, array_items, from_arrays, read_npz, write_npy, write_npz_arrays,
                               write_sidecars)
from modalign import faults
from modalign.data.paired import PairedData
from modalign.errors import UserError

PREFETCH = 4  # the default of data.prefetch (modalign.data.batches reads that many batches ahead)
PER_SAMPLE = ("tokens_id", "tokens_cont", "globals")  # the arrays that may stay on disk
CANONICAL = {"tokens_id": np.int64, "tokens_cont": np.float32, "globals": np.float32}
LAZY_ABOVE = 1 << 30  # data.lazy=auto: keep the per-sample arrays on disk above this many bytes
SUFFIXES = {".npz": "npz", ".h5": "hdf5", ".hdf5": "hdf5", ".hdf": "hdf5", ".parquet": "parquet", ".pq": "parquet"}
PARQUET_META = b"modalign"  # Parquet key-value metadata: {"label_names": [...], "vocab": [...]}


def format_of(path: Path, writing: bool = False) -> str:
    """npz, hdf5, parquet or npy (a directory) from the path: an existing directory or a name
    without a suffix is an .npy directory."""
    if path.is_dir() or (writing and path.suffix == ""):
        return "npy"
    fmt = SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise UserError(f"{path}: unknown data format '{path.suffix}' (expected .npz, .h5/.hdf5, .parquet, "
                        f"or a directory of .npy files)")
    return fmt


def read_data(path: str, captions: str | None = None, name: str | None = None, lazy="auto",
              prefetch: int = PREFETCH) -> PairedData:
    """Read paired data in any of the four formats (chosen by the path); validated.

    lazy: auto (on disk above LAZY_ABOVE bytes), true (on disk), false (read into memory).
    prefetch: batches a background thread reads ahead while training on data that stays on disk."""
    p = Path(path)
    if lazy not in ("auto", True, False):
        raise UserError(f"config: 'data.lazy'={lazy!r} must be auto, true or false")
    if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
        raise UserError(f"config: 'data.prefetch'={prefetch!r} must be an integer >= 0 (batches read ahead)")
    if not p.exists():
        raise UserError(f"{p}: data file not found")
    fmt = format_of(p)
    if fmt == "npz":
        return read_npz(path, captions, name)
    arrays = {"hdf5": _hdf5_arrays, "parquet": _parquet_arrays, "npy": _npy_arrays}[fmt](p)
    on_disk = sum(a.nbytes for a in arrays.values() if is_lazy(a))
    if lazy is False or (lazy == "auto" and on_disk <= LAZY_ABOVE):
        arrays = {k: materialize(a) for k, a in arrays.items()}
    data = from_arrays(str(p), arrays, p, captions, name)
    data.meta.update(format=fmt, prefetch=prefetch)
    return data


def write_data(data: PairedData, path: str, captions: str | None = None, compress: bool = False,
               fmt: str | None = None) -> str:
    """Write `data` to `path` in the format its name says (or `fmt`); arrays on disk are streamed.
    compress: deflate NPZ members, gzip HDF5 datasets, zstd Parquet pages (.npy files never are).
    The captions and class prompts go beside `path` (write_sidecars). -> the format."""
    p = Path(path)
    fmt = fmt or format_of(p, writing=True)
    _write_arrays(data, p, fmt, compress)
    write_sidecars(data, p, captions)
    return fmt


def _write_arrays(data: PairedData, p: Path, fmt: str, compress: bool, advance=None) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    writer = {"npz": write_npz_arrays, "hdf5": _write_hdf5, "parquet": _write_parquet, "npy": _write_npy_dir}[fmt]
    writer(data, p, compress, advance)


def convert(src: str, dst: str, captions: str | None = None, compress: bool = False,
            progress=None) -> tuple[PairedData, str]:
    """Read SRC (lazily) and write DST with its captions and prompts beside it.
    -> (data, format of DST). The arrays are written under a temporary name and renamed at the end:
    an interrupted conversion leaves no half-written DST. progress(data) -> advance(nbytes), if given."""
    out = Path(dst)
    fmt = format_of(out, writing=True)
    if out.exists() and out.resolve() == Path(src).resolve():
        raise UserError(f"{dst}: the output is the input; give another path")
    data = read_data(src, captions=captions, lazy=True)
    theirs = Path(data.meta["captions"]).resolve()
    shared = theirs in (out.with_suffix(".jsonl").resolve(), out.with_suffix(".json").resolve())
    if not shared and out.with_suffix(".json").exists():  # with OUT.jsonl beside it, OUT would not read
        raise UserError(f"{out.with_suffix('.json')}: exists; remove it (the converted captions go to "
                        f"{out.with_suffix('.jsonl')})")
    tmp = out.with_name(f".{out.name}.partial")
    _remove(tmp)
    shown = progress(data) if progress is not None else None

    def advance(nbytes: int) -> None:
        if shown is not None:
            shown(nbytes)
        faults.kill_if("kill:convert_chunk")  # the reliability test's kill after the n-th chunk

    _write_arrays(data, tmp, fmt, compress, advance)
    # shared: the same name as the input's (data.npz -> data.h5): its captions are already there
    write_sidecars(data, out, with_captions=not shared)
    _remove(out)
    tmp.replace(out)
    return data, fmt


def _remove(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p)
    elif p.exists():
        p.unlink()


# readers -------------------------------------------------------------------------------------------
def _unknown(src: str, key: str) -> UserError:
    close = difflib.get_close_matches(key, list(ARRAYS), n=1)
    guess = f" (did you mean '{close[0]}'?)" if close else ""
    return UserError(f"{src}: unknown array '{key}'{guess}; known arrays: {', '.join(ARRAYS)}")


def _hdf5_arrays(p: Path) -> dict:
    import h5py

    src = str(p)
    if p.is_dir():
        raise UserError(f"{src}: is a directory, expected an HDF5 file")
    try:
        f = h5py.File(p, "r")
    except OSError as e:
        raise UserError(f"{src}: not an HDF5 file or unreadable ({_one_line(e)})") from None
    with f:
        arrays = {}
        for key in f:
            node = f[key]
            if key not in ARRAYS:
                raise _unknown(src, key)
            if not isinstance(node, h5py.Dataset):
                raise UserError(f"{src}: '{key}' is a group; modalign reads one dataset per array at the root of the file")
            if node.shape is None or len(node.shape) == 0:
                raise UserError(f"{src}: '{key}' is a scalar, expected an array with one row per sample")
            if key in PER_SAMPLE:
                if node.dtype.kind not in "iufb":
                    raise UserError(f"{src}: '{key}' has dtype {node.dtype}, expected numbers")
                arrays[key] = DiskArray(_h5_backend(p, key, node), node.shape, CANONICAL[key], node.dtype)
            else:
                try:
                    if h5py.check_string_dtype(node.dtype) is not None and node.dtype.kind == "O":
                        arrays[key] = np.asarray(node.asstr()[()], dtype=str)
                    else:
                        arrays[key] = node[()]
                except (OSError, ValueError, UnicodeDecodeError) as e:
                    raise UserError(f"{src}: array '{key}' is corrupt or unreadable ({_one_line(e)})") from None
                if arrays[key].dtype.kind == "O":
                    raise UserError(f"{src}: array '{key}' has dtype {node.dtype}, which modalign does not read; "
                                    f"store strings as variable-length UTF-8 (h5py.string_dtype()) and numbers as numbers")
    return arrays


def _h5_backend(p: Path, key: str, ds):
    """Rows read straight from the file where the dataset is one contiguous, unfiltered block of a
    native numeric type (what `modalign convert` writes without --compress); else through h5py."""
    offset = ds.id.get_offset()
    if offset is not None and ds.chunks is None and ds.compression is None and ds.dtype.isnative and ds.dtype.kind in "iufb":
        return RowsBackend(p, offset, ds.shape[1:], ds.dtype, key)
    return H5Backend(p, key)


def _parquet_arrays(p: Path) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = str(p)
    if p.is_dir():
        raise UserError(f"{src}: is a directory, expected a Parquet file")
    try:
        pf = pq.ParquetFile(p)
        schema = pf.schema_arrow
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{src}: not a Parquet file or unreadable ({_one_line(e)})") from None
    md = pf.metadata
    arrays: dict = {}
    scalar_cols = []
    for i, field in enumerate(schema):
        key = field.name
        if key not in ARRAYS:
            raise _unknown(src, key)
        if key in ("label_names", "vocab"):
            raise UserError(f"{src}: '{key}' is a column; it is not per sample: put it in the file's "
                            f"'modalign' metadata (JSON), as `modalign convert` writes it")
        nulls = sum((md.row_group(g).column(i).statistics.null_count or 0)
                    for g in range(md.num_row_groups) if md.row_group(g).column(i).statistics is not None)
        if nulls:
            raise UserError(f"{src}: column '{key}' has {nulls} null values; every sample needs a value")
        if key in PER_SAMPLE:
            shape, value_type = _tensor_shape(field.type)
            if shape is None:
                raise UserError(f"{src}: column '{key}' has type {field.type}, expected a fixed-shape tensor or "
                                f"fixed-size list per sample (pyarrow.FixedShapeTensorArray.from_numpy_ndarray, "
                                f"or `modalign convert DATA.npz DATA.parquet`)")
            raw = value_type.to_pandas_dtype() if pa.types.is_integer(value_type) or pa.types.is_floating(value_type) else None
            if raw is None:
                raise UserError(f"{src}: column '{key}' holds {value_type}, expected numbers")
            groups = [md.row_group(g).num_rows for g in range(md.num_row_groups)]
            arrays[key] = DiskArray(ParquetBackend(p, key, shape, groups), (md.num_rows,) + shape, CANONICAL[key], raw)
        else:
            scalar_cols.append(key)
    if scalar_cols:
        try:
            table = pf.read(columns=scalar_cols)
        except (pa.ArrowException, OSError) as e:
            raise UserError(f"{src}: cannot read columns {', '.join(scalar_cols)} ({_one_line(e)})") from None
        for key in scalar_cols:
            col = table.column(key)
            if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
                arrays[key] = np.asarray(col.to_pylist(), dtype=str)
            elif pa.types.is_integer(col.type) or pa.types.is_floating(col.type) or pa.types.is_boolean(col.type):
                arrays[key] = col.to_numpy()
            else:
                raise UserError(f"{src}: column '{key}' has type {col.type}, expected "
                                f"{'strings' if key in ('ids', 'split') else 'integers'}")
    meta = (schema.metadata or {}).get(PARQUET_META)
    if meta is not None:
        try:
            extra = json.loads(meta)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{src}: the 'modalign' metadata is not JSON ({_one_line(e)})") from None
        if not isinstance(extra, dict):
            raise UserError(f"{src}: the 'modalign' metadata must be a JSON object with label_names and/or vocab")
        for key, value in extra.items():
            if key not in ("label_names", "vocab"):
                raise UserError(f"{src}: unknown key '{key}' in the 'modalign' metadata (known: label_names, vocab)")
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise UserError(f"{src}: '{key}' in the 'modalign' metadata must be a list of strings")
            arrays[key] = np.asarray(value, dtype=str)
    return arrays


def _tensor_shape(t):
    """(row shape, value type) of a fixed-shape tensor or (nested) fixed-size list type, else (None, None)."""
    import pyarrow as pa

    if isinstance(t, pa.FixedShapeTensorType):
        if t.permutation is not None and list(t.permutation) != sorted(t.permutation):
            return None, None
        return tuple(int(s) for s in t.shape), t.value_type
    shape = []
    while pa.types.is_fixed_size_list(t):
        shape.append(int(t.list_size))
        t = t.value_type
    return (tuple(shape), t) if shape else (None, None)


def _npy_arrays(p: Path) -> dict:
    src = str(p)
    files = sorted(p.glob("*.npy"))
    others = [f.name for f in p.iterdir() if f.suffix != ".npy" and not f.name.startswith(".")]
    if others:
        raise UserError(f"{src}: '{others[0]}' is not an .npy file; an .npy directory holds one NAME.npy per array "
                        f"(captions go in {p.with_suffix('.jsonl')} beside it)")
    if not files:
        raise UserError(f"{src}: no .npy files in the directory; save one per array: np.save(DIR/'ids.npy', ids), ...")
    arrays = {}
    for f in files:
        key = f.stem
        if key not in ARRAYS:
            raise _unknown(str(f), key)
        try:
            mm = np.load(f, mmap_mode="r", allow_pickle=False)
        except ValueError as e:
            if "Object arrays" in str(e) or "allow_pickle" in str(e) or "Python objects" in str(e):
                raise UserError(f"{f}: an object array, and modalign does not unpickle data; store strings with "
                                f"np.array(..., dtype=str) and pad ragged arrays") from None
            raise UserError(f"{f}: not a valid .npy file ({_one_line(e)})") from None
        except (OSError, EOFError) as e:
            raise UserError(f"{f}: not a valid .npy file ({_one_line(e)})") from None
        if mm.dtype.kind == "O":
            raise UserError(f"{f}: an object array; store strings with np.array(..., dtype=str)")
        if key in PER_SAMPLE:
            if mm.ndim == 0:
                raise UserError(f"{f}: a scalar, expected one row per sample")
            try:
                backend = npy_rows(f, key)
            except ValueError as e:
                raise UserError(f"{f}: {e}") from None
            arrays[key] = DiskArray(backend, mm.shape, CANONICAL[key], mm.dtype)
        else:
            arrays[key] = np.array(mm)
        del mm
    return arrays


# writers -------------------------------------------------------------------------------------------
def _write_hdf5(data: PairedData, p: Path, compress: bool, advance=None) -> None:
    import h5py

    with h5py.File(p, "w") as f:
        for key, arr in array_items(data).items():
            if arr.dtype.kind == "U":
                f.create_dataset(key, data=arr.astype(object), dtype=h5py.string_dtype("utf-8"))
                continue
            # a row per chunk keeps random row reads to the row's own bytes when compressed;
            # uncompressed datasets are contiguous, the fastest to read by rows
            opts = {"compression": "gzip", "compression_opts": 4, "chunks": (1,) + tuple(arr.shape[1:])} \
                if compress and arr.ndim > 1 else {}
            ds = f.create_dataset(key, shape=arr.shape, dtype=arr.dtype, **opts)
            for start, chunk in chunks(arr, advance):
                ds[start: start + len(chunk)] = chunk


def _write_parquet(data: PairedData, p: Path, compress: bool, advance=None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    items = array_items(data)
    meta = {k: items.pop(k).tolist() for k in ("label_names", "vocab") if k in items}
    tensors = {k: items.pop(k) for k in PER_SAMPLE if k in items}
    n = len(data)
    # row groups of about 4 MB: a batch of random rows decodes each group it touches whole (docs/data.md)
    per_row = sum(int(np.prod(a.shape[1:])) * a.dtype.itemsize for a in tensors.values()) or 1
    group = max(1, min(n, (4 << 20) // per_row))

    def column(key, arr):
        if key in tensors:
            a = np.ascontiguousarray(arr)
            return pa.FixedShapeTensorArray.from_numpy_ndarray(a) if a.ndim > 2 else \
                pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), a.shape[1])
        return pa.array(arr)

    writer = None
    try:
        for start in range(0, n, group):
            idx = np.arange(start, min(n, start + group))
            cols = {k: column(k, a[idx]) for k, a in items.items()}
            small = sum(a[idx].nbytes for a in items.values())
            block = {k: a.rows(idx) if is_lazy(a) else a[idx] for k, a in tensors.items()}
            cols.update({k: column(k, a) for k, a in block.items()})
            if advance is not None:
                advance(small + sum(a.nbytes for a in block.values()))
            table = pa.table(cols)
            if writer is None:
                schema = table.schema.with_metadata({PARQUET_META: json.dumps(meta).encode()} if meta else {})
                writer = pq.ParquetWriter(p, schema, compression="zstd" if compress else "none")
            writer.write_table(table.replace_schema_metadata(writer.schema.metadata), row_group_size=group)
    finally:
        if writer is not None:
            writer.close()


def _write_npy_dir(data: PairedData, p: Path, compress: bool, advance=None) -> None:
    p.mkdir(parents=True, exist_ok=True)
    for key, arr in array_items(data).items():
        with open(p / f"{key}.npy", "wb") as f:
            write_npy(f, arr, advance)
