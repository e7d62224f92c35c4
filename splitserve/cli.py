"""`splitserve generate | serve | worker | bench ...`"""

from __future__ import annotations

import argparse
import sys
import time

from splitserve.errors import SplitServeError


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default",
                   help="'default' (embedded SmolLM2-135M-Instruct), a Hugging Face model dir, or a .gguf file")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--quantization", default=None, choices=["int8"], help="weight-only int8")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--no-fast-linear", action="store_true", help="plain F.linear (the reference path)")


def _engine_config(a):
    from splitserve.config import EngineConfig

    return EngineConfig(model=a.model, dtype=a.dtype, quantization=a.quantization, device=a.device,
                        num_threads=a.threads, fast_linear=not a.no_fast_linear)


def cmd_generate(a) -> int:
    from splitserve.engine.engine import LLMEngine
    from splitserve.request import SamplingParams

    params = SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p,
                            top_k=a.top_k, seed=a.seed, stop=tuple(a.stop or ()))
    t0 = time.perf_counter()
    eng = LLMEngine(_engine_config(a))
    t_load = time.perf_counter() - t0
    use_chat = not a.no_chat and getattr(eng.tokenizer, "chat_template", None)
    prompts = a.prompt or ["Write a haiku about the sea."]
    for i, prompt in enumerate(prompts):
        if i:
            print()
        toks = eng.apply_chat_template([{"role": "user", "content": prompt}]) if use_chat else eng.encode(prompt)
        t_start = time.perf_counter()
        eng.add_request(toks, params)
        t_first, n = None, 0
        while eng.has_unfinished():
            for o in eng.step():
                if t_first is None:
                    t_first = time.perf_counter()
                n += len(o.new_token_ids)
                sys.stdout.write(o.new_text)
                sys.stdout.flush()
                if o.finished:
                    reason = o.finish_reason
        t_end = time.perf_counter()
        tpot = (t_end - t_first) / (n - 1) * 1e3 if n > 1 else float("nan")
        print(f"\n[{len(toks)} prompt tokens, {n} generated, finish={reason}; load {t_load:.1f} s, "
              f"TTFT {(t_first - t_start) * 1e3:.0f} ms, TPOT {tpot:.1f} ms, "
              f"{eng.linear_mode} linears, {eng.dtype}]", file=sys.stderr)
    return 0


def cmd_bench_engine(a) -> int:
    from splitserve.bench.engine import main as bench_main

    return bench_main(a)


def cmd_bench_handover(a) -> int:
    from splitserve.bench.handover import main as bench_main

    return bench_main(a)


def cmd_serve(a) -> int:
    from splitserve.server.launch import run_serve

    return run_serve(a)


def cmd_worker(a) -> int:
    from splitserve.server.launch import run_worker_cli

    return run_worker_cli(a, _engine_config(a))


def build_parser() -> argparse.ArgumentParser:
    from splitserve.server.launch import add_serve_args, add_worker_args

    p = argparse.ArgumentParser(prog="splitserve", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="generate text with one engine (chat template applied for chat models)")
    _engine_args(g)
    g.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    g.add_argument("--no-chat", action="store_true", help="send the prompt raw, without the chat template")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", help="a stop string (repeatable)")
    g.set_defaults(func=cmd_generate)

    s = sub.add_parser("serve", help="OpenAI-compatible server: router + prefill and decode workers "
                       "(default: 1 + 1 on the embedded model, http://127.0.0.1:8000/v1)")
    _engine_args(s)
    add_serve_args(s)
    add_worker_args(s)
    s.set_defaults(func=cmd_serve)

    w = sub.add_parser("worker", help="one worker process that registers with a router")
    _engine_args(w)
    add_worker_args(w)
    w.add_argument("--role", required=True, choices=["colocated", "prefill", "decode"])
    w.add_argument("--router", required=True, help="the router's control socket, HOST:PORT")
    w.add_argument("--worker-id", default=None)
    w.add_argument("--cores", default=None, help="pin to these cores, e.g. '0-3' or '0,2'")
    w.add_argument("--data-host", default="127.0.0.1",
                   help="decode: address its KV data socket binds and announces (a routable IP "
                        "when prefill workers run on other hosts)")
    w.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    w.add_argument("--tpot-slo", type=float, default=None,
                   help="decode: size the prefills the router gives this worker itself by the "
                        "TPOT slack of its decodes (serve --local-prefill slo; with --latency-model)")
    w.add_argument("--latency-model", default=None,
                   help="decode, with --tpot-slo: the step times it prices chunks with "
                        "(fitted:PROFILE.json, as serve's)")
    w.set_defaults(func=cmd_worker)

    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench", required=True)
    be = bsub.add_parser("engine", help="prefill and decode speed next to the machine's roofline")
    _engine_args(be)
    from splitserve.bench.engine import add_args

    add_args(be)
    be.set_defaults(func=cmd_bench_engine)
    bh = bsub.add_parser("handover", help="the KV hand-over's share of P/D request latency, per transport")
    _engine_args(bh)
    from splitserve.bench.handover import add_args as add_handover_args

    add_handover_args(bh)
    bh.set_defaults(func=cmd_bench_handover)
    from splitserve.bench import admission as bench_admission
    from splitserve.bench import compare as bench_compare
    from splitserve.bench import load as bench_load
    from splitserve.bench import phases as bench_phases
    from splitserve.bench import routing as bench_routing
    from splitserve.bench import soak as bench_soak
    from splitserve.kv import store as kv_store
    from splitserve.plan import pareto as plan_pareto
    from splitserve.plan import search as plan_search
    from splitserve.sim import profile as sim_profile
    from splitserve.sim import run as sim_run
    from splitserve.sim import validate as sim_validate

    for subs, name, module, text in (
            (bsub, "serve", bench_load, "load an OpenAI-compatible endpoint: latency, SLO "
             "attainment, goodput by bisection on the rate"),
            (bsub, "compare", bench_compare, "the same workload against P/D, co-located (chunked, "
             "prefill-first) and llama-server, each started here"),
            (bsub, "phases", bench_phases, "traffic that changes shape (prefill-heavy, then "
             "decode-heavy, then back) against fixed P/D, fixed co-located and serve --planner "
             "auto, each started here: attainment over time"),
            (bsub, "routing", bench_routing, "what a cache-aware routing decision costs at 1, "
             "8, 64 workers with 10^5 cached blocks (µs p50 / p99)"),
            (bsub, "admission", bench_admission, "the router time admission control adds per "
             "request (route() p50 / p99, refused and admitted, vs admission off)"),
            (bsub, "soak", bench_soak, "start serve, load it for --minutes while SIGKILLing "
             "random workers; every greedy 200 checked against the offline engine"),
            (bsub, "validate", sim_validate, "the simulator against real runs of the same "
             "workload, seed and rates on this machine (attainment and latency errors)"),
            (sub, "profile", sim_profile, "time real engine steps of known shape on this machine "
             "and fit the simulator's `fitted` latency model to them"),
            (sub, "sim", sim_run, "simulate a deployment (the server's own scheduling code on a "
             "virtual clock) on any bench workload: same report as bench serve"),
            (sub, "plan", plan_search, "choose a deployment by simulated goodput per device: "
             "co-located or P/D splits, parallel layouts, rate matching; prints the serve "
             "command"),
            (sub, "kv-store", kv_store, "the shared KV tier's store process (serve "
             "--kv-shared-gb starts one itself; workers on other hosts: --kv-shared HOST:PORT)"),
            (sub, "pareto", plan_pareto, "throughput per device vs tokens/s/user across "
             "co-located and disaggregated deployments of a budget, by simulation (table, PNG)")):
        sp = subs.add_parser(name, help=text)  # each module brings its flags and its main
        module.add_args(sp)
        sp.set_defaults(func=module.main)
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return a.func(a)
    except SplitServeError as e:
        print(f"splitserve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
