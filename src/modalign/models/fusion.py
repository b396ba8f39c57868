"""Stage 3: a stage-2 modality encoder fused into a frozen causal language model.

    FusedLM(modality, lm, tokenizer, projector_options, fusion)

modality  the stage-2 AlignModel (its encoder and head give the sample's features; frozen by default)
projector features -> k soft tokens of the LM's width: linear or MLP (optional bottleneck), output
          tanh(x)·scale (scale defaults to the value at which soft tokens spread over (-1, 1) have
          the LM's mean token-embedding norm) or unscaled
fusion    a registered variant (kind "fusion", `modalign.registry`) that decides where the soft
          tokens enter the LM:
            prefix            soft tokens before the caption (LLaVA-style)
            additive          a gated adapter adds the pooled signal to the residual stream after
                              chosen layers (residual scale alpha, init/max), optional LoRA on q/v
            cross_attn        gated cross-attention from text to soft tokens after chosen layers,
                              tanh gates at 0 (Flamingo-style)
            partial_unfreeze  prefix, and the top N LM blocks trained (a baseline)
            none              a learned prompt and no modality input: the data-only floor

Gated variants act through forward hooks on the LM's decoder layers (and its q/v projections for
LoRA): the LM's modules and weights stay untouched, and with every gate closed (alpha = 0, LoRA B =
0) the fused model's logits are bit-identical to the frozen LM's (tests/test_fuse.py).

The sequence the LM sees: [prefix tokens] + start + caption + eos, where `start` is the LM's bos
token (template plain) or its chat template's user turn up to the assistant's reply (template
chat). The loss is the cross-entropy of the caption and eos tokens (teacher forcing).
Checkpoints hold the trainable parameters only (`state_dict` leaves the frozen LM out).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from modalign.options import Options, at_least, one_of, require
from modalign.registry import get_variant, register_variant

MAINTAINERS = dict(created_by="modalign maintainers", model="modalign stage-3 variants", date="2026-11-29",
                   experiment_id="stage3", version="0.1.0")


@dataclass
class ProjectorOptions(Options):
    kind: str = "mlp"  # linear | mlp
    tokens: int = 8  # k soft tokens
    hidden: int = 1024  # mlp hidden width
    bottleneck: int = 0  # 0 = none; else a linear map down to this width first
    output: str = "tanh"  # tanh: tanh(x)·scale | linear: unscaled
    scale: float | None = None  # tanh scale; None = measured from the LM's token embeddings
    features: str = "embedding"  # embedding: the stage-2 shared-space vector | pooled: the encoder's pooled features
    # | tokens: the encoder's per-step (per-patch) outputs, resampled into k tokens by learned latents
    resampler_layers: int = 2  # features=tokens: cross-attention layers of the resampler
    init_from: str | None = None  # a fuse run (or checkpoint) whose projector this one starts from, whatever its fusion

    def validate(self) -> None:
        one_of(self, "kind", ("linear", "mlp"))
        one_of(self, "output", ("tanh", "linear"))
        one_of(self, "features", ("embedding", "pooled", "tokens"))
        at_least(self, "resampler_layers", 1)
        for name in ("tokens", "hidden"):
            at_least(self, name, 1)
        at_least(self, "bottleneck", 0)
        if self.scale is not None:
            require(self.scale > 0, "scale", self.scale, "it must be > 0 (or null: measured from the LM)")
        require(self.init_from is None or (isinstance(self.init_from, str) and self.init_from.strip() != ""),
                "init_from", self.init_from, "it must be a fuse run directory or checkpoint (or null)")

    def shape(self) -> dict:
        """The settings that decide the projector's parameters and outputs (not where it starts from)."""
        return projector_shape(self.__dict__)


def projector_shape(settings: dict) -> dict:
    """A run's projector settings (as its checkpoint records them, perhaps from before a key existed)
    -> the ones that decide its parameters and outputs: defaults filled in, `init_from` left out,
    `resampler_layers` only under features=tokens."""
    known = {f for f in ProjectorOptions.__dataclass_fields__}
    out = {**{f: ProjectorOptions.__dataclass_fields__[f].default for f in known},
           **{k: v for k, v in (settings or {}).items() if k in known}}
    out.pop("init_from", None)
    if out.get("features") != "tokens":
        out.pop("resampler_layers", None)
    return out


def auto_scale(embeddings: torch.Tensor) -> float:
    """The tanh scale at which a soft token whose units spread uniformly over (-1, 1) (rms 1/sqrt 3)
    has the mean norm of the LM's token embeddings."""
    norms = embeddings.detach().float().norm(dim=-1)
    return float(norms.mean() / math.sqrt(embeddings.shape[-1]) * math.sqrt(3.0))


def pack_tokens(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The encoder's per-step outputs (B, T, D) and their mask (B, T) as one (B, T, D+1) tensor (the
    mask as the last channel), so a frozen encoder's token features are cached like any others."""
    return torch.cat([tokens, mask[..., None].to(tokens.dtype)], -1)


def pad_tokens(chunks: list[torch.Tensor]) -> torch.Tensor:
    """Packed token features of different lengths -> one (N, T_max, D+1) tensor, padding masked."""
    t = max(c.shape[1] for c in chunks)
    return torch.cat([F.pad(c, (0, 0, 0, t - c.shape[1])) for c in chunks])


class Resampler(nn.Module):
    """Perceiver-style: k learned latents cross-attend to the encoder's per-step outputs (padding
    masked), each layer attention then feed-forward, pre-norm; a linear map to the LM's width and a
    LayerNorm at the end. (B, T, D+1) packed tokens -> (B, k, width)."""

    def __init__(self, in_dim: int, width: int, k: int, layers: int):
        super().__init__()
        heads = next(h for h in (8, 4, 2, 1) if in_dim % h == 0)
        self.latents = nn.Parameter(torch.randn(k, in_dim) * in_dim ** -0.5)
        self.norm_media = nn.LayerNorm(in_dim)
        self.layers = nn.ModuleList(nn.ModuleDict({
            "norm_q": nn.LayerNorm(in_dim), "attn": nn.MultiheadAttention(in_dim, heads, batch_first=True),
            "norm_ff": nn.LayerNorm(in_dim),
            "ff": nn.Sequential(nn.Linear(in_dim, 4 * in_dim), nn.GELU(), nn.Linear(4 * in_dim, in_dim))})
            for _ in range(layers))
        self.out = nn.Linear(in_dim, width)
        self.norm_out = nn.LayerNorm(width)

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        tokens, valid = packed[..., :-1], packed[..., -1] > 0.5  # (B, T, D), (B, T)
        valid = valid | ~valid.any(1, keepdim=True)  # a sample without tokens attends to its padding, not to NaN
        media = self.norm_media(tokens)
        x = self.latents.unsqueeze(0).expand(tokens.shape[0], -1, -1)
        for layer in self.layers:
            a, _ = layer["attn"](layer["norm_q"](x), media, media, key_padding_mask=~valid, need_weights=False)
            x = x + a
            x = x + layer["ff"](layer["norm_ff"](x))
        return self.norm_out(self.out(x))


class Projector(nn.Module):
    def __init__(self, opts: ProjectorOptions, in_dim: int, width: int, scale: float):
        super().__init__()
        self.opts, self.width, self.scale = opts, width, float(scale)
        if opts.features == "tokens":
            self.net = Resampler(in_dim, width, opts.tokens, opts.resampler_layers)
            return
        # standardise each sample's features: the stage-2 embedding is L2-normalised (entries ~1/sqrt(D)),
        # which would start the soft tokens ~20x smaller than the LM's token embeddings
        layers: list[nn.Module] = [nn.LayerNorm(in_dim, elementwise_affine=False)]
        d = in_dim
        if opts.bottleneck:
            layers.append(nn.Linear(d, opts.bottleneck))
            d = opts.bottleneck
        if opts.kind == "mlp":
            layers += [nn.Linear(d, opts.hidden), nn.GELU()]
            d = opts.hidden
        layers.append(nn.Linear(d, opts.tokens * width))
        self.net = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features (B, F), or packed tokens (B, T, D+1) under features=tokens -> soft tokens (B, k, width)."""
        x = self.net(features).view(features.shape[0], self.opts.tokens, self.width)
        return torch.tanh(x) * self.scale if self.opts.output == "tanh" else x


# --- fusion variants ---------------------------------------------------------------------------


def decoder_layers(lm) -> nn.ModuleList:
    """The decoder blocks of a transformers causal LM (Llama-style `model.layers`, GPT-2 `transformer.h`)."""
    base = getattr(lm, "model", None) or getattr(lm, "transformer", None)
    layers = getattr(base, "layers", None) or getattr(base, "h", None)
    if layers is None:
        raise ValueError(f"{type(lm).__name__}: cannot find its decoder layers (model.layers or transformer.h)")
    return layers


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


def _replace_hidden(output, h):
    return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h


def _match_batch(x: torch.Tensor, n: int) -> torch.Tensor:
    """The signal of B samples for a batch of n rows: beam search repeats each sample n/B times."""
    return x if x.shape[0] == n else x.repeat_interleave(n // x.shape[0], dim=0)


def check_layers(layers: list, n_layers: int, key: str) -> list[int]:
    from modalign.errors import UserError

    if not isinstance(layers, (list, tuple)) or not layers or not all(isinstance(i, int) and not isinstance(i, bool)
                                                                      for i in layers):
        raise UserError(f"config: '{key}' must be a non-empty list of layer numbers, got {layers!r}")
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise UserError(f"config: '{key}' has layer {bad[0]}, but the LM has layers 0..{n_layers - 1}")
    if len(set(layers)) != len(layers):
        raise UserError(f"config: '{key}' names a layer twice: {layers!r}")
    return sorted(layers)


class Fusion(nn.Module):
    """Base of fusion variants. A variant decides the prefix tokens, installs hooks on the LM, and
    reports its gates. `signal` is set by FusedLM around each forward (None = text only)."""
    uses_modality = True
    trains_lm_blocks = 0

    def __init__(self):
        super().__init__()
        self.signal: torch.Tensor | None = None  # (B, k, width) soft tokens of the current batch
        self.enabled = True  # False: the hooks do nothing (the frozen LM as it was)
        self._handles: list = []
        # {block: [(h, delta)]} while FusedLM measures what the hooks inject (evaluation only)
        self.recording: dict[int, list] | None = None
        # rms of the LM's residual stream after each block (index i = block i's output), measured by
        # FusedLM on real text at build: the scale norm-matched variants inject at
        self.register_buffer("h_rms", torch.ones(0), persistent=False)

    def _record(self, i: int, h: torch.Tensor, delta: torch.Tensor) -> None:
        if self.recording is not None:
            self.recording.setdefault(i, []).append((h.detach(), delta.detach()))

    def calibrate(self, rms: list[float]) -> None:
        """rms[i]: the root-mean-square of the LM's hidden state after block i (position 0, the
        attention sink with activations ~100x the rest, left out)."""
        self.h_rms = torch.tensor(rms, dtype=torch.float32, device=self.h_rms.device)

    def layer_scale(self, i: int) -> torch.Tensor:
        return self.h_rms[i] if self.h_rms.numel() else torch.ones((), device=self.h_rms.device)

    def gate_parameters(self) -> dict[str, nn.Parameter]:
        """The variant's gates by name (their own optimizer group `gates`, and a gradient norm each)."""
        return {}

    def prefix(self, soft: torch.Tensor | None, batch_size: int) -> torch.Tensor | None:
        return None

    def install(self, lm) -> None:
        pass

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def gates(self) -> dict[str, float]:
        return {}

    def components(self) -> dict[str, list[nn.Parameter]]:
        params = [p for p in self.parameters() if p.requires_grad]
        return {"adapter": params} if params else {}

    def _split_gates(self, out: dict[str, list[nn.Parameter]]) -> dict[str, list[nn.Parameter]]:
        """components with the gates moved out of every group into their own, `gates`."""
        gates = list(self.gate_parameters().values())
        ids = {id(p) for p in gates}
        out = {k: [p for p in v if id(p) not in ids] for k, v in out.items()}
        out = {k: v for k, v in out.items() if v}
        if gates:
            out["gates"] = gates
        return out


@dataclass
class NoOptions(Options):
    pass


@register_variant("fusion", "prefix", approach="soft tokens concatenated before the caption (LLaVA-style)",
                  key_features=["k soft tokens", "no LM change"], status="experimental", **MAINTAINERS)
class PrefixFusion(Fusion):
    Options = NoOptions

    def __init__(self, options, lm, width: int):
        super().__init__()

    def prefix(self, soft, batch_size):
        return soft


@dataclass
class PromptOptions(Options):
    tokens: int = 8  # learned prompt tokens

    def validate(self) -> None:
        at_least(self, "tokens", 1)


@register_variant("fusion", "none", approach="a learned prompt and no modality input: the data-only floor",
                  key_features=["prompt tuning", "ignores the modality"], status="experimental", **MAINTAINERS)
class NoModalityFusion(Fusion):
    Options = PromptOptions
    uses_modality = False

    def __init__(self, options, lm, width: int):
        super().__init__()
        emb = lm.get_input_embeddings().weight.detach()
        g = torch.Generator().manual_seed(0)
        rows = torch.randint(0, emb.shape[0], (options.tokens,), generator=g)
        self.prompt = nn.Parameter(emb[rows].clone().float())  # start from real token embeddings

    def prefix(self, soft, batch_size):
        return self.prompt.unsqueeze(0).expand(batch_size, -1, -1)

    def components(self):
        return {"prompt": [self.prompt]}


@dataclass
class UnfreezeOptions(Options):
    blocks: int = 2  # top LM blocks (and the final norm) trained with the prefix projector

    def validate(self) -> None:
        at_least(self, "blocks", 1)


@register_variant("fusion", "partial_unfreeze", approach="prefix soft tokens and the top N LM blocks trained",
                  key_features=["baseline", "LM blocks trainable"], status="experimental", **MAINTAINERS)
class PartialUnfreezeFusion(Fusion):
    Options = UnfreezeOptions

    def __init__(self, options, lm, width: int):
        super().__init__()
        from modalign.errors import UserError

        layers = decoder_layers(lm)
        if options.blocks > len(layers):
            raise UserError(f"config: 'fusion.blocks'={options.blocks}, but the LM has {len(layers)} blocks")
        self.trains_lm_blocks = options.blocks
        self.unfrozen = [p for layer in layers[len(layers) - options.blocks:] for p in layer.parameters()]
        norm = getattr(getattr(lm, "model", None), "norm", None)
        if norm is not None:
            self.unfrozen += list(norm.parameters())

    def prefix(self, soft, batch_size):
        return soft

    def install(self, lm):
        for p in self.unfrozen:
            p.requires_grad_(True)

    def components(self):
        return {"lm_blocks": self.unfrozen}


class LoRA(nn.Module):
    """A low-rank update added to a frozen linear layer's output: y + (x A^T B^T)·alpha/r, B = 0 at init."""

    def __init__(self, in_dim: int, out_dim: int, rank: int, alpha: float):
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, in_dim))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.B = nn.Parameter(torch.zeros(out_dim, rank))
        self.scaling = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.A.t()) @ self.B.t() * self.scaling


@dataclass
class AdditiveOptions(Options):
    layers: list = field(default_factory=lambda: [8, 16, 24])  # after which decoder blocks the signal is added
    init: float = 0.3  # the residual scale alpha at init
    max: float = 1.0  # alpha is clamped to [-max, max]
    bias: bool = False  # biases in the adapter MLP (a bias is a constant steering vector: the same for every sample)
    center: bool = True  # remove the batch mean of the signal in training (its running mean in evaluation)
    norm_match: bool = True  # LayerNorm the signal and scale it to the residual stream's rms at that block
    lora_rank: int = 0  # 0 = no LoRA; else rank r on `lora_targets` of the chosen layers
    lora_alpha: float = 16.0
    lora_targets: list = field(default_factory=lambda: ["q_proj", "v_proj"])

    def validate(self) -> None:
        at_least(self, "max", 0.0)
        require(abs(self.init) <= self.max, "init", self.init, f"it must be within [-max, max] (max={self.max})")
        at_least(self, "lora_rank", 0)
        require(self.lora_alpha > 0, "lora_alpha", self.lora_alpha, "it must be > 0")
        require(isinstance(self.lora_targets, (list, tuple)) and all(isinstance(t, str) for t in self.lora_targets),
                "lora_targets", self.lora_targets, "it must be a list of projection names (e.g. [q_proj, v_proj])")


class _LoRAMixin:
    def _install_lora(self, lm, layers: list[int], targets, key: str) -> None:
        blocks = decoder_layers(lm)
        for name, lora in self.lora.items():
            i, target = name.split("_", 1)
            module = self._find(blocks[int(i)], target)

            def hook(mod, args, output, lora=lora):
                return output + lora(args[0]) if self.enabled else output

            self._handles.append(module.register_forward_hook(hook))

    @staticmethod
    def _find(block: nn.Module, target: str) -> nn.Linear:
        from modalign.errors import UserError

        for name, mod in block.named_modules():
            if name.split(".")[-1] == target and isinstance(mod, nn.Linear):
                return mod
        raise UserError(f"config: 'fusion.lora_targets': the LM's blocks have no linear layer '{target}'")

    def _build_lora(self, lm, layers, opts) -> nn.ModuleDict:
        out = {}
        if opts.lora_rank:
            blocks = decoder_layers(lm)
            for i in layers:
                for t in opts.lora_targets:
                    lin = self._find(blocks[i], t)
                    out[f"{i}_{t}"] = LoRA(lin.in_features, lin.out_features, opts.lora_rank, opts.lora_alpha)
        return nn.ModuleDict(out)


class Centered(nn.Module):
    """x minus the batch mean in training (updating a running mean, as batch norm does) and minus the
    running mean in evaluation: what remains differs from sample to sample, so a path through it
    cannot collapse into one steering vector for every input."""

    def __init__(self, width: int, momentum: float = 0.05):
        super().__init__()
        self.momentum = momentum
        self.use_running = False  # True: the running mean in training too (SCST scores what eval-mode sampling drew)
        self.register_buffer("running_mean", torch.zeros(width))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not self.use_running and x.shape[0] > 1:
            mean = x.mean(0)
            with torch.no_grad():  # the plain average of the first 1/momentum batches, then an EMA
                weight = max(self.momentum, 1.0 / float(self.count + 1))
                self.running_mean.lerp_(mean.detach().float(), weight)
                self.count += 1
            return x - mean
        return x - self.running_mean.to(x.dtype)


@register_variant("fusion", "additive", approach="a gated adapter adds the modality signal to the residual stream at chosen layers",
                  key_features=["residual scale alpha (init, max)", "bias-free, centred, norm-matched signal",
                                "optional LoRA"], status="experimental", **MAINTAINERS)
class AdditiveFusion(_LoRAMixin, Fusion):
    """After each chosen block: h + clamp(alpha)·s_i·LN(center(adapter(LN(mean soft token)))), where
    s_i is the residual stream's rms at that block (norm_match) and the adapter has no bias."""
    Options = AdditiveOptions

    def __init__(self, options, lm, width: int):
        super().__init__()
        n = len(decoder_layers(lm))
        self.opts = options
        self.layer_ids = check_layers(options.layers, n, "fusion.layers")
        self.adapters = nn.ModuleDict({str(i): nn.Sequential(
            nn.LayerNorm(width, elementwise_affine=False), nn.Linear(width, width, bias=options.bias), nn.GELU(),
            nn.Linear(width, width, bias=options.bias)) for i in self.layer_ids})
        self.center = nn.ModuleDict({str(i): Centered(width) for i in self.layer_ids}) if options.center else None
        self.alpha = nn.ParameterDict({str(i): nn.Parameter(torch.tensor(float(options.init))) for i in self.layer_ids})
        self.lora = self._build_lora(lm, self.layer_ids, options)

    def scale(self, i: int) -> torch.Tensor:
        return self.alpha[str(i)].clamp(-self.opts.max, self.opts.max)

    def delta(self, i: int, signal: torch.Tensor) -> torch.Tensor:
        """(B, k, W) soft tokens -> (B, W) what block i's output gets added (before the batch is matched)."""
        add = self.adapters[str(i)](signal.mean(1).float())
        if self.center is not None:
            add = self.center[str(i)](add)
        if self.opts.norm_match:
            add = F.layer_norm(add, add.shape[-1:]) * self.layer_scale(i)
        return self.scale(i) * add

    def install(self, lm):
        blocks = decoder_layers(lm)
        for i in self.layer_ids:
            def hook(mod, args, output, i=i):
                if not self.enabled or self.signal is None:
                    return output
                h = _hidden(output)
                add = _match_batch(self.delta(i, self.signal), h.shape[0])[:, None, :].to(h.dtype)
                self._record(i, h, add.expand_as(h))
                return _replace_hidden(output, h + add)

            self._handles.append(blocks[i].register_forward_hook(hook))
        self._install_lora(lm, self.layer_ids, self.opts.lora_targets, "fusion.lora_targets")

    def gates(self):
        return {f"alpha_{i}": float(self.scale(i).detach()) for i in self.layer_ids}

    def gate_parameters(self):
        return {f"alpha_{i}": self.alpha[str(i)] for i in self.layer_ids}

    def components(self):
        out = {"adapter": list(self.adapters.parameters()) + list(self.alpha.parameters())}
        if len(self.lora):
            out["lora"] = list(self.lora.parameters())
        return self._split_gates(out)


@dataclass
class CrossAttnOptions(Options):
    layers: list = field(default_factory=lambda: [8, 16, 24])  # after which decoder blocks a gated block sits
    heads: int = 8
    ff_mult: int = 2
    media_norm: bool = True  # LayerNorm on the soft tokens before keys/values (Flamingo's resampler ends with one)
    bias: bool = False  # biases in the attention and FF projections (open_flamingo: none)
    norm_match: bool = True  # the block's output scaled by the residual stream's rms at that block
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: list = field(default_factory=lambda: ["q_proj", "v_proj"])

    def validate(self) -> None:
        at_least(self, "heads", 1)
        at_least(self, "ff_mult", 1)
        at_least(self, "lora_rank", 0)
        require(self.lora_alpha > 0, "lora_alpha", self.lora_alpha, "it must be > 0")


class GatedCrossAttention(nn.Module):
    """h + tanh(g_attn)·s·attn(LN(h), LN(soft)) and then + tanh(g_ff)·s·FF(LN(h)); both gates start
    at 0 (s: the residual stream's rms at the block where norm-matched, else 1)."""

    def __init__(self, width: int, heads: int, ff_mult: int, media_norm: bool = True, bias: bool = False):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width, bias=bias), nn.LayerNorm(width, bias=bias)
        self.media_norm = nn.LayerNorm(width, bias=bias) if media_norm else nn.Identity()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True, bias=bias)
        self.ff = nn.Sequential(nn.Linear(width, width * ff_mult, bias=bias), nn.GELU(),
                                nn.Linear(width * ff_mult, width, bias=bias))
        self.gate_attn = nn.Parameter(torch.zeros(()))
        self.gate_ff = nn.Parameter(torch.zeros(()))

    def forward(self, h: torch.Tensor, soft: torch.Tensor, scale: torch.Tensor | float = 1.0) -> torch.Tensor:
        m = self.media_norm(soft)
        a, _ = self.attn(self.norm1(h), m, m, need_weights=False)
        h = h + torch.tanh(self.gate_attn) * scale * a
        return h + torch.tanh(self.gate_ff) * scale * self.ff(self.norm2(h))


@register_variant("fusion", "cross_attn", approach="gated cross-attention from text to soft tokens at chosen layers (Flamingo-style)",
                  key_features=["tanh gates at 0", "LayerNorm'd media, bias-free", "optional LoRA"],
                  status="experimental", **MAINTAINERS)
class CrossAttnFusion(_LoRAMixin, Fusion):
    Options = CrossAttnOptions

    def __init__(self, options, lm, width: int):
        super().__init__()
        from modalign.errors import UserError

        n = len(decoder_layers(lm))
        self.opts = options
        self.layer_ids = check_layers(options.layers, n, "fusion.layers")
        if width % options.heads:
            raise UserError(f"config: 'fusion.heads'={options.heads} does not divide the LM's width {width}")
        self.blocks = nn.ModuleDict({str(i): GatedCrossAttention(width, options.heads, options.ff_mult,
                                                                 options.media_norm, options.bias)
                                     for i in self.layer_ids})
        self.lora = self._build_lora(lm, self.layer_ids, options)

    def install(self, lm):
        blocks = decoder_layers(lm)
        for i in self.layer_ids:
            def hook(mod, args, output, i=i):
                if not self.enabled or self.signal is None:
                    return output
                h = _hidden(output)
                soft = _match_batch(self.signal, h.shape[0]).to(h.dtype)
                scale = self.layer_scale(i).to(h.dtype) if self.opts.norm_match else 1.0
                out = self.blocks[str(i)](h, soft, scale)
                self._record(i, h, out - h)
                return _replace_hidden(output, out)

            self._handles.append(blocks[i].register_forward_hook(hook))
        self._install_lora(lm, self.layer_ids, self.opts.lora_targets, "fusion.lora_targets")

    def gates(self):
        out = {}
        for i in self.layer_ids:
            b = self.blocks[str(i)]
            out[f"attn_{i}"] = float(torch.tanh(b.gate_attn.detach()))
            out[f"ff_{i}"] = float(torch.tanh(b.gate_ff.detach()))
        return out

    def gate_parameters(self):
        out = {}
        for i in self.layer_ids:
            out[f"attn_{i}"], out[f"ff_{i}"] = self.blocks[str(i)].gate_attn, self.blocks[str(i)].gate_ff
        return out

    def components(self):
        out = {"adapter": list(self.blocks.parameters())}
        if len(self.lora):
            out["lora"] = list(self.lora.parameters())
        return self._split_gates(out)


@register_variant("fusion", "hybrid", approach="prefix soft tokens and gated cross-attention to them (LLaMA-Adapter V2 style)",
                  key_features=["early fusion (prefix)", "tanh-gated cross-attention", "optional LoRA"],
                  status="experimental", **MAINTAINERS)
class HybridFusion(CrossAttnFusion):
    """The soft tokens both before the caption (the LM attends to them itself, as under prefix) and
    as keys/values of gated cross-attention blocks after chosen layers."""

    def prefix(self, soft, batch_size):
        return soft


@dataclass
class SafeOptions(Options):
    layers: list = field(default_factory=lambda: [6, 13, 20, 27])  # four blocks spread over SmolLM2's 30
    heads: int = 8
    init: float = 0.3  # residual scale at init
    max: float = 1.0  # the residual scale is clamped to [-max, max]
    lora_rank: int = 64  # LoRA on the adapter's own query and value projections
    lora_alpha: float = 64.0
    train_base: bool = False  # false (SAFE): the adapter's base projections stay at their (seeded) init, LoRA trains

    def validate(self) -> None:
        at_least(self, "heads", 1)
        at_least(self, "max", 0.0)
        require(abs(self.init) <= self.max, "init", self.init, f"it must be within [-max, max] (max={self.max})")
        at_least(self, "lora_rank", 1)
        require(self.lora_alpha > 0, "lora_alpha", self.lora_alpha, "it must be > 0")


class SafeAdapter(nn.Module):
    """Per-token cross-attention from the LM's hidden states (queries) to the modality tokens
    (keys/values), LoRA on its own query and value projections, its output LayerNorm'd: the delta
    (B, T, W) a block's output gets, before the residual scale."""

    def __init__(self, width: int, heads: int, rank: int, alpha: float, train_base: bool):
        super().__init__()
        self.heads = heads
        self.norm_h, self.norm_m = nn.LayerNorm(width), nn.LayerNorm(width)
        self.q, self.k, self.v, self.o = (nn.Linear(width, width, bias=False) for _ in range(4))
        for lin in (self.q, self.k, self.v, self.o):
            lin.weight.requires_grad_(train_base)
        self.lora_q, self.lora_v = LoRA(width, width, rank, alpha), LoRA(width, width, rank, alpha)
        self.out_norm = nn.LayerNorm(width)

    def forward(self, h: torch.Tensor, media: torch.Tensor) -> torch.Tensor:
        b, t, w = h.shape
        x, m = self.norm_h(h), self.norm_m(media)
        q = self.q(x) + self.lora_q(x)
        k, v = self.k(m), self.v(m) + self.lora_v(m)
        split = lambda z: z.view(b, z.shape[1], self.heads, w // self.heads).transpose(1, 2)  # noqa: E731
        a = F.scaled_dot_product_attention(split(q), split(k), split(v))  # (B, heads, T, W/heads)
        return self.out_norm(self.o(a.transpose(1, 2).reshape(b, t, w)))


@register_variant("fusion", "safe", approach="a SAFE-style gated residual adapter: per-token cross-attention to the modality "
                  "tokens with LoRA on its query/value, LayerNorm'd delta, clamped residual scale",
                  key_features=["residual scale (init 0.3, max 1.0)", "LoRA on the adapter's q/v",
                                "norm-matched to the residual stream"], status="experimental", **MAINTAINERS)
class SafeFusion(Fusion):
    """After each chosen block: h + clamp(scale_i)·s_i·LN(o(attn(q(LN h), k(LN m), v(LN m)))), s_i the
    residual stream's rms at that block; q and v carry LoRA (B = 0 at init), the base projections
    keep their seeded init unless train_base."""
    Options = SafeOptions

    def __init__(self, options, lm, width: int):
        super().__init__()
        from modalign.errors import UserError

        n = len(decoder_layers(lm))
        self.opts = options
        self.layer_ids = check_layers(options.layers, n, "fusion.layers")
        if width % options.heads:
            raise UserError(f"config: 'fusion.heads'={options.heads} does not divide the LM's width {width}")
        self.adapters = nn.ModuleDict({str(i): SafeAdapter(width, options.heads, options.lora_rank, options.lora_alpha,
                                                           options.train_base) for i in self.layer_ids})
        self.residual = nn.ParameterDict({str(i): nn.Parameter(torch.tensor(float(options.init))) for i in self.layer_ids})

    def scale(self, i: int) -> torch.Tensor:
        return self.residual[str(i)].clamp(-self.opts.max, self.opts.max)

    def install(self, lm):
        blocks = decoder_layers(lm)
        for i in self.layer_ids:
            def hook(mod, args, output, i=i):
                if not self.enabled or self.signal is None:
                    return output
                h = _hidden(output)
                media = _match_batch(self.signal, h.shape[0])
                delta = self.adapters[str(i)](h.float(), media.float()) * (self.scale(i) * self.layer_scale(i))
                delta = delta.to(h.dtype)
                self._record(i, h, delta)
                return _replace_hidden(output, h + delta)

            self._handles.append(blocks[i].register_forward_hook(hook))

    def gates(self):
        return {f"scale_{i}": float(self.scale(i).detach()) for i in self.layer_ids}

    def gate_parameters(self):
        return {f"scale_{i}": self.residual[str(i)] for i in self.layer_ids}

    def components(self):
        adapter = [p for p in self.adapters.parameters() if p.requires_grad]
        lora = [p for a in self.adapters.values() for p in (*a.lora_q.parameters(), *a.lora_v.parameters())]
        ids = {id(p) for p in lora}
        return self._split_gates({"adapter": [p for p in adapter if id(p) not in ids], "lora": lora})


@torch.no_grad()
def hidden_rms(lm, texts: list[list[int]] | None = None) -> list[float]:
    """The rms of the frozen LM's residual stream after each decoder block, over the token ids of
    `texts` (real text: the recipe passes its retention probe; None = 64 seeded random ids), the
    first position of each left out (the attention sink, whose activations are ~100x the rest)."""
    blocks = decoder_layers(lm)
    if texts is None:
        g = torch.Generator().manual_seed(0)
        texts = [torch.randint(0, lm.get_input_embeddings().weight.shape[0], (64,), generator=g).tolist()]
    sums = torch.zeros(len(blocks), dtype=torch.float64)
    count = 0
    seen: dict[int, torch.Tensor] = {}
    handles = [b.register_forward_hook(lambda mod, args, out, i=i: seen.__setitem__(i, _hidden(out)))
               for i, b in enumerate(blocks)]
    device = lm.get_input_embeddings().weight.device
    try:
        for ids in texts:
            if len(ids) < 2:
                continue
            lm(input_ids=torch.tensor([ids], device=device), use_cache=False)
            for i, h in seen.items():
                sums[i] += float(h[0, 1:].float().pow(2).mean(-1).sqrt().sum())
            count += len(ids) - 1
    finally:
        for h in handles:
            h.remove()
    return (sums / max(1, count)).tolist()


def injection_ratios(sums: dict) -> dict[str, float]:
    """`FusedLM.measure_injection`'s sums -> {"inject/<block>/batch_mean": r, "inject/<block>/per_sample": r}:
    r the mean over caption positions of ||part of delta|| / ||h||. The batch-mean part is the same for
    every sample of a batch (a steering vector that lowers the loss without reading the input); the
    per-sample part is what can carry the modality."""
    out = {}
    for i, (b, p, n) in sorted(sums.items()):
        out[f"inject/{i}/batch_mean"] = b / max(1, n)
        out[f"inject/{i}/per_sample"] = p / max(1, n)
    return out


def build_fusion(kind: str, options: dict, lm, width: int) -> Fusion:
    """The registered fusion variant `kind` with its options (typed and checked by the caller)."""
    variant = get_variant("fusion", kind)
    opts = options if isinstance(options, Options) else variant.obj.Options(**options)
    return variant.obj(opts, lm, width)


# --- the fused model ---------------------------------------------------------------------------


class FuseOutput(NamedTuple):
    """The caption tokens of a batch, packed: only real (non-padding) target positions are scored,
    so the LM head (width x vocab, the largest matmul of a step) never runs on padding."""
    logits: torch.Tensor  # (N, V) next-token logits at the N real caption + eos positions of the batch
    targets: torch.Tensor  # (N,) the token ids they predict
    rows: torch.Tensor  # (N,) the sample (batch row) of each position
    batch_size: int  # B
    soft_norm: torch.Tensor  # () mean norm of the soft tokens (0 without modality input)
    soft: torch.Tensor | None = None  # (B, k, W) the soft tokens (None without modality input)


class FusedLM(nn.Module):
    """The frozen LM with a modality side. `start_ids` (S,) is what precedes the caption.

    batch: the modality batch (tokens_id, tokens_cont, mask, globals) and "text" (B, L) caption
    token ids followed by eos, padded with -1."""

    def __init__(self, modality: nn.Module | None, lm, projector: Projector | None, fusion: Fusion,
                 start_ids: list[int], freeze_encoder: bool = True, features: str = "embedding",
                 probe_ids: list[list[int]] | None = None):
        super().__init__()
        self.modality = modality
        self.lm = lm
        self.projector = projector
        self.fusion = fusion
        self.features = features
        self.freeze_encoder = freeze_encoder
        self.register_buffer("start_ids", torch.tensor(start_ids, dtype=torch.long), persistent=False)
        if modality is not None:
            modality.requires_grad_(not freeze_encoder)
        lm.requires_grad_(False)
        fusion.calibrate(hidden_rms(lm, probe_ids))
        fusion.install(lm)
        emb = lm.get_input_embeddings().weight
        self.text_norm = float(emb.detach().float().norm(dim=-1).mean())

    def hold_frozen_lm_in(self, dtype: torch.dtype) -> None:
        """Keep the frozen LM's weights in `dtype` (bf16: cast once here, not by autocast at every
        step). Trainable parameters (projector, adapters, LoRA, unfrozen LM blocks) stay fp32 master
        weights; buffers (rotary frequencies) stay as they are. The frozen LM the retention baseline
        compares against is this same LM, at the same precision."""
        for p in self.lm.parameters():
            if not p.requires_grad:
                p.data = p.data.to(dtype)

    # checkpoints: trainable parameters and buffers, never the frozen LM ------------------------
    def _kept(self, key: str, trainable_lm: set[str]) -> bool:
        if key.startswith("lm."):
            return key in trainable_lm
        if key.startswith("modality.") and self.freeze_encoder:
            return False
        return True

    def _trainable_lm(self) -> set[str]:
        """The LM's trainable parameter names (adapters, LoRA, unfrozen blocks), computed once per
        state_dict/load call: per key it made a checkpoint of a 30-block LM cost seconds."""
        return {f"lm.{n}" for n, p in self.lm.named_parameters() if p.requires_grad}

    def state_dict(self, *args, **kwargs):
        full = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", "")
        trainable = self._trainable_lm()
        for k in [k for k in full if not self._kept(k[len(prefix):], trainable)]:
            del full[k]
        return full

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        trainable = self._trainable_lm()
        missing = [k for k in result.missing_keys if self._kept(k, trainable)]
        if strict and (missing or result.unexpected_keys):
            what = f"missing {missing[0]}" if missing else f"unexpected {result.unexpected_keys[0]}"
            raise RuntimeError(f"Error(s) in loading state_dict for FusedLM: {what}")
        return result

    # parts ---------------------------------------------------------------------------------------
    def components(self) -> dict[str, list[nn.Parameter]]:
        out: dict[str, list[nn.Parameter]] = {}
        if self.projector is not None:
            out["projector"] = list(self.projector.parameters())
        out.update(self.fusion.components())
        if self.modality is not None and not self.freeze_encoder:
            out["encoder"] = list(self.modality.encoder.parameters()) + list(self.modality.head.parameters())
        return out

    def train(self, mode: bool = True):
        super().train(mode)
        if self.modality is not None and self.freeze_encoder:
            self.modality.eval()  # a frozen encoder computes the same features in training and evaluation
        return self

    def encode(self, batch: dict) -> torch.Tensor:
        """The modality features (B, F) the projector takes: the stage-2 embedding or the encoder's
        pooled features."""
        grad = torch.enable_grad() if (self.training and not self.freeze_encoder) else torch.no_grad()
        with grad:
            if self.features == "embedding":
                return self.modality.encode_modality(batch).embedding
            enc = self.modality.encoder
            feats, tokens = enc(batch["tokens_id"], batch["tokens_cont"], batch["mask"], batch["globals"])
            if self.features == "tokens":
                return pack_tokens(tokens, enc.token_mask(batch["mask"]))
            return feats

    def soft_tokens(self, batch: dict) -> torch.Tensor | None:
        """(B, k, W) soft tokens; from batch["features"] where the batch carries a frozen encoder's
        features computed ahead (`FrozenFeatures`), else from the encoder."""
        if not self.fusion.uses_modality or self.projector is None:
            return None
        feats = batch["features"] if "features" in batch else self.encode(batch)
        return self.projector(feats.float())

    @contextlib.contextmanager
    def _signal(self, soft):
        self.fusion.signal = soft
        try:
            yield
        finally:
            self.fusion.signal = None

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm.get_input_embeddings()(ids)

    def _inputs(self, soft: torch.Tensor | None, batch_size: int, text: torch.Tensor | None):
        """-> inputs_embeds, attention_mask, the number of positions before the caption."""
        start = self._embed(self.start_ids).unsqueeze(0).expand(batch_size, -1, -1)
        parts = [start]
        pre = self.fusion.prefix(soft, batch_size)
        if pre is not None:
            parts.insert(0, pre.to(start.dtype))
        n_before = sum(p.shape[1] for p in parts)
        mask = [torch.ones(batch_size, n_before, dtype=torch.long, device=start.device)]
        if text is not None:
            parts.append(self._embed(text.clamp(min=0)))
            mask.append((text >= 0).long())
        return torch.cat(parts, 1), torch.cat(mask, 1), n_before

    def forward(self, batch: dict, soft: torch.Tensor | None = None) -> FuseOutput:
        """soft: (B, k, W) soft tokens to use instead of the batch's own (the reliance gap's
        mismatched pass); None = computed from the batch."""
        text = batch["text"]  # (B, L) caption + eos, -1 padded
        soft = self.soft_tokens(batch) if soft is None else soft
        b = text.shape[0]
        embeds, mask, n_before = self._inputs(soft, b, text[:, :-1])
        with self._signal(soft):
            hidden = self._body(embeds, mask)
        # position t predicts token t+1: the caption's tokens are predicted from n_before-1 onwards;
        # gathering the real positions first keeps the LM head off padding (a sliced 3-D input
        # would also send it through a batched matmul with the vocab matrix expanded per sample)
        valid = text >= 0  # (B, L)
        rows, cols = valid.nonzero(as_tuple=True)  # (N,), (N,)
        h = hidden[rows, cols + (n_before - 1)]  # (N, W)
        logits = self.lm.get_output_embeddings()(h)  # (N, V)
        if self.fusion.recording is not None:
            self._injection(rows, cols + (n_before - 1))
        soft_norm = soft.detach().float().norm(dim=-1).mean() if soft is not None else torch.zeros((), device=text.device)
        return FuseOutput(logits, text[rows, cols], rows, b, soft_norm, soft)

    @contextlib.contextmanager
    def measure_injection(self, sums: dict):
        """Forward passes inside measure what the fusion's hooks add to the residual stream at the
        positions that predict caption tokens, accumulated into `sums` across calls (read it with
        `injection_ratios`)."""
        self._injected, self.fusion.recording = sums, {}
        try:
            yield sums
        finally:
            self.fusion.recording, self._injected = None, None

    def _injection(self, rows: torch.Tensor, pos: torch.Tensor) -> None:
        """Fold the hooks' records of one forward pass (h and delta, (B, T, W) each) into the sums."""
        records, self.fusion.recording = self.fusion.recording, {}
        for i, pairs in records.items():
            h, delta = pairs[-1]  # one pass, one record per block
            d = delta[rows, pos].float()  # (N, W) at the positions that predict caption tokens
            hn = h[rows, pos].float().norm(dim=-1).clamp_min(1e-12)  # (N,)
            span = int(pos.max()) + 1
            total = d.new_zeros(span, d.shape[1]).index_add(0, pos, d)
            count = d.new_zeros(span).index_add(0, pos, torch.ones_like(hn))
            mean = (total / count.clamp(min=1)[:, None])[pos]  # (N, W): the batch mean at each position
            acc = self._injected.setdefault(i, [0.0, 0.0, 0])
            acc[0] += float((mean.norm(dim=-1) / hn).sum())
            acc[1] += float(((d - mean).norm(dim=-1) / hn).sum())
            acc[2] += int(pos.numel())

    def _body(self, embeds, mask):
        base = getattr(self.lm, "model", None) or getattr(self.lm, "transformer")
        return base(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state

    @torch.no_grad()
    def caption_embedding(self, text: torch.Tensor) -> torch.Tensor:
        """text (B, L) caption + eos, -1 padded -> (B, W): the mean of the frozen LM's input embeddings
        of the caption's tokens (eos and padding left out). The text side of the contrastive term."""
        n = (text >= 0).sum(1, keepdim=True)  # caption tokens + the eos
        words = (torch.arange(text.shape[1], device=text.device)[None, :] < (n - 1)).unsqueeze(-1)
        emb = self._embed(text.clamp(min=0)).float()
        return (emb * words).sum(1) / (n - 1).clamp(min=1)

    def text_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits of the LM (with whatever the fusion changed, e.g. LoRA) over text alone: (B, L, V)."""
        mask = (ids >= 0).long()
        return self.lm(inputs_embeds=self._embed(ids.clamp(min=0)), attention_mask=mask, use_cache=False).logits

    @contextlib.contextmanager
    def frozen_lm(self):
        """The LM exactly as loaded: every hook off (for the retention baseline)."""
        self.fusion.enabled = False
        try:
            yield
        finally:
            self.fusion.enabled = True

    @torch.no_grad()
    def generate(self, batch: dict, max_new_tokens: int, num_beams: int = 1, length_penalty: float = 1.0,
                 eos_token_id: int | None = None, pad_token_id: int | None = None, do_sample: bool = False,
                 with_eos: bool = False) -> list[list[int]]:
        """Captions for a batch: greedy (num_beams 1), beam search, or sampled from the model's
        distribution (do_sample; temperature 1, no top-k/top-p; torch's global RNG). -> token ids
        per sample, up to eos (included when `with_eos` and the caption ended with it). Decoding runs in
        evaluation mode whatever the model's (a centred adapter then subtracts its running mean, not
        the batch's: a sample's caption does not depend on its batch)."""
        was = self.training
        self.eval()
        try:
            return self._generate(batch, max_new_tokens, num_beams, length_penalty, eos_token_id, pad_token_id,
                                  do_sample, with_eos)
        finally:
            self.train(was)

    def _generate(self, batch, max_new_tokens, num_beams, length_penalty, eos_token_id, pad_token_id, do_sample,
                  with_eos):
        b = batch["tokens_id"].shape[0]
        soft = self.soft_tokens(batch)
        embeds, mask, _ = self._inputs(soft, b, None)
        if num_beams == 1 and not do_sample:
            return self._greedy(embeds, soft, max_new_tokens, eos_token_id, with_eos)
        with self._signal(soft):
            out = self.lm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                                   num_beams=num_beams, length_penalty=length_penalty, do_sample=do_sample,
                                   eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                                   **({"temperature": 1.0, "top_k": 0, "top_p": 1.0} if do_sample else {}))
        rows = []
        for seq in out.tolist():
            if eos_token_id is not None and eos_token_id in seq:
                seq = seq[: seq.index(eos_token_id) + (1 if with_eos else 0)]
            rows.append(seq)
        return rows


    def _greedy(self, embeds: torch.Tensor, soft: torch.Tensor | None, max_new_tokens: int, eos: int | None,
                with_eos: bool) -> list[list[int]]:
        """Greedy decoding with the KV cache, the same tokens as `lm.generate(num_beams=1)`, where a
        sample leaves the batch (its rows of the cache too) as soon as it emits eos: the batch
        shrinks as captions end instead of running to the longest. Every sample's prefix has the same
        length (no padding), so no attention mask is needed. embeds (B, S, W) -> ids per sample."""
        base = getattr(self.lm, "model", None) or getattr(self.lm, "transformer")
        head, embed = self.lm.get_output_embeddings(), self.lm.get_input_embeddings()
        b = embeds.shape[0]
        rows: list[list[int]] = [[] for _ in range(b)]
        active = torch.arange(b, device=embeds.device)  # (b',) samples still decoding
        cache = preallocated_cache(self.lm.config, embeds.shape[1] + max_new_tokens)
        # transformers 5.2x renamed forward's past_key_values to cache (the old name warns)
        cache_kw = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
        x = embeds
        try:
            for step in range(max_new_tokens):
                self.fusion.signal = None if soft is None else soft[active]
                h = base(inputs_embeds=x, use_cache=True, **{cache_kw: cache}).last_hidden_state[:, -1]  # (b', W)
                nxt = head(h).argmax(-1)  # (b',)
                for i, t in zip(active.tolist(), nxt.tolist()):
                    rows[i].append(t)
                if eos is None:
                    keep = torch.ones_like(nxt, dtype=torch.bool)
                else:
                    keep = nxt != eos
                    if not bool(keep.all()):
                        if not bool(keep.any()):
                            break
                        cache.batch_select_indices(keep.nonzero(as_tuple=True)[0])
                        active, nxt = active[keep], nxt[keep]
                x = embed(nxt)[:, None, :]  # (b', 1, W)
        finally:
            self.fusion.signal = None
        if eos is not None:
            rows = [r[: r.index(eos) + (1 if with_eos else 0)] if eos in r else r for r in rows]
        return rows


@functools.cache
def _preallocated_layer():
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        """A KV cache layer that writes each step into a buffer allocated once for the whole decode
        (capacity = prefix + max new tokens), where DynamicLayer concatenates, copying the whole cache
        at every token (a fifth of greedy decoding's time at batch 64). keys/values are views of the
        filled part."""

        def __init__(self, capacity: int):
            super().__init__()
            self.capacity, self.length = capacity, 0

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                b, h, _, d = key_states.shape
                self._k = key_states.new_empty(b, h, self.capacity, d)
                self._v = value_states.new_empty(b, value_states.shape[1], self.capacity, value_states.shape[3])
                self.device, self.is_initialized = key_states.device, True
            n = key_states.shape[-2]
            self._k[:, :, self.length:self.length + n] = key_states
            self._v[:, :, self.length:self.length + n] = value_states
            self.length += n
            self.keys, self.values = self._k[:, :, :self.length], self._v[:, :, :self.length]
            return self.keys, self.values

        def batch_select_indices(self, indices):
            if self.is_initialized:
                self._k, self._v = self._k[indices], self._v[indices]
                self.keys, self.values = self._k[:, :, :self.length], self._v[:, :, :self.length]

    return PreallocatedLayer


def preallocated_cache(config, capacity: int):
    """transformers' DynamicCache for `config` with its full-attention layers preallocated to `capacity`
    positions (sliding-window layers, where an LM has them, stay as transformers made them)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=config)
    layer = _preallocated_layer()
    cache.layers = [layer(capacity) if type(lay) is DynamicLayer else lay for lay in cache.layers]
    return cache


# (split fingerprint, encoder checkpoint sha256, features kind) -> (N, F): the jobs of an in-process
# sweep on the same data and align run encode each split once
_FROZEN_FEATURES: dict[tuple, torch.Tensor] = {}


@torch.no_grad()
def frozen_features(model: "FusedLM", batches, key: tuple | None = None) -> torch.Tensor:
    """The frozen encoder's features of a whole split, computed once, in fixed chunks in sample
    order (the same values whatever the run's history, so a resumed run sees what the uninterrupted
    one saw): `batches` yields the split's batches in order. -> (N, F) fp32 on the CPU."""
    if key is not None and key in _FROZEN_FEATURES:
        return _FROZEN_FEATURES[key]
    was = model.training
    model.eval()
    device = next(model.projector.parameters()).device
    chunks = [model.encode({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()}).float().cpu()
              for b in batches]
    feats = pad_tokens(chunks) if chunks[0].dim() == 3 else torch.cat(chunks)
    model.train(was)
    if key is not None:
        for old in [k for k in _FROZEN_FEATURES if k[1:] != key[1:]]:
            del _FROZEN_FEATURES[old]  # another encoder's: one align run's features are kept at a time
        _FROZEN_FEATURES[key] = feats
    return feats


def _token_nll(out: FuseOutput) -> torch.Tensor:
    """(N,) the cross-entropy of each caption token (fp32)."""
    return F.cross_entropy(out.logits.float(), out.targets, reduction="none")


def _per_sample_sum(out: FuseOutput, values: torch.Tensor) -> torch.Tensor:
    """(N,) per-token values -> (B,) their sum per sample."""
    return values.new_zeros(out.batch_size).index_add(0, out.rows, values)


def caption_loss(out: FuseOutput) -> dict[str, torch.Tensor]:
    """Teacher-forced cross-entropy over caption and eos tokens (mean over real tokens)."""
    ce = _token_nll(out).sum() / max(1, out.targets.numel())
    return {"loss": ce, "xe": ce.detach()}


def soft_text_contrastive(out: FuseOutput, caption: torch.Tensor, groups: torch.Tensor,
                          temperature: float) -> torch.Tensor:
    """The XE+contrastive term: symmetric InfoNCE between each sample's mean soft token and the mean
    LM input embedding of its caption's words (`FusedLM.caption_embedding`), both L2-normalised, at a
    fixed temperature. Samples with the same caption (`groups`) are positives of each other."""
    from modalign.losses.contrastive import clip_loss

    m = F.normalize(out.soft.float().mean(1), dim=-1)
    t = F.normalize(caption.float(), dim=-1)
    return clip_loss(m, t, torch.tensor(1.0 / temperature, device=m.device), groups)["clip"]


def per_example_xe(out: FuseOutput) -> torch.Tensor:
    """(B,) mean cross-entropy of each sample's caption tokens."""
    counts = _per_sample_sum(out, torch.ones_like(out.targets, dtype=torch.float32))
    return _per_sample_sum(out, _token_nll(out)) / counts.clamp(min=1)


@torch.no_grad()
def reliance_gap(model: FusedLM, batch: dict, out: FuseOutput, donor: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) how much each caption relies on its own modality input, in nats per token: the
    teacher-forced cross-entropy of the caption given another sample's soft tokens (sample i gets
    sample i-1's; the first gets `donor` (1, k, W), e.g. the previous batch's last, or the batch's
    last) minus the cross-entropy given its own. 0 for a model without modality input, and for one
    that ignores it; positive when the modality lowers the caption's loss."""
    if out.soft is None:
        return torch.zeros(out.batch_size, device=out.targets.device)
    first = donor if donor is not None else out.soft[-1:]
    if out.batch_size == 1 and donor is None:
        return torch.zeros(1, device=out.targets.device)  # nothing to swap with
    other = torch.cat([first.to(out.soft.dtype), out.soft[:-1]])  # (B, k, W): sample i gets i-1's
    return per_example_xe(model(batch, soft=other)) - per_example_xe(out)


@torch.no_grad()
def first_token_jsd(out: FuseOutput) -> torch.Tensor:
    """(B,) the Jensen-Shannon divergence (nats, at most ln 2) between each sample's distribution of
    its caption's first token (given only its modality input and the start) and the batch's mean
    distribution. Near 0 when every sample starts its caption alike: a logit-level view of reliance
    that greedy decoding hides (a model whose distributions differ but whose argmax does not)."""
    starts = torch.searchsorted(out.rows, torch.arange(out.batch_size, device=out.rows.device))  # (B,)
    logp = F.log_softmax(out.logits[starts].float(), dim=-1)  # (B, V)
    p = logp.exp()
    mix = 0.5 * (p + p.mean(0, keepdim=True))  # (B, V): (p_i + batch mean) / 2
    log_mix = mix.clamp_min(1e-30).log()
    mean = p.mean(0, keepdim=True)
    kl_p = (p * (logp - log_mix)).sum(-1)
    kl_mean = (mean * (mean.clamp_min(1e-30).log() - log_mix)).sum(-1)
    return (0.5 * (kl_p + kl_mean)).clamp_min(0)


def scst_loss(out: FuseOutput, advantage: torch.Tensor) -> torch.Tensor:
    """Self-critical policy gradient: -(reward - baseline) x log p(sampled caption), mean over samples."""
    logp = _per_sample_sum(out, -_token_nll(out))  # (B,)
    return -(advantage * logp).mean()
