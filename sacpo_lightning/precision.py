"""``precision: auto``: bf16 mixed precision where the hardware computes in bf16 natively, float32 elsewhere.

bf16 autocast halves memory traffic and, on GPUs with bf16 units and CPUs with AVX512_BF16 or AMX, speeds up matrix
products. CPUs without those instructions emulate bf16 by converting to float32 and back, which makes bf16 autocast
slower than plain float32: there ``auto`` picks ``32-true``. GPUs without bf16 (before Ampere) also get ``32-true``:
float16 mixed precision needs loss scaling, whose overflow skips are a behaviour change the user should choose
explicitly (``--trainer.precision 16-mixed``).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal

import torch

AUTO = "auto"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The load and export dtypes by name (``--model.policy.dtype`` and friends)."""
DtypeName = Literal["float32", "bfloat16", "float16"]
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_bf16_flags() -> tuple[str, ...]:
    """The native-bf16 instruction sets this CPU reports (``avx512_bf16``, ``amx_bf16``); empty when none or unknown.

    Read from ``/proc/cpuinfo`` (Linux); on other systems torch's own CPU capability check is used where available.
    """
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith(("flags", "Features")):
                flags = set(line.split(":", 1)[1].split())
                return tuple(f for f in CPU_BF16_FLAGS if f in flags)
        return ()
    probe = getattr(getattr(torch._C, "_cpu", None), "_is_avx512_bf16_supported", None)
    return ("avx512_bf16",) if probe is not None and probe() else ()


def _uses_cuda(accelerator: str | None) -> bool:
    if accelerator in ("gpu", "cuda"):
        return True
    return accelerator in (None, "auto") and torch.cuda.is_available()


def resolve_precision(precision: str | int | None, accelerator: str | None = "auto") -> tuple[str | int | None, str]:
    """Turns ``auto`` into a Lightning precision for the accelerator the run will use; other values pass through.

    Args:
        precision: The ``--trainer.precision`` value.
        accelerator: The ``--trainer.accelerator`` value (``auto``, ``cpu``, ``gpu``, ``cuda``, ...).

    Returns:
        ``(precision, reason)``: the precision to give Lightning and a sentence saying why it was chosen.
    """
    if precision != AUTO:
        return precision, f"precision {precision} as configured"
    if _uses_cuda(accelerator):
        if torch.cuda.is_bf16_supported():
            return "bf16-mixed", f"precision auto -> bf16-mixed ({torch.cuda.get_device_name()} supports bf16)"
        return "32-true", f"precision auto -> 32-true ({torch.cuda.get_device_name()} has no bf16)"
    if accelerator not in (None, "auto", "cpu"):
        return "32-true", f"precision auto -> 32-true (accelerator {accelerator!r})"
    flags = cpu_bf16_flags()
    if flags:
        return "bf16-mixed", f"precision auto -> bf16-mixed (CPU with native bf16: {', '.join(flags)})"
    return "32-true", "precision auto -> 32-true (CPU without AVX512_BF16/AMX, where bf16 is emulated and slower)"


def native_bf16() -> bool:
    """Whether this machine computes in bf16 natively: a CUDA GPU with bf16, or a CPU with AVX512_BF16/AMX."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return bool(cpu_bf16_flags())


def resolve_dtype(dtype: str) -> str:
    """``auto`` -> ``bfloat16`` where bf16 is native (:func:`native_bf16`), else ``float32``; others pass through."""
    if dtype != AUTO:
        return dtype
    return "bfloat16" if native_bf16() else "float32"
