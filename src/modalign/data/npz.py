"""Read and write paired data as an NPZ archive plus a captions file. Pure numpy/json; no torch.

    DATA.npz           ids [N] str, tokens_id [N, T] int and/or tokens_cont [N, T, C] float, and
                       optional split, lengths, globals, labels, label_names, vocab
    DATA.jsonl         {"id": ..., "captions": [...] | "caption": "...", "facts": {...}} per line
      or DATA.json     {id: [captions] | "caption" | {"captions": [...], "facts": {...}}}
    DATA.prompts.json  optional {label name: [prompt, ...]} for zero-shot classification

The format is documented for users in docs/data.md. Every problem raises a one-line UserError that
names the file and the key, line or sample at fault; arrays are loaded with allow_pickle=False.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from modalign.data.arrays import chunks, is_lazy
from modalign.data.paired import SPLITS, PairedData
from modalign.errors import UserError

# name -> what the array is; the order is the order of the docs table and of error messages
ARRAYS = {
    "ids": "[N] str, required",
    "split": "[N] str, train/val/test",
    "tokens_id": "[N, T] int, 0 = padding",
    "tokens_cont": "[N, T, C] float",
    "lengths": "[N] int",
    "globals": "[N, G] float",
    "labels": "[N] int, -1 = unknown",
    "label_names": "[K] str",
    "vocab": "[V] str",
}
CAPTION_KEYS = ("id", "captions", "caption", "facts")


def read_npz(path: str, captions: str | None = None, name: str | None = None) -> PairedData:
    """Load DATA.npz and its captions (DATA.jsonl or DATA.json beside it, or `captions`).

    Class prompts are read from DATA.prompts.json beside the npz when it exists. The result is
    validated; any problem raises UserError.
    """
    npz_path = Path(path)
    return from_arrays(str(npz_path), _load_arrays(npz_path), npz_path, captions, name)


def from_arrays(src: str, arrays: dict, path: Path, captions: str | None, name: str | None) -> PairedData:
    """Validate the arrays of any format (numpy, or DiskArrays that stay on disk) and read the
    captions (PATH.jsonl / PATH.json beside `path`, or `captions`) and class prompts
    (PATH.prompts.json) into a validated PairedData."""
    if "ids" not in arrays:
        present = ", ".join(sorted(arrays)) or "none"
        raise UserError(f"{src}: required array 'ids' is missing (arrays present: {present})")
    ids = _strings(src, "ids", arrays["ids"], ints_ok=True)
    n = len(ids)
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():  # before the captions, which are matched by id; same message as validate()
        raise UserError(f"{src}: duplicate sample id '{uniq[counts > 1][0]}' ({counts[counts > 1][0]} times)")

    tokens_id = _integers(src, "tokens_id", arrays.get("tokens_id"), ndim=2, shape="[N, T]")
    tokens_cont = _floats(src, "tokens_cont", arrays.get("tokens_cont"), ndim=3, shape="[N, T, C]",
                          hint="; for one channel use x[..., None]")
    globals_ = _floats(src, "globals", arrays.get("globals"), ndim=2, shape="[N, G]",
                       hint="; for one feature use g[:, None]")
    labels = _integers(src, "labels", arrays.get("labels"), ndim=1, shape="[N]")
    label_names = None if "label_names" not in arrays else _strings(src, "label_names", arrays["label_names"]).tolist()
    vocab = None if "vocab" not in arrays else _strings(src, "vocab", arrays["vocab"]).tolist()
    if tokens_id is None and tokens_cont is None:
        raise UserError(f"{src}: neither 'tokens_id' nor 'tokens_cont' is present; give at least one")
    T = int((tokens_id if tokens_id is not None else tokens_cont).shape[1])

    lengths = _integers(src, "lengths", arrays.get("lengths"), ndim=1, shape="[N]")
    if lengths is None:
        lengths = np.full(n, T, dtype=np.int64)

    if "split" in arrays:
        split = _strings(src, "split", arrays["split"])
        split_from = "file"
    else:
        split = hash_split(ids)
        split_from = "sha256 of id"
        for s in SPLITS:
            if not (split == s).any():
                raise UserError(f"{src}: no 'split' array, and the sha256 split of the {n} ids leaves '{s}' "
                                f"empty; add a 'split' array with train/val/test per sample")

    cap_path = _captions_path(path, captions)
    caps, facts = _read_captions(cap_path, ids)
    prompts_path = path.with_suffix(".prompts.json")
    class_prompts = _read_prompts(prompts_path, label_names, src) if prompts_path.exists() else None

    data = PairedData(
        name=name or path.stem, source=src, ids=ids, split=split, lengths=lengths, captions=caps,
        tokens_id=tokens_id, tokens_cont=tokens_cont, globals=globals_, labels=labels,
        label_names=label_names, class_prompts=class_prompts, facts=facts, vocab=vocab,
        meta={"captions": str(cap_path), "prompts": str(prompts_path) if class_prompts else None,
              "split_from": split_from},
    )
    return data.validate()


def write_npz(data: PairedData, path: str, captions: str | None = None) -> None:
    """Write `data` so that read_npz(path, captions) gives it back.

    Captions go to `captions` (.jsonl, or .json for the {id: ...} form), by default DATA.jsonl
    beside the npz; class prompts, if any, to DATA.prompts.json beside the npz. Arrays that stay
    on disk (DiskArray) are streamed into the archive in bounded chunks.
    """
    npz_path = Path(path)
    npz_path.parent.mkdir(parents=True, exist_ok=True)
    write_npz_arrays(data, npz_path)
    write_sidecars(data, npz_path, captions)


def write_npz_arrays(data: PairedData, npz_path: Path, compress: bool = True, advance=None) -> None:
    """The arrays alone, as np.savez_compressed would (np.savez with compress=False)."""
    mode = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(npz_path, "w", compression=mode, allowZip64=True) as zf:
        for key, arr in array_items(data).items():
            with zf.open(f"{key}.npy", "w", force_zip64=True) as f:
                write_npy(f, arr, advance)


def array_items(data: PairedData) -> dict:
    """name -> array (numpy in the canonical dtype, or a DiskArray) of everything a data file holds."""
    out: dict = {"ids": np.asarray(data.ids, dtype=str), "split": np.asarray(data.split, dtype=str),
                 "lengths": np.asarray(data.lengths, dtype=np.int64)}
    optional = {"tokens_id": (data.tokens_id, np.int64), "tokens_cont": (data.tokens_cont, np.float32),
                "globals": (data.globals, np.float32), "labels": (data.labels, np.int64),
                "label_names": (data.label_names, str), "vocab": (data.vocab, str)}
    for key, (arr, dtype) in optional.items():
        if arr is not None:
            out[key] = arr if is_lazy(arr) else np.asarray(arr, dtype=dtype)
    return out


def write_npy(f, arr, advance=None) -> None:
    """One array in .npy format to a binary file object, a DiskArray chunk by chunk."""
    header = {"descr": np.lib.format.dtype_to_descr(arr.dtype), "fortran_order": False, "shape": tuple(arr.shape)}
    np.lib.format.write_array_header_2_0(f, header)
    for _, chunk in chunks(arr, advance):
        f.write(np.ascontiguousarray(chunk, dtype=arr.dtype).tobytes())


def write_sidecars(data: PairedData, path: Path, captions: str | None = None, with_captions: bool = True) -> None:
    """The captions (PATH.jsonl, or `captions`: .jsonl, or .json for the {id: ...} form) and the
    class prompts (PATH.prompts.json) of data stored at `path`."""
    cap_path = Path(captions) if captions is not None else path.with_suffix(".jsonl")
    ids = [str(i) for i in data.ids]
    if not with_captions:
        pass
    elif cap_path.suffix == ".json":
        if data.facts is None:
            obj: dict[str, Any] = dict(zip(ids, data.captions))
        else:
            obj = {i: {"captions": c, "facts": f} for i, c, f in zip(ids, data.captions, data.facts)}
        cap_path.write_text(json.dumps(obj, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    else:
        with open(cap_path, "w", encoding="utf-8") as f:
            for k, i in enumerate(ids):
                row: dict[str, Any] = {"id": i, "captions": data.captions[k]}
                if data.facts is not None:
                    row["facts"] = data.facts[k]
                f.write(json.dumps(row, ensure_ascii=False) + "\n")

    if data.class_prompts is not None:
        if data.label_names is None:
            raise UserError(f"{path}: class prompts need 'label_names' to be written")
        prompts = dict(zip(data.label_names, data.class_prompts))
        path.with_suffix(".prompts.json").write_text(
            json.dumps(prompts, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def hash_split(ids: np.ndarray) -> np.ndarray:
    """[N] str split from the ids alone: sha256(id) mod 10 → 0-7 train, 8 val, 9 test (80/10/10)."""
    bucket = [int(hashlib.sha256(str(i).encode("utf-8")).hexdigest(), 16) % 10 for i in ids]
    return np.array(["train" if b < 8 else "val" if b == 8 else "test" for b in bucket], dtype=str)


def _load_arrays(npz_path: Path) -> dict[str, np.ndarray]:
    src = str(npz_path)
    if not npz_path.exists():
        raise UserError(f"{src}: data file not found")
    if npz_path.is_dir():
        raise UserError(f"{src}: is a directory, expected an .npz file")
    with open(npz_path, "rb") as f:
        magic = f.read(6)
    if magic[:2] != b"PK" and magic != b"\x93NUMPY":
        raise UserError(f"{src}: not an .npz archive (not a zip file); write it with np.savez or np.savez_compressed")
    try:
        archive = np.load(npz_path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"{src}: corrupt or truncated .npz archive ({_one_line(e)})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise UserError(f"{src}: is a single .npy array, not an .npz archive; save with "
                        f"np.savez(path, ids=..., tokens_cont=..., ...)")
    with archive:
        unknown = [k for k in archive.files if k not in ARRAYS]
        if unknown:
            key = unknown[0]
            close = difflib.get_close_matches(key, list(ARRAYS), n=1)
            guess = f" (did you mean '{close[0]}'?)" if close else ""
            raise UserError(f"{src}: unknown array '{key}'{guess}; known arrays: {', '.join(ARRAYS)}")
        arrays = {}
        for key in archive.files:
            try:
                arr = archive[key]
            except ValueError as e:
                if "Object arrays" in str(e):
                    raise UserError(_object_message(src, key)) from None
                raise UserError(f"{src}: array '{key}' is corrupt ({_one_line(e)})") from None
            except (OSError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError) as e:
                # NotImplementedError: an unknown compression method; RuntimeError: an encrypted member
                raise UserError(f"{src}: array '{key}' is corrupt ({_one_line(e)})") from None
            if not isinstance(arr, np.ndarray):
                raise UserError(f"{src}: member '{key}' is not a numpy array")
            if arr.dtype.kind == "O":
                raise UserError(_object_message(src, key))
            arrays[key] = arr
    return arrays


def _object_message(src: str, key: str) -> str:
    if key in ("ids", "split", "label_names", "vocab"):
        fix = "store strings with np.array(..., dtype=str)"
    else:
        fix = "pad to [N, T, ...] with zeros and give 'lengths'"
    return (f"{src}: array '{key}' is a ragged/object array, and modalign does not unpickle data "
            f"(allow_pickle=False); {fix}")


def _strings(src: str, key: str, arr: np.ndarray, ints_ok: bool = False) -> np.ndarray:
    if arr.ndim != 1:
        raise UserError(f"{src}: '{key}' has shape {tuple(arr.shape)}, expected one dimension")
    if arr.dtype.kind == "U":
        return arr.astype(str)
    if arr.dtype.kind == "S":
        try:
            return np.char.decode(arr, "utf-8").astype(str)
        except UnicodeDecodeError:
            raise UserError(f"{src}: '{key}' holds bytes that are not UTF-8") from None
    if ints_ok and arr.dtype.kind in "iu":
        return arr.astype(str)
    raise UserError(f"{src}: '{key}' has dtype {arr.dtype}, expected strings")


def _integers(src: str, key: str, arr, ndim: int, shape: str):
    if arr is None:
        return None
    dtype = getattr(arr, "raw_dtype", arr.dtype)  # a DiskArray: the dtype in the file
    if dtype.kind not in "iu":
        raise UserError(f"{src}: '{key}' has dtype {dtype}, expected integers (cast with .astype(np.int64))")
    if arr.ndim != ndim:
        raise UserError(f"{src}: '{key}' has shape {tuple(arr.shape)}, expected {shape}")
    return arr if is_lazy(arr) else arr.astype(np.int64)


def _floats(src: str, key: str, arr, ndim: int, shape: str, hint: str):
    if arr is None:
        return None
    dtype = getattr(arr, "raw_dtype", arr.dtype)
    if dtype.kind not in "fiub":
        raise UserError(f"{src}: '{key}' has dtype {dtype}, expected numbers")
    if arr.ndim != ndim:
        raise UserError(f"{src}: '{key}' has shape {tuple(arr.shape)}, expected {shape}{hint}")
    return arr if is_lazy(arr) else arr.astype(np.float32)


def _captions_path(npz_path: Path, captions: str | None) -> Path:
    """DATA.jsonl or DATA.json beside DATA (an .npz, .h5, .parquet file or an .npy directory)."""
    if captions is not None:
        p = Path(captions)
        if not p.exists():
            raise UserError(f"{p}: captions file not found")
        return p
    found = [p for p in (npz_path.with_suffix(".jsonl"), npz_path.with_suffix(".json")) if p.exists()]
    if not found:
        raise UserError(f"{npz_path}: no captions file beside it; expected {npz_path.with_suffix('.jsonl')} "
                        f"or {npz_path.with_suffix('.json')}, or set data.captions=PATH")
    if len(found) == 2:
        raise UserError(f"{npz_path}: both {found[0]} and {found[1]} exist; remove one or set data.captions=PATH")
    return found[0]


def _read_captions(cap_path: Path, ids: np.ndarray) -> tuple[list[list[str]], list[dict] | None]:
    """N caption lists in the order of `ids`, and N facts dicts (or None if no entry has facts)."""
    try:
        text = cap_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{cap_path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:  # e.g. a directory where the captions file should be
        raise UserError(f"{cap_path}: cannot read the captions ({e.strerror or e})") from None
    # entries: (where, id, captions value, facts value), where = "FILE:LINE" or "FILE"
    if cap_path.suffix == ".json":
        entries = _json_entries(cap_path, text)
    else:
        entries = _jsonl_entries(cap_path, text)

    known = set(ids.tolist())
    caps_by_id: dict[str, list[str]] = {}
    facts_by_id: dict[str, dict] = {}
    seen: dict[str, str] = {}
    for where, sid, value, fact in entries:
        if sid in seen:
            raise UserError(f"{where}: sample '{sid}' already has captions (at {seen[sid]})")
        seen[sid] = where
        if sid not in known:
            raise UserError(f"{where}: captions for unknown sample id '{sid}' (not in 'ids' of the npz)")
        caps_by_id[sid] = _caption_list(where, sid, value)
        if fact is not None:
            if not isinstance(fact, dict):
                raise UserError(f"{where}: 'facts' of sample '{sid}' is {_json_type(fact)}, expected an object")
            facts_by_id[sid] = fact
    caps = [caps_by_id.get(i) for i in ids.tolist()]
    facts = [facts_by_id.get(i) for i in ids.tolist()]

    missing = [ids[k] for k, c in enumerate(caps) if c is None]
    if missing:
        raise UserError(f"{cap_path}: {len(missing)} of {len(ids)} sample ids have no captions, "
                        f"first '{missing[0]}'")
    with_facts = sum(f is not None for f in facts)
    if with_facts == 0:
        return caps, None  # type: ignore[return-value]
    if with_facts < len(ids):
        first = next(ids[k] for k, f in enumerate(facts) if f is None)
        raise UserError(f"{cap_path}: {with_facts} of {len(ids)} samples have 'facts'; give facts for every "
                        f"sample or none (first without: '{first}')")
    return caps, facts  # type: ignore[return-value]


def _jsonl_entries(cap_path: Path, text: str) -> list[tuple[str, str, Any, Any]]:
    entries = []
    # "\n" only: str.splitlines() also breaks at U+2028, U+2029 and U+0085, which JSON writes raw
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{cap_path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: bad JSON ({e.msg.removesuffix(' at')} at column {e.colno})") from None
        except RecursionError:
            raise UserError(f"{where}: bad JSON (nested too deeply)") from None
        if not isinstance(row, dict):
            raise UserError(f"{where}: expected a JSON object per line, got {_json_type(row)}")
        unknown = [k for k in row if k not in CAPTION_KEYS]
        if unknown:
            raise UserError(f"{where}: unknown key '{unknown[0]}' (known keys: {', '.join(CAPTION_KEYS)})")
        if "id" not in row:
            raise UserError(f"{where}: missing key 'id'")
        sid = _caption_id(where, row["id"])
        entries.append((where, sid, _caption_value(where, sid, row), row.get("facts")))
    return entries


def _json_entries(cap_path: Path, text: str) -> list[tuple[str, str, Any, Any]]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{cap_path}:{e.lineno}: bad JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:  # found by tests/test_fuzz.py: the JSONL reader caught it, this one did not
        raise UserError(f"{cap_path}: bad JSON (nested too deeply)") from None
    if not isinstance(obj, dict):
        raise UserError(f"{cap_path}: expected a JSON object mapping sample id to captions, got {_json_type(obj)}")
    entries = []
    where = str(cap_path)
    for sid, value in obj.items():
        if isinstance(value, dict):
            unknown = [k for k in value if k not in CAPTION_KEYS[1:]]
            if unknown:
                raise UserError(f"{where}: unknown key '{unknown[0]}' in sample '{sid}' "
                                f"(known keys: {', '.join(CAPTION_KEYS[1:])})")
            entries.append((where, sid, _caption_value(where, sid, value), value.get("facts")))
        else:
            entries.append((where, sid, value, None))
    return entries


def _caption_id(where: str, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise UserError(f"{where}: 'id' is {_json_type(value)}, expected a string")
    return str(value)


def _caption_value(where: str, sid: str, row: dict) -> Any:
    if "captions" in row and "caption" in row:
        raise UserError(f"{where}: sample '{sid}' has both 'captions' and 'caption'; give one")
    if "captions" not in row and "caption" not in row:
        raise UserError(f"{where}: sample '{sid}' has neither 'captions' nor 'caption'")
    return row["captions"] if "captions" in row else row["caption"]


def _caption_list(where: str, sid: str, value: Any) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise UserError(f"{where}: captions of sample '{sid}' are {_json_type(value)}, "
                        f"expected a string or a list of strings")
    if not value:
        raise UserError(f"{where}: sample '{sid}' has an empty caption list")
    for j, c in enumerate(value):
        if not isinstance(c, str):
            raise UserError(f"{where}: caption {j} of sample '{sid}' is {_json_type(c)}, not a string")
        if not c.strip():
            raise UserError(f"{where}: caption {j} of sample '{sid}' is empty")
    return value


def _read_prompts(path: Path, label_names: list[str] | None, src: str) -> list[list[str]]:
    """[K] prompt lists in the order of label_names, from {label name: [prompt, ...] | "prompt"}."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: bad JSON ({e.msg} at column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except (OSError, RecursionError) as e:
        raise UserError(f"{path}: cannot read the class prompts ({getattr(e, 'strerror', None) or type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a JSON object mapping label name to prompts, got {_json_type(obj)}")
    if label_names is None:
        raise UserError(f"{path}: class prompts need 'label_names' in {src}")
    unknown = [k for k in obj if k not in label_names]
    if unknown:
        raise UserError(f"{path}: prompts for unknown label '{unknown[0]}' (label_names: {', '.join(label_names)})")
    missing = [k for k in label_names if k not in obj]
    if missing:
        raise UserError(f"{path}: no prompts for label '{missing[0]}'; give prompts for every label name")
    out = []
    for name in label_names:
        value = obj[name]
        prompts = [value] if isinstance(value, str) else value
        if not isinstance(prompts, list) or not prompts:
            raise UserError(f"{path}: prompts of label '{name}' must be a string or a non-empty list of strings")
        for j, p in enumerate(prompts):
            if not isinstance(p, str):
                raise UserError(f"{path}: prompt {j} of label '{name}' is {_json_type(p)}, not a string")
            if not p.strip():
                raise UserError(f"{path}: prompt {j} of label '{name}' is empty")
        out.append(prompts)
    return out


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
