// A reduced (or unreduced) softmax loss of CPU logits as a C++ autograd node: the forward
// of _C.reduced_loss with its gradient, and a backward that the autograd engine runs
// without Python in the common case (torchloss_fused/_eager.py's FusedReduced uses it).
//
// _C.reduced_loss_node(kind, reduction, unbatched, input, target, weight, scalars, dtype,
//                      out_shape)
//   reduced_loss's arguments (reduced_loss.h) without with_grad and guess, but input is the
//   caller's logits as they are (functional._rows_view's shapes), not their (B, C, D) rows:
//   the gradient then reaches them without a view node. Returns the loss, whose grad_fn is
//   the node, or None where the node does not serve (inference tensors, no Python backward
//   set; the caller then takes its autograd.Function).
// _C.set_reduced_node_backward(fn)
//   The Python backward for what the node does not do itself: a differentiable or batched
//   gradient, a second backward (the gradient is handed on once), a target or weight
//   written in place since the forward (fn raises autograd's error). fn(kind, reduction,
//   grad, saved, scalars, grad_scale, denom, buffer, target, weight, target_version,
//   weight_version) returns the input's gradient; saved is (input, target, weight, lse),
//   input as given, or None where the versions differ.
// _C.fast_cross_entropy(input, target, weight, size_average, ignore_index, reduce,
//                       reduction, label_smoothing, z_loss, softcap, logit_scale, return_lse,
//                       inplace_backward, min_elements)
//   functional.cross_entropy's arguments, and _upstream_guess.MIN_ELEMENTS: the loss of the
//   commonest call, F's own with its defaults ((N, C) CPU logits, (N,) class indices, no
//   weight, any ignore_index and reduction), by the node (or, without grad, reduced_loss's
//   forward), with every check functional.py would make in C++; None for any other call,
//   which functional.py then takes through its checks. The same steps and kernels as
//   functional.py's path, so the same bits.
// _C.fast_focal_loss(input, target, gamma, alpha, ignore_index, reduction, min_elements)
//   The same for functional.focal_loss: (N, C) CPU logits, (N,) class indices, gamma a
//   finite Python number >= 0, alpha None or a finite Python number.
//
// Why: an autograd.Function costs tens of microseconds a step in Python (its apply, the
// context, the engine's call back into Python), more than the whole of F.cross_entropy on
// a small batch. The node's Python types keep the Function's names
// (ce_fwd_grad_reduced_fast_eagerBackward, focal_fwd_grad_reduced_fast_eagerBackward).
#pragma once

#include <Python.h>

namespace tlf {

PyObject* reduced_loss_node(PyObject* self, PyObject* args);
PyObject* set_reduced_node_backward(PyObject* self, PyObject* fn);
PyObject* fast_cross_entropy(PyObject* self, PyObject* args);
PyObject* fast_focal_loss(PyObject* self, PyObject* args);

// Gives the nodes their Python type names; false with a Python error set.
bool register_reduced_loss_nodes();

// Whether this build uses the node (torch 2.7 or newer; older compiled autograd refuses
// it). Without it, reduced_loss_node and the fast lanes always return None.
bool reduced_node_in_use();

}  // namespace tlf
