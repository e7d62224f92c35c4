"""Changing a worker's role while the server runs: what it must finish first.

Plain rules over plain data (no sockets, no clock), read by the router (RouterState: when is a
draining worker ready to flip) and by the worker (is what it holds carried by the new role).

A worker keeps everything its new role can carry on and finishes the rest before it flips:

    from \\ to   colocated        prefill        decode
    colocated   -                everything     nothing (a decode worker runs whole requests)
    prefill     everything       -              everything
    decode      hand-overs       everything     -

    "hand-overs": the prompts reserved there whose KV a prefill worker has not finished
    writing (a co-located worker has no data plane to receive them); its decodes carry on.
    "everything": a prefill worker cannot decode, and a prefill leg lives until the decode
    worker admits it.

While it drains, the router routes nothing new to it. The flip itself is epoch-fenced: the
worker answers under a new epoch, and the router takes the new role with that epoch, so a
message sent under the old role (before the flip, arriving late) is told apart from one sent
under the new one.
"""

from __future__ import annotations

ROLES = ("colocated", "prefill", "decode")
NOTHING, HANDOVERS, EVERYTHING = "nothing", "hand-overs", "everything"


def must_finish(old: str, new: str) -> str:
    """What a worker of role `old` finishes before it becomes `new`."""
    for r in (old, new):
        if r not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {r!r}")
    if old == new or (old, new) == ("colocated", "decode"):
        return NOTHING
    if (old, new) == ("decode", "colocated"):
        return HANDOVERS
    return EVERYTHING


def blocker(old: str, new: str, *, requests: int, handovers: int) -> str | None:
    """Why a worker of role `old` holding `requests` (every request or leg it holds) of which
    `handovers` are hand-overs not yet admitted cannot become `new` now; None when it can."""
    what = must_finish(old, new)
    if what == EVERYTHING and requests:
        return f"it holds {requests} request(s) a {new} worker cannot carry on"
    if what == HANDOVERS and handovers:
        return f"{handovers} hand-over(s) to it are still being written"
    return None
