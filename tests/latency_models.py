"""Latency models the planner and simulator tests share."""

from __future__ import annotations


class CpuLike:
    """This machine's shape, roughly (tests/test_slack_chunks.py's): ~4 ms a prompt token, a
    chunk's own overhead, a lone decode 42 ms, a second one 12 ms more."""

    name = "cpu-like"
    model = None
    gpu = None
    tp = pp = 1

    def step_time(self, batch) -> float:
        return (0.030 + 0.0042 * batch.num_prefill_tokens + 0.010 * len(batch.prefill_tokens)
                + 0.012 * batch.num_decodes)

    def describe(self) -> str:
        return self.name
