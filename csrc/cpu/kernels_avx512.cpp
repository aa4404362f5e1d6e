// The CPU kernels built for the AVX512 capability (setup.py adds its compiler flags and
// CPU_CAPABILITY=AVX512 by this file's name).
#include "kernels_impl.h"
