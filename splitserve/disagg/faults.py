"""Fault injection for the reliability tests: SPLITSERVE_FAULTS makes a worker misbehave on
purpose, on requests that carry a marker token, so a test can aim a fault at one request.

    SPLITSERVE_FAULTS="step_error:TOKEN"   a step raises inside its forward when it computes
                                           a request's tokens up to or past the first place
                                           token id TOKEN stands in its prompt (so a marker
                                           mid-prompt fails a later chunk of a chunked prefill,
                                           after the earlier chunks ran; any decode step of
                                           that request fails too)
    SPLITSERVE_FAULTS="step_error:TOKEN@ROLE"   the same, only on workers of that role
    SPLITSERVE_FAULTS="slow_prefill:MS@ROLE"   every step that computes prompt tokens takes
                                           MS milliseconds longer (a slow machine on any
                                           machine: tests that act mid-prefill need the
                                           prefill to last, and a fast CPU ends it at once)
    SPLITSERVE_FAULTS="exit_at_start@ROLE"     a worker of that role (every worker without
                                           @ROLE) exits with code 3 as soon as it starts,
                                           before loading the model: a crash loop, for
                                           serve's restart backoff

Several faults are separated by commas. Unset (the default), nothing is installed and the
forward runs untouched."""

from __future__ import annotations

import os
import sys
import time

from splitserve.errors import SplitServeError

ENV = "SPLITSERVE_FAULTS"


class InjectedFault(RuntimeError):
    """Raised by an injected fault (never by real code)."""


EXIT_AT_START_CODE = 3


def parse(spec: str) -> list[tuple[str, int, str | None]]:
    """(kind, token (0 for exit_at_start), role or None) per fault."""
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        head, _, role = item.partition("@")
        kind, _, arg = head.partition(":")
        if kind == "exit_at_start" and not arg:
            out.append((kind, 0, role or None))
            continue
        if kind not in ("step_error", "slow_prefill") or not arg.lstrip("-").isdigit():
            raise SplitServeError(f"{ENV}: cannot read {item!r} (expected step_error:TOKEN[@ROLE], "
                                  "slow_prefill:MS[@ROLE] or exit_at_start[@ROLE])")
        out.append((kind, int(arg), role or None))
    return out


def exit_at_start(role: str) -> None:
    """Exit the process at once when an exit_at_start fault names this role."""
    if any(k == "exit_at_start" and r in (None, role) for k, _, r in parse(os.environ.get(ENV, ""))):
        print(f"{ENV}: injected exit at start ({role} worker)", file=sys.stderr, flush=True)
        os._exit(EXIT_AT_START_CODE)


def install(engine, role: str) -> None:
    """Hook the faults named in the environment into `engine` (an LLMEngine) of a worker."""
    faults = [(k, arg) for k, arg, r in parse(os.environ.get(ENV, "")) if r in (None, role)]
    poison = {tok for k, tok in faults if k == "step_error"}
    slow_s = sum(ms for k, ms in faults if k == "slow_prefill") / 1000.0
    if not poison and not slow_s:
        return

    def before_forward(out) -> None:
        if slow_s and any(ch.start < ch.request.num_prompt_tokens for ch in out.chunks):
            time.sleep(slow_s)
        for ch in out.chunks:
            prompt = ch.request.prompt_token_ids
            at = min((prompt.index(t) for t in poison if t in prompt), default=None)
            if at is not None and ch.start + ch.num_new_tokens > at:
                raise InjectedFault(f"injected step error ({ch.request.request_id})")

    engine.before_forward = before_forward
