"""Forward+backward of a scaled cross-entropy, with and without the upstream guess
(torchloss_fused/_upstream_guess.py), taking turns: ``python -m benchmarks.scaled_loss``.

Not a row of the main benchmark, whose backward is ``loss.backward()`` on the loss itself
(no rescale to save). Prints the best of the later steps of each run, in ms, for each
dtype and scale; the guess needs two steps to form, so the first three steps are warm-up.
"""

from __future__ import annotations

import argparse
import time

import torch

import torchloss_fused as tlf
from torchloss_fused import _upstream_guess

from .arg_types import positive_int

WARMUP_STEPS = 3  # (the guess forms over two steps)

SCALES = {
    "loss": lambda loss: loss,
    "loss / 4": lambda loss: loss / 4,
    "loss / 3": lambda loss: loss / 3,
    "loss * 65536": lambda loss: loss * 65536,
}


def _best_step_ms(x: torch.Tensor, t: torch.Tensor, scale, guess: bool, steps: int) -> float:
    saved = _upstream_guess.MIN_ELEMENTS
    _upstream_guess.MIN_ELEMENTS = saved if guess else 1 << 62
    _upstream_guess.GUESSES.clear()
    times = []
    try:
        for _ in range(steps):
            start = time.perf_counter()
            (grad,) = torch.autograd.grad(scale(tlf.cross_entropy(x, t)), x)
            times.append(time.perf_counter() - start)
            del grad
    finally:
        _upstream_guess.MIN_ELEMENTS = saved
    return min(times[WARMUP_STEPS:]) * 1e3


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=positive_int, default=4096)
    parser.add_argument("--classes", type=positive_int, default=32000)
    parser.add_argument("--steps", type=positive_int, default=8,
                        help=f"steps per run, the first {WARMUP_STEPS} untimed (more than that)")
    parser.add_argument("--rounds", type=positive_int, default=2)
    args = parser.parse_args(argv)
    if args.steps <= WARMUP_STEPS:  # (min() of no timed step had raised a ValueError)
        parser.error(f"argument --steps: must be more than {WARMUP_STEPS}")
    torch.manual_seed(0)
    print(f"cpu, {torch.get_num_threads()} threads, ({args.rows}, {args.classes}); "
          f"best of steps {WARMUP_STEPS + 1}-{args.steps}, ms; each round: without the guess, "
          "then with it")
    for dtype in (torch.bfloat16, torch.float32):
        x = (torch.randn(args.rows, args.classes) * 2).to(dtype).requires_grad_()
        t = torch.randint(0, args.classes, (args.rows,))
        for name, scale in SCALES.items():
            runs = [(_best_step_ms(x, t, scale, False, args.steps),
                     _best_step_ms(x, t, scale, True, args.steps))
                    for _ in range(args.rounds)]
            off = ", ".join(f"{a:.1f}" for a, _ in runs)
            on = ", ".join(f"{b:.1f}" for _, b in runs)
            print(f"{str(dtype)[6:]:9} {name:13} without: {off:14} with: {on}", flush=True)


if __name__ == "__main__":
    main()
