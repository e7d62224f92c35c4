"""`splitserve plan`: choose a deployment by simulated goodput per device.

Every candidate is measured the way `splitserve sim` measures one: the server's own scheduling
code on a virtual clock, the workload's requests at Poisson (or gamma) arrivals, and the
highest rate whose SLO attainment still reaches the target, by bisection. Two methods:

    joint   every deployment of the budget simulated whole: co-located N, and P prefill + D
            decode workers for every split (pure P/D, and with conditional local prefill).
            Faithful (queues, hand-overs and local prefills interact as they will), so the
            default for small budgets (this machine: one worker per core).
    match   DistServe's placement (OSDI'24 §4): each phase's instance goodput simulated on
            its own for every parallel layout (a prefill instance against TTFT, its decode
            side made ~free; a decode instance against TPOT, its prefill side ~free), then the
            instance counts by rate matching (ratematch.py) within the budget; the best
            placements are then verified in one joint simulation at their planned rate.
            Cost is per layout, not per device: a 1,000-device budget costs what 8 do.

    segment DistServe's own search (simdistserve): one prefill and one decode instance for
            every pair of layouts that fits in a node, simulated together, ranked by goodput
            per device of the pair.

Attainment: `joint` counts the requests that meet both SLOs (bench serve's definition); `each`
(DistServe's own search) requires the target percentile of TTFT and of TPOT each under its SLO.
The bisection is DistServe's: per-device rate in [0, max], halved until the interval is under
`tol`; the result is the last rate that passed (so their README's 1.5625 = 5 x 5/16).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

from splitserve.bench import workloads as W
from splitserve.bench.deployments import DeploymentSpec
from splitserve.bench.goodput import RequestRecord, met_slo
from splitserve.plan.ratematch import Instance, Placement, best
from splitserve.sim.latency.base import Batch, LatencyModel
from splitserve.sim.latency.registry import build_latency_model

GPU_KINDS = ("distserve", "roofline")
FREE = 1e-3  # the other phase's step times, scaled: it never holds the measured one back


@dataclass(frozen=True)
class Criteria:
    ttft_s: float
    tpot_s: float
    target: float = 0.9  # share of requests (joint) or the percentile / 100 (each)
    mode: str = "joint"  # joint | each

    def __post_init__(self):
        if self.mode not in ("joint", "each"):
            raise ValueError(f"attainment must be joint or each, got {self.mode!r}")
        if not 0 < self.target <= 1:
            raise ValueError(f"the attainment target must be in (0, 1], got {self.target}")
        for name, v in (("TTFT", self.ttft_s), ("TPOT", self.tpot_s)):
            if not (v > 0 and math.isfinite(v)):
                raise ValueError(f"the {name} SLO must be a positive number of seconds, got {v}")

    def passes(self, records: list[RequestRecord], phase: str = "both") -> bool:
        """phase: "prefill" judges TTFT only, "decode" TPOT only, "both" both."""
        if not records:
            return False
        if self.mode == "joint":  # bench serve's rule (RequestRecord.meets), one phase or both
            met = met_slo(records, math.inf if phase == "decode" else self.ttft_s,
                          math.inf if phase == "prefill" else self.tpot_s)
            return met >= self.target * len(records) - 1e-9
        # a failed request counts as infinitely late; a one-token one has no TPOT (0)
        ttft = [r.ttft if r.ok and r.ttft is not None else math.inf for r in records]
        tpot = [r.tpot if r.ok and r.tpot is not None else (0.0 if r.ok else math.inf)
                for r in records]
        ok = True
        if phase in ("prefill", "both"):
            ok = ok and _quantile(ttft, self.target) < self.ttft_s
        if phase in ("decode", "both"):
            ok = ok and _quantile(tpot, self.target) < self.tpot_s
        return ok


def _quantile(values: list[float], q: float) -> float:
    """Linear-interpolated quantile (pandas' default, as DistServe's search reads it)."""
    xs = sorted(values)
    if not xs:
        return math.inf
    pos = (len(xs) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    if xs[hi] == math.inf:
        return math.inf
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def bisect_rate(passes, hi: float, tol: float) -> tuple[float, list[tuple[float, bool]]]:
    """DistServe's bisection: the last rate in (0, hi) that passed while halving [0, hi] down
    to `tol` (0.0: none did). `passes(rate) -> bool`; returns the rate and every probe."""
    if hi <= 0 or tol <= 0:
        raise ValueError(f"need hi > 0 and tol > 0, got hi={hi}, tol={tol}")
    lo, found, probes = 0.0, 0.0, []
    while hi - lo > tol:
        mid = (lo + hi) / 2
        ok = passes(mid)
        probes.append((mid, ok))
        if ok:
            lo = found = mid
        else:
            hi = mid
    return found, probes


class Scaled(LatencyModel):
    """Another model's step times times `factor`, its shape kept (the pool it sizes): the
    phase a per-phase measurement is not about."""

    def __init__(self, inner: LatencyModel, factor: float):
        self.inner, self.factor = inner, factor
        self.name = f"{inner.name} x{factor:g}"
        self.model = getattr(inner, "model", None)
        self.gpu = getattr(inner, "gpu", None)
        self.tp, self.pp = getattr(inner, "tp", 1), getattr(inner, "pp", 1)
        if hasattr(inner, "kv_capacity_tokens"):
            self.kv_capacity_tokens = inner.kv_capacity_tokens

    def step_time(self, batch: Batch) -> float:
        return self.inner.step_time(batch) * self.factor

    def describe(self) -> str:
        return f"{self.inner.describe()} x{self.factor:g}"


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1

    @property
    def devices(self) -> int:
        return self.tp * self.pp

    def __str__(self) -> str:
        return f"tp{self.tp}" + (f" pp{self.pp}" if self.pp > 1 else "")


def layouts(spec: str, devices_per_node: int, pps: tuple[int, ...] = (1,)) -> list[Layout]:
    """The parallel layouts a latency-model family can price: a GPU family's tensor-parallel
    degrees up to a node (DistServe's fits: the ones it measured) times `pps`; anything else
    (a CPU profile, a constant) one device per worker."""
    kind, _, rest = spec.partition(":")
    kind = kind.lower()
    if kind not in GPU_KINDS:
        return [Layout()]
    if any(f.lower().startswith(("tp", "pp")) for f in rest.split(":")):
        raise ValueError(f"give the latency model without tp/pp ({spec!r}): plan tries each layout")
    if kind == "distserve":
        from splitserve.sim.latency.distserve import FITS
        from splitserve.sim.models import get_model

        name = get_model(rest.split(":")[0]).name
        tps = sorted(tp for m, tp in FITS if m == name)
    else:
        tps = [1 << k for k in range(8) if 1 << k <= devices_per_node]
    return [Layout(tp, pp) for tp in tps for pp in pps if tp * pp <= devices_per_node]


def latency_for(spec: str, layout: Layout) -> LatencyModel:
    if spec.partition(":")[0].lower() not in GPU_KINDS:
        return build_latency_model(spec)
    extra = [f"tp{layout.tp}"] + ([f"pp{layout.pp}"] if layout.pp > 1 else [])
    return build_latency_model(":".join([spec, *extra]))  # the degrees may come in any order


def _first(spec: str) -> LatencyModel:
    """The family's first layout (for what every layout shares: the model's shape)."""
    outs = layouts(spec, 1 << 20)
    if not outs:
        raise ValueError(f"{spec!r} prices no parallel layout (no fit for this model?)")
    return latency_for(spec, outs[0])


@dataclass
class Candidate:
    """One deployment the plan ranks."""

    name: str  # how the table shows it
    placement: Placement | None  # match: the instance counts; joint: None
    devices: int
    goodput: float  # req/s within the SLOs, the whole deployment
    serve: str  # the command that deploys it here
    verified: float | None = None  # joint attainment at the planned rate (match)
    probes: list | None = None

    @property
    def per_device(self) -> float:
        return self.goodput / self.devices if self.devices else 0.0


class Planner:
    """Runs the simulations for one workload, SLO and latency-model family."""

    def __init__(self, spec: str, workload: str | list[W.RequestSpec], criteria: Criteria,
                 num_requests: int = 200, seed: int = 0, cv: float = 1.0,
                 max_rate_per_device: float = 8.0, tol: float = 0.05, settings=None,
                 quiet: bool = True, latency: LatencyModel | None = None):
        """`workload`: a bench workload's name (num_requests of it), or the requests
        themselves; `latency`: the model of a one-device family (`spec` is then its name)."""
        from splitserve.sim.run import SimSettings

        self.spec, self.criteria = spec, criteria
        self.latency = latency
        if isinstance(workload, str):
            if num_requests < 1:
                raise ValueError(f"--num-requests must be >= 1, got {num_requests}")
            # requests fit the model's context (OPT's 2048, say), as a server would take them
            model = getattr(latency or _first(spec), "model", None)
            caps = W.Caps(max_model_len=model.max_context) if model is not None else W.Caps()
            self.specs = W.synthetic(workload, num_requests, seed, caps=caps)
        else:
            self.specs = list(workload)
        if not 0 < tol < max_rate_per_device:
            raise ValueError(f"need 0 < --tol < --max-rate-per-device, got {tol} and "
                             f"{max_rate_per_device}")
        self.seed, self.cv = seed, cv
        self.max_rate, self.tol = max_rate_per_device, tol
        self.settings = settings or SimSettings()
        self.quiet = quiet
        self.runs = 0
        self.sim_s = 0.0
        self.capped: list[str] = []  # deployments whose every probe passed (raise the bound)
        self.skipped: list[str] = []  # layouts that could not be built, and why

    def _log(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=sys.stderr)

    def _records(self, dep: DeploymentSpec, latency: LatencyModel, rate: float,
                 role_latency: dict | None = None, local_prefill=None) -> list[RequestRecord]:
        from splitserve.sim.run import Simulator

        # (least-loaded: the synthetic workloads' prompts share no prefix, where cache-aware
        # routes alike and only pays for hashing every prompt)
        sim = Simulator(dep, latency, self.settings, quiet=True, role_latency=role_latency,
                        routing="least-loaded",
                        local_prefill=local_prefill)
        t0 = time.perf_counter()
        res = sim(W.at_rate(self.specs, rate, self.cv, self.seed))
        self.sim_s += time.perf_counter() - t0
        self.runs += 1
        return res.records

    def goodput(self, dep: DeploymentSpec, latency: LatencyModel, devices: int,
                phase: str = "both", role_latency: dict | None = None,
                local_prefill=None, criteria: Criteria | None = None) -> tuple[float, list]:
        """The deployment's goodput (req/s, all of it) by DistServe's per-device bisection;
        `local_prefill`: a policies.SloLocalPrefill for its decode workers. A rate that
        passed at every probe is reported (self.capped) : the bound was too low to find it."""
        crit = criteria or self.criteria

        def passes(per_device: float) -> bool:
            recs = self._records(dep, latency, per_device * devices, role_latency, local_prefill)
            return crit.passes(recs, phase)

        per, probes = bisect_rate(passes, self.max_rate, self.tol)
        if probes and all(ok for _, ok in probes):
            self.capped.append(dep.name)
        return per * devices, [(r * devices, ok) for r, ok in probes]

    # -- per-phase instances (method match) --------------------------------------------------
    def _latency(self, layout: Layout) -> LatencyModel:
        return self.latency if self.latency is not None else latency_for(self.spec, layout)

    def instance(self, role: str, layout: Layout) -> Instance:
        """One instance's goodput on its own phase. Under joint attainment each phase is held
        to the target's share of misses halved (0.9 -> 0.95): run together at their limits,
        the two phases' misses add up."""
        lat = self._latency(layout)
        crit = self.criteria
        if crit.mode == "joint" and role != "colocated":
            crit = Criteria(crit.ttft_s, crit.tpot_s, 1 - (1 - crit.target) / 2, "joint")
        if role == "colocated":
            dep = DeploymentSpec(f"colocated {layout}", colocated=1)
            rate, _ = self.goodput(dep, lat, layout.devices)
        else:
            dep = DeploymentSpec(f"{role} {layout}", prefill=1, decode=1, local_prefill=False)
            other = "decode" if role == "prefill" else "prefill"
            rate, _ = self.goodput(dep, lat, layout.devices, phase=role,
                                   role_latency={other: Scaled(lat, FREE)}, criteria=crit)
        self._log(f"  {role} {layout}: {rate:.3f} req/s ({rate / layout.devices:.3f} per device)")
        return Instance(role, rate, layout.tp, layout.pp)

    def _instances(self, role: str, outs: list[Layout]) -> list[Instance]:
        """Every layout's instance; a layout that cannot be built (the model does not fit, the
        heads do not divide) is skipped and named in self.skipped."""
        from splitserve.sim.run import SimError

        got = []
        for lo in outs:
            try:
                got.append(self.instance(role, lo))
            except (ValueError, SimError) as e:
                self.skipped.append(f"{role} {lo}: {e}")
        return got

    def match(self, budget: int, devices_per_node: int, pps: tuple[int, ...] = (1,),
              verify: int = 3, colocated: bool = True) -> list[Candidate]:
        outs = [lo for lo in layouts(self.spec, devices_per_node, pps) if lo.devices <= budget]
        if not outs:
            raise ValueError(f"no layout of {self.spec} fits a budget of {budget} devices "
                             f"({devices_per_node} a node)")
        pre = self._instances("prefill", outs)
        dec = self._instances("decode", outs)
        col = self._instances("colocated", outs) if colocated else []
        ranked = best(pre, dec, col, budget)
        cands = [Candidate(p.describe(), p, p.devices, p.rate, serve_command(p, self.settings))
                 for p in ranked]
        for c in cands[:verify]:
            c.verified = self.verify(c.placement)
        # a placement whose joint run misses the target goes below those that met it
        cands.sort(key=lambda c: (c.verified is not None and c.verified < self.criteria.target,
                                  -c.per_device, -c.goodput, c.devices))
        return cands

    def verify(self, p: Placement, max_instances: int = 64) -> float | None:
        """The placement simulated whole at 97 % of its planned rate: its joint attainment
        (each: the share of the two percentile checks passed, 1.0 or 0.5 or 0.0). None: more
        than `max_instances` instances to simulate."""
        n = sum(k for k, _ in p.parts)
        if n > max_instances or p.rate <= 0:
            return None
        from splitserve.bench.goodput import attainment

        roles = {i.role: i for _, i in p.parts}
        if "colocated" in roles:
            i = roles["colocated"]
            dep = DeploymentSpec(p.describe(), colocated=p.count("colocated"))
            lat, role_latency = self._latency(Layout(i.tp, i.pp)), None
        else:
            pi, di = roles["prefill"], roles["decode"]
            dep = DeploymentSpec(p.describe(), prefill=p.count("prefill"),
                                 decode=p.count("decode"), local_prefill=False)
            lat = self._latency(Layout(pi.tp, pi.pp))
            role_latency = {"decode": self._latency(Layout(di.tp, di.pp))}
        recs = self._records(dep, lat, 0.97 * p.rate, role_latency)
        c = self.criteria
        if c.mode == "joint":
            return attainment(recs, c.ttft_s, c.tpot_s)
        return (c.passes(recs, "prefill") + c.passes(recs, "decode")) / 2

    def segment(self, budget: int, devices_per_node: int, pps: tuple[int, ...] = (1,)
                ) -> list[Candidate]:
        """DistServe's own search (simdistserve, low node affinity): one prefill and one
        decode instance of every pair of layouts that fits a node together, simulated jointly,
        ranked by goodput per device of that pair (replicated to fill the budget)."""
        from splitserve.sim.run import SimError

        outs = layouts(self.spec, devices_per_node, pps)
        cands = []
        for lp in outs:
            for ld in outs:
                g = lp.devices + ld.devices
                if g > min(devices_per_node, budget):
                    continue
                dep = DeploymentSpec(f"prefill {lp} + decode {ld}", prefill=1, decode=1,
                                     local_prefill=False)
                try:
                    lat_p, lat_d = self._latency(lp), self._latency(ld)
                    rate, probes = self.goodput(dep, lat_p, g, role_latency={"decode": lat_d})
                except (ValueError, SimError) as e:
                    self.skipped.append(f"{dep.name}: {e}")
                    continue
                pi = Instance("prefill", rate, lp.tp, lp.pp)
                di = Instance("decode", rate, ld.tp, ld.pp)
                n = budget // g
                p = Placement(((n, pi), (n, di)))
                self._log(f"  prefill {lp} + decode {ld}: {rate:.3f} req/s ({rate / g:.4f} per "
                          "device)")
                cands.append(Candidate(f"{n} x (1 {pi.describe()} + 1 {di.describe()})", p,
                                       n * g, n * rate, serve_command(p, self.settings),
                                       probes=probes))
        cands.sort(key=lambda c: (-c.per_device, c.devices, c.name))
        return cands

    # -- whole deployments (method joint) ----------------------------------------------------
    def joint(self, budget: int, local_prefill: bool = True) -> list[Candidate]:
        """Every co-located N and P:D split of `budget` one-device workers, simulated whole:
        pure P/D, with conditional local prefill (auto), and SLO-aware (slo)."""
        from splitserve.router.admission import CostModel
        from splitserve.router.policies import SloLocalPrefill

        if budget < 1:
            raise ValueError(f"the budget must be at least 1 device, got {budget}")
        lat = self._latency(Layout())
        c = self.criteria
        slo_flags = (f"--local-prefill slo --ttft-slo {c.ttft_s:g} --tpot-slo {c.tpot_s:g} "
                     f"--latency-model {self.spec}")
        kv = ["--kv-cache-gb", f"{self.settings.kv_cache_gb:g}"]  # the pool simulated
        deps = [(DeploymentSpec(f"colocated:{budget}", colocated=budget), None, "")]
        for p in range(1, budget):
            d = budget - p
            deps.append((DeploymentSpec(f"{p}:{d}:pure", prefill=p, decode=d,
                                        local_prefill=False), None, ""))
            if local_prefill:
                dep = DeploymentSpec(f"{p}:{d}", prefill=p, decode=d)
                deps.append((dep, None, ""))
                slo = SloLocalPrefill.for_slo(CostModel(lat, dep.max_num_batched_tokens),
                                              c.tpot_s, self.settings.max_num_seqs,
                                              ttft_s=c.ttft_s)
                deps.append((DeploymentSpec(f"{p}:{d} slo", prefill=p, decode=d), slo, slo_flags))
        cands = []
        for dep, slo, extra in deps:
            rate, probes = self.goodput(dep, lat, budget, local_prefill=slo)
            self._log(f"  {dep.name}: {rate:.3f} req/s")
            flags = dep.serve_flags() + kv
            if slo is not None:
                flags = flags + extra.split()
            cands.append(Candidate(dep.name, None, budget, rate, "splitserve serve "
                                   + " ".join(flags), probes=probes))
        cands.sort(key=lambda c: (-c.goodput, c.name))
        return cands


def serve_command(p: Placement, settings=None) -> str:
    """The serve flags of a placement (tensor/pipeline parallel workers are not built here:
    said in the command's comment)."""
    if p.count("colocated"):
        flags = f"--colocated {p.count('colocated')}"
    else:
        flags = f"--prefill {p.count('prefill')} --decode {p.count('decode')} --local-prefill off"
    par = [i.describe() for _, i in p.parts if i.devices > 1]
    note = f"   # {', '.join(par)}: this engine runs tp1 workers only" if par else ""
    return f"splitserve serve {flags}{note}"


def _table(cands: list[Candidate], unit: str) -> str:
    rows = ["| rank | deployment | " + unit + "s | goodput req/s | per " + unit
            + " | verified |", "|---:|---|---:|---:|---:|---:|"]
    for i, c in enumerate(cands, 1):
        v = "-" if c.verified is None else f"{c.verified:.2f}"
        rows.append(f"| {i} | {c.name} | {c.devices} | {c.goodput:.3f} | {c.per_device:.4f} | {v} |")
    return "\n".join(rows)


def main(a) -> int:
    from splitserve.bench import experiment as E

    try:
        if a.devices < 1 or a.devices_per_node < 1 or a.max_pp < 1:
            raise ValueError("--devices, --devices-per-node and --max-pp must be >= 1")
        crit = Criteria(*E.slos(a), a.target, a.attainment)
        gpu = a.latency_model.partition(":")[0].lower() in GPU_KINDS
        bound = a.max_rate_per_device or (32.0 if gpu else 4.0)
        planner = Planner(a.latency_model, a.workload, crit, a.num_requests, a.seed, a.cv,
                          bound, a.tol, quiet=a.quiet)
        method = a.method or ("match" if gpu or a.devices > 8 else "joint")
        t0 = time.perf_counter()
        if method == "joint":
            if gpu:
                raise ValueError("--method joint simulates one-device workers: use match or "
                                 "segment for a GPU latency model")
            cands = planner.joint(a.devices)
        elif method == "segment":
            cands = planner.segment(a.devices, a.devices_per_node, tuple(range(1, a.max_pp + 1)))
        else:
            cands = planner.match(a.devices, a.devices_per_node,
                                  tuple(range(1, a.max_pp + 1)), colocated=True)
        wall = time.perf_counter() - t0
    except ValueError as e:
        print(f"splitserve plan: {e}", file=sys.stderr)
        return 2
    unit = "GPU" if gpu else "core"
    ttft, tpot = crit.ttft_s, crit.tpot_s
    print(f"plan: {a.workload} ({a.num_requests} requests, seed {a.seed}, cv {a.cv:g}), SLOs TTFT "
          f"{ttft:g} s / TPOT {tpot * 1e3:g} ms at {crit.target:.0%} ({crit.mode}), budget "
          f"{a.devices} {unit}s, method {method}, {a.latency_model}")
    print(_table(cands, unit))
    if crit.mode == "joint" and method == "match":
        print("(verified: the placement simulated whole at 97 % of its rate, the share meeting "
              "both SLOs; one under the target is ranked after those that met it)")
    for name in planner.capped:
        print(f"warning: {name} passed at every rate tried: its goodput is at least that "
              "(raise --max-rate-per-device)")
    for why in planner.skipped:
        print(f"skipped: {why}")
    if cands and cands[0].goodput > 0:
        print(f"\nbest: {cands[0].name}: {cands[0].goodput:.3f} req/s "
              f"({cands[0].per_device:.4f} per {unit})\n  {cands[0].serve}")
    else:
        print("\nno deployment meets the SLOs at any rate searched")
    print(f"\n{planner.runs} simulations in {wall:.1f} s", file=sys.stderr)
    if a.json:
        import dataclasses
        import json

        with open(a.json, "w") as f:
            json.dump({"method": method, "criteria": dataclasses.asdict(crit),
                       "capped": planner.capped, "skipped": planner.skipped,
                       "devices": a.devices, "latency_model": a.latency_model,
                       "workload": a.workload, "wall_s": wall, "simulations": planner.runs,
                       "ranked": [{"name": c.name, "devices": c.devices, "goodput_req_s": c.goodput,
                                   "per_device": c.per_device, "verified": c.verified,
                                   "serve": c.serve} for c in cands]}, f, indent=1)
    return 0


def add_args(p) -> None:
    p.add_argument("--latency-model", required=True,
                   help="fitted:PROFILE.json (this machine: one worker per core), or a GPU "
                        "family without tp/pp (distserve:OPT-13B, roofline:H100:llama-8b): each "
                        "layout is tried")
    p.add_argument("--workload", default="chat", choices=sorted(W.WORKLOADS))
    p.add_argument("--num-requests", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cv", type=float, default=1.0, help="arrival burstiness (1 = Poisson)")
    p.add_argument("--ttft-slo", type=float, default=None, help="seconds (default per workload)")
    p.add_argument("--tpot-slo", type=float, default=None, help="seconds (default per workload)")
    p.add_argument("--target", type=float, default=0.9, help="attainment that counts as goodput")
    p.add_argument("--attainment", default="joint", choices=["joint", "each"],
                   help="joint: that share of requests meets both SLOs; each: that percentile "
                        "of TTFT and of TPOT each within its SLO (DistServe's search)")
    p.add_argument("--devices", type=int, default=2, help="the budget: cores, or GPUs")
    p.add_argument("--devices-per-node", type=int, default=8,
                   help="GPUs per node: the largest tensor x pipeline layout of one instance")
    p.add_argument("--max-pp", type=int, default=1, help="pipeline degrees tried: 1..N")
    p.add_argument("--method", choices=["joint", "match", "segment"], default=None,
                   help="joint: every split simulated whole; match: per-phase instances by rate "
                        "matching; segment: DistServe's (1 prefill + 1 decode instance per pair "
                        "of layouts that fits a node, simulated together). Default: joint for up "
                        "to 8 one-device workers, else match")
    p.add_argument("--max-rate-per-device", type=float, default=None,
                   help="the bisection's upper bound, req/s per device (default: 32 for a GPU "
                        "family, 4 for one-device workers)")
    p.add_argument("--tol", type=float, default=0.05, help="bisection tolerance, req/s per device")
    p.add_argument("--json", default=None, help="write the ranking here")
    p.add_argument("--quiet", action="store_true")
