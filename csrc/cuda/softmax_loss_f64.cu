// The softmax-family and _rescale_grad_rows kernels for float64 inputs (one file per dtype
// so the instantiations compile in parallel).
#include "softmax_loss_launch.cuh"

namespace tlf::cuda {

template cudaError_t softmax_loss_t<double>(const SoftmaxLossParams&, Mode, cudaStream_t);
template cudaError_t rescale_grad_rows_t<double>(double*, const RowLayout&,
                                              const RowVector&, const RowVector&,
                                              cudaStream_t);

}  // namespace tlf::cuda
