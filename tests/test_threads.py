"""Losses computed from several Python threads at once give the bits they give alone.

The C++ ops release the GIL, and calls share process-wide state: the CPU buffer cache
(host_buffers.cpp), the upstream-gradient guesses (_upstream_guess.py), the thread-local
post-scale of a guessed forward (reduced_loss.cpp). A data race there would show as a
loss or gradient that differs from the same call made alone. On CUDA each thread runs on
a stream of its own.
"""

from __future__ import annotations

import contextlib
import threading

import pytest
import torch

import torchloss_fused as tlf
from torchloss_fused import _upstream_guess

from .helpers import random_logits, random_targets

THREADS, ROUNDS = 4, 6


def _cases(device):
    """(loss of (logits, target), logits, target, upstream scale): every fused op, each
    dtype, and scaled losses, whose guesses the threads race to update."""
    shapes = [(48, 1000), (96, 3001), (16, 40000), (200, 257)]
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
    options = [{}, {"label_smoothing": 0.1}, {"z_loss": 1e-4, "softcap": 30.0},
               {"reduction": "sum", "ignore_index": 3}]
    cases = []
    for i in range(12):
        (n, c), dtype = shapes[i % 4], dtypes[i % 4]
        x = random_logits((n, c), dtype, device, requires_grad=False)
        t = random_targets((n,), c, device, ignore_index=3, ignore_frac=0.1)
        scale = (1.0, 0.25, 3.0)[i % 3]
        kind = i % 6
        if kind == 0:
            fn = tlf.focal_loss
        elif kind == 1:
            fn = tlf.sigmoid_focal_loss
            t = torch.rand_like(x)
        elif kind == 2:
            fn = tlf.cross_entropy
            t = torch.softmax(torch.randn_like(x, dtype=torch.float32), 1).to(dtype)
        else:
            kw = options[(i // 4) % 4]
            fn = lambda x, t, kw=kw: tlf.cross_entropy(x, t, **kw)  # noqa: E731
        cases.append((fn, x, t, scale))
    hidden = random_logits((64, 32), torch.float32, device, requires_grad=False)
    head = random_logits((2048, 32), torch.float32, device, requires_grad=False)
    t = random_targets((64,), 2048, device)
    cases.append((lambda h, t: tlf.linear_cross_entropy(h, head, t, chunk_size=16),
                  hidden, t, 0.5))
    return cases


def _run(case):
    fn, x, t, scale = case
    x = x.clone().requires_grad_()
    loss = fn(x, t)
    if loss.dim():
        loss = loss.sum()
    (loss * scale).backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("guess_small_losses", [False, True])
def test_concurrent_calls_match_lone_calls(device, backend, monkeypatch, guess_small_losses):
    if guess_small_losses:  # (the guessed-forward path for these small losses too)
        monkeypatch.setattr(_upstream_guess, "MIN_ELEMENTS", 0)
    cases = _cases(device)
    alone = [_run(case) for case in cases]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    mismatches, failures = [], []

    def worker(k: int) -> None:
        stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        try:
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                if stream is not None:
                    stream.wait_stream(torch.cuda.default_stream(device))
                for r in range(ROUNDS):
                    for j in range(len(cases)):
                        i = (j * (k + 1) + r) % len(cases)  # (each thread its own order)
                        loss, grad = _run(cases[i])
                        if stream is not None:
                            stream.synchronize()
                        if not (torch.equal(loss, alone[i][0]) and torch.equal(grad, alone[i][1])):
                            mismatches.append((k, r, i))
        except Exception as e:  # (reported below: an exception in a thread is not a failure)
            failures.append(repr(e))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures[:3]
    assert not mismatches, f"{len(mismatches)} results differ from the lone calls': " \
        f"(thread, round, case) {mismatches[:5]}"

