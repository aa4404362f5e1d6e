// Every operator schema of torchloss_fused, declared once. Device kernels register in
// csrc/cpu and csrc/cuda; fake kernels and autograd are registered from Python (_ops.py).
//
// Shapes: `input` is a (B, C, D) view with the class dim at 1 (Python reshapes
// (C), (N, C) and (N, C, d1..dK) into it). A class-index target is (B, D) int64/int32/uint8;
// a probability target is (B, C, D) in the input dtype or float32. Per-row outputs
// (loss, lse) are contiguous (B, D): loss in the accumulation dtype (float32, or float64
// for float64 inputs), lse in float64 whatever the input (kernel_params.h, RowLse); the
// backward's grad_lse is in lse's dtype too. softcap = 0 means no soft-capping. ce_fwd's
// inplace_backward only tells its autograd formula to call _ce_bwd_inplace; the forward
// kernels ignore it.
#include <Python.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/library.h>

#include <vector>

#include "cpu/kernels.h"
#include "host_buffers.h"
#include "reduced_loss.h"
#include "reduced_loss_node.h"
#include "tensor_params.h"
#if defined(TLF_WITH_CUDA)
#include "cuda/tuning.h"
#endif

namespace {

// _C.cpu_kernels(): the instruction set of the CPU kernels chosen at run time.
PyObject* cpu_kernels(PyObject*, PyObject*) {
  return PyUnicode_FromString(tlf::cpu::kernel_table().name);
}

// _C.has_cuda(): whether this build contains the CUDA kernels.
PyObject* has_cuda(PyObject*, PyObject*) {
#if defined(TLF_WITH_CUDA)
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

// _C.openmp(): whether at::parallel_for in these kernels uses OpenMP threads (it runs
// serially when torch's OpenMP build is used without -fopenmp).
PyObject* openmp(PyObject*, PyObject*) {
#if defined(_OPENMP)
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

// _C.set_cuda_tuning(max_threads, row_cache_bytes, prefetch_bytes, cluster_blocks,
// bulk_load) and _C.cuda_tuning() (the same five, as a tuple):
// the block-per-row launch settings (csrc/cuda/tuning.h); torchloss_fused/_cuda_tuning.py
// validates them first. RuntimeError in a build without CUDA kernels.
PyObject* set_cuda_tuning(PyObject*, PyObject* args) {
  int threads = 0, cluster = 0, bulk = 0;
  long long cache = 0, prefetch = 0;
  if (!PyArg_ParseTuple(args, "iLLii", &threads, &cache, &prefetch, &cluster, &bulk)) {
    return nullptr;
  }
#if defined(TLF_WITH_CUDA)
  tlf::cuda::BlockRowTuning t;
  t.max_threads = threads;
  t.row_cache_bytes = cache;
  t.prefetch_bytes = prefetch;
  t.cluster_blocks = cluster;
  t.bulk_load = bulk;
  if (!tlf::cuda::set_block_row_tuning(t)) {
    PyErr_SetString(PyExc_ValueError,
                    "cuda tuning: max_threads must be 128, 256 or 512, row_cache_bytes >= -1, "
                    "prefetch_bytes >= 0, cluster_blocks 0, 2, 4, 8 or 16 and bulk_load 0 or 1");
    return nullptr;
  }
  Py_RETURN_NONE;
#else
  PyErr_SetString(PyExc_RuntimeError, "this build has no CUDA kernels to tune");
  return nullptr;
#endif
}

PyObject* cuda_tuning(PyObject*, PyObject*) {
#if defined(TLF_WITH_CUDA)
  const tlf::cuda::BlockRowTuning t = tlf::cuda::block_row_tuning();
  return Py_BuildValue("(iLLii)", t.max_threads, static_cast<long long>(t.row_cache_bytes),
                       static_cast<long long>(t.prefetch_bytes), t.cluster_blocks,
                       t.bulk_load);
#else
  PyErr_SetString(PyExc_RuntimeError, "this build has no CUDA kernels to tune");
  return nullptr;
#endif
}

// _C.advise_huge_pages(address, nbytes): advise_huge_pages (tensor_params.h) for a CPU
// tensor's memory just allocated in Python (linear_cross_entropy's buffers).
PyObject* advise_huge_pages(PyObject*, PyObject* args) {
  unsigned long long address = 0, bytes = 0;
  if (!PyArg_ParseTuple(args, "KK", &address, &bytes)) return nullptr;
  tlf::advise_huge_pages(reinterpret_cast<const void*>(static_cast<uintptr_t>(address)),
                         static_cast<size_t>(bytes));
  Py_RETURN_NONE;
}

// _C.host_empty(shape, like): host_empty (host_buffers.h) of `shape` (a tuple of ints) in
// the dtype of the tensor `like`, for linear_cross_entropy's buffers made in Python.
PyObject* host_empty(PyObject*, PyObject* args) {
  PyObject *shape = nullptr, *like = nullptr;
  if (!PyArg_ParseTuple(args, "O!O", &PyTuple_Type, &shape, &like)) return nullptr;
  if (!THPVariable_Check(like)) {
    PyErr_SetString(PyExc_TypeError, "host_empty: `like` must be a tensor");
    return nullptr;
  }
  std::vector<int64_t> sizes;
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(shape); ++i) {
    const long long v = PyLong_AsLongLong(PyTuple_GET_ITEM(shape, i));
    if (v == -1 && PyErr_Occurred()) return nullptr;
    if (v < 0) {
      PyErr_SetString(PyExc_ValueError, "host_empty: negative size");
      return nullptr;
    }
    sizes.push_back(v);
  }
  try {
    return THPVariable_Wrap(tlf::host_empty(sizes, THPVariable_Unpack(like).scalar_type()));
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}

// _C.host_cache_info() -> (cached_bytes, cached_blocks, limit_bytes, hits, misses).
PyObject* host_cache_info(PyObject*, PyObject*) {
  const tlf::HostCacheInfo i = tlf::host_cache_info();
  return Py_BuildValue("(LLLLL)", static_cast<long long>(i.cached_bytes),
                       static_cast<long long>(i.cached_blocks),
                       static_cast<long long>(i.limit_bytes), static_cast<long long>(i.hits),
                       static_cast<long long>(i.misses));
}

PyObject* host_cache_clear(PyObject*, PyObject*) {
  tlf::host_cache_clear();
  Py_RETURN_NONE;
}

PyObject* set_host_cache_limit(PyObject*, PyObject* args) {
  long long bytes = 0;
  if (!PyArg_ParseTuple(args, "L", &bytes)) return nullptr;
  if (bytes < 0) {
    PyErr_SetString(PyExc_ValueError, "the host cache limit must be >= 0");
    return nullptr;
  }
  tlf::set_host_cache_limit(bytes);
  Py_RETURN_NONE;
}

// _C.set_cpu_stream_threshold(bytes) (-1: the default) and _C.cpu_stream_threshold():
// above how many bytes of logits + gradient the CPU kernels stream a gradient.
PyObject* set_cpu_stream_threshold(PyObject*, PyObject* args) {
  long long bytes = 0;
  if (!PyArg_ParseTuple(args, "L", &bytes)) return nullptr;
  tlf::cpu::set_stream_threshold_bytes(bytes);
  Py_RETURN_NONE;
}

PyObject* cpu_stream_threshold(PyObject*, PyObject*) {
  return PyLong_FromLongLong(tlf::cpu::stream_threshold_bytes());
}

PyMethodDef methods[] = {
    {"cpu_kernels", cpu_kernels, METH_NOARGS, "Instruction set of the CPU kernels in use."},
    {"has_cuda", has_cuda, METH_NOARGS, "Whether the CUDA kernels were compiled in."},
    {"openmp", openmp, METH_NOARGS, "Whether the CPU kernels run on OpenMP threads."},
    {"set_cuda_tuning", set_cuda_tuning, METH_VARARGS,
     "Set the block-per-row CUDA launch settings (max_threads, row_cache_bytes, "
     "prefetch_bytes, cluster_blocks, bulk_load)."},
    {"cuda_tuning", cuda_tuning, METH_NOARGS, "The block-per-row CUDA launch settings."},
    {"advise_huge_pages", advise_huge_pages, METH_VARARGS,
     "Ask for transparent huge pages on a large CPU buffer (address, nbytes) before first "
     "touch."},
    {"host_empty", host_empty, METH_VARARGS,
     "An uninitialised contiguous CPU tensor (shape, like: its dtype) from the host buffer "
     "cache when large."},
    {"host_cache_info", host_cache_info, METH_NOARGS,
     "(cached_bytes, cached_blocks, limit_bytes, hits, misses) of the host buffer cache."},
    {"host_cache_clear", host_cache_clear, METH_NOARGS, "Free the host buffer cache's blocks."},
    {"set_host_cache_limit", set_host_cache_limit, METH_VARARGS,
     "Set the host buffer cache's limit in bytes (0: off)."},
    {"set_cpu_stream_threshold", set_cpu_stream_threshold, METH_VARARGS,
     "Logits + gradient bytes above which the CPU kernels stream a gradient "
     "(-1: the last-level cache's size)."},
    {"cpu_stream_threshold", cpu_stream_threshold, METH_NOARGS,
     "The threshold set_cpu_stream_threshold sets, in bytes."},
    {"reduced_loss", tlf::reduced_loss, METH_VARARGS,
     "A softmax loss reduced to a sum or a mean, eagerly, in one call (reduced_loss.h)."},
    {"rescale_reduced", tlf::rescale_reduced, METH_VARARGS,
     "Backward of reduced_loss's fused gradient, in place (reduced_loss.h)."},
    {"reduced_loss_node", tlf::reduced_loss_node, METH_VARARGS,
     "reduced_loss with its gradient, as a C++ autograd node (reduced_loss_node.h)."},
    {"set_reduced_node_backward", tlf::set_reduced_node_backward, METH_O,
     "Set the Python backward of reduced_loss_node's rare cases (reduced_loss_node.h)."},
    {"fast_cross_entropy", tlf::fast_cross_entropy, METH_VARARGS,
     "cross_entropy's commonest eager CPU call, or None (reduced_loss_node.h)."},
    {"fast_focal_loss", tlf::fast_focal_loss, METH_VARARGS,
     "focal_loss's commonest eager CPU call, or None (reduced_loss_node.h)."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

// `import torchloss_fused._C` loads this library, which runs the registrations below.
extern "C" __attribute__((visibility("default"))) PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                                   "torchloss_fused compiled kernels", -1, methods};
  PyObject* m = PyModule_Create(&module_def);
  // The version of the functions above that the Python package checks at import
  // (torchloss_fused/_schemas.py's PY_API): 2 since reduced_loss returns its guess's factor,
  // 3 since reduced_loss_node, 4 since fast_focal_loss.
  if (m != nullptr &&
      (PyModule_AddIntConstant(m, "PY_API", 4) != 0 ||
       PyModule_AddIntConstant(m, "REDUCED_NODE", tlf::reduced_node_in_use()) != 0 ||
       !tlf::register_reduced_loss_nodes())) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}

TORCH_LIBRARY(torchloss_fused, m) {
  m.def(
      "ce_fwd(Tensor input, Tensor target, Tensor? weight, int ignore_index, "
      "float label_smoothing, float z_loss, float softcap, float logit_scale, "
      "bool inplace_backward=False) -> (Tensor loss, Tensor lse)");
  m.def(
      "_ce_bwd(Tensor grad_loss, Tensor? grad_lse, Tensor input, Tensor target, "
      "Tensor? weight, Tensor lse, int ignore_index, float label_smoothing, float z_loss, "
      "float softcap, float logit_scale) -> Tensor");
  // Writes the gradient into `input` (inplace_backward=True).
  m.def(
      "_ce_bwd_inplace(Tensor grad_loss, Tensor? grad_lse, Tensor(a!) input, Tensor target, "
      "Tensor? weight, Tensor lse, int ignore_index, float label_smoothing, float z_loss, "
      "float softcap, float logit_scale) -> ()");
  m.def(
      "focal_fwd(Tensor input, Tensor target, Tensor? alpha, float alpha_scale, "
      "float gamma, int ignore_index) -> (Tensor loss, Tensor lse)");
  m.def(
      "_focal_bwd(Tensor grad_loss, Tensor input, Tensor target, Tensor? alpha, Tensor lse, "
      "float alpha_scale, float gamma, int ignore_index) -> Tensor");
  // Fused forward for training: also returns the gradient of sum_r grad_scale_r * loss_r
  // (grad_scale: (B, D) accumulation dtype, usually an expanded scalar = the grad_loss the
  // caller expects backward to receive), so logits are read once and the gradient written
  // once. Ignored rows get a zero gradient.
  m.def(
      "ce_fwd_grad(Tensor input, Tensor target, Tensor? weight, int ignore_index, "
      "float label_smoothing, float z_loss, float softcap, float logit_scale, "
      "Tensor grad_scale) -> (Tensor loss, Tensor lse, Tensor grad)");
  m.def(
      "focal_fwd_grad(Tensor input, Tensor target, Tensor? alpha, float alpha_scale, "
      "float gamma, int ignore_index, Tensor grad_scale) -> (Tensor loss, Tensor lse, "
      "Tensor grad)");
  // Backward of the fused ops: multiplies row r of grad by grad_loss_r / grad_scale_r,
  // skipping rows where the two are equal (the common case: one pass is saved) and rows
  // made for an infinite grad_scale (a mean over no counted target), which stay as made.
  m.def("_rescale_grad_rows(Tensor(a!) grad, Tensor grad_loss, Tensor grad_scale) -> ()");
  // Elementwise; input and target share shape and dtype; loss has that dtype.
  m.def("sigmoid_focal_fwd(Tensor input, Tensor target, float alpha, float gamma) -> Tensor");
  m.def(
      "_sigmoid_focal_bwd(Tensor grad_loss, Tensor input, Tensor target, float alpha, "
      "float gamma) -> Tensor");
  // Reductions without an elementwise loss tensor: the sum of the losses times
  // 1.0 / divisor (1 for a sum, the element count for a mean: an integer, which
  // torch.compile keeps symbolic where it would specialize on a float made of the count),
  // as a 0-dim tensor in the accumulation dtype (float64 for float64 input, else float32),
  // summed in a fixed order (bitwise the same run to run). The _grad form also returns the
  // gradient of that value, computed in the same pass (eager training reads the inputs once).
  m.def(
      "sigmoid_focal_sum(Tensor input, Tensor target, float alpha, float gamma, "
      "SymInt divisor) -> Tensor");
  m.def(
      "sigmoid_focal_sum_grad(Tensor input, Tensor target, float alpha, float gamma, "
      "SymInt divisor) -> (Tensor loss, Tensor grad)");
  // acc += src, as acc.add_(src) (same shape and device): linear_cross_entropy sums each
  // row chunk's bf16/fp16 grad_weight product into a float32 accumulator with it, in one
  // pass where a conversion and an add took two.
  m.def("_accumulate_(Tensor(a!) acc, Tensor src) -> ()");
}
