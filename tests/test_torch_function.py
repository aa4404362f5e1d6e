"""The __torch_function__ protocol, as F.cross_entropy keeps it (_overrides.py): torch.fx's
symbolic tracing records one call of the loss, and a tensor subclass overriding
__torch_function__ gets the loss itself, with the call's arguments."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import torchloss_fused as tlf

C, H = 11, 6
ALPHA = torch.rand(C)

CALLS = {
    "cross_entropy": lambda z, y: tlf.cross_entropy(z, y, None, None, -100, None, "sum",
                                                    0.1, z_loss=1e-3),
    "cross_entropy_module": tlf.CrossEntropyLoss(weight=torch.rand(C) + 0.5),
    "cross_entropy_prob": lambda z, y: tlf.cross_entropy(z, F.softmax(z.detach() * 0.5, 1)),
    "focal_loss": lambda z, y: tlf.focal_loss(z, y, 1.5, alpha=ALPHA.to(z.device)),
    "focal_module": tlf.FocalLoss(gamma=2.0),
    "sigmoid_focal_loss": lambda z, y: tlf.sigmoid_focal_loss(z, torch.sigmoid(z.detach()),
                                                              reduction="mean"),
}


class Model(torch.nn.Module):
    def __init__(self, loss=None):
        super().__init__()
        self.head = torch.nn.Linear(H, C)
        self.loss = loss

    def forward(self, h, y):
        if self.loss is None:
            return tlf.linear_cross_entropy(h, self.head.weight, y, self.head.bias,
                                            reduction="sum", z_loss=1e-3)
        return self.loss(self.head(h), y)


def _loss_and_grad(model, h, y):
    model.zero_grad()
    loss = model(h, y)
    loss.backward()
    return loss.detach(), model.head.weight.grad.clone()


@pytest.mark.parametrize("name", [*sorted(CALLS), "linear_cross_entropy"])
def test_fx_symbolic_trace_records_the_loss(device, backend, name):
    loss = CALLS.get(name)
    model = Model(loss).to(device)
    graph_module = torch.fx.symbolic_trace(model)
    public = {getattr(tlf, n) for n in ("cross_entropy", "focal_loss", "sigmoid_focal_loss",
                                        "linear_cross_entropy")}
    called = [n.target for n in graph_module.graph.nodes if n.op == "call_function"]
    assert len(set(called) & public) == 1, called  # (one call of the loss, not its insides)
    for n in (8, 5):
        h = torch.randn(n, H, device=device)
        y = torch.randint(0, C, (n,), device=device)
        y[0] = -100
        for got, want in zip(_loss_and_grad(graph_module, h, y), _loss_and_grad(model, h, y),
                             strict=True):
            assert torch.equal(got, want)


class Recording(torch.Tensor):
    """A subclass overriding __torch_function__: records the functions it is handed."""

    seen: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.seen.append((func, kwargs or {}))
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("which", ["input", "target", "weight"])
def test_subclass_is_handed_the_loss(device, backend, which):
    x = torch.randn(7, C, device=device)
    y = torch.randint(0, C, (7,), device=device)
    w = torch.rand(C, device=device) + 0.5
    args = {"input": x, "target": y, "weight": w}
    args[which] = args[which].as_subclass(Recording)
    Recording.seen.clear()
    got = tlf.cross_entropy(args["input"], args["target"], weight=args["weight"],
                            reduction="sum", logit_scale=0.5)
    func, kwargs = Recording.seen[0]
    assert func is tlf.cross_entropy
    assert kwargs["reduction"] == "sum" and kwargs["logit_scale"] == 0.5
    assert len(Recording.seen) == 1  # (the loss ran with the override disabled)
    want = tlf.cross_entropy(x, y, weight=w, reduction="sum", logit_scale=0.5)
    assert torch.equal(got.as_subclass(torch.Tensor), want)


def test_parameters_take_the_plain_path():
    # nn.Parameter (like DTensor and FakeTensor) disables __torch_function__: no turn to it.
    x = torch.nn.Parameter(torch.randn(5, C))
    y = torch.randint(0, C, (5,))
    loss = tlf.cross_entropy(x, y)
    assert type(loss) is torch.Tensor
    loss.backward()
    assert x.grad is not None


class RecordingMode(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.seen.append(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("loss", ["cross_entropy", "focal_loss"])
def test_torch_function_mode_sees_the_loss_once(device, loss):
    # As F.cross_entropy under a mode: the loss, then backward; nothing from inside it.
    x = torch.randn(6, C, device=device, requires_grad=True)
    y = torch.randint(0, C, (6,), device=device)
    with RecordingMode() as mode:
        getattr(tlf, loss)(x, y).backward()
    assert mode.seen[0] is getattr(tlf, loss) and len(mode.seen) == 2, mode.seen


def test_default_device_context(device):
    # torch.device(...) as a context (and set_default_device) is a TorchFunctionMode: the
    # loss still runs where its inputs are, with F's results.
    x = torch.randn(6, C, device=device, requires_grad=True)
    y = torch.randint(0, C, (6,), device=device)
    with torch.device("meta"):
        got = tlf.cross_entropy(x, y, label_smoothing=0.1)
    assert got.device == x.device
    torch.testing.assert_close(got, F.cross_entropy(x, y, label_smoothing=0.1))


class LayoutMode(torch.overrides.TorchFunctionMode):
    """Records how the first function it is handed got its arguments."""

    def __init__(self):
        super().__init__()
        self.layout = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.layout is None:
            self.layout = (len(args), sorted(kwargs or {}))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("call", [
    lambda f, x, y, w: f(x, y),
    lambda f, x, y, w: f(x, y, w, None, 3, None, "sum"),
    lambda f, x, y, w: f(x, y, weight=w, label_smoothing=0.1),
    lambda f, x, y, w: f(input=x, target=y, reduction="none"),
], ids=["two", "all_positional", "keywords", "by_name"])
def test_override_gets_fs_argument_layout(call):
    # A handler written for F.cross_entropy's arguments (two positional, its six options by
    # keyword, however the call was written) reads ours alike; extras only where given.
    x, y, w = torch.randn(4, C), torch.randint(0, C, (4,)), torch.rand(C)
    layouts = []
    for f in (F.cross_entropy, tlf.cross_entropy):
        with LayoutMode() as mode:
            call(f, x, y, w)
        layouts.append(mode.layout)
    assert layouts[0] == layouts[1] == (2, sorted(functional_keywords())), layouts
    with LayoutMode() as mode:
        tlf.cross_entropy(x, y, z_loss=1e-3)
    assert mode.layout == (2, sorted(functional_keywords() + ("z_loss",)))


def functional_keywords():
    return ("weight", "size_average", "ignore_index", "reduce", "reduction", "label_smoothing")
