"""Prometheus metrics of one app: request latencies and token counts observed by the API, and the
workers' load and KV hand-over counters read from the conductor at scrape time.

Each app owns its CollectorRegistry (never prometheus_client's global one), so several apps can
live in one process (tests, or two servers) without "Duplicated timeseries" errors.

Latencies are per sequence: a request with n choices is n sequences, each with its own TTFT.
Token counters match the usage the API answers: a prompt counts once however many choices it has.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger(__name__)

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0)
# CPU decode steps run 10-100 ms, GPU ones a few ms: buckets cover both.
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
                0.4, 0.5, 0.75, 1.0, 2.5)
_E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0,
                240.0, 480.0)


class ApiMetrics:
    def __init__(self, conductor):
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("splitserve_time_to_first_token_seconds",
                              "Request arrival to the first generated token, per sequence",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram("splitserve_inter_token_latency_seconds",
                             "Gap between consecutive generated tokens of a sequence",
                             buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("splitserve_e2e_request_latency_seconds",
                             "Request arrival to the last token, per sequence",
                             buckets=_E2E_BUCKETS, registry=r)
        # finish_reason: stop | length, or abort (the client went away) | error (the request failed)
        self.requests = Counter("splitserve_requests", "Finished sequences by finish reason",
                                ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("splitserve_prompt_tokens",
                                     "Prompt tokens of accepted requests", registry=r)
        self.generation_tokens = Counter("splitserve_generation_tokens", "Generated tokens",
                                         registry=r)
        # reason: ttft | tpot (admission predicted an SLO miss) | queue (a worker's queue is full)
        self.rejected = Counter("splitserve_rejected_requests", "Requests refused with a 429 "
                                "by admission control, by reason", ["reason"], registry=r)
        r.register(WorkerCollector(conductor))


class SequenceTimer:
    """Latency bookkeeping of one sequence; times are time.monotonic() values passed in."""

    def __init__(self, metrics: ApiMetrics, t_arrival: float):
        self.m = metrics
        self.t_arrival = t_arrival
        self.t_last: float | None = None
        self.num_tokens = 0
        self.done = False

    def on_tokens(self, n: int, now: float) -> None:
        """A delta with `n` new tokens arrived. Its first token's TTFT is observed if it is the
        sequence's first; otherwise the gap since the previous delta is shared evenly by its tokens
        (a delta can carry several tokens when the API fell behind the workers)."""
        if n <= 0:
            return
        if self.t_last is None:
            self.m.ttft.observe(now - self.t_arrival)
        else:
            gap = (now - self.t_last) / n
            for _ in range(n):
                self.m.itl.observe(gap)
        self.t_last = now
        self.num_tokens += n

    def on_finish(self, finish_reason: str, now: float) -> None:
        if self.done:
            return
        self.done = True
        self.m.requests.labels(finish_reason).inc()
        self.m.generation_tokens.inc(self.num_tokens)
        if finish_reason in ("stop", "length"):
            self.m.e2e.observe(now - self.t_arrival)


class WorkerCollector:
    """Reads conductor.worker_stats() at each scrape: workers come and go, so their series are
    built fresh every time instead of living in labelled gauges that would keep dead workers."""

    def __init__(self, conductor):
        self.conductor = conductor

    def collect(self):
        try:
            stats = self.conductor.worker_stats()
        except Exception:
            # The API's own metrics are still worth scraping when the conductor cannot answer.
            log.exception("conductor.worker_stats() failed; worker metrics left out of this scrape")
            stats = []
        labels = ["worker_id", "role"]
        gauges = {
            "running": GaugeMetricFamily("splitserve_worker_running_requests",
                                         "Requests the worker is running", labels=labels),
            "waiting": GaugeMetricFamily("splitserve_worker_waiting_requests",
                                         "Requests queued at the worker", labels=labels),
            "kv_blocks_used": GaugeMetricFamily("splitserve_worker_kv_blocks_used",
                                                "KV blocks in use", labels=labels),
            "kv_blocks_total": GaugeMetricFamily("splitserve_worker_kv_blocks_total",
                                                 "KV blocks of the worker's pool", labels=labels),
        }
        kv_bytes = CounterMetricFamily("splitserve_kv_transfer_bytes",
                                       "KV bytes sent (by prefill) / received (by decode)",
                                       labels=labels + ["direction"])
        kv_seconds = CounterMetricFamily("splitserve_kv_transfer_seconds",
                                         "Time spent writing (prefill) / handing over (decode) KV",
                                         labels=labels)
        kv_transfers = CounterMetricFamily("splitserve_kv_transfers", "KV hand-overs",
                                           labels=labels)
        local_prefills = CounterMetricFamily(
            "splitserve_local_prefills", "Prompts a decode worker prefilled itself "
            "(conditional disaggregation)", labels=labels)
        counters = {
            "steps": CounterMetricFamily("splitserve_worker_steps", "Engine steps run",
                                         labels=labels),
            "aborts": CounterMetricFamily("splitserve_worker_aborts",
                                          "Aborts that found their request at the worker",
                                          labels=labels),
            "step_errors": CounterMetricFamily(
                "splitserve_worker_step_errors", "Steps whose forward raised (their requests "
                "failed; the worker went on)", labels=labels),
            "rejoins": CounterMetricFamily(
                "splitserve_worker_rejoins", "Times the worker lost its router (it restarted, or "
                "fell silent), aborted what it held and registered again", labels=labels),
            "integrity_errors": CounterMetricFamily(
                "splitserve_worker_integrity_errors", "Failed block-pool integrity checks "
                "(run when idle; any is a bug)", labels=labels),
            "role_changes": CounterMetricFamily(
                "splitserve_worker_role_changes", "Role changes the worker took (SetRole)",
                labels=labels),
            # vLLM's convention, in tokens (the device tier: the worker's own KV pool)
            "prefix_cache_queries": CounterMetricFamily(
                "splitserve_prefix_cache_queries", "Prompt tokens looked up in the worker's "
                "prefix cache", labels=labels),
            "prefix_cache_hits": CounterMetricFamily(
                "splitserve_prefix_cache_hits", "Prompt tokens found in the worker's prefix "
                "cache", labels=labels),
        }
        # the tiers below the pool (kv/tiers.py): hits by tier, bytes between tiers
        tier_hits = CounterMetricFamily(
            "splitserve_prefix_cache_tier_hits", "Prompt tokens found in the prefix cache, by "
            "tier (device: the worker's KV pool; dram, disk: the tiers below it; shared: the KV "
            "store every worker loads from)",
            labels=labels + ["tier"])
        tier_bytes = CounterMetricFamily(
            "splitserve_kv_tier_bytes", "KV bytes copied between a worker's tiers",
            labels=labels + ["src", "dst"])
        tier_corrupt = CounterMetricFamily(
            "splitserve_kv_tier_corrupt", "Disk or shared-store KV blocks refused (checksum, "
            "size or name wrong) or lost, and recomputed", labels=labels)
        tier_blocks = GaugeMetricFamily("splitserve_kv_tier_blocks", "KV blocks each tier "
                                        "below the pool holds", labels=labels + ["tier"])
        for s in stats:
            key = [str(s["worker_id"]), str(s["role"])]
            for tier, n in (s.get("prefix_cache_hits_by_tier") or {}).items():
                tier_hits.add_metric(key + [tier], n)
            for move, n in (s.get("kv_tier_bytes") or {}).items():
                tier_bytes.add_metric(key + move.split(">", 1), n)
            if s.get("kv_tier_blocks"):
                tier_corrupt.add_metric(key, s.get("kv_tier_corrupt", 0))
            for tier, n in (s.get("kv_tier_blocks") or {}).items():
                tier_blocks.add_metric(key + [tier], n)
            for field, family in counters.items():
                family.add_metric(key, s.get(field, 0))
            for field, family in gauges.items():
                family.add_metric(key, s.get(field, 0))
            kv_bytes.add_metric(key + ["sent"], s.get("kv_bytes_sent", 0))
            kv_bytes.add_metric(key + ["received"], s.get("kv_bytes_received", 0))
            kv_seconds.add_metric(key, s.get("kv_transfer_seconds", 0.0))
            kv_transfers.add_metric(key, s.get("kv_transfers", 0))
            local_prefills.add_metric(key, s.get("local_prefills", 0))
        yield from gauges.values()
        yield from counters.values()
        yield kv_bytes
        yield kv_seconds
        yield kv_transfers
        yield local_prefills
        yield from (tier_hits, tier_bytes, tier_corrupt, tier_blocks)
        yield from self._roles()

    def _roles(self):
        """The router's role changes and, with serve --planner auto, the planner's decisions."""
        changes = CounterMetricFamily("splitserve_role_changes", "Role changes by outcome "
                                      "(ok: taken; refused)", labels=["from", "to", "outcome"])
        counts: dict = {}
        for c in getattr(self.conductor, "role_changes", []):
            k = (c["from"], c["to"], "ok" if c["ok"] else "refused")
            counts[k] = counts.get(k, 0) + 1
        for k, n in counts.items():
            changes.add_metric(list(k), n)
        yield changes
        planner = getattr(self.conductor, "planner", None)
        if planner is None:
            return
        p = planner.planner
        decisions = CounterMetricFamily("splitserve_planner_decisions", "Online planner "
                                        "decisions (switch: it re-roled workers)", labels=["action"])
        decisions.add_metric(["switch"], p.switches)
        decisions.add_metric(["stay"], p.decided - p.switches)
        yield decisions
        predicted = GaugeMetricFamily("splitserve_planner_predicted_attainment", "The last "
                                      "decision's predicted SLO attainment per deployment",
                                      labels=["deployment"])
        last = p.decisions[-1] if p.decisions else None
        for name, v in (last.predicted.items() if last else ()):
            predicted.add_metric([name], v)
        yield predicted
        yield GaugeMetricFamily("splitserve_planner_step_time_scale", "The planner's calibration "
                                "of simulated step times to the measured TPOT", value=p.scale)
