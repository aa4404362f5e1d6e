"""The ops' schemas (csrc/ops.cpp's, which a test compares), and the version of the compiled
extension's Python functions (reduced_loss and the others in ops.cpp's method table) this
package calls: _backend refuses an extension whose ops or version differ (one built from
older sources: an editable install not rebuilt after a pull), for the fallback."""

from __future__ import annotations

# ops.cpp's TLF_PY_API: raised with any change of those functions' arguments or results.
PY_API = 4

SCHEMAS = {
    "ce_fwd": "(Tensor input, Tensor target, Tensor? weight, int ignore_index, "
    "float label_smoothing, float z_loss, float softcap, float logit_scale, "
    "bool inplace_backward=False) -> (Tensor loss, Tensor lse)",
    "_ce_bwd": "(Tensor grad_loss, Tensor? grad_lse, Tensor input, Tensor target, "
    "Tensor? weight, Tensor lse, int ignore_index, float label_smoothing, float z_loss, "
    "float softcap, float logit_scale) -> Tensor",
    "_ce_bwd_inplace": "(Tensor grad_loss, Tensor? grad_lse, Tensor(a!) input, Tensor target, "
    "Tensor? weight, Tensor lse, int ignore_index, float label_smoothing, float z_loss, "
    "float softcap, float logit_scale) -> ()",
    "focal_fwd": "(Tensor input, Tensor target, Tensor? alpha, float alpha_scale, "
    "float gamma, int ignore_index) -> (Tensor loss, Tensor lse)",
    "_focal_bwd": "(Tensor grad_loss, Tensor input, Tensor target, Tensor? alpha, Tensor lse, "
    "float alpha_scale, float gamma, int ignore_index) -> Tensor",
    "ce_fwd_grad": "(Tensor input, Tensor target, Tensor? weight, int ignore_index, "
    "float label_smoothing, float z_loss, float softcap, float logit_scale, "
    "Tensor grad_scale) -> (Tensor loss, Tensor lse, Tensor grad)",
    "focal_fwd_grad": "(Tensor input, Tensor target, Tensor? alpha, float alpha_scale, "
    "float gamma, int ignore_index, Tensor grad_scale) -> (Tensor loss, Tensor lse, "
    "Tensor grad)",
    "_rescale_grad_rows": "(Tensor(a!) grad, Tensor grad_loss, Tensor grad_scale) -> ()",
    "sigmoid_focal_fwd": "(Tensor input, Tensor target, float alpha, float gamma) -> Tensor",
    "_sigmoid_focal_bwd": "(Tensor grad_loss, Tensor input, Tensor target, float alpha, "
    "float gamma) -> Tensor",
    "sigmoid_focal_sum": "(Tensor input, Tensor target, float alpha, float gamma, "
    "SymInt divisor) -> Tensor",
    "sigmoid_focal_sum_grad": "(Tensor input, Tensor target, float alpha, float gamma, "
    "SymInt divisor) -> (Tensor loss, Tensor grad)",
    "_accumulate_": "(Tensor(a!) acc, Tensor src) -> ()",
}
