"""The x86 instruction-set facts int8 kernels depend on, read from ``/proc/cpuinfo`` (stdlib only).

ONNX Runtime's U8S8 int8 kernels on x86 without VNNI multiply uint8 activations by
int8 weights with ``VPMADDUBSW``, which sums two adjacent products into a
saturating int16 (DESIGN.md, "Known facts").  With VNNI (``avx512_vnni`` or
``avx_vnni``) the products are summed into int32 and nothing saturates.  So a
quantized model records the ISA it was compressed (and judged) on, and the
server compares it with its own CPU at load.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

#: the cpu flags recorded; VNNI_FLAGS are the ones that make U8S8 sums 32-bit
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni")
CPUINFO = "/proc/cpuinfo"


def cpu_isa(path: str | Path = CPUINFO) -> dict[str, Any]:
    """This CPU's int8-relevant facts: ``{"model_name", "machine", "flags": {flag: bool}, "vnni": bool}``.

    Takes the cpuinfo file to read (``/proc/cpuinfo``; a test passes its own).
    Where the file cannot be read (not Linux) the flags are unknown: every flag
    and ``vnni`` are ``None`` and ``model_name`` is ``platform.processor()``.
    Never raises.
    """
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {"model_name": platform.processor() or "unknown", "machine": platform.machine(),
                "flags": {f: None for f in ISA_FLAGS}, "vnni": None}
    model, flags = "unknown", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model == "unknown":
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    present = {f: f in flags for f in ISA_FLAGS}
    return {"model_name": model, "machine": platform.machine(), "flags": present,
            "vnni": any(present[f] for f in VNNI_FLAGS)}


def describe_isa(isa: dict[str, Any] | None) -> str:
    """One line for logs: ``'AMD EPYC (avx2, avx512_vnni)'``; ``'unknown'`` for ``None``."""
    if not isa:
        return "unknown"
    given = isa.get("flags") or {}
    flags = [f for f in ISA_FLAGS if given.get(f)] + sorted(f for f, on in given.items() if on and f not in ISA_FLAGS)
    return f"{isa.get('model_name', 'unknown')} ({', '.join(flags) or 'no avx2/vnni flags'})"


def int8_isa_check(label: str, manifest: dict[str, Any], isa: dict[str, Any] | None = None) -> tuple[int, str] | None:
    """The load-time verdict on a variant's recorded int8 ISA assumption: ``(logging level, message)``.

    Takes the model's label (``"ctr-int8 v1"``), its ``manifest.json`` as a dict
    and this CPU's :func:`cpu_isa` (read when ``None``).  Returns ``None`` when
    the manifest records no static int8 (``extra.int8``); ``(logging.WARNING,
    ...)`` when the record says its int8 kernels may saturate without VNNI
    (overflow fraction > 0, or not modelled) and this CPU lacks VNNI (or its
    flags are unknown); else ``(logging.INFO, ...)``.  Never raises.
    """
    import logging

    extra = manifest.get("extra") if isinstance(manifest, dict) else None
    rec = extra.get("int8") if isinstance(extra, dict) else None
    if not isinstance(rec, dict):
        return None
    isa = cpu_isa() if isa is None else isa
    recorded = rec.get("isa") if isinstance(rec.get("isa"), dict) else None
    frac = rec.get("overflow_fraction")
    risky = bool(rec.get("may_saturate_without_vnni", frac is None or (isinstance(frac, (int, float)) and frac > 0)))
    diff = (rec.get("fused_vs_simulated") or {}).get("max_abs_diff")
    judged = (f"compressed on {describe_isa(recorded)}, fused-vs-simulated {diff:.2g}"
              if isinstance(diff, (int, float)) else f"compressed on {describe_isa(recorded)}")
    frac_text = "not modelled" if frac is None else f"{frac:.3g}" if isinstance(frac, (int, float)) else repr(frac)
    if risky and isa.get("vnni") is not True:
        return (logging.WARNING,
                f"{label}: int8 kernels may saturate on this CPU: its int16 overflow fraction is {frac_text} "
                f"({judged}) and this CPU, {describe_isa(isa)}, has no VNNI: "
                "its answers may differ from those judged at compression")
    return (logging.INFO, f"{label}: int8 ISA check ok: int16 overflow fraction {frac_text} ({judged}); "
                          f"this CPU: {describe_isa(isa)}")


__all__ = ["ISA_FLAGS", "VNNI_FLAGS", "cpu_isa", "describe_isa", "int8_isa_check"]
