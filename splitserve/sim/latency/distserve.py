"""DistServe's published step-time fits for OPT on A100-80GB (SXM), times in ms.

Source: LLMServe/DistServe, simdistserve/estimators/profile_data/profiler-a100-80g.distserve.json
(coefficients below, every digit), applied as simdistserve/estimators/time_estimator.py applies
them to the lists simdistserve/base/worker.py builds:

    prefill  a + b·Σl + c·Σl²         l = each request's `current_prefill_lens` (the whole
                                       prompt: DistServe's disaggregated prefill never chunks);
                                       Σl² is a sum of per-request squares, not (Σl)²
    decode   a + b·Σ(ctx_i + 1) + c·B  ctx_i = `current_context_len` = prompt + tokens generated
                                       so far, the KV already cached; + 1 is the token being
                                       decoded (Batch.decode_context is that ctx). The
                                       "decoding_largebs" row is used when B >= 95
                                       (`decoding_large_small_bs_threshold`), else "smallbs"

Extensions for batches DistServe's disaggregated workers never run (our rules, not theirs):

    prompt chunk of l new tokens after s cached ones   quadratic term c·l·(s + l), equal to
        c·l² when s = 0. (DistServe's own chunked-prefill path keeps c·l², charging a late
        chunk of a long prompt as if it were a short prompt.)
    mixed step (chunks and decodes)   prefill time + the decodes' marginal terms
        b·Σ(ctx + 1) + c·B without the decode constant a (one forward pass, one launch
        overhead), with the row picked by B. (DistServe's chunked path charges decodes nothing.)

The fit alone is the default. DistServe's simulator adds two overheads of its own on top, which
`sim_overheads=True` reproduces:

    time_estimator.py  every prefill step + 1 ms per pipeline stage (`pp_const = 1 * pp`,
                       "TODO: Modulate the PP overhead"), even at pp = 1
    worker.py          on a pipeline's first worker, Ray: 2 ms + 1e-4 ms per context token
                       (Σ current_context_len: s + l per chunk, ctx per decode), both phases

so a 512-token OPT-13B tp1 prefill is 72.15 ms by the fit, 73.15 + 2.05 ms in their simulator.

Pipeline parallelism: their per-stage estimate is t/pp (+ pp ms for a prefill). A step here is
the whole forward pass through all pp stages (no micro-batching), so the fit's t is unchanged
and only the overheads grow with pp (prefill: pp stages × pp ms; Ray once).
"""

from __future__ import annotations

from dataclasses import dataclass

from splitserve.sim.hardware import GPUSpec, get_gpu
from splitserve.sim.latency.base import Batch, LatencyModel
from splitserve.sim.latency.roofline import kv_capacity_tokens
from splitserve.sim.models import ModelShape, get_model

LARGE_BATCH_THRESHOLD = 95


@dataclass(frozen=True, slots=True)
class DistServeFit:
    prefill: tuple[float, float, float]
    decode_small: tuple[float, float, float]  # batch < 95
    decode_large: tuple[float, float, float]  # batch >= 95


# (model, tp) -> fit; ms, every digit of the JSON: the rounded coefficients give 41.72 ms for
# OPT-13B tp1 decode of 32 at context 1,024 where DistServe's own simulator gives 41.73.
# OPT-66B tp3 is in their file too; it is not a layout anyone runs.
FITS: dict[tuple[str, int], DistServeFit] = {
    ("OPT-13B", 1): DistServeFit(
        (18.10254647486372, 0.1019122572698738, 7.122264314252114e-06),
        (19.934702624895458, 0.0006269356524350583, 0.03850697740828398),
        (7.1661889468253595, 0.0005798000403396046, 0.15831096191764046),
    ),
    ("OPT-13B", 2): DistServeFit(
        (14.742973695171262, 0.06857720739764, 2.4495727400243586e-06),
        (13.294796350285385, 0.00034109219700723494, 0.06296393225243659),
        (10.638741913126715, 0.00031183369638295723, 0.08562913604102729),
    ),
    ("OPT-13B", 4): DistServeFit(
        (12.062297033449054, 0.03808140082550695, 5.226249731787869e-07),
        (10.256231678259395, 0.00018786702316166354, 0.03269273629225551),
        (10.483514938375274, 0.00017120888562939117, 0.04566648525887034),
    ),
    ("OPT-66B", 2): DistServeFit(
        (43.05881348288936, 0.2742292870458432, 2.2478042467169447e-05),
        (48.288015489286245, 0.0009424343535737985, 0.12755020094383188),
        (28.727693993711597, 0.00047448475459061987, 0.29617792360743994),
    ),
    ("OPT-66B", 4): DistServeFit(
        (29.441636037717455, 0.151352180625198, 8.317450765979451e-06),
        (30.760284619429587, 0.000451947603788462, 0.063284195750671),
        (27.47082137429487, 0.0004046845541646486, 0.12480667738300383),
    ),
    ("OPT-66B", 8): DistServeFit(
        (25.490662375045222, 0.10659177664763161, 3.3910502518615973e-06),
        (23.15511135047022, 0.00022691488497826264, 0.04800638397272423),
        (21.71772781576609, 0.0003758089655762475, 0.08978614175851013),
    ),
}


class DistServeLatency(LatencyModel):
    name = "distserve"

    def __init__(self, model: str, tp: int = 1, pp: int = 1, sim_overheads: bool = False):
        self.model: ModelShape = get_model(model)
        key = (self.model.name, tp)
        if key not in FITS:
            have = ", ".join(f"{m} tp{t}" for m, t in FITS)
            raise ValueError(f"no DistServe fit for {self.model.name} tp{tp}; available: {have}")
        if pp < 1:
            raise ValueError(f"pp must be >= 1, got {pp}")
        self.fit = FITS[key]
        self.gpu: GPUSpec = get_gpu("A100-80GB")
        self.tp, self.pp = tp, pp
        self.sim_overheads = sim_overheads

    def decode_coefficients(self, batch_size: int) -> tuple[float, float, float]:
        if batch_size >= LARGE_BATCH_THRESHOLD:
            return self.fit.decode_large
        return self.fit.decode_small

    def step_ms(self, batch: Batch) -> float:
        chunks = list(zip(batch.prefill_tokens, batch.prefill_context))
        n = batch.num_decodes
        a_d, b_d, c_d = self.decode_coefficients(n)
        decodes = b_d * sum(ctx + 1 for ctx in batch.decode_context) + c_d * n
        if chunks:
            a, b, c = self.fit.prefill
            t = a + b * batch.num_prefill_tokens + c * sum(new * (s + new) for new, s in chunks)
            t += decodes
            if self.sim_overheads:
                t += self.pp * self.pp  # each of pp stages adds their pp_const = 1 ms x pp
        else:
            t = a_d + decodes
        if self.sim_overheads:
            t += 2 + 1e-4 * (sum(s + new for new, s in chunks) + sum(batch.decode_context))
        return t

    def kv_capacity_tokens(self, reserve_fraction: float = 0.1) -> int:
        """KV tokens the A100-80GB deployment holds beside the weights (fp16, as measured)."""
        return kv_capacity_tokens(self.model, self.gpu, self.tp, self.pp, 2, reserve_fraction)

    def step_time(self, batch: Batch) -> float:
        return self.step_ms(batch) / 1e3

    def describe(self) -> str:
        pp = f" pp{self.pp}" if self.pp > 1 else ""
        extra = " + DistServe simulator overheads" if self.sim_overheads else ""
        return f"distserve: {self.model.name} tp{self.tp}{pp} on A100-80GB (published fit){extra}"
