// The harness's handle on the emulator (emu_runtime.cpp): the emulated devices, the
// schedule, and what the launches of one case did.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

namespace emu {

// What cudaDeviceGetAttribute and the occupancy calculator report for device `index`.
struct Device {
  int sms;
  int smem_optin;  // cudaDevAttrMaxSharedMemoryPerBlockOptin
  int smem_grant;  // what cudaFuncSetAttribute actually allows (a device that grants less
                   // than it reports makes the launcher shrink its row cache)
  int smem_per_sm;
  int threads_per_sm;
  int cc_major;  // compute capability: 9 and above launch thread block clusters
  int max_cluster;  // the largest cluster it runs (with the non-portable opt-in above 8)
  int ptx_version;  // cudaFuncGetAttributes' ptxVersion of every kernel: what the build's
                    // code for this device was compiled for (80: only compute_80 PTX)
  int cluster_launch_error;  // what a cluster launch that passes every check above returns
                             // (a cudaError_t; 0: it runs)
  int non_portable_error;    // what cudaFuncSetAttribute(NonPortableClusterSizeAllowed, 1)
                             // returns (0: it is set)
};
const std::vector<Device>& devices();

// Which ready fiber runs next, and the block order. threads: 0 round robin in ascending
// thread order (all threads advance one barrier per round), 1 the same descending, 2 greedy
// (always the lowest ready thread: its warp runs ahead of the others until it waits at a
// __syncthreads), 3 greedy from the highest. blocks: 0 ascending, 1 descending, both for the
// clusters of the grid and for the blocks of a cluster (whose fibers run block by block, each
// block's threads in the order above). A kernel whose results depend on the schedule has a
// race (or a reduction order that depends on it).
struct Schedule {
  int threads = 0;
  int blocks = 0;
};

struct LaunchRecord {
  std::string kernel;  // demangled name of the kernel function
  unsigned grid, block;
  size_t smem;
  std::string error;  // empty when it ran
  unsigned cluster = 1;  // blocks per cluster (1 without clusters)
};

// Exactly `bytes` addressable bytes, 64-byte aligned (as a GPU allocation is, at least): with
// ASan the bytes around are poisoned, without they are canaries that region_intact() checks.
struct Region {
  unsigned char* base = nullptr;
  unsigned char* data = nullptr;
  size_t bytes = 0;
};
Region make_region(size_t bytes);
bool region_intact(const Region& r);
void free_region(Region& r);
bool built_with_asan();

// Per case.
void begin_case(int device, Schedule schedule, int fastmath_bias);
const std::vector<LaunchRecord>& launches();
int assert_count();
const std::string& first_assert();

}  // namespace emu
