"""The benchmark harness itself (benchmarks/): bytes model, JSON schema, the correctness
gate, peak-memory measurement, and a tiny sweep end to end. No assertion is about speed."""

from __future__ import annotations

import copy
import gc
import json
import math
import os
import signal
import sys

import pytest
import torch
import torch.nn.functional as F

from benchmarks import bytes_model, memory, problems, report, results_json, run, runner, timing
from benchmarks.baselines import COMPILE, EAGER, OURS, OURS_COMPILED, Impl, impls_for
from benchmarks.cases import OPS, Case, sweep
from benchmarks.rows import ERROR, FAILED, OK, SKIPPED, Row

CPU = torch.device("cpu")
MiB = 2**20


@pytest.fixture(autouse=True, scope="module")
def _frozen_heap():
    """The harness runs gc.collect() around every row (its memory figures need it); under
    the suite that walks every object torch, dynamo and hypothesis hold, 0.2 s or more a
    call. Frozen, those survivors are left out of the walk; the harness's own garbage is
    still collected."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


# ---- bytes model ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case, expected",
    [
        # logits read + targets (int64) read
        (Case("ce_fwd", "bf16", (4096, 32000)), 4096 * 32000 * 2 + 4096 * 8),
        # logits read + gradient written + targets
        (Case("ce_fwd_bwd", "fp32", (4096, 32000)), 1_048_576_000 + 32_768),
        (Case("focal_fwd_bwd", "bf16", (16384, 1000)), 2 * 16384 * 1000 * 2 + 16384 * 8),
        # inputs + targets read, gradient written, all in the input dtype
        (Case("sigmoid_focal_fwd_bwd", "fp32", (131072, 80)), 125_829_120),
        # hidden + weight read, their gradients written, targets
        (Case("linear_ce_fwd_bwd", "bf16", (512, 256, 32000)),
         2 * (512 * 256 + 32000 * 256) * 2 + 512 * 8),
        # (N, C, H, W) logits, either layout: N*C*H*W elements read (and the gradient
        # written), N*H*W int64 targets
        (Case("ce_fwd", "bf16", (8, 21, 128, 128), "nchw"),
         8 * 21 * 128 * 128 * 2 + 8 * 128 * 128 * 8),
        (Case("ce_fwd_bwd", "fp32", (8, 21, 128, 128), "channels_last"),
         2 * 8 * 21 * 128 * 128 * 4 + 8 * 128 * 128 * 8),
        (Case("focal_fwd_bwd", "bf16", (8, 21, 128, 128), "nchw"),
         2 * 8 * 21 * 128 * 128 * 2 + 8 * 128 * 128 * 8),
    ],
)
def test_bytes_model(case, expected):
    assert bytes_model.bytes_moved(case) == expected


def test_bytes_model_logits_copy_and_rate():
    assert bytes_model.logits_bytes(Case("ce_fwd_bwd", "bf16", (4096, 32000))) == 262_144_000
    # linear CE: the logits a materialising implementation would hold
    assert bytes_model.logits_bytes(Case("linear_ce_fwd_bwd", "fp32", (8, 4, 10))) == 320
    assert bytes_model.logits_bytes(Case("ce_fwd", "fp32", (2, 3, 4, 5), "channels_last")) == 480
    assert bytes_model.copy_bytes_moved(256 * MiB) == 512 * MiB
    assert bytes_model.gb_per_s(3_000_000_000, 1.5) == pytest.approx(2.0)


# ---- sweep definitions ----------------------------------------------------------------------


def test_quick_sweep_holds_the_target_shape():
    cases = sweep("cpu", "quick")
    for dtype in ("fp32", "bf16"):
        assert Case("ce_fwd_bwd", dtype, (4096, 32000)) in cases


@pytest.mark.parametrize("device_kind", ["cpu", "cuda"])
def test_targets_sweep_is_the_target_shapes(device_kind):
    cases = sweep(device_kind, "targets")
    ce = (16384, 128256) if device_kind == "cuda" else (4096, 32000)
    linear = (16384, 4096, 128256) if device_kind == "cuda" else (4096, 1024, 32000)
    assert Case("ce_fwd_bwd", "bf16", ce) in cases and Case("focal_fwd_bwd", "bf16", ce) in cases
    assert Case("linear_ce_fwd_bwd", "bf16", linear) in cases
    # every op with a performance target; the soft-target linear CE has none
    assert {c.op for c in cases} == set(OPS) - {"linear_ce_soft_fwd_bwd"}


@pytest.mark.parametrize("size", ["tiny", "quick", "full"])
def test_soft_target_linear_ce_is_swept_beside_the_index_one(size):
    for kind in ("cpu", "cuda"):
        cases = sweep(kind, size)
        soft = {c.shape for c in cases if c.op == "linear_ce_soft_fwd_bwd"}
        index = {c.shape for c in cases if c.op == "linear_ce_fwd_bwd"}
        assert soft and soft <= index


def test_full_gpu_sweep_holds_large_vocab_bf16():
    assert Case("ce_fwd_bwd", "bf16", (16384, 128256)) in sweep("cuda", "full")


def test_input_rotation_only_when_data_fits_in_cache():
    llc = 32 * MiB
    assert runner.input_sets_for(Case("ce_fwd_bwd", "fp32", (4096, 32000)), llc) == 1
    small = runner.input_sets_for(Case("ce_fwd_bwd", "fp32", (1024, 1000)), llc)
    assert small > 1 and small * 1024 * 1000 * 4 >= min(runner.MAX_INPUT_SETS * 1024 * 1000 * 4,
                                                       runner.CACHE_MULTIPLE * llc)


def test_restoring_step_flushes_only_where_the_rotation_leaves_the_cache():
    """An in-place row's step finds its inputs where the other rows' steps find theirs: out
    of the cache for a large case, in it for a tiny one whose rotation MAX_INPUT_SETS caps."""
    llc = 32 * MiB
    large, tiny = Case("ce_fwd_bwd", "fp32", (4096, 32000)), Case("ce_fwd_bwd", "fp32", (64, 1000))
    assert runner.rotation_leaves_cache(large, llc)
    assert runner.rotation_leaves_cache(Case("ce_fwd_bwd", "fp32", (1024, 8192)), llc)
    assert not runner.rotation_leaves_cache(tiny, llc)
    sets = [problems.make_inputs(Case("ce_fwd_bwd", "fp32", (4, 8)), CPU, k) for k in range(2)]
    zeroed = []
    for flush in (True, False):
        step = runner.RestoringStep(lambda x, t: x.sum(), sets, True, 2**16, CPU, flush=flush)
        step.dirty.add(0)
        if flush:
            step._scratch.fill_(1.0)
        step.between()
        zeroed.append(flush and bool((step._scratch == 0).all()))
    assert zeroed == [True, False]


# ---- correctness gate -----------------------------------------------------------------------


class _DoubledGrad(torch.autograd.Function):
    """Right forward value, gradient twice too large."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return 2 * g


def _context():
    return runner.Context(CPU, timing.Settings(min_run_time=0.0, min_runs=2, warmup=2),
                          llc_bytes=MiB, copy_gb_per_s=10.0, memory_method=memory.cpu_method())


def _impl(name, fn, kind=OURS):
    return Impl(name, kind, lambda: fn)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_wrong_implementations_are_marked_failed(dtype):
    case = Case("ce_fwd_bwd", dtype, (64, 500))
    impls = [
        _impl("right", F.cross_entropy, EAGER),
        _impl("wrong value", lambda x, y: F.cross_entropy(x, y) * 1.05),
        _impl("label smoothing", lambda x, y: F.cross_entropy(x, y, label_smoothing=0.1)),
        _impl("wrong grad", lambda x, y: F.cross_entropy(_DoubledGrad.apply(x), y)),
        _impl("no off-target grad",
              lambda x, y: F.cross_entropy(x.detach(), y) - x.gather(1, y[:, None]).mean()
              + x.gather(1, y[:, None]).detach().mean()),
        _impl("nan", lambda x, y: F.cross_entropy(x, y) * float("nan")),
    ]
    rows = {r.impl: r for r in runner.run_case(case, impls, _context())}
    assert rows["right"].status == OK and rows["right"].median_ms > 0
    for name in ("wrong value", "label smoothing", "wrong grad", "no off-target grad", "nan"):
        row = rows[name]
        assert row.status == FAILED, (name, row.check)
        assert row.median_ms is None and row.gb_per_s is None and row.speedup_vs_eager is None
        assert row.check["ok"] is False and row.message
    assert "grad err" in rows["wrong grad"].message
    assert "loss err" not in rows["wrong grad"].message
    assert rows["wrong value"].check["loss_err"] > rows["wrong value"].check["loss_tol"]
    # A failed row shows as FAILED in the printed table, without figures.
    table = report.tables(list(rows.values()))
    assert table.count("FAILED") == 5


def test_low_precision_tolerance_follows_eager_pytorch():
    from benchmarks import correctness

    eager = correctness.CheckResult(True, loss_err=0.03, grad_err=1e-3, loss_tol=1.0,
                                    grad_tol=1.0, message="")
    floor_loss, floor_grad = correctness.TOLERANCES["bf16"]
    assert correctness.tolerances("bf16", eager) == (0.03 * correctness.EAGER_FACTOR, floor_grad)
    assert correctness.tolerances("fp32", eager) == correctness.TOLERANCES["fp32"]
    broken = correctness.CheckResult(False, float("inf"), None, 1.0, None, "")
    assert correctness.tolerances("bf16", broken) == (floor_loss, floor_grad)


def test_failed_forward_only_row():
    case = Case("ce_fwd", "fp32", (32, 100))
    rows = runner.run_case(case, [_impl("off", lambda x, y: F.cross_entropy(x, y) * 1.01)],
                           _context())
    assert rows[0].status == FAILED and rows[0].check["grad_err"] is None


def test_pytorch_baselines_pass_the_check():
    """The tolerances admit PyTorch's own eager error in every dtype (torchloss_fused's own
    accuracy is the business of its test suite, not of this harness's)."""
    for op, shape in (("ce_fwd_bwd", (32, 300)), ("focal_fwd_bwd", (32, 300)),
                      ("sigmoid_focal_fwd_bwd", (32, 80)), ("ce_fwd", (32, 300))):
        for dtype in ("fp32", "bf16"):
            impls = [i for i in impls_for(op, CPU, compile_baseline=False) if i.kind == EAGER]
            rows = runner.run_case(Case(op, dtype, shape), impls, _context())
            assert [r.status for r in rows] == [OK], [(r.impl, r.message) for r in rows]


def test_compiled_ours_row_where_compile_changes_our_path():
    # Under torch.compile the training losses trace their split forward/backward ops, so
    # a row shows that cost; forward-only and linear CE run the same op compiled or not.
    for op in OPS:
        kinds = [i.kind for i in impls_for(op, CPU)]
        wanted = op in ("ce_fwd_bwd", "focal_fwd_bwd", "sigmoid_focal_fwd_bwd")
        assert kinds.count(OURS_COMPILED) == int(wanted), (op, kinds)
        assert COMPILE in kinds
        assert OURS_COMPILED not in [i.kind for i in impls_for(op, CPU, compile_baseline=False)]
    impl = next(i for i in impls_for("focal_fwd_bwd", CPU) if i.kind == OURS_COMPILED)
    assert impl.name == "torch.compile(torchloss_fused)" and not impl.mutates_inputs
    assert hasattr(impl.build(), "_torchdynamo_orig_callable")  # (built, not yet compiled)


@pytest.mark.parametrize("op", ["linear_ce_fwd_bwd", "linear_ce_soft_fwd_bwd"])
def test_linear_cross_entropy_gate(op):
    """The materialised baseline passes the fp64 oracle (hidden and weight gradients); a
    version that forgets the weight gradient does not, nor (soft targets) one that reads
    the teacher's most likely class as a hard target."""
    from benchmarks.eager_losses import linear_cross_entropy

    impls = [_impl("eager", linear_cross_entropy, EAGER),
             _impl("frozen weight", lambda h, w, y: linear_cross_entropy(h, w.detach(), y)
                   + 0 * w.sum())]
    if op == "linear_ce_soft_fwd_bwd":
        impls.append(_impl("argmax target", lambda h, w, y: linear_cross_entropy(
            h, w, y.argmax(-1)), EAGER))
    rows = runner.run_case(Case(op, "fp32", (64, 32, 500)), impls, _context())
    assert [r.status for r in rows] == [OK] + [FAILED] * (len(impls) - 1)


def test_implementations_are_timed_taking_turns(monkeypatch):
    # After each implementation's check, memory run and warm-up, the steady ones are timed
    # in `rounds` rounds, in turn; the one that overwrites its inputs runs alone, last,
    # yet its row keeps its place. A step that raises while timed marks only its row.
    log, timed = [], []
    time_in_turns = runner._time_in_turns
    monkeypatch.setattr(runner, "_time_in_turns",
                        lambda *a: (timed.append(1), time_in_turns(*a)))

    def logged(name, breaks=False):
        def fn(x, y):
            log.append(name)
            if breaks and timed:
                raise RuntimeError("broke while timed")
            return F.cross_entropy(x, y)
        return fn

    impls = [Impl("a", EAGER, lambda: logged("a")),
             Impl("m", OURS, lambda: logged("m"), mutates_inputs=True),
             Impl("b", OURS, lambda: logged("b")), Impl("c", OURS, lambda: logged("c", True))]
    ctx = _context()
    ctx.settings.rounds = 3
    rows = runner.run_case(Case("ce_fwd_bwd", "fp32", (64, 500)), impls, ctx)
    assert [r.impl for r in rows] == ["a", "m", "b", "c"]
    assert [r.status for r in rows] == [OK, OK, OK, ERROR], [r.message for r in rows]
    assert rows[3].message == "RuntimeError: broke while timed" and rows[3].median_ms is None
    turns = [name for k, name in enumerate(log) if k == 0 or log[k - 1] != name]
    # preparation a, b, c; round 1 a, b, c (c breaks); rounds 2 and 3 a, b; then m alone
    assert turns == ["a", "b", "c", "a", "b", "c", "a", "b", "a", "b", "m"], turns
    assert all(r.runs >= ctx.settings.min_runs for r in rows[:3])


def test_timing_rounds_merge_their_samples():
    parts = [timing.Timing(0.0, 0.0, 4, "m", [3.0, 1.0]), timing.Timing(0.0, 0.0, 2, "m", [2.0]),
             timing.Timing(0.0, 0.0, 6, "m", [10.0, 4.0])]
    t = timing.merge(parts)
    assert (t.median_s, t.runs, t.method, t.samples_s) == (3.0, 12, "m", [1, 2, 3, 4, 10])
    calls = []
    one = timing.measure(lambda: calls.append(1), CPU,
                         timing.Settings(min_run_time=0.0, min_runs=6), 1e-6, rounds=3)
    assert one.runs >= 2 and len(one.samples_s) >= 2 and one.median_s > 0


def test_cases_too_big_for_memory_are_skipped(monkeypatch):
    monkeypatch.setattr(runner, "_available_bytes", lambda device: 2**20)
    impls = [_impl("eager", F.cross_entropy, EAGER)]
    (row,) = runner.run_case(Case("ce_fwd_bwd", "fp32", (64, 500)), impls, _context())
    assert row.status == SKIPPED and "GiB available" in row.message and row.median_ms is None


def test_step_drops_gradients():
    x = torch.randn(8, 10, requires_grad=True)
    y = torch.randint(0, 10, (8,))
    runner.make_step(F.cross_entropy, [(x, y)], backward=True)()
    assert x.grad is None


# ---- peak memory ----------------------------------------------------------------------------


def _ce_forward_internal_buffer(nbytes):
    """F.cross_entropy's forward allocates and frees a log-softmax buffer of the input's
    size inside C++: nothing survives the call for Python to see."""
    x = torch.randn(1024, nbytes // (4 * 1024))
    y = torch.zeros(1024, dtype=torch.long)
    F.cross_entropy(x, y)
    return lambda: F.cross_entropy(x, y)


@pytest.mark.parametrize("method", ["peak-rss", "profiler"])
def test_memory_sees_allocations_inside_cpp_ops(method):
    if method == "peak-rss" and not memory.rss_available():
        pytest.skip("no /proc/self/clear_refs")
    nbytes = 32 * MiB
    seen = memory.peak_extra_bytes(_ce_forward_internal_buffer(nbytes), CPU, method)
    assert 0.95 * nbytes <= seen <= 1.5 * nbytes


def test_peak_rss_sees_reused_heap_memory():
    """Memory freed by an earlier step may stay resident in the C heap; the method must still
    count it when a later step uses it again."""
    if not memory.rss_available():
        pytest.skip("no /proc/self/clear_refs")
    a = torch.ones(5 * MiB)  # 20 MiB: raises glibc's mmap threshold when freed
    del a
    b = torch.ones(4 * MiB)  # 16 MiB: may now come from (and return to) the heap
    del b
    seen = memory.peak_extra_bytes(lambda: torch.ones(4 * MiB), CPU, "peak-rss")
    assert seen >= 0.95 * 16 * MiB


def test_memory_probe_reports_what_it_saw():
    probe = memory.probe(CPU, nbytes=16 * MiB)
    assert probe["expected_bytes"] == 16 * MiB
    assert probe["seen_bytes"] >= 0.95 * probe["expected_bytes"]


# ---- end to end -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    pytest.importorskip("tabulate")
    out = tmp_path_factory.mktemp("bench")
    argv = ["--tiny", "--device", "cpu", "--out", str(out), "--no-progress",
            "--ops", "ce_fwd_bwd,sigmoid_focal_fwd_bwd", "--dtypes", "fp32", "bf16"]
    from contextlib import redirect_stdout
    from io import StringIO

    printed = StringIO()
    with redirect_stdout(printed):
        code = run.main(argv)
    return code, out, printed.getvalue()


def test_tiny_sweep_end_to_end(tiny_run):
    code, out, printed = tiny_run
    (json_path,) = out.glob("cpu-*.json")
    doc = json.loads(json_path.read_text())
    results_json.validate(doc)
    rows = doc["rows"]
    assert {(r["op"], r["dtype"]) for r in rows} == {
        (op, dt) for op in ("ce_fwd_bwd", "sigmoid_focal_fwd_bwd") for dt in ("fp32", "bf16")}
    # Baselines pass; our rows are measured or FAILED by the gate, never broken by the
    # harness calling the API wrongly (ERROR); the exit status says whether ours failed.
    assert all(r["status"] == OK for r in rows if r["impl_kind"] != OURS)
    ours = [r for r in rows if r["impl_kind"] == OURS]
    assert ours and all(r["status"] in (OK, FAILED) for r in ours), ours
    assert code == (1 if any(r["status"] == FAILED for r in ours) else 0)
    for r in (r for r in rows if r["status"] == OK):
        assert r["median_ms"] > 0 and r["runs"] >= 2
        assert r["gb_per_s"] == pytest.approx(r["bytes_moved"] / (r["median_ms"] * 1e6))
        assert r["peak_extra_ratio"] == pytest.approx(r["peak_extra_bytes"] / r["logits_bytes"])
    eager = [r for r in rows if r["impl_kind"] == EAGER]
    assert eager and all(r["speedup_vs_eager"] == pytest.approx(1.0) for r in eager)
    assert not any(r["impl_kind"] == "compile" for r in rows)  # --tiny skips compile
    # The eager fwd+bwd keeps log-probabilities and their gradient: at least the gradient of
    # the logits (1x) must show up in its peak.
    ce_eager = next(r for r in eager if r["op"] == "ce_fwd_bwd" and r["dtype"] == "fp32")
    assert ce_eager["peak_extra_ratio"] >= 0.9
    # The markdown file is the printed report.
    (md,) = out.glob("cpu-*-latest.md")
    assert md.read_text() == printed
    assert "-tiny-" in md.name  # a partial run never replaces the default table
    assert "### cross_entropy fwd+bwd" in printed and doc["date"] in printed
    if _has_matplotlib():
        (png,) = out.glob("cpu-*.png")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_latest_file_names_a_partial_selection():
    from benchmarks.cases import DEFAULT_DTYPES, OPS
    from benchmarks.run import latest_name

    assert latest_name("cpu-x", "quick", OPS, DEFAULT_DTYPES) == "cpu-x-latest.md"
    assert latest_name("cpu-x", "full", ("linear_ce_fwd_bwd",), DEFAULT_DTYPES) == (
        "cpu-x-full-linear_ce_fwd_bwd-latest.md")
    assert latest_name("cpu-x", "quick", OPS, ("bf16",)) == "cpu-x-bf16-latest.md"


def _has_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_results_schema(tiny_run):
    _, out, _ = tiny_run
    (json_path,) = out.glob("cpu-*.json")
    doc = json.loads(json_path.read_text())
    assert doc["schema"] == results_json.SCHEMA
    assert doc["schema_version"] == results_json.SCHEMA_VERSION == 4
    assert doc["timing"]["rounds"] == timing.Settings().rounds == 3
    # The copy bandwidth is measured at both ends of the run; the % columns are of the
    # faster measurement.
    bw = doc["copy_bandwidth"]
    assert bw["end_gb_per_s"] is not None
    assert bw["gb_per_s"] == max(bw["start_gb_per_s"], bw["end_gb_per_s"])
    for r in (r for r in doc["rows"] if r["status"] == OK):
        assert r["pct_copy_bw"] == pytest.approx(100 * r["gb_per_s"] / bw["gb_per_s"])
    assert doc["device"]["kind"] == "cpu" and doc["device"]["cores"] >= 1
    assert doc["date"].endswith("Z") and "T" in doc["date"]
    assert doc["git"]["commit"] == "unknown" or len(doc["git"]["commit"]) == 40
    assert doc["copy_bandwidth"]["bytes_moved"] == 2 * doc["copy_bandwidth"]["tensor_bytes"]
    assert doc["software"]["torch"] == torch.__version__
    assert doc["command"].startswith("python") and "--tiny" in doc["argv"]

    for mutate in (
        lambda d: d.pop("git"),
        lambda d: d.__setitem__("schema_version", "1"),
        lambda d: d["device"].__setitem__("cores", "2"),
        lambda d: d["device"].__setitem__("kind", "tpu"),
        lambda d: d["rows"][0].pop("median_ms"),
        lambda d: d["rows"][0].__setitem__("status", "fine"),
        lambda d: d["rows"][0].__setitem__("shape", [1.5, 2]),
        lambda d: d["rows"][0].__setitem__("runs", True),
        lambda d: d["copy_bandwidth"].pop("end_gb_per_s"),
    ):
        bad = copy.deepcopy(doc)
        mutate(bad)
        with pytest.raises(ValueError):
            results_json.validate(bad)


def test_inputs_overwritten_by_a_step_are_restored_between_timed_steps():
    """An implementation that writes into its inputs (inplace_backward, Liger) is timed
    on the inputs the other implementations see: each timed step finds its set as made,
    not the gradient an earlier step left in it (a CPU's subnormals would slow it)."""
    sets = [problems.make_inputs(Case("ce_fwd_bwd", "fp32", (4, 8)), CPU, k) for k in range(3)]
    made = [s[0].detach().clone() for s in sets]
    seen = []

    def overwrite(x, t):
        k = next(k for k, s in enumerate(sets) if s[0] is x)
        seen.append(torch.equal(x.detach(), made[k]))
        with torch.no_grad():
            x.zero_()  # (as inplace_backward leaves the logits)
        return x.sum()

    step = runner.RestoringStep(overwrite, sets, True, 2**20, CPU)
    for s in sets:  # (the check and warm-up's calls, before timing: they overwrite too)
        overwrite(*s)
    step.dirty.update(range(3))
    seen.clear()
    t = timing.measure(step, CPU, timing.Settings(min_run_time=0.0, min_runs=7), 1e-3,
                       between=step.between)
    assert t.runs == 7 and len(seen) == 7 and all(seen)
    assert "restored" in t.method
    # Without `between`, a step sees what the previous call on its set left (the 7 steps
    # used sets 0, 1, 2, 0, 1, 2, 0; `between` ran before each).
    seen.clear()
    for _ in range(3):
        step()
    assert seen == [True, True, False]


def test_cli_arguments():
    args = run.parse_args(["--ops", "ce_fwd,focal_fwd_bwd", "ce_fwd", "--dtypes", "bf16"])
    assert args.ops == ("ce_fwd", "focal_fwd_bwd") and args.dtypes == ("bf16",)
    assert args.size == "quick" and args.compile is True
    assert run.parse_args(["--tiny"]).compile is False
    assert run.parse_args(["--tiny", "--compile"]).compile is True
    assert run.parse_args(["--full"]).size == "full"
    assert run.parse_args(["--ops", "cross_entropy"]).ops == ("ce_fwd", "ce_fwd_bwd")
    with pytest.raises(SystemExit):
        run.parse_args(["--ops", "softmax"])


def test_plot_against_vocabulary(tmp_path):
    pytest.importorskip("matplotlib")
    from benchmarks import plot

    rows = [Row(op="ce_fwd_bwd", op_label="x", impl=impl, impl_kind=OURS, dtype="bf16",
                shape=[4096, v], logits_bytes=4096 * v * 2, bytes_moved=1, input_sets=1,
                median_ms=v / 1000 * k, peak_extra_ratio=k / 2)
            for v in (32000, 128256) for k, impl in ((1, "a"), (3, "b"))]
    png = plot.plot(rows, tmp_path / "p.png", "title")
    assert png is not None and png.read_bytes()[:4] == b"\x89PNG"


def test_runs_without_tqdm_and_matplotlib(monkeypatch, tmp_path):
    """Both are niceties: without them there is no bar and no plot, and nothing else
    changes."""
    from benchmarks import plot

    monkeypatch.setitem(sys.modules, "tqdm", None)  # makes `import tqdm` raise ImportError
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert run._progress(3, disable=False) is None
    row = Row(op="ce_fwd", op_label="x", impl="i", impl_kind=OURS, dtype="fp32", shape=[1, 2],
              logits_bytes=8, bytes_moved=8, input_sets=1, median_ms=1.0, peak_extra_ratio=0.0)
    assert plot.plot([row], tmp_path / "p.png", "t") is None
    assert not (tmp_path / "p.png").exists()


def test_rows_serialise_without_nan():
    row = Row(op="ce_fwd", op_label="x", impl="i", impl_kind=OURS, dtype="fp32", shape=[1, 2],
              logits_bytes=8, bytes_moved=8, input_sets=1)
    assert json.dumps(row.to_json(), allow_nan=False)


@pytest.mark.parametrize("op", ["cross_entropy", "linear_cross_entropy"])
def test_precision_script_prints_ours_beside_f(op, capsys):
    from benchmarks import precision

    precision.main(["--op", op, "--shape", "8", "40", "--offsets", "0", "1000"])
    out = capsys.readouterr().out
    assert out.startswith(f"{op}: float32 (8, 40)")
    assert "F: loss" in out and "ours: loss" in out
    e = precision.errors(1000.0, 8, 40, "cpu", 0, op)
    assert set(e) == {"ours", "F"} and len(e["ours"]) == len(e["F"]) == (
        2 if op == "cross_entropy" else 3)
    assert all(0 <= v < 1e-3 for v in e["ours"] + e["F"])


# ---- command lines: bad input is an argparse error (exit 2), found before measuring -------


def _usage_error(parse, argv, capsys=None) -> str:
    """Calls `parse(argv)`, which must exit 2 (argparse's code); returns what it printed."""
    with pytest.raises(SystemExit) as exc:
        parse(argv)
    assert exc.value.code == 2, exc.value.code
    return capsys.readouterr().err if capsys is not None else ""


@pytest.mark.parametrize("argv", [
    # inf/nan made blocked_autorange grow its block forever; 0 or negative timed nothing
    ["--min-run-time", "inf"], ["--min-run-time", "nan"], ["--min-run-time", "0"],
    ["--min-run-time", "-1"], ["--min-runs", "0"], ["--min-runs", "-3"],
    ["--prefault-gib", "-1"], ["--prefault-gib", "inf"],
    # torch.Generator.manual_seed takes 64 bits; the input sets use seed + k
    ["--seed", "99999999999999999999999"], ["--seed", str(2**63)], ["--seed", "-1"],
])
def test_run_refuses_bad_numbers(argv, capsys):
    err = _usage_error(run.parse_args, ["--tiny", *argv], capsys)
    assert argv[0] in err and "Traceback" not in err


def test_run_takes_good_numbers():
    args = run.parse_args(["--min-run-time", "0.25", "--min-runs", "1", "--seed", str(2**63 - 1),
                           "--prefault-gib", "0"])
    assert (args.min_run_time, args.min_runs, args.seed) == (0.25, 1, 2**63 - 1)
    assert run._settings(args).min_run_time == 0.25


@pytest.mark.parametrize("argv", [["--ops", ","], ["--dtypes", ","], ["--ops="],
                                  ["--ops", "softmax"], ["--dtypes", "fp8"]])
def test_run_refuses_an_empty_or_unknown_selection(argv, capsys):
    # (an empty selection ran nothing and exited 0; an unknown name exited 1)
    err = _usage_error(run.parse_args, argv, capsys)
    assert argv[0].rstrip("=") in err


def test_run_says_truly_why_a_selection_runs_nothing(capsys):
    # The targets sweep has no shape for the soft-target linear CE (no target is set on it).
    err = _usage_error(run.main, ["--targets", "--device", "cpu", "--ops",
                                  "linear_ce_soft_fwd_bwd"], capsys)
    assert "linear_ce_soft_fwd_bwd" in err and "performance target" in err
    assert "once torchloss_fused.linear_cross_entropy exists" not in err


def test_run_checks_out_before_measuring(tmp_path, monkeypatch, capsys):
    afile = tmp_path / "afile"
    afile.write_text("")
    for out in (afile, afile / "sub"):
        err = _usage_error(run.parse_args, ["--out", str(out)], capsys)
        assert "--out" in err
    # A good --out is made before anything is measured.
    class Measured(Exception):
        pass

    def measure(*args, **kwargs):
        raise Measured

    monkeypatch.setattr(run.timing, "copy_bandwidth", measure)
    out = tmp_path / "new" / "dir"
    with pytest.raises(Measured):
        run.main(["--tiny", "--device", "cpu", "--ops", "ce_fwd", "--dtypes", "fp32",
                  "--no-plot", "--no-progress", "--out", str(out)])
    assert out.is_dir()


def test_prefault_size_follows_the_argument():
    cases = sweep("cpu", "tiny", ("ce_fwd",), ("fp32",))

    def nbytes(argv):
        return run._prefault_bytes(run.parse_args(argv), CPU, cases)

    assert nbytes(["--tiny"]) == 0  # (tests: no 1 GiB touched unasked)
    assert nbytes(["--tiny", "--prefault-gib", "0.5"]) == 2**29
    assert nbytes(["--quick", "--prefault-gib", "0"]) == 0


def test_latest_file_names_the_selection_as_a_set():
    def name(argv):
        a = run.parse_args(argv)
        return run.latest_name("cpu-x", a.size, a.ops, a.dtypes, compile=a.compile,
                               peers=not a.no_peers)

    default = name([])
    assert default == "cpu-x-latest.md"
    # A selection with rows left out never takes the default table's name ...
    assert name(["--no-compile"]) == "cpu-x-no-compile-latest.md"
    assert name(["--no-peers"]) == "cpu-x-no-peers-latest.md"
    assert name(["--tiny"]) == "cpu-x-tiny-latest.md"  # (its default: no compile)
    assert name(["--tiny", "--compile"]) == "cpu-x-tiny-compile-latest.md"
    # ... and the same selection, reordered, is the same table.
    assert name(["--dtypes", "bf16", "fp32"]) == default
    assert name(["--ops", *reversed(OPS)]) == default
    assert name(["--ops", "focal_fwd_bwd", "ce_fwd"]) == name(["--ops", "ce_fwd,focal_fwd_bwd"])


# ---- the small-classes sweep: (N, C) heads and (N, C, H, W) segmentation logits -----------


SEG = (2, 5, 6, 7)  # a tiny (N, C, H, W): H != W, so a mixed-up dim shows


def test_small_classes_sweep_cases():
    for kind in ("cpu", "cuda"):
        cases = sweep(kind, "small-classes")
        assert {c.op for c in cases} == {"ce_fwd", "ce_fwd_bwd", "focal_fwd_bwd"}
        for op in ("ce_fwd", "ce_fwd_bwd", "focal_fwd_bwd"):
            got = {(c.shape, c.layout) for c in cases if c.op == op and c.dtype == "fp32"}
            assert got == {((65536, 2), None), ((65536, 10), None), ((4096, 100), None),
                           ((64, 1000), None), ((8, 21, 128, 128), "nchw"),
                           ((8, 21, 128, 128), "channels_last")}
        assert {c.dtype for c in cases} == {"fp32", "bf16"}
    seg = Case("ce_fwd_bwd", "fp32", (8, 21, 128, 128), "channels_last")
    assert (seg.classes, seg.rows, seg.spatial) == (21, 8 * 128 * 128, True)
    assert seg.shape_str() == "8x21x128x128 channels_last"
    assert (Case("ce_fwd", "fp32", (4096, 100)).classes, Case("ce_fwd", "fp32", (4096, 100)).rows) \
        == (100, 4096)
    for bad in (((4096, 100), "nchw"), ((2, 3, 4, 5), "nhwc")):
        with pytest.raises(ValueError):
            Case("ce_fwd", "fp32", *bad)


@pytest.mark.parametrize("size", ["tiny", "quick", "full", "targets"])
def test_other_sweeps_have_no_layout(size):
    for kind in ("cpu", "cuda"):
        assert all(c.layout is None and len(c.shape) in (2, 3) for c in sweep(kind, size))


@pytest.mark.parametrize("op", ["ce_fwd", "ce_fwd_bwd", "focal_fwd_bwd"])
def test_segmentation_inputs_have_the_layout(op):
    made = {}
    for layout in ("nchw", "channels_last"):
        case = Case(op, "bf16", SEG, layout)
        x, y = problems.make_inputs(case, CPU, 3)
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        assert x.shape == SEG and x.dtype == torch.bfloat16 and x.is_contiguous(memory_format=fmt)
        assert x.is_contiguous() == (layout == "nchw")  # (C > 1: the two formats differ)
        assert x.requires_grad == case.backward and x.is_leaf
        assert y.shape == (2, 6, 7) and y.dtype == torch.int64 and 0 <= y.min() and y.max() < 5
        assert problems.input_set_nbytes(case) == problems.input_set_bytes((x, y))
        made[layout] = x, y
    # The same values in both layouts: the two cases differ in memory format only.
    assert torch.equal(made["nchw"][0], made["channels_last"][0])
    assert torch.equal(made["nchw"][1], made["channels_last"][1])


def _class_dim_last(x, y):
    """A layout bug: the logits' memory read as (rows, C), whatever their format."""
    return F.cross_entropy(x.reshape(-1, x.shape[1]), y.reshape(-1))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("op", ["ce_fwd", "ce_fwd_bwd", "focal_fwd_bwd"])
def test_segmentation_case_is_checked(op, layout):
    """The fp64 oracle takes (N, C, H, W) logits in either format: eager PyTorch and ours
    pass it (their check holds the gradient's error too), and implementations that read
    the classes from the wrong dim or average over the images instead of the pixels fail."""
    impls = impls_for(op, CPU, compile_baseline=False, spatial=True)
    assert {i.kind for i in impls} >= {OURS, EAGER}
    eager = next(i for i in impls if i.kind == EAGER).build()
    impls += [_impl("class dim last", _class_dim_last),
              _impl("mean over images", lambda x, y: eager(x, y) * y[0].numel())]
    for dtype in ("fp32", "bf16"):
        case = Case(op, dtype, SEG, layout)
        rows = runner.run_case(case, impls, _context())
        by = {r.impl: r for r in rows}
        assert all(r.layout == layout and r.shape == list(SEG) for r in rows)
        for r in rows[:-2]:
            assert r.status == OK, (r.impl, r.message)
            if r.impl_kind == "yardstick":  # (not checked here: the CE case checks it)
                continue
            assert r.check is not None and r.check["ok"], (r.impl, r.check)
            assert (r.check["grad_err"] is not None) == case.backward
            if r.impl_kind == OURS:
                assert r.median_ms > 0 and r.peak_extra_bytes is not None
        assert by["class dim last"].status == FAILED and by["mean over images"].status == FAILED


def test_segmentation_case_is_offered_no_peer(monkeypatch):
    # The peers' cross-entropies take (N, V) logits only.
    from benchmarks import baselines

    monkeypatch.setattr(baselines, "_peers", lambda op: [_impl("peer", F.cross_entropy, "peer")])
    gpu = torch.device("cuda")
    assert "peer" in [i.kind for i in impls_for("ce_fwd", gpu, False, True)]
    assert "peer" not in [i.kind for i in impls_for("ce_fwd", gpu, False, True, spatial=True)]


def test_small_classes_cli():
    args = run.parse_args(["--small-classes"])
    assert args.size == "small-classes" and args.compile is True
    assert run._settings(args).min_run_time > 0
    for other in ("--tiny", "--quick", "--full", "--targets"):
        _usage_error(run.parse_args, ["--small-classes", other])
    assert run.latest_name("cpu-x", "small-classes", OPS, ("fp32", "bf16"), compile=True,
                           peers=False) == "cpu-x-small-classes-no-peers-latest.md"


@pytest.fixture(scope="module")
def small_classes_run(tmp_path_factory):
    """The small-classes sweep end to end at tiny sizes (the real ones take minutes)."""
    pytest.importorskip("tabulate")
    from benchmarks import cases

    out = tmp_path_factory.mktemp("bench-small")
    argv = ["--small-classes", "--device", "cpu", "--out", str(out), "--no-progress",
            "--no-compile", "--min-run-time", "0.001", "--min-runs", "2", "--prefault-gib", "0",
            "--dtypes", "fp32", "--ops", "ce_fwd_bwd", "focal_fwd_bwd", "sigmoid_focal_fwd_bwd"]
    from contextlib import redirect_stderr, redirect_stdout
    from io import StringIO

    printed, err = StringIO(), StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cases, "SMALL_CLASSES", ((96, 2),))
        mp.setattr(cases, "SEGMENTATION", (SEG,))
        mp.setattr(run, "_copy_tensor_bytes", lambda device, size, llc: 32 * MiB)
        with redirect_stdout(printed), redirect_stderr(err):
            code = run.main(argv)
    return code, out, printed.getvalue(), err.getvalue()


def test_small_classes_sweep_end_to_end(small_classes_run):
    code, out, printed, err = small_classes_run
    (json_path,) = out.glob("cpu-*.json")
    doc = json.loads(json_path.read_text())
    results_json.validate(doc)
    assert doc["sweep"] == "small-classes" and "--small-classes" in doc["argv"]
    rows = doc["rows"]
    keys = {(r["op"], tuple(r["shape"]), r.get("layout")) for r in rows}
    assert keys == {(op, shape, layout) for op in ("ce_fwd_bwd", "focal_fwd_bwd")
                    for shape, layout in (((96, 2), None), (SEG, "nchw"), (SEG, "channels_last"))}
    # (N, V) rows carry no layout key (as every other sweep's rows); the others name theirs
    assert all(("layout" in r) == (len(r["shape"]) == 4) for r in rows)
    assert all(r["status"] == OK for r in rows if r["impl_kind"] != OURS)
    ours = [r for r in rows if r["impl_kind"] == OURS]
    assert ours and all(r["status"] in (OK, FAILED) for r in ours), ours
    assert code == (1 if any(r["status"] == FAILED for r in ours) else 0)
    for r in rows:
        case = Case(r["op"], r["dtype"], tuple(r["shape"]), r.get("layout"))
        assert r["bytes_moved"] == bytes_model.bytes_moved(case)
        assert r["logits_bytes"] == math.prod(r["shape"]) * 4
        if r["status"] == OK:
            assert r["median_ms"] > 0 and r["peak_extra_bytes"] is not None
            assert r["check"] is not None or r["impl_kind"] == "yardstick"
    # The table says which layout each segmentation row has.
    assert "| fp32    | 2x5x6x7 nchw" in printed and "| 2x5x6x7 channels_last |" in printed
    assert "| 96x2 " in printed
    (md,) = out.glob("cpu-*-latest.md")
    assert "-small-classes-" in md.name and md.name.endswith("-fp32-no-compile-latest.md")
    assert md.read_text() == printed
    # A selected op the sweep has no shape of is named, with why.
    assert "sigmoid_focal_fwd_bwd (the small-classes sweep has no shape of it" in err
    if _has_matplotlib():
        (png,) = out.glob("cpu-*.png")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summary_keeps_the_layouts_apart(small_classes_run):
    from benchmarks import summary

    _, out, _, _ = small_classes_run
    (json_path,) = out.glob("cpu-*.json")
    lines = summary.lines_of(json.loads(json_path.read_text()), "ce_fwd_bwd")
    shapes = [line[3] for line in lines]
    assert "2x5x6x7 nchw" in shapes and "2x5x6x7 channels_last" in shapes, shapes


def test_results_schema_layout():
    row = Row(op="ce_fwd", op_label="x", impl="i", impl_kind=OURS, dtype="fp32",
              shape=[2, 3, 4, 5], logits_bytes=480, bytes_moved=8, input_sets=1,
              median_ms=1.0, layout="channels_last")
    assert row.to_json()["layout"] == "channels_last"
    assert row.key() == ("ce_fwd", "fp32", (2, 3, 4, 5), "channels_last")
    flat = Row(op="ce_fwd", op_label="x", impl="i", impl_kind=OURS, dtype="fp32", shape=[1, 2],
               logits_bytes=8, bytes_moved=8, input_sets=1, median_ms=1.0)
    assert "layout" not in flat.to_json() and flat.key() == ("ce_fwd", "fp32", (1, 2))
    for layout, shape in (("nhwc", [2, 3, 4, 5]), ("nchw", [6, 20])):
        bad = dict(row.to_json(), layout=layout, shape=shape)
        with pytest.raises(results_json.SchemaError):
            results_json.validate({**_minimal_doc(), "rows": [bad]})
    results_json.validate({**_minimal_doc(), "rows": [row.to_json(), flat.to_json()]})


def _minimal_doc() -> dict:
    nested = {"device": {"kind": "cpu", "name": "n", "slug": "s", "cpu_model": "m",
                         "gpu_name": None, "cores": 1, "threads": 1, "cpu_capability": "c",
                         "llc_bytes": 1, "memory_bytes": None},
              "software": {"torch": "t", "python": "p", "platform": "p", "cuda": None,
                           "env": {}, "transparent_hugepage": None},
              "git": {"commit": "unknown", "dirty": None},
              "copy_bandwidth": {"tensor_bytes": 1, "bytes_moved": 2, "median_ms": 1.0,
                                 "gb_per_s": 1.0, "start_gb_per_s": 1.0, "end_gb_per_s": None},
              "timing": {"method": "m", "min_run_time_s": 1.0, "min_runs": 1, "warmup": 1,
                         "rounds": 1},
              "memory": {"method": "m", "probe": {}, "prefault": {}},
              "load_average": {"start": None, "end": None}}
    return {"schema": results_json.SCHEMA, "schema_version": results_json.SCHEMA_VERSION,
            "date": "d", "command": "c", "argv": [], "sweep": "small-classes", "ours": None,
            "rows": [], **nested}


def test_plot_takes_the_class_count_from_dim_1(tmp_path):
    from benchmarks import plot

    def row(shape, layout, impl, ms):
        return Row(op="ce_fwd_bwd", op_label="x", impl=impl, impl_kind=OURS, dtype="fp32",
                   shape=list(shape), logits_bytes=1, bytes_moved=1, input_sets=1,
                   median_ms=ms, peak_extra_ratio=1.0, layout=layout)

    seg = row((8, 21, 128, 128), "channels_last", "a", 1.0)
    assert plot._classes(seg) == 21 and plot._fixed(seg) == (8, 128, 128, "channels_last")
    assert plot._classes(row((65536, 2), None, "a", 1.0)) == 2
    rows = [row(s, lay, impl, k * m) for s, lay, m in (((65536, 2), None, 1.0),
                                                       ((4096, 100), None, 2.0),
                                                       ((8, 21, 128, 128), "nchw", 3.0),
                                                       ((8, 21, 128, 128), "channels_last", 4.0))
            for k, impl in ((1, "a"), (2, "b"))]
    # by case (the small-classes sweep's plot): every case in one panel per (op, dtype)
    ((_, _, _, prows),) = plot._panels(rows, by_case=True)
    assert len(prows) == len(rows)
    # by class count at one fixed rest (the other sweeps'): never a spatial dim as classes
    for _, _, _, prows in plot._panels(rows):
        assert len({plot._fixed(r) for r in prows}) == 1
    pytest.importorskip("matplotlib")
    for by_case in (True, False):
        png = plot.plot(rows, tmp_path / f"p{by_case}.png", "t", by_case=by_case)
        assert png is not None and png.read_bytes()[:4] == b"\x89PNG"


# ---- tensor_parallel and tuning_sweep -----------------------------------------------------


@pytest.mark.parametrize("argv", [
    ["--world", "0"], ["--world", "-2"], ["--repeats", "0"], ["--vocab", "0"], ["--rows", "0"],
    ["--hidden", "-1"], ["--label-smoothing", "-0.1"], ["--label-smoothing", "1.5"],
    ["--label-smoothing", "nan"], ["--world", "3", "--vocab", "64"],
])
def test_tensor_parallel_refuses_bad_sizes(argv, capsys):
    from benchmarks import tensor_parallel

    err = _usage_error(tensor_parallel.parse_args, argv, capsys)
    assert err.startswith("usage: python -m benchmarks.tensor_parallel")


def _tp_doc(check):
    row = {"op": "cross_entropy", "impl": "F.cross_entropy (gathered)", "dtype": "float16",
           "rows": 8, "vocab": 16, "hidden": None, "local_bytes": 256, "median_ms": 1.0,
           "peak_extra_bytes": 256, "peak_extra_ratio": 1.0, "check": check}
    return {"device": {"name": "cpu", "slug": "cpu-x"}, "world": 2, "date": "d",
            "software": {"torch": "t"}, "git": {"commit": "c" * 40}, "label_smoothing": 0.1,
            "rows": [row]}


def test_tensor_parallel_writes_strict_json_and_flags_non_finite(tmp_path):
    # float16 F.cross_entropy's own sum overflows (loss inf): the file had a bare Infinity.
    from datetime import datetime, timezone

    from benchmarks import tensor_parallel

    check = tensor_parallel.check_entry(loss_err=math.inf, grad_err=1.5e-5, loss=math.inf,
                                        grad_finite=True)
    assert check["loss_err_vs_ours"] is None and check["ok"] is False
    doc = _tp_doc(check)
    tensor_parallel.write(doc, "text", tmp_path, datetime.now(timezone.utc))
    (path,) = tmp_path.glob("tp-cpu-x-*.json")

    def refuse(token):
        raise ValueError(token)

    assert json.loads(path.read_text(), parse_constant=refuse)["rows"][0]["check"] == check
    line = next(x for x in tensor_parallel.render(doc).splitlines() if "float16" in x)
    assert "FAILED" in line and "loss inf" in line
    fine = tensor_parallel.check_entry(loss_err=0.0, grad_err=2e-7, loss=1.0, grad_finite=True)
    assert fine["ok"] is True and "0.0e+00 / 2.0e-07" in tensor_parallel.render(_tp_doc(fine))


def _gfm_cells(line: str) -> int:
    import re

    return len(re.split(r"(?<!\\)\|", line.strip().strip("|")))


def test_tensor_parallel_table_header_is_one_row_of_cells():
    from pathlib import Path

    from benchmarks import tensor_parallel

    check = {"loss_err_vs_ours": 0.0, "grad_err_vs_ours": 0.0}  # (as the older files hold)
    table = [x for x in tensor_parallel.render(_tp_doc(check)).splitlines() if x.startswith("|")]
    assert _gfm_cells(table[0]) == _gfm_cells(table[1]) == 7
    # The copies pasted in the main README.
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text().splitlines()
    pasted = [i for i, x in enumerate(readme) if x.startswith("| dtype ") and "vs ours" in x]
    assert len(pasted) == 2
    for i in pasted:
        assert _gfm_cells(readme[i]) == _gfm_cells(readme[i + 1]) == 7


def test_tuning_sweep_refuses_unreadable_files(tmp_path, capsys):
    from benchmarks import tuning_sweep

    bad = tmp_path / "bad.json"
    bad.write_text("not json")
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    for path in (tmp_path / "missing.json", bad, listed, tmp_path):
        err = _usage_error(tuning_sweep.main, [str(path)], capsys)
        assert err.startswith("usage: python -m benchmarks.tuning_sweep") and str(path) in err


@pytest.mark.parametrize("failure", ["case", "sigterm"])
def test_a_failing_or_stopped_run_writes_what_it_has(monkeypatch, tmp_path, failure):
    """A case that fails outside its rows' guards (its inputs, the oracle, a CUDA context
    a kernel fault broke) gets ERROR rows and the run goes on; a run stopped by SIGTERM (a
    time limit) writes the rows it has, marked incomplete. Both had written nothing."""
    pytest.importorskip("tabulate")
    real = runner.run_case
    calls = []

    def run_case(case, impls, ctx, on_row=lambda row: None):
        calls.append(case)
        if len(calls) == 2:
            if failure == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(case, impls, ctx, on_row)

    monkeypatch.setattr(runner, "run_case", run_case)
    argv = ["--tiny", "--device", "cpu", "--out", str(tmp_path), "--no-progress", "--no-plot",
            "--ops", "ce_fwd_bwd,focal_fwd_bwd", "--dtypes", "fp32", "bf16"]
    from contextlib import redirect_stdout
    from io import StringIO

    with redirect_stdout(StringIO()):
        code = run.main(argv)
    (json_path,) = tmp_path.glob("cpu-*.json")
    doc = json.loads(json_path.read_text())
    cases = {(r["op"], r["dtype"], tuple(r["shape"])) for r in doc["rows"]}
    if failure == "case":
        assert doc["complete"] is True and len(calls) > 2 and len(cases) == len(calls)
        c = calls[1]
        broken = [r for r in doc["rows"]
                  if (r["op"], r["dtype"], tuple(r["shape"])) == (c.op, c.dtype, tuple(c.shape))]
        assert broken and all(r["status"] == ERROR and "illegal memory" in r["message"]
                              for r in broken)
        assert code == 1  # (our row of that case is an ERROR)
    else:
        assert doc["complete"] is False and len(calls) == 2 and len(cases) == 1
        assert code == 1
