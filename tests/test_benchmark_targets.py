"""benchmarks/targets.py: the performance targets read from a results JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import results_json, summary, targets, tuning_sweep
from benchmarks.cases import sweep

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
CPU_TARGETS_RUN = RESULTS / "cpu-amd-epyc-20261121T162151Z.json"


@pytest.mark.parametrize("device_kind", ["cpu", "cuda"])
def test_targets_sweep_measures_every_target(device_kind):
    """`benchmarks.run --targets` must produce the rows every target reads."""
    cases = {(c.op, tuple(c.shape), c.dtype) for c in sweep(device_kind, "targets")}
    for t in targets.TARGETS:
        if t.device_kind == device_kind:
            for dtype in t.dtypes:
                assert (t.op, t.shape, dtype) in cases, (t.what, dtype)


def test_committed_cpu_run_meets_the_cpu_targets():
    results = json.loads(CPU_TARGETS_RUN.read_text())
    verdicts = targets.evaluate(results)
    assert len(verdicts) == 10 and all(v["met"] for v in verdicts)
    rows = {(r["op"], r["impl"], r["dtype"]): r for r in results["rows"]}
    ce = rows[("ce_fwd_bwd", "torchloss_fused", "bf16")]
    speedup = next(v for v in verdicts if v["dtype"] == "bf16" and "over eager" in v["target"])
    assert speedup["value"] == ce["speedup_vs_eager"]
    lm_ours = rows[("linear_ce_fwd_bwd", "torchloss_fused", "fp32")]
    lm_eager = rows[("linear_ce_fwd_bwd", "F.linear+F.cross_entropy (eager)", "fp32")]
    mem = next(v for v in verdicts if v["dtype"] == "fp32" and "peak extra / mat" in v["target"])
    assert mem["value"] == pytest.approx(lm_ours["peak_extra_bytes"] / lm_eager["peak_extra_bytes"])


def _row(op, impl, kind, shape, **figures):
    return {"op": op, "impl": impl, "impl_kind": kind, "dtype": "bf16", "shape": list(shape),
            "status": "ok", **figures}


def _gpu_results(pct_copy_bw=90.0, with_inplace=True):
    ce, lm = (16384, 128256), (16384, 4096, 128256)
    rows = [
        _row("ce_fwd_bwd", "torchloss_fused", "ours", ce, pct_copy_bw=pct_copy_bw,
             speedup_vs_eager=4.0, speedup_vs_compile=1.5, peak_extra_ratio=1.0,
             median_ms=3.0),
        _row("focal_fwd_bwd", "torchloss_fused", "ours", ce, median_ms=3.1),
        _row("focal_fwd_bwd", "torchloss_fused cross_entropy", "yardstick", ce, median_ms=2.9),
        _row("linear_ce_fwd_bwd", "torchloss_fused", "ours", lm, median_ms=110.0,
             peak_extra_bytes=5e8),
        _row("linear_ce_fwd_bwd", "F.linear+F.cross_entropy (eager)", "eager", lm,
             median_ms=150.0, peak_extra_bytes=1.2e10),
        _row("linear_ce_fwd_bwd", "3 matmuls alone (time floor, no loss)", "bound", lm,
             median_ms=100.0, peak_extra_bytes=3e9),
    ]
    if with_inplace:
        rows.append(_row("ce_fwd_bwd", "torchloss_fused inplace_backward", "ours", ce,
                         peak_extra_ratio=0.01, median_ms=2.9))
    return {"device": {"kind": "cuda", "name": "test GPU"}, "date": "d", "git": {"commit": "c"},
            "rows": rows}


def test_gpu_verdicts_met_missed_and_not_measured(tmp_path):
    verdicts = {v["target"]: v for v in targets.evaluate(_gpu_results())}
    assert len(verdicts) == 8 and all(v["met"] for v in verdicts.values())
    # (focal against the cross-entropy timed in turns with it, not the CE case's 3.0 ms)
    assert verdicts["focal fwd+bwd time / CE fwd+bwd time"]["value"] == pytest.approx(3.1 / 2.9)
    assert verdicts["linear CE time / the 3 matrix products'"]["value"] == pytest.approx(1.1)

    verdicts = {v["target"]: v for v in targets.evaluate(_gpu_results(84.9, False))}
    assert verdicts["CE fwd+bwd, % of copy bandwidth"]["met"] is False
    # The plain row must not be mistaken for the missing inplace_backward one.
    assert verdicts["CE fwd+bwd inplace_backward, peak extra / logits"]["met"] is None

    path = tmp_path / "r.json"
    path.write_text(json.dumps(_gpu_results(84.9)))
    assert targets.main([str(path)]) == 1
    path.write_text(json.dumps(_gpu_results(85.0)))
    assert targets.main([str(path)]) == 0
    # --ops: only those ops' targets, and one not measured counts as missed (the files come
    # first: --ops takes every word after it).
    ce_focal = ["--ops", "ce_fwd_bwd", "focal_fwd_bwd"]
    assert targets.main([str(path), *ce_focal]) == 0
    path.write_text(json.dumps(_gpu_results(85.0, with_inplace=False)))
    assert targets.main([str(path)]) == 0
    assert targets.main([str(path), *ce_focal]) == 1
    assert targets.main([str(path), "--ops", "ce_fwd"]) == 1  # no target of that op
    bad_lm = _gpu_results(85.0)
    next(r for r in bad_lm["rows"] if r["impl_kind"] == "bound")["median_ms"] = 10.0
    path.write_text(json.dumps(bad_lm))
    assert targets.main([str(path)]) == 1
    assert targets.main([str(path), *ce_focal]) == 0  # the missed one is linear CE's


def test_focal_ratio_needs_cross_entropy_timed_in_the_focal_case():
    """Results from before the yardstick row (the two ops timed apart, in their own cases)
    leave the focal/CE target not measured; a yardstick row that failed is a miss."""
    old = _gpu_results()
    old["rows"] = [r for r in old["rows"] if r["impl_kind"] != "yardstick"]
    verdicts = {v["target"]: v for v in targets.evaluate(old)}
    assert verdicts["focal fwd+bwd time / CE fwd+bwd time"]["met"] is None
    broken = _gpu_results()
    row = next(r for r in broken["rows"] if r["impl_kind"] == "yardstick")
    row.update(status="ERROR", median_ms=None, message="RuntimeError: boom")
    verdict = next(v for v in targets.evaluate(broken) if v["op"] == "focal_fwd_bwd")
    assert verdict["met"] is False and "boom" in verdict["note"]


def test_default_file_is_the_latest_benchmark_run(tmp_path, monkeypatch):
    """The latest run by the date it records, not by file time (a checkout's): a newer
    file of another benchmark (tensor_parallel's) is not taken for one."""
    import os

    older, newer = tmp_path / "cpu-x-1.json", tmp_path / "cpu-x-2.json"
    tp_file = tmp_path / "tp-cpu-x-3.json"
    older.write_text(json.dumps({"schema": results_json.SCHEMA, "date": "2026-12-04T10:00:00Z"}))
    newer.write_text(json.dumps({"schema": results_json.SCHEMA, "date": "2026-12-05T10:00:00Z"}))
    tp_file.write_text(json.dumps({"schema": "torchloss_fused-tp-benchmark",
                                   "date": "2026-12-06T10:00:00Z"}))
    os.utime(newer, (1, 1))  # (checked out first)
    monkeypatch.setattr(targets, "RESULTS_DIR", tmp_path)
    assert targets._newest_results() == newer


def test_scaled_loss_needs_a_timed_step(capsys):
    """benchmarks.scaled_loss's first three steps are untimed: fewer steps are an argparse
    error (exit 2), where min() of no step had raised a ValueError after the set-up."""
    from benchmarks import scaled_loss

    with pytest.raises(SystemExit) as exit_info:
        scaled_loss.main(["--steps", "3"])
    assert exit_info.value.code == 2 and "--steps" in capsys.readouterr().err


def test_tuning_sweep_table(tmp_path, capsys):
    """benchmarks.tuning_sweep: our ok rows of each run, tagged with its TLF_CUDA_TUNING,
    fastest first, relative to the default setting's row of the same implementation."""
    def row(impl, ms, kind="ours", status="ok"):
        return {"op": "ce_fwd_bwd", "dtype": "bf16", "shape": [16384, 128256], "impl": impl,
                "impl_kind": kind, "status": status, "median_ms": ms, "pct_copy_bw": 50.0}

    runs = {"a": ({}, [row("torchloss_fused", 4.0), row("eager", 9.0, kind="eager")]),
            "b": ({"TLF_CUDA_TUNING": "prefetch_kib=64"},
                  [row("torchloss_fused", 3.0), row("torchloss_fused inplace_backward", 1.0,
                                                    status="FAILED")]),
            "c": ({"TLF_CUDA_TUNING": ""}, [])}
    paths = []
    for name, (env, rows) in runs.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"software": {"env": env}, "rows": rows}))
        paths.append(path)
    assert tuning_sweep.main([str(p) for p in paths]) == 0
    lines = [ln.split() for ln in capsys.readouterr().out.splitlines()[2:]]
    assert [(ln[4], ln[5], ln[-1]) for ln in lines] == [("prefetch_kib=64", "3.000", "0.750x"),
                                                        ("default", "4.000", "1.000x")]
    assert tuning_sweep.main([str(paths[2])]) == 1


def test_tuning_sweep_best(tmp_path, capsys):
    """--best: the setting whose torchloss_fused row beats the default's by more than the
    margin, else nothing (also when the default did not run)."""
    def results(name, env, ms):
        path = tmp_path / f"{name}.json"
        row = {"op": "ce_fwd_bwd", "dtype": "bf16", "shape": [16384, 128256],
               "impl": "torchloss_fused", "impl_kind": "ours", "status": "ok",
               "median_ms": ms}
        path.write_text(json.dumps({"software": {"env": env}, "rows": [row]}))
        return str(path)

    default = results("d", {}, 4.0)
    fast = results("f", {"TLF_CUDA_TUNING": "bulk_load=1"}, 3.0)
    close = results("c", {"TLF_CUDA_TUNING": "prefetch_kib=64"}, 3.95)

    def best(*paths):
        assert tuning_sweep.main(["--best", "ce_fwd_bwd", *paths]) == 0
        return capsys.readouterr().out.strip()

    assert best(default, fast, close) == "bulk_load=1"
    assert best(default, close) == ""  # within the 2% margin
    assert best(fast, close) == ""  # no default to compare with
    assert best(default) == ""


def test_summary_lines(tmp_path, capsys):
    """benchmarks.summary: per case, our plain row's figures, the fastest peer that passed
    its check, and the in-place row's memory; a case whose row of ours failed is left out."""
    doc = _gpu_results()
    ce = (16384, 128256)
    doc["rows"] += [
        _row("ce_fwd_bwd", "peer_a", "peer", ce, median_ms=3.5),
        _row("ce_fwd_bwd", "peer_b", "peer", ce, median_ms=2.5),
        dict(_row("ce_fwd_bwd", "peer_c", "peer", ce, median_ms=1.0), status="FAILED"),
        dict(_row("ce_fwd_bwd", "torchloss_fused", "ours", (8, 8), median_ms=1.0),
             status="FAILED"),
    ]
    doc["rows"][0].update(median_ms=3.25, pct_copy_bw=86.4)
    assert summary.lines_of(doc, "ce_fwd_bwd") == [[
        "test GPU", "d c", "bf16", "16384x128256", "3.250", "86%", "4.00x", "1.50x",
        "peer_b 2.500", "1.00x", "0.01x"]]
    # Figures a run did not record are empty cells, not errors.
    assert summary.lines_of(doc, "focal_fwd_bwd") == [[
        "test GPU", "d c", "bf16", "16384x128256", "3.100"] + [""] * 6]

    path = tmp_path / "r.json"
    path.write_text(json.dumps(doc))
    assert summary.main([str(path)]) == 0
    assert "peer_b 2.500" in capsys.readouterr().out
    assert summary.main(["--op", "ce_fwd", str(path)]) == 1


H200_RUN = RESULTS / "cuda-nvidia-h200-20261204T182137Z.json"


@pytest.mark.parametrize("broken", ["ours", "eager", "implementation"])
def test_a_row_the_run_could_not_measure_is_a_miss(broken):
    """A target whose row failed (a kernel fault, an out-of-memory) is MISSED with the row's
    message, not 'not measured' (which passed without --ops), and a CUDA run whose loss ran
    on the fallback meets nothing."""
    results = json.loads(H200_RUN.read_text())
    figures = ("median_ms", "pct_copy_bw", "speedup_vs_eager", "speedup_vs_compile",
               "peak_extra_ratio", "peak_extra_bytes")
    for r in results["rows"]:
        if r["op"] != "ce_fwd_bwd" or tuple(r["shape"]) != (16384, 128256):
            continue
        if (broken == "ours" and r["impl_kind"] == "ours"
                and not r["impl"].endswith(targets.INPLACE)) or (
                broken == "eager" and r["impl_kind"] == "eager"):
            r.update({"status": "failed", "message": "an illegal memory access"},
                     **dict.fromkeys(figures))
            if broken == "eager":  # (our row's ratio to it goes too)
                for o in results["rows"]:
                    if o["op"] == "ce_fwd_bwd" and o["impl_kind"] == "ours":
                        o["speedup_vs_eager"] = None
    if broken == "implementation":
        results["ours"]["implementation"] = "reference"
    verdicts = {v["target"]: v for v in targets.evaluate(results)}
    over_eager = verdicts["CE fwd+bwd, speed-up over eager"]
    assert over_eager["met"] is False
    if broken != "implementation":
        assert "illegal memory access" in over_eager["note"]
        assert "illegal memory access" in targets.report(results, list(verdicts.values()))
    inplace = verdicts["CE fwd+bwd inplace_backward, peak extra / logits"]
    assert inplace["met"] is (broken == "ours" or broken == "eager")


def test_tuning_sweep_best_beyond_the_noise(tmp_path, capsys):
    """--best asks more than the margin where the default's own runs differ more (benchmark
    1 and the sweep's default run: the same setting minutes apart), and a winner whose
    lead is within the rows' interquartile ranges is none."""
    def results(name, env, ms, iqr=0.0):
        path = tmp_path / f"{name}.json"
        row = {"op": "ce_fwd_bwd", "dtype": "bf16", "shape": [16384, 128256],
               "impl": "torchloss_fused", "impl_kind": "ours", "status": "ok",
               "median_ms": ms, "iqr_ms": iqr}
        path.write_text(json.dumps({"software": {"env": env}, "rows": [row]}))
        return str(path)

    def best(*paths):
        assert tuning_sweep.main(["--best", "ce_fwd_bwd", *paths]) == 0
        return capsys.readouterr().out.strip()

    default, again = results("d", {}, 4.0), results("d2", {}, 4.3)
    five = results("f", {"TLF_CUDA_TUNING": "bulk_load=1"}, 3.8)  # 5% ahead
    assert best(default, five) == "bulk_load=1"
    assert best(default, five, again) == ""  # the default's runs differ by 7.5%
    assert best(default, five, results("d3", {}, 4.1)) == "bulk_load=1"
    wide = results("w", {"TLF_CUDA_TUNING": "prefetch_kib=64"}, 3.8, iqr=0.5)
    assert best(default, wide) == ""  # 0.2 ms ahead, within half its IQR of 0.5
