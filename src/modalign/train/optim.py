"""AdamW with one parameter group per component, and a warmup + cosine schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from modalign.options import Options, at_least, between, require


@dataclass
class GroupConfig(Options):
    lr: float = 1e-3
    weight_decay: float = 0.05

    def validate(self) -> None:
        at_least(self, "lr", 0)
        at_least(self, "weight_decay", 0)


@dataclass
class OptimConfig(Options):
    # Per component: the encoder and heads train at 1e-3 (small models, short runs); the logit
    # scale has no weight decay, as in CLIP (decaying it would pull the temperature towards 1).
    groups: dict[str, GroupConfig] = field(default_factory=lambda: {
        "encoder": GroupConfig(1e-3, 0.05),
        "heads": GroupConfig(1e-3, 0.05),
        "logit_scale": GroupConfig(1e-3, 0.0),
    })
    betas: tuple[float, float] = (0.9, 0.98)  # CLIP's beta2 for stability with large batches
    eps: float = 1e-6
    warmup_steps: int = 25
    min_lr_ratio: float = 0.05  # cosine decays to this fraction of each group's lr

    def validate(self) -> None:
        at_least(self, "warmup_steps", 0)
        between(self, "min_lr_ratio", 0.0, 1.0)
        at_least(self, "eps", 1e-12)
        require(len(self.betas) == 2, "betas", list(self.betas), "it must be two numbers")
        for i, b in enumerate(self.betas):
            require(b == b, f"betas[{i}]", b, "it must be a number")
            require(0.0 <= b <= 0.999999, f"betas[{i}]", b, "it must be in [0, 0.999999]")


def build_optimizer(components: dict[str, list[nn.Parameter]], cfg: OptimConfig) -> torch.optim.AdamW:
    groups = []
    for name, params in components.items():
        if name not in cfg.groups:
            raise ValueError(f"no optimizer settings for component '{name}' (trainer.optim.groups)")
        g = cfg.groups[name]
        groups.append({"name": name, "params": params, "lr": g.lr, "weight_decay": g.weight_decay})
    params = [p for g in groups for p in g["params"]]
    # on a GPU, AdamW's fused kernel: one launch for every parameter instead of several per tensor
    fused = bool(params) and all(p.is_cuda and p.dtype in (torch.float32, torch.float16, torch.bfloat16)
                                 for p in params)
    return torch.optim.AdamW(groups, betas=tuple(cfg.betas), eps=cfg.eps, **({"fused": True} if fused else {}))


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float):
    """lr multiplier at step s: linear warmup to 1, then cosine to min_ratio at total_steps."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_scheduler(opt: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.warmup_steps, total_steps, cfg.min_lr_ratio))
