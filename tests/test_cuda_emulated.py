"""The CUDA kernels of csrc/cuda, run on the CPU by a host emulator and compared with the
reference: CI has no GPU, and this way every test run executes the real kernel source.

tests/cuda_emulation/README.md says what the emulator is and what it can and cannot check.
This module builds it (the kernel sources copied into the build directory with the three
rewrites a host compiler needs: rewrite_kernel_source), caches the binary under
build/cuda_emulation/<hash of every input>, runs a seeded sample of cases in a few batches
(two processes at a time) and checks:

- cross-entropy and focal forward, backward, fused and in-place backward: f32, bf16, f16,
  f64; thread / warp / block / cluster of blocks per row (direct launches of every
  instantiation, and the real launcher on six emulated devices); vector and scalar paths,
  row caches; contiguous, misaligned, padded and sliced rows, class stride != 1, D > 1;
  weights, label smoothing, z-loss, softcap, logit scale, probability targets, focal alpha /
  gamma, ignore_index, int32 / uint8 targets, grad_lse, broadcast grad_output, NaN, -inf and
  huge (3e38) logits;
- bitwise: fused == forward + backward (class-index targets), in-place == out-of-place,
  focal gamma = 0 == cross-entropy, and no dependence on the thread / block schedule;
- an out-of-range target is the device assert, and nothing is accessed out of bounds (the
  next-row L2 prefetch included);
- the real launcher under run-time tuning (block size, row-cache cap, prefetch, clusters,
  bulk loads) launches what the tuning asks, with the same values; a cluster launch the
  device refuses (its configuration) falls back to a block per row, one that fails
  otherwise is the op's error at once;
- bulk copies into the row cache (sm_90 cp.async.bulk and mbarriers, emulated: a copy
  lands at the first wait on its phase) give the plain kernels' bits, for a block or a
  cluster per row, forward, fused and backward (in place too), rows whose chunk count
  changes with their alignment included;
- _rescale_grad_rows; sigmoid focal elementwise forward / backward (n not a multiple of the
  vector width, aligned or not); the reduced sum and sum-with-gradient, whose partition
  depends on n alone (same bits on every device and schedule, at most kSigmoidSumBlocks);
- lse >= the row maximum with __expf / __logf at the edges of their error bounds;
- inputs never written; every access inside its buffer (ASan + UBSan, or canaries).

`python -m tests.test_cuda_emulated --help`: the same by hand, and planting bugs.
"""

from __future__ import annotations

import fcntl
import hashlib
import inspect
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from torchloss_fused import reference as R

ROOT = Path(__file__).resolve().parents[1]
EMU_DIR = ROOT / "tests" / "cuda_emulation"
CSRC = ROOT / "csrc"
KERNEL_SOURCES = sorted(p for p in (CSRC / "cuda").iterdir() if p.is_file())
CSRC_HEADERS = sorted(CSRC.glob("*.h"))  # the kernels include ../kernel_params.h
CUDA_HEADERS = ("cuda_runtime.h", "cuda_bf16.h", "cuda_fp16.h")
JOBS = 2  # compiles and emulator processes at once (CI has two cores)

# ---- locating the toolchain ------------------------------------------------------------------


def _nvcc_include_dirs() -> list[Path]:
    """Include directories nvcc itself uses (it may be a wrapper script elsewhere on PATH)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return []
    dirs = [Path(os.path.realpath(nvcc)).parent.parent / "include"]
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull],
                             capture_output=True, text=True, timeout=30)
        text = out.stdout + out.stderr
    except (OSError, subprocess.SubprocessError):
        return dirs
    for top in re.findall(r"TOP=(\S+)", text):
        dirs.append(Path(top) / "include")
    dirs += [Path(d) for d in re.findall(r'-I"?([^"\s]+)', text)]
    return dirs


def cuda_include_dir() -> Path | None:
    """The CUDA toolkit's include directory: $CUDA_HOME, $CUDA_PATH, nvcc's, /usr/local/cuda."""
    candidates = [Path(os.environ[v]) / "include" for v in ("CUDA_HOME", "CUDA_PATH")
                  if os.environ.get(v)]
    candidates += _nvcc_include_dirs() + [Path("/usr/local/cuda/include")]
    for d in candidates:
        for inc in (d, d.parent / "targets" / "x86_64-linux" / "include"):
            if all((inc / h).is_file() for h in CUDA_HEADERS):
                return inc.resolve()
    return None


def _gxx() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("g++")


# ---- building the emulator -------------------------------------------------------------------

_SHARED_EXTERN = re.compile(r"extern\s+__shared__\s+([\w:]+)\s+(\w+)\s*\[\s*\]\s*;")
_SHARED_ARRAY = re.compile(r"__shared__\s+([\w:]+)\s+(\w+)\s*(\[[^\]]+\])\s*;")
_SHARED_SCALAR = re.compile(r"__shared__\s+([\w:]+)\s+(\w+)\s*;")
_LAUNCH = re.compile(r"<<<(.*?)>>>\s*\(", re.S)


def rewrite_kernel_source(text: str) -> str:
    """What a host compiler cannot take, as emulator calls (tests/cuda_emulation/emu_runtime.h).

    Dynamic and static __shared__ declarations become emulated block-shared memory, and
    `kernel<<<cfg>>>(args)` becomes `kernel ->* ::emu::Config(cfg)(args)` (an overloaded
    operator, so the kernel expression itself needs no parsing). Anything else spelled
    __shared__ stays, and stops the build (emu_runtime.h defines __shared__ to an error).
    """
    text = _SHARED_EXTERN.sub(r"\1* \2 = ::emu::dynamic_smem<\1>();", text)
    text = _SHARED_ARRAY.sub(r"auto& \2 = ::emu::block_shared<\1\3>([] {});", text)
    text = _SHARED_SCALAR.sub(r"auto& \2 = ::emu::block_shared<\1>([] {});", text)
    return _LAUNCH.sub(r" ->* ::emu::Config(\1)(", text)


def _compile_flags(cuda_inc: Path, src: Path, asan: bool) -> list[str]:
    flags = ["-std=c++20", "-O1", "-g0", "-ffp-contract=off", "-Wno-unknown-pragmas",
             "-isystem", str(cuda_inc),
             # The real build's (torch.utils.cpp_extension.COMMON_NVCC_FLAGS).
             "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
             "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
             "-include", str(EMU_DIR / "emu_runtime.h"), "-I", str(src), "-I", str(EMU_DIR)]
    if asan:
        flags += ["-fsanitize=address,undefined", "-fno-sanitize-recover=all",
                  "-fno-omit-frame-pointer"]
    return flags


# Translation units: (object, source, extra flags). One per dtype for the softmax family, as
# csrc/cuda/softmax_loss_<dtype>.cu, so they compile in parallel.
_UNITS = [(f"softmax_{name}", "kernels_softmax.cpp",
           [f'-DEMU_DTYPE_FILE="cuda/softmax_loss_{name}.cu"', f"-DEMU_T={ctype}"])
          for name, ctype in (("f32", "float"), ("f64", "double"),
                              ("bf16", "__nv_bfloat16"), ("f16", "__half"))]
_UNITS += [("sigmoid", "kernels_sigmoid.cpp", []), ("main", "harness_main.cpp", []),
           ("runtime", "emu_runtime.cpp", [])]


def _asan_works(gxx: str, work: Path) -> bool:
    if os.environ.get("TLF_EMU_ASAN", "1") == "0":
        return False
    probe = work / "probe.cpp"
    probe.write_text("int main() { return 0; }\n")
    r = subprocess.run([gxx, "-fsanitize=address,undefined", str(probe), "-o",
                        str(work / "probe")], capture_output=True)
    return r.returncode == 0 and subprocess.run([str(work / "probe")]).returncode == 0


def _build_key(gxx: str, cuda_inc: Path) -> str:
    h = hashlib.sha256()
    version = subprocess.run([gxx, "--version"], capture_output=True, text=True).stdout
    h.update(version.encode())
    h.update(str(cuda_inc).encode())
    h.update(inspect.getsource(rewrite_kernel_source).encode())
    h.update(inspect.getsource(_compile_flags).encode())
    h.update(repr(_UNITS).encode())
    h.update(os.environ.get("TLF_EMU_ASAN", "1").encode())
    files = KERNEL_SOURCES + CSRC_HEADERS + sorted(EMU_DIR.glob("*.[ch]*"))
    files += sorted(cuda_inc.glob("cuda_[bf][fp]16*"))  # their host conversion code
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:20]


def _cache_root() -> Path:
    root = ROOT / "build" / "cuda_emulation"
    try:
        root.mkdir(parents=True, exist_ok=True)
        return root
    except OSError:
        return Path(tempfile.gettempdir()) / "torchloss_fused_cuda_emulation"


def build_harness(patch=None) -> tuple[Path, bool]:
    """The emulator binary (built, or found in the cache) and whether it has ASan.

    `patch(name, text) -> text` changes kernel sources in the build directory only (used to
    check that a planted bug makes the tests fail); patched builds are not cached.
    """
    gxx, cuda_inc = _gxx(), cuda_include_dir()
    assert gxx is not None and cuda_inc is not None
    root = _cache_root()
    root.mkdir(parents=True, exist_ok=True)
    key = _build_key(gxx, cuda_inc)
    out = root / key if patch is None else Path(tempfile.mkdtemp(prefix="patched-", dir=root))
    exe = out / "harness"
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if exe.is_file():
            return exe, (out / "asan").read_text() == "1"
        work = Path(tempfile.mkdtemp(prefix="build-", dir=root))
        try:
            src = work / "src"
            (src / "cuda").mkdir(parents=True)
            for f in CSRC_HEADERS:
                shutil.copy(f, src / f.name)
            for f in KERNEL_SOURCES:
                text = rewrite_kernel_source(f.read_text())
                if patch is not None:
                    text = patch(f.name, text)
                (src / "cuda" / f.name).write_text(text)
            asan = _asan_works(gxx, work)
            flags = _compile_flags(cuda_inc, src, asan)

            def compile_unit(unit):
                obj, source, extra = unit
                cmd = [gxx, *flags, *extra, "-c", str(EMU_DIR / source), "-o",
                       str(work / f"{obj}.o")]
                r = subprocess.run(cmd, capture_output=True, text=True)
                return obj, r

            with ThreadPoolExecutor(JOBS) as ex:
                for obj, r in ex.map(compile_unit, _UNITS):
                    if r.returncode != 0:
                        raise RuntimeError(f"emulator build failed ({obj}):\n{r.stderr[-6000:]}")
            link = [gxx, "-rdynamic", *[str(work / f"{u[0]}.o") for u in _UNITS], "-o",
                    str(work / "harness")]
            if asan:
                link.insert(1, "-fsanitize=address,undefined")
            r = subprocess.run(link, capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"emulator link failed:\n{r.stderr[-6000:]}")
            out.mkdir(parents=True, exist_ok=True)
            (out / "asan").write_text("1" if asan else "0")
            os.replace(work / "harness", exe)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        # Builds for sources that have since changed: keep the newest few.
        old = sorted((d for d in root.iterdir() if re.fullmatch(r"[0-9a-f]{20}", d.name)),
                     key=lambda d: d.stat().st_mtime)
        for d in old[:-3]:
            shutil.rmtree(d, ignore_errors=True)
    return exe, asan


# ---- batches of cases -----------------------------------------------------------------------

DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
INDEX_CODE = {torch.int64: 0, torch.int32: 1, torch.uint8: 2}
SIGMOID_SUM_BLOCKS = 1024  # csrc/cuda/launch.h: kSigmoidSumBlocks
GARBAGE = 0x5A  # output buffers start as this byte: finite in every dtype, never a result


def _storage_bytes(t: torch.Tensor) -> bytes:
    u8 = torch.empty(0, dtype=torch.uint8)
    u8.set_(t.untyped_storage())
    return u8.numpy().tobytes()


def copy_storage_view(x: torch.Tensor) -> torch.Tensor:
    """The same view over a copy of x's whole storage (padding included)."""
    st = torch.empty(0, dtype=x.dtype).set_(x.untyped_storage().clone())
    return st.as_strided(x.shape, x.stride(), x.storage_offset())


def whole_storage(x: torch.Tensor) -> torch.Tensor:
    """x's storage as a 1-D tensor of x's dtype."""
    return torch.empty(0, dtype=x.dtype).set_(x.untyped_storage())


@dataclass
class Ref:
    """A tensor handed to the emulator: its storage is buffer `name`."""
    name: str
    dtype: torch.dtype
    shape: tuple
    stride: tuple
    offset: int  # elements

    def arg(self) -> str:
        return f"{self.name} {self.offset * self.dtype.itemsize}"


@dataclass
class Batch:
    """Buffers and cases for one emulator process."""
    blob: bytearray = field(default_factory=bytearray)
    buffers: dict = field(default_factory=dict)  # name -> (blob offset, bytes, written)
    lines: list = field(default_factory=list)
    results: dict = field(default_factory=dict)  # case id -> (status, asserts, first assert)
    launches: dict = field(default_factory=dict)  # case id -> [(grid, block, smem, err, name)]
    out: bytes = b""

    def _buffer(self, data: bytes, written: bool) -> str:
        name = f"b{len(self.buffers)}"
        self.blob += bytes(-len(self.blob) % 64)
        self.buffers[name] = (len(self.blob), len(data), written)
        self.blob += data
        return name

    def tensor(self, t: torch.Tensor, written: bool = False) -> Ref:
        """t's whole storage, exactly (a view's neighbours are there, but nothing more)."""
        name = self._buffer(_storage_bytes(t), written)
        return Ref(name, t.dtype, tuple(t.shape), tuple(t.stride()), t.storage_offset())

    def output(self, shape, dtype: torch.dtype) -> Ref:
        n = math.prod(shape)
        name = self._buffer(bytes([GARBAGE]) * (n * dtype.itemsize), True)
        stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
        return Ref(name, dtype, tuple(shape), stride, 0)

    def case(self, cid: str, **kv) -> str:
        self.lines.append(f"case {cid}")
        for k, v in kv.items():
            if v is None:
                continue
            if isinstance(v, (tuple, list)):
                v = " ".join(str(x) for x in v)
            self.lines.append(f"{k} {v}")
        self.lines.append("end")
        return cid

    def run(self, exe: Path, workdir: Path, tag: str) -> str | None:
        """Runs the batch; returns None, or what went wrong."""
        spec = [f"buffer {n} {b} {o}" for n, (o, b, _) in self.buffers.items()]
        (workdir / f"{tag}.txt").write_text("\n".join(spec + self.lines) + "\n")
        (workdir / f"{tag}.in").write_bytes(bytes(self.blob))
        env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0:abort_on_error=0",
                   UBSAN_OPTIONS="print_stacktrace=1")
        r = subprocess.run([str(exe), str(workdir / f"{tag}.txt"), str(workdir / f"{tag}.in"),
                            str(workdir / f"{tag}.out")], capture_output=True, text=True,
                           env=env)
        for line in r.stdout.splitlines():
            parts = line.split("\t")
            if parts[0] == "launch" and len(parts) == 8:
                # (grid, block, smem, error, kernel, cluster)
                self.launches.setdefault(parts[1], []).append(
                    (int(parts[2]), int(parts[3]), int(parts[4]), parts[6], parts[7],
                     int(parts[5])))
            elif parts[0] == "result" and len(parts) == 5:
                self.results[parts[1]] = (parts[2], int(parts[3]), parts[4])
        if r.returncode != 0:
            cases = re.findall(r"^case (\S+)$", r.stderr, re.M)
            where = f" in case {cases[-1]}" if cases else ""
            err = "\n".join(ln for ln in r.stderr.splitlines() if not ln.startswith("case "))
            return f"emulator exit status {r.returncode}{where}:\n{err[-5000:]}"
        self.out = (workdir / f"{tag}.out").read_bytes()
        return None

    def get(self, ref: Ref) -> torch.Tensor:
        """The tensor `ref` as the emulator left it."""
        off, nbytes, _ = self.buffers[ref.name]
        if nbytes == 0:
            return torch.empty(ref.shape, dtype=ref.dtype)
        raw = torch.frombuffer(bytearray(self.out[off:off + nbytes]), dtype=torch.uint8)
        return raw.view(ref.dtype).as_strided(ref.shape, ref.stride, ref.offset)

    def written_inputs(self) -> list[str]:
        """Buffers the cases only read that changed all the same."""
        return [n for n, (o, b, written) in self.buffers.items()
                if not written and self.out[o:o + b] != self.blob[o:o + b]]


# ---- comparisons ----------------------------------------------------------------------------

# (rtol, atol) per dtype of the compared values: accumulation-dtype outputs (loss, lse) and
# input-dtype gradients. Low precision allows two units in the last place: the kernel and the
# reference round f32 values that differ in summation order.
TOL = {torch.float64: (1e-9, 1e-11), torch.float32: (2e-5, 2e-6),
       torch.bfloat16: (1.6e-2, 1e-5), torch.float16: (2e-3, 1e-6)}


def mismatch(ours: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> str | None:
    """None when ours matches ref (same NaN and inf positions, finite values within TOL)."""
    rtol, atol = TOL[dtype]
    a, b = ours.double(), ref.double()
    if a.shape != b.shape:
        return f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    if not torch.equal(a.isnan(), b.isnan()):
        return f"{what}: NaN at {(a.isnan() != b.isnan()).nonzero()[:3].tolist()}"
    inf = a.isinf() | b.isinf()
    if not torch.equal(a[inf], b[inf]):
        return f"{what}: inf positions differ"
    fin = ~(a.isnan() | inf)
    excess = (a[fin] - b[fin]).abs() - (atol + rtol * b[fin].abs())
    if excess.numel() and excess.max() > 0:
        i = int(excess.argmax())
        return f"{what}: {a[fin][i].item()!r} vs reference {b[fin][i].item()!r}"
    return None


def bitwise(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values (-0.0 == 0.0) and NaN in the same places (any payload)."""
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(a[~nan], b[~nan])


# ---- the configurations ---------------------------------------------------------------------

LAYOUTS = ["contig", "mis1", "mis3", "padded", "sliced", "classstride", "d3"]
GROUPS = [("thread", 0, 32), ("warp", 1, 64), ("block", 2, 64), ("block", 2, 96)]
OPTIONS = [
    {},
    {"weight": True},
    {"eps": 0.1},
    {"eps": 0.2, "weight": True, "z": 1e-2},
    {"z": 0.05},
    {"softcap": 3.0},
    {"logit_scale": 0.7},
    {"softcap": 2.0, "logit_scale": 1.3, "eps": 0.1},
    {"prob": True},
    {"prob": True, "eps": 0.1, "weight": True, "z": 0.01},
    {"prob": True, "prob_f32": True, "prob_strided": True},
    {"focal": True, "gamma": 0.0},
    {"focal": True, "gamma": 2.0, "alpha": True, "alpha_scale": 0.25},
    {"focal": True, "gamma": 1.5},
    {"focal": True, "gamma": 0.5, "alpha_scale": 0.75},
    {"glse": True},
    {"glse": True, "prob": True},
    {"ignore_index": 0},
    {"tdtype": torch.int32},
    {"tdtype": torch.uint8},
    {"nan_row": True},
    {"nan_row": True, "glse": True},
    {"neginf": True, "eps": 0.1},
    {"gl_bcast": True, "eps": 0.1},
    {"all_ignored": True},
]


@dataclass
class SoftmaxConfig:
    dtype: torch.dtype
    C: int
    layout: str
    opts: dict
    launch: str = "direct"  # or "auto": the real launcher picks
    group: int = 0
    threads: int = 32
    vec: bool = False
    cache: str = "none"  # row cache: none, part, full
    prefetch: int = 0  # direct: bytes of the next row to prefetch into L2
    bulk: bool = False  # direct, group 2, vec: the row cache filled by bulk copies
    cluster: int = 1  # direct, group 3: blocks per cluster
    # auto: the launcher's BlockRowTuning (max threads, row-cache cap bytes, prefetch bytes,
    # cluster blocks, bulk load)
    tuning: tuple[int, int, int, int, int] | None = None
    grid: int = 2
    B: int = 5
    device: int = 0
    schedule_check: bool = False  # also run the fused case in another schedule
    fastmath: int = 0

    def describe(self) -> str:
        shape = (f"launch=auto device={self.device} tuning={self.tuning}"
                 if self.launch == "auto" else
                 f"group={['thread', 'warp', 'block', 'cluster'][self.group]} "
                 f"threads={self.threads} vec={int(self.vec)} cache={self.cache} "
                 f"prefetch={self.prefetch} grid={self.grid}"
                 + (f" cluster={self.cluster}" if self.group == 3 else "")
                 + (" bulk=1" if self.bulk else ""))
        return (f"{str(self.dtype)[6:]} B={self.B} C={self.C} {self.layout} {shape} "
                f"opts={self.opts}" + (f" fastmath={self.fastmath}" if self.fastmath else ""))


def make_logits(cfg: SoftmaxConfig, gen: torch.Generator) -> torch.Tensor:
    """(B, C, D) logits in the layout cfg names (a view into a larger storage for most)."""
    B, C = cfg.B, cfg.C
    def rand(*shape):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * 3).to(cfg.dtype)
    if cfg.layout in ("contig", "mis1", "mis3"):
        mis = {"contig": 0, "mis1": 1, "mis3": 3}[cfg.layout]
        return rand(B * C + mis)[mis:].view(B, C, 1)
    if cfg.layout == "padded":
        return rand(B, C + 3, 1)[:, :C]
    if cfg.layout == "sliced":
        return rand(B, C + 1, 1)[:, 1:]
    if cfg.layout == "classstride":
        return rand(C, B).t().unsqueeze(-1)
    if cfg.layout == "d3":
        return rand(B, C, 3)
    if cfg.layout == "far":  # rows around FAR_OFFSETS (see far_configs)
        offsets = FAR_OFFSETS[cfg.dtype]
        off = torch.tensor([offsets[r % len(offsets)] for r in range(B)], dtype=torch.float64)
        x = torch.randn(B, C, 1, generator=gen, dtype=torch.float64) * 3 + off[:, None, None]
        return x.to(cfg.dtype)
    if cfg.layout == "saturated":  # the largest logit dominates: sum exp(x - max) rounds to 1
        x = torch.full((B, C, 1), -30.0, dtype=torch.float64)
        x[:, 0] = 0.0
        x[1, 1:5] = -16.0
        x[2, 7 % C] = -17.0
        return x.to(cfg.dtype)
    raise ValueError(cfg.layout)


class SoftmaxScenario:
    """One input; forward, fused, backward (and in-place) cases; checks per category."""

    def __init__(self, batch: Batch, cfg: SoftmaxConfig, sid: str, seed: int):
        self.batch, self.cfg, self.sid, self.seed = batch, cfg, sid, seed
        gen = torch.Generator().manual_seed(seed)
        o = cfg.opts
        x = make_logits(cfg, gen)
        B, C, D = x.shape
        if o.get("nan_row"):  # row 1 is ignored (D = 1), row 3 counted
            x[1, 0, :] = float("nan")
            x[3, C // 2, :] = float("nan")
        if o.get("neginf"):
            x[0, 0, :] = float("-inf")
            x[3, :, 0] = float("-inf")
        if o.get("huge") and B > 2:  # finite, beyond what a float times log2(e) can hold
            x[2, C // 3, :] = 6.0e4 if cfg.dtype == torch.float16 else 3.0e38
        self.x = x
        acc = R.acc_dtype(cfg.dtype)
        self.acc = acc
        self.lse_dt = R.LSE_DTYPE  # (the kernels' RowLse, stored)
        self.ii = o.get("ignore_index", -100)
        if o.get("prob"):
            t = torch.rand(B, C, D, generator=gen, dtype=torch.float64)
            t = (t / t.sum(1, keepdim=True)).to(torch.float32 if o.get("prob_f32") else cfg.dtype)
            if o.get("prob_strided"):
                t = t.transpose(0, 2).contiguous().transpose(0, 2)
        else:
            t = torch.randint(0, max(C, 1), (B, D), generator=gen)
            t.view(-1)[1] = self.ii
            if C > 1:
                t.view(-1)[2] = C - 1
            if cfg.layout == "saturated":
                t.view(-1)[0] = t.view(-1)[3] = 0  # p_t = 1 to within rounding
            if o.get("all_ignored"):
                t.fill_(self.ii)
            if "tdtype" in o:
                t = t.clamp(0, 255) if o["tdtype"] == torch.uint8 and self.ii < 0 else t
                t = t.to(o["tdtype"])
        self.t = t
        self.w = (torch.rand(C, generator=gen, dtype=torch.float64) + 0.5).to(acc) \
            if o.get("weight") else None
        self.alpha = (torch.rand(C, generator=gen, dtype=torch.float64) + 0.2).to(acc) \
            if o.get("alpha") else None
        self.gl = (torch.rand(B, D, generator=gen, dtype=torch.float64) + 0.5).to(acc)
        # Every third row's loss gradient negative: with a negative scale a 16-bit row takes
        # the plain pass-2 loop, not the folded one.
        self.gl[::3] = -self.gl[::3]
        if o.get("gl_bcast"):
            self.gl = self.gl[:1, :1].expand(B, D)
        self.glse = (torch.rand(B, D, generator=gen, dtype=torch.float64) - 0.5) \
            .to(self.lse_dt) if o.get("glse") else None
        if self.glse is not None and o.get("nan_row"):
            self.glse.view(-1)[1] = 0  # the ignored (NaN) row: exact zeros, not 0 * NaN
        self._add_cases()

    # -- cases --

    def _common(self) -> dict:
        cfg, o, b, x, t = self.cfg, self.cfg.opts, self.batch, self.x, self.t
        kv = {"op": "softmax", "dtype": DTYPE_CODE[cfg.dtype], "device": cfg.device,
              "fastmath": cfg.fastmath, "launch": cfg.launch}
        if cfg.launch == "direct":
            kv.update(group=cfg.group, vec=int(cfg.vec), grid=cfg.grid, threads=cfg.threads,
                      cache=self._cache_slots(), prefetch=cfg.prefetch, bulk=int(cfg.bulk))
            if cfg.group == 3:
                kv["cluster"] = cfg.cluster
        elif cfg.tuning is not None:
            kv["tuning"] = cfg.tuning
        kv["input"] = (b.tensor(x).arg(), *x.shape, *x.stride())
        tr = b.tensor(t)
        if t.is_floating_point():
            kv["prob_target"] = (tr.arg(), int(t.dtype == torch.float32), *t.shape, *t.stride())
        else:
            kv["index_target"] = (tr.arg(), INDEX_CODE[t.dtype], *t.stride(), t.shape[1])
        kv["ignore_index"] = self.ii
        if self.w is not None:
            kv["weight"] = b.tensor(self.w).arg()
            kv["weight_sum"] = b.tensor(self.w.sum().reshape(1)).arg()
        if o.get("focal"):
            kv.update(focal=1, gamma=o.get("gamma", 0.0), alpha_scale=o.get("alpha_scale", 1.0))
            if self.alpha is not None:
                kv["alpha"] = b.tensor(self.alpha).arg()
        else:
            kv.update(label_smoothing=o.get("eps", 0.0), z_loss=o.get("z", 0.0),
                      softcap=o.get("softcap", 0.0), logit_scale=o.get("logit_scale", 1.0))
        return kv

    def _cache_slots(self) -> int:
        cfg = self.cfg
        if not cfg.vec:
            return 0
        n = 16 // cfg.dtype.itemsize
        if cfg.group == 3:  # per block: a slot per thread, or the block's whole share
            vectors, lanes = math.ceil(cfg.C / n), cfg.threads * cfg.cluster
            full = math.ceil(vectors / lanes) * cfg.threads
            return {"none": 0, "part": cfg.threads, "full": full}[cfg.cache]
        return {"none": 0, "part": max(1, cfg.C // n // 3), "full": -(-cfg.C // n)}[cfg.cache]

    def _rowvec(self, v: torch.Tensor) -> tuple:
        r = self.batch.tensor(v)
        return (r.arg(), *v.stride(), v.shape[1])

    def _grad_out(self) -> Ref:
        return self.batch.output(self.x.shape, self.cfg.dtype)

    def _grad_arg(self, r: Ref) -> tuple:
        return (r.arg(), *r.shape, *r.stride)

    def _add_cases(self):
        b, sid, cfg = self.batch, self.sid, self.cfg
        kv = self._common()
        rows = self.x.shape[0], self.x.shape[2]
        gl = self._rowvec(self.gl)

        def fused(name, **extra):
            out = b.output(rows, self.acc), b.output(rows, self.lse_dt), self._grad_out()
            b.case(f"{sid}.{name}", mode=2, loss=out[0].arg(), lse=out[1].arg(), grad_loss=gl,
                   grad_input=self._grad_arg(out[2]), **dict(kv, **extra))
            return out

        self.fwd_loss, self.fwd_lse = b.output(rows, self.acc), b.output(rows, self.lse_dt)
        b.case(f"{sid}.fwd", mode=0, loss=self.fwd_loss.arg(), lse=self.fwd_lse.arg(), **kv)
        # grad_lse only reaches the backward (the fused op has no lse gradient).
        self.fused = fused("fused") if self.glse is None else None
        # Warps run ahead of each other (greedy), blocks in reverse: a missing barrier shows.
        self.sched = fused("sched", schedule=(2 + self.seed % 2, 1)) \
            if cfg.schedule_check and self.fused is not None else None
        # Bulk copies change where pass 1 reads the cached vectors from, not what it sums or
        # in what order: the plain kernel's bits.
        self.plain = None
        if cfg.bulk:
            self.plain = b.output(rows, self.acc), b.output(rows, self.lse_dt)
            b.case(f"{sid}.plainfwd", mode=0, loss=self.plain[0].arg(),
                   lse=self.plain[1].arg(), **dict(kv, bulk=0))
            if self.fused is not None:
                self.plain += fused("plain", bulk=0)
        # Focal loss with gamma = 0 and no alpha is cross-entropy, bitwise (DESIGN.md §4).
        o = cfg.opts
        self.as_ce = None
        if o.get("focal") and o.get("gamma") == 0 and self.alpha is None and \
                o.get("alpha_scale", 1.0) == 1.0:
            self.as_ce = fused("ce", focal=0, gamma=None, alpha_scale=None)
        # The backward reads the forward's lse: bitwise the fused gradient.
        bwd = dict(mode=1, lse_in=self.fwd_lse.arg(), grad_loss=gl,
                   grad_lse=self._rowvec(self.glse) if self.glse is not None else None, **kv)
        self.bwd = self._grad_out()
        b.case(f"{sid}.bwd", grad_input=self._grad_arg(self.bwd), **bwd)
        if cfg.bulk:
            self.plain_bwd = self._grad_out()
            b.case(f"{sid}.plainbwd", grad_input=self._grad_arg(self.plain_bwd),
                   **dict(bwd, bulk=0))
        self.inplace = None
        if not cfg.opts.get("focal"):  # in-place is cross-entropy's (_ce_bwd_inplace)
            xi = copy_storage_view(self.x)
            self.inplace = b.tensor(xi, written=True)
            view = (self.inplace.arg(), *xi.shape, *xi.stride())
            bwd["input"] = view
            b.case(f"{sid}.inplace", grad_input=view, **bwd)

    # -- checks --

    def reference(self):
        o, x, t = self.cfg.opts, self.x, self.t
        if o.get("focal"):
            a = (self.alpha, o.get("alpha_scale", 1.0), o.get("gamma", 0.0), self.ii)
            loss, lse = R.focal_fwd(x, t, *a)
            grad = R.focal_bwd(self.gl, x, t, a[0], lse, *a[1:])
            return loss, lse, grad
        args = (self.w, self.ii, o.get("eps", 0.0), o.get("z", 0.0), o.get("softcap", 0.0),
                o.get("logit_scale", 1.0))
        loss, lse = R.ce_fwd(x, t, *args)
        grad = R.ce_bwd(self.gl, self.glse, x, t, self.w, lse, *args[1:])
        return loss, lse, grad

    def check(self, fails: dict):
        b, d = self.batch, self.cfg.describe()

        def add(cat, msg):
            fails.setdefault(cat, []).append(f"{self.sid} [{d}]: {msg}")

        for cid, (status, asserts, first) in b.results.items():
            if cid.startswith(self.sid + ".") and (status != "ok" or asserts):
                add("status", f"{cid}: status {status}, asserts {asserts} {first}")
        loss, lse, grad = self.reference()
        fwd_loss, fwd_lse, bwd = b.get(self.fwd_loss), b.get(self.fwd_lse), b.get(self.bwd)
        compared = [("fwd loss", fwd_loss, loss, self.acc), ("fwd lse", fwd_lse, lse, self.acc),
                    ("bwd grad", bwd, grad, self.cfg.dtype)]
        if self.fused is not None:
            fl, fs, fg = (b.get(r) for r in self.fused)
            compared.append(("fused grad", fg, grad, self.cfg.dtype))
            if not (bitwise(fl, fwd_loss) and bitwise(fs, fwd_lse)):
                add("bitwise", "fused loss/lse != forward loss/lse")
            if not bitwise(fg, bwd):
                add("bitwise", "fused gradient != backward gradient (same lse)")
            if self.as_ce is not None and not all(
                    bitwise(b.get(r), v) for r, v in zip(self.as_ce, (fl, fs, fg))):
                add("bitwise", "focal loss with gamma = 0 != cross-entropy")
            if self.sched is not None and not all(
                    bitwise(b.get(r), v) for r, v in zip(self.sched, (fl, fs, fg))):
                add("schedule", "fused results depend on the thread/block order")
        if self.plain is not None:
            mine = (fwd_loss, fwd_lse) + ((fl, fs, fg) if self.fused is not None else ())
            if not all(bitwise(b.get(r), v) for r, v in zip(self.plain, mine)):
                add("bitwise", "bulk-copy kernel != plain kernel")
            if not bitwise(b.get(self.plain_bwd), bwd):
                add("bitwise", "bulk-copy backward != plain backward")
        for what, ours, ref, dtype in compared:
            m = mismatch(ours, ref, dtype, what)
            if m:
                add("values", m)
        if self.inplace is not None:
            got = b.get(self.inplace)
            if not bitwise(got, bwd):
                add("bitwise", "in-place gradient != out-of-place gradient")
            expect = copy_storage_view(self.x)
            expect.copy_(got)  # the view from the emulator, the rest of the storage as it was
            if _storage_bytes(got) != _storage_bytes(expect):
                add("bitwise", "in-place backward wrote outside the view")


class BadTargetScenario:
    """A class index out of range: the device assert fires, nothing is accessed out of bounds
    (the emulator lets the thread go on after the assert, so the code after it is checked)."""

    def __init__(self, batch: Batch, cfg: SoftmaxConfig, sid: str, seed: int, bad: int,
                 tdtype: torch.dtype):
        self.batch, self.cfg, self.bad = batch, cfg, bad
        gen = torch.Generator().manual_seed(seed)
        x = make_logits(cfg, gen)
        B, C, D = x.shape
        t = torch.randint(0, C, (B, D), generator=gen)
        t.view(-1)[1] = bad
        t = t.to(tdtype)
        acc = R.acc_dtype(cfg.dtype)
        xr, tr = batch.tensor(x), batch.tensor(t)
        kv = {"op": "softmax", "dtype": DTYPE_CODE[cfg.dtype], "device": cfg.device,
              "launch": cfg.launch, "input": (xr.arg(), *x.shape, *x.stride()),
              "index_target": (tr.arg(), INDEX_CODE[tdtype], *t.stride(), D)}
        if cfg.launch == "direct":
            kv.update(group=cfg.group, vec=int(cfg.vec), grid=cfg.grid, threads=cfg.threads)
        grad_loss = (batch.tensor(torch.ones(B, D, dtype=acc)).arg(), D, 1, D)
        lse_in = batch.tensor(torch.zeros(B, D, dtype=R.LSE_DTYPE)).arg()

        def grad():
            g = batch.output(x.shape, cfg.dtype)
            return (g.arg(), *g.shape, *g.stride)

        def rows(dtype=acc):
            return batch.output((B, D), dtype).arg()

        lse_dt = R.LSE_DTYPE
        self.cases = [
            batch.case(f"{sid}.fwd", mode=0, loss=rows(), lse=rows(lse_dt), **kv),
            batch.case(f"{sid}.bwd", mode=1, lse_in=lse_in, grad_loss=grad_loss,
                       grad_input=grad(), **kv),
            batch.case(f"{sid}.fused", mode=2, loss=rows(), lse=rows(lse_dt),
                       grad_loss=grad_loss, grad_input=grad(), **kv)]

    def check(self, fails: dict):
        for cid in self.cases:
            status, asserts, first = self.batch.results[cid]
            if asserts < 1 or "class index target out of range" not in first:
                fails.setdefault("bad_target", []).append(
                    f"{cid} [{self.cfg.describe()} target {self.bad}]: no device assert "
                    f"(status {status}, asserts {asserts})")


# ---- rescale and sigmoid ----------------------------------------------------------------


class RescaleScenario:
    """Rows where grad_loss == grad_scale, or grad_scale is infinite or NaN, stay untouched,
    others scaled (a NaN grad_loss included);
    bitwise as the reference, and nothing outside the view changes."""

    def __init__(self, batch: Batch, sid: str, seed: int, dtype, layout: str, C: int,
                 launch: str, group: int = 0, threads: int = 32):
        gen = torch.Generator().manual_seed(seed)
        self.batch, self.sid = batch, sid
        self.desc = f"{str(dtype)[6:]} C={C} {layout} launch={launch} group={group}"
        x = make_logits(SoftmaxConfig(dtype, C, layout, {}, B=6), gen)
        B, _, D = x.shape
        acc = R.acc_dtype(dtype)
        gs = torch.full((B, D), 0.5, dtype=acc)
        gl = gs.clone()
        gl[1], gl[3], gl[4] = 1.5, float("nan"), 0.25
        gs[5], gl[5] = float("inf"), -float("inf")  # made for 1/0: stays as made
        gs[0], gl[0] = float("nan"), 2.0  # made for a nan 1/denom: stays as made
        self.x, self.gl, self.gs = x, gl, gs
        self.ref = batch.tensor(x, written=True)
        kv = {"op": "rescale", "dtype": DTYPE_CODE[dtype], "launch": launch,
              "grad": (self.ref.arg(), *x.shape, *x.stride()),
              "grad_loss": (batch.tensor(gl).arg(), *gl.stride(), D),
              "grad_scale": (batch.tensor(gs).arg(), *gs.stride(), D)}
        if launch == "direct":
            kv.update(group=group, threads=threads, grid=2)
        batch.case(f"{sid}.rescale", **kv)

    def check(self, fails: dict):
        status = self.batch.results[f"{self.sid}.rescale"][0]
        expect = copy_storage_view(self.x)
        R.rescale_grad_rows(expect, self.gl, self.gs)
        got = whole_storage(self.batch.get(self.ref))
        if status != "ok" or not same_values(got, whole_storage(expect)):
            fails.setdefault("rescale", []).append(
                f"{self.sid} [{self.desc}]: status {status}, storage differs from the reference")


class SigmoidScenario:
    """Elementwise forward and backward (full and scalar grad), and the reduced sums."""

    def __init__(self, batch: Batch, sid: str, seed: int, dtype, n: int, off: int, alpha: float,
                 gamma: float, soft: bool, device: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.batch, self.sid, self.dtype = batch, sid, dtype
        self.alpha, self.gamma, self.n = alpha, gamma, n
        self.desc = (f"{str(dtype)[6:]} n={n} offset={off} alpha={alpha} gamma={gamma} "
                     f"soft={soft} device={device}")
        x = (torch.randn(n + off, generator=gen, dtype=torch.float64) * 4).to(dtype)[off:]
        if n > 3:
            x[:3] = torch.tensor([30.0, -30.0, 0.0], dtype=dtype)  # saturated and zero
        tt = torch.rand(n + off, generator=gen, dtype=torch.float64)
        t = (tt if soft else (tt > 0.6).double()).to(dtype)[off:]
        if n > 4:  # confidently wrong near the range's edge: ce * gamma would overflow
            x[3], t[3] = 0.6 * torch.finfo(dtype).max, 0.0
        gl = (torch.rand(n + off, generator=gen, dtype=torch.float64) + 0.5).to(dtype)[off:]
        self.x, self.t, self.gl = x, t, gl
        acc = R.acc_dtype(dtype)
        xr, tr, gr = batch.tensor(x), batch.tensor(t), batch.tensor(gl)
        self.scale = 0.5  # exact in every dtype: sum_grad's gradient == bwd with grad = scale
        self.divisor = 2  # (the ops' argument: scale = 1.0 / divisor)
        scalar = batch.tensor(torch.full((1,), self.scale, dtype=dtype))
        common = {"dtype": DTYPE_CODE[dtype], "device": device, "input": xr.arg(),
                  "target": tr.arg(), "n": n, "alpha": alpha, "gamma": gamma}
        self.loss, self.grad, self.grad_s = (batch.output((n,), dtype) for _ in range(3))
        batch.case(f"{sid}.fwd", op="sigmoid", loss=self.loss.arg(), **common)
        batch.case(f"{sid}.bwd", op="sigmoid", backward=1, grad_loss=gr.arg(),
                   grad_input=self.grad.arg(), **common)
        batch.case(f"{sid}.bwds", op="sigmoid", backward=1, grad_loss=scalar.arg(),
                   scalar_grad=1, grad_input=self.grad_s.arg(), **common)
        # The reduced sum (with and without its gradient), again in another schedule and on
        # another device: partials is exactly kSigmoidSumBlocks values.
        self.sums = {}
        order = 3 if n < 100_000 else 1  # greedy schedules rescan the block per switch
        for name, with_grad, extra in (("sum", False, {}), ("sumg", True, {}),
                                       ("sumr", False, {"schedule": (order, 1)}),
                                       ("sumd", False, {"device": (device + 1) % 3})):
            out = batch.output((1,), acc)
            g = batch.output((n,), dtype) if with_grad else None
            batch.case(f"{sid}.{name}", op="sigmoid_sum", scale=self.scale, out=out.arg(),
                       partials=batch.output((SIGMOID_SUM_BLOCKS,), acc).arg(),
                       grad_input=g.arg() if g else None, **dict(common, **extra))
            self.sums[name] = (out, g)

    def check(self, fails: dict):
        b, dt = self.batch, self.dtype

        def add(cat, msg):
            fails.setdefault(cat, []).append(f"{self.sid} [{self.desc}]: {msg}")

        for cid, res in b.results.items():
            if cid.startswith(self.sid + ".") and (res[0] != "ok" or res[1]):
                add("status", f"{cid}: status {res[0]}, asserts {res[1]}")
        a, g = self.alpha, self.gamma
        ref_loss = R.sigmoid_focal_fwd(self.x, self.t, a, g)
        ref_grad = R.sigmoid_focal_bwd(self.gl, self.x, self.t, a, g)
        ref_grad_s = R.sigmoid_focal_bwd(torch.tensor(self.scale, dtype=R.acc_dtype(dt)),
                                         self.x, self.t, a, g)
        for what, ours, ref in (("loss", self.loss, ref_loss), ("grad", self.grad, ref_grad),
                                ("scalar-grad grad", self.grad_s, ref_grad_s)):
            m = mismatch(b.get(ours), ref, dt, what)
            if m:
                add("sigmoid", m)
        # The reference sums in float64 from the same inputs; float accumulation over a fixed
        # tree of at most ~40 levels here stays well inside 1e-6 (one dropped term would not).
        ref_sum = R.sigmoid_focal_sum(self.x.double(), self.t.double(), a, g, self.divisor)
        sums = {name: b.get(out) for name, (out, _) in self.sums.items()}
        rtol = 1e-12 if dt == torch.float64 else 1e-6
        got = sums["sum"].double().reshape(())
        if not (got - ref_sum).abs() <= 1e-30 + rtol * ref_sum.abs():
            add("sigmoid_sum", f"sum {got.item()!r} vs reference {ref_sum.item()!r}")
        if not bitwise(sums["sumg"], sums["sum"]):
            add("sigmoid_sum", "sum_grad's value != sum's value")
        if not bitwise(b.get(self.sums["sumg"][1]), b.get(self.grad_s)):
            add("sigmoid_sum", "sum_grad's gradient != backward with grad_loss = scale")
        for other, why in (("sumr", "the thread/block order"), ("sumd", "the device")):
            if not bitwise(sums[other], sums["sum"]):
                add("sigmoid_sum", f"the sum depends on {why}")

        def partition(name):
            return [ln[:3] for ln in b.launches.get(f"{self.sid}.{name}", [])
                    if "sigmoid_focal_sum_kernel" in ln[4]]

        if partition("sum") != partition("sumd"):
            add("sigmoid_sum", f"grid depends on the device: {partition('sum')} vs "
                f"{partition('sumd')}")
        if any(grid > SIGMOID_SUM_BLOCKS for grid, _, _ in partition("sum")):
            add("sigmoid_sum", f"more blocks than partials: {partition('sum')}")


# ---- the sample -----------------------------------------------------------------------------

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def dealer(rnd: random.Random):
    """A function that deals OPTIONS in turn, from a fresh shuffled deck each time the last
    one is spent: every option comes up, in an order the seed fixes."""
    deck: list = []

    def deal() -> dict:
        if not deck:
            deck.extend(OPTIONS)
            rnd.shuffle(deck)
        return deck.pop()
    return deal


def softmax_configs(rnd: random.Random) -> list[SoftmaxConfig]:
    """Every dtype x group shape x vector/scalar x layout twice, with the options dealt out
    in turn (each dtype sees them all) and the other axes drawn."""
    out = []
    deal = dealer(rnd)
    for dtype in DTYPES:
        for _, group, threads in GROUPS:
            for layout in LAYOUTS:
                strided = layout in ("classstride", "d3")
                for vec in (False, True) * 2:
                    if vec and (strided or dtype == torch.float64 or group == 0):
                        continue
                    o = deal()
                    C = rnd.choice([1, 3, 33, 100, 257, 1000, 2049] if group else [1, 3, 33, 100])
                    out.append(SoftmaxConfig(
                        dtype, C, layout, o, group=group, threads=threads, vec=vec,
                        cache=rnd.choice(["none", "part", "full"]), grid=rnd.choice([1, 2]),
                        # a thread per row: enough rows for the grid to loop
                        B=rnd.choice([5, 70]) if group == 0 else 5,
                        schedule_check=group > 0 and rnd.random() < 0.5,
                        # none, a few lines, past the row's end (clipped to the row)
                        prefetch=rnd.choice([0, 0, 200, 1 << 20]) if vec else 0))
    # Pass 1's whole batches (a block row of at least kU * threads vectors: csrc/cuda's
    # pass1_whole_batches), whose 16-bit maxima are taken while still packed: NaN, -inf and
    # huge (base 2 out of range) rows, a row cache over part of the row or all of it, and
    # the partial batch after.
    for dtype in (torch.bfloat16, torch.float16):
        for o in ({}, {"nan_row": True}, {"neginf": True, "eps": 0.1}, {"huge": True},
                  {"focal": True, "gamma": 2.0}, {"weight": True, "z": 1e-2}):
            out.append(SoftmaxConfig(
                dtype, rnd.choice([3079, 5003]), rnd.choice(["contig", "mis1", "padded"]), o,
                group=2, threads=64, vec=True, cache=rnd.choice(["part", "full"]), grid=2, B=5))
    # A cluster of blocks per row (sm_90: cluster_group.cuh), launched directly: blocks of 32
    # or 64 threads, clusters of 2 or 4, one or two clusters, a row cache of one slot per
    # thread (part of the row), the whole share or none; whole batches where the row is long.
    # Every option at least once: a fresh deal of them.
    deal = dealer(rnd)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for threads, cluster in ((32, 2), (64, 2), (32, 4)):
            for layout in ("contig", "mis1", "padded"):
                o = deal()
                out.append(SoftmaxConfig(
                    dtype, rnd.choice([1000, 3079, 5003]), layout, o, group=3,
                    threads=threads, vec=True, cluster=cluster,
                    cache=rnd.choice(["none", "part", "full"]),
                    grid=cluster * rnd.choice([1, 2]), B=5, schedule_check=rnd.random() < 0.5,
                    prefetch=rnd.choice([0, 200])))
    # The real launcher: thread / warp / block rows (up to 512 threads), vector or not, row
    # cache halving (device 2 grants less shared memory than it reports), many strided rows.
    for dtype, C, layout, B, device in [
            (torch.float32, 5, "contig", 9, 0), (torch.bfloat16, 40, "mis1", 9, 1),
            (torch.float16, 700, "padded", 5, 0), (torch.float32, 1500, "mis3", 4, 1),
            (torch.bfloat16, 3000, "sliced", 4, 0), (torch.float64, 600, "contig", 4, 1),
            (torch.bfloat16, 50000, "contig", 4, 2), (torch.float32, 20000, "mis1", 4, 0),
            (torch.float32, 40, "classstride", 600, 0), (torch.float16, 300, "classstride", 6, 1),
            (torch.float32, 20, "d3", 40, 0), (torch.bfloat16, 300, "d3", 4, 1)]:
        for o in ({"eps": 0.1, "weight": True}, {"focal": True, "gamma": 2.0},
                  {"prob": True, "z": 1e-3}):
            out.append(SoftmaxConfig(dtype, C, layout, o, launch="auto", B=B, device=device))
    # The launcher under run-time tuning (csrc/cuda/tuning.h): smaller blocks, a capped or no
    # row cache, the next row's prefetch.
    # Clusters (cluster_blocks): on the sm_90-like devices 0 and 2 (which grants less shared
    # memory than it reports: the cache shrinks), a block per row on the sm_86-like device 1.
    # Bulk loads (bulk_load): a block per row with the bulk-copy kernel for the forward and
    # fused launches on the sm_90-like devices 0 and 2, not on device 1; clusters, where they
    # apply, take precedence.
    # Device 3 runs clusters of at most 8 blocks: 16 falls back to a block per row. Device 4
    # is sm_90 with only compute_80 code in the build: neither clusters nor bulk loads.
    # Device 5 (sm_120-like) refuses cluster launches and the non-portable opt-in with
    # cudaErrorInvalidValue although its occupancy calculator counts clusters: a block per
    # row, with no error.
    for dtype, C, layout, device, tuning in [
            (torch.bfloat16, 50000, "contig", 2, (256, 4096, 2048, 0, 0)),
            (torch.float32, 20000, "mis1", 0, (128, 0, 1 << 20, 0, 0)),
            (torch.float16, 40000, "padded", 1, (512, 1 << 30, 300, 0, 0)),
            (torch.bfloat16, 9000, "mis1", 0, (512, -1, 0, 2, 0)),
            (torch.float32, 20000, "padded", 2, (512, -1, 256, 4, 0)),
            (torch.float16, 40000, "contig", 0, (512, 8192, 0, 8, 0)),
            (torch.bfloat16, 20000, "contig", 1, (256, -1, 0, 2, 0)),
            (torch.bfloat16, 50000, "mis1", 2, (512, -1, 0, 0, 1)),
            (torch.float32, 20000, "padded", 0, (256, 4096, 2048, 0, 1)),
            (torch.float16, 40000, "contig", 1, (512, -1, 0, 0, 1)),
            (torch.bfloat16, 9000, "contig", 0, (512, -1, 0, 2, 1)),
            (torch.bfloat16, 70000, "contig", 3, (512, -1, 0, 16, 0)),
            (torch.float32, 20000, "mis1", 3, (512, -1, 0, 8, 1)),
            (torch.float16, 40000, "padded", 4, (512, -1, 0, 8, 1)),
            (torch.bfloat16, 20000, "contig", 4, (256, -1, 0, 0, 1)),
            (torch.bfloat16, 50000, "contig", 5, (512, -1, 0, 4, 0)),
            (torch.float32, 40000, "mis1", 5, (512, -1, 0, 16, 1))]:
        for o in ({"eps": 0.1, "weight": True}, {"focal": True, "gamma": 2.0}, {}):
            out.append(SoftmaxConfig(dtype, C, layout, o, launch="auto", B=4, device=device,
                                     tuning=tuning))
    # Probability targets over rows with whole batches (a block of 32 threads: 192 vectors
    # or more): the forward must sum them as the fused kernel does (same lse bits).
    for dtype, C in ((torch.bfloat16, 2057), (torch.float16, 3001), (torch.float32, 1100)):
        for threads in (32, 64):
            out.append(SoftmaxConfig(dtype, C, "contig", {"prob": True}, group=2,
                                     threads=threads, vec=True, cache="full", grid=2, B=5))
    out += bulk_configs()
    out += far_configs()
    return out


def bulk_configs() -> list[SoftmaxConfig]:
    """A block per row whose row cache is filled by bulk copies (csrc/cuda/bulk_copy.cuh),
    for pass 1 or the backward's one pass (in place too), launched directly: blocks of 32
    or 64 threads, so that a cache of a few hundred slots spans several chunks; a cache
    over part of the row, all of it or none; one block taking every row (the barriers'
    phases alternate, the cache is refilled) or two; every option (transform and
    probability-target rows take the vector-by-vector pass 1). Its own random stream, so
    the sample before it is unchanged."""
    rnd = random.Random(20261205)
    out = []
    deal = dealer(rnd)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for threads in (32, 64):
            for layout in ("contig", "mis1", "padded", "sliced"):
                o = deal()
                out.append(SoftmaxConfig(
                    dtype, rnd.choice([1000, 3079, 5003]), layout, o, group=2,
                    threads=threads, vec=True, bulk=True,
                    cache=rnd.choice(["part", "part", "full", "full", "none"]),
                    grid=rnd.choice([1, 2]), B=5, schedule_check=rnd.random() < 0.5,
                    prefetch=rnd.choice([0, 200])))
    # A cluster per row: each block's share of a segment is one run of the copies; one or
    # two clusters, so a cluster takes several rows.
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for threads, cluster in ((32, 2), (32, 4), (64, 2)):
            for layout in ("contig", "mis1"):
                o = deal()
                out.append(SoftmaxConfig(
                    dtype, rnd.choice([1000, 3079, 5003]), layout, o, group=3,
                    threads=threads, vec=True, cluster=cluster, bulk=True,
                    cache=rnd.choice(["part", "full", "full", "none"]),
                    grid=cluster * rnd.choice([1, 2]), B=5, schedule_check=rnd.random() < 0.5,
                    prefetch=rnd.choice([0, 200])))
    # Rows of an odd bf16 length alternate their 16-byte alignment, so a whole-row cache
    # has 129 or 128 vectors and 5 or 4 chunks of 32: a barrier a row leaves unarmed keeps
    # its phase (a review found one parity bit for all barriers wrong here).
    for C, threads, group, cluster, grid in ((1033, 32, 2, 1, 1), (1033, 32, 2, 1, 2),
                                             (1041, 32, 2, 1, 2), (2065, 32, 3, 2, 4)):
        for o in ({}, {"eps": 0.1}, {"all_ignored": True}):
            out.append(SoftmaxConfig(
                torch.bfloat16, C, "contig", o, group=group, threads=threads, vec=True,
                cluster=cluster, bulk=True, cache="full", grid=grid, B=8))
    return out


# Row offsets of the "far" layout, row r taking entry r mod len: the stored lse's lo, up to
# half an ulp of hi, then takes each tier of RowLse::correction (1 - lo below 2^-16, the
# polynomial below 2^-12, exp beyond: hi near 30, 1000 and 5000, and 1e5 or 1e8) and
# enters the loss, the smoothing and probability-target sums and focal's log p_t with
# values far from 0. Beyond 2^30 (3e9, 1e20) the base-2 loops give way to base e (their
# shift's residual would leave ex2's range) and the backward recomputes the row's lse (its
# stored double lost lo); those come early, so that the 5-row configurations have them.
# (float16 holds 65504 at most.)
FAR_OFFSETS = {torch.float32: (30.0, 3e9, 1000.0, 1e20, 5000.0, 1e5, 1e8),
               torch.bfloat16: (30.0, 3e9, 1000.0, 1e20, 5000.0, 1e5, 1e8),
               torch.float16: (30.0, 1000.0, 5000.0, 3e4, 6e4),
               torch.float64: (30.0, 1e5)}


def far_configs() -> list[SoftmaxConfig]:
    """Logits far from 0 ("far" layout) in every group shape, vector or scalar, every option
    dealt in turn, and through the real launcher. Its own random stream, so the sample
    before it is unchanged."""
    rnd = random.Random(20261206)
    out = []
    deal = dealer(rnd)
    for dtype in DTYPES:
        for _, group, threads in GROUPS:
            for vec in (False, True):
                if vec and (dtype == torch.float64 or group == 0):
                    continue
                out.append(SoftmaxConfig(
                    dtype, rnd.choice([33, 257, 1000] if group else [3, 33, 100]), "far",
                    deal(), group=group, threads=threads, vec=vec,
                    cache=rnd.choice(["none", "part", "full"]), grid=rnd.choice([1, 2]),
                    B=10 if group else 20))
    for dtype, C in ((torch.float32, 3000), (torch.bfloat16, 20000), (torch.float16, 700)):
        for o in ({"eps": 0.1, "weight": True, "z": 1e-3}, {"focal": True, "gamma": 2.0},
                  {"prob": True}):
            out.append(SoftmaxConfig(dtype, C, "far", o, launch="auto", B=5))
    # Rows whose cache bulk copies fill (a block's, a cluster's), every offset: beyond 2^30
    # the backward takes pass 1 again, from the copies it started for its one pass.
    for dtype in (torch.float32, torch.bfloat16):
        for group, cluster, threads in ((2, 1, 32), (2, 1, 64), (3, 2, 32), (3, 4, 32)):
            out.append(SoftmaxConfig(
                dtype, rnd.choice([1000, 3079]), "far", deal(), group=group, threads=threads,
                vec=True, cluster=cluster, bulk=True, cache=rnd.choice(["part", "full"]),
                grid=cluster * rnd.choice([1, 2]), B=7))
    return out


def fastmath_configs() -> list[SoftmaxConfig]:
    """__expf / __logf at the edges of their documented error: the clamp of lse at the row
    maximum (log s >= 0) keeps focal loss finite for non-integer gamma."""
    out = []
    for bias in (-1, 1):
        for dtype, group, threads, vec in [(torch.float32, 0, 32, False),
                                           (torch.bfloat16, 1, 64, True),
                                           (torch.float16, 2, 64, True)]:
            for o in ({"focal": True, "gamma": 1.5}, {"focal": True, "gamma": 0.5},
                      {"eps": 0.1, "z": 1e-3}):
                out.append(SoftmaxConfig(dtype, 40, "saturated", o, group=group,
                                         threads=threads, vec=vec, fastmath=bias))
    return out


class SaturatedScenario(SoftmaxScenario):
    """Rows whose largest logit dominates: s = sum exp(x - max) is 1 to within __logf's error."""

    def check(self, fails: dict):
        super().check(fails)
        b = self.batch
        loss, lse = b.get(self.fwd_loss), b.get(self.fwd_lse)
        rowmax = self.x.to(self.acc).amax(1)
        if not (torch.isfinite(loss).all() and (loss >= 0).all() and (lse >= rowmax).all()):
            fails.setdefault("fastmath", []).append(
                f"{self.sid} [{self.cfg.describe()}]: loss {loss.flatten().tolist()} "
                f"lse - max {(lse - rowmax).flatten().tolist()}")
        for r in (self.bwd,) + ((self.fused[2],) if self.fused else ()):
            if not torch.isfinite(b.get(r).double()).all():
                fails.setdefault("fastmath", []).append(
                    f"{self.sid} [{self.cfg.describe()}]: non-finite gradient")


def build_sample(seed: int = 20261121) -> list:
    """Deterministic: the same scenarios on every run. Each entry is a function of a Batch that
    adds the scenario's cases to it and returns the scenario (which checks them later)."""
    rnd = random.Random(seed)
    out = []
    for i, cfg in enumerate(softmax_configs(rnd)):
        out.append(partial(SoftmaxScenario, cfg=cfg, sid=f"s{i}", seed=i))
    for i, cfg in enumerate(fastmath_configs()):
        out.append(partial(SaturatedScenario, cfg=cfg, sid=f"f{i}", seed=1000 + i))
    bad_targets = [(100, torch.int64), (-5, torch.int64), (10**12, torch.int64),
                   (200, torch.uint8), (1 << 30, torch.int32)]
    k = 0
    for dtype in DTYPES:
        for _, group, threads in GROUPS[:3]:
            for vec in (False, True):
                if vec and (group == 0 or dtype == torch.float64):
                    continue
                for bad, tdtype in rnd.sample(bad_targets, 2):
                    cfg = SoftmaxConfig(dtype, 100, rnd.choice(["mis1", "contig", "padded"]),
                                        {}, group=group, threads=threads, vec=vec, B=4)
                    out.append(partial(BadTargetScenario, cfg=cfg, sid=f"t{k}", seed=2000 + k,
                                       bad=bad, tdtype=tdtype))
                    k += 1
    for C, layout in ((33, "classstride"), (3000, "contig"), (20, "d3")):
        cfg = SoftmaxConfig(torch.float32, C, layout, {}, launch="auto", B=4)
        out.append(partial(BadTargetScenario, cfg=cfg, sid=f"t{k}", seed=2000 + k, bad=7000,
                           tdtype=torch.int64))
        k += 1
    k = 0
    for dtype in DTYPES:
        for layout in ("contig", "mis1", "padded", "classstride", "d3"):
            for launch, group, threads in (("direct", 0, 32), ("direct", 1, 64),
                                           ("direct", 2, 64), ("auto", 0, 0)):
                if launch == "direct" and group > 0 and layout in ("classstride", "d3"):
                    continue  # the launcher's vector instantiations need sc == 1
                C = rnd.choice([1, 7, 100, 3001] if launch == "direct" else [7, 300, 5000])
                out.append(partial(RescaleScenario, sid=f"r{k}", seed=3000 + k, dtype=dtype,
                                   layout=layout, C=C, launch=launch, group=group,
                                   threads=threads))
                k += 1
    k = 0
    for dtype in DTYPES:
        kn = 16 // dtype.itemsize  # elements per 16-byte vector
        for n in (0, 1, kn * 256 * 3 + 5, rnd.choice([7, 100, 1001])):
            for off in (0, 1):  # offset 1: not 16-byte aligned, the scalar path
                alpha, gamma = rnd.choice([(0.25, 2.0), (-1.0, 1.5), (0.5, 0.0), (0.25, 0.5),
                                           (0.75, 1.0)])
                out.append(partial(SigmoidScenario, sid=f"g{k}", seed=4000 + k, dtype=dtype,
                                   n=n, off=off, alpha=alpha, gamma=gamma,
                                   soft=rnd.random() < 0.5, device=k % 3))
                k += 1
    # The sum's block count reaches kSigmoidSumBlocks: the grid-stride loop wraps.
    for dtype, n, off in ((torch.float64, 1024 * 256 * 2 + 4001, 0),
                          (torch.float32, 1024 * 256 + 999, 1)):
        out.append(partial(SigmoidScenario, sid=f"g{k}", seed=4000 + k, dtype=dtype, n=n,
                           off=off, alpha=0.25, gamma=2.0, soft=False, device=0))
        k += 1
    return out


# ---- running it -----------------------------------------------------------------------------

BATCHES = 4  # emulator processes, JOBS at a time


class Outcome(NamedTuple):
    fails: dict  # category -> failure lines
    scenarios: list
    batches: list


@pytest.fixture(scope="module")
def emulated(tmp_path_factory) -> Outcome:
    """Builds the emulator and runs the whole sample once; the tests look at the outcome."""
    if _gxx() is None:
        pytest.skip("no g++ on PATH: the CUDA kernel emulator cannot be built")
    if cuda_include_dir() is None:
        pytest.skip("CUDA toolkit headers (cuda_runtime.h, cuda_bf16.h, cuda_fp16.h) not "
                    "found via $CUDA_HOME, $CUDA_PATH, nvcc or /usr/local/cuda")
    exe, _ = build_harness()
    return run_sample(exe, tmp_path_factory.mktemp("cuda_emulation"))


def run_sample(exe: Path, workdir: Path, sample: list | None = None) -> Outcome:
    """Runs `sample` (default: build_sample()) and checks every scenario of it."""
    batches = [Batch() for _ in range(BATCHES)]
    makers = build_sample() if sample is None else sample
    scenarios = [make(batches[i % BATCHES]) for i, make in enumerate(makers)]
    with ThreadPoolExecutor(JOBS) as ex:
        errors = list(ex.map(lambda ib: ib[1].run(exe, workdir, f"batch{ib[0]}"),
                             enumerate(batches)))
    crashed = [e for e in errors if e]
    fails: dict[str, list[str]] = {}
    if crashed:
        fails["crash"] = crashed
        return Outcome(fails, scenarios, batches)
    for s in scenarios:
        s.check(fails)
    for i, b in enumerate(batches):
        touched = b.written_inputs()
        if touched:
            fails.setdefault("inputs", []).append(f"batch {i}: input buffers written: {touched}")
    return Outcome(fails, scenarios, batches)


def _assert_none(emulated: Outcome, *categories):
    fails = emulated.fails
    if "crash" in fails:
        pytest.fail("the emulator stopped:\n" + "\n".join(fails["crash"]))
    lines = [ln for c in categories for ln in fails.get(c, [])]
    if lines:
        pytest.fail(f"{len(lines)} failures:\n" + "\n".join(lines[:25]))


def test_runs_without_faults_or_stray_writes(emulated):
    """No device fault, launch error or unexpected assert; every input buffer unchanged;
    every access inside its buffer (checked by ASan, or by canaries without it)."""
    _assert_none(emulated, "status", "inputs")


def test_softmax_family_matches_reference(emulated):
    _assert_none(emulated, "values")


def test_softmax_bitwise_properties(emulated):
    """fused == forward + backward, in-place == out-of-place, in-place stays in its view,
    focal loss with gamma = 0 == cross-entropy."""
    _assert_none(emulated, "bitwise")


def test_results_do_not_depend_on_schedule(emulated):
    _assert_none(emulated, "schedule")


def test_bad_target_is_a_device_assert(emulated):
    _assert_none(emulated, "bad_target")


def test_rescale_grad_rows(emulated):
    _assert_none(emulated, "rescale")


def test_sigmoid_focal_elementwise(emulated):
    _assert_none(emulated, "sigmoid")


def test_sigmoid_focal_sum(emulated):
    """Value, gradient, and a partition that depends on n alone (not the device, not the
    schedule), within kSigmoidSumBlocks partials."""
    _assert_none(emulated, "sigmoid_sum")


def test_fast_math_error_bounds(emulated):
    _assert_none(emulated, "fastmath")


def test_sample_covers_the_kernels(emulated):
    """Every kernel instantiation the launchers can pick ran at least once; the real launcher
    itself picked each group shape, and shrank its row cache on the device that grants less
    shared memory than it reports."""
    _assert_none(emulated)
    scenarios, batches = emulated.scenarios, emulated.batches
    launches = {cid: lns for b in batches for cid, lns in b.launches.items()}
    ran = {ln[4] for lns in launches.values() for ln in lns if ln[3] == "-"}
    missing = []
    for ctype in ("float", "double", "__nv_bfloat16", "__half"):
        shapes = ["ThreadGroup, false", "WarpGroup, false", "BlockGroup, false"]
        if ctype != "double":
            shapes += ["WarpGroup, true", "BlockGroup, true, false", "ClusterGroup, true, false",
                       "BlockGroup, true, true", "ClusterGroup, true, true"]
        for mode in (0, 1, 2):
            for shape in shapes:
                missing.append(f"softmax_loss_kernel<{ctype}, (tlf::Mode){mode}, "
                               f"tlf::cuda::{shape}")
        for k in ("sigmoid_focal_kernel", "sigmoid_focal_sum_kernel", "rescale_grad_rows_kernel"):
            missing.append(f"{k}<{ctype},")
    missing = [m for m in missing if not any(m in name for name in ran)]
    assert not missing, f"never ran: {missing}"
    auto = [s for s in scenarios if isinstance(s, SoftmaxScenario) and s.cfg.launch == "auto"]
    picked = {m.group(1) for s in auto for cid, lns in launches.items()
              if cid.startswith(s.sid + ".") for ln in lns
              for m in [re.search(r"tlf::cuda::(\w+Group, \w+(?:, \w+)?)>", ln[4])] if m}
    assert picked >= {"ThreadGroup, false, false", "WarpGroup, false, false",
                      "WarpGroup, true, false", "BlockGroup, false, false",
                      "BlockGroup, true, false", "BlockGroup, true, true",
                      "ClusterGroup, true, false", "ClusterGroup, true, true"}, picked
    blocks = {ln[1] for lns in launches.values() for ln in lns if "BlockGroup" in ln[4]}
    assert {128, 256, 512} <= blocks, f"block-per-row sizes run: {sorted(blocks)}"
    shrunk = [ln for s in auto if s.cfg.device == 2 for cid, lns in launches.items()
              if cid == f"{s.sid}.fused" for ln in lns
              if 0 < ln[2] < -(-s.cfg.C // (16 // s.cfg.dtype.itemsize)) * 16]
    assert shrunk, "no launch on device 2 shrank the row cache"


def test_launcher_follows_tuning(emulated):
    """Under a BlockRowTuning the launcher's block-per-row launches take its block size (the
    rows are long enough not to halve it) and keep the row cache within its cap; with
    cluster_blocks, on an sm_90-like device that runs clusters of that size with sm_90 code
    every launch is a cluster of that many blocks of 128 threads (a whole number of
    clusters, each block's cache within the cap), and elsewhere a block per row, no error
    (on the device that refuses cluster launches, the refused launches are clusters only);
    with bulk_load, on an sm_90-like device with sm_90 code every launch (block or cluster)
    takes the bulk-copy kernel, with a row cache, and elsewhere the plain one. The values
    are checked with the other softmax cases, against the reference."""
    _assert_none(emulated)
    launches = {cid: lns for b in emulated.batches for cid, lns in b.launches.items()}
    tuned = [s for s in emulated.scenarios
             if isinstance(s, SoftmaxScenario) and s.cfg.tuning is not None]
    assert len(tuned) == 51
    # The largest cluster each emulated device runs (device 5 none: it refuses the launches
    # its occupancy calculator counts), and whether the build has sm_90 code for it
    # (emu_runtime.cpp's devices()).
    max_cluster = {0: 16, 1: 0, 2: 16, 3: 8, 4: 16, 5: 0}
    sm90_code = {0: True, 1: False, 2: True, 3: True, 4: False, 5: True}
    clustered = bulk = refused = 0
    for s in tuned:
        threads, cap, _, cluster, bulk_load = s.cfg.tuning
        cap = cap if cap >= 0 else 1 << 62
        ran = [ln for cid, lns in launches.items() if cid.startswith(s.sid + ".") for ln in lns]
        mine = [ln for ln in ran if ln[3] == "-"]
        no = [ln for ln in ran if ln[3] != "-"]
        assert all(s.cfg.device == 5 and ln[5] == cluster > 1 for ln in no), no
        refused += len(no)
        if cluster and sm90_code[s.cfg.device] and cluster <= max_cluster[s.cfg.device]:
            clustered += 1
            shape, threads = "ClusterGroup, true", 128
            assert all(ln[5] == cluster and ln[0] % cluster == 0 for ln in mine), mine
        else:
            shape = "BlockGroup, true"
            assert all(ln[5] == 1 for ln in mine), mine
        blocks = [ln for ln in mine if shape in ln[4]]
        assert blocks and len(blocks) == len(mine), (s.cfg.describe(), mine)
        assert {ln[1] for ln in blocks} == {threads}, (s.cfg.describe(), blocks)
        assert all(ln[2] <= cap for ln in blocks), (s.cfg.describe(), blocks)
        want = bool(bulk_load) and sm90_code[s.cfg.device]
        bulk += want * len(mine)
        assert all(f"{shape}, {str(want).lower()}>" in ln[4] and (ln[2] > 0 or not want)
                   for ln in mine), (s.cfg.describe(), mine)
    assert clustered == 15
    assert refused > 0, "device 5 never refused a cluster launch: the fallback went untested"
    # 5 settings (3 a block per row, 2 clusters) x 3 option sets x (fwd, fused, bwd, and
    # in-place but for focal loss)
    assert bulk == 55


def test_cluster_launch_error_is_returned_not_retried(emulated):
    """A cluster launch that fails with an error other than a refusal of its configuration
    (device 6: cudaErrorLaunchFailure, as an error left by earlier asynchronous work comes
    back) is the op's error: returned at once, with no smaller row cache tried and no block
    per row launched instead (which would run on, past a broken context)."""
    _assert_none(emulated)
    exe, _ = build_harness()
    batch = Batch()
    scenario = SoftmaxScenario(batch, SoftmaxConfig(
        torch.bfloat16, 20000, "contig", {}, launch="auto", B=4, device=6,
        tuning=(512, -1, 0, 4, 0)), sid="e", seed=1)
    with tempfile.TemporaryDirectory() as work:
        assert batch.run(exe, Path(work), "errors") is None
    assert scenario.fused is not None and batch.results, batch.results
    launch_failure = "719"  # cudaErrorLaunchFailure
    for cid, (status, asserts, _) in batch.results.items():
        assert status == launch_failure and asserts == 0, (cid, status)
        lns = batch.launches.get(cid, [])
        assert len(lns) == 1 and lns[0][5] == 4 and lns[0][3] != "-", (cid, lns)


def main(argv: list[str]) -> int:
    """By hand (tests/cuda_emulation/README.md): build the emulator and run the sample, with
    optional bugs planted in the build directory's copy of the kernel sources."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--plant", nargs=3, action="append", default=[],
                    metavar=("FILE", "OLD", "NEW"), help="replace OLD by NEW in csrc/cuda/FILE")
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--compare-with", type=Path, metavar="HARNESS",
                    help="also run the sample with another emulator binary (e.g. a copy of "
                         "the one --build-only printed, before a change) and report whether "
                         "every output buffer is bit-identical: a refactoring's check")
    args = ap.parse_args(argv)

    def patch(name, text):
        for file, old, new in args.plant:
            if file == name:
                if old not in text:
                    raise SystemExit(f"--plant: {old!r} not in {file}")
                text = text.replace(old, new)
        return text

    exe, asan = build_harness(patch if args.plant else None)
    print(f"emulator: {exe} ({'ASan + UBSan' if asan else 'canaries'})")
    try:
        if args.build_only:
            return 0
        with tempfile.TemporaryDirectory() as work:
            outcome = run_sample(exe, Path(work))
            fails = outcome.fails
            if args.compare_with is not None:
                (Path(work) / "other").mkdir()
                other = run_sample(args.compare_with.resolve(), Path(work) / "other")
                differ = [i for i, (a, b) in enumerate(zip(outcome.batches, other.batches))
                          if a.out != b.out]
                total = sum(len(b.out or b"") for b in outcome.batches)
                print(f"compared with {args.compare_with}: {total} output bytes, "
                      + (f"batches {differ} differ" if differ else "bit-identical"))
                if differ or other.fails:
                    fails.setdefault("compare", []).append(
                        f"batches {differ} differ; the other binary's failures: "
                        f"{ {k: len(v) for k, v in other.fails.items()} }")
    finally:
        if args.plant:
            shutil.rmtree(exe.parent, ignore_errors=True)
    for category, lines in fails.items():
        print(f"{category}: {len(lines)} failures")
        for line in lines[:5]:
            print("   ", line[:400])
    print("all checks passed" if not fails else "FAILED")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
