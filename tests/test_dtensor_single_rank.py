"""The DTensor paths on every device, in this process, on a mesh of one rank: a GPU
session checks the vocab-parallel and row-sharded paths on the CUDA kernels (NCCL) with
this file; tests/test_dtensor.py covers several ranks, on CPU (gloo). One rank still runs
every step of those paths: the layouts, the kernels on the slice, the collectives."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import torchloss_fused as tlf

from .conftest import DEVICES
from .helpers import oracle_cross_entropy

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is unavailable", allow_module_level=True)
pytest.importorskip("torch.distributed.tensor.experimental")

from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.tensor import Replicate, Shard, distribute_tensor  # noqa: E402


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    """A process group of one rank, for CPU (gloo) and, where present, CUDA (NCCL)."""
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    backend = "gloo"
    if torch.cuda.is_available() and dist.is_nccl_available():
        backend = "cpu:gloo,cuda:nccl"
    store = dist.FileStore(str(tmp_path_factory.mktemp("pg") / "store"), 1)
    dist.init_process_group(backend, store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture(params=DEVICES)
def mesh(request, group):
    if request.param == "cuda" and not dist.is_nccl_available():
        pytest.skip("NCCL is unavailable")
    return init_device_mesh(request.param, (1,))


def _tol(dtype):
    if dtype in (torch.bfloat16, torch.float16):
        return {"rtol": 2e-2, "atol": 2e-2}
    return {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {}


def _check(ours, ref, dtype, what):
    ours = ours.full_tensor() if hasattr(ours, "full_tensor") else ours
    torch.testing.assert_close(ours.double(), ref.double(), msg=lambda m: f"{what}: {m}",
                               **_tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1},
                                     {"z_loss": 1e-3, "softcap": 20.0, "ignore_index": 3}])
def test_vocab_parallel_cross_entropy(mesh, dtype, options):
    torch.manual_seed(0)
    device = mesh.device_type
    x = (torch.randn(64, 1003, dtype=torch.float64) * 3).to(device)
    t = torch.randint(0, 1003, (64,), device=device)
    xd = distribute_tensor(x.to(dtype), mesh, [Shard(1)]).requires_grad_()
    loss = tlf.cross_entropy(xd, distribute_tensor(t, mesh, [Replicate()]), **options)
    loss.backward()
    x64 = x.to(dtype).double().requires_grad_()
    ref, _ = oracle_cross_entropy(x64, t, **options)
    ref.backward()
    _check(loss, ref, dtype, "loss")
    _check(xd.grad, x64.grad, dtype, "grad")
    assert xd.grad.placements == (Shard(1),)


def test_vocab_parallel_focal_and_padding_rows(mesh):
    torch.manual_seed(1)
    device = mesh.device_type
    x = torch.randn(16, 300, dtype=torch.float64, device=device)
    x[2] = -float("inf")  # a masked padding row, ignored: exact zero gradient
    t = torch.randint(0, 300, (16,), device=device)
    t[2] = -100
    td = distribute_tensor(t, mesh, [Replicate()])
    for fn in (lambda a, b: tlf.focal_loss(a, b, gamma=2.0, reduction="sum"),
               lambda a, b: tlf.cross_entropy(a, b, reduction="sum")):
        xd = distribute_tensor(x, mesh, [Shard(1)]).requires_grad_()
        fn(xd, td).backward()
        plain = x.clone().requires_grad_()
        fn(plain, t).backward()
        _check(xd.grad, plain.grad, torch.float64, "grad")
        assert torch.equal(xd.grad.full_tensor()[2], torch.zeros_like(x[2]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vocab_parallel_linear_cross_entropy(mesh, dtype):
    torch.manual_seed(2)
    device = mesh.device_type
    h = torch.randn(48, 32, dtype=torch.float64, device=device)
    w = torch.randn(517, 32, dtype=torch.float64, device=device) / 4
    t = torch.randint(0, 517, (48,), device=device)
    hd = distribute_tensor(h.to(dtype), mesh, [Replicate()]).requires_grad_()
    wd = distribute_tensor(w.to(dtype), mesh, [Shard(0)]).requires_grad_()
    loss = tlf.linear_cross_entropy(hd, wd, distribute_tensor(t, mesh, [Replicate()]),
                                    chunk_size=16)
    loss.backward()
    h64, w64 = (v.to(dtype).double().requires_grad_() for v in (h, w))
    ref = F.cross_entropy(F.linear(h64, w64), t)
    ref.backward()
    _check(loss, ref, dtype, "loss")
    _check(wd.grad, w64.grad, dtype, "grad weight")
    _check(hd.grad, h64.grad, dtype, "grad hidden")


def test_rows_sharded_through_the_ops(mesh):
    torch.manual_seed(3)
    device = mesh.device_type
    x = torch.randn(40, 77, dtype=torch.float64, device=device)
    t = torch.randint(0, 77, (40,), device=device)
    xd = distribute_tensor(x, mesh, [Shard(0)]).requires_grad_()
    loss = tlf.cross_entropy(xd, distribute_tensor(t, mesh, [Shard(0)]), label_smoothing=0.1)
    loss.backward()
    x64 = x.clone().requires_grad_()
    ref = F.cross_entropy(x64, t, label_smoothing=0.1)
    ref.backward()
    _check(loss, ref, torch.float64, "loss")
    _check(xd.grad, x64.grad, torch.float64, "grad")
    assert xd.grad.placements == (Shard(0),)


@pytest.mark.parametrize("dtype,target_dtype", [(torch.float32, torch.float32),
                                                (torch.bfloat16, torch.float32),
                                                (torch.bfloat16, torch.float64)])
@pytest.mark.parametrize("head", ["vocab", "replicated"])
def test_linear_cross_entropy_probability_targets(mesh, dtype, target_dtype, head):
    """Soft targets with the head split over the vocabulary (the target's columns split
    alike) or replicated with the tokens split; F's dtype promotion."""
    torch.manual_seed(4)
    device = mesh.device_type
    h = torch.randn(40, 24, dtype=torch.float64, device=device)
    w = torch.randn(333, 24, dtype=torch.float64, device=device) / 4
    cw = torch.rand(333, dtype=torch.float64, device=device) + 0.5
    t = torch.softmax(torch.randn(40, 333, dtype=torch.float64, device=device) * 2, -1)
    t = t.to(target_dtype)
    rows = Replicate() if head == "vocab" else Shard(0)
    hd = distribute_tensor(h.to(dtype), mesh, [rows]).requires_grad_()
    wd = distribute_tensor(w.to(dtype), mesh,
                           [Shard(0) if head == "vocab" else Replicate()]).requires_grad_()
    opts = {"label_smoothing": 0.1, "z_loss": 1e-3}
    loss = tlf.linear_cross_entropy(hd, wd, distribute_tensor(t, mesh, [rows]), chunk_size=16,
                                    class_weight=distribute_tensor(cw.to(dtype), mesh,
                                                                   [Replicate()]), **opts)
    assert loss.dtype == torch.promote_types(dtype, target_dtype)
    loss.backward()
    h64, w64 = (v.to(dtype).double().requires_grad_() for v in (h, w))
    ref, _ = oracle_cross_entropy(F.linear(h64, w64), t.double(), cw.to(dtype), **opts)
    ref.backward()
    _check(loss, ref, dtype, "loss")
    _check(wd.grad, w64.grad, dtype, "grad weight")
    _check(hd.grad, h64.grad, dtype, "grad hidden")


@pytest.mark.parametrize("head", ["vocab", "replicated"])
@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
def test_linear_cross_entropy_return_lse(mesh, head, prob):
    """The lse of a vocabulary-sharded head (all-reduced over the slices) or of the
    row-sharded ops, and the gradient flowing through it."""
    torch.manual_seed(5)
    device = mesh.device_type
    h = torch.randn(36, 16, dtype=torch.float64, device=device)
    w = torch.randn(211, 16, dtype=torch.float64, device=device) / 3
    t = torch.randint(0, 211, (36,), device=device)
    if prob:
        t = torch.softmax(torch.randn(36, 211, dtype=torch.float64, device=device) * 2, -1)
    rows = Replicate() if head == "vocab" else Shard(0)
    hd = distribute_tensor(h, mesh, [rows]).requires_grad_()
    wd = distribute_tensor(w, mesh, [Shard(0) if head == "vocab" else Replicate()])
    wd.requires_grad_()
    loss, lse = tlf.linear_cross_entropy(hd, wd, distribute_tensor(t, mesh, [rows]),
                                         chunk_size=8, label_smoothing=0.1, return_lse=True)
    (loss + (lse * lse).mean()).backward()
    h64, w64 = (v.clone().requires_grad_() for v in (h, w))
    logits = F.linear(h64, w64)
    ref_lse = torch.logsumexp(logits, -1)
    (F.cross_entropy(logits, t, label_smoothing=0.1) + (ref_lse * ref_lse).mean()).backward()
    _check(lse, ref_lse, torch.float64, "lse")
    _check(wd.grad, w64.grad, torch.float64, "grad weight")
    _check(hd.grad, h64.grad, torch.float64, "grad hidden")
