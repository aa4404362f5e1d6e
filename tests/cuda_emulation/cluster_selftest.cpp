// The emulator's thread block clusters (tests/test_cuda_emulator_clusters.py), on kernels of
// its own: written as the rewritten kernel source would read (emu::dynamic_smem and
// emu::block_shared for the __shared__ declarations), built with the harness's flags.
//
//   cluster_selftest run     every check that must pass, under every schedule; prints "ok N"
//   cluster_selftest MODE    one kernel bug (see kFaults), which must stop the emulator
#include <bit>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "emu_control.h"

namespace {

constexpr unsigned kThreads = 64;  // two full warps per block
constexpr unsigned kClusters = 3;  // per launch

int g_checks = 0, g_failures = 0;

void check(bool ok, const std::string& what) {
  ++g_checks;
  if (!ok && g_failures++ < 20) std::fprintf(stderr, "FAIL %s\n", what.c_str());
}

float dyn_value(unsigned block, unsigned thread) { return static_cast<float>(block * 1000 + thread); }
int static_value(unsigned block) { return static_cast<int>(block * 7 + 3); }

// Every block writes its dynamic and static shared memory; after the cluster barrier every
// thread folds the cluster's values in rank order (a non-commutative hash, so the order
// shows) and checks them against what the blocks wrote.
void cluster_kernel(unsigned expect_n, uint32_t* out, int* bad, int* first_block) {
  float* dyn = ::emu::dynamic_smem<float>();         // extern __shared__ float dyn[];
  auto& st = ::emu::block_shared<int[2]>([] {});     // __shared__ int st[2];
  const unsigned t = threadIdx.x, b = blockIdx.x;
  const unsigned n = __clusterSizeInBlocks(), rank = __clusterRelativeBlockRank();
  if (*first_block < 0) *first_block = static_cast<int>(b);
  if (n != expect_n || rank != b % n) ++*bad;
  // Shared memory nobody wrote is 0xff in every block of every cluster.
  if (std::bit_cast<uint32_t>(dyn[kThreads]) != 0xffffffffu || st[1] != -1) ++*bad;
  dyn[t] = dyn_value(b, t);
  if (t == 0) st[0] = static_value(b);
  __syncthreads();  // this block's threads only: the neighbour's value is this block's
  if (dyn[(t + 1) % kThreads] != dyn_value(b, (t + 1) % kThreads) || st[0] != static_value(b)) {
    ++*bad;
  }
  const int mine = static_cast<int>(b * 1000 + t);
  if (__shfl_xor_sync(0xffffffffu, mine, 5) != static_cast<int>(b * 1000 + (t ^ 5))) ++*bad;
  if (__shfl_sync(0xffffffffu, mine, 7) != static_cast<int>(b * 1000 + (t & ~31u) + 7)) ++*bad;
  if (__cluster_map_shared_rank(&dyn[t], rank) != &dyn[t]) ++*bad;
  __cluster_barrier_arrive();
  __cluster_barrier_wait();
  uint32_t h = 0, want = 0;
  for (unsigned r = 0; r < n; ++r) {
    const auto* d = static_cast<const float*>(__cluster_map_shared_rank(&dyn[t], r));
    const auto* s = static_cast<const int*>(__cluster_map_shared_rank(&st[0], r));
    h = h * 31u + static_cast<uint32_t>(*d) * 131u + static_cast<uint32_t>(*s);
    const unsigned peer = b - rank + r;
    want = want * 31u + static_cast<uint32_t>(dyn_value(peer, t)) * 131u +
           static_cast<uint32_t>(static_value(peer));
  }
  if (h != want) ++*bad;
  __cluster_barrier_arrive();  // no block exits while another may still read its memory
  out[b * kThreads + t] = h;
  __cluster_barrier_wait();
}

void empty_kernel(int) {}

template <typename K>
const void* fn(K* kernel) {
  return reinterpret_cast<const void*>(kernel);  // as the launchers pass kernels to the C API
}

cudaLaunchAttribute cluster_attr(unsigned x, unsigned y = 1) {
  cudaLaunchAttribute a{};
  a.id = cudaLaunchAttributeClusterDimension;
  a.val.clusterDim.x = x;
  a.val.clusterDim.y = y;
  a.val.clusterDim.z = 1;
  return a;
}

cudaLaunchConfig_t config(unsigned grid, size_t smem, cudaLaunchAttribute* attr) {
  cudaLaunchConfig_t c{};
  c.gridDim = dim3(grid);
  c.blockDim = dim3(kThreads);
  c.dynamicSmemBytes = smem;
  c.attrs = attr;
  c.numAttrs = attr != nullptr ? 1 : 0;
  return c;
}

uint32_t expected_hash(unsigned block, unsigned thread, unsigned n) {
  uint32_t h = 0;
  for (unsigned r = 0; r < n; ++r) {
    const unsigned peer = block - block % n + r;
    h = h * 31u + static_cast<uint32_t>(dyn_value(peer, thread)) * 131u +
        static_cast<uint32_t>(static_value(peer));
  }
  return h;
}

// n = 0: cudaLaunchKernelEx without the attribute; direct: the rewritten <<<>>> launch.
void run_clusters(emu::Schedule s, unsigned n, bool direct) {
  const unsigned size = n == 0 ? 1 : n, grid = size * kClusters;
  const std::string what = "schedule " + std::to_string(s.threads) + "," +
                           std::to_string(s.blocks) + " cluster " + std::to_string(n) +
                           (direct ? " (Config)" : "");
  emu::begin_case(0, s, 0);
  std::vector<uint32_t> out(grid * kThreads, 0);
  int bad = 0, first_block = -1;
  const size_t smem = (kThreads + 1) * sizeof(float);
  cudaError_t err;
  if (direct) {
    emu::Config c(grid, kThreads, smem);
    c.cluster = n;
    cluster_kernel ->* c(size, out.data(), &bad, &first_block);
    err = cudaGetLastError();
  } else {
    cudaLaunchAttribute a = cluster_attr(n);
    const cudaLaunchConfig_t c = config(grid, smem, n == 0 ? nullptr : &a);
    err = cudaLaunchKernelEx(&c, cluster_kernel, size, out.data(), &bad, &first_block);
  }
  check(err == cudaSuccess, what + ": launch error " + std::to_string(err));
  check(bad == 0, what + ": " + std::to_string(bad) + " device-side check(s) failed");
  check(first_block == (s.blocks ? static_cast<int>(grid) - 1 : 0),
        what + ": block " + std::to_string(first_block) + " ran first");
  bool same = true;
  for (unsigned i = 0; i < out.size(); ++i) {
    same = same && out[i] == expected_hash(i / kThreads, i % kThreads, size);
  }
  check(same, what + ": wrong results");
  const auto& l = emu::launches();
  check(l.size() == 1 && l[0].error.empty() && l[0].cluster == size && l[0].grid == grid,
        what + ": launch record");
}

// A launch the emulator must refuse as a GPU would: the error returned, recorded, and the
// last error until read.
void expect_refused(cudaError_t err, cudaError_t want, const std::string& what) {
  check(err == want, what + ": error " + std::to_string(err) + ", not " + std::to_string(want));
  check(!emu::launches().empty() && !emu::launches().back().error.empty(),
        what + ": no launch record with an error");
  check(cudaGetLastError() == want && cudaGetLastError() == cudaSuccess, what + ": last error");
}

void launch_errors() {
  emu::begin_case(0, {}, 0);
  int one = 1;
  auto a = cluster_attr(4);
  auto c = config(6, 0, &a);
  expect_refused(cudaLaunchKernelEx(&c, empty_kernel, one), cudaErrorInvalidClusterSize,
                 "grid 6 in clusters of 4");
  check(emu::launches().back().cluster == 4, "refused launch records its cluster size");
  a = cluster_attr(16);
  c = config(16, 0, &a);
  expect_refused(cudaLaunchKernelEx(&c, empty_kernel, one), cudaErrorInvalidClusterSize,
                 "cluster of 16 without the non-portable opt-in");
  a = cluster_attr(8);
  c = config(16, 0, &a);
  check(cudaLaunchKernelEx(&c, empty_kernel, one) == cudaSuccess, "portable cluster of 8");
  check(cudaFuncSetAttribute(fn(empty_kernel), cudaFuncAttributeNonPortableClusterSizeAllowed, 2) ==
            cudaErrorInvalidValue,
        "non-portable opt-in of 2");
  cudaGetLastError();
  check(cudaFuncSetAttribute(fn(empty_kernel), cudaFuncAttributeNonPortableClusterSizeAllowed, 1) ==
            cudaSuccess,
        "non-portable opt-in");
  a = cluster_attr(16);
  c = config(32, 0, &a);
  check(cudaLaunchKernelEx(&c, empty_kernel, one) == cudaSuccess, "cluster of 16 after opt-in");
  a = cluster_attr(32);
  c = config(32, 0, &a);
  expect_refused(cudaLaunchKernelEx(&c, empty_kernel, one), cudaErrorInvalidClusterSize,
                 "cluster of 32");
  a = cluster_attr(2, 2);
  c = config(4, 0, &a);
  expect_refused(cudaLaunchKernelEx(&c, empty_kernel, one), cudaErrorInvalidConfiguration,
                 "a 2-D cluster");
  a = cluster_attr(2);
  a.id = cudaLaunchAttributePriority;
  c = config(4, 0, &a);
  expect_refused(cudaLaunchKernelEx(&c, empty_kernel, one), cudaErrorInvalidValue,
                 "a launch attribute the emulator does not model");
  a = cluster_attr(2);
  c = config(4, 64 << 10, &a);
  expect_refused(cudaLaunchKernelEx(&c, empty_kernel, one), cudaErrorInvalidValue,
                 "shared memory above the grant");

  // Occupancy: 64 threads, no shared memory: 32 blocks per SM, 2 SMs.
  int n = -1;
  a = cluster_attr(2);
  c = config(0, 0, &a);
  check(cudaOccupancyMaxActiveClusters(&n, empty_kernel, &c) == cudaSuccess && n == 32,
        "occupancy of clusters of 2: " + std::to_string(n));
  // 100000 bytes: 2 blocks per SM, so 2 clusters of 2, 1 of 4, none of 8.
  check(cudaFuncSetAttribute(fn(empty_kernel), cudaFuncAttributeMaxDynamicSharedMemorySize, 100000) ==
            cudaSuccess,
        "shared memory opt-in");
  const int want[] = {2, 1, 0};
  for (int i = 0; i < 3; ++i) {
    a = cluster_attr(2u << i);
    c = config(0, 100000, &a);
    check(cudaOccupancyMaxActiveClusters(&n, empty_kernel, &c) == cudaSuccess && n == want[i],
          "occupancy of clusters of " + std::to_string(2 << i) + ": " + std::to_string(n));
  }
  a = cluster_attr(4);
  c = config(8, 100000, &a);
  check(cudaLaunchKernelEx(&c, empty_kernel, one) == cudaSuccess, "4 blocks of 100000 bytes");
  a = cluster_attr(8);
  c = config(8, 100000, &a);
  expect_refused(cudaLaunchKernelEx(&c, empty_kernel, one), cudaErrorInvalidClusterSize,
                 "a cluster that does not fit the device");
  c = config(0, 0, nullptr);
  check(cudaOccupancyMaxActiveClusters(&n, empty_kernel, &c) == cudaErrorInvalidClusterSize,
        "occupancy without a cluster size");
  cudaGetLastError();

  // Compute capability: clusters need 9.
  const int cc_want[] = {9, 8, 9};
  for (int dev = 0; dev < 3; ++dev) {
    int cc = -1;
    check(cudaDeviceGetAttribute(&cc, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
              cc == cc_want[dev],
          "compute capability of device " + std::to_string(dev));
  }
  emu::begin_case(1, {}, 0);
  a = cluster_attr(2);
  c = config(4, 0, &a);
  expect_refused(cudaLaunchKernelEx(&c, empty_kernel, one), cudaErrorInvalidClusterSize,
                 "clusters on compute capability 8");
  check(cudaOccupancyMaxActiveClusters(&n, empty_kernel, &c) == cudaErrorInvalidClusterSize,
        "cluster occupancy on compute capability 8");
  cudaGetLastError();
  c = config(4, 0, nullptr);
  check(cudaLaunchKernelEx(&c, empty_kernel, one) == cudaSuccess,
        "cudaLaunchKernelEx without clusters on compute capability 8");
}

// ---- kernel bugs, one per process ---------------------------------------------------------

int* g_read = nullptr;

void wait_without_arrive() { __cluster_barrier_wait(); }

void arrive_twice() {
  __cluster_barrier_arrive();
  __cluster_barrier_arrive();
}

void divergence() {
  if (__clusterRelativeBlockRank() == 1 && threadIdx.x == 3) return;
  __cluster_barrier_arrive();
  __cluster_barrier_wait();
}

void rank_outside() { (void)__cluster_map_shared_rank(::emu::dynamic_smem<int>(), 2); }

void not_shared() {
  int local = 0;
  (void)__cluster_map_shared_rank(&local, 0);
}

// Rank 1 exits while rank 0 still reads its shared memory.
void exited_block() {
  int* dyn = ::emu::dynamic_smem<int>();
  dyn[threadIdx.x] = 7;
  __cluster_barrier_arrive();
  __cluster_barrier_wait();
  if (__clusterRelativeBlockRank() == 1) return;
  const int v = *static_cast<const int*>(__cluster_map_shared_rank(&dyn[threadIdx.x], 1));
  if (threadIdx.x == 0) *g_read = v;
}

void shfl_lane_outside() { (void)__shfl_sync(0xffffffffu, 1, 32); }

struct Fault {
  const char* mode;
  void (*kernel)();
};
const Fault kFaults[] = {{"wait_without_arrive", wait_without_arrive},
                         {"arrive_twice", arrive_twice},
                         {"divergence", divergence},
                         {"rank_outside", rank_outside},
                         {"not_shared", not_shared},
                         {"exited_block", exited_block},
                         {"shfl_lane_outside", shfl_lane_outside}};

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc == 2 ? argv[1] : "";
  if (mode == "run") {
    for (int threads = 0; threads < 4; ++threads) {
      for (int blocks = 0; blocks < 2; ++blocks) {
        const emu::Schedule s{threads, blocks};
        cudaFuncSetAttribute(fn(cluster_kernel), cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
        for (unsigned n : {0u, 1u, 2u, 4u, 16u}) run_clusters(s, n, false);
        run_clusters(s, 0, true);
        run_clusters(s, 4, true);
      }
    }
    launch_errors();
    std::printf(g_failures == 0 ? "ok %d\n" : "%d of %d checks failed\n",
                g_failures == 0 ? g_checks : g_failures, g_checks);
    return g_failures == 0 ? 0 : 1;
  }
  for (const Fault& f : kFaults) {
    if (mode != f.mode) continue;
    // Ranks descending: rank 1 of exited_block runs (and exits) before rank 0 reads.
    emu::begin_case(0, emu::Schedule{0, 1}, 0);
    int read = 0;
    g_read = &read;
    std::printf("asan %d\n", emu::built_with_asan() ? 1 : 0);
    std::fflush(stdout);
    cudaLaunchAttribute a = cluster_attr(2);
    const cudaLaunchConfig_t c = config(2, kThreads * sizeof(int), &a);
    const cudaError_t err = cudaLaunchKernelEx(&c, f.kernel);
    std::printf("returned %d read 0x%08x\n", static_cast<int>(err), static_cast<unsigned>(read));
    return 0;
  }
  std::fprintf(stderr, "usage: cluster_selftest run|MODE\n");
  return 2;
}
