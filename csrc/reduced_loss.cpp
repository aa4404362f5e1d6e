// _C.reduced_loss and _C.rescale_reduced: the eager path of a softmax loss, reduced or not,
// in one call from Python each way (see reduced_loss.h).
//
// Every step is the ATen op functional.py and _reduction.py would call, in their order, so
// the results are bitwise those of the Python path; what goes away is the Python binding
// of each small op (a dozen of them per call), which took most of a small loss's time.
#include "reduced_loss.h"

#include "ordered_sum.h"
#include "tensor_params.h"

#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Dtype.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

namespace tlf {

namespace reduced {

namespace {

template <class Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

using Rows2 = std::tuple<Tensor, Tensor>;
using Rows3 = std::tuple<Tensor, Tensor, Tensor>;

Rows2 ce_fwd(const Tensor& x, const Tensor& t, const OptTensor& w, const CeArgs& a) {
  static const auto h = op<Rows2(const Tensor&, const Tensor&, const OptTensor&, int64_t,
                                 double, double, double, double, bool)>("torchloss_fused::ce_fwd");
  return h.call(x, t, w, a.ignore_index, a.label_smoothing, a.z_loss, a.softcap,
                a.logit_scale, false);
}

Rows3 ce_fwd_grad(const Tensor& x, const Tensor& t, const OptTensor& w, const CeArgs& a,
                  const Tensor& grad_scale) {
  static const auto h =
      op<Rows3(const Tensor&, const Tensor&, const OptTensor&, int64_t, double, double, double,
               double, const Tensor&)>("torchloss_fused::ce_fwd_grad");
  return h.call(x, t, w, a.ignore_index, a.label_smoothing, a.z_loss, a.softcap,
                a.logit_scale, grad_scale);
}

Rows2 focal_fwd(const Tensor& x, const Tensor& t, const OptTensor& alpha, const FocalArgs& a) {
  static const auto h = op<Rows2(const Tensor&, const Tensor&, const OptTensor&, double, double,
                                 int64_t)>("torchloss_fused::focal_fwd");
  return h.call(x, t, alpha, a.alpha_scale, a.gamma, a.ignore_index);
}

Rows3 focal_fwd_grad(const Tensor& x, const Tensor& t, const OptTensor& alpha,
                     const FocalArgs& a, const Tensor& grad_scale) {
  static const auto h = op<Rows3(const Tensor&, const Tensor&, const OptTensor&, double, double,
                                 int64_t, const Tensor&)>("torchloss_fused::focal_fwd_grad");
  return h.call(x, t, alpha, a.alpha_scale, a.gamma, a.ignore_index, grad_scale);
}

void rescale_grad_rows(const Tensor& grad, const Tensor& grad_loss, const Tensor& grad_scale) {
  static const auto h = op<void(const Tensor&, const Tensor&, const Tensor&)>(
      "torchloss_fused::_rescale_grad_rows");
  h.call(grad, grad_loss, grad_scale);
}

// Targets are compared with ignore_index as int64, as the kernels compare them (a uint8 or
// int32 tensor compared with the number itself would first wrap it to the tensor's type).
Tensor counted(const Tensor& t, long long ignore_index) {
  return t.to(at::kLong).ne(ignore_index);
}

// The number of targets other than ignore_index, for a CPU target: counted here, without
// the three small ops (compare, sum, convert) that take longer than the loop.
std::optional<int64_t> host_count(const Tensor& t, long long ignore_index) {
  if (!t.device().is_cpu()) return std::nullopt;
  int64_t n = 0;
  if (!for_each_host_index(t, [&](int64_t k) { n += k != ignore_index; })) {
    return std::nullopt;  // (the op's own check names the dtype)
  }
  return n;
}

// functional._index_denominator: the targets' summed weights over the counted rows (their
// count without weights).
Tensor index_denominator(const Tensor& t, const OptTensor& weight, long long ignore_index,
                         int64_t C, at::ScalarType acc, bool unbatched) {
  const Tensor valid = counted(t, ignore_index);
  Tensor denom;
  if (!weight.has_value() || C == 0) {
    denom = valid.sum().to(acc);
  } else {
    const Tensor w_t =
        weight->to(acc).gather(0, t.to(at::kLong).clamp(0, C - 1).flatten()).view_as(t);
    denom = ordered_sum(at::where(valid, w_t, at::Scalar(0)));
  }
  if (unbatched && t.device().is_cuda()) {
    denom = at::where(valid.reshape({}), denom, denom.new_ones({}));
  }
  return denom;
}

// _reduction.rows_grad: the per-row gradient of the loss, as autograd makes it (for "none",
// the loss-shaped gradient reshaped to the rows', as ViewBackward does).
Tensor rows_grad(const Tensor& grad, int reduction, const Tensor& denom, int64_t B, int64_t D,
                 at::ScalarType acc) {
  Tensor g = grad.to(acc);
  if (reduction == kNone && g.dim() > 0) return g.reshape({B, D});
  if (reduction == kMean) g = g / denom;
  return g.expand({B, D});
}

// _reduction.reduce.
Tensor reduce(const Tensor& rows, int reduction, const Tensor& denom, at::IntArrayRef out_shape,
              at::ScalarType dtype) {
  if (reduction == kNone) {
    // Not a view as autograd sees views: an output of a custom Function that is one may not
    // be modified in place, where F's loss (a tensor of its own) may.
    at::AutoDispatchBelowADInplaceOrView untracked;
    return rows.reshape(out_shape).to(dtype);
  }
  Tensor total = ordered_sum(rows);
  if (reduction != kMean) return total.to(dtype);
  return (total / denom).to(dtype);
}

// The upstream guess (torchloss_fused/_upstream_guess.py): a loss that the caller scales
// (divided by an accumulation count, GradScaler's scale) gets another upstream gradient
// than the unit one the fused forward assumes, and the backward then rescales the whole
// gradient: a second read and write of it. Given the gradient this loss's backwards have
// been getting, the forward stores the gradient that rescale would leave (PostScaleScope:
// the kernels round each value, multiply it by the row factor and round again), so with
// a right guess the backward has nothing to do and no bit changes. (With a wrong one the
// backward recomputes the gradient from the logits, as a second backward does:
// _eager.FusedReduced.) grad_scale stays the unit upstream's, for that recomputation.
//
// The row factor is the one the backward's rescale computes from the rows' gradient
// (rows_grad) and grad_scale: rows_grad(guess) / grad_scale, rounded in acc. CPU only (the CUDA
// kernels have no post_scale yet), rows of D == 1. (A float16 gradient that a wrongly
// guessed scale overflows is recomputed like any other.) Returns the factor, or 1.
double guessed_factor(const Tensor& x, int reduction, const OptTensor& guess,
                      const Tensor& denom, const Tensor& grad_scale) {
  if (!guess.has_value() || reduction == kNone || !x.is_cpu() || x.size(2) != 1 ||
      x.size(0) == 0) {
    return 1.0;
  }
  // (reduced: every row's value is the same, so one row's stands for all)
  const at::ScalarType acc = grad_scale.scalar_type();
  const double e = rows_grad(*guess, reduction, denom, 1, 1, acc).item<double>();
  const double s = grad_scale[0][0].item<double>();
  const double f = acc == at::kDouble
                       ? e / s
                       : static_cast<double>(static_cast<float>(e) / static_cast<float>(s));
  const double magnitude = std::abs(f);
  if (!std::isfinite(e) || e == 0 || !std::isfinite(s) || s == 0 || f == 1 ||
      !(magnitude >= 0x1p-64 && magnitude <= 0x1p64)) {
    return 1.0;
  }
  return f;
}

}  // namespace

Result run(const Call& call, bool with_grad, const OptTensor& guess) {
  const int kind = call.kind, reduction = call.reduction;
  const Tensor &x = call.x, &t = call.t;
  const OptTensor& w = call.w;
  const CeArgs& ce = call.ce;
  const FocalArgs& focal = call.focal;
  const at::ScalarType acc = acc_dtype(x);
  const int64_t B = x.size(0), C = x.size(1), D = x.size(2);
  const auto acc_options = x.options().dtype(acc);
  Result r;
  // A mean's denominator, and the count it is where that is known here.
  std::optional<int64_t> count;
  if (reduction == kMean) {
    const long long ignore_index = kind == kFocal ? focal.ignore_index : ce.ignore_index;
    if (kind == kCeProb) {
      // F divides by input.numel() / C, and gives nan for an empty input: C = 0 too.
      count = C ? B * D : 0;
    } else if (kind == kFocal || !w.has_value() || C == 0) {
      count = host_count(t, ignore_index);
    }
    if (count.has_value()) {
      r.denom = at::scalar_tensor(static_cast<double>(*count), acc_options);
    } else {  // (the focal loss's mean counts rows: its alpha is no weight here)
      r.denom = index_denominator(t, kind == kFocal ? OptTensor() : w, ignore_index, C, acc,
                                  call.unbatched);
      // F's weighted mean of two terms, label smoothing's or the z-loss's: nan where the
      // counted targets weigh 0 in all (_reduction.splits_terms and mean_denominator),
      // which makes grad_scale nan too. (where() on the device: no host read on CUDA.)
      if (kind == kCeIndex && w.has_value() && (ce.label_smoothing > 0 || ce.z_loss != 0)) {
        r.denom = at::where(r.denom.eq(0), std::numeric_limits<double>::quiet_NaN(), r.denom);
      }
    }
  }
  // The kernels run below autograd, as _eager's calls run them.
  at::AutoDispatchBelowAutograd below_autograd;
  Tensor rows;
  if (with_grad) {
    if (count.has_value()) {
      // 1 / denom, rounded once in the accumulation dtype as the tensor division rounds it
      const double scale = acc == at::kDouble
                               ? 1.0 / static_cast<double>(*count)
                               : static_cast<double>(1.0f / static_cast<float>(*count));
      r.grad_scale = at::scalar_tensor(scale, acc_options).expand({B, D});
    } else {
      const Tensor one = r.denom.defined() ? r.denom.new_ones({}) : at::ones({}, acc_options);
      r.grad_scale = rows_grad(one, reduction, r.denom, B, D, acc);
    }
    const double post = guessed_factor(x, reduction, guess, r.denom, r.grad_scale);
    PostScaleScope scope(post);
    std::tie(rows, r.lse, r.grad) = kind == kFocal
                                        ? focal_fwd_grad(x, t, w, focal, r.grad_scale)
                                        : ce_fwd_grad(x, t, w, ce, r.grad_scale);
    r.post = post;
  } else {
    std::tie(rows, r.lse) = kind == kFocal ? focal_fwd(x, t, w, focal) : ce_fwd(x, t, w, ce);
  }
  r.loss = reduce(rows, reduction, r.denom, call.out_shape, call.dtype);
  return r;
}

void rescale(const Tensor& grad, const Tensor& g, int reduction, const Tensor& denom,
             const Tensor& grad_scale, const Tensor& target, long long ignore_index) {
  Tensor rows =
      rows_grad(g, reduction, denom, grad.size(0), grad.size(2), grad_scale.scalar_type());
  // An ignored row's gradient is +0 whatever its upstream, as F's (nll_loss's backward
  // never writes it): a nan or infinite one (a sum divided by a count of 0) would make
  // the rescale's 0 * f nan, and a negative one -0, where a recomputing backward (a
  // wrong upstream guess, a second one) writes +0. Such a row gets the upstream it was
  // made for, so the rescale leaves it. (A finite, positive 0-dim upstream on the CPU,
  // loss.backward()'s, needs no look at the targets: 0 * f is +0.)
  if (target.defined()) {
    const bool plain = g.dim() == 0 && g.is_cpu() && [&] {
      const double v = g.item<double>();
      return std::isfinite(v) && !std::signbit(v);
    }();
    if (!plain) rows = at::where(counted(target, ignore_index), rows, grad_scale);
  }
  at::AutoDispatchBelowAutograd below_autograd;
  rescale_grad_rows(grad, rows, grad_scale);
}

bool unpack_tensor(PyObject* obj, const char* name, Tensor& out) {
  if (!THPVariable_Check(obj)) {
    PyErr_Format(PyExc_TypeError, "reduced_loss: %s must be a tensor", name);
    return false;
  }
  out = THPVariable_Unpack(obj);
  return true;
}

bool unpack_call(int kind, int reduction, int unbatched, PyObject* input, PyObject* target,
                 PyObject* weight, PyObject* scalars, PyObject* dtype, PyObject* shape,
                 Call& call) {
  if (kind < kCeIndex || kind > kFocal || reduction < kNone || reduction > kMean) {
    PyErr_SetString(PyExc_ValueError, "reduced_loss: unknown kind or reduction");
    return false;
  }
  if (!THPDtype_Check(dtype)) {
    PyErr_SetString(PyExc_TypeError, "reduced_loss: dtype must be a torch.dtype");
    return false;
  }
  call.kind = kind;
  call.reduction = reduction;
  call.unbatched = unbatched != 0;
  const bool parsed =
      kind == kFocal
          ? PyArg_ParseTuple(scalars, "ddL", &call.focal.alpha_scale, &call.focal.gamma,
                             &call.focal.ignore_index)
          : PyArg_ParseTuple(scalars, "Ldddd", &call.ce.ignore_index,
                             &call.ce.label_smoothing, &call.ce.z_loss, &call.ce.softcap,
                             &call.ce.logit_scale);
  if (!parsed) return false;
  if (!unpack_tensor(input, "input", call.x) || !unpack_tensor(target, "target", call.t)) {
    return false;
  }
  if (weight != Py_None) {
    Tensor v;
    if (!unpack_tensor(weight, "weight", v)) return false;
    call.w = v;
  }
  call.dtype = reinterpret_cast<THPDtype*>(dtype)->scalar_type;
  call.out_shape.resize(PyTuple_GET_SIZE(shape));
  for (size_t i = 0; i < call.out_shape.size(); ++i) {
    call.out_shape[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(shape, i));
    if (call.out_shape[i] == -1 && PyErr_Occurred()) return false;
  }
  return true;
}

}  // namespace reduced

namespace {

using reduced::unpack_tensor;

PyObject* wrap_or_none(const at::Tensor& t) {
  if (!t.defined()) Py_RETURN_NONE;
  return THPVariable_Wrap(t);
}

}  // namespace

PyObject* reduced_loss(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  int kind = 0, reduction = 0, with_grad = 0, unbatched = 0;
  PyObject *input = nullptr, *target = nullptr, *weight = nullptr, *scalars = nullptr;
  PyObject *dtype = nullptr, *shape = nullptr, *guess_obj = Py_None;
  if (!PyArg_ParseTuple(args, "iippOOOO!OO!|O", &kind, &reduction, &with_grad, &unbatched,
                        &input, &target, &weight, &PyTuple_Type, &scalars, &dtype,
                        &PyTuple_Type, &shape, &guess_obj)) {
    return nullptr;
  }
  reduced::Call call;
  if (!reduced::unpack_call(kind, reduction, unbatched, input, target, weight, scalars, dtype,
                            shape, call)) {
    return nullptr;
  }
  TORCH_CHECK_VALUE(call.x.dim() == 3, "reduced_loss: input must be (B, C, D), got ",
                    call.x.sizes());
  std::optional<at::Tensor> guess;
  if (guess_obj != Py_None) {
    at::Tensor v;
    if (!unpack_tensor(guess_obj, "guess", v)) return nullptr;
    TORCH_CHECK_VALUE(v.dim() == 0 && v.is_cpu() && v.is_floating_point(),
                      "reduced_loss: guess must be a 0-dim floating-point CPU tensor");
    guess = v;
  }
  reduced::Result r;
  {
    pybind11::gil_scoped_release no_gil;
    r = reduced::run(call, with_grad, guess);
  }
  if (!with_grad) return THPVariable_Wrap(r.loss);
  return Py_BuildValue("(NNNNNd)", THPVariable_Wrap(r.loss), THPVariable_Wrap(r.lse),
                       THPVariable_Wrap(r.grad), THPVariable_Wrap(r.grad_scale),
                       wrap_or_none(r.denom), r.post);
  END_HANDLE_TH_ERRORS
}

PyObject* rescale_reduced(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *grad_obj = nullptr, *loss_grad = nullptr, *denom_obj = nullptr, *scale_obj = nullptr;
  PyObject* target_obj = Py_None;
  int reduction = 0;
  long long ignore_index = 0;
  if (!PyArg_ParseTuple(args, "OOiOO|OL", &grad_obj, &loss_grad, &reduction, &denom_obj,
                        &scale_obj, &target_obj, &ignore_index)) {
    return nullptr;
  }
  at::Tensor grad, g, denom, grad_scale, target;
  if (!unpack_tensor(grad_obj, "grad", grad) || !unpack_tensor(loss_grad, "grad_loss", g) ||
      !unpack_tensor(scale_obj, "grad_scale", grad_scale)) {
    return nullptr;
  }
  if (denom_obj != Py_None && !unpack_tensor(denom_obj, "denom", denom)) return nullptr;
  if (target_obj != Py_None && !unpack_tensor(target_obj, "target", target)) return nullptr;
  TORCH_CHECK_VALUE(grad.dim() == 3 && reduction >= reduced::kNone &&
                        reduction <= reduced::kMean &&
                        (reduction != reduced::kMean || denom.defined()),
                    "rescale_reduced: bad arguments");
  {
    pybind11::gil_scoped_release no_gil;
    reduced::rescale(grad, g, reduction, denom, grad_scale, target, ignore_index);
  }
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

}  // namespace tlf
