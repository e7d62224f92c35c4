"""Rate matching (DistServe §4): how many prefill and decode instances of given goodputs make
the most goodput per device within a device budget. Plain arithmetic, no simulation.

An instance of `devices` devices sustains `rate` req/s within the SLOs (its phase's: TTFT for
a prefill instance, TPOT for a decode one; both for a co-located one). n_p prefill and n_d
decode instances serve min(n_p x r_p, n_d x r_d) req/s on n_p x g_p + n_d x g_d devices. For
each n_p the best n_d is one of the two around n_p x r_p / r_d (fewer starves the decodes'
share, more only adds devices), so the search is one pass over n_p: linear in the budget.

    prefill 5.6 req/s, decode 10 req/s, one device each, budget 3:
        1 + 1: min(5.6, 10) / 2 = 2.8;  2 + 1: min(11.2, 10) / 3 = 3.33  <- best
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Instance:
    """One engine instance of a phase: its parallel layout and the goodput it sustains."""

    role: str  # prefill | decode | colocated
    rate: float  # req/s within the SLO
    tp: int = 1
    pp: int = 1

    def __post_init__(self):
        if self.role not in ("prefill", "decode", "colocated"):
            raise ValueError(f"role must be prefill, decode or colocated, got {self.role!r}")
        if not (self.rate >= 0 and math.isfinite(self.rate)):
            raise ValueError(f"an instance's rate must be a finite number >= 0, got {self.rate!r}")
        if self.tp < 1 or self.pp < 1:
            raise ValueError(f"tp and pp must be >= 1, got tp{self.tp} pp{self.pp}")

    @property
    def devices(self) -> int:
        return self.tp * self.pp

    def describe(self) -> str:
        par = "" if self.devices == 1 else f" tp{self.tp}" + (f" pp{self.pp}" if self.pp > 1 else "")
        return f"{self.role}{par}"


@dataclass(frozen=True)
class Placement:
    """n of each instance; `rate` the req/s they serve together within the SLOs."""

    parts: tuple[tuple[int, Instance], ...]

    @property
    def devices(self) -> int:
        return sum(n * i.devices for n, i in self.parts)

    @property
    def rate(self) -> float:
        by_role: dict[str, float] = {}
        for n, i in self.parts:
            by_role[i.role] = by_role.get(i.role, 0.0) + n * i.rate
        if "colocated" in by_role:
            return by_role["colocated"]
        return min(by_role.get("prefill", 0.0), by_role.get("decode", 0.0))

    @property
    def per_device(self) -> float:
        return self.rate / self.devices if self.devices else 0.0

    def count(self, role: str) -> int:
        return sum(n for n, i in self.parts if i.role == role)

    def describe(self) -> str:
        return " + ".join(f"{n} {i.describe()}" for n, i in self.parts)


def _better(a: Placement, b: Placement | None) -> bool:
    """More goodput per device; then more goodput; then fewer devices."""
    if b is None:
        return True
    return (a.per_device, a.rate, -a.devices) > (b.per_device, b.rate, -b.devices)


def match(prefill: Instance, decode: Instance, budget: int) -> Placement | None:
    """The best n_p prefill + n_d decode instances on at most `budget` devices (None: not one
    of each fits, or one of them serves nothing)."""
    if prefill.role != "prefill" or decode.role != "decode":
        raise ValueError("match() takes a prefill instance and a decode instance")
    if budget < 0:
        raise ValueError(f"the device budget must be >= 0, got {budget}")
    gp, gd = prefill.devices, decode.devices
    if prefill.rate <= 0 or decode.rate <= 0:
        return None
    best = None
    for n_p in range(1, (budget - gd) // gp + 1):
        most_d = (budget - n_p * gp) // gd
        want = n_p * prefill.rate / decode.rate
        for n_d in {max(1, min(most_d, math.floor(want))), max(1, min(most_d, math.ceil(want)))}:
            p = Placement(((n_p, prefill), (n_d, decode)))
            if _better(p, best):
                best = p
    return best


def replicate(instance: Instance, budget: int) -> Placement | None:
    """As many co-located instances as fit in `budget` devices (None: not one)."""
    n = budget // instance.devices
    return Placement(((n, instance),)) if n >= 1 and instance.rate > 0 else None


def best(prefills: list[Instance], decodes: list[Instance], colocated: list[Instance],
         budget: int) -> list[Placement]:
    """Every layout's best placement within `budget`, best first."""
    out = [p for pi in prefills for di in decodes if (p := match(pi, di, budget)) is not None]
    out += [p for c in colocated if (p := replicate(c, budget)) is not None]
    out.sort(key=lambda p: (-p.per_device, -p.rate, p.devices))
    return out
