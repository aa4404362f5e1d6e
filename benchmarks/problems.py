"""The inputs of each benchmarked op, generated deterministically on the device.

Input set `k` of a case is a pure function of (case, seed + k): input sets can be rebuilt
after an implementation that writes into its inputs (inplace backward) and still match the
oracle computed once per case. Tensors that a user would differentiate are leaves with
requires_grad=True for the forward+backward ops. (N, C, H, W) logits are made in the
case's memory format (Case.layout), with the same values in every layout.
"""

from __future__ import annotations

import math

import torch

from .cases import LINEAR_OPS, Case

LOGIT_STD = 2.0  # a spread like trained LM logits, so the softmax is not near-uniform
POSITIVE_RATE = 0.01  # share of positive labels in sigmoid focal targets (detection heads)


def make_inputs(case: Case, device: torch.device, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    dtype, grad = case.torch_dtype, case.backward

    def randn(*shape, scale=1.0, memory_format=torch.contiguous_format):
        t = torch.randn(*shape, generator=gen, device=device, dtype=dtype)
        if scale != 1.0:
            t.mul_(scale)
        if memory_format is not torch.contiguous_format:
            t = t.contiguous(memory_format=memory_format)
        return t.requires_grad_(grad)

    if case.op == "sigmoid_focal_fwd_bwd":
        n, c = case.shape
        targets = torch.rand(n, c, generator=gen, device=device) < POSITIVE_RATE
        return randn(n, c, scale=LOGIT_STD), targets.to(dtype)
    if case.op in LINEAR_OPS:
        n, h, v = case.shape
        hidden = randn(n, h)
        weight = randn(v, h, scale=LOGIT_STD / math.sqrt(h))
        if case.op == "linear_ce_soft_fwd_bwd":  # a teacher's distribution, in the dtype
            teacher = torch.randn(n, v, generator=gen, device=device).mul_(LOGIT_STD)
            return hidden, weight, torch.softmax(teacher, -1).to(dtype)
        return hidden, weight, _targets(n, v, gen, device)
    if case.spatial:
        n, c, h, w = case.shape
        logits = randn(n, c, h, w, scale=LOGIT_STD, memory_format=case.memory_format)
        return logits, torch.randint(0, c, (n, h, w), generator=gen, device=device)
    n, v = case.shape
    return randn(n, v, scale=LOGIT_STD), _targets(n, v, gen, device)


class _ModelOutput(torch.autograd.Function):
    # (forward returns a detached alias: a non-leaf output on the input's own storage, with
    # no view relation to it that autograd would trace back to the leaf)
    @staticmethod
    def forward(ctx, x):
        return x.detach()

    @staticmethod
    def backward(ctx, grad):
        return grad


def as_model_output(x: torch.Tensor) -> torch.Tensor:
    """x as a model hands its logits on: the output of an op (here an identity), on x's own
    storage, not a copy. inplace_backward=True refuses a leaf that requires grad (its values
    would become its own gradient), which is what a benchmark's or a test's input is; the
    leaf is then only the buffer the loss overwrites, and receives that gradient."""
    return _ModelOutput.apply(x)


def _targets(n: int, v: int, gen: torch.Generator, device) -> torch.Tensor:
    return torch.randint(0, v, (n,), generator=gen, device=device)


def input_set_bytes(inputs: tuple[torch.Tensor, ...]) -> int:
    return sum(t.numel() * t.element_size() for t in inputs)


def grad_inputs(inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """The inputs whose gradient the benchmark checks and drops."""
    return [t for t in inputs if t.requires_grad]


def input_set_nbytes(case: Case) -> int:
    """Bytes of one input set, known before any tensor is made."""
    size = case.torch_dtype.itemsize
    if case.op == "sigmoid_focal_fwd_bwd":
        n, c = case.shape
        return 2 * n * c * size
    if case.op in LINEAR_OPS:
        n, h, v = case.shape
        target = n * v * size if case.op == "linear_ce_soft_fwd_bwd" else 8 * n
        return (n * h + v * h) * size + target
    if case.spatial:  # logits, and one int64 target per row (N x H x W)
        return math.prod(case.shape) * size + 8 * case.rows
    n, v = case.shape
    return n * v * size + 8 * n
