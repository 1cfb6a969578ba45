"""`auto` precision: bf16 where the device computes it natively, fp32 where bf16 would be emulated.

A GPU and a CPU with AMX or AVX512-BF16 multiply bf16 natively, and there bf16 autocast and a bf16 teacher are the
fast choice. A CPU with AVX2 alone emulates bf16: a (2048 x 576) by (576 x 1536) matmul took 325 ms in bf16 and 54 ms
in fp32 on a 2-core AMD EPYC, and the CPU demo's stages ran 6-8x slower in bf16. `trainer.precision=auto` and
`teacher.dtype=auto` (the defaults) resolve here, once, with the reason logged; an explicit setting always wins.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def cpu_native_bf16() -> tuple[bool, str]:
    """Whether this CPU multiplies bf16 in hardware, and what torch reports about it."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    if amx or avx512_bf16:
        return True, "this CPU has " + " and ".join(n for n, ok in (("AMX", amx), ("AVX512-BF16", avx512_bf16)) if ok)
    avx2 = getattr(torch.cpu, "_is_avx2_supported", lambda: False)()
    widest = "AVX512" if getattr(torch.cpu, "_is_avx512_supported", lambda: False)() else "AVX2" if avx2 else "no AVX2"
    return False, f"this CPU has no native bf16 ({widest}, no AMX or AVX512-BF16): bf16 would be emulated, several times slower"


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """Whether `device` computes bf16 natively, and why we think so."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return True, "the GPU computes bf16 natively"
        return False, "this GPU has no native bf16"
    if device.type == "cpu":
        return cpu_native_bf16()
    return False, f"no bf16 fast path is known on {device.type}"


@dataclass(frozen=True)
class Resolved:
    precision: str  # bf16 or fp32 (autocast)
    teacher_dtype: str  # bfloat16, float32 or float16 (the frozen teacher's weights)
    why: str  # one line for the log; empty when nothing was auto


def resolve(precision: str, teacher_dtype: str, device: torch.device) -> Resolved:
    """Resolve `auto` in trainer.precision and teacher.dtype for `device`; explicit values pass through."""
    if "auto" not in (precision, teacher_dtype):
        return Resolved(precision, teacher_dtype, "")
    native, reason = native_bf16(device)
    if precision == "auto":
        precision = "bf16" if native else "fp32"
    if teacher_dtype == "auto":
        teacher_dtype = "bfloat16" if native else "float32"
    return Resolved(precision, teacher_dtype, reason)


def auto_teacher_dtype(device: torch.device | None = None) -> str:
    """teacher.dtype=auto where no trainer resolved it (eval, generate, inspect): for `device`, or for the GPU if
    there is one, else this CPU."""
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return "bfloat16" if native_bf16(device)[0] else "float32"
