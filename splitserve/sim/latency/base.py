"""What every latency model answers: how long one engine step takes, from the batch's shape.

A step runs, for each scheduled request, either a prompt chunk or one decode token:

    prompt chunk i:  tokens [prefill_context[i], prefill_context[i] + prefill_tokens[i]) of its
                     sequence; the KV of [0, prefill_context[i]) is already cached (earlier
                     chunks, prefix-cache hits), so its attention reads that much more
    decode j:        one new token at position decode_context[j]; it attends to
                     decode_context[j] + 1 tokens (DistServe's "context + 1")

Plain Python, no torch and no clock: the simulator calls `step_time` once per simulated step.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Batch:
    prefill_tokens: tuple[int, ...] = ()  # new tokens of each prompt chunk
    prefill_context: tuple[int, ...] = ()  # tokens already in KV before each chunk
    decode_context: tuple[int, ...] = ()  # tokens already in KV before each decode token

    def __post_init__(self):
        if len(self.prefill_tokens) != len(self.prefill_context):
            raise ValueError("prefill_tokens and prefill_context must have one entry per chunk")

    @property
    def num_prefill_tokens(self) -> int:
        return sum(self.prefill_tokens)

    @property
    def num_decodes(self) -> int:
        return len(self.decode_context)

    @property
    def num_tokens(self) -> int:
        return self.num_prefill_tokens + self.num_decodes

    @property
    def is_empty(self) -> bool:
        return not self.prefill_tokens and not self.decode_context

    @classmethod
    def of(cls, out) -> Batch:
        """From a scheduler's SchedulerOutput: a chunk is a decode when it computes one token
        past the prompt (a recompute after preemption is a prompt chunk, however long)."""
        pt, pc, dc = [], [], []
        for ch in out.chunks:
            if ch.num_new_tokens == 1 and ch.start >= ch.request.num_prompt_tokens:
                dc.append(ch.start)
            else:
                pt.append(ch.num_new_tokens)
                pc.append(ch.start)
        return cls(tuple(pt), tuple(pc), tuple(dc))


class LatencyModel(ABC):
    """Seconds per engine step. Implementations are pure functions of the batch (and of what
    they were built from: a profile, a published fit, a hardware and model spec)."""

    name: str = "latency"
    # What the model is built from, where it knows (the simulator sizes KV pools and hand-over
    # bytes from them): a sim.models.ModelShape, a sim.hardware.GPUSpec, parallel degrees.
    model = None
    gpu = None
    tp: int = 1
    pp: int = 1

    @abstractmethod
    def step_time(self, batch: Batch) -> float:
        """Seconds one engine step with this batch takes (batch is never empty)."""

    def describe(self) -> str:
        """One line for reports: what the model is and what it was built from."""
        return self.name
