// The sigmoid focal loss kernels through their real launcher (vector path when every pointer
// is 16-byte aligned; the reduced sum's fixed partition).
#include "cuda/sigmoid_focal_cuda.cu"
