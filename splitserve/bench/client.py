"""`run_load`: the asynchronous load generator behind `splitserve bench serve`.

It sends each `RequestSpec` to any OpenAI-compatible server (splitserve, llama.cpp's
llama-server, vLLM) at the spec's arrival time, as a streaming `/v1/completions` request with
`max_tokens = output_len`, `ignore_eos` (so exactly that many tokens come back) and greedy
sampling, and timestamps every SSE event that carries text. Arrivals are open-loop: a request is
sent when it is due whatever is still in flight, as production traffic is; `concurrency` caps the
requests in flight instead (with every arrival at 0 that is a closed loop of that many users).

The client must not be the bottleneck it measures: events are decoded with msgspec, the
connection pool has no limit in open loop (a capped pool would queue requests inside httpx after
their send time, and the server's TTFT would absorb the client's queueing), and the process CPU
time the run used is returned next to the wall time, with how late each request was sent
(`send_lag`) in its record.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass

import httpx
import msgspec

from splitserve.bench.goodput import RequestRecord
from splitserve.bench.workloads import RequestSpec

PROGRESS_EVERY_S = 0.5


@dataclass
class LoadResult:
    records: list[RequestRecord]  # in the order of `specs`; times in s from the run's start
    wall_s: float
    client_cpu_s: float  # this process's CPU time over the run (all its threads)
    t0: float = 0.0  # the run's start on the monotonic clock (the records' zero), for lining
    # them up with what the server logged (SPLITSERVE_DECISION_LOG)


def completions_url(base_url: str) -> str:
    """`http://host:port` or `http://host:port/v1` -> the completions endpoint."""
    base = base_url.rstrip("/")
    return base + ("/completions" if base.endswith("/v1") else "/v1/completions")


def request_body(spec: RequestSpec, model: str, extra: dict | None = None) -> dict:
    body = {
        "model": model,
        "prompt": spec.prompt,
        "max_tokens": spec.output_len,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,  # a vLLM extension that splitserve and llama-server accept too
    }
    return body | (extra or {})


class _Progress:
    """Counts for the one-line progress indicator on stderr."""

    def __init__(self, total: int, t0: float):
        self.total, self.t0 = total, t0
        self.done = self.failed = self.in_flight = 0

    def line(self) -> str:
        return (f"\r[bench] {self.done}/{self.total} done, {self.failed} failed, "
                f"{self.in_flight} in flight, {time.perf_counter() - self.t0:6.1f} s")

    async def run(self) -> None:
        try:
            while True:
                sys.stderr.write(self.line())
                sys.stderr.flush()
                await asyncio.sleep(PROGRESS_EVERY_S)
        finally:
            sys.stderr.write(self.line() + "\n")
            sys.stderr.flush()


def _text(choice: dict) -> str:
    # completions carry `text`; a chat stream's `delta.content` is accepted as well
    return choice.get("text") or (choice.get("delta") or {}).get("content") or ""


def _error_message(body: bytes) -> str:
    try:
        err = msgspec.json.decode(body).get("error")
        return str(err.get("message", err) if isinstance(err, dict) else err)
    except Exception:
        return body[:200].decode("utf-8", "replace")


async def _send(client: httpx.AsyncClient, url: str, body: dict, spec: RequestSpec,
                t0: float, t_due: float, timeout_s: float, progress: _Progress) -> RequestRecord:
    times: list[float] = []
    usage_n = None
    error = None
    rejected = False
    progress.in_flight += 1
    t_sent = time.perf_counter()
    try:
        async with asyncio.timeout(timeout_s):
            async with client.stream("POST", url, json=body) as resp:
                if resp.status_code != 200:
                    error = f"HTTP {resp.status_code}: {_error_message(await resp.aread())}"
                    rejected = resp.status_code == 429  # admission control refused it
                else:
                    async for line in resp.aiter_lines():
                        # stamped before decoding: the client's own cost is not server latency
                        now = time.perf_counter()
                        if not line.startswith("data:"):
                            continue
                        data = line[5:].strip()
                        if data == "[DONE]":
                            break
                        event = msgspec.json.decode(data)
                        if not isinstance(event, dict):
                            error = f"malformed event: {data[:100]}"
                            break
                        if event.get("error"):
                            e = event["error"]
                            error = str(e.get("message", e) if isinstance(e, dict) else e)
                            break
                        if any(_text(c) for c in event.get("choices") or ()):
                            times.append(now - t0)
                        if event.get("usage"):
                            usage_n = event["usage"].get("completion_tokens")
    except TimeoutError:
        error = f"timed out after {timeout_s:g} s"
    except Exception as e:  # a broken server must fail its request, not the whole run
        error = f"{type(e).__name__}: {e}"
    t_done = time.perf_counter() - t0
    if error is None and not times:
        error = "the stream ended without any text"
    progress.in_flight -= 1
    progress.done += 1
    progress.failed += error is not None
    return RequestRecord(
        ok=error is None, t_due=t_due, t_sent=t_sent - t0, t_done=t_done, token_times=times,
        n_out=usage_n if usage_n is not None else len(times), input_len=spec.input_len,
        output_len=spec.output_len, error=error, meta=spec.meta, rejected=rejected)


async def run_load(base_url: str, specs: list[RequestSpec], model: str,
                   api_key: str | None = None, concurrency: int | None = None,
                   timeout_s: float = 600.0, progress: bool = True,
                   extra_body: dict | None = None) -> LoadResult:
    """Send every spec at its arrival time (s from now), at most `concurrency` in flight if
    given, and record each one's timings. Failed requests (HTTP status, error event, broken
    stream, `timeout_s` exceeded) come back as records with ok=False and the reason."""
    if concurrency is not None and concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    url = completions_url(base_url)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    gate = asyncio.Semaphore(concurrency) if concurrency else None
    records: list[RequestRecord | None] = [None] * len(specs)
    cpu0, t0 = time.process_time(), time.perf_counter()
    state = _Progress(len(specs), t0)

    async def one(client: httpx.AsyncClient, i: int) -> None:
        spec = specs[i]
        body = request_body(spec, model, extra_body)
        if gate is None:
            records[i] = await _send(client, url, body, spec, t0, spec.arrival_s, timeout_s, state)
        else:
            async with gate:
                records[i] = await _send(client, url, body, spec, t0, spec.arrival_s, timeout_s,
                                         state)

    async with httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(timeout_s),
                                 limits=limits) as client:
        ticker = asyncio.create_task(state.run()) if progress else None
        try:
            async with asyncio.TaskGroup() as tg:
                for i in sorted(range(len(specs)), key=lambda i: specs[i].arrival_s):
                    delay = t0 + specs[i].arrival_s - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    tg.create_task(one(client, i))
        finally:
            if ticker is not None:
                ticker.cancel()
                await asyncio.gather(ticker, return_exceptions=True)
    return LoadResult(records, time.perf_counter() - t0, time.process_time() - cpu0, t0)
