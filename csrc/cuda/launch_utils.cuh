// Host-side launch helpers: device properties and kernel occupancy, cached so a launch
// costs no driver queries after the first. Only host computations: nothing here enqueues
// work or synchronises, so launches stay capturable in CUDA graphs.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>
#include <utility>

namespace tlf::cuda {

struct DeviceProps {
  int sms = 0;
  int smem_optin = 0;  // largest shared memory one block may opt into
  int cc_major = 0;    // compute capability: 9 and above have thread block clusters
};

inline cudaError_t device_props(int device, DeviceProps* out) {
  static std::mutex mu;
  static std::map<int, DeviceProps> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(device);
  if (it == cache.end()) {
    DeviceProps d;
    cudaError_t err = cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, device);
    if (err == cudaSuccess) {
      err = cudaDeviceGetAttribute(&d.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    }
    if (err == cudaSuccess) {
      err = cudaDeviceGetAttribute(&d.cc_major, cudaDevAttrComputeCapabilityMajor, device);
    }
    if (err != cudaSuccess) return err;
    it = cache.emplace(device, d).first;
  }
  *out = it->second;
  return cudaSuccess;
}

// Whether `err` is the runtime refusing a launch configuration, so that the launcher may
// clear it (cudaGetLastError) and try a smaller row cache or another kernel: shared memory
// beyond what the function or device grants (cudaErrorInvalidValue, from
// cudaFuncSetAttribute or the launch), a shape or resources it cannot run
// (cudaErrorInvalidConfiguration, cudaErrorLaunchOutOfResources), or clusters it does not run
// (cudaErrorInvalidClusterSize, "cluster misconfiguration"; cudaErrorNotSupported; an sm_120
// GPU has refused cluster launches with cudaErrorInvalidValue, vllm-project/vllm#47164).
// Every other error (one left by earlier asynchronous work, such as an illegal address or a
// device assert, which the runtime returns from any later call; a missing kernel image) is
// the caller's to report, uncleared, as PyTorch's launch checks report it.
inline bool refused_configuration(cudaError_t err) {
  switch (err) {
    case cudaErrorInvalidValue:
    case cudaErrorInvalidConfiguration:
    case cudaErrorLaunchOutOfResources:
    case cudaErrorInvalidClusterSize:
    case cudaErrorNotSupported:
      return true;
    default:
      return false;
  }
}

inline cudaError_t current_device_props(DeviceProps* out) {
  int device = 0;
  const cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  return device_props(device, out);
}

// Opts kernel `fn` into `smem` bytes of dynamic shared memory on `device` when that is more
// than the default 48 KiB. Only ever raised: a launch with a larger cache, found in an
// occupancy cache, still needs it. Callers hold their own lock; this one guards the record.
inline cudaError_t opt_in_smem(const void* fn, int device, size_t smem) {
  constexpr size_t kDefaultSmem = 48 << 10;
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, size_t> opted;
  std::lock_guard<std::mutex> lock(mu);
  size_t& have = opted[{fn, device}];
  if (smem <= kDefaultSmem || smem <= have) return cudaSuccess;
  const cudaError_t err = cudaFuncSetAttribute(
      fn, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err == cudaSuccess) have = smem;
  return err;
}

// Blocks of `kernel` that fit on one SM with `threads` threads and `smem` bytes of dynamic
// shared memory; opts the kernel into more than the default 48 KiB when asked for.
template <typename Kernel>
cudaError_t resident_blocks(Kernel kernel, int threads, size_t smem, int* out) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const void* fn = reinterpret_cast<const void*>(kernel);
  static std::mutex mu;
  static std::map<std::tuple<const void*, int, int, size_t>, int> blocks;
  std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_tuple(fn, device, threads, smem);
  auto it = blocks.find(key);
  if (it == blocks.end()) {
    err = opt_in_smem(fn, device, smem);
    if (err != cudaSuccess) return err;
    int n = 0;
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, fn, threads, smem);
    if (err != cudaSuccess) return err;
    if (n < 1) return cudaErrorInvalidConfiguration;
    it = blocks.emplace(key, n).first;
  }
  *out = it->second;
  return cudaSuccess;
}

// A persistent grid: enough blocks for `work_blocks`, at most what is resident at once.
template <typename Kernel>
cudaError_t persistent_grid(Kernel kernel, int threads, size_t smem, int64_t work_blocks,
                            int* grid) {
  DeviceProps props;
  cudaError_t err = current_device_props(&props);
  if (err != cudaSuccess) return err;
  int per_sm = 0;
  err = resident_blocks(kernel, threads, smem, &per_sm);
  if (err != cudaSuccess) return err;
  const int64_t resident = static_cast<int64_t>(per_sm) * props.sms;
  *grid = static_cast<int>(std::max<int64_t>(1, std::min(work_blocks, resident)));
  return cudaSuccess;
}

// The record of resident_clusters and refuse_clusters: clusters of a kernel, device,
// cluster size and dynamic shared memory co-resident on the device.
struct ClusterCounts {
  std::mutex mu;
  std::map<std::tuple<const void*, int, int, size_t>, int> n;
};
inline ClusterCounts& cluster_counts() {
  static ClusterCounts c;
  return c;
}

// Clusters of `cfg` (grid size aside) co-resident on the device, 0 when none fits; opts the
// kernel into its shared memory and, above 8 blocks, into non-portable cluster sizes. A
// configuration the runtime refuses (refused_configuration) counts as none fitting, its
// error cleared and the answer kept, so later launches ask the driver no more.
template <typename Kernel>
cudaError_t resident_clusters(Kernel kernel, const cudaLaunchConfig_t& cfg, int cluster,
                              int* out) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const void* fn = reinterpret_cast<const void*>(kernel);
  ClusterCounts& counts = cluster_counts();
  std::lock_guard<std::mutex> lock(counts.mu);
  const auto key = std::make_tuple(fn, device, cluster, cfg.dynamicSmemBytes);
  auto it = counts.n.find(key);
  if (it == counts.n.end()) {
    err = opt_in_smem(fn, device, cfg.dynamicSmemBytes);
    if (err == cudaSuccess && cluster > 8) {
      err = cudaFuncSetAttribute(fn, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
    }
    int n = 0;
    if (err == cudaSuccess) err = cudaOccupancyMaxActiveClusters(&n, fn, &cfg);
    if (err != cudaSuccess) {
      if (!refused_configuration(err)) return err;
      (void)cudaGetLastError();  // the refusal is an answer, not this launch's error
      n = 0;
    }
    it = counts.n.emplace(key, n).first;
  }
  *out = it->second;
  return cudaSuccess;
}

// Records that the launch of clusters of `cfg` was refused although resident_clusters
// counted some ("the calculated occupancy is not guaranteed to be achievable",
// cudaOccupancyMaxActiveClusters): later launches take it as none fitting.
template <typename Kernel>
void refuse_clusters(Kernel kernel, const cudaLaunchConfig_t& cfg, int cluster) {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return;
  const void* fn = reinterpret_cast<const void*>(kernel);
  ClusterCounts& counts = cluster_counts();
  std::lock_guard<std::mutex> lock(counts.mu);
  counts.n[std::make_tuple(fn, device, cluster, cfg.dynamicSmemBytes)] = 0;
}

// Whether the code of `kernel` that runs on the current device was compiled for sm_90 or
// newer. A build whose only code for this GPU is older PTX, compiled just in time (say
// TORCH_CUDA_ARCH_LIST="8.0+PTX" on an H100), has the cluster and bulk-copy kernels as
// __trap() stubs (cluster_group.cuh, bulk_copy.cuh), so the launcher must not pick them.
template <typename Kernel>
cudaError_t has_sm90_code(Kernel kernel, bool* out) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const void* fn = reinterpret_cast<const void*>(kernel);
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, bool> known;
  std::lock_guard<std::mutex> lock(mu);
  auto it = known.find({fn, device});
  if (it == known.end()) {
    cudaFuncAttributes attr{};
    err = cudaFuncGetAttributes(&attr, fn);
    if (err != cudaSuccess) return err;
    it = known.emplace(std::make_pair(fn, device), attr.ptxVersion >= 90).first;
  }
  *out = it->second;
  return cudaSuccess;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace tlf::cuda
