"""The evaluation of any recipe's run: `modalign eval RUN [--split S] [--export-embeddings]`.

    modalign eval outputs/runs/20261129-101500_align_demo --split val
    modalign eval outputs/experiments/exp_20261129-102000_compare_globals_heads/3

Rebuilds the run's recipe from its cfg.yaml (no training state), checks that the split is the data
the run was trained and tested on (its fingerprint in run.json), loads the best checkpoint (else
last.pt) and evaluates it with the recipe's own metrics. Writes facts/eval_<split>.json, the
per-example scores (facts/scores.parquet for the run's evaluated split, else
scores_<split>.parquet) and, when asked, the embeddings, through the run writer.
"""

from __future__ import annotations

from pathlib import Path

from modalign.errors import UserError


def evaluate_run(path: Path, split: str, export_embeddings: bool = False, progress: bool = True,
                 device: str = "auto") -> dict:
    """-> {"split", "checkpoint", "step", "device", "metrics", "chance"} (facts/eval_<split>.json).
    device: where to evaluate, whatever the run trained on (checkpoints load onto the CPU first)."""
    from omegaconf import OmegaConf, open_dict

    from modalign.recipes.launch import load_yaml, recipe_class, run_info
    from modalign.runs.writer import RunWriter

    path = Path(path)
    if not (path / "cfg.yaml").exists():
        raise UserError(f"{path}: not a run directory (no cfg.yaml)")
    writer = RunWriter(path)
    info = run_info(writer.run)
    name = "best.pt" if (writer.run.checkpoints / "best.pt").exists() else "last.pt"
    if not (writer.run.checkpoints / name).exists():
        raise UserError(f"{path}: no checkpoint to evaluate (checkpoints/best.pt or last.pt)")
    cfg = load_yaml(path / "cfg.yaml")
    with open_dict(cfg):
        OmegaConf.update(cfg, "env.device", device, force_add=True)
    recipe_name = str(cfg.get("recipe") or info.get("recipe") or "align")
    recipe = recipe_class(recipe_name)(cfg, writer, progress=progress)
    recipe.setup()
    recorded = info.get("data", {}).get("splits", {}).get(split, {}).get("fingerprint")
    actual = recipe.splits[split].fingerprint()
    if recorded is not None and recorded != actual:
        raise UserError(f"{path}: the {split} split is not the data this run was trained and tested on "
                        f"(fingerprint {actual[:12]} now, {recorded[:12]} in run.json)")
    payload = writer.load_checkpoint(name)
    try:
        recipe.model.load_state_dict(payload["model"])
    except RuntimeError as e:
        raise UserError(f"{writer.run.checkpoints / name}: does not fit this run's model "
                        f"({str(e).splitlines()[0]})") from None
    ev = recipe.evaluate_with_prefixes(split) if hasattr(recipe, "evaluate_with_prefixes") else recipe.evaluate(split)
    result = {"split": split, "checkpoint": str(writer.run.checkpoints / name), "step": payload["step"],
              "device": str(recipe.device), "metrics": ev.metrics, "chance": recipe.chance(split)}
    own = split == recipe.eval_cfg.split
    writer.run.facts.mkdir(exist_ok=True)
    writer.write_json(f"facts/eval_{split}.json", result)
    writer.write_scores("facts/scores.parquet" if own else f"facts/scores_{split}.parquet",
                        recipe.splits[split], ev.per_example)
    if ev.extra.get("predictions") is not None:  # captioning recipes: what was decoded, beside the references
        writer.write_lines(f"facts/predictions_{split}.jsonl", ev.extra["predictions"])
    if export_embeddings and ev.modality is not None:
        writer.write_embeddings("facts/embeddings.npz" if own else f"facts/embeddings_{split}.npz",
                                recipe.splits[split].ids, ev.modality, ev.text)
    return result
