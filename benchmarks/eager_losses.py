"""Eager pure-PyTorch focal losses, written the way a user would: the focal baselines.

Run in fp64 they are also the oracle for the focal rows. Defaults follow the benchmark
configuration: softmax focal with gamma=2 and no alpha; sigmoid focal with
torchvision.ops.sigmoid_focal_loss's formula, alpha=0.25, gamma=2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

GAMMA = 2.0
SIGMOID_ALPHA = 0.25


def softmax_focal_rows(x: torch.Tensor, y: torch.Tensor, gamma: float = GAMMA) -> torch.Tensor:
    """Per-row softmax focal loss -(1 - p_t)^gamma * log p_t over the classes of dim 1."""
    log_pt = F.log_softmax(x, dim=1).gather(1, y.unsqueeze(1)).squeeze(1)
    return -((1 - log_pt.exp()) ** gamma) * log_pt


def softmax_focal_loss(x: torch.Tensor, y: torch.Tensor, gamma: float = GAMMA) -> torch.Tensor:
    return softmax_focal_rows(x, y, gamma).mean()


def sigmoid_focal_elements(
    inputs: torch.Tensor, targets: torch.Tensor, alpha: float = SIGMOID_ALPHA, gamma: float = GAMMA
) -> torch.Tensor:
    """Elementwise sigmoid focal loss, torchvision's definition (alpha < 0 disables alpha)."""
    p = torch.sigmoid(inputs)
    bce = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = bce * ((1 - p_t) ** gamma)
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


def sigmoid_focal_loss(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return sigmoid_focal_elements(inputs, targets).mean()


def linear_cross_entropy(hidden, weight, target) -> torch.Tensor:
    """The materialised baseline: the full N x V logits, then cross-entropy."""
    return F.cross_entropy(F.linear(hidden, weight), target)


class _ThreeProducts(torch.autograd.Function):
    """Only the matrix products a linear cross-entropy cannot avoid: logits = h W^T in the
    forward; grad_h = G W and grad_W = G^T h in the backward, G standing in for the logits'
    gradient (the logits buffer itself: the values do not matter). No loss is computed."""

    @staticmethod
    def forward(ctx, hidden, weight):
        logits = hidden @ weight.t()
        ctx.save_for_backward(hidden, weight, logits)
        return hidden.new_zeros(())

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, g = ctx.saved_tensors
        return g @ weight, g.t() @ hidden


def linear_matmuls_only(hidden, weight, target) -> torch.Tensor:
    """The time floor of linear_cross_entropy: its three matrix products alone."""
    del target
    return _ThreeProducts.apply(hidden, weight)
