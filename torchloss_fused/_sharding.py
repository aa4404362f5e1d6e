"""DTensor sharding rules for every op, so that tensor-parallel training can call the
losses on DTensors sharded over rows (or over a K-dim input's spatial dim), or replicated.

Every op works row by row: rows are independent, and a row needs all of its classes. So an
op runs on each rank's local rows unchanged when the logits are sharded on the batch dim
(0) or the spatial dim (2) of the (B, C, D) row view, with per-row tensors sharded alike
and per-class vectors (weight, alpha) replicated. Logits sharded on the class dim are not
listed here: `tlf.cross_entropy`/`tlf.focal_loss` take them to the vocab-parallel path
(vocab_parallel.py) before any op is called; an op called directly on them gets its input
redistributed by DTensor to a listed layout. The sigmoid focal ops are elementwise: any
shard dim works, and their sums become partial sums over the ranks.

Linear cross-entropy's ops run on local rows the same way (hidden and target split over
tokens, the LM head's weight and bias replicated): each rank's grad_weight, grad_bias and
summed loss are its part of the total (Partial). A weight sharded over the vocabulary never
reaches these ops from `linear_cross_entropy` (linear_ce/vocab_parallel.py serves it); an
op called directly with one gets the weight gathered by DTensor.

Without torch.distributed (or before the public DTensor API of torch 2.5) nothing is
registered and nothing else changes.
"""

from __future__ import annotations

import torch

# Roles of an op's arguments and outputs, in schema order: "logits" (B, C, D),
# "rows" (B, D), "target" (rows for class indices, logits for probabilities),
# "classes" (C), None for a non-tensor argument.
_SOFTMAX_ROLES = {
    "ce_fwd": (("rows", "rows"), ("logits", "target", "classes") + (None,) * 6),
    "_ce_bwd": (("logits",), ("rows", "rows", "logits", "target", "classes", "rows")
                + (None,) * 5),
    "_ce_bwd_inplace": ((), ("rows", "rows", "logits", "target", "classes", "rows")
                        + (None,) * 5),
    "ce_fwd_grad": (("rows", "rows", "logits"), ("logits", "target", "classes")
                    + (None,) * 5 + ("rows",)),
    "focal_fwd": (("rows", "rows"), ("logits", "target", "classes") + (None,) * 3),
    "_focal_bwd": (("logits",), ("rows", "logits", "target", "classes", "rows")
                   + (None,) * 3),
    "focal_fwd_grad": (("rows", "rows", "logits"), ("logits", "target", "classes")
                       + (None,) * 3 + ("rows",)),
    "_rescale_grad_rows": ((), ("logits", "rows", "rows")),
}

# Elementwise ops (sigmoid focal, _accumulate_): "elem" (the first input's shape), "sum"
# (a 0-dim total).
_ELEMENTWISE_ROLES = {
    "sigmoid_focal_fwd": (("elem",), ("elem", "elem", None, None)),
    "_sigmoid_focal_bwd": (("elem",), ("elem", "elem", "elem", None, None)),
    "sigmoid_focal_sum": (("sum",), ("elem", "elem", None, None, None)),
    "sigmoid_focal_sum_grad": (("sum", "elem"), ("elem", "elem", None, None, None)),
    "_accumulate_": ((), ("elem", "elem")),
}


# Linear cross-entropy ops: "tokens" (N, H) or (N,), split over rows; "vocab" (V, H) or (V,)
# replicated (the head's weight and bias; "classes", the per-class weights, likewise);
# "partial" a total each rank holds a part of (the loss's sum, grad_weight, grad_bias);
# "whole" a replicated scalar (the mean's denominator).
_LINEAR_ROLES = {
    "linear_ce_fwd": (("tokens", "tokens"), ("tokens", "vocab", "vocab", "tokens", "classes")
                      + (None,) * 6),
    "linear_ce_fwd_grad": (("partial", "tokens", "tokens", "partial", "partial"),
                           ("tokens", "vocab", "vocab", "tokens", "classes", "whole")
                           + (None,) * 9),
    "_linear_ce_bwd": (("tokens", "partial", "partial"), ("tokens", "tokens", "tokens",
                                                          "vocab", "vocab", "tokens",
                                                          "classes", "tokens") + (None,) * 9),
}


def _linear_rule(outputs, inputs, P):
    def rule(*args):
        def place(role, split, present=True):
            if role is None or not present:
                return None
            if not split or role in ("vocab", "classes", "whole"):
                return P.Replicate()
            return P.Partial() if role == "partial" else P.Shard(0)

        return [([place(r, split) for r in outputs],
                 [place(r, split, a is not None) for r, a in zip(inputs, args)])
                for split in (False, True)]

    return rule


def _softmax_placement(role, arg, split, P):
    """The placement of an argument with `role` when the rows are split along `split`
    ("batch", "spatial", or None for replicated)."""
    if role is None or arg is None:
        return None
    if split is None or role == "classes":
        return P.Replicate()
    if role == "target":
        role = "logits" if arg.ndim == 3 else "rows"
    if role == "logits":
        return P.Shard(0 if split == "batch" else 2)
    return P.Shard(0 if split == "batch" else 1)  # rows


def _softmax_rule(outputs, inputs, P):
    def rule(*args):
        strategies = []
        for split in (None, "batch", "spatial"):
            outs = [_softmax_placement(role, True, split, P) for role in outputs]
            ins = [_softmax_placement(role, arg, split, P) for role, arg in zip(inputs, args)]
            strategies.append((outs, ins))
        return strategies

    return rule


def _elementwise_rule(outputs, inputs, P):
    def rule(input, *args):
        def placements(dim):
            def place(role, present=True):
                if role is None or not present:
                    return None
                if dim is None:
                    return P.Replicate()
                return P.Partial() if role == "sum" else P.Shard(dim)
            return ([place(r) for r in outputs],
                    [place(r, a is not None) for r, a in zip(inputs, (input, *args))])

        return [placements(None)] + [placements(d) for d in range(input.ndim)]

    return rule


_TABLES = {"loss": ((_SOFTMAX_ROLES, _softmax_rule), (_ELEMENTWISE_ROLES, _elementwise_rule)),
           "linear": ((_LINEAR_ROLES, _linear_rule),)}


def register(namespace: str, kind: str = "loss") -> bool:
    """Registers the rules for the ops of `namespace` (`kind`: "loss" for the loss ops,
    "linear" for linear cross-entropy's); False where DTensor is unavailable."""
    try:
        import torch.distributed.tensor as P
        from torch.distributed.tensor.experimental import register_sharding
    except ImportError:
        return False
    ops = getattr(torch.ops, namespace)
    for table, make in _TABLES[kind]:
        for name, (outputs, inputs) in table.items():
            register_sharding(getattr(ops, name).default)(make(outputs, inputs, P))
    return True
