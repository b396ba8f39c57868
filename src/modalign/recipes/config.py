"""Compose the Hydra config and turn its nodes into typed dataclasses, with one-line errors.

Components take dataclasses and never see OmegaConf; this module is the edge where config becomes
objects, and where a bad key or value becomes a UserError naming it.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from typing import Any

from modalign.errors import UserError
from modalign.options import OptionError


def compose(overrides: list[str], config_name: str = "align", return_hydra_config: bool = False):
    """The fully composed (not yet resolved) config for `overrides`, from the package's conf/."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    GlobalHydra.instance().clear()
    try:
        with initialize_config_module("modalign.conf", version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=list(overrides) + plugin_searchpath(),
                                 return_hydra_config=return_hydra_config)
    except (HydraException, OmegaConfBaseException, ValueError, TypeError) as e:
        # ValueError/TypeError: Hydra's own, e.g. a config group set to a number (trainer=5)
        group = _non_name_group(overrides) if isinstance(e, (ValueError, TypeError)) else None
        raise UserError(f"config: {group or _explain(e, overrides)}") from None


def plugin_searchpath() -> list[str]:
    """The `hydra.searchpath` override that adds the conf/ folders of variant plugins (see
    `modalign.registry`), so `head=<a plugin's head>` composes; [] when there are none."""
    from modalign.registry import plugin_conf_dirs

    dirs = plugin_conf_dirs()
    return [f"hydra.searchpath=[{','.join('file://' + str(d) for d in dirs)}]"] if dirs else []


def _explain(e: BaseException, overrides: list[str]) -> str:
    """Hydra's multi-line messages -> one line that names the key or option."""
    text = str(e)
    m = re.search(r"Could not override '([^']+)'", text)
    if m:
        return f"unknown key '{m.group(1)}' (check the spelling; `modalign train --help` lists the groups)"
    m = re.search(r"Could not find '([^'/]+)/([^']+)'", text)
    if m:
        options = re.findall(r"^\t(\S+)$", text.split("Config search path")[0], flags=re.M)
        return f"no option '{m.group(2)}' in group '{m.group(1)}' (available: {', '.join(options)})"
    if type(e).__name__ == "OverrideParseException":
        return f"cannot parse the overrides {' '.join(overrides)!r}: {_first_line(e)}"
    return _first_line(e)


def _non_name_group(overrides: list[str]) -> str | None:
    """A config group set to something other than an option name (trainer=5, data=null,
    head=[1,2]), which Hydra reports without naming the group: the line that names it."""
    from pathlib import Path

    conf = Path(__file__).resolve().parents[1] / "conf"
    for o in overrides:
        key, _, value = o.partition("=")
        group, value = key.lstrip("+~"), value.strip()
        name = re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", value) and value not in ("null", "true", "false")
        if (conf / group).is_dir() and not name:
            options = sorted(p.stem for p in (conf / group).glob("*.yaml"))
            drop = f" (to leave the group out: ~{group})" if value == "null" else ""
            return f"'{group}' must name one of its options ({', '.join(options)}), got {value!r}{drop}"
    return None


def _first_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return msg[0] if msg else type(e).__name__


def to_container(node, key: str, throw_on_missing: bool = True) -> dict:
    """Resolve a config node into plain python, naming the key of any missing or bad value."""
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

    try:
        return OmegaConf.to_container(node, resolve=True, throw_on_missing=throw_on_missing)
    except MissingMandatoryValue as e:
        full = f"{key}.{e.full_key}" if key and e.full_key else (e.full_key or key)
        raise UserError(f"config: '{full}' is required and has no value (set it: {full}=...)") from None
    except OmegaConfBaseException as e:
        raise UserError(f"config: {key}: {_first_line(e)}") from None


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"config: '{key}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UserError(f"config: '{key}' must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise UserError(f"config: '{key}' must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise UserError(f"config: '{key}' must be a string, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise UserError(f"config: '{key}' must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"config: '{key}' must be a mapping, got {value!r}")
        return typed(tp, value, key)
    return value


def typed(cls, values: dict, key: str, **extra):
    """Build dataclass `cls` from a plain dict, checking names and types. `extra` adds fields that
    do not come from the config (e.g. sizes read from the data)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        if name not in fields:
            known = ", ".join(sorted(fields))
            raise UserError(f"config: unknown key '{key}.{name}' (known: {known})")
        kwargs[name] = _coerce(value, hints[name], f"{key}.{name}")
    kwargs.update(extra)
    try:
        return cls(**kwargs)  # option dataclasses validate themselves (modalign.options)
    except OptionError as e:
        raise UserError(f"config: {e.under(key)}") from None
