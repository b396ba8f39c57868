"""Arrays that stay on disk: the per-sample arrays of HDF5, Parquet and .npy-directory data, read by
rows when a batch needs them. Pure numpy (h5py / pyarrow imported by their backends); no torch.

A DiskArray looks like the [N, ...] numpy array it stands for where PairedData needs it (shape,
dtype, len, `take` for a split, `rows` for a batch) and is read in bounded chunks where the whole
array must be seen (validation, fingerprints, conversion). Rows come back in the canonical dtype
(int64 for ids, float32 for features), so every byte a fingerprint hashes is the byte the
in-memory NPZ path hashes: a data set converted from NPZ to HDF5 keeps its fingerprints.

Backends: `RowsBackend` (rows stored contiguously at an offset: an .npy file, an uncompressed HDF5
dataset; read with os.preadv, announced ahead with posix_fadvise), `H5Backend` (h5py, for chunked
or compressed datasets), `ParquetBackend` (row groups of a pyarrow column, a bounded cache of
decoded groups). Each opens its file on first read in the process that reads (so a DiskArray
pickles and forks); the h5py and Parquet ones read under a lock (the prefetch thread and an
evaluation may read at once).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import numpy as np

CHUNK_BYTES = 64 << 20  # rows per streamed chunk: about this many bytes


class Backend:
    """Reads rows of one on-disk array; subclasses implement _open and _read_sorted."""

    path: Path

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self._handle = None
        self._pid = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_lock"], state["_handle"], state["_pid"] = None, None, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def handle(self):
        if self._handle is None or self._pid != os.getpid():  # a forked child opens its own
            self._handle, self._pid = self._open(), os.getpid()
        return self._handle

    def read(self, rows: np.ndarray) -> np.ndarray:
        """rows: sorted, unique base-row indices -> their rows, in that order."""
        with self._lock:
            return self._read_sorted(rows)

    can_advise = False  # RowsBackend: the kernel can be asked to read rows ahead (posix_fadvise)

    def advise(self, rows: np.ndarray) -> None:
        """Rows that will be read soon (a no-op unless can_advise)."""

    def read_any(self, rows: np.ndarray) -> np.ndarray:
        """rows: base-row indices in any order, repeats allowed -> their rows, in that order."""
        uniq, inverse = np.unique(rows, return_inverse=True)
        out = self.read(uniq)
        if len(uniq) != len(rows) or not np.array_equal(uniq, rows):
            out = out[inverse]
        return out

    def identity(self) -> list:
        """What names this array's bytes for the fingerprint cache: the file, its size and mtime."""
        st = self.path.stat()
        return [str(self.path.resolve()), st.st_size, st.st_mtime_ns, getattr(self, "key", "")]

    def _open(self):
        raise NotImplementedError

    def _read_sorted(self, rows: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class RowsBackend(Backend):
    """Rows stored contiguously at a byte offset of a file, C order (an .npy file's data, an
    uncompressed HDF5 dataset): each row is read with os.preadv straight into its place in the
    batch, in the order asked, without the GIL, a lock, or mapping the file (page-cache pages are
    not the process's memory)."""

    def __init__(self, path: Path, offset: int, row_shape: tuple[int, ...], dtype, key: str = ""):
        super().__init__(path)
        self.offset, self.row_shape, self.raw, self.key = int(offset), tuple(row_shape), np.dtype(dtype), key
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.raw.itemsize

    def _open(self):
        return os.open(self.path, os.O_RDONLY)

    def __del__(self):
        if getattr(self, "_handle", None) is not None and self._pid == os.getpid():
            try:
                os.close(self._handle)
            except OSError:
                pass

    can_advise = hasattr(os, "posix_fadvise")

    def read(self, rows):
        return self.read_any(rows)

    def advise(self, rows):
        """posix_fadvise(WILLNEED) for each row: the kernel reads them into the page cache in the
        background (no thread of ours, no CPU taken from the training step while it waits)."""
        if self.can_advise:
            fd = self.handle()
            for r in rows:
                os.posix_fadvise(fd, self.offset + int(r) * self.row_bytes, self.row_bytes, os.POSIX_FADV_WILLNEED)

    def read_any(self, rows):
        fd = self.handle()
        if len(rows) > 1:
            # ask for every row first: the kernel reads them in parallel instead of one blocking read
            # after another (cold reads of a batch: about 15% faster steps measured)
            self.advise(rows)
        out = np.empty((len(rows),) + self.row_shape, self.raw)
        flat = out.reshape(len(rows), -1).view(np.uint8).reshape(len(rows), self.row_bytes) if len(rows) else out
        run = 0
        for j in range(len(rows)):  # consecutive rows that follow each other in the file: one read
            if j + 1 < len(rows) and rows[j + 1] == rows[j] + 1:
                continue
            first = int(rows[run])
            view = memoryview(flat[run: j + 1]).cast("B")
            got = os.preadv(fd, [view], self.offset + first * self.row_bytes)
            while got < len(view):  # a short read (rare on regular files): the rest
                n = os.preadv(fd, [view[got:]], self.offset + first * self.row_bytes + got)
                if n == 0:
                    raise OSError(f"{self.path}: file ends before row {first + (got // self.row_bytes)}")
                got += n
            run = j + 1
        return out


def npy_rows(path: Path, key: str) -> "RowsBackend":
    """A RowsBackend over the data of a C-order .npy file (its header read with numpy)."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        shape, fortran, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                                 else np.lib.format.read_array_header_2_0(f))
        offset = f.tell()
    if fortran and len(shape) > 1:
        raise ValueError("Fortran-ordered arrays are not read by rows; save with np.save(np.ascontiguousarray(x))")
    return RowsBackend(path, offset, shape[1:], dtype, key)


class H5Backend(Backend):
    def __init__(self, path: Path, key: str):
        super().__init__(path)
        self.key = key

    def _open(self):
        import h5py

        return h5py.File(self.path, "r")[self.key]

    def _read_sorted(self, rows):
        ds = self.handle()
        if len(rows) == 0:
            return np.zeros((0,) + ds.shape[1:], ds.dtype)
        if rows[-1] - rows[0] + 1 == len(rows):
            return ds[int(rows[0]): int(rows[-1]) + 1]
        return ds[rows]  # h5py: increasing, unique indices along the first axis


class ParquetBackend(Backend):
    """One column of a Parquet file, each row a fixed-shape tensor; decoded row groups are kept in
    a cache of at most `cache_bytes` (random rows of a file larger than it re-read groups)."""

    def __init__(self, path: Path, key: str, row_shape: tuple[int, ...], group_rows: list[int],
                 cache_bytes: int = 256 << 20):
        super().__init__(path)
        self.key, self.row_shape = key, row_shape
        self.starts = np.concatenate([[0], np.cumsum(group_rows)]).astype(np.int64)
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()

    def __getstate__(self):
        state = super().__getstate__()
        state["_cache"] = OrderedDict()
        return state

    def _open(self):
        import pyarrow.parquet as pq

        return pq.ParquetFile(self.path, memory_map=True)

    def _group(self, g: int) -> np.ndarray:
        if g in self._cache:
            self._cache.move_to_end(g)
            return self._cache[g]
        col = self.handle().read_row_group(g, columns=[self.key]).column(0)
        arr = tensor_column_to_numpy(col, self.row_shape)
        self._cache[g] = arr
        while len(self._cache) > 1 and sum(a.nbytes for a in self._cache.values()) > self.cache_bytes:
            self._cache.popitem(last=False)
        return arr

    def _read_sorted(self, rows):
        groups = np.searchsorted(self.starts, rows, side="right") - 1
        parts = []
        for g in np.unique(groups):
            sel = rows[groups == g] - self.starts[g]
            parts.append(self._group(int(g))[sel])
        if not parts:
            return np.zeros((0,) + self.row_shape, np.float32)
        return np.concatenate(parts)


def tensor_column_to_numpy(col, row_shape: tuple[int, ...]) -> np.ndarray:
    """A pyarrow (chunked) column of fixed-shape tensors or (nested) fixed-size lists -> [n, *row_shape]."""
    import pyarrow as pa

    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    if isinstance(col, pa.ExtensionArray):
        col = col.storage
    n = len(col)
    values = col
    while pa.types.is_fixed_size_list(values.type):
        values = values.flatten()
    return values.to_numpy(zero_copy_only=False).reshape((n,) + tuple(row_shape))


class DiskArray:
    """An [N, ...] array on disk, or a view of some of its rows (a split).

    shape, dtype (canonical: what rows() returns), len(); rows(idx) reads rows in the order asked;
    take(idx) a view; chunks() streams every row in order."""

    ndim: int

    def __init__(self, backend: Backend, shape: tuple[int, ...], dtype, raw_dtype, base_rows: np.ndarray | None = None):
        self.backend = backend
        self.base_shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.raw_dtype = np.dtype(raw_dtype)
        self.base_rows = base_rows  # None = every row of the file, in order
        n = self.base_shape[0] if base_rows is None else len(base_rows)
        self.shape = (n,) + self.base_shape[1:]
        self.ndim = len(self.shape)
        self._stats: dict = {}

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"DiskArray({self.backend.path}:{getattr(self.backend, 'key', '')}, shape={self.shape}, dtype={self.dtype})"

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def take(self, idx: np.ndarray) -> "DiskArray":
        idx = np.asarray(idx, dtype=np.int64)
        base = idx if self.base_rows is None else self.base_rows[idx]
        return DiskArray(self.backend, self.base_shape, self.dtype, self.raw_dtype, base)

    def rows(self, idx) -> np.ndarray:
        """Rows idx (any order, repeats allowed) as a new in-memory array of the canonical dtype."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        base = idx if self.base_rows is None else self.base_rows[idx]
        return np.ascontiguousarray(self.backend.read_any(base), dtype=self.dtype)

    @property
    def can_advise(self) -> bool:
        return self.backend.can_advise

    def advise(self, idx) -> None:
        """Rows idx will be read soon: let the kernel read them ahead where the backend can."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        self.backend.advise(idx if self.base_rows is None else self.base_rows[idx])

    def chunk_rows(self) -> int:
        per_row = max(1, int(np.prod(self.shape[1:])) * max(self.dtype.itemsize, self.raw_dtype.itemsize))
        return max(1, CHUNK_BYTES // per_row)

    def chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, rows) for every row in order, about CHUNK_BYTES at a time."""
        step = self.chunk_rows()
        for start in range(0, len(self), step):
            yield start, self.rows(np.arange(start, min(len(self), start + step)))

    def identity(self) -> list:
        return self.backend.identity()


def is_lazy(a) -> bool:
    return isinstance(a, DiskArray)


def gather(a, idx) -> np.ndarray:
    """Rows idx of an in-memory or on-disk array."""
    return a.rows(idx) if isinstance(a, DiskArray) else a[idx]


def take(a, idx):
    """A split's rows: a view for a DiskArray (nothing read), a copy for numpy."""
    if a is None:
        return None
    return a.take(idx) if isinstance(a, DiskArray) else a[idx]


def chunks(a, advance=None) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, rows) over the whole array: one chunk for numpy, bounded chunks from disk.
    advance(nbytes), if given, is called after each chunk (a progress bar)."""
    for start, chunk in (a.chunks() if isinstance(a, DiskArray) else [(0, a)]):
        yield start, chunk
        if advance is not None:
            advance(chunk.nbytes)


def array_max(a) -> int:
    """The largest value of an integer array (cached for a DiskArray: one pass over the file)."""
    if isinstance(a, DiskArray):
        if "max" not in a._stats:
            a._stats["max"] = max(int(c.max()) if c.size else 0 for _, c in a.chunks())
        return a._stats["max"]
    return int(a.max())


def materialize(a):
    """The whole array in memory (numpy stays as it is)."""
    if isinstance(a, DiskArray):
        return a.rows(np.arange(len(a)))
    return a


# results of a pass over on-disk arrays (fingerprints, validation), keyed by the files' identities:
# a sweep's jobs, and every later run on an unchanged file, skip the pass
def cache_dir() -> Path:
    root = os.environ.get("MODALIGN_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "modalign") / "data"


def cache_get(key: str) -> str | None:
    try:
        return (cache_dir() / key).read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def cache_put(key: str, value: str) -> None:
    """Written atomically (a temporary file renamed); a cache that cannot be written is skipped."""
    d = cache_dir()
    try:
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".{key}.{os.getpid()}.{threading.get_ident()}"
        tmp.write_text(value + "\n", encoding="utf-8")
        os.replace(tmp, d / key)
    except OSError:
        pass
