// The CPU kernels built for the DEFAULT capability (setup.py adds its compiler flags and
// CPU_CAPABILITY=DEFAULT by this file's name).
#include "kernels_impl.h"
