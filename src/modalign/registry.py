"""The variant registry: named component implementations with their provenance. No torch.

A variant is a class registered under a kind and a name, with metadata that says who made it, with
what, when, for which experiment, and how:

    from modalign.registry import register_variant

    @register_variant("head", "gated_mlp", created_by="A. Researcher", model="GPT-5 (coding assistant)",
                      date="2026-11-20", experiment_id="EXP-014", version="0.2.0",
                      approach="an MLP head whose hidden layer is gated by the pooled features",
                      key_features=["GLU hidden layer", "dropout 0.1"])
    class GatedMLPHead(nn.Module): ...

and selected from config by name (`head=gated_mlp`, which needs `conf/head/gated_mlp.yaml`
next to the module). Each run records the variant's metadata and the sha256 of its source file
in run.json. Missing or malformed metadata is refused at registration, with one line.

Where variants come from: modalign's own modules; installed packages that declare an entry
point in the group `modalign.variants` (value: a module to import); and the directories or
module names in the environment variable MODALIGN_PLUGINS (separated by os.pathsep). A plugin
package may hold a `conf/` folder (e.g. `conf/head/<name>.yaml`); it joins Hydra's search path so
`head=<name>` composes.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from modalign.errors import UserError

KINDS = ("head", "fusion")  # selectable today; encoders and losses are fixed components (see docs/variants.md)
STATUSES = ("proposed", "experimental", "validated", "retired")
REQUIRED = ("created_by", "model", "date", "experiment_id", "version", "approach")
_BUILTIN = {"head": "modalign.models.heads", "fusion": "modalign.models.fusion"}
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_VERSION = re.compile(r"^\d+(\.\d+){0,2}([.-]?[A-Za-z0-9]+)?$")
PLUGINS_ENV = "MODALIGN_PLUGINS"
ENTRY_POINT_GROUP = "modalign.variants"


class VariantError(UserError):
    """Bad variant metadata or an unknown variant: one line, exit 2."""


@dataclass(frozen=True)
class Variant:
    kind: str
    name: str
    created_by: str
    model: str
    date: str
    experiment_id: str
    version: str
    approach: str
    key_features: tuple[str, ...] = ()
    status: str = "experimental"
    source: str = ""  # the file that defines it
    source_sha256: str = ""
    obj: object = field(default=None, compare=False, repr=False)

    def metadata(self) -> dict:
        """What run.json records: everything but the class itself."""
        return {"kind": self.kind, "name": self.name, "created_by": self.created_by, "model": self.model,
                "date": self.date, "experiment_id": self.experiment_id, "version": self.version,
                "approach": self.approach, "key_features": list(self.key_features), "status": self.status,
                "source": self.source, "source_sha256": self.source_sha256}


_REGISTRY: dict[tuple[str, str], Variant] = {}


def _check(kind: str, name: str, meta: dict, where: str) -> None:
    at = f"variant {kind} '{name}' ({where})"
    if kind not in KINDS:
        raise VariantError(f"{at}: kind must be one of {', '.join(KINDS)}, got '{kind}'")
    if not isinstance(name, str) or not _NAME.match(name):
        raise VariantError(f"{at}: the name must be lower_snake_case (a-z, 0-9, _), got {name!r}")
    unknown = sorted(set(meta) - set(REQUIRED) - {"key_features", "status"})
    if unknown:
        raise VariantError(f"{at}: unknown metadata '{unknown[0]}' (expected {', '.join(REQUIRED)}, key_features, status)")
    for key in REQUIRED:
        value = meta.get(key)
        if not isinstance(value, str) or not value.strip():
            raise VariantError(f"{at}: metadata '{key}' must be a non-empty string, got {value!r}")
    if not _DATE.match(meta["date"]):
        raise VariantError(f"{at}: metadata 'date' must be YYYY-MM-DD, got {meta['date']!r}")
    from datetime import date

    try:
        date.fromisoformat(meta["date"])
    except ValueError:
        raise VariantError(f"{at}: metadata 'date' is not a calendar date: {meta['date']!r}") from None
    if not _VERSION.match(meta["version"]):
        raise VariantError(f"{at}: metadata 'version' must look like 1, 1.2 or 1.2.3, got {meta['version']!r}")
    if "\n" in meta["approach"] or len(meta["approach"]) > 200:
        raise VariantError(f"{at}: metadata 'approach' must be one line of at most 200 characters")
    features = meta.get("key_features", [])
    if not isinstance(features, (list, tuple)) or not all(isinstance(f, str) and f.strip() for f in features):
        raise VariantError(f"{at}: metadata 'key_features' must be a list of non-empty strings, got {features!r}")
    if meta.get("status", "experimental") not in STATUSES:
        raise VariantError(f"{at}: metadata 'status' must be one of {', '.join(STATUSES)}, got {meta.get('status')!r}")


def source_sha256(obj) -> tuple[str, str]:
    """-> (path, sha256) of the file that defines `obj`; ("", "") when there is none (e.g. a REPL)."""
    try:
        path = inspect.getsourcefile(obj) or ""
    except TypeError:
        return "", ""
    if not path or not Path(path).exists():
        return "", ""
    return path, hashlib.sha256(Path(path).read_bytes()).hexdigest()


def register_variant(kind: str, name: str, **metadata):
    """Class decorator: register `cls` as variant `name` of `kind` with its metadata (see module doc).
    Raises VariantError on missing or malformed metadata, or a name registered by another class."""

    def wrap(cls):
        where = f"{cls.__module__}.{cls.__qualname__}"
        _check(kind, name, metadata, where)
        path, sha = source_sha256(cls)
        variant = Variant(kind, name, key_features=tuple(metadata.pop("key_features", ())), source=path,
                          source_sha256=sha, obj=cls, **metadata)
        old = _REGISTRY.get((kind, name))
        if old is not None and f"{old.obj.__module__}.{old.obj.__qualname__}" != where:
            raise VariantError(f"variant {kind} '{name}' ({where}): the name is taken by "
                               f"{old.obj.__module__}.{old.obj.__qualname__}")
        _REGISTRY[(kind, name)] = variant
        cls.variant = variant
        return cls

    return wrap


_loaded_plugins: dict[str, Path | None] = {}


def plugin_specs() -> list[str]:
    return [s for s in os.environ.get(PLUGINS_ENV, "").split(os.pathsep) if s.strip()]


def load_plugins() -> dict[str, Path | None]:
    """Import the variants of installed packages (entry points) and of MODALIGN_PLUGINS.
    -> {module name: its conf/ folder or None}. Idempotent; a plugin that fails to import is one line."""
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.value not in _loaded_plugins:
            _import_plugin(ep.value, f"entry point '{ep.name}'")
    for spec in plugin_specs():
        if spec in _loaded_plugins:
            continue
        path = Path(spec).expanduser()
        if path.exists():
            path = path.resolve()
            if not (path / "__init__.py").exists():
                raise VariantError(f"{PLUGINS_ENV}: {spec} is not a Python package (no __init__.py)")
            if str(path.parent) not in sys.path:
                sys.path.insert(0, str(path.parent))
            _import_plugin(path.name, f"{PLUGINS_ENV} entry {spec}")
            _loaded_plugins[spec] = _loaded_plugins[path.name]
        elif "/" in spec or os.sep in spec:
            raise VariantError(f"{PLUGINS_ENV}: {spec}: no such directory")
        else:
            _import_plugin(spec, f"{PLUGINS_ENV} entry {spec}")
    return dict(_loaded_plugins)


def _import_plugin(module: str, where: str) -> None:
    try:
        mod = importlib.import_module(module)
    except VariantError:
        raise
    except Exception as e:  # noqa: BLE001 — a user's plugin: any import error becomes one line
        raise VariantError(f"{where}: cannot import '{module}' ({type(e).__name__}: {e})") from None
    conf = Path(mod.__file__).resolve().parent / "conf" if getattr(mod, "__file__", None) else None
    _loaded_plugins[module] = conf if conf is not None and conf.is_dir() else None


def plugin_conf_dirs() -> list[Path]:
    """The conf/ folders of the plugins, for Hydra's search path."""
    return [p for p in dict.fromkeys(load_plugins().values()) if p is not None]


def _load_builtin(kind: str) -> None:
    importlib.import_module(_BUILTIN[kind])


def get_variant(kind: str, name: str) -> Variant:
    """The registered variant, loading built-ins and plugins as needed; VariantError if unknown."""
    if kind in _BUILTIN:
        _load_builtin(kind)
    if (kind, name) not in _REGISTRY:
        load_plugins()
    if (kind, name) not in _REGISTRY:
        names = ", ".join(sorted(n for k, n in _REGISTRY if k == kind))
        raise VariantError(f"config: no {kind} variant '{name}' (registered: {names}; your own come from "
                           f"{PLUGINS_ENV} or the '{ENTRY_POINT_GROUP}' entry points)")
    return _REGISTRY[(kind, name)]


def all_variants() -> list[Variant]:
    for kind in _BUILTIN:
        _load_builtin(kind)
    load_plugins()
    return sorted(_REGISTRY.values(), key=lambda v: (v.kind, v.name))


# scaffolding ------------------------------------------------------------------------------------
_MODULE = '''"""{name}: a stage-2 head variant for modalign. See README.md; select it with head={name}."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from modalign.options import Options as OptionsBase, at_least, require
from modalign.registry import register_variant


@dataclass
class Options(OptionsBase):
    hidden: int = 512  # hidden width
    dropout: float = 0.1

    def validate(self) -> None:
        """Runs when the options are built; a bad value is one line (config: 'head.hidden' is 0; ...)."""
        at_least(self, "hidden", 1)
        require(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "it must be in [0, 1)")


@register_variant("head", "{name}", created_by={created_by!r}, model={model!r}, date={date!r},
                  experiment_id={experiment_id!r}, version="0.1.0",
                  approach="a two-layer MLP over the pooled encoder features (the template: describe yours)",
                  key_features=["pooled features", "GELU hidden layer", "dropout"])
class Head(nn.Module):
    Options = Options
    aux_weight = 0.0  # weight of the terms returned under "aux" (none here)

    def __init__(self, options: Options, in_dim: int, out_dim: int, n_globals: int = 0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, options.hidden), nn.GELU(), nn.Dropout(options.dropout),
                                 nn.Linear(options.hidden, out_dim))

    def forward(self, pooled, tokens, mask, globals_=None) -> dict:
        # pooled (B, W), tokens (B, T, W), mask (B, T) True = valid, globals_ (B, G)
        return {{"embedding": self.net(pooled)}}  # (B, D), normalised by the model
'''

_CONFIG = '''# modalign train head={name}      (with MODALIGN_PLUGINS={path})
kind: {name}
embed_dim: 256
text_projection: true     # a trainable linear map of the frozen text embeddings
hidden: 512
dropout: 0.1
'''

_README = '''# {name}

A stage-2 head variant for modalign.

## Metadata

| key | value |
|---|---|
| name | {name} |
| kind | head |
| created by | {created_by} |
| model | {model} |
| date | {date} |
| experiment id | {experiment_id} |
| version | 0.1.0 |
| approach | a two-layer MLP over the pooled encoder features (the template: describe yours) |

The metadata lives in the `@register_variant(...)` call in `__init__.py`; this table is for
readers. Each run records it, with the sha256 of `__init__.py`, in its run.json.

## Use

```
export MODALIGN_PLUGINS={path}
modalign train head={name}
modalign sweep head=mlp,{name} seed=0,1,2
modalign variants
```
'''


def scaffold(name: str, folder: Path, created_by: str | None = None, model: str = "", experiment_id: str = "") -> Path:
    """Write a head variant package folder/name/ (module, conf/head/name.yaml, README.md) that
    registers and trains as it is. -> the package directory. Refuses to overwrite."""
    from datetime import date

    if not _NAME.match(name):
        raise VariantError(f"variants new: the name must be lower_snake_case (a-z, 0-9, _), got {name!r}")
    pkg = Path(folder) / name
    if pkg.exists():
        raise VariantError(f"variants new: {pkg} already exists; choose another name or --dir")
    values = {"name": name, "created_by": created_by or os.environ.get("USER") or "unknown",
              "model": model or "unknown", "date": date.today().isoformat(),
              "experiment_id": experiment_id or "unassigned", "path": str(pkg.resolve())}
    try:
        (pkg / "conf" / "head").mkdir(parents=True)
        (pkg / "__init__.py").write_text(_MODULE.format(**values), encoding="utf-8")
        (pkg / "conf" / "head" / f"{name}.yaml").write_text(_CONFIG.format(**values), encoding="utf-8")
        (pkg / "README.md").write_text(_README.format(**values), encoding="utf-8")
    except OSError as e:
        raise VariantError(f"variants new: cannot write {pkg} ({e.strerror})") from None
    return pkg
