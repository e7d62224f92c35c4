"""The `fitted` latency model (sim/latency/fitted.py) and `splitserve profile` (sim/profile.py):
the fit recovers known coefficients, survives a JSON round trip, refuses bad files with the
path in the message, and a real quick profile of a tiny model fits its own steps."""

import argparse
import json
import os
import random

import pytest
import torch

from splitserve.sim.latency.base import Batch
from splitserve.sim.latency.fitted import (
    FEATURES,
    FittedLatency,
    Sample,
    fit,
    fit_report,
    load_fitted,
    load_samples,
)

# Roughly this machine's one-core numbers for SmolLM2-135M (BENCHMARKS.md), in seconds.
TRUE = {"step": 11e-3, "prefill_tokens": 1.5e-3, "prefill_attention": 4e-8, "chunks": 3e-3,
        "decodes": 2.0e-3, "decode_context": 2e-7, "row_tiles": 6e-3}


def grid_batches() -> list[Batch]:
    out = [Batch((n,), (0,)) for n in (16, 64, 256, 512)]
    out += [Batch((n,), (s,)) for s in (512, 1536) for n in (8, 128, 512)]
    out += [Batch(decode_context=(c,) * b) for b in (1, 4, 16, 64) for c in (64, 512, 2048)]
    out += [Batch((n,), (s,), (256,) * b) for b in (1, 8, 32) for n in (8, 128) for s in (0, 1024)]
    return out


def synthetic(noise: float, slow_every: int = 0, seed: int = 0) -> list[Sample]:
    """Three repeats per batch, each off by `noise` (relative, gaussian); with slow_every, every
    so many points get one repeat twice as slow (a step that lost its core)."""
    rng = random.Random(seed)
    truth = FittedLatency(TRUE)
    out = []
    for i, b in enumerate(grid_batches()):
        for r in range(3):
            t = truth.step_time(b) * (1 + rng.gauss(0, noise))
            if slow_every and i % slow_every == 0 and r == 1:
                t *= 2
            out.append(Sample(b, t, f"p{i}"))
    return out


def test_fit_recovers_known_coefficients():
    got = fit(synthetic(noise=0.005)).coefficients
    for f in FEATURES:
        assert got[f] == pytest.approx(TRUE[f], rel=0.1), f


def test_fit_ignores_the_odd_slow_step_and_stays_non_negative():
    """Each point's median time is fitted, so one slow repeat in three changes nothing; a
    feature the data do not need ends at 0, never below."""
    model = fit(synthetic(noise=0.005, slow_every=3))
    for f in FEATURES:
        assert model.coefficients[f] == pytest.approx(TRUE[f], rel=0.1), f
    report = fit_report(model, synthetic(noise=0.0))
    assert set(report) == {"prefill", "decode", "mixed"}
    assert all(r["max_abs_rel_err"] < 0.05 for r in report.values())
    no_attention = FittedLatency({**TRUE, "prefill_attention": 0.0, "decode_context": 0.0})
    samples = [Sample(b, no_attention.step_time(b) * (1 - 0.01 * (i % 3)), f"p{i}")
               for i, b in enumerate(grid_batches())]
    assert min(fit(samples).coef) >= 0.0


def test_a_step_that_lost_its_core_counts_its_cpu_time():
    """On a shared machine every repeat of a point may wait for its core: those steps (CPU
    time below 90 % of wall time) are fitted at their CPU time."""
    truth = FittedLatency(TRUE)
    samples = []
    for i, b in enumerate(grid_batches()):
        t = truth.step_time(b)
        for _ in range(3):
            samples.append(Sample(b, 2 * t, f"p{i}", cpu_seconds=t) if i % 2 else
                           Sample(b, t, f"p{i}", cpu_seconds=0.97 * t))
    assert samples[3].contended and not samples[0].contended
    for f, v in fit(samples).coefficients.items():
        assert v == pytest.approx(TRUE[f], rel=1e-6), f


def test_json_round_trip_gives_identical_step_times(tmp_path):
    model = fit(synthetic(noise=0.01), source="synthetic", info="known coefficients")
    again = FittedLatency.from_json(json.loads(json.dumps(model.to_json())))
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({"format": "splitserve-profile", "samples": [], "fit": model.to_json()}))
    loaded = load_fitted(str(path))
    for b in grid_batches():
        assert again.step_time(b) == model.step_time(b) == loaded.step_time(b)
    assert str(path) in loaded.describe() and "synthetic" in again.describe()


@pytest.mark.parametrize("content, problem", [
    (None, "no such profile file"),
    ("{not json", "not JSON"),
    ("[1, 2]", "not a splitserve profile"),
    ('{"fit": {"coefficients": {"step": 0.01}}}', "not a splitserve profile"),
    ('{"format": "splitserve-profile", "samples": []}', "no 'coefficients'"),
    ('{"format": "splitserve-profile", "fit": {"coefficients": {"step": -1}}}', ">= 0"),
    ('{"format": "splitserve-profile", "fit": {"coefficients": {"flops": 1}}}', "unknown latency features"),
])
def test_bad_profile_files_name_the_path_and_the_problem(tmp_path, content, problem):
    path = tmp_path / "p.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError) as e:
        load_fitted(str(path))
    assert str(path) in str(e.value) and problem in str(e.value)


def test_refit_of_a_bad_file_fails_with_a_message(tmp_path, capsys):
    from splitserve.sim.profile import main

    path = tmp_path / "samples.json"
    path.write_text('{"format": "splitserve-profile", "samples": [{"point": "x"}]}')
    with pytest.raises(ValueError, match="samples cannot be read"):
        load_samples(str(path))
    assert main(parse(["--refit", str(path)])) == 2
    assert str(path) in capsys.readouterr().err


def parse(argv):
    from splitserve.sim.profile import add_args

    p = argparse.ArgumentParser()
    add_args(p)
    return p.parse_args(argv)


def test_quick_profile_of_a_tiny_model_fits_its_own_steps(tmp_path, make_tiny, capsys):
    from splitserve.sim.profile import main

    model_dir = str(tmp_path / "tiny")
    make_tiny(model_dir, "llama")
    out = str(tmp_path / "profile.json")
    affinity, threads = os.sched_getaffinity(0), torch.get_num_threads()
    assert main(parse(["--model", model_dir, "--quick", "--kv-cache-gb", "0.05", "--out", out])) == 0
    assert os.sched_getaffinity(0) == affinity and torch.get_num_threads() == threads
    printed = capsys.readouterr().out
    assert "mean |err|" in printed and out in printed

    doc, samples = load_samples(out)
    assert doc["machine"]["threads"] == 1 and len(doc["machine"]["cores"]) == 1
    assert doc["engine"]["max_num_batched_tokens"] == 512 and doc["fit"]["coefficients"]
    kinds = {k for k in doc["fit"]["report"]}
    assert kinds == {"prefill", "decode", "mixed"}
    # prompts after a cached prefix ran as chunks with prior context, as the grid asked
    assert any(s.batch.prefill_context == (64,) and not s.batch.decode_context for s in samples)
    assert any(s.batch.prefill_context == (64,) and s.batch.num_decodes == 8 for s in samples)
    # A tiny model's steps are ~1 ms of Python and small ops, on a shared machine: the fit
    # must reproduce its own grid points' medians to 25 % on average per kind.
    for kind, r in doc["fit"]["report"].items():
        assert r["mean_abs_rel_err"] < 0.25, (kind, r)

    model = load_fitted(out)
    assert model.step_time(Batch(decode_context=(64,) * 16)) > model.step_time(Batch(decode_context=(64,)))
    median = {}
    for s in samples:
        median.setdefault(s.point, []).append(s.seconds)
    med = {k: sorted(v)[len(v) // 2] for k, v in median.items()}
    for ctx in (32, 128):
        assert med[f"decode B=16 ctx={ctx}"] > med[f"decode B=1 ctx={ctx}"]

    # --refit: the same samples give the same fit, written in place
    before = doc["fit"]["coefficients"]
    assert main(parse(["--refit", out])) == 0
    assert load_samples(out)[0]["fit"]["coefficients"] == before
