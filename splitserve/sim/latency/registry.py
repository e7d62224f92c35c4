"""The simulator's `--latency-model` flag: one string names a latency model and what it is
built from. Fields are separated by ':'; names are case-insensitive.

    distserve:<model>[:tp<N>][:pp<N>][:overheads]  DistServe's A100-80GB fit (OPT-13B tp1/2/4,
                                                   OPT-66B tp2/4/8); `overheads` adds what
                                                   their simulator adds on top of the fit
    roofline:<gpu>:<model>[:tp<N>][:pp<N>]         operator roofline (GPUs in sim/hardware.py,
                                                   models in sim/models.py)
    fitted:<path-to-profile.json>                  a profile fitted on real hardware (the rest
                                                   of the string is the path, ':' included)
    constant:<seconds>                             every step takes that long

tp and pp default to 1. Keyword options go to the backend's constructor: `dtype_bytes=`,
`gpus_per_node=`, `reserve_fraction=` for roofline, `sim_overheads=` for distserve.

What the simulator needs beyond step times (to size a worker's KV pool, to price a KV
hand-over) is on the distserve, roofline and constant models as attributes `model`
(ModelShape or None), `gpu` (GPUSpec or None), `tp`, `pp`; `kv_capacity_tokens(model, gpu, tp,
pp)` in roofline.py turns them into a pool size. A fitted model knows no shape unless fitted.py
gives it these attributes: read them with getattr(m, "model", None).
"""

from __future__ import annotations

import math
import re

from splitserve.sim.latency.base import Batch, LatencyModel

SPEC_SYNTAX = (
    "distserve:<model>[:tp<N>][:pp<N>][:overheads], roofline:<gpu>:<model>[:tp<N>][:pp<N>], "
    "fitted:<path-to-profile.json>, constant:<seconds>"
)


class ConstantLatency(LatencyModel):
    """Every step takes `seconds`, whatever the batch: a deterministic server for checking the
    simulator against queueing theory."""

    name = "constant"
    model = None
    gpu = None
    tp = 1
    pp = 1

    def __init__(self, seconds: float):
        if not (math.isfinite(seconds) and seconds > 0):
            raise ValueError(
                f"constant step time must be a positive number of seconds, got {seconds}"
            )
        self.seconds = seconds

    def step_time(self, batch: Batch) -> float:
        return self.seconds

    def describe(self) -> str:
        return f"constant: {self.seconds:g} s per step"


def build_latency_model(spec: str, **opts) -> LatencyModel:
    """A latency model from a `--latency-model` string (syntax in the module docstring)."""
    kind, _, rest = spec.strip().partition(":")
    kind = kind.lower()
    if kind == "fitted":
        if not rest:
            raise _bad(spec, "fitted needs a path: fitted:<path-to-profile.json>")
        _no_opts(kind, opts)
        from splitserve.sim.latency.fitted import load_fitted

        return load_fitted(rest)
    fields = rest.split(":") if rest else []
    if kind == "constant":
        _no_opts(kind, opts)
        if len(fields) != 1:
            raise _bad(spec, "constant takes one field: constant:<seconds>")
        try:
            seconds = float(fields[0])
        except ValueError:
            raise _bad(spec, f"{fields[0]!r} is not a number of seconds") from None
        return ConstantLatency(seconds)
    if kind == "distserve":
        from splitserve.sim.latency.distserve import DistServeLatency

        if not fields:
            raise _bad(spec, "distserve needs a model: distserve:<model>[:tp<N>][:pp<N>]")
        model, tail = fields[0], fields[1:]
        if "overheads" in (f.lower() for f in tail):
            tail = [f for f in tail if f.lower() != "overheads"]
            opts = {**opts, "sim_overheads": True}
        tp, pp = _parallelism(spec, tail)
        return _built(spec, DistServeLatency, model, tp, pp, **opts)
    if kind == "roofline":
        from splitserve.sim.latency.roofline import RooflineLatency

        if len(fields) < 2:
            raise _bad(spec, "roofline needs a GPU and a model: roofline:<gpu>:<model>[:tp<N>]")
        tp, pp = _parallelism(spec, fields[2:])
        return _built(spec, RooflineLatency, fields[0], fields[1], tp, pp, **opts)
    raise _bad(spec, f"unknown kind {kind!r}")


def _built(spec: str, cls, *args, **opts) -> LatencyModel:
    """cls(*args) with its ValueError (unknown GPU or model, no fit, bad layout) naming the
    spec it came from."""
    try:
        return cls(*args, **opts)
    except ValueError as e:
        raise ValueError(f"bad latency model {spec!r}: {e}") from e


def _parallelism(spec: str, fields: list[str]) -> tuple[int, int]:
    degrees = {"tp": 1, "pp": 1}
    seen = set()
    for f in fields:
        m = re.fullmatch(r"(tp|pp)([1-9][0-9]*)", f.strip().lower())
        if m is None:
            raise _bad(spec, f"field {f!r} is not tp<N> or pp<N> (N a positive integer)")
        if m[1] in seen:
            raise _bad(spec, f"{m[1]} given twice")
        seen.add(m[1])
        degrees[m[1]] = int(m[2])
    return degrees["tp"], degrees["pp"]


def _no_opts(kind: str, opts: dict) -> None:
    if opts:
        raise ValueError(f"latency model {kind!r} takes no options, got {', '.join(opts)}")


def _bad(spec: str, why: str) -> ValueError:
    return ValueError(f"bad latency model {spec!r}: {why}; accepted: {SPEC_SYNTAX}")
