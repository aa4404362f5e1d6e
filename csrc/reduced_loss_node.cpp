// _C.reduced_loss_node: reduced_loss's forward as a C++ autograd node (see
// reduced_loss_node.h).
//
// The node is a torch::autograd::Function, so compiled autograd, saved-tensor hooks,
// anomaly mode and graph hooks treat it as any C++ custom function. Its context keeps what
// _eager.FusedReduced's Function kept: the input, target, weight and lse as saved tensors
// (packed by saved-tensor hooks, version-checked when unpacked), and outside them the
// gradient buffer, grad_scale, the denominator, and the target and weight with their
// versions (a plain reference: unpacking a saved target would make a checkpointed loss
// recompute its forward, which the buffer spares it). The backward's common case, an
// upstream gradient that is a plain tensor with nothing to differentiate, is the buffer
// rescaled in place (reduced::rescale) and handed on, as the Function's backward does it.
#include "reduced_loss_node.h"

#include "reduced_loss.h"

#include <ATen/autocast_mode.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/python_cpp_function.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/frontend/tracer.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/version.h>

#include <cmath>
#include <typeinfo>

namespace tlf {

namespace {

// Compiled autograd (torch.compile of a backward) refuses a C++ custom function not marked
// traceable before torch 2.7 (pytorch/pytorch#146229, which graph-breaks on it since),
// where it took the Python Function: older torch keeps the Function for every call.
constexpr bool kNodeInUse =
    TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 7);

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The Python backward (set_reduced_node_backward); a strong reference, never released:
// nodes may outlive the module's teardown.
PyObject* python_backward = nullptr;

c10::IValue tensor_or_none(const Tensor& t) {
  return t.defined() ? c10::IValue(t) : c10::IValue();
}

Tensor tensor_of(const c10::IValue& v) { return v.isNone() ? Tensor() : v.toTensor(); }

// Whether the upstream gradient is a tensor the rescale can take as it is: not batched by
// vmap nor wrapped by torch.func (those want the reference formula), no subclass.
bool plain(const Tensor& g) {
  static const c10::DispatchKeySet wrapped({
      c10::DispatchKey::Python,
      c10::DispatchKey::FuncTorchBatched,
      c10::DispatchKey::FuncTorchGradWrapper,
      c10::DispatchKey::Batched,
      c10::DispatchKey::Functionalize,
  });
  return !g.key_set().has_any(wrapped);
}

PyObject* wrap(const Tensor& t) {
  if (!t.defined()) Py_RETURN_NONE;
  return THPVariable_Wrap(t);
}

PyObject* scalars_tuple(int kind, const c10::List<double>& s, long long ignore_index) {
  if (kind == reduced::kFocal) return Py_BuildValue("(ddL)", s[0], s[1], ignore_index);
  return Py_BuildValue("(Ldddd)", ignore_index, s[0], s[1], s[2], s[3]);
}

// The node's backward in Python, for what apply below does not do itself.
Tensor backward_in_python(AutogradContext* ctx, const Tensor& grad, bool unchanged) {
  auto& d = ctx->saved_data;
  // (unpacked before the GIL: unpacking runs saved-tensor hooks, which take it themselves;
  // it raises autograd's error where the saved tensors were freed by an earlier backward)
  variable_list saved;
  if (unchanged) saved = ctx->get_saved_variables();
  pybind11::gil_scoped_acquire gil;
  TORCH_CHECK(python_backward != nullptr, "reduced_loss_node: no Python backward is set");
  const int kind = static_cast<int>(d["kind"].toInt());
  PyObject* saved_obj = nullptr;
  if (unchanged) {
    saved_obj = Py_BuildValue("(NNNN)", wrap(saved[0]), wrap(saved[1]), wrap(saved[2]),
                              wrap(saved[3]));
  } else {
    Py_INCREF(Py_None);
    saved_obj = Py_None;
  }
  PyObject* result = PyObject_CallFunction(
      python_backward, "iiNNNNNNNNLL", kind, static_cast<int>(d["reduction"].toInt()),
      wrap(grad), saved_obj,
      scalars_tuple(kind, d["scalars"].toDoubleList(), d["ignore_index"].toInt()),
      wrap(tensor_of(d["grad_scale"])), wrap(tensor_of(d["denom"])), wrap(tensor_of(d["grad"])),
      wrap(tensor_of(d["target"])), wrap(tensor_of(d["weight"])),
      static_cast<long long>(d["target_version"].toInt()),
      static_cast<long long>(d["weight_version"].toInt()));
  if (result == nullptr) {
    python_error error;
    error.persist();
    throw std::move(error);
  }
  Tensor out = THPVariable_Check(result) ? THPVariable_Unpack(result) : Tensor();
  Py_DECREF(result);
  d["grad"] = c10::IValue();  // (handed on or dropped, as the Python backward does)
  return out;
}

// The logits as (B, C, D) rows, by the steps of functional._rows_view (the same strides),
// but as a plain alias, below autograd's view tracking: the node takes the caller's logits
// themselves, so that the backward has no view node to pass the gradient through.
Tensor as_rows(const Tensor& input) {
  at::AutoDispatchBelowADInplaceOrView untracked;
  if (input.dim() == 1) return input.reshape({1, input.size(0), 1});
  if (input.dim() == 3) return input;
  if (input.dim() == 2) return input.unsqueeze(-1);
  int64_t rest = 1;
  for (int64_t i = 2; i < input.dim(); ++i) rest *= input.size(i);
  return input.reshape({input.size(0), input.size(1), rest});
}

// The forward and backward; the two node types below differ only in name.
struct ReducedLoss {
  // input: the caller's logits, any shape functional._rows_view takes; call->x is replaced
  // by their rows.
  static variable_list forward(AutogradContext* ctx, const Tensor& input, reduced::Call* call) {
    call->x = as_rows(input);
    reduced::Result r;
    {
      pybind11::gil_scoped_release no_gil;
      r = reduced::run(*call, /*with_grad=*/true, std::nullopt);
    }
    const Tensor w = call->w.value_or(Tensor());  // (an undefined one is saved as None)
    ctx->save_for_backward({input, call->t, w, r.lse});
    ctx->set_materialize_grads(false);
    auto& d = ctx->saved_data;
    d["kind"] = static_cast<int64_t>(call->kind);
    d["reduction"] = static_cast<int64_t>(call->reduction);
    d["ignore_index"] = static_cast<int64_t>(call->ignore_index());
    d["scalars"] = call->kind == reduced::kFocal
                       ? c10::List<double>({call->focal.alpha_scale, call->focal.gamma})
                       : c10::List<double>({call->ce.label_smoothing, call->ce.z_loss,
                                            call->ce.softcap, call->ce.logit_scale});
    d["grad"] = r.grad;
    d["grad_scale"] = r.grad_scale;
    d["denom"] = tensor_or_none(r.denom);
    d["target"] = call->t;
    d["target_version"] = static_cast<int64_t>(call->t._version());
    d["weight"] = tensor_or_none(w);
    d["weight_version"] = static_cast<int64_t>(w.defined() ? w._version() : 0);
    d["input_shape"] = input.sizes().vec();
    return {r.loss};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto& d = ctx->saved_data;
    const Tensor& grad = grads[0];
    const Tensor target = d["target"].toTensor(), weight = tensor_of(d["weight"]);
    // The version check autograd makes of saved tensors, for the ones kept outside them
    // (the Python backward raises its error).
    const bool unchanged =
        target._version() == d["target_version"].toInt() &&
        (!weight.defined() || weight._version() == d["weight_version"].toInt());
    if (unchanged && !grad.defined()) return {Tensor(), Tensor()};
    const Tensor buffer = tensor_of(d["grad"]);
    if (!unchanged || !buffer.defined() || at::GradMode::is_enabled() || !plain(grad)) {
      return {backward_in_python(ctx, grad, unchanged), Tensor()};
    }
    d["grad"] = c10::IValue();
    const int kind = static_cast<int>(d["kind"].toInt());
    const int reduction = static_cast<int>(d["reduction"].toInt());
    // loss.backward()'s upstream, 1 on the host, is the one the buffer was made for: the
    // rows' gradient of 1 (_reduction.rows_grad) is grad_scale bit for bit, as run() makes
    // grad_scale so, and the rescale leaves rows whose factor is 1 as they are. (This node
    // keeps no upstream guess, so its grad_scale is always the unit upstream's.)
    if (reduction == reduced::kNone || grad.dim() != 0 || !grad.is_cpu() ||
        grad.item<double>() != 1.0) {
      reduced::rescale(buffer, grad, reduction, tensor_of(d["denom"]),
                       d["grad_scale"].toTensor(), kind == reduced::kCeProb ? Tensor() : target,
                       d["ignore_index"].toInt());
    }
    at::AutoDispatchBelowADInplaceOrView untracked;  // (the buffer is no one's view)
    return {buffer.view(d["input_shape"].toDimVector()), Tensor()};
  }
};

struct ce_fwd_grad_reduced_fast_eager : torch::autograd::Function<ce_fwd_grad_reduced_fast_eager>,
                                        ReducedLoss {
  using ReducedLoss::backward;
  using ReducedLoss::forward;
};

struct focal_fwd_grad_reduced_fast_eager
    : torch::autograd::Function<focal_fwd_grad_reduced_fast_eager>,
      ReducedLoss {
  using ReducedLoss::backward;
  using ReducedLoss::forward;
};

// A Python type for the node, with the methods and properties torch's own nodes have
// (THP_FUNCTION_DEFAULT_METHODS less _set_sequence_nr, which libtorch_python does not export).
template <class Fn>
bool register_node(const char* name) {
  using namespace torch::autograd;  // (the macro names these functions unqualified)
  static PyTypeObject type;
  static PyGetSetDef properties[] = {THP_FUNCTION_DEFAULT_PROPERTIES, {nullptr}};
  static PyMethodDef methods[] = {
      {"_register_hook_dict", THPCppFunction_register_hook_dict, METH_O, nullptr},
      {"register_hook", THPCppFunction_register_hook, METH_O, nullptr},
      {"register_prehook", THPCppFunction_register_prehook, METH_O, nullptr},
      {"name", THPCppFunction_name, METH_NOARGS, nullptr},
      {"_sequence_nr", THPCppFunction_sequence_nr, METH_NOARGS, nullptr},
      {nullptr}};
  if (_initFunctionPyTypeObject(type, name, properties, methods) == nullptr) {
    return false;
  }
  Py_INCREF(&type);
  registerCppFunction(typeid(CppNode<Fn>), &type);
  return true;
}

// The loss of a call whose call.x is the caller's logits, with the node as its grad_fn, or
// None (inference tensors: the Function raises autograd's error, naming the argument).
PyObject* node_loss(reduced::Call& call) {
  if (!kNodeInUse || python_backward == nullptr || call.x.is_inference() || call.t.is_inference() ||
      (call.w.has_value() && call.w->is_inference())) {
    Py_RETURN_NONE;
  }
  const Tensor logits = call.x;  // (forward replaces call.x by their rows)
  const variable_list out = call.kind == reduced::kFocal
                                ? focal_fwd_grad_reduced_fast_eager::apply(logits, &call)
                                : ce_fwd_grad_reduced_fast_eager::apply(logits, &call);
  return THPVariable_Wrap(out[0]);
}

// "none", "sum", "mean" (an exact str) as reduced_loss's codes; -1 for anything else.
int reduction_code(PyObject* reduction) {
  static const char* const names[] = {"none", "sum", "mean"};  // (the codes' order)
  if (!PyUnicode_CheckExact(reduction)) return -1;
  for (int code = reduced::kNone; code <= reduced::kMean; ++code) {
    if (PyUnicode_CompareWithASCIIString(reduction, names[code]) == 0) return code;
  }
  return -1;
}

// A Python int (exact type) as int64; false for anything else or one out of range.
bool exact_int64(PyObject* obj, long long* out) {
  if (!PyLong_CheckExact(obj)) return false;
  int overflow = 0;
  *out = PyLong_AsLongLongAndOverflow(obj, &overflow);
  if (overflow != 0 || (*out == -1 && PyErr_Occurred())) {
    PyErr_Clear();
    return false;
  }
  return true;
}

// A Python float or int (exact types, so not a bool) as the finite double functional.py's
// _check_number would make of it; false for anything else, which functional.py checks.
bool finite_number(PyObject* obj, double* out) {
  if (PyFloat_CheckExact(obj)) {
    *out = PyFloat_AS_DOUBLE(obj);
  } else if (PyLong_CheckExact(obj)) {
    *out = PyLong_AsDouble(obj);
    if (*out == -1.0 && PyErr_Occurred()) {
      PyErr_Clear();
      return false;
    }
  } else {
    return false;
  }
  return std::isfinite(*out);
}

// Whether obj is a Python float or int (not a bool) equal to value.
bool number_is(PyObject* obj, double value) {
  if (PyFloat_CheckExact(obj)) return PyFloat_AS_DOUBLE(obj) == value;
  long long v = 0;
  return exact_int64(obj, &v) && static_cast<double>(v) == value;
}

// Whether fast_cross_entropy may serve these (N, C) logits and (N,) class indices as
// functional.cross_entropy's eager path would: plain dense CPU tensors of the dtypes it
// takes, and nothing that it hands elsewhere (torch.func transforms, dispatch modes such
// as make_fx's or fake tensors, torch.jit.trace, autocast).
bool plain_call(const Tensor& x, const Tensor& t) {
  const auto xt = x.scalar_type(), tt = t.scalar_type();
  return x.layout() == at::kStrided && t.layout() == at::kStrided && x.device().is_cpu() &&
         t.device().is_cpu() && x.dim() == 2 && t.dim() == 1 && t.size(0) == x.size(0) &&
         (xt == at::kFloat || xt == at::kBFloat16 || xt == at::kHalf || xt == at::kDouble) &&
         (tt == at::kLong || tt == at::kInt || tt == at::kByte) && plain(x) && plain(t) &&
         // (a torch.func transform includes functorch's front key while it runs)
         !c10::impl::tls_is_dispatch_key_included(
             c10::DispatchKey::FuncTorchDynamicLayerFrontMode) &&
         !c10::impl::TorchDispatchModeTLS::any_modes_set() && !torch::jit::tracer::isTracing() &&
         !at::autocast::is_autocast_enabled(at::kCPU);
}

}  // namespace

bool reduced_node_in_use() { return kNodeInUse; }

bool register_reduced_loss_nodes() {
  return register_node<ce_fwd_grad_reduced_fast_eager>("ce_fwd_grad_reduced_fast_eagerBackward") &&
         register_node<focal_fwd_grad_reduced_fast_eager>(
             "focal_fwd_grad_reduced_fast_eagerBackward");
}

PyObject* set_reduced_node_backward(PyObject*, PyObject* fn) {
  if (!PyCallable_Check(fn)) {
    PyErr_SetString(PyExc_TypeError, "set_reduced_node_backward: fn must be callable");
    return nullptr;
  }
  Py_INCREF(fn);
  Py_XSETREF(python_backward, fn);
  Py_RETURN_NONE;
}

PyObject* reduced_loss_node(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  int kind = 0, reduction = 0, unbatched = 0;
  PyObject *input = nullptr, *target = nullptr, *weight = nullptr, *scalars = nullptr;
  PyObject *dtype = nullptr, *shape = nullptr;
  if (!PyArg_ParseTuple(args, "iipOOOO!OO!", &kind, &reduction, &unbatched, &input, &target,
                        &weight, &PyTuple_Type, &scalars, &dtype, &PyTuple_Type, &shape)) {
    return nullptr;
  }
  reduced::Call call;
  if (!reduced::unpack_call(kind, reduction, unbatched, input, target, weight, scalars, dtype,
                            shape, call)) {
    return nullptr;
  }
  return node_loss(call);
  END_HANDLE_TH_ERRORS
}

namespace {

// The fast lanes' common part, for a call whose kind, reduction and options are set: the
// loss of (N, C) logits and (N,) targets that plain_call takes (exact tensors), without
// grad by reduced_loss's forward, with grad by the node; None for other tensors, for a
// large reduced loss with grad, which the Function serves (it keeps an upstream guess:
// _upstream_guess.key), and in a build without the node (reduced_node_in_use).
PyObject* fast_loss(reduced::Call& call, PyObject* input, PyObject* target,
                    long long min_elements) {
  if (!kNodeInUse || !THPVariable_CheckExact(input) || !THPVariable_CheckExact(target)) {
    Py_RETURN_NONE;
  }
  const Tensor& x = THPVariable_Unpack(input);
  const Tensor& t = THPVariable_Unpack(target);
  if (!plain_call(x, t)) Py_RETURN_NONE;
  call.out_shape = {x.size(0)};
  call.dtype = x.scalar_type();
  // (functional._reshaped's view, tracked: the target's version is the one it checks)
  call.t = t.unsqueeze(-1);
  if (!at::GradMode::is_enabled() || !x.requires_grad()) {
    call.x = as_rows(x);
    reduced::Result r;
    {
      pybind11::gil_scoped_release no_gil;
      r = reduced::run(call, /*with_grad=*/false, std::nullopt);
    }
    return THPVariable_Wrap(r.loss);
  }
  if (call.reduction != reduced::kNone && x.numel() >= min_elements) Py_RETURN_NONE;
  call.x = x;
  return node_loss(call);
}

}  // namespace

PyObject* fast_cross_entropy(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *input = nullptr, *target = nullptr, *weight = nullptr, *size_average = nullptr;
  PyObject *ignore_index = nullptr, *reduce = nullptr, *reduction = nullptr;
  PyObject *label_smoothing = nullptr, *z_loss = nullptr, *softcap = nullptr;
  PyObject *logit_scale = nullptr, *return_lse = nullptr, *inplace_backward = nullptr;
  long long min_elements = 0;
  if (!PyArg_ParseTuple(args, "OOOOOOOOOOOOOL", &input, &target, &weight, &size_average,
                        &ignore_index, &reduce, &reduction, &label_smoothing, &z_loss,
                        &softcap, &logit_scale, &return_lse, &inplace_backward,
                        &min_elements)) {
    return nullptr;
  }
  // Only F's own call with the defaults that change nothing; anything else, a bad argument
  // included, goes to functional.py, which checks it and says what is wrong.
  const int code = reduction_code(reduction);
  long long ignore = 0;
  if (code < 0 || weight != Py_None || size_average != Py_None || reduce != Py_None ||
      softcap != Py_None || return_lse != Py_False || inplace_backward != Py_False ||
      !number_is(label_smoothing, 0.0) || !number_is(z_loss, 0.0) ||
      !number_is(logit_scale, 1.0) || !exact_int64(ignore_index, &ignore)) {
    Py_RETURN_NONE;
  }
  reduced::Call call;
  call.kind = reduced::kCeIndex;
  call.reduction = code;
  call.ce.ignore_index = ignore;
  return fast_loss(call, input, target, min_elements);
  END_HANDLE_TH_ERRORS
}

PyObject* fast_focal_loss(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *input = nullptr, *target = nullptr, *gamma = nullptr, *alpha = nullptr;
  PyObject *ignore_index = nullptr, *reduction = nullptr;
  long long min_elements = 0;
  if (!PyArg_ParseTuple(args, "OOOOOOL", &input, &target, &gamma, &alpha, &ignore_index,
                        &reduction, &min_elements)) {
    return nullptr;
  }
  // A number alpha (or none) and gamma >= 0; a tensor alpha (per class, or a 0-dim one
  // that may be learnt) and anything to check go to functional.py.
  const int code = reduction_code(reduction);
  long long ignore = 0;
  double g = 0, a = 1;
  if (code < 0 || !finite_number(gamma, &g) || !(g >= 0) ||
      (alpha != Py_None && !finite_number(alpha, &a)) || !exact_int64(ignore_index, &ignore)) {
    Py_RETURN_NONE;
  }
  reduced::Call call;
  call.kind = reduced::kFocal;
  call.reduction = code;
  call.focal.alpha_scale = a;
  call.focal.gamma = g;
  call.focal.ignore_index = ignore;
  return fast_loss(call, input, target, min_elements);
  END_HANDLE_TH_ERRORS
}

}  // namespace tlf
