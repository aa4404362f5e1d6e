"""Tensor parallelism: the losses of a vocabulary split over ranks (vocab-parallel), per
rank, against F.cross_entropy on the same DTensors.

    python -m benchmarks.tensor_parallel [--world 2] [--rows 4096] [--vocab 32768]
        [--hidden 256] [--ops cross_entropy linear_cross_entropy]
        [--dtypes float32 bfloat16] [--label-smoothing 0.1] [--out DIR]

Starts WORLD CPU processes (gloo) and measures forward+backward of a mean loss for:

- cross_entropy: each rank holds (rows, vocab / WORLD) logits of a DTensor sharded with
  Shard(1). Ours: ``tlf.cross_entropy``; ``F.cross_entropy`` under
  ``torch.distributed.tensor.parallel.loss_parallel()``; ``F.cross_entropy`` without it
  (DTensor gathers the classes first).
- linear_cross_entropy: replicated (rows, hidden) activations and a (vocab, hidden) LM
  head sharded over the vocabulary (Shard(0), a ColwiseParallel head). Ours:
  ``tlf.linear_cross_entropy``; ``F.cross_entropy(F.linear(...))`` under
  ``loss_parallel()``; the same with the logits gathered first.

With --label-smoothing, the loss_parallel rows are left out: it does not support label
smoothing (a DTensor sharding error in torch 2.13).

Before timing, each row's loss and gradient (the logits', or the head's slice's) are
checked against ours (the float64 check
against F.cross_entropy on whole tensors is tests/test_dtensor.py's job); a non-finite
difference (float16 F.cross_entropy's own sum overflows to inf, for one) is null in the
JSON and FAILED in the table, with what was not finite. Time: median of
--repeats runs, each the slowest rank's. Memory: peak bytes allocated per rank above what
was in use before (the profiler's count), the largest over ranks, and its ratio to the
rank's slice of the logits. Prints a markdown table; with --out, also writes
``tp-<device slug>-<date>.json`` and ``tp-<device slug>-latest.md`` there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from . import device_info, memory, results_json
from .arg_types import fraction, output_dir, positive_int

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # before torch 2.5: the script says so when run
    DTensor = None

SCHEMA = "torchloss_fused-tp-benchmark"
SCHEMA_VERSION = 2  # 2: check.ok and check.message; a non-finite difference is null
IMPLS = ("torchloss_fused", "F.cross_entropy + loss_parallel", "F.cross_entropy (gathered)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tensor_parallel",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=positive_int, default=2, help="processes (ranks)")
    p.add_argument("--rows", type=positive_int, default=4096)
    p.add_argument("--vocab", type=positive_int, default=32768,
                   help="classes, split over the ranks: a multiple of --world")
    p.add_argument("--ops", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS))
    p.add_argument("--hidden", type=positive_int, default=256, help="H of linear_cross_entropy")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                   choices=["float32", "bfloat16", "float16", "float64"])
    p.add_argument("--repeats", type=positive_int, default=5)
    p.add_argument("--label-smoothing", type=fraction, default=0.0,
                   help="in [0, 1], for every loss (ours and F.cross_entropy)")
    p.add_argument("--out", type=output_dir, help="write the results JSON and markdown here")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = _parser()
    args = p.parse_args(argv)
    if args.vocab % args.world:
        p.error("argument --vocab: must be a multiple of --world (equal slices)")
    return args


def _ce_problem(args, mesh, dtype, rank):
    """Class-sharded (rows, vocab) logits: the leaf whose gradient is compared is them."""
    import torchloss_fused as tlf

    torch.manual_seed(rank)
    local = (torch.randn(args.rows, args.vocab // args.world) * 3).to(dtype)
    xd = DTensor.from_local(local, mesh, [Shard(1)]).requires_grad_()
    td = _target(args, mesh)
    ls = args.label_smoothing
    impls = {
        IMPLS[0]: lambda: _backward(tlf.cross_entropy(xd, td, label_smoothing=ls)),
        IMPLS[1]: lambda: _under_loss_parallel(
            lambda: F.cross_entropy(xd, td, label_smoothing=ls)),
        IMPLS[2]: lambda: _backward(F.cross_entropy(xd, td, label_smoothing=ls)),
    }
    _drop_unsupported(impls, ls)
    return impls, xd, local.numel() * local.element_size()


def _linear_problem(args, mesh, dtype, rank):
    """(rows, hidden) activations, replicated, against a (vocab, hidden) LM head split over
    the vocabulary (ColwiseParallel): the compared gradient is the head's slice's."""
    import torchloss_fused as tlf

    torch.manual_seed(0)
    hd = DTensor.from_local(torch.randn(args.rows, args.hidden).to(dtype), mesh,
                            [Replicate()]).requires_grad_()
    torch.manual_seed(rank + 1)
    w = (torch.randn(args.vocab // args.world, args.hidden) / args.hidden ** 0.5).to(dtype)
    wd = DTensor.from_local(w, mesh, [Shard(0)]).requires_grad_()
    td = _target(args, mesh)
    ls = args.label_smoothing
    impls = {
        IMPLS[0]: lambda: _backward(tlf.linear_cross_entropy(hd, wd, td, label_smoothing=ls)),
        IMPLS[1]: lambda: _under_loss_parallel(
            lambda: F.cross_entropy(F.linear(hd, wd), td, label_smoothing=ls)),
        IMPLS[2]: lambda: _backward(F.cross_entropy(F.linear(hd, wd).redistribute(
            placements=[Replicate()]), td, label_smoothing=ls)),
    }
    _drop_unsupported(impls, ls)
    return impls, wd, args.rows * w.shape[0] * w.element_size()


def _drop_unsupported(impls: dict, label_smoothing: float) -> None:
    # loss_parallel() refuses label smoothing (torch 2.13: DTensor has no sharding for the
    # in-place masked_fill_ its smoothing term does on a Partial tensor).
    if label_smoothing:
        del impls[IMPLS[1]]


PROBLEMS = {"cross_entropy": _ce_problem, "linear_cross_entropy": _linear_problem}


def _target(args, mesh):
    t = torch.randint(0, args.vocab // args.world * args.world, (args.rows,),
                      generator=torch.Generator().manual_seed(0))
    return DTensor.from_local(t, mesh, [Replicate()])


def _backward(loss):
    loss.backward()
    return loss


def _under_loss_parallel(loss_fn):
    from torch.distributed.tensor.parallel import loss_parallel

    with loss_parallel():  # (its backward must run inside the context too)
        return _backward(loss_fn())


def _runner(fwd_bwd, leaf):
    def run():
        loss = fwd_bwd()
        grad, leaf.grad = leaf.grad, None
        return loss, grad

    return run


def _slowest(seconds: float) -> float:
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _rank(rank: int, args, port: int, out_file: str) -> None:
    from torch.distributed.tensor import init_device_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.world))
    dist.init_process_group("gloo", rank=rank, world_size=args.world)
    mesh = init_device_mesh("cpu", (args.world,))
    rows = []
    for op in args.ops:
        for dtype_name in args.dtypes:
            impls, leaf, slice_bytes = PROBLEMS[op](args, mesh, getattr(torch, dtype_name), rank)
            ref_loss, ref_grad = _runner(impls[IMPLS[0]], leaf)()
            ref_loss = ref_loss.full_tensor().double()
            ref_grad = ref_grad.to_local().double()
            for impl in impls:
                run = _runner(impls[impl], leaf)
                loss, grad = run()  # warm-up, and the check
                loss = loss.detach().full_tensor().double()
                # (a gathered path's gradient may come back replicated: this rank's slice)
                mine = grad.redistribute(placements=leaf.placements).to_local().double()
                check = check_entry(loss_err=float((loss - ref_loss).abs()),
                                    grad_err=float((mine - ref_grad).abs().max()),
                                    loss=float(loss),
                                    grad_finite=bool(mine.isfinite().all()))
                del loss, grad, mine
                times = []
                for _ in range(args.repeats):
                    dist.barrier()
                    t0 = time.perf_counter()
                    run()
                    times.append(_slowest(time.perf_counter() - t0))
                peak = memory.peak_extra_bytes(run, torch.device("cpu"), method="profiler")
                peak_t = torch.tensor([peak], dtype=torch.float64)
                dist.all_reduce(peak_t, op=dist.ReduceOp.MAX)
                rows.append({
                    "op": op, "impl": impl, "dtype": dtype_name, "rows": args.rows,
                    "vocab": args.vocab, "hidden": args.hidden if op != "cross_entropy" else None,
                    "local_bytes": slice_bytes, "median_ms": statistics.median(times) * 1e3,
                    "peak_extra_bytes": int(peak_t),
                    "peak_extra_ratio": float(peak_t) / slice_bytes,
                    "check": check,
                })
    if rank == 0:
        Path(out_file).write_text(json.dumps(rows, allow_nan=False))
    dist.destroy_process_group()


def check_entry(loss_err: float, grad_err: float, loss: float, grad_finite: bool) -> dict:
    """A row's check against ours. JSON has no inf/nan (results_json.dumps refuses them): a
    non-finite difference is null, ok is False and the message says what was not finite
    (this row's loss or gradient, else ours'). The gradient's is this rank's slice's."""
    finite = math.isfinite(loss_err) and math.isfinite(grad_err)
    if finite:
        message = ""
    elif not math.isfinite(loss):
        message = f"loss {loss}"
    elif not grad_finite:
        message = "gradient not finite"
    else:
        message = "ours not finite"
    return {"loss_err_vs_ours": loss_err if math.isfinite(loss_err) else None,
            "grad_err_vs_ours": grad_err if math.isfinite(grad_err) else None,
            "ok": finite, "message": message}


def _check_cell(check: dict) -> str:
    errs = [check["loss_err_vs_ours"], check["grad_err_vs_ours"]]
    text = " / ".join("-" if e is None else f"{e:.1e}" for e in errs)
    # (files from before "ok" was written hold a bare inf/nan instead)
    ok = check.get("ok", all(e is not None and math.isfinite(e) for e in errs))
    return text if ok else f"FAILED ({check.get('message') or 'not finite'}): {text}"


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_CAPTIONS = {
    "cross_entropy": "logits ({rows}, {vocab}) sharded on the class dim; slice: a rank's "
                     "logits",
    "linear_cross_entropy": "hidden ({rows}, {hidden}) replicated, LM head ({vocab}, {hidden}) "
                            "sharded on the vocabulary; slice: a rank's logits, were they "
                            "materialised",
}


def render(doc: dict) -> str:
    from tabulate import tabulate

    d = doc["device"]
    text = (f"## Tensor-parallel losses: {d['name']} ({doc['world']} CPU ranks, gloo)\n\n"
            f"{doc['date']} · torch {doc['software']['torch']} · commit "
            f"{doc['git']['commit'][:10]} · mean loss, forward+backward"
            + (f", label smoothing {doc['label_smoothing']}" if doc.get("label_smoothing")
               else "") + "\n")
    for op in dict.fromkeys(r["op"] for r in doc["rows"]):
        rows = [r for r in doc["rows"] if r["op"] == op]
        table = [[r["dtype"], r["impl"], f"{r['local_bytes'] / 2**20:.0f}",
                  f"{r['median_ms']:.1f}", f"{r['peak_extra_bytes'] / 2**20:.1f}",
                  f"{r['peak_extra_ratio']:.2f}x", _check_cell(r["check"])]
                 for r in rows]
        text += (f"\n### {op}: " + _CAPTIONS[op].format(**rows[0]) + "\n\n" + tabulate(
            table, headers=["dtype", "implementation", "slice MiB", "median ms",
                            "peak extra MiB per rank", "peak / slice",
                            "loss / max grad diff vs ours"], tablefmt="github") + "\n")
    return text


def write(doc: dict, text: str, out: Path, started: datetime) -> None:
    """tp-<slug>-<stamp>.json (strict JSON) and tp-<slug>[-smoothing]-latest.md under out."""
    out.mkdir(parents=True, exist_ok=True)
    slug, stamp = doc["device"]["slug"], started.strftime("%Y%m%dT%H%M%SZ")
    (out / f"tp-{slug}-{stamp}.json").write_text(results_json.dumps(doc))
    kind = "-smoothing" if doc["label_smoothing"] else ""
    (out / f"tp-{slug}{kind}-latest.md").write_text(text)


def main(argv=None) -> int:
    args = parse_args(argv)
    if DTensor is None:
        raise SystemExit("needs torch.distributed.tensor (PyTorch 2.5 or newer)")
    if args.out:
        try:  # before measuring: a run that cannot be saved should not start
            args.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            _parser().error(f"argument --out: {e}")
    started = datetime.now(timezone.utc)
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "rows.json")
        mp.spawn(_rank, args=(args, _free_port(), out_file), nprocs=args.world)
        rows = json.loads(Path(out_file).read_text())
    cpu = torch.device("cpu")
    doc = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION,
           "date": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
           "command": " ".join(["python -m benchmarks.tensor_parallel", *sys.argv[1:]]),
           "world": args.world, "device": device_info.describe(cpu),
           "software": device_info.software(), "git": device_info.git_state(),
           "memory_method": "profiler", "repeats": args.repeats,
           "label_smoothing": args.label_smoothing, "rows": rows}
    text = render(doc)
    print(text)
    if args.out:
        write(doc, text, args.out, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
