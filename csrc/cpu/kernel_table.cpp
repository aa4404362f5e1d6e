#include <ATen/Version.h>

#include "kernels.h"

namespace tlf::cpu {

const KernelTable& kernel_table() {
  // at::get_cpu_capability() is PyTorch's own choice for its kernels: the best instruction
  // set this CPU has, lowered by ATEN_CPU_CAPABILITY when set.
  static const KernelTable* table = [] {
#if defined(TLF_X86_KERNELS)
    const std::string cap = at::get_cpu_capability();
    if (cap.rfind("AVX512", 0) == 0) return &AVX512::kTable;
    if (cap == "AVX2") return &AVX2::kTable;
#endif
    return &DEFAULT::kTable;
  }();
  return *table;
}

}  // namespace tlf::cpu
