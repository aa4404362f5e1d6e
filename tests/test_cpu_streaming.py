"""Streaming (non-temporal) gradient stores of the CPU kernels (csrc/cpu/kernels.h).

They are used only when the logits and the gradient outgrow the last-level cache, far
beyond what a test should allocate, so two subprocesses run the same calls, one with
TLF_CPU_STREAM_MIB=0 (streaming at every size) and one with a threshold no test reaches:
their results must be the same bits. The calls cover the fused forward's rows (the one-exp
path, generic rows, soft-capped rows) and the separate backward, every reduced dtype, and
rows whose start is aligned for the streaming stores or not; and (N, C, H, W) maps, which
stream from a lower threshold (map_stream_threshold_bytes), in the fused forward and the
separate backward.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from torchloss_fused import _backend

pytestmark = pytest.mark.skipif(not _backend.EXTENSION_LOADED,
                                reason="compiled extension not loaded")

ROOT = Path(__file__).resolve().parents[1]

# Writes {name: tensor} to argv[1]; the same calls run here and in the subprocess.
CASES = textwrap.dedent("""
    import sys
    import torch
    import torchloss_fused as tlf

    def record(out, key, x, fn):
        leaf = x.clone().requires_grad_()
        loss = fn(leaf)
        loss.backward()
        out[key + "-loss"] = loss.detach()
        out[key + "-grad"] = leaf.grad

    def cases():
        out = {}
        gen = torch.Generator().manual_seed(7)
        # 32000: every row aligned; 4099 and 77: most rows start unaligned; 2048: one block
        for c in (32000, 4099, 2048, 77):
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                x = (torch.randn(24, c, generator=gen) * 3).to(dtype)
                y = torch.randint(0, c, (24,), generator=gen)
                y[5] = -100
                w = torch.rand(c, generator=gen).to(dtype)
                p = torch.softmax(torch.randn(24, c, generator=gen), 1).to(dtype)
                for name, fn in (
                        ("mean", lambda v: tlf.cross_entropy(v, y)),
                        ("sum_scaled", lambda v: tlf.cross_entropy(v, y, reduction="sum",
                                                                   logit_scale=0.5)),
                        ("z_weight", lambda v: tlf.cross_entropy(
                            v, y, z_loss=1e-3, weight=w)),
                        ("focal", lambda v: tlf.focal_loss(v, y, gamma=2.0)),
                        # the fused forward's other rows: generic and soft-capped
                        ("smooth", lambda v: tlf.cross_entropy(v, y, label_smoothing=0.1)),
                        ("softcap", lambda v: tlf.cross_entropy(v, y, softcap=5.0)),
                        ("prob", lambda v: tlf.cross_entropy(v, p)),
                        # a gradient into lse: the separate backward
                        ("lse", lambda v: sum(t.sum() for t in tlf.cross_entropy(
                            v, y, reduction="none", return_lse=True)))):
                    record(out, f"{c}-{str(dtype)[6:]}-{name}", x, fn)
        # (N, C, H, W) maps: the column kernels' tiles, a class's lanes contiguous; 96
        # positions a plane: whole tiles, planes aligned; 63: a partial tile, planes not
        for shape in ((2, 21, 8, 12), (2, 5, 7, 9)):
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                x = (torch.randn(shape, generator=gen) * 3).to(dtype)
                y = torch.randint(0, shape[1], (shape[0],) + shape[2:], generator=gen)
                y[0, 0, 1] = -100
                for name, fn in (
                        ("mean", lambda v: tlf.cross_entropy(v, y)),
                        ("lse", lambda v: sum(t.sum() for t in tlf.cross_entropy(
                            v, y, reduction="none", return_lse=True)))):
                    record(out, f"{'x'.join(map(str, shape))}-{str(dtype)[6:]}-{name}", x, fn)
        return out

    if __name__ == "__main__":
        from torchloss_fused import _C
        print("threshold", _C.cpu_stream_threshold())
        torch.save(cases(), sys.argv[1])
""")


def _run(tmp_path: Path, env: dict, name: str) -> subprocess.CompletedProcess:
    script = tmp_path / "cases.py"
    script.write_text(CASES)
    return subprocess.run([sys.executable, str(script), str(tmp_path / name)],
                          env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


def test_streamed_gradients_are_bitwise_the_plain_ones(tmp_path):
    streamed = _run(tmp_path, {"TLF_CPU_STREAM_MIB": "0"}, "streamed.pt")
    assert streamed.returncode == 0, streamed.stderr
    assert "threshold 0" in streamed.stdout
    plain = _run(tmp_path, {"TLF_CPU_STREAM_MIB": str(1 << 20)}, "plain.pt")
    assert plain.returncode == 0, plain.stderr
    a = torch.load(tmp_path / "streamed.pt")
    b = torch.load(tmp_path / "plain.pt")
    assert a.keys() == b.keys() and len(a) == 216
    differ = [k for k in a if not torch.equal(a[k].reshape(-1).view(torch.uint8),
                                             b[k].reshape(-1).view(torch.uint8))]
    assert not differ, differ[:10]


@pytest.mark.parametrize("value", ["abc", "-1", "1.5"])
def test_a_malformed_threshold_is_an_error_at_import(value):
    out = subprocess.run([sys.executable, "-c", "import torchloss_fused"],
                         env={**os.environ, "TLF_CPU_STREAM_MIB": value},
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode != 0
    assert "ValueError" in out.stderr and "TLF_CPU_STREAM_MIB" in out.stderr


def test_default_threshold_is_a_cache_size():
    from torchloss_fused import _C, _cpu_streaming

    if _cpu_streaming._THRESHOLD is not None:
        pytest.skip("TLF_CPU_STREAM_MIB is set")
    assert _C.cpu_stream_threshold() >= 1 << 20
