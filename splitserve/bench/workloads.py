"""Benchmark workloads: what to send and when, as plain data (seeded, no network, no clock).

A workload is a list of `RequestSpec`. Three sources:
    synthetic   `synthetic("chat" | "code" | "summarization", n, seed)`: lengths drawn from a
                fitted distribution, prompts of random token ids; every arrival at 0
    real text   `humaneval(path)`: the 164 HumanEval prompts; every arrival at 0
    traces      `mooncake(path)`, `azure(path)`: lengths and arrival times from a production
                trace, scaled by stated factors and capped to fit the model
Arrival times are then either replaced, for a rate sweep (`at_rate`: Poisson, or gamma with a
coefficient of variation for burstiness), or kept, for trace replay.

Token-id prompts are drawn from `vocab = (lo, hi)`: ids below 100 are special tokens in the
default model's 49152-token vocabulary, and a random prompt must not contain an end-of-text or
chat-template token.

A file that cannot be read as its format (missing, not JSON, a field or column missing, a count
that is not a whole number, a bad timestamp) raises WorkloadError naming the file and the line.
Any of the files may be gzip-compressed.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import json
import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import islice

import numpy as np

from splitserve.errors import SplitServeError

DEFAULT_VOCAB = (100, 49152)
# HumanEval prompts average 450.6 characters and ~131 tokens (../shared/data/README.md): used to
# estimate the length of a text prompt when no tokenizer is given.
CHARS_PER_TOKEN = 3.44


class WorkloadError(SplitServeError, ValueError):
    """A workload cannot be built from what was given: the message names the file and line."""


@dataclass(frozen=True)
class RequestSpec:
    """One request to send. `prompt` is text or token ids (the server accepts either);
    `input_len` is its length in tokens (estimated for text when meta["input_len_estimated"]);
    `output_len` is sent as max_tokens with ignore_eos, so the server generates exactly that."""

    arrival_s: float
    prompt: str | list[int]
    input_len: int
    output_len: int
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Caps:
    """Fit requests to the model and the machine. The output is capped first, then the input
    keeps what is left of the context: max_input <= max_model_len - output."""

    max_input: int = 8192
    max_output: int = 8192
    max_model_len: int = 8192

    def fit(self, input_len: int, output_len: int) -> tuple[int, int]:
        out = max(1, min(output_len, self.max_output, self.max_model_len - 1))
        inp = max(1, min(input_len, self.max_input, self.max_model_len - out))
        return inp, out


@dataclass(frozen=True)
class LengthDist:
    """A lognormal length, clipped to [lo, hi]: exp(N(mu, sigma)). mu and sigma are the mean and
    standard deviation of log(length) over the source data, so median = exp(mu)."""

    mu: float
    sigma: float
    lo: int
    hi: int

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        x = np.rint(rng.lognormal(self.mu, self.sigma, n))
        return np.clip(x, self.lo, self.hi).astype(np.int64)


@dataclass(frozen=True)
class SyntheticWorkload:
    input: LengthDist
    output: LengthDist
    source: str


# Fits of log(length) (mean mu, std sigma) to the data in ../shared/data, clipped to the range
# seen there, so every number can be recomputed from a file. ShareGPT itself (DistServe's chat
# set) is not among the files; the closest real chat lengths at hand are Azure's production
# conversation trace (Splitwise), which has longer prompts (mean 1155 vs ShareGPT's 161) and
# shorter answers (211 vs 338; ShareGPT means from the vLLM paper, Fig. 11). A lognormal keeps the
# means but not every quantile (chat's median prompt comes out ~740, the trace's is 1020): replay
# the trace itself (`azure`) where the exact shape matters, or pass your own LengthDist.
WORKLOADS = {
    "chat": SyntheticWorkload(
        LengthDist(6.633, 0.985, 2, 14050), LengthDist(5.019, 0.859, 7, 1000),
        "AzureLLMInferenceTrace_conv.csv (19,366 requests): in p50 1020, out p50 129"),
    # HumanEval: 131 tokens in / 54 out on average (README); sigma from the spread of character
    # lengths (a proportional change of unit leaves sigma alone), mu = log(mean) - sigma^2 / 2.
    "code": SyntheticWorkload(
        LengthDist(4.755, 0.489, 30, 400), LengthDist(3.660, 0.811, 4, 260),
        "HumanEval.jsonl.gz (164 problems): prompt and canonical-solution lengths"),
    # The arxiv set is left-skewed (filtered at 4096 tokens): the lognormal overweights short
    # prompts. `summarization(n, seed, csv_path=...)` samples the real pairs instead.
    # Scaled to this project's CPU machines (a 135M model, ~640 prompt tok/s and ~13 ms per
    # decode step per core): where the phases' interference decides goodput. prefill-heavy:
    # summarisation-like (prompt median 768, output median 48); decode-heavy: chat answers to
    # short questions (prompt median 96, output median 192).
    "prefill-heavy": SyntheticWorkload(
        LengthDist(6.644, 0.35, 384, 1536), LengthDist(3.871, 0.35, 24, 96),
        "scaled: prompt median 768 (384-1536), output median 48 (24-96)"),
    "decode-heavy": SyntheticWorkload(
        LengthDist(4.564, 0.5, 32, 384), LengthDist(5.257, 0.35, 96, 384),
        "scaled: prompt median 96 (32-384), output median 192 (96-384)"),
    "summarization": SyntheticWorkload(
        LengthDist(7.717, 0.755, 1, 4054), LengthDist(5.187, 0.796, 5, 4056),
        "arxiv_summarization_stats_llama2_tokenizer_filtered_v2.csv (28,257 documents)"),
}


def random_tokens(rng: np.random.Generator, n: int, vocab: tuple[int, int]) -> list[int]:
    return rng.integers(vocab[0], vocab[1], n).tolist()


def _from_lengths(name: str, lengths, seed: int, vocab, caps: Caps, **meta) -> list[RequestSpec]:
    rng = np.random.default_rng([seed, 1])  # prompts apart from the length draws
    specs = []
    for i, (inp, out) in enumerate(lengths):
        inp, out = caps.fit(int(inp), int(out))
        specs.append(RequestSpec(0.0, random_tokens(rng, inp, vocab), inp, out,
                                 {"workload": name, "index": i, **meta}))
    return specs


def synthetic(name: str, n: int, seed: int = 0, vocab: tuple[int, int] = DEFAULT_VOCAB,
              caps: Caps = Caps(), dist: SyntheticWorkload | None = None,
              length_scale: float = 1.0) -> list[RequestSpec]:
    """n requests of the named workload (or `dist`), all arriving at 0: apply `at_rate` next.
    `length_scale` multiplies both lengths (the same draws: the shape stays, the size moves),
    to size a workload to a slower or faster machine."""
    if dist is None and name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}: choose one of {sorted(WORKLOADS)}")
    w = dist or WORKLOADS[name]
    rng = np.random.default_rng([seed, 0])
    lengths = zip(w.input.sample(rng, n), w.output.sample(rng, n))
    if length_scale != 1.0:
        lengths = ((max(1, round(i * length_scale)), max(1, round(o * length_scale)))
                   for i, o in lengths)
    return _from_lengths(name, lengths, seed, vocab, caps, length_scale=length_scale)


def summarization(n: int, seed: int = 0, csv_path: str | None = None,
                  vocab: tuple[int, int] = DEFAULT_VOCAB, caps: Caps = Caps()) -> list[RequestSpec]:
    """Long prompts: (prompt, decode) token-count pairs sampled with replacement from vidur's arxiv
    CSV when its path is given, else the lognormal fit."""
    if csv_path is None:
        return synthetic("summarization", n, seed, vocab, caps)
    cols = ("num_prefill_tokens", "num_decode_tokens")
    pairs = [tuple(_count(csv_path, line, r, c) for c in cols)
             for line, r in _csv_rows(csv_path, cols)]
    if not pairs:
        raise WorkloadError(f"{csv_path}: no rows under the header")
    picks = np.random.default_rng([seed, 0]).integers(0, len(pairs), n)
    return _from_lengths("summarization", (pairs[i] for i in picks), seed, vocab, caps,
                         source=csv_path)


def humaneval(path: str, output_len: int | None = None, tokenize=None, limit: int | None = None,
              caps: Caps = Caps()) -> list[RequestSpec]:
    """HumanEval's real prompts, as text. The output length is `output_len` if given, else the
    canonical solution's length. Lengths are counted by `tokenize(text) -> ids` when given, else
    estimated at CHARS_PER_TOKEN (meta["input_len_estimated"] says so)."""
    def count(text: str) -> int:
        return len(tokenize(text)) if tokenize else max(1, round(len(text) / CHARS_PER_TOKEN))

    fields = {"task_id": _TEXT, "prompt": _TEXT, "canonical_solution": _TEXT}
    rows = [r for _, r in islice(_jsonl_rows(path, fields), limit)]
    specs = []
    for i, r in enumerate(rows):
        inp, out = caps.fit(count(r["prompt"]), output_len or count(r["canonical_solution"]))
        specs.append(RequestSpec(0.0, r["prompt"], inp, out,
                                 {"workload": "humaneval", "index": i, "task_id": r["task_id"],
                                  "input_len_estimated": tokenize is None}))
    return specs


def block_tokens_for(hash_id: int, n: int, seed: int, vocab: tuple[int, int]) -> list[int]:
    """The tokens of one trace block: a function of (seed, hash_id) only, so requests naming the
    same id share the same tokens and the server's prefix cache sees the trace's real reuse."""
    return random_tokens(np.random.default_rng([seed, hash_id]), n, vocab)


def mooncake(path: str, length_scale: float = 1.0, time_scale: float = 1.0,
             block_tokens: int = 512, caps: Caps = Caps(), limit: int | None = None,
             seed: int = 0, vocab: tuple[int, int] = DEFAULT_VOCAB) -> list[RequestSpec]:
    """Replay a Mooncake trace (JSONL: timestamp ms, input_length, output_length, hash_ids).

    Lengths are multiplied by `length_scale`, and the block with them: b = round(512 * scale).
    Block k of a request holds tokens [k*b, (k+1)*b) of its prompt, derived from hash_ids[k]:
        | hash_ids[0] | hash_ids[1] | ... | hash_ids[-1] (cut) |
        0             b             2b    ^ scaled input length (at most len(hash_ids) * b)
    A cap cuts the prompt at the same place, keeping its prefix (and so its reuse). Arrival gaps
    are multiplied by `time_scale` (> 1 stretches the trace: a lower rate)."""
    b = max(1, round(block_tokens * length_scale))
    blocks: dict[int, list[int]] = {}  # a third of the trace's blocks repeat: draw each once
    specs = []
    fields = {"timestamp": _TIME_MS, "input_length": _COUNT, "output_length": _COUNT,
              "hash_ids": _IDS}
    for _, r in islice(_jsonl_rows(path, fields), limit):  # nothing past `limit` is read
        ids = r["hash_ids"]
        want = min(round(r["input_length"] * length_scale), len(ids) * b)
        inp, out = caps.fit(want, round(r["output_length"] * length_scale))
        prompt: list[int] = []
        for h in ids[:math.ceil(inp / b)]:
            if h not in blocks:
                blocks[h] = block_tokens_for(h, b, seed, vocab)
            prompt += blocks[h]
        specs.append(RequestSpec(r["timestamp"] / 1000.0, prompt[:inp], inp, out,
                                 {"workload": "mooncake", "index": len(specs),
                                  "hash_ids": ids[:math.ceil(inp / b)]}))
    return _rebase(specs, time_scale)


def azure(path: str, length_scale: float = 1.0, time_scale: float = 1.0, caps: Caps = Caps(),
          limit: int | None = None, seed: int = 0,
          vocab: tuple[int, int] = DEFAULT_VOCAB) -> list[RequestSpec]:
    """Replay an Azure LLM inference trace (CSV: TIMESTAMP, ContextTokens, GeneratedTokens).
    The trace says nothing of shared prefixes, so every prompt is fresh random tokens."""
    rng = np.random.default_rng([seed, 2])
    specs = []
    for line, r in islice(_csv_rows(path, ("TIMESTAMP", "ContextTokens", "GeneratedTokens")),
                          limit):
        t = _timestamp(path, line, r["TIMESTAMP"])
        inp, out = caps.fit(round(_count(path, line, r, "ContextTokens") * length_scale),
                            round(_count(path, line, r, "GeneratedTokens") * length_scale))
        specs.append(RequestSpec(t, random_tokens(rng, inp, vocab), inp, out,
                                 {"workload": "azure", "index": len(specs)}))
    return _rebase(specs, time_scale)


def _rebase(specs: list[RequestSpec], time_scale: float) -> list[RequestSpec]:
    """Trace times -> seconds from the first request, gaps multiplied by time_scale."""
    if not specs:
        return specs
    t0 = min(s.arrival_s for s in specs)
    return [dataclasses.replace(s, arrival_s=(s.arrival_s - t0) * time_scale) for s in specs]


# -- reading workload files: every failure names the file and the line --------------------------
def _lines(path: str) -> Iterator[tuple[int, str]]:
    """(line number from 1, text) of a UTF-8 file, gunzipped if it starts with gzip's magic.
    Lines are decoded one by one so that a decoding error knows its line."""
    try:
        with open(path, "rb") as f:
            gz = f.read(2) == b"\x1f\x8b"
    except OSError as e:
        raise WorkloadError(f"{path}: cannot be opened ({e.strerror or e})") from None
    n = 0
    try:
        with gzip.open(path, "rb") if gz else open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                yield n, raw.decode("utf-8-sig" if n == 1 else "utf-8")  # -sig: Excel's BOM
    except UnicodeDecodeError as e:
        raise WorkloadError(f"{path}, line {n}: not UTF-8 text (byte {e.object[e.start]:#x} "
                            f"at column {e.start + 1})") from None
    except (OSError, EOFError, zlib.error) as e:
        raise WorkloadError(f"{path}, line {n + 1}: cannot be read ({e})") from None


def _show(v) -> str:
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


# (check, what it should be) for a JSONL field
_COUNT = (lambda v: type(v) is int and v >= 0, "a whole number >= 0")
_TIME_MS = (lambda v: type(v) in (int, float) and math.isfinite(v), "a number (ms)")
_TEXT = (lambda v: isinstance(v, str), "a string")
_IDS = (lambda v: isinstance(v, list) and all(type(h) is int for h in v), "a list of integers")


def _jsonl_rows(path: str, fields: dict) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line, each checked to have `fields`."""
    for n, text in _lines(path):
        if not text.strip():
            continue
        try:
            r = json.loads(text)
        except json.JSONDecodeError as e:
            raise WorkloadError(f"{path}, line {n}: not JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(r, dict):
            raise WorkloadError(f"{path}, line {n}: not a JSON object")
        for key, (ok, want) in fields.items():
            if key not in r:
                raise WorkloadError(f"{path}, line {n}: no {key!r} field")
            if not ok(r[key]):
                raise WorkloadError(f"{path}, line {n}: {key!r} is {_show(r[key])}, not {want}")
        yield n, r


def _csv_rows(path: str, columns: tuple[str, ...]) -> Iterator[tuple[int, dict]]:
    """(line number, row) for every row of a CSV file whose header has `columns`."""
    reader = csv.DictReader(text for _, text in _lines(path))
    try:
        header = reader.fieldnames
        if not header:
            raise WorkloadError(f"{path}: empty, expected a header with {', '.join(columns)}")
        missing = [c for c in columns if c not in header]
        if missing:
            raise WorkloadError(f"{path}, line {reader.line_num}: no column {', '.join(missing)} "
                                f"(the header has {', '.join(header)})")
        for r in reader:
            yield reader.line_num, r
    except csv.Error as e:
        raise WorkloadError(f"{path}, line {reader.line_num}: not CSV ({e})") from None


def _count(path: str, line: int, row: dict, column: str) -> int:
    v = row.get(column)  # None when the row has fewer cells than the header
    try:
        if int(v) >= 0:
            return int(v)
    except (TypeError, ValueError):
        pass
    raise WorkloadError(f"{path}, line {line}: {column} is {_show(v)}, not a whole number >= 0")


def _timestamp(path: str, line: int, v: str | None) -> float:
    try:
        t = datetime.fromisoformat(v)
    except (TypeError, ValueError):
        raise WorkloadError(f"{path}, line {line}: TIMESTAMP is {_show(v)}, not an ISO 8601 date "
                            "and time such as 2023-11-16 18:15:46.680590") from None
    # a time without a zone is UTC: a local zone's daylight-saving change would bend the gaps
    return (t if t.tzinfo else t.replace(tzinfo=UTC)).timestamp()


# -- arrival processes ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Phase:
    workload: str  # a synthetic workload's name
    rate: float  # Poisson arrivals per second
    seconds: float

    @classmethod
    def parse(cls, text: str) -> Phase:
        """WORKLOAD:RATE:SECONDS, e.g. prefill-heavy:0.2:150."""
        parts = text.strip().split(":")
        try:
            name, rate, secs = parts[0], float(parts[1]), float(parts[2])
            if len(parts) != 3:
                raise ValueError
        except (ValueError, IndexError):
            raise ValueError(f"a phase is WORKLOAD:RATE:SECONDS (e.g. prefill-heavy:0.2:150), "
                             f"got {text!r}") from None
        if name not in WORKLOADS:
            raise ValueError(f"unknown workload {name!r} in phase {text!r}: choose one of "
                             f"{sorted(WORKLOADS)}")
        if not (rate > 0 and secs > 0 and math.isfinite(rate) and math.isfinite(secs)):
            raise ValueError(f"a phase's rate and seconds must be > 0, got {text!r}")
        return cls(name, rate, secs)


def phased(phases: list[Phase], seed: int = 0, vocab: tuple[int, int] = DEFAULT_VOCAB,
           caps: Caps = Caps()) -> list[RequestSpec]:
    """Traffic whose shape changes: each phase's Poisson arrivals at its rate for its seconds,
    one after the other, lengths drawn from its workload (seeded per phase: the same phase at
    the same place gives the same requests); meta["phase"] numbers them from 0."""
    specs, t0 = [], 0.0
    for k, ph in enumerate(phases):
        rng = np.random.default_rng([seed, 11, k])
        times, t = [], rng.exponential(1 / ph.rate)
        while t < ph.seconds:
            times.append(t0 + t)
            t += rng.exponential(1 / ph.rate)
        for s, at in zip(synthetic(ph.workload, len(times), seed * 1000 + k, vocab, caps), times):
            specs.append(dataclasses.replace(s, arrival_s=at, meta={**s.meta, "phase": k}))
        t0 += ph.seconds
    return specs


def ideal_hit_rate(specs: list[RequestSpec], block_size: int = 16) -> float | None:
    """The prefix-cache hit rate of an infinite cache over these requests in order: the
    share of prompt tokens in full blocks whose whole prefix an earlier prompt had (the last
    token is always computed, as the engine does). None when no prompt is token ids."""
    from splitserve.kv.hashing import block_hashes, root_hash

    root = root_hash("ideal", block_size)
    seen: set[bytes] = set()
    hit = total = 0
    for s in specs:
        if isinstance(s.prompt, str):
            continue
        hashes = block_hashes(s.prompt, block_size, root)
        k = 0
        while k < min(len(hashes), (len(s.prompt) - 1) // block_size) and hashes[k] in seen:
            k += 1
        hit += k * block_size
        total += len(s.prompt)
        seen.update(hashes)
    return hit / total if total else None


def gamma(rate: float, cv: float, n: int, seed: int = 0) -> list[float]:
    """n arrival times (s) with gamma inter-arrival gaps of mean 1/rate and coefficient of
    variation cv: shape 1/cv^2, scale cv^2/rate. cv = 1 is Poisson; cv > 1 is burstier. The
    first request arrives at 0."""
    if rate <= 0 or cv <= 0:
        raise ValueError(f"rate and cv must be positive, got rate={rate}, cv={cv}")
    gaps = np.random.default_rng([seed, 3]).gamma(1.0 / cv**2, cv**2 / rate, max(n - 1, 0))
    return np.concatenate([[0.0], np.cumsum(gaps)])[:n].tolist()


def poisson(rate: float, n: int, seed: int = 0) -> list[float]:
    """n Poisson arrivals at `rate` per second (exponential gaps); the first at 0."""
    return gamma(rate, 1.0, n, seed)


def at_rate(specs: list[RequestSpec], rate: float, cv: float = 1.0,
            seed: int = 0) -> list[RequestSpec]:
    """The same requests with their arrival times replaced, for a rate sweep. A trace replay keeps
    its own (scaled) times instead and never calls this."""
    times = gamma(rate, cv, len(specs), seed)
    return [dataclasses.replace(s, arrival_s=t) for s, t in zip(specs, times)]
