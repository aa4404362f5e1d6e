"""A longer run of the CUDA kernel emulator than the suite's (by hand; not collected by pytest).

test_cuda_emulated.py runs one fixed sample. This runs that sample under other seeds (the
sample's drawn axes: class counts, row caches, grids, options, schedules) and, with
--random K, K random launcher-under-tuning scenarios plus K random directly launched block
and cluster rows (bulk copies or not) per seed, each checked as the suite checks its own:

    python -m tests.cuda_emulated_soak --seeds 1 2 3 --random 60

A failure prints the scenario's description, which a test can then pin down.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from functools import partial
from pathlib import Path

import torch

from . import test_cuda_emulated as T

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ROW_LAYOUTS = ["contig", "mis1", "mis3", "padded", "sliced"]


def random_configs(rnd: random.Random, k: int) -> list[T.SoftmaxConfig]:
    """k launcher scenarios under a random BlockRowTuning on a random emulated device, and k
    direct block / cluster rows. (4 rows at least: some options mark rows 2 and 3.)"""
    out = []
    for _ in range(k):
        tuning = (rnd.choice([128, 256, 512]),
                  rnd.choice([-1, -1, 0, 4096, 8192, 20000, 1 << 30]),
                  rnd.choice([0, 0, 300, 2048, 1 << 20]), rnd.choice([0, 2, 4, 8, 16]),
                  rnd.choice([0, 1]))
        out.append(T.SoftmaxConfig(
            rnd.choice(DTYPES), rnd.choice([4097, 5003, 9000, 16411, 20000, 33333, 50000, 70001]),
            rnd.choice(ROW_LAYOUTS), rnd.choice(T.OPTIONS), launch="auto", B=rnd.choice([4, 6]),
            device=rnd.choice([0, 1, 2, 3, 4]), tuning=tuning))
    for _ in range(k):
        cluster = rnd.random() < 0.5
        threads, blocks = (rnd.choice([(32, 2), (32, 4), (64, 2), (64, 4), (32, 8)]) if cluster
                           else (rnd.choice([32, 64]), 1))
        out.append(T.SoftmaxConfig(
            rnd.choice(DTYPES), rnd.choice([700, 1000, 1033, 2049, 3079, 4111, 5003, 6007]),
            rnd.choice(ROW_LAYOUTS), rnd.choice(T.OPTIONS), group=3 if cluster else 2,
            threads=threads, vec=True, cluster=blocks, bulk=rnd.random() < 0.5,
            cache=rnd.choice(["none", "part", "full"]), grid=blocks * rnd.choice([1, 2]),
            B=rnd.choice([4, 5, 8]), schedule_check=rnd.random() < 0.5,
            prefetch=rnd.choice([0, 200])))
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", required=True)
    ap.add_argument("--random", type=int, default=0, metavar="K",
                    help="random launcher and direct block / cluster scenarios per seed (each)")
    ap.add_argument("--no-sample", action="store_true",
                    help="only the random scenarios, not the suite's sample")
    args = ap.parse_args(argv)
    exe, asan = T.build_harness()
    print(f"emulator: {exe} ({'ASan + UBSan' if asan else 'canaries'})", flush=True)
    failed = 0
    for seed in args.seeds:
        sample = [] if args.no_sample else T.build_sample(seed)
        sample += [partial(T.SoftmaxScenario, cfg=cfg, sid=f"x{i}", seed=seed * 1000 + i)
                   for i, cfg in enumerate(random_configs(random.Random(seed), args.random))]
        with tempfile.TemporaryDirectory() as work:
            outcome = T.run_sample(exe, Path(work), sample)
        counts = {k: len(v) for k, v in outcome.fails.items()}
        print(f"seed {seed}: {len(sample)} scenarios, "
              + (f"failures {counts}" if counts else "all checks passed"), flush=True)
        for category, lines in outcome.fails.items():
            for line in lines[:5]:
                print(f"    {category}: {line[:600]}", flush=True)
        failed += bool(counts)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
