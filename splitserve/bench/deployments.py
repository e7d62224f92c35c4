"""The deployments `bench compare` starts and `splitserve sim` simulates, defined once: the
names, their workers' roles and the engine settings that differ between them.

    pd             1 prefill + 1 decode, conditional local prefill (serve's default)
    pd-pure        1 prefill + 1 decode, every prefill on the prefill worker
    chunked        2 co-located engines, Sarathi-style chunks of `chunk` tokens
    prefill-first  2 co-located engines, whole prompts first (vLLM v0); the budget holds the
                   longest prompt
    colocated:N    N co-located engines (chunked, serve's default budget)
    P:D            P prefill + D decode workers (local prefill on)
    P:D:pure       the same, local prefill off
"""

from __future__ import annotations

from dataclasses import dataclass

NAMED = ("pd", "pd-pure", "chunked", "prefill-first")
# What every compared deployment shares: half of the KV pool serve's default gives a worker
# (two workers on a 24 GiB machine with room for the API server and the client).
KV_CACHE_GB = 0.5


@dataclass(frozen=True)
class DeploymentSpec:
    name: str
    prefill: int = 0
    decode: int = 0
    colocated: int = 0
    local_prefill: bool = True  # P/D only
    chunked_prefill: bool = True
    max_num_batched_tokens: int = 512  # serve's default

    @property
    def roles(self) -> list[str]:
        if self.colocated:
            return ["colocated"] * self.colocated
        return ["prefill"] * self.prefill + ["decode"] * self.decode

    def serve_flags(self) -> list[str]:
        """The `splitserve serve` flags that make this deployment."""
        if self.colocated:
            flags = ["--colocated", str(self.colocated)]
        else:
            flags = ["--prefill", str(self.prefill), "--decode", str(self.decode)]
            if not self.local_prefill:
                flags += ["--local-prefill", "off"]
        flags += ["--max-num-batched-tokens", str(self.max_num_batched_tokens)]
        if not self.chunked_prefill:
            flags.append("--no-chunked-prefill")
        return flags


def parse_deployment(name: str, chunk: int = 256, max_input: int = 4096) -> DeploymentSpec:
    """A deployment by name (see the module docstring). `chunk`: the co-located engines'
    budget; `max_input`: the longest prompt (prefill-first's budget holds it)."""
    if name in ("pd", "pd-pure"):
        return DeploymentSpec(name, prefill=1, decode=1, local_prefill=name == "pd")
    if name == "chunked":
        return DeploymentSpec(name, colocated=2, max_num_batched_tokens=chunk)
    if name == "prefill-first":
        return DeploymentSpec(name, colocated=2, chunked_prefill=False,
                              max_num_batched_tokens=max(max_input, chunk))
    parts = name.split(":")
    try:
        if parts[0] == "colocated" and len(parts) == 2:
            n = int(parts[1])
            if n >= 1:
                return DeploymentSpec(name, colocated=n)
        elif len(parts) in (2, 3) and parts[0].isdigit() and parts[1].isdigit():
            p, d = int(parts[0]), int(parts[1])
            pure = len(parts) == 3
            if p >= 1 and d >= 1 and (not pure or parts[2] == "pure"):
                return DeploymentSpec(name, prefill=p, decode=d, local_prefill=not pure)
    except ValueError:
        pass
    raise ValueError(f"unknown deployment {name!r}: use one of {', '.join(NAMED)}, "
                     "colocated:N, P:D or P:D:pure (e.g. 2:3)")
