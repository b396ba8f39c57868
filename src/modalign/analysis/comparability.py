"""What may be compared with what, and how configurations differ. No torch.

Two runs are comparable when their fingerprints match: the same recipe, the same data in every
split (each split's sample ids and content, as `PairedData.fingerprint` hashes them), the same
evaluation protocol (relevance protocol and protocol version), the same frozen text side (the text
model's id, or the sha256 of the user's precomputed vectors) and the same parent checkpoints
(e.g. the stage-1 encoder a stage-2 run started from, by sha256). Everything else
- the head, the loss, the learning rate, the seed - is what an experiment varies, and shows in the
config diff.
"""

from __future__ import annotations

import hashlib
import json

from modalign.runs.card import flatten

# Config keys that never make two runs different configurations: the seed (runs over seeds are
# the replicates of one configuration), where outputs go, and settings that change speed or
# bookkeeping but not the result.
BOOKKEEPING = ("seed", "name", "outputs", "resume", "sweep.", "criteria.", "checks.", "env.", "eval.export_embeddings",
               "eval.batch_size", "text.cache_dir", "text.batch_size", "lm.cache_dir",
               "eval.samples_in_card", "trainer.threads", "trainer.log_every",
               "trainer.keep_checkpoints", "trainer.checkpoint_every", "hydra.")


def fingerprint(info: dict) -> dict[str, str]:
    """run.json -> {what: hash}: everything a fair comparison must hold fixed."""
    out = {"recipe": str(info.get("recipe"))}
    for split, d in sorted((info.get("data") or {}).get("splits", {}).items()):
        out[f"{split} split"] = str(d.get("fingerprint"))
    ev = info.get("eval") or {}
    # The protocol and its version, not the list of metric names: a variant may add metrics of its
    # own (VQ perplexity, retrieval per register kept), while every metric both runs have is
    # defined by the same versioned protocol. A comparison on a metric one side lacks fails there.
    out["eval protocol"] = f"{ev.get('protocol')} v{ev.get('version')}"
    text = info.get("text") or {}
    if text:  # the frozen text side every caption and prompt is embedded with
        out["text side"] = str(text.get("sha256") or text.get("model"))
    for i, p in enumerate(info.get("parents") or []):
        out[f"parent {p.get('role') or i}"] = str(p.get("sha256"))
    return out


def fingerprint_id(fp: dict[str, str]) -> str:
    """A short id of a fingerprint, for tables: runs with the same id are comparable."""
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:8]


def _short(v: str | None) -> str:
    if v is None:
        return "none"
    return v[:12] if len(v) == 64 else v


def differences(a: dict[str, str], b: dict[str, str], names: tuple[str, str] = ("A", "B")) -> list[str]:
    """What differs between two fingerprints, one phrase per item, e.g.
    'test split differs (8e23d4ad5e98 in A, 1f2e3d4c5b6a in B)'."""
    out = []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            out.append(f"{key} differs ({_short(a.get(key))} in {names[0]}, {_short(b.get(key))} in {names[1]})")
    return out


def config_items(config: dict) -> dict:
    """The configuration that defines a variant: the flattened config minus bookkeeping keys."""
    return {k: v for k, v in flatten(config).items() if not k.startswith(BOOKKEEPING) and k not in BOOKKEEPING}


def config_key(config: dict) -> str:
    return json.dumps(config_items(config), sort_keys=True, default=str)


def config_diff(configs: dict[str, dict]) -> dict[str, dict[str, object]]:
    """{label: config} -> {key: {label: value}} for every key whose value is not the same in all
    configs (missing = None): the table of what differs between the things being compared."""
    items = {label: config_items(c) for label, c in configs.items()}
    keys = sorted(set().union(*(set(i) for i in items.values()))) if items else []
    out = {}
    for k in keys:
        values = {label: i.get(k) for label, i in items.items()}
        if len({json.dumps(v, sort_keys=True, default=str) for v in values.values()}) > 1:
            out[k] = values
    return out
