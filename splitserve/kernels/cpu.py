"""Build, load and call the hand-written CPU skinny-GEMM kernels in gemv.c.

The C source is compiled on first use with the system gcc for this very CPU (-march=native),
into a cache keyed by source, flags, compiler and CPU flags, and loaded with ctypes: no torch
C++ headers, no ninja, a compile of about a second. If anything goes wrong (no gcc, a compile
error, a read-only cache, SPLITSERVE_KERNELS=0) `available()` is False, `unavailable_reason()`
says why, and callers keep their PyTorch path: a missing compiler never crashes the engine.

Weights are repacked once into blocks of 16 output rows (see gemv.c for why and how), in
transparent huge pages (hugepages.py):

    bf16  [N, K] -> [ceil(N/16), ceil(K/2), 16, 2]
    int8  [N, K] -> [ceil(N/16), ceil(K/4), 16, 4]
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from splitserve.kernels import hugepages

SOURCE = Path(__file__).with_name("gemv.c")
# -fopenmp links libgomp.so.1, which resolves to the copy torch has already loaded: the kernels
# share torch's OpenMP threads instead of adding a second pool that fights them for the cores.
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11")
BLOCK = 16  # output rows per packed block; must match BLK in gemv.c


class LazyLibrary:
    """A shared library built and loaded on first use, once per process, never raising: `get()`
    is the library or None, `error` says why not (no gcc, a compile error, a read-only cache,
    SPLITSERVE_KERNELS=0). Callers keep their PyTorch path for None."""

    def __init__(self, load: Callable[[], ctypes.CDLL]):
        self._load = load
        self._lock = threading.Lock()
        self._lib: ctypes.CDLL | None = None
        self.error: str | None = None
        self._tried = False

    def get(self) -> ctypes.CDLL | None:
        if self._tried:
            return self._lib
        with self._lock:
            if not self._tried:
                try:
                    if os.environ.get("SPLITSERVE_KERNELS", "1") == "0":
                        raise RuntimeError("disabled by SPLITSERVE_KERNELS=0")
                    self._lib = self._load()
                except Exception as e:  # noqa: BLE001 - any failure means "use the PyTorch path"
                    self.error = f"{type(e).__name__}: {e}"
                self._tried = True
        return self._lib


def cache_dir() -> Path:
    root = os.environ.get("SPLITSERVE_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "splitserve"
    return base / "kernels"


def cpu_flags() -> str:
    """The CPU's feature flags (/proc/cpuinfo), space separated."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _compiler_version(cc: str) -> str:
    out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
    return out.stdout.splitlines()[0] if out.stdout else ""


def build_shared(source: Path, cflags: tuple[str, ...]) -> Path:
    """Compile `source` into a cached shared library (or find it there); raises on failure."""
    cc = os.environ.get("CC", "gcc")
    if shutil.which(cc) is None:
        raise RuntimeError(f"C compiler {cc!r} not found on PATH (set CC or install gcc)")
    src = source.read_bytes()
    key = hashlib.sha256(
        b"\0".join([src, " ".join(cflags).encode(), _compiler_version(cc).encode(),
                    cpu_flags().encode()])
    ).hexdigest()[:16]
    out = cache_dir() / f"{source.stem}-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Compile to a private name and rename: concurrent processes never load a half-written .so.
    fd, tmp = tempfile.mkstemp(prefix=f".{source.stem}-", suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        res = subprocess.run([cc, *cflags, str(source), "-o", tmp, "-lm"],
                             capture_output=True, text=True, timeout=300)
        if res.returncode != 0:
            raise RuntimeError(f"{cc} failed on {source.name}:\n{res.stderr.strip()[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def load_library(cflags: tuple[str, ...] = CFLAGS) -> ctypes.CDLL:
    """Compile (or find in the cache) and load gemv.c; raises on any failure. `_load` is the
    cached, never-raising entry point; other cflags are for tests of the scalar path."""
    lib = ctypes.CDLL(str(build_shared(SOURCE, cflags)))
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.ss_simd_flags.argtypes, lib.ss_simd_flags.restype = [], i32
    lib.ss_linear_bf16.argtypes = [p, p, p, p, i64, i64, i64, i32]
    lib.ss_linear_bf16.restype = None
    lib.ss_linear_int8.argtypes = [p, i32, p, p, p, p, p, i64, i64, i64, i32]
    lib.ss_linear_int8.restype = i32
    return lib


_GEMV = LazyLibrary(load_library)
_load = _GEMV.get


def available() -> bool:
    """True when the kernels are compiled and loaded (compiles on the first call)."""
    return _load() is not None


def unavailable_reason() -> str | None:
    _load()
    return _GEMV.error


def simd(lib: ctypes.CDLL | None = None) -> dict[str, bool]:
    """Which kernels run the AVX-512 path (False: the portable scalar fallback)."""
    lib = lib or _load()
    f = lib.ss_simd_flags() if lib is not None else 0
    return {"bf16": bool(f & 1), "int8": bool(f & 2)}


def _require() -> ctypes.CDLL:
    lib = _load()
    if lib is None:
        raise RuntimeError(f"CPU kernels unavailable ({_GEMV.error}); check kernels.available() first")
    return lib


def _blocked(w: torch.Tensor, group: int) -> torch.Tensor:
    """[N, K] -> [ceil(N/16), ceil(K/group), 16, group], zero padded, in huge pages."""
    n, k = w.shape
    nb, kg = -(-n // BLOCK), -(-k // group)
    w = F.pad(w, (0, kg * group - k, 0, nb * BLOCK - n))
    out = hugepages.empty((nb, kg, BLOCK, group), w.dtype)
    return out.copy_(w.view(nb, BLOCK, kg, group).permute(0, 2, 1, 3))


def _unblocked(p: torch.Tensor, n: int, k: int) -> torch.Tensor:
    nb, kg, _, group = p.shape
    return p.permute(0, 2, 1, 3).reshape(nb * BLOCK, kg * group)[:n, :k].contiguous()


def _set(obj, **attrs) -> None:
    for k, v in attrs.items():
        object.__setattr__(obj, k, v)


def _bad_x(x: torch.Tensor, k: int, dtypes: tuple[torch.dtype, ...], who: str) -> None:
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"{who}: x must be [M, {k}], got {tuple(x.shape)}")
    if x.dtype not in dtypes:
        raise TypeError(f"{who}: x dtype must be one of {dtypes}, got {x.dtype}")
    raise ValueError(f"{who}: x must be a contiguous CPU tensor (call .contiguous()), got "
                     f"device {x.device}, strides {x.stride()}")


@dataclass(frozen=True, eq=False)
class PackedBf16:
    """A bf16 weight [N, K] (+ optional bias) in the kernel's layout. Call it on x [M, K] bf16."""

    weight: torch.Tensor  # [ceil(N/16), ceil(K/2), 16, 2] bf16
    bias: torch.Tensor | None  # [N] fp32
    n: int
    k: int
    lib: ctypes.CDLL | None = field(default=None, repr=False)  # None: the default build

    def __post_init__(self):
        # Raw pointers cached once: the dataclass is frozen and holds the tensors alive.
        _set(self, _fn=(self.lib or _require()).ss_linear_bf16, _w=self.weight.data_ptr(),
             _b=None if self.bias is None else self.bias.data_ptr())

    @classmethod
    def pack(cls, weight: torch.Tensor, bias: torch.Tensor | None = None,
             lib: ctypes.CDLL | None = None) -> PackedBf16:
        if weight.dim() != 2 or weight.dtype != torch.bfloat16 or not weight.is_cpu:
            raise TypeError(f"PackedBf16 needs a 2-D bf16 CPU weight, got {weight.dtype} "
                            f"{tuple(weight.shape)} on {weight.device}")
        b = None if bias is None else bias.detach().float().contiguous()
        return cls(_blocked(weight.detach(), 2), b, *weight.shape, lib=lib)

    def unpack(self) -> torch.Tensor:
        return _unblocked(self.weight, self.n, self.k)

    def __call__(self, x: torch.Tensor, threads: int | None = None) -> torch.Tensor:
        # The hot path of every decode step (~120 calls per token): checks kept to the cheap
        # ones, a clear error from _bad_x when any fails.
        if x.dtype is not torch.bfloat16 or x.dim() != 2 or x.shape[1] != self.k \
                or not x.is_contiguous() or not x.is_cpu:
            _bad_x(x, self.k, (torch.bfloat16,), "PackedBf16")
        m = x.shape[0]
        y = torch.empty((m, self.n), dtype=torch.bfloat16)
        self._fn(x.data_ptr(), self._w, self._b, y.data_ptr(), m, self.n, self.k,
                 threads or torch.get_num_threads())
        return y


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-row int8: w ~= q * scale[:, None], q in [-127, 127]."""
    w32 = weight.detach().float()
    scale = w32.abs().amax(dim=1).clamp(min=1e-8) / 127.0
    q = torch.clamp(torch.round(w32 / scale[:, None]), -127, 127).to(torch.int8)
    return q.contiguous(), scale


@dataclass(frozen=True, eq=False)
class PackedInt8:
    """An int8 weight [N, K] with one fp32 scale per row (+ optional bias), in the kernel's
    layout. Call it on x [M, K] bf16 or fp32; y has x's dtype."""

    weight: torch.Tensor  # [ceil(N/16), ceil(K/4), 16, 4] int8
    scale: torch.Tensor  # [N] fp32
    wsum: torch.Tensor  # [N] int32, row sums of the int8 weight
    bias: torch.Tensor | None  # [N] fp32
    n: int
    k: int
    lib: ctypes.CDLL | None = field(default=None, repr=False)

    def __post_init__(self):
        _set(self, _fn=(self.lib or _require()).ss_linear_int8, _w=self.weight.data_ptr(),
             _s=self.scale.data_ptr(), _ws=self.wsum.data_ptr(),
             _b=None if self.bias is None else self.bias.data_ptr())

    @classmethod
    def pack(cls, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
             lib: ctypes.CDLL | None = None) -> PackedInt8:
        if q.dim() != 2 or q.dtype != torch.int8 or scale.shape != (q.shape[0],) or not q.is_cpu:
            raise TypeError(
                f"PackedInt8 needs an int8 [N, K] CPU weight and [N] scales, got {q.dtype} "
                f"{tuple(q.shape)} on {q.device} and {tuple(scale.shape)}"
            )
        b = None if bias is None else bias.detach().float().contiguous()
        wsum = q.sum(dim=1, dtype=torch.int32).contiguous()
        return cls(_blocked(q, 4), scale.detach().float().contiguous(), wsum, b, *q.shape, lib=lib)

    def unpack(self) -> torch.Tensor:
        """The int8 weight [N, K], row-major."""
        return _unblocked(self.weight, self.n, self.k)

    def __call__(self, x: torch.Tensor, threads: int | None = None) -> torch.Tensor:
        dt = x.dtype
        if (dt is not torch.bfloat16 and dt is not torch.float32) or x.dim() != 2 \
                or x.shape[1] != self.k or not x.is_contiguous() or not x.is_cpu:
            _bad_x(x, self.k, (torch.bfloat16, torch.float32), "PackedInt8")
        m = x.shape[0]
        y = torch.empty((m, self.n), dtype=dt)
        rc = self._fn(x.data_ptr(), dt is torch.float32, self._w, self._s, self._ws, self._b,
                      y.data_ptr(), m, self.n, self.k, threads or torch.get_num_threads())
        if rc != 0:
            raise MemoryError(f"PackedInt8: no memory for the split copy of x {tuple(x.shape)}")
        return y
