"""Backend selection: which implementation serves a device, the forced fallback, the
warning when the extension cannot load, and the CPU instruction-set variants."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
import torch

import torchloss_fused as tlf
from torchloss_fused import _backend

ROOT = Path(__file__).resolve().parents[1]
needs_ext = pytest.mark.skipif(not _backend.EXTENSION_LOADED, reason="extension not loaded")


def _run(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env,
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


@needs_ext
def test_backend_info_names_the_cpu_kernels():
    info = tlf.backend_info("cpu")
    assert info["implementation"] == "cpp"
    from torchloss_fused import _C

    assert _C.cpu_kernels() in info["detail"]
    assert set(info) == {"device", "implementation", "detail", "reason"}


@needs_ext
def test_cpu_kernels_are_multithreaded_like_torch():
    """at::parallel_for is inline OpenMP code in torch's OpenMP builds: an extension built
    without -fopenmp would silently run every op on one thread."""
    from torchloss_fused import _C

    if "OpenMP" in torch.__config__.parallel_info() and platform.system() == "Linux":
        assert _C.openmp()


def test_backend_info_for_a_device_without_kernels():
    info = tlf.backend_info("meta")
    assert info["implementation"] == "reference"
    assert info["reason"]


CHECK = """
    import torch, torch.nn.functional as F, warnings
    warnings.simplefilter("error", UserWarning)
    import torchloss_fused as tlf
    torch.manual_seed(0)
    x = torch.randn(33, 1000, dtype=torch.{dtype})
    # Rows that stress each copy's exponentials: far-apart logits, a -inf half (masked
    # classes), a +inf and a NaN logit (NaN rows), one dominant logit (loss exactly 0),
    # logits far from 0.
    x[1] *= 1000
    x[2, 500:] = float("-inf")
    x[3, 7] = float("inf")
    x[4, 9] = float("nan")
    x[5] = float("-inf")
    x[5, 3] = 5.0
    x[6] += 1e5  # far from 0: the row's lse keeps a lo (RowLse) that each copy must use
    x.requires_grad_()
    y = torch.randint(0, 500, (33,))
    y[0] = -100
    y[5] = 3
    loss = tlf.cross_entropy(x, y, reduction="none")
    loss.backward(torch.rand_like(loss) + 0.5)
    assert loss[5].item() == 0 and torch.equal(x.grad[5], torch.zeros_like(x.grad[5]))
    xd = x.detach()
    xs = xd.clone().requires_grad_()  # smoothing: the gradient pass recomputes exp(s - lse)
    smooth = tlf.cross_entropy(xs, y, label_smoothing=0.1, reduction="none")
    smooth.sum().backward()
    fl = tlf.focal_loss(xd, y, reduction="none")
    sfl = tlf.sigmoid_focal_loss(xd, (xd > 0).to(x.dtype), reduction="none")
    print(tlf.backend_info("cpu")["implementation"], tlf.backend_info("cpu")["detail"])
    torch.save((loss.detach(), x.grad, smooth.detach(), xs.grad, fl, sfl), {out!r})
"""


def _results(tmp_path, name, dtype="float32", **env):
    out = tmp_path / f"{name}.pt"
    proc = _run(CHECK.format(dtype=dtype, out=str(out)), **env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, torch.load(out)


@needs_ext
def test_forced_reference_matches_kernels(tmp_path):
    out_k, kernels = _results(tmp_path, "kernels")
    out_r, reference = _results(tmp_path, "reference", TORCHLOSS_FUSED_FORCE_REFERENCE="1")
    assert out_k.startswith("cpp") and out_r.startswith("reference")
    for a, b in zip(kernels, reference):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, equal_nan=True)


def test_unloadable_extension_warns_once_and_falls_back():
    code = """
        import sys, warnings
        sys.modules["torchloss_fused._C"] = None  # makes `import torchloss_fused._C` fail
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torchloss_fused as tlf
            import torch
            loss = tlf.cross_entropy(torch.randn(3, 4), torch.tensor([0, 1, 2]))
        ours = [w for w in caught if "torchloss_fused" in str(w.message)]
        assert len(ours) == 1, [str(w.message) for w in caught]
        print(tlf.backend_info("cpu")["implementation"])
        print(ours[0].message)
    """
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "reference"
    assert "could not be loaded" in lines[1] and "fallback" in lines[1]


@needs_ext
@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 only")
@pytest.mark.parametrize("capability", ["default", "avx2"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_cpu_capability_gives_the_same_results(tmp_path, capability, dtype):
    """The kernels are compiled once per instruction set; each copy must agree."""
    best = torch.backends.cpu.get_cpu_capability()
    if capability == "avx2" and best not in ("AVX2", "AVX512"):
        pytest.skip("this CPU has no AVX2")
    out_best, ref = _results(tmp_path, "best", dtype)
    out_cap, got = _results(tmp_path, capability, dtype, ATEN_CPU_CAPABILITY=capability)
    assert capability.upper() in out_cap
    tol = {"rtol": 2e-2, "atol": 1e-3} if dtype == "bfloat16" else {"rtol": 1e-5, "atol": 1e-7}
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.double(), b.double(), equal_nan=True, **tol)


@needs_ext
@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64")
                    or shutil.which("objdump") is None, reason="needs x86 and objdump")
def test_avx_instructions_only_in_their_capability_copies():
    """Inline functions shared by the per-capability objects must resolve to portable
    copies, so a CPU without AVX never executes an AVX instruction from this library."""
    so = Path(_backend.__file__).parent
    lib = next(so.glob("_C*.so"))
    dis = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", str(lib)],
                         capture_output=True, text=True, check=True).stdout
    offenders, fn = set(), None
    for line in dis.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if m:
            fn = m.group(1)
            continue
        parts = line.split("\t")
        if len(parts) >= 2 and parts[1].startswith("v") and fn is not None:
            if "AVX512" not in fn and "AVX2" not in fn:
                offenders.add(fn)
    assert not offenders, sorted(offenders)[:10]


@needs_ext
def test_an_extension_from_older_sources_is_refused(monkeypatch):
    """An extension built before an op, a schema or its functions changed (a checkout
    pulled and not rebuilt) is refused for the fallback: a missing op had made the import
    itself fail, and a changed function would be called with the wrong arguments."""
    from types import SimpleNamespace

    from torchloss_fused import _C, _schemas

    assert _backend._stale(_C) is None
    assert "version 1, not" in _backend._stale(SimpleNamespace())
    monkeypatch.setitem(_schemas.SCHEMAS, "newer_op", "(Tensor x) -> Tensor")
    assert _backend._stale(_C) == "it has no op newer_op"
    monkeypatch.delitem(_schemas.SCHEMAS, "newer_op")
    monkeypatch.setitem(_schemas.SCHEMAS, "_accumulate_", "(Tensor(a!) acc, Tensor src, "
                        "float alpha) -> ()")
    assert _backend._stale(_C).startswith("its op _accumulate_ is")


def test_an_extension_never_built_is_named_so(tmp_path):
    """The package without its _C (installed with TORCHLOSS_FUSED_NO_EXTENSION=1, or never
    built): the warning says so, where it had quoted a circular-import error."""
    pkg = Path(tlf.__file__).parent
    shutil.copytree(pkg, tmp_path / "torchloss_fused",
                    ignore=shutil.ignore_patterns("_C*", "__pycache__"))
    code = """
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torchloss_fused as tlf
        print(tlf.backend_info("cpu")["reason"])
        print([str(w.message) for w in caught if "torchloss_fused" in str(w.message)])
    """
    # (-S: no site, so no editable install's finder sends the import to the checkout;
    # site-packages, for torch, by PYTHONPATH, after the copy)
    path = os.pathsep.join([str(tmp_path), sysconfig.get_paths()["purelib"],
                            sysconfig.get_paths()["platlib"]])
    proc = subprocess.run([sys.executable, "-S", "-c", textwrap.dedent(code)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=path))
    assert proc.returncode == 0, proc.stderr
    reason, warned = proc.stdout.splitlines()
    assert reason == "the compiled extension was not built"
    assert "was not built" in warned and "circular" not in warned


@pytest.mark.parametrize("value,on", [("1", True), (" Yes ", True), ("on", True),
                                      ("", False), ("0", False), ("off", False)])
def test_switches(monkeypatch, value, on):
    from torchloss_fused._env import switch

    monkeypatch.setenv("TLF_TEST_SWITCH", value)
    assert switch("TLF_TEST_SWITCH") is on


def test_a_switch_set_to_anything_else_is_an_error(monkeypatch):
    """TORCHLOSS_FUSED_FORCE_REFERENCE=force had been read as off, silently."""
    from torchloss_fused._env import mib_from_env, switch

    monkeypatch.setenv("TLF_TEST_SWITCH", "force")
    with pytest.raises(ValueError, match="TLF_TEST_SWITCH must be one of"):
        switch("TLF_TEST_SWITCH")
    monkeypatch.setenv("TLF_TEST_MIB", "")  # (empty: unset, where it had been an error)
    assert mib_from_env("TLF_TEST_MIB") is None


@pytest.mark.parametrize("name", ["TLF_CPU_CACHE_MIB", "TLF_CPU_STREAM_MIB"])
def test_a_size_beyond_int64_is_a_checked_error(name):
    """A MiB count of 2^43 or more (2^63 bytes) had passed the check and failed the import
    with a bare OverflowError from the extension's argument parsing, naming nothing."""
    proc = _run("import torchloss_fused", **{name: str(1 << 43)})
    assert proc.returncode != 0
    assert f"ValueError: {name} must be at most {(1 << 43) - 1} MiB" in proc.stderr
    assert _run("import torchloss_fused", **{name: str((1 << 43) - 1)}).returncode == 0
    from torchloss_fused import _cuda_tuning

    with pytest.raises(ValueError, match="prefetch_kib must be at most"):
        _cuda_tuning.parse(f"prefetch_kib={1 << 53}")
