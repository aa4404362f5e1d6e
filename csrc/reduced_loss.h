// The eager path of a softmax loss (reduced to a "sum" or a "mean", or not reduced), one C++
// call each way (torchloss_fused/_eager.py's fast calls use them):
//
// _C.reduced_loss(kind, reduction, with_grad, unbatched, input, target, weight, scalars, dtype,
//                 out_shape, guess=None)
//   kind: 0 cross-entropy with class indices, 1 with class probabilities, 2 focal loss;
//   reduction: 0 "none", 1 "sum", 2 "mean"; input (B, C, D) and target as the ops take them;
//   weight: the ops' weight (or alpha) or None; scalars: the op's scalar arguments in schema
//   order (ce: ignore_index, label_smoothing, z_loss, softcap, logit_scale; focal:
//   alpha_scale, gamma, ignore_index); unbatched: functional._index_denominator's flag;
//   dtype: the loss's; out_shape: the unreduced loss's shape (a tuple). Computes the mean's
//   denominator, runs ce_fwd/focal_fwd (with_grad false) or the *_fwd_grad op for a unit
//   upstream gradient, and reduces. Returns the loss, or (loss, lse, grad, grad_scale,
//   denom or None, post) with_grad. guess: a 0-dim CPU tensor, the loss's gradient
//   the backward will likely get (the last ones it got), or None; where it applies (see
//   guessed_factor in reduced_loss.cpp) the gradient is written for it, post (a float) is
//   the factor it was written with, the gradient being that of grad_scale * post, and
//   grad_scale stays the unit upstream's rows; post is 1.0 where no guess applied.
//
// _C.rescale_reduced(grad, grad_loss, reduction, denom, grad_scale, target=None,
//                    ignore_index=0): backward of the above: turns the loss's gradient into
//   the rows' (_reduction.rows_grad) and rescales the fused gradient in place with
//   _rescale_grad_rows, leaving the rows whose class-index target is ignore_index as they
//   are (zero), whatever their upstream gradient.
//
// The C++ side of both, for the autograd node that serves CPU training calls without a
// Python backward (reduced_loss_node.h), is in namespace reduced below.
#pragma once

#include <Python.h>

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace tlf {

PyObject* reduced_loss(PyObject* self, PyObject* args);
PyObject* rescale_reduced(PyObject* self, PyObject* args);

namespace reduced {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

enum Kind { kCeIndex = 0, kCeProb = 1, kFocal = 2 };
enum Reduction { kNone = 0, kSum = 1, kMean = 2 };

struct CeArgs {
  long long ignore_index = 0;
  double label_smoothing = 0, z_loss = 0, softcap = 0, logit_scale = 1;
};

struct FocalArgs {
  double alpha_scale = 1, gamma = 0;
  long long ignore_index = 0;
};

// One call's arguments, as reduced_loss takes them (without with_grad and guess).
struct Call {
  int kind = kCeIndex, reduction = kMean;
  bool unbatched = false;
  Tensor x, t;
  OptTensor w;
  CeArgs ce;
  FocalArgs focal;
  std::vector<int64_t> out_shape;
  at::ScalarType dtype = at::kFloat;

  long long ignore_index() const { return kind == kFocal ? focal.ignore_index : ce.ignore_index; }
};

struct Result {
  Tensor loss, lse, grad, grad_scale, denom;
  // The factor the gradient was written with for the guessed upstream (guessed_factor):
  // 1 where no guess applied.
  double post = 1.0;
};

// reduced_loss's work (called without the GIL).
Result run(const Call& call, bool with_grad, const OptTensor& guess);

// rescale_reduced's work; target undefined: no ignored rows to keep (called without the GIL).
void rescale(const Tensor& grad, const Tensor& grad_loss, int reduction, const Tensor& denom,
             const Tensor& grad_scale, const Tensor& target, long long ignore_index);

// Python arguments to a Call (false with a Python error set); call.x is the input as given.
bool unpack_call(int kind, int reduction, int unbatched, PyObject* input, PyObject* target,
                 PyObject* weight, PyObject* scalars, PyObject* dtype, PyObject* shape,
                 Call& call);
bool unpack_tensor(PyObject* obj, const char* name, Tensor& out);

}  // namespace reduced

}  // namespace tlf
