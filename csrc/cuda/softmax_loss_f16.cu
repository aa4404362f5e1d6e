// The softmax-family and _rescale_grad_rows kernels for float16 inputs (one file per dtype
// so the instantiations compile in parallel).
#include "softmax_loss_launch.cuh"

namespace tlf::cuda {

template cudaError_t softmax_loss_t<__half>(const SoftmaxLossParams&, Mode, cudaStream_t);
template cudaError_t rescale_grad_rows_t<__half>(__half*, const RowLayout&,
                                              const RowVector&, const RowVector&,
                                              cudaStream_t);

}  // namespace tlf::cuda
