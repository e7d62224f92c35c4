"""Fault injection for the reliability tests: SPLITSERVE_FAULTS makes a worker misbehave on
purpose, on requests that carry a marker token, so a test can aim a fault at one request.

    SPLITSERVE_FAULTS="step_error:TOKEN"   a step raises inside its forward when it computes
                                           a request's tokens up to or past the first place
                                           token id TOKEN stands in its prompt (so a marker
                                           mid-prompt fails a later chunk of a chunked prefill,
                                           after the earlier chunks ran; any decode step of
                                           that request fails too)
    SPLITSERVE_FAULTS="step_error:TOKEN@ROLE"   the same, only on workers of that role

Several faults are separated by commas. Unset (the default), nothing is installed and the
forward runs untouched."""

from __future__ import annotations

import os

from splitserve.errors import SplitServeError

ENV = "SPLITSERVE_FAULTS"


class InjectedFault(RuntimeError):
    """Raised by an injected fault (never by real code)."""


def parse(spec: str) -> list[tuple[str, int, str | None]]:
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        kind, _, arg = item.partition(":")
        arg, _, role = arg.partition("@")
        if kind != "step_error" or not arg.lstrip("-").isdigit():
            raise SplitServeError(f"{ENV}: cannot read {item!r} (expected step_error:TOKEN[@ROLE])")
        out.append((kind, int(arg), role or None))
    return out


def install(engine, role: str) -> None:
    """Hook the faults named in the environment into `engine` (an LLMEngine) of a worker."""
    poison = {tok for _, tok, r in parse(os.environ.get(ENV, "")) if r in (None, role)}
    if not poison:
        return

    def before_forward(out) -> None:
        for ch in out.chunks:
            prompt = ch.request.prompt_token_ids
            at = min((prompt.index(t) for t in poison if t in prompt), default=None)
            if at is not None and ch.start + ch.num_new_tokens > at:
                raise InjectedFault(f"injected step error ({ch.request.request_id})")

    engine.before_forward = before_forward
