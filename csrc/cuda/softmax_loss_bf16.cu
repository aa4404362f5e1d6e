// The softmax-family and _rescale_grad_rows kernels for bfloat16 inputs (one file per dtype
// so the instantiations compile in parallel).
#include "softmax_loss_launch.cuh"

namespace tlf::cuda {

template cudaError_t softmax_loss_t<__nv_bfloat16>(const SoftmaxLossParams&, Mode, cudaStream_t);
template cudaError_t rescale_grad_rows_t<__nv_bfloat16>(__nv_bfloat16*, const RowLayout&,
                                              const RowVector&, const RowVector&,
                                              cudaStream_t);

}  // namespace tlf::cuda
