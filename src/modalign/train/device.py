"""Where tensors live and in which precision they are computed: one story for CPU, CUDA and MPS.

    device = resolve_device("auto", local_rank=0)      # cuda:LOCAL_RANK where CUDA exists, else cpu
    precision = resolve_precision("auto", device)      # bf16 | fp16 | fp32
    with autocast(device, precision): ...
    batch = to_device(batch, device)                   # pinned host memory, non-blocking copies

Everything that holds tensors takes a `torch.device`; the CPU is one device among others.
"""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

import torch

from modalign.errors import UserError

def resolve_device(spec: str, local_rank: int | None = None) -> torch.device:
    """env.device (its form checked by modalign.recipes.settings.read_env) -> a torch.device that
    exists here, or a UserError saying what is missing.

    auto: cuda if a CUDA device is visible, else cpu. Under torchrun (local_rank given) `cuda` and
    `auto` mean the GPU of this rank's LOCAL_RANK; an explicit cuda:N is taken as it is."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UserError("config: 'env.device'='mps' but no MPS device is visible here; use env.device=cpu or auto")
        return torch.device("mps")
    if not torch.cuda.is_available():
        raise UserError(f"config: 'env.device'={spec!r} but no CUDA device is visible here "
                        "(torch.cuda.is_available() is False); use env.device=cpu or auto")
    n = torch.cuda.device_count()
    index = int(spec.split(":")[1]) if ":" in spec else (local_rank or 0)
    if index >= n:
        raise UserError(f"config: 'env.device'={spec!r} but only {n} CUDA device{'s' if n != 1 else ''} "
                        f"{'are' if n != 1 else 'is'} visible" + (f" (LOCAL_RANK={local_rank})" if local_rank else ""))
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """trainer.precision -> bf16 | fp16 | fp32 on `device`. auto: bf16 where the hardware has it
    (CUDA with bf16, a CPU with avx512_bf16/amx), fp16 on older CUDA GPUs, else fp32."""
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise UserError(f"config: 'trainer.precision' is {precision!r}; expected auto, fp32, bf16 or fp16")
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if device.type == "cpu" and cpu_has_bf16() else "fp32"
    if precision == "bf16" and device.type == "cpu" and not cpu_has_bf16():
        import logging

        logging.getLogger("modalign").warning(
            "trainer.precision=bf16 on a CPU without native bf16 (no avx512_bf16/amx_bf16 in /proc/cpuinfo): "
            "torch runs its bf16 matmuls through a reference kernel, tens of times slower than fp32 here")
    if precision == "fp16" and device.type != "cuda":
        raise UserError(f"config: 'trainer.precision'='fp16' needs a CUDA device (this run is on {device.type}; "
                        "fp16 matmuls on CPUs are ~1000x slower than bf16); use bf16 or fp32")
    return precision


# Attention under bf16 autocast on a CPU: "math" (matmuls and a softmax, torch's reference SDPA) or
# "flash" (torch's CPU flash-attention kernel, its default). The flash kernel's backward was 43% of a
# bf16 training step here against 9% of its FLOPs; the math path runs those FLOPs as bf16 GEMMs and
# made the step 1.3x faster (BENCHMARKS.md, "bf16 step"). fp32 steps were the same either way.
CPU_BF16_ATTENTION = "math"


def autocast(device: torch.device, precision: str):
    """The autocast context of `precision` on `device` (a no-op for fp32); under bf16 on a CPU it
    also picks the attention kernel (CPU_BF16_ATTENTION)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if device.type == "cpu" and precision == "bf16" and CPU_BF16_ATTENTION == "math":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        stack = contextlib.ExitStack()
        stack.enter_context(torch.autocast(device.type, dtype=dtype))
        stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
        return stack
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(device: torch.device, precision: str):
    """fp16 needs loss scaling (its range underflows small gradients); bf16 and fp32 do not. -> a
    torch.amp.GradScaler or None."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(device.type)


def to_device(batch: dict, device: torch.device) -> dict:
    """A batch dict of tensors on `device`. From the CPU to a GPU the copy goes through pinned
    memory and does not block the host, so the next batch is gathered while this one travels."""
    if device.type == "cpu":
        return batch
    cuda = device.type == "cuda"
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor) and v.device != device:
            v = (v.pin_memory() if cuda and v.device.type == "cpu" else v).to(device, non_blocking=cuda)
        out[k] = v
    return out


def set_tf32(enabled: bool) -> None:
    """TF32 matmuls on Ampere+ GPUs: ~8x the fp32 throughput with a 10-bit mantissa. Off by default,
    so fp32 means fp32; the setting is recorded in run.json."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def device_info(device: torch.device) -> dict:
    """What run.json records about the device: its kind and name; for a GPU also its memory, the
    CUDA runtime and driver versions, and whether TF32 is on."""
    info = {"device": str(device), "device_type": device.type}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device_name=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    gpu_capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                    driver=_nvidia_driver(), tf32=bool(torch.backends.cuda.matmul.allow_tf32))
    elif device.type == "mps":
        info["device_name"] = "Apple MPS"
    else:
        info["device_name"] = _cpu_model()
    return info


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or None


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None


def env_info(threads: int, device: torch.device, malloc: str | None, world=None) -> dict:
    """run.json's env: host, python, torch, threads, the device (device_info), the allocator, and the
    distributed world (size, and the backend that carried this device's tensors)."""
    from modalign.runs.provenance import host_info

    distributed = world is not None and world.size > 1
    return {**host_info(), "torch": torch.__version__, "threads": threads, **device_info(device), "malloc": malloc,
            "world_size": world.size if world is not None else 1,
            "backend": ("nccl" if device.type == "cuda" else "gloo") if distributed else None}
