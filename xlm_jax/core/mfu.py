"""Model FLOPs utilisation during training: achieved model FLOP/s per device over its peak.

Model FLOPs are `model.encoder.xlm_flops_per_token` (useful work only: the output layer at the
predicted positions, no recomputation), so MFU compares runs across implementations. Peaks are
the accelerators' dense bfloat16 numbers (maxtext's convention), looked up by `device_kind`;
a CPU has none, so give `peak_flops_per_device` (e.g. `python -m xlm_jax.bench` measures one).
"""

from __future__ import annotations

import jax

# Dense bfloat16 FLOP/s per device (chip), from the vendors' specifications.
PEAK_BF16_FLOPS: dict[str, float] = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5p": 459e12,
    "TPU v5": 459e12,  # v5p reports "TPU v5"
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "H100": 989e12,  # SXM
    "H200": 989e12,
    "A100": 312e12,
    "L4": 121e12,
}


def peak_flops_per_device(
    configured: float = 0.0, device: jax.Device | None = None
) -> float | None:
    """``configured`` if > 0, else the table's peak for the device kind, else None (unknown)."""
    if configured > 0:
        return float(configured)
    kind = (device or jax.devices()[0]).device_kind
    if kind in PEAK_BF16_FLOPS:
        return PEAK_BF16_FLOPS[kind]
    # GPU kinds are long ("NVIDIA H100 80GB HBM3"): match the model name within them.
    for name, peak in PEAK_BF16_FLOPS.items():
        if not name.startswith("TPU") and name in kind.split():
            return peak
    return None


def throughput(
    tokens: float, flops: float, seconds: float, n_devices: int, peak: float | None
) -> dict[str, float]:
    """``tokens_per_s``, ``tflops_per_device`` and, when the peak is known, ``mfu`` (0..1) of a
    window of ``seconds`` that processed ``tokens`` (global) and ``flops`` model FLOPs."""
    out = {
        "tokens_per_s": tokens / seconds,
        "tflops_per_device": flops / seconds / n_devices / 1e12,
    }
    if peak:
        out["mfu"] = flops / seconds / n_devices / peak
    return out
