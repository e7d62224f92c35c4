"""Hand-written CPU kernels, compiled at run time (see cpu.py); every caller keeps a PyTorch
fallback for when they cannot be built."""

from splitserve.kernels.cpu import (
    PackedBf16,
    PackedInt8,
    available,
    quantize_int8,
    simd,
    unavailable_reason,
)

__all__ = ["PackedBf16", "PackedInt8", "available", "quantize_int8", "simd", "unavailable_reason"]
