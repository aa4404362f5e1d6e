// The softmax-family and _rescale_grad_rows kernels for float32 inputs (one file per dtype
// so the instantiations compile in parallel).
#include "softmax_loss_launch.cuh"

namespace tlf::cuda {

template cudaError_t softmax_loss_t<float>(const SoftmaxLossParams&, Mode, cudaStream_t);
template cudaError_t rescale_grad_rows_t<float>(float*, const RowLayout&,
                                              const RowVector&, const RowVector&,
                                              cudaStream_t);

}  // namespace tlf::cuda
