"""`splitserve profile`: time real engine steps of known shape, then fit the `fitted` latency
model (sim/latency/fitted.py) to them.

The engine is the server's own (`LLMEngine`, its scheduler wrapped on the instance to record
each step's SchedulerOutput); each sample is one whole `engine.step()` (scheduler, input
building, forward, sampling, detokenizing), as a worker's loop runs it. Scenarios:

  prefill   lone prompts of 16..2048 tokens, chunked by the token budget as a worker chunks
            them; chunks after a cached prefix of s tokens (prior context without decodes)
  decode    B sequences at a context, decode-only steps (untimed warm-up steps first)
  mixed     B decodes plus one prompt chunk of 8..512 tokens, after 0 or s cached tokens
            (chunked prefill; a decode worker's own prefill)

Context is made without computing it: `reserve` + `admit` (the decode worker's hand-over path)
puts a request at any context with its KV left as the pool holds it, and admitting then
aborting a prompt leaves its blocks in the prefix cache for the next prompt to hit. The step's
cost does not depend on what the KV holds. Prompts are random token ids, fresh for every
repeat, with ignore_eos, so no step hits the cache unless a scenario makes it.

Each grid point runs `repeats` times; every sample is kept in the JSON (wall time, and for a
one-thread CPU run the CPU time) and the fit uses each point's median. On a machine shared with
other busy processes a step may wait for its core: a step whose CPU time is below 90 % of its
wall time is fitted at its CPU time, what it would take on a core of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass, replace

from splitserve.sim.latency.base import Batch
from splitserve.sim.latency.fitted import (
    CONTENDED,
    PROFILE_FORMAT,
    FittedLatency,
    Sample,
    fit,
    fit_report,
    format_report,
    load_samples,
)


@dataclass(frozen=True)
class Grid:
    prefill_lengths: tuple[int, ...]  # lone prompts, no cached prefix
    prefix_chunks: tuple[tuple[int, int], ...]  # (cached s, chunk l), no decodes
    decode_batches: tuple[int, ...]
    decode_contexts: tuple[int, ...]
    mixed_batches: tuple[int, ...]
    mixed_chunks: tuple[int, ...]
    mixed_contexts: tuple[tuple[int, int], ...]  # (decodes' context, chunk's cached s)
    repeats: int = 3
    decode_steps: int = 3  # timed steps per decode point (its repeats)
    warmup: int = 1  # untimed steps after a batch of decodes is admitted


# About 4 minutes on one core of the 2-core dev VM (SmolLM2-135M bf16: ~7 ms per prompt token
# there). Long prompts' later chunks are the prefix_chunks (a 512-token chunk after 1536 cached
# tokens is the fourth chunk of a 2048-token prompt) rather than whole 2048-token prompts.
FULL = Grid(
    prefill_lengths=(16, 32, 64, 128, 256, 512, 1024),
    prefix_chunks=((512, 8), (512, 128), (1536, 8), (1536, 128), (1536, 512)),
    decode_batches=(1, 2, 4, 8, 16, 32, 48, 64),
    decode_contexts=(64, 256, 1024, 2048),
    mixed_batches=(1, 4, 16, 64),
    mixed_chunks=(8, 64, 512),
    mixed_contexts=((256, 0), (1024, 1024)),
    repeats=3, decode_steps=3, warmup=1,
)
QUICK = Grid(
    prefill_lengths=(16, 64, 160),
    prefix_chunks=((64, 16), (64, 64)),
    decode_batches=(1, 4, 16),
    decode_contexts=(32, 128),
    mixed_batches=(1, 8),
    mixed_chunks=(8, 64),
    mixed_contexts=((64, 0), (64, 64)),
    repeats=3, decode_steps=3, warmup=1,
)


def add_args(p) -> None:
    p.add_argument("--model", default="default",
                   help="'default' (embedded SmolLM2-135M-Instruct), a Hugging Face model dir, or a .gguf file")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--quantization", default=None, choices=["int8"], help="weight-only int8")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1, as each serving worker on one core runs)")
    p.add_argument("--cores", default=None,
                   help="pin this process to these cores, e.g. '0' or '0-3' (default: the first "
                        "--threads cores it may run on; 'none' = do not pin)")
    p.add_argument("--no-fast-linear", action="store_true", help="plain F.linear (the reference path)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-batched-tokens", type=int, default=512,
                   help="the step's token budget (the server's default 512): longer prompts are chunked")
    p.add_argument("--kv-cache-gb", type=float, default=2.0,
                   help="KV pool; decode points that do not fit are skipped")
    p.add_argument("--quick", action="store_true", help="a small grid (tests, CI): seconds on a tiny model")
    p.add_argument("--repeats", type=int, default=None,
                   help="runs per grid point, timed steps per decode point (default: the grid's, 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None,
                   help="write the profile JSON here (default bench-results/profile.json; with "
                        "--refit: the profile refitted, in place)")
    p.add_argument("--refit", metavar="PATH", default=None,
                   help="refit a saved profile's samples without measuring, print the report")
    p.add_argument("--beside", metavar="CORES", default=None,
                   help="measure with a busy neighbour: another engine on these cores decoding "
                        f"{NEIGHBOUR_BATCH} requests all the time, as a second worker of a "
                        "deployment on one host does (shared caches and memory bandwidth)")
    p.add_argument("--neighbour", action="store_true", help=argparse.SUPPRESS)


# -- measuring -------------------------------------------------------------------------------------
class Profiler:
    """Drives one engine through the grid and records (batch, seconds) per step."""

    def __init__(self, engine, seed: int = 0, log=print):
        import torch

        self.engine = engine
        self.rng = random.Random(seed)
        self.log = log
        self.samples: list[Sample] = []
        self.vocab = engine.model_config.vocab_size
        self.bs = engine.kv_manager.block_size
        self.max_len = engine.max_model_len
        cuda = engine.device.type == "cuda"
        self._sync = torch.cuda.synchronize if cuda else (lambda: None)
        # A one-thread CPU step's CPU time tells how long it had its core; with more threads
        # (idle ones wait in barriers) or a GPU (the CPU waits in synchronize) it does not.
        self._cpu_time = not cuda and torch.get_num_threads() == 1
        self._ids = 0
        self._last = None
        sched = engine.scheduler
        orig = sched.schedule

        def record(now=None):
            self._last = orig(now)
            return self._last

        sched.schedule = record

    # requests ----------------------------------------------------------------------------------
    def _tokens(self, n: int) -> list[int]:
        lo = min(100, self.vocab // 4)  # clear of the special tokens
        return [self.rng.randrange(lo, self.vocab) for _ in range(n)]

    def _rid(self, what: str) -> str:
        self._ids += 1
        return f"profile-{what}-{self._ids}"

    def _params(self, max_tokens: int):
        from splitserve.request import SamplingParams

        return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)

    def _at_context(self, ctx: int, max_tokens: int) -> str:
        """A running request with `ctx` tokens in KV and one to decode: the hand-over path."""
        rid = self._rid("dec")
        if self.engine.reserve(self._tokens(ctx), self._params(max_tokens), rid) is None:
            raise RuntimeError(f"no room to reserve {ctx} tokens (grow --kv-cache-gb)")
        self.engine.admit(rid, self._tokens(1)[0])
        return rid

    def _prompt(self, cached: int, n: int) -> str:
        """A waiting prompt whose first `cached` tokens (a multiple of the block size) hit the
        prefix cache: admitted as a hand-over, aborted (its blocks stay cached), resubmitted."""
        prefix = self._tokens(cached)
        if cached:
            rid = self._rid("prefix")
            if self.engine.reserve(prefix, self._params(1), rid) is None:
                raise RuntimeError(f"no room to reserve {cached} tokens (grow --kv-cache-gb)")
            self.engine.admit(rid, self._tokens(1)[0])
            self.engine.abort_request(rid)
        rid = self._rid("prompt")
        self.engine.add_request(prefix + self._tokens(n), self._params(1), rid)
        return rid

    def _abort(self, rids) -> None:
        for rid in rids:
            self.engine.abort_request(rid)

    # steps -------------------------------------------------------------------------------------
    def step(self) -> tuple[Batch, float, float]:
        """One engine step: what ran, how long the whole step took, the CPU time it used."""
        self._sync()
        c0, t0 = time.process_time(), time.perf_counter()
        self.engine.step()
        self._sync()
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        return Batch.of(self._last), dt, cpu

    def keep(self, point: str, batch: Batch, seconds: float, cpu: float) -> None:
        if not batch.is_empty:
            self.samples.append(Sample(batch, seconds, point, cpu if self._cpu_time else None))

    def _fits(self, *seqs: tuple[int, int]) -> bool:
        """Room for these (count, tokens) sequences at once, each within the context."""
        blocks = sum(k * -(-(n + 1) // self.bs) for k, n in seqs)
        return (all(n < self.max_len for _, n in seqs)
                and blocks <= self.engine.kv_manager.pool.num_blocks - 8)

    # scenarios ---------------------------------------------------------------------------------
    def warm_up(self) -> None:
        """Kernels compile and caches fill on the first steps: run one of each kind untimed."""
        n = min(64, self.max_len // 4)
        ids = [self._at_context(n, 8) for _ in range(2)]
        self._prompt(0, n)
        while self.engine.has_unfinished():
            self.step()
        self._abort(ids)

    def prefill(self, cached: int, n: int, repeats: int) -> None:
        """A lone prompt: every chunk the budget cuts it into is a sample."""
        if not self._fits((1, cached + n + 1)):
            return
        for _ in range(repeats):
            self._prompt(cached, n)
            i = 0
            while self.engine.has_unfinished():
                self.keep(f"prefill s={cached} l={n} #{i}", *self.step())
                i += 1

    def decode(self, batch: int, ctx: int, g: Grid) -> None:
        n = g.warmup + g.decode_steps
        if not self._fits((batch, ctx + n + 2)):
            return
        ids = [self._at_context(ctx, n + 2) for _ in range(batch)]
        for i in range(n):
            b, dt, cpu = self.step()
            if i >= g.warmup:
                self.keep(f"decode B={batch} ctx={ctx}", b, dt, cpu)
        self._abort(ids)

    def mixed(self, batch: int, ctx: int, cached: int, chunks, g: Grid) -> None:
        steps = g.warmup + len(chunks) * g.repeats
        if not self._fits((batch, ctx + steps + 2), (1, cached + max(chunks) + 1)):
            return
        ids = [self._at_context(ctx, steps + 2) for _ in range(batch)]
        for _ in range(g.warmup):
            self.step()
        for n in chunks:
            for _ in range(g.repeats):
                rid = self._prompt(cached, n)
                self.keep(f"mixed B={batch} ctx={ctx} s={cached} l={n}", *self.step())
                self._abort([rid])  # a chunk the budget cut short would run on: stop it here
        self._abort(ids)

    def run(self, g: Grid) -> list[Sample]:
        t0 = time.perf_counter()
        self.warm_up()
        self.log(f"warm-up done ({time.perf_counter() - t0:.1f} s)")
        for n in g.prefill_lengths:
            self.prefill(0, n, g.repeats)
        for s, n in g.prefix_chunks:
            self.prefill(s - s % self.bs, n, g.repeats)
        self._progress("prefill", t0)
        for b in g.decode_batches:
            for ctx in g.decode_contexts:
                self.decode(b, ctx, g)
        self._progress("decode", t0)
        for ctx, s in g.mixed_contexts:
            for b in g.mixed_batches:
                self.mixed(b, ctx, s - s % self.bs, g.mixed_chunks, g)
        self._progress("mixed", t0)
        self.engine.check_integrity()
        return self.samples

    def _progress(self, what: str, t0: float) -> None:
        self.log(f"{what} steps measured: {len(self.samples)} samples so far, "
                 f"{time.perf_counter() - t0:.1f} s")


# -- the command ------------------------------------------------------------------------------
# the flags that decide the CPU kernels' speed (bf16 dot products, AMX tiles)
_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")


def cpu_info() -> dict:
    """Model name, family/model numbers and kernel-relevant flags from /proc/cpuinfo (a VM's
    model name can be as vague as "AMD EPYC": the family and flags tell Zen 3 from Zen 4)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if not key:
                    break  # the first processor's block is enough
                fields[key] = value.strip()
    except OSError:
        pass
    flags = set(fields.get("flags", "").split())
    return {"cpu": fields.get("model name") or platform.processor() or platform.machine(),
            "cpu_family": fields.get("cpu family"), "cpu_model": fields.get("model"),
            "cpu_flags": [f for f in _FLAGS if f in flags]}


def machine_info(engine, cores) -> dict:
    import torch

    info = cpu_info() | {"cores": sorted(cores) if cores else None,
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "device": str(engine.device), "torch": torch.__version__,
            "python": platform.python_version(), "machine": platform.machine(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if engine.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(engine.device)
    return info


def engine_settings(engine) -> dict:
    c = engine.config
    return {"model": c.model, "model_name": engine.model_config.name, "model_path": engine.model_path,
            "dtype": c.dtype, "quantization": c.quantization, "fast_linear": c.fast_linear,
            "linear_mode": engine.linear_mode, "block_size": c.cache.block_size,
            "num_blocks": engine.kv_manager.pool.num_blocks,
            "max_num_batched_tokens": c.scheduler.max_num_batched_tokens,
            "max_num_seqs": c.scheduler.max_num_seqs, "max_model_len": engine.max_model_len}


def describe_profile(doc: dict) -> str:
    e, m = doc.get("engine", {}), doc.get("machine", {})
    return (f"{e.get('model_name', '?')} {e.get('dtype', '?')}{' int8' if e.get('quantization') else ''}, "
            f"{m.get('threads', '?')} thread(s) on {m.get('gpu') or m.get('cpu', '?')}, "
            f"budget {e.get('max_num_batched_tokens', '?')}")


def cpu_share(samples: list[Sample]) -> dict:
    """How much of their wall time the steps had their core. On a machine shared with other
    busy processes a step also waits for its core; the fit then takes its CPU time instead."""
    shares = sorted(s.cpu_seconds / s.seconds for s in samples if s.cpu_seconds is not None)
    if not shares:
        return {}
    return {"median": shares[len(shares) // 2], "p10": shares[len(shares) // 10],
            "min": shares[0], "contended_samples": sum(s.contended for s in samples)}


def build_engine(a):
    from splitserve.config import CacheConfig, EngineConfig, SchedulerConfig
    from splitserve.engine.engine import LLMEngine

    g = QUICK if a.quick else FULL
    seqs = max(64, max(g.decode_batches + g.mixed_batches) + 2)
    cfg = EngineConfig(model=a.model, dtype=a.dtype, device=a.device, quantization=a.quantization,
                       fast_linear=not a.no_fast_linear, num_threads=a.threads, seed=a.seed,
                       cache=CacheConfig(block_size=a.block_size, kv_cache_memory_gb=a.kv_cache_gb),
                       scheduler=SchedulerConfig(max_num_batched_tokens=a.max_num_batched_tokens,
                                                 max_num_seqs=seqs))
    return LLMEngine(cfg)


def _pin(spec: str | None, threads: int) -> list[int] | None:
    if spec == "none":
        return None
    if spec:
        from splitserve.server.launch import parse_core_lists

        cores = parse_core_lists(spec)[0]
    else:
        cores = sorted(os.sched_getaffinity(0))[:threads]
    os.sched_setaffinity(0, cores)
    return cores


NEIGHBOUR_BATCH = 4


def run_neighbour(a) -> int:
    """The busy neighbour of --beside: decode NEIGHBOUR_BATCH requests for ever (new ones as
    they finish) until killed or orphaned."""
    from splitserve.request import SamplingParams

    _pin(a.cores, a.threads)
    engine = build_engine(a)
    params = SamplingParams(max_tokens=256, temperature=0.0, ignore_eos=True)
    rng = random.Random(a.seed + 1)
    parent = os.getppid()
    while os.getppid() == parent:
        while len(engine.scheduler.running) + len(engine.scheduler.waiting) < NEIGHBOUR_BATCH:
            engine.add_request([rng.randrange(100, 40_000) for _ in range(64)], params)
        engine.step()
    return 0


def _start_neighbour(a):
    import subprocess

    cmd = [sys.executable, "-m", "splitserve.sim.profile", "--neighbour", "--cores", a.beside,
           "--threads", str(a.threads), "--model", a.model, "--dtype", a.dtype,
           "--device", a.device, "--kv-cache-gb", "0.5"]
    if a.quantization:
        cmd += ["--quantization", a.quantization]
    if a.no_fast_linear:
        cmd.append("--no-fast-linear")
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL)


def measure(a, log=print) -> tuple[dict, list[Sample]]:
    """Build the engine, run the grid; the profile document (no fit yet) and its samples.
    The process's core affinity and torch's thread count are restored afterwards."""
    import torch

    g = QUICK if a.quick else FULL
    if a.repeats:
        g = replace(g, repeats=a.repeats, decode_steps=a.repeats)
    before = (os.sched_getaffinity(0), torch.get_num_threads())
    neighbour = _start_neighbour(a) if a.beside else None
    t0 = time.perf_counter()
    try:
        cores = _pin(a.cores, a.threads)
        engine = build_engine(a)
        t_load = time.perf_counter() - t0
        log(f"profiling {engine.model_config.name} ({engine.linear_mode} linears, {a.threads} "
            f"thread(s), cores {cores or 'unpinned'}, {'quick' if a.quick else 'full'} grid)")
        if neighbour is not None:
            time.sleep(15)  # its model loads, its first steps run
            if neighbour.poll() is not None:
                raise RuntimeError(f"the --beside neighbour exited with {neighbour.returncode}")
        samples = Profiler(engine, a.seed, log).run(g)
        doc = {"format": PROFILE_FORMAT, "version": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "machine": machine_info(engine, cores), "engine": engine_settings(engine),
               "settings": {"quick": a.quick, "grid": asdict(g), "seed": a.seed, "load_seconds": t_load,
                            "measure_seconds": time.perf_counter() - t0 - t_load,
                            "beside": a.beside},
               "samples": [s.to_json() for s in samples]}
    finally:
        if neighbour is not None:
            neighbour.kill()
            neighbour.wait()
        os.sched_setaffinity(0, before[0])
        torch.set_num_threads(before[1])
    return doc, samples


def attach_fit(doc: dict, samples: list[Sample], source: str) -> FittedLatency:
    """Fit the samples; store the model and its report in doc["fit"], how much of the time
    the steps had their core in doc["cpu_share"]."""
    model = fit(samples, source, describe_profile(doc))
    doc["cpu_share"] = cpu_share(samples)
    doc["fit"] = model.to_json() | {"method": "nnls on each point's median own-core time, rows "
                                              "weighted by 1/time (relative error)",
                                    "report": fit_report(model, samples)}
    return model


def main(a) -> int:
    if a.neighbour:
        return run_neighbour(a)
    if a.refit:
        out = a.out or a.refit
        try:
            doc, samples = load_samples(a.refit)
            model = attach_fit(doc, samples, out)
        except ValueError as e:
            print(f"splitserve profile: error: {e}", file=sys.stderr)
            return 2
    else:
        out = a.out or os.path.join("bench-results", "profile.json")
        doc, samples = measure(a, log=lambda msg: print(msg, flush=True))
        model = attach_fit(doc, samples, out)
    print(f"{len(samples)} samples: {describe_profile(doc)}")
    share = doc.get("cpu_share") or {}
    if share:
        lost = share["contended_samples"]
        print(f"CPU share of the steps' wall time: median {share['median']:.0%}, p10 {share['p10']:.0%}"
              + (f"; {lost} of {len(samples)} steps lost their core part of the time (below "
                 f"{CONTENDED:.0%}): fitted at their CPU time instead" if lost else ""))
    print(format_report(model, doc["fit"]["report"]))
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m splitserve.sim.profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(parser)
    sys.exit(main(parser.parse_args()))
