"""Builds torchloss_fused._C.

CPU kernels are always built (once per x86 capability: see CAPABILITY_FLAGS); CUDA kernels
are added when torch is a CUDA build and nvcc is found, or when FORCE_CUDA=1, and left out
when TORCHLOSS_FUSED_CPU_ONLY=1 (e.g. an nvcc that does not match torch's CUDA).
TORCHLOSS_FUSED_NO_EXTENSION=1 skips the extension: the pure-PyTorch fallback then serves.
"""

import os
import platform
import shutil
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent.resolve()


def _env_flag(name):
    """As torchloss_fused/_env.py's switch: 1/true/yes/on, or 0/false/no/off/empty/unset;
    any other value is an error (it had been read as off)."""
    text = os.environ.get(name, "").strip().lower()
    if text not in ("1", "true", "yes", "on", "", "0", "false", "no", "off"):
        raise SystemExit(f"{name} must be one of 1, true, yes, on, 0, false, no, off, got "
                         f"{os.environ[name]!r}")
    return text in ("1", "true", "yes", "on")


# Compiler flags per kernel file suffix: csrc/cpu/kernels_<capability>.cpp. The same source
# is compiled once per capability, each copy in its own namespace (CPU_CAPABILITY), and
# csrc/cpu/kernel_table.cpp picks one at run time; the build stays portable (no -march).
CAPABILITY_FLAGS = {
    "_default.cpp": ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"],
    "_avx2.cpp": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c",
                  "-mbmi", "-mbmi2"],
    "_avx512.cpp": ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-mavx512f",
                    "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
}
IS_X86 = platform.machine().lower() in ("x86_64", "amd64")


def _sources(x86=IS_X86):
    cpu = ["csrc/ops.cpp", "csrc/tensor_params.cpp", "csrc/host_buffers.cpp",
           "csrc/reduced_loss.cpp", "csrc/reduced_loss_node.cpp", "csrc/ordered_sum.cpp",
           "csrc/cpu/kernel_table.cpp",
           "csrc/cpu/ops_cpu.cpp",
           # Default-capability objects come first in the link so that the inline functions
           # they share with the AVX objects resolve to the portable copies.
           "csrc/cpu/kernels_default.cpp"]
    if x86:
        cpu += ["csrc/cpu/kernels_avx2.cpp", "csrc/cpu/kernels_avx512.cpp"]
    cuda = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
    return cpu, cuda


def _resolve_cuda_home():
    """Sets CUDA_HOME to the toolkit of the nvcc on PATH when neither CUDA_HOME nor
    CUDA_PATH is set. torch takes the parent of `which nvcc`'s directory, which is wrong
    when that nvcc is a wrapper script (e.g. /usr/local/bin/nvcc exec'ing
    /usr/local/cuda-13.0/bin/nvcc): the objects compile, then the link fails on -lcudart.
    nvcc's dry run names the directory it really runs from. Must run before
    torch.utils.cpp_extension is imported (it reads CUDA_HOME once)."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return
    try:
        # (a dry run prints its steps and runs none of them)
        out = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull],
                             capture_output=True, text=True, timeout=60).stderr
    except (OSError, subprocess.SubprocessError):
        return
    for line in out.splitlines():
        if line.startswith("#$ _HERE_="):
            home = Path(line.split("=", 1)[1].strip()).resolve().parent
            if (home / "include" / "cuda_runtime.h").is_file():
                os.environ["CUDA_HOME"] = str(home)
            return


def _want_cuda():
    if _env_flag("TORCHLOSS_FUSED_CPU_ONLY"):
        return False
    import torch

    if _env_flag("FORCE_CUDA"):
        if torch.version.cuda is None:
            raise SystemExit(f"FORCE_CUDA=1 needs a CUDA build of PyTorch; this torch "
                             f"({torch.__version__}) is CPU-only")
        return True
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and CUDA_HOME is not None


def _extensions():
    if _env_flag("TORCHLOSS_FUSED_NO_EXTENSION"):
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    class Build(BuildExtension):
        """Adds per-file capability flags and compiles all sources in parallel.

        Sources are compiled here directly with the commands BuildExtension would run:
        its own per-file wrapper swaps the executable on the shared compiler object, so it
        cannot run from several threads (it stays the fallback, one file at a time).
        """

        def build_extension(self, ext):
            wrapped_compile = self.compiler._compile
            lock = threading.Lock()
            cxx = list(getattr(self.compiler, "compiler_so_cxx", None)
                       or self.compiler.compiler_so)
            has_cuda = any(src.endswith(".cu") for src in ext.sources)
            nvcc_command = _nvcc_command() if has_cuda else None

            def compile_one(obj, src, ext_, cc_args, extra_postargs, pp_opts):
                is_cuda = src.endswith(".cu")
                if is_cuda and nvcc_command is None:
                    with lock:
                        wrapped_compile(obj, src, ext_, cc_args, extra_postargs, pp_opts)
                    return
                key = "nvcc" if is_cuda else "cxx"
                flags = list(extra_postargs[key] if isinstance(extra_postargs, dict)
                             else extra_postargs or [])
                for suffix, extra in CAPABILITY_FLAGS.items():
                    if src.endswith(suffix):
                        flags += extra
                if not any(f.startswith("-std=") for f in flags):
                    flags.append(_cxx_std())
                if is_cuda:
                    self.compiler.spawn(nvcc_command(cc_args, src, obj, flags))
                else:
                    self.compiler.spawn(cxx + cc_args + [src, "-o", obj] + flags)

            self.compiler._compile = compile_one
            self.compiler.compile = _parallel_compile.__get__(self.compiler)
            try:
                super().build_extension(ext)
            finally:
                self.compiler._compile = wrapped_compile

    cpu_sources, cuda_sources = _sources()
    # Headers: distutils rebuilds every object when one of these changes.
    depends = sorted(str(p.relative_to(ROOT)) for pattern in ("*.h", "*.cuh")
                     for p in (ROOT / "csrc").rglob(pattern))
    cxx = _cxx_flags()
    link = ["-fopenmp"] if "-fopenmp" in cxx else []
    macros = [("TLF_X86_KERNELS", None)] if IS_X86 else []
    if _want_cuda() and cuda_sources:
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
        if not arch:
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0a;10.0;12.0+PTX"
        ext = CUDAExtension(
            "torchloss_fused._C",
            cpu_sources + cuda_sources,
            define_macros=macros + [("TLF_WITH_CUDA", None)],
            depends=depends,
            extra_link_args=link,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math", "-lineinfo",
                                                     "--expt-relaxed-constexpr",
                                                     "--threads=4"]},
        )
    else:
        ext = CppExtension("torchloss_fused._C", cpu_sources, define_macros=macros,
                           depends=depends, extra_compile_args={"cxx": cxx},
                           extra_link_args=link)
    return [ext], {"build_ext": Build.with_options(use_ninja=False)}


def _cxx_flags():
    """The C++ flags of every source (CAPABILITY_FLAGS and _cxx_std() come on top).
    .ci/aarch64_compile_check.sh reads them, with _sources, by importing this file."""
    cxx = ["-O3", "-fvisibility=hidden", "-Wno-unknown-pragmas", "-ffp-contract=off"]
    if _torch_uses_openmp():
        # at::parallel_for is inline OpenMP code: without -fopenmp it silently runs on one
        # thread. The OpenMP runtime resolves to the libgomp torch has already loaded.
        cxx.append("-fopenmp")
    return cxx


def _nvcc_command():
    """A function building the nvcc command line BuildExtension uses for a .cu file, or None
    where torch's helpers for it are missing."""
    try:
        from torch.utils.cpp_extension import (
            COMMON_NVCC_FLAGS,
            _get_cuda_arch_flags,
            _join_cuda_home,
        )
    except ImportError:
        return None
    nvcc = _join_cuda_home("bin", "nvcc")

    def command(cc_args, src, obj, flags):
        flags = (COMMON_NVCC_FLAGS + ["--compiler-options", "'-fPIC'"] + flags
                 + _get_cuda_arch_flags(flags))
        return [nvcc] + cc_args + [src, "-o", obj] + flags

    return command


def _torch_uses_openmp():
    """Whether torch's intra-op threads are OpenMP (Linux builds), and gcc can compile it."""
    import torch

    return "OpenMP" in torch.__config__.parallel_info() and platform.system() == "Linux"


def _cxx_std():
    """The C++ standard torch's own extension builder would use for this torch."""
    import torch

    major, minor = (int(v) for v in torch.__version__.split(".")[:2])
    return "-std=c++20" if (major, minor) >= (2, 10) else "-std=c++17"


def _parallel_compile(self, sources, output_dir=None, macros=None, include_dirs=None,
                      debug=0, extra_preargs=None, extra_postargs=None, depends=None):
    """distutils' CCompiler.compile, with the objects built on all cores."""
    macros, objects, extra_postargs, pp_opts, build = self._setup_compile(
        output_dir, macros, include_dirs, sources, depends, extra_postargs)
    cc_args = self._get_cc_args(pp_opts, debug, extra_preargs)

    def one(obj):
        src, ext = build[obj]
        self._compile(obj, src, ext, cc_args, extra_postargs, pp_opts)

    jobs = int(os.environ.get("MAX_JOBS", os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        list(pool.map(one, [o for o in objects if o in build]))
    # Link portable objects first: where an inline function is emitted by several objects,
    # the linker keeps the first copy, and that copy must not need AVX.
    return sorted(objects, key=lambda o: any(k in o for k in ("_avx2.", "_avx512.")))


# (setuptools' build backend runs this file as __main__ too; an import only reads it)
if __name__ == "__main__":
    if not (_env_flag("TORCHLOSS_FUSED_CPU_ONLY")
            or _env_flag("TORCHLOSS_FUSED_NO_EXTENSION")):
        _resolve_cuda_home()
    ext_modules, cmdclass = _extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
