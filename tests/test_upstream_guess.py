"""The upstream guess (torchloss_fused/_upstream_guess.py, csrc/reduced_loss.cpp): once a
reduced loss's backward has got the same upstream gradient twice, the eager forward writes
its gradient for that upstream. Checked: a right guess and a wrong one both give bitwise
the gradient of a forward that guessed nothing (and the guess was used: `hits`, `misses`),
a second backward repeats the first; losses scaled differently in turns, (N, C, d)
inputs, "none" and unscaled losses never guess."""

from __future__ import annotations

import contextlib

import pytest
import torch

import torchloss_fused as tlf
from torchloss_fused import _backend, _upstream_guess

pytestmark = pytest.mark.skipif(not _backend.has_kernels("cpu"),
                                reason="the guess serves the compiled CPU kernels")

GUESSES = _upstream_guess.GUESSES


@pytest.fixture(autouse=True)
def _small_inputs_guess(monkeypatch):
    monkeypatch.setattr(_upstream_guess, "MIN_ELEMENTS", 0)


def _logits(dtype, shape=(48, 300)):
    return (torch.randn(*shape, dtype=torch.float64) * 4).to(dtype)


def _targets(x, ignored=True):
    t = torch.randint(0, x.shape[1], (x.shape[0], *x.shape[2:]))
    if ignored:
        t[::5] = -100
    return t


def _grad(loss_fn, x, t, scale):
    x = x.clone().requires_grad_()
    loss = loss_fn(x, t)
    (loss * scale if isinstance(scale, float) else scale(loss)).backward()
    return x.grad


def _cold(loss_fn, x, t, scale):
    """The gradient with no guess in play."""
    saved = dict(GUESSES._seen), GUESSES.hits, GUESSES.misses
    GUESSES._seen.clear()
    try:
        return _grad(loss_fn, x, t, scale)
    finally:
        GUESSES._seen.clear()
        GUESSES._seen.update(saved[0])
        GUESSES.hits, GUESSES.misses = saved[1], saved[2]


def _fixed(draw, shape):
    # (the same weights or targets on every call: a test compares calls bit for bit)
    return draw(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _streak(loss_fn, dtype, scale, steps=3):
    """Backwards of `steps` scaled losses on fresh inputs: the guess is formed."""
    for _ in range(steps):
        x = _logits(dtype)
        _grad(loss_fn, x, _targets(x), scale)


LOSSES = {
    "ce-mean": lambda x, t: tlf.cross_entropy(x, t),
    "ce-sum": lambda x, t: tlf.cross_entropy(x, t, reduction="sum"),
    "ce-options": lambda x, t: tlf.cross_entropy(
        x, t, weight=_fixed(torch.rand, x.shape[1]).to(x.dtype) + 0.5, label_smoothing=0.1,
        z_loss=1e-3, softcap=20.0),
    "ce-prob": lambda x, t: tlf.cross_entropy(
        x, torch.softmax(_fixed(torch.randn, x.shape), 1).to(x.dtype)),
    "focal": lambda x, t: tlf.focal_loss(x, t, gamma=2.0),
}
SCALES = {"/4": 0.25, "/3": lambda loss: loss / 3, "x65536": 65536.0, "negated": -1.0}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("scale", list(SCALES))
def test_right_guess_changes_no_bit(dtype, loss, scale):
    if dtype == torch.float16 and scale == "x65536":
        pytest.skip("65536 is inf in float16: the upstream gradient itself overflows")
    loss_fn, s = LOSSES[loss], SCALES[scale]
    for step in range(4):
        x = _logits(dtype)
        t = _targets(x)
        warm = _grad(loss_fn, x, t, s)
        assert torch.equal(warm, _cold(loss_fn, x, t, s)), f"step {step}"
    # Steps 2 and 3 guessed (after two equal upstream gradients), and rightly.
    assert (GUESSES.hits, GUESSES.misses) == (2, 0)


def test_guess_at_the_default_threshold(monkeypatch):
    monkeypatch.setattr(_upstream_guess, "MIN_ELEMENTS", 1 << 16)
    small, large = _logits(torch.bfloat16, (64, 1000)), _logits(torch.bfloat16, (64, 1024))
    for _ in range(3):
        _grad(LOSSES["ce-mean"], small, _targets(small), 0.25)
    assert GUESSES._seen == {}  # 64000 logits: below it, not even watched
    for _ in range(3):
        _grad(LOSSES["ce-mean"], large, _targets(large), 0.25)
    assert GUESSES.hits == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss", ["ce-mean", "focal"])
def test_wrong_guess_changes_no_bit(dtype, loss):
    loss_fn = LOSSES[loss]
    _streak(loss_fn, dtype, lambda loss: loss / 3)
    x = _logits(dtype)
    t = _targets(x)
    wrong = _grad(loss_fn, x, t, lambda loss: loss / 5)
    assert GUESSES.misses == 1
    assert torch.equal(wrong, _cold(loss_fn, x, t, lambda loss: loss / 5))
    # The next forward does not guess /3 again (the last two upstreams differ).
    x = _logits(dtype)
    t = _targets(x)
    assert torch.equal(_grad(loss_fn, x, t, lambda loss: loss / 5),
                       _cold(loss_fn, x, t, lambda loss: loss / 5))
    assert GUESSES.misses == 1


def _f_grad(x, t, scale, aux=None):
    x = x.detach().double().requires_grad_()
    loss = torch.nn.functional.cross_entropy(x, t) * scale
    if aux is not None:
        loss = loss + aux * torch.nn.functional.cross_entropy(x, t.flip(0))
    loss.backward()
    return x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("change", ["clamp_", "clamp_ under an aliasing pack hook",
                                    "inplace_backward"])
def test_wrong_guess_with_logits_changed_in_place(dtype, change):
    """A wrong guess's backward cannot recompute from logits written in place since the
    forward: it rescales the gradient written for the guessed upstream, where it raised
    autograd's in-place error at that step alone (F, which needs no logits, runs on).
    Also where saved-tensor hooks pack a new alias of the logits (`t.detach()`): the
    saved row view died, and the write went unseen, the backward recomputing from the
    written logits (30% off at step 3; a helper's probe)."""
    tol = {"atol": 1e-6, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 2e-3,
                                                                       "rtol": 2e-2}
    for step, scale in enumerate((0.5, 0.5, 0.5, 0.25, 0.25)):
        x0 = _logits(dtype)
        t = _targets(x0, ignored=False)
        x = x0.clone().requires_grad_()
        h = x * 1  # (inplace_backward takes no leaf)
        if change.startswith("clamp_"):
            hooks = (torch.autograd.graph.saved_tensors_hooks(lambda a: a.detach(),
                                                              lambda a: a)
                     if "hook" in change else contextlib.nullcontext())
            with hooks:
                loss = tlf.cross_entropy(h, t) * scale
            with torch.no_grad():
                h.clamp_(-1, 1)  # (a metric's in-place edit after the loss)
            expect = _f_grad(x0, t, scale)
        else:  # an auxiliary loss on the logits beside a main loss that overwrites them
            loss = (tlf.cross_entropy(h, t) * scale
                    + 0.5 * tlf.cross_entropy(h, t.flip(0), inplace_backward=True))
            expect = _f_grad(x0, t, scale, aux=0.5)
        loss.backward()
        torch.testing.assert_close(x.grad.double(), expect, **tol, msg=f"step {step}")
    assert GUESSES.misses == 1  # step 3 guessed 0.5


@pytest.mark.parametrize("right", [True, False])
def test_second_backward_repeats_the_first(right):
    # retain_graph=True: the second backward recomputes the gradient from the logits.
    loss_fn = LOSSES["ce-mean"]
    _streak(loss_fn, torch.bfloat16, lambda loss: loss / 3)
    x = _logits(torch.bfloat16).requires_grad_()
    t = _targets(x)
    before = GUESSES.hits, GUESSES.misses
    loss = loss_fn(x, t) / (3 if right else 7)
    first, = torch.autograd.grad(loss, x, retain_graph=True)
    second, = torch.autograd.grad(loss, x)
    # (each backward counts)
    assert GUESSES.hits - before[0] == (2 if right else 0)
    assert GUESSES.misses - before[1] == (0 if right else 2)
    assert torch.equal(first, second)
    assert torch.equal(first, _cold(loss_fn, x.detach(), t,
                                    lambda loss: loss / (3 if right else 7)))


def test_float16_overflow_under_a_wrong_guess_is_recomputed():
    # Weighted rows reach |grad| ~ 1.5: times 49152 that is -inf in float16, which the
    # guessed forward stores; the next step's scale is smaller, and its gradient finite.
    def loss_fn(x, t):
        weight = _fixed(torch.rand, x.shape[1]).to(x.dtype) + 0.5
        return tlf.cross_entropy(x, t, weight=weight, reduction="sum")

    x = _logits(torch.float16)
    assert torch.isinf(_cold(loss_fn, x, _targets(x), 49152.0)).any()  # (the premise)
    _streak(loss_fn, torch.float16, 49152.0)
    x = _logits(torch.float16)
    t = _targets(x)
    got = _grad(loss_fn, x, t, 16384.0)
    assert GUESSES.misses == 1 and torch.isfinite(got).all()
    assert torch.equal(got, _cold(loss_fn, x, t, 16384.0))


def test_power_of_two_change_is_bitwise():
    # GradScaler halves its scale after an overflow: a wrong guess by a factor of 2.
    loss_fn = LOSSES["ce-mean"]
    _streak(loss_fn, torch.bfloat16, 65536.0)
    x = _logits(torch.bfloat16)
    t = _targets(x)
    assert torch.equal(_grad(loss_fn, x, t, 32768.0), _cold(loss_fn, x, t, 32768.0))
    assert GUESSES.misses == 1


def test_losses_scaled_in_turns_never_guess():
    loss_fn = LOSSES["ce-mean"]
    for step in range(6):
        x = _logits(torch.float32)
        t = _targets(x)
        s = 0.25 if step % 2 else 0.5
        assert torch.equal(_grad(loss_fn, x, t, s), _cold(loss_fn, x, t, s))
    assert (GUESSES.hits, GUESSES.misses) == (0, 0)


@pytest.mark.parametrize("case", ["unscaled", "planes", "none", "zero-then-one"])
def test_no_guess(case):
    dtype = torch.float32
    shape = (16, 30, 5) if case == "planes" else (48, 300)
    loss_fn = ((lambda x, t: tlf.cross_entropy(x, t, reduction="none").sum())
               if case == "none" else LOSSES["ce-mean"])
    scales = [1.0] * 4 if case == "unscaled" else [0.0, 0.0, 0.0, 1.0] \
        if case == "zero-then-one" else [0.25] * 4
    for s in scales:
        x = _logits(dtype, shape)
        t = _targets(x)
        assert torch.equal(_grad(loss_fn, x, t, s), _cold(loss_fn, x, t, s))
    assert (GUESSES.hits, GUESSES.misses) == (0, 0)


def test_guess_with_streaming_stores_on(monkeypatch):
    # A gradient that would be streamed past the caches is not, when rows are rescaled
    # after they are written: the same bits either way.
    from torchloss_fused import _C
    if not hasattr(_C, "set_cpu_stream_threshold"):
        pytest.skip("no streaming-store control in this build")
    _C.set_cpu_stream_threshold(0)
    try:
        for dtype in (torch.float32, torch.bfloat16):
            GUESSES.clear()
            for _ in range(3):
                x = _logits(dtype)
                t = _targets(x)
                assert torch.equal(_grad(LOSSES["ce-mean"], x, t, 0.25),
                                   _cold(LOSSES["ce-mean"], x, t, 0.25))
            assert GUESSES.hits == 1
    finally:
        _C.set_cpu_stream_threshold(-1)


_CAPABILITY_SCRIPT = """
import torch, torchloss_fused as tlf
from torchloss_fused import _upstream_guess as ug
ug.MIN_ELEMENTS = 0
torch.manual_seed(0)
print(tlf.backend_info("cpu")["detail"])  # (the copy the extension picked: DEFAULT, AVX2)
for dtype in (torch.float32, torch.bfloat16, torch.float64):
    for options in ({}, {"label_smoothing": 0.1}, {"softcap": 20.0}):
        ug.GUESSES.clear()
        for step in range(3):
            x = (torch.randn(40, 333, dtype=torch.float64) * 4).to(dtype)
            t = torch.randint(0, 333, (40,))
            t[::5] = -100
            grads = []
            for cold in (False, True):
                seen, hits = dict(ug.GUESSES._seen), ug.GUESSES.hits
                if cold:
                    ug.GUESSES._seen.clear()
                xx = x.clone().requires_grad_()
                (tlf.cross_entropy(xx, t, **options) / 3).backward()
                grads.append(xx.grad)
                if cold:  # (as if it had not run)
                    ug.GUESSES._seen.clear()
                    ug.GUESSES._seen.update(seen)
                    ug.GUESSES.hits = hits
            assert torch.equal(*grads), (dtype, options, step)
        assert ug.GUESSES.hits >= 1, (dtype, options)
print("ok")
"""


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_every_cpu_capability_guesses_bitwise(capability):
    import os
    import platform
    import subprocess
    import sys
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("x86 instruction sets")
    best = torch.backends.cpu.get_cpu_capability()
    if capability == "avx2" and best not in ("AVX2", "AVX512"):
        pytest.skip("this CPU has no AVX2")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    out = subprocess.run([sys.executable, "-c", _CAPABILITY_SCRIPT], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert capability.upper() in out.stdout and out.stdout.strip().endswith("ok")


def test_differentiable_and_batched_backwards_after_a_streak():
    # create_graph=True and batched upstream gradients take the reference formula; a
    # guessed forward's buffer is simply not used there.
    loss_fn = LOSSES["ce-mean"]
    _streak(loss_fn, torch.float32, lambda loss: loss / 3)
    x = _logits(torch.float32).requires_grad_()
    t = _targets(x)
    g, = torch.autograd.grad(loss_fn(x, t) / 3, x, create_graph=True)
    GUESSES._seen.clear()
    g_cold, = torch.autograd.grad(loss_fn(x, t) / 3, x, create_graph=True)
    assert torch.equal(g, g_cold)
    for _ in range(3):
        _grad(loss_fn, x.detach(), t, lambda loss: loss / 3)
    loss = loss_fn(x, t) / 3
    ups = torch.tensor([1.0, 2.0, 3.0])
    batched, = torch.autograd.grad(loss, x, ups, is_grads_batched=True)
    for i, u in enumerate(ups):
        GUESSES._seen.clear()
        one, = torch.autograd.grad(loss_fn(x, t) / 3, x, u)
        torch.testing.assert_close(batched[i], one)


@pytest.mark.parametrize("loss", ["ce-mean", "focal"])
def test_ignored_rows_are_plus_zero_after_any_history(loss):
    """A negative scale: ignored rows are +0, as F's (never written), on an unguessed step,
    a rightly and a wrongly guessed one, and a second backward. The rescale had made them
    -0 (0 times a negative factor) where the recomputing paths wrote +0, so their bits
    depended on the history of scales."""
    loss_fn = LOSSES[loss]
    x = _logits(torch.float32)
    t = _targets(x)
    ignored = t == -100

    def plus_zero(grad):
        return bool((grad[ignored] == 0).all() and not grad[ignored].signbit().any())

    assert plus_zero(_cold(loss_fn, x, t, -0.25))  # unguessed
    _streak(loss_fn, torch.float32, 0.25)
    assert plus_zero(_grad(loss_fn, x, t, -0.25))  # a wrong guess: recomputed
    _streak(loss_fn, torch.float32, -0.25)
    assert plus_zero(_grad(loss_fn, x, t, -0.25))  # a right one
    leaf = x.clone().requires_grad_()
    scaled = loss_fn(leaf, t) * -0.25
    for _ in range(2):  # (the second backward recomputes)
        (grad,) = torch.autograd.grad(scaled, leaf, retain_graph=True)
        assert plus_zero(grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss", ["ce-mean", "focal"])
def test_nan_rows_keep_their_bits_under_a_guess(dtype, loss):
    """A row with a NaN or infinite logit is NaN throughout: its NaN's bits must not
    depend on the guess either. The guessed step stores the target element alone, by a
    scalar conversion (c10's writes a bfloat16 NaN as 0x7fc0, where the vector stores of
    the rescale write 0xffff: bfloat16 failed before kernels_impl.h's narrow)."""
    loss_fn = LOSSES[loss]
    for _ in range(4):
        x = _logits(dtype)
        x[1, 7], x[2], x[3, 0] = float("nan"), float("inf"), -float("nan")
        t = _targets(x)
        warm = _grad(loss_fn, x, t, 0.3)
        assert warm[1:4].isnan().all()
        assert torch.equal(warm.view(torch.int16), _cold(loss_fn, x, t, 0.3).view(torch.int16))
    assert (GUESSES.hits, GUESSES.misses) == (2, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss", ["ce-mean", "ce-options", "focal"])
@pytest.mark.parametrize("shape", [(300, 2), (97, 20), (3, 7, 40)])
def test_short_rows_guess_bitwise(dtype, loss, shape):
    """Short rows (C <= 32) and (N, C, L) maps take the column kernels
    (csrc/cpu/column_rows_impl.h), which apply the guessed step's post scale as the row
    kernels do: right and wrong guesses change no bit."""
    loss_fn = LOSSES[loss]
    for step, scale in enumerate((0.25, 0.25, 0.25, 0.25, 0.5)):
        x = _logits(dtype, shape)
        t = _targets(x)
        assert torch.equal(_grad(loss_fn, x, t, scale), _cold(loss_fn, x, t, scale)), step
    # ((N, C, d) inputs are not guessed for: see the module's docstring)
    assert (GUESSES.hits, GUESSES.misses) == ((2, 1) if len(shape) == 2 else (0, 0))
