// The CPU kernels built for the AVX2 capability (setup.py adds its compiler flags and
// CPU_CAPABILITY=AVX2 by this file's name).
#include "kernels_impl.h"
