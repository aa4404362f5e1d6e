// The emulator: fibers and barriers for the threads of a block (of a cluster), emulated shared
// memory, the few CUDA runtime calls the launchers make, and the fast-math intrinsics' error
// model.
#include "emu_runtime.h"

#include <cxxabi.h>
#include <dlfcn.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "emu_control.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#else
#define EMU_ASAN 0
#endif

uint3 threadIdx{0u, 0u, 0u}, blockIdx{0u, 0u, 0u};
dim3 blockDim, gridDim;

namespace emu {

unsigned g_cluster_rank = 0, g_cluster_size = 1;
int g_fastmath_bias = 0;

namespace {

// ---- per-case state ------------------------------------------------------------------------

int g_device = 0;
Schedule g_schedule;
std::vector<LaunchRecord> g_launches;
int g_asserts = 0;
std::string g_first_assert;
cudaError_t g_last_error = cudaSuccess;
std::map<std::pair<const void*, int>, int> g_max_dyn_smem;  // cudaFuncSetAttribute
std::set<std::pair<const void*, int>> g_non_portable_cluster;  // cudaFuncSetAttribute

std::string kernel_name(const void* fn) {
  Dl_info info{};
  if (dladdr(fn, &info) == 0 || info.dli_sname == nullptr) return "?";
  int status = 0;
  char* d = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
  std::string out = status == 0 && d != nullptr ? d : info.dli_sname;
  std::free(d);
  return out;
}

// ---- fibers --------------------------------------------------------------------------------

// A saved execution context. On x86-64 a switch saves the callee-saved registers on the old
// stack and swaps stack pointers (swapcontext would also make a signal-mask system call per
// switch, several times the cost of the emulated kernel's work); elsewhere, ucontext.
#if defined(__x86_64__) && !defined(EMU_USE_UCONTEXT)
extern "C" void emu_switch_stack(void** save_sp, void* load_sp);
asm(R"(
  .text
  .globl emu_switch_stack
  .type emu_switch_stack, @function
emu_switch_stack:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size emu_switch_stack, .-emu_switch_stack
  .section .note.GNU-stack, "", @progbits
  .text
)");

struct Context {
  void* sp = nullptr;

  // The first switch to it calls entry() (which must never return) on the given stack.
  void init(char* stack, size_t bytes, void (*entry)()) {
    auto top = reinterpret_cast<uintptr_t>(stack + bytes) & ~uintptr_t(15);
    auto* slot = reinterpret_cast<uint64_t*>(top);
    *--slot = 0;  // entry's "return address": entry starts with rsp = 8 mod 16, as if called
    *--slot = reinterpret_cast<uint64_t>(entry);  // where emu_switch_stack returns to
    for (int i = 0; i < 6; ++i) *--slot = 0;      // rbp rbx r12-r15
    uint32_t csr[2] = {0x1f80u, 0x037fu};         // MXCSR and x87 control word: defaults
    __asm__ volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(csr[0]), "=m"(csr[1]));
    std::memcpy(--slot, csr, 8);
    sp = slot;
  }
  static void swap(Context& save, Context& load) { emu_switch_stack(&save.sp, load.sp); }
};
#else
struct Context {
  ucontext_t uc;

  void init(char* stack, size_t bytes, void (*entry)()) {
    getcontext(&uc);
    uc.uc_stack.ss_sp = stack;
    uc.uc_stack.ss_size = bytes;
    uc.uc_link = nullptr;
    makecontext(&uc, entry, 0);
  }
  static void swap(Context& save, Context& load) { swapcontext(&save.uc, &load.uc); }
};
#endif

constexpr size_t kStackBytes = 256 << 10;
constexpr size_t kGuardBytes = 4096;

enum class State { Ready, AtSyncthreads, AtShuffle, AtClusterBarrier, AtMbarrier, Done };

constexpr unsigned kNoArrival = ~0u;

struct Fiber {
  Context ctx;
  State state = State::Ready;
  unsigned rank = 0, thread = 0;  // its block in the cluster, its thread in the block
  unsigned arrived = kNoArrival;  // the cluster barrier phase of its pending arrive
  const void* mbar = nullptr;     // AtMbarrier: the barrier it waits on
  char* stack = nullptr;          // kStackBytes usable, a PROT_NONE guard page below
  void* fake_stack = nullptr;
};

struct Warp {
  unsigned size = 32, arrived = 0, gen = 0;
  uint64_t slot[2][32] = {};
};

struct Block {
  unsigned arrived = 0;  // at __syncthreads
  unsigned running = 0;  // threads not exited
  std::vector<Warp> warps;
  Region smem;
};

// The running cluster (one block without clusters): fiber rank * threads + thread.
struct ClusterRun {
  std::vector<Fiber>* fibers;
  unsigned threads, size;
  unsigned first_block = 0;
  std::vector<Block> blocks;   // by rank
  std::vector<unsigned> order;  // of a scheduling round
  unsigned phase = 0, phase_arrived = 0;  // the cluster barrier's open phase
  void (*body)(void*);
  void* ctx;
  unsigned cur = 0;
  Context sched;
  const void* sched_stack = nullptr;
  size_t sched_stack_size = 0;
};

ClusterRun* g_run = nullptr;
std::vector<Fiber> g_fibers;  // stacks reused by every launch

// Static __shared__ variables: every block's copy, by rank.
struct StaticShared {
  SharedVar var;
  Region copies[kMaxClusterBlocks];
};
std::deque<StaticShared> g_static_shared;

void switch_to_scheduler(bool exiting) {
  ClusterRun& r = *g_run;
  Fiber& f = (*r.fibers)[r.cur];
#if EMU_ASAN
  __sanitizer_start_switch_fiber(exiting ? nullptr : &f.fake_stack, r.sched_stack,
                                 r.sched_stack_size);
#endif
  Context::swap(f.ctx, r.sched);  // an exiting fiber is never resumed
#if EMU_ASAN
  __sanitizer_finish_switch_fiber(f.fake_stack, &r.sched_stack, &r.sched_stack_size);
#endif
}

// The shared memory of a block of a cluster whose threads all exited while others run: gone on
// a GPU, so a later access from another block is an ASan report (without ASan, reads 0xff).
void retire(Region& m) {
#if EMU_ASAN
  __asan_poison_memory_region(m.data, m.bytes);
#else
  std::memset(m.data, 0xff, m.bytes);
#endif
}

void unretire(Region& m) {
#if EMU_ASAN
  __asan_unpoison_memory_region(m.data, m.bytes);
#else
  (void)m;
#endif
}

void block_exited(ClusterRun& r, unsigned rank) {
  retire(r.blocks[rank].smem);
  for (StaticShared& s : g_static_shared) retire(s.copies[rank]);
}

void fiber_main() {
  ClusterRun& r = *g_run;
#if EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &r.sched_stack, &r.sched_stack_size);
#endif
  r.body(r.ctx);
  Fiber& f = (*r.fibers)[r.cur];
  f.state = State::Done;
  if (--r.blocks[f.rank].running == 0 && r.size > 1) block_exited(r, f.rank);
  switch_to_scheduler(true);
}

void run_fiber(ClusterRun& r, unsigned i) {
  Fiber& f = (*r.fibers)[i];
  r.cur = i;
  threadIdx.x = f.thread;
  blockIdx.x = r.first_block + f.rank;
  g_cluster_rank = f.rank;
#if EMU_ASAN
  void* sched_fake = nullptr;
  __sanitizer_start_switch_fiber(&sched_fake, f.stack, kStackBytes);
#endif
  Context::swap(r.sched, f.ctx);
#if EMU_ASAN
  __sanitizer_finish_switch_fiber(sched_fake, nullptr, nullptr);
#endif
}

const char* state_name(State s) {
  switch (s) {
    case State::Ready:
      return "ready";
    case State::AtSyncthreads:
      return "__syncthreads";
    case State::AtShuffle:
      return "__shfl_xor_sync";
    case State::AtClusterBarrier:
      return "__cluster_barrier_wait";
    case State::AtMbarrier:
      return "mbarrier wait";
    default:
      return "exited";
  }
}

[[noreturn]] void deadlock(const ClusterRun& r) {
  std::string msg = "deadlock or barrier divergence in block " + std::to_string(r.first_block);
  if (r.size > 1) {
    msg = "deadlock or barrier divergence in the cluster of blocks " +
          std::to_string(r.first_block) + ".." + std::to_string(r.first_block + r.size - 1);
  }
  msg += ":";
  for (State s : {State::AtSyncthreads, State::AtShuffle, State::AtClusterBarrier,
                  State::AtMbarrier, State::Done}) {
    std::string ids;
    int n = 0;
    for (unsigned i = 0; i < r.threads * r.size; ++i) {
      const Fiber& f = (*r.fibers)[i];
      if (f.state != s) continue;
      if (n++ >= 8) continue;
      ids += " " + (r.size > 1 ? std::to_string(r.first_block + f.rank) + "." : std::string()) +
             std::to_string(f.thread);
    }
    if (n > 0) {
      msg += std::string(" ") + std::to_string(n) + " at " + state_name(s) +
             (r.size > 1 ? " (block.thread" : " (threads") + ids + (n > 8 ? " ..." : "") + ");";
    }
  }
  device_fault(msg.c_str());
}

void run_cluster(ClusterRun& r) {
  std::vector<Fiber>& fibers = *r.fibers;
  for (unsigned i = 0; i < r.threads * r.size; ++i) {
    Fiber& f = fibers[i];
    f.state = State::Ready;
    f.rank = i / r.threads;
    f.thread = i % r.threads;
    f.arrived = kNoArrival;
    f.fake_stack = nullptr;
#if EMU_ASAN
    __asan_unpoison_memory_region(f.stack, kStackBytes);
#endif
    f.ctx.init(f.stack, kStackBytes, fiber_main);
  }
  r.phase = r.phase_arrived = 0;
  const bool greedy = g_schedule.threads & 2;
  for (;;) {
    for (unsigned k = 0; k < r.order.size(); ++k) {
      const unsigned i = r.order[k];
      if (fibers[i].state != State::Ready) continue;
      run_fiber(r, i);
      if (greedy) k = ~0u;  // restart from the first thread: it (its warp) runs ahead
    }
    bool all_done = true, any_ready = false;
    for (unsigned i = 0; i < r.threads * r.size; ++i) {
      all_done = all_done && fibers[i].state == State::Done;
      any_ready = any_ready || fibers[i].state == State::Ready;
    }
    if (all_done) return;
    if (!any_ready) deadlock(r);
  }
}

void ensure_fibers(unsigned n) {
  while (g_fibers.size() < n) {
    const size_t bytes = kStackBytes + kGuardBytes;
    void* m = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) device_fault("mmap of a fiber stack failed");
    mprotect(m, kGuardBytes, PROT_NONE);  // stacks grow down: overflow hits the guard
    Fiber f;
    f.stack = static_cast<char*>(m) + kGuardBytes;
    g_fibers.push_back(f);
  }
}

// ---- guarded allocations (dynamic shared memory; the harness's buffers) ---------------------

constexpr size_t kCanary = 64;
constexpr unsigned char kCanaryByte = 0xa5;

}  // namespace

Region make_region(size_t bytes) {
  Region r;
  r.bytes = bytes;
  void* base = nullptr;
#if EMU_ASAN
  if (posix_memalign(&base, 64, bytes) != 0) device_fault("out of memory");
  r.base = r.data = static_cast<unsigned char*>(base);
#else
  if (posix_memalign(&base, 64, kCanary + bytes + kCanary) != 0) device_fault("out of memory");
  r.base = static_cast<unsigned char*>(base);
  std::memset(r.base, kCanaryByte, kCanary + bytes + kCanary);
  r.data = r.base + kCanary;
#endif
  return r;
}

bool region_intact(const Region& r) {
#if EMU_ASAN
  (void)r;
  return true;  // ASan reported any stray access already
#else
  for (size_t i = 0; i < kCanary; ++i) {
    if (r.base[i] != kCanaryByte || r.data[r.bytes + i] != kCanaryByte) return false;
  }
  return true;
#endif
}

void free_region(Region& r) {
  std::free(r.base);
  r = Region{};
}

bool built_with_asan() { return EMU_ASAN; }

// ---- device side ---------------------------------------------------------------------------

void syncthreads() {
  ClusterRun& r = *g_run;
  Fiber& me = (*r.fibers)[r.cur];
  Block& b = r.blocks[me.rank];
  if (++b.arrived == r.threads) {
    b.arrived = 0;
    Fiber* block = &(*r.fibers)[me.rank * r.threads];
    for (unsigned i = 0; i < r.threads; ++i) {
      if (block[i].state == State::AtSyncthreads) block[i].state = State::Ready;
    }
    return;
  }
  me.state = State::AtSyncthreads;
  switch_to_scheduler(false);
}

namespace {

// A full-warp shuffle: every lane deposits its bits, waits for the whole warp, and reads
// lane source(lane)'s. `name` and `arg` (the xor mask or the source lane, 0..31) are checked.
template <typename Source>
uint64_t shfl_bits(const char* name, unsigned mask, uint64_t bits, int arg, int width,
                   Source source) {
  const auto fault = [name](const char* what) {
    device_fault((std::string(name) + " " + what).c_str());
  };
  ClusterRun& r = *g_run;
  if (mask != 0xffffffffu) fault("with a partial mask");
  if (width != 32) fault("with width != 32");
  if (arg < 0 || arg > 31) fault("lane argument out of range");
  const unsigned me = r.cur, thread = (*r.fibers)[me].thread, lane = thread & 31u;
  Warp& w = r.blocks[(*r.fibers)[me].rank].warps[thread >> 5];
  if (w.size != 32) fault("with a full mask in a partial warp");
  const unsigned gen = w.gen;
  // Two slot sets: a lane can only write this set again after the whole warp has passed the
  // next shuffle, i.e. after every lane has read what it needed from it.
  w.slot[gen & 1u][lane] = bits;
  if (++w.arrived == 32) {
    w.arrived = 0;
    ++w.gen;
    for (unsigned i = me - lane; i < me - lane + 32; ++i) {
      Fiber& f = (*r.fibers)[i];
      if (f.state == State::AtShuffle) f.state = State::Ready;
    }
  } else {
    (*r.fibers)[me].state = State::AtShuffle;
    switch_to_scheduler(false);
  }
  return w.slot[gen & 1u][source(lane)];
}

}  // namespace

uint64_t shfl_xor_bits(unsigned mask, uint64_t bits, int lane_mask, int width) {
  return shfl_bits("__shfl_xor_sync", mask, bits, lane_mask, width,
                   [&](unsigned lane) { return lane ^ static_cast<unsigned>(lane_mask); });
}

uint64_t shfl_idx_bits(unsigned mask, uint64_t bits, int src_lane, int width) {
  return shfl_bits("__shfl_sync", mask, bits, src_lane, width,
                   [&](unsigned) { return static_cast<unsigned>(src_lane); });
}

void cluster_arrive() {
  ClusterRun& r = *g_run;
  Fiber& me = (*r.fibers)[r.cur];
  if (me.arrived != kNoArrival) device_fault("__cluster_barrier_arrive twice without a wait");
  me.arrived = r.phase;
  if (++r.phase_arrived == r.threads * r.size) {
    r.phase_arrived = 0;
    ++r.phase;
    for (unsigned i = 0; i < r.threads * r.size; ++i) {
      Fiber& f = (*r.fibers)[i];
      if (f.state == State::AtClusterBarrier) f.state = State::Ready;
    }
  }
}

void cluster_wait() {
  ClusterRun& r = *g_run;
  Fiber& me = (*r.fibers)[r.cur];
  if (me.arrived == kNoArrival) device_fault("__cluster_barrier_wait without an arrive");
  if (me.arrived == r.phase) {  // its phase still open: every other thread wakes it
    me.state = State::AtClusterBarrier;
    switch_to_scheduler(false);
  }
  me.arrived = kNoArrival;
}

// ---- bulk copies and their mbarriers -------------------------------------------------------
// A barrier's state lives here, keyed by its shared-memory address; `epoch` says which
// cluster run initialised it (a barrier of an earlier block is not initialised).
struct Copy {
  void* dst;
  const void* src;
  uint32_t bytes;
};
struct Mbar {
  uint64_t epoch = 0;
  unsigned phase = 0;  // completed phases
  bool armed = false;  // the current phase has had its arrival (mbar_expect)
  uint32_t expect = 0, issued = 0;  // bytes
  std::vector<Copy> copies;  // issued, not landed
};
std::map<const void*, Mbar> g_mbars;
uint64_t g_epoch = 0;

Mbar& mbar_of(void* bar, const char* what) {
  auto it = g_mbars.find(bar);
  if (it == g_mbars.end() || it->second.epoch != g_epoch) {
    device_fault((std::string(what) + " on an mbarrier this block did not initialise").c_str());
  }
  return it->second;
}

void mbar_init(void* bar) {
  if (reinterpret_cast<uintptr_t>(bar) % 8 != 0) device_fault("misaligned mbarrier");
  std::memset(bar, 0, 8);  // its shared memory holds the barrier now
  g_mbars[bar] = Mbar{g_epoch};
}

void wake_waiters(const void* bar) {
  for (unsigned i = 0; i < g_run->threads * g_run->size; ++i) {
    Fiber& f = (*g_run->fibers)[i];
    if (f.state == State::AtMbarrier && f.mbar == bar) f.state = State::Ready;
  }
}

void mbar_expect(void* bar, uint32_t bytes) {
  Mbar& m = mbar_of(bar, "mbarrier.arrive.expect_tx");
  if (m.armed) device_fault("a second arrival on an mbarrier of count 1 in one phase");
  if (bytes >= (1u << 20)) device_fault("mbarrier transaction count of 2^20 bytes or more");
  m.armed = true;
  m.expect = bytes;
  m.issued = 0;
  wake_waiters(bar);
}

void bulk_load(void* dst, const void* src, uint32_t bytes, void* bar) {
  Mbar& m = mbar_of(bar, "cp.async.bulk");
  if (!m.armed) device_fault("cp.async.bulk on an mbarrier phase not armed by mbar_expect");
  if (bytes == 0 || bytes % 16 != 0 || m.issued + bytes > m.expect) {
    device_fault("cp.async.bulk size not a positive multiple of 16 within the armed bytes");
  }
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0 || reinterpret_cast<uintptr_t>(src) % 16 != 0) {
    device_fault("cp.async.bulk address not 16-byte aligned");
  }
  const auto* d = static_cast<const unsigned char*>(dst);
  const Region& smem = g_run->blocks[g_cluster_rank].smem;
  if (d < smem.data || d + bytes > smem.data + smem.bytes) {
    device_fault("cp.async.bulk destination outside the block's dynamic shared memory");
  }
  m.copies.push_back(Copy{dst, src, bytes});
  m.issued += bytes;
  wake_waiters(bar);
}

void mbar_wait(void* bar, uint32_t parity) {
  for (;;) {
    Mbar& m = mbar_of(bar, "mbarrier wait");
    if ((m.phase & 1u) != (parity & 1u)) return;  // that phase has completed
    if (m.armed && m.issued == m.expect) {  // its copies land now, at the first wait
      for (const Copy& c : m.copies) std::memcpy(c.dst, c.src, c.bytes);
      m.copies.clear();
      m.armed = false;
      ++m.phase;
      return;
    }
    Fiber& me = (*g_run->fibers)[g_run->cur];  // bytes still to come: wait for them
    me.state = State::AtMbarrier;
    me.mbar = bar;
    switch_to_scheduler(false);
  }
}

void* dynamic_smem_ptr() { return g_run->blocks[g_cluster_rank].smem.data; }

SharedVar& register_shared(size_t bytes) {
  StaticShared& s = g_static_shared.emplace_back();
  s.var.bytes = bytes;
  for (unsigned k = 0; k < kMaxClusterBlocks; ++k) {
    s.copies[k] = make_region(bytes);
    std::memset(s.copies[k].data, 0xff, bytes);
    s.var.copy[k] = s.copies[k].data;
  }
  return s.var;
}

void* map_shared_rank(const void* p, unsigned rank) {
  ClusterRun& r = *g_run;
  if (rank >= r.size) device_fault("__cluster_map_shared_rank: rank outside the cluster");
  const auto* a = static_cast<const unsigned char*>(p);
  const auto in = [a](const Region& m) { return a >= m.data && a < m.data + m.bytes; };
  const Region& dyn = r.blocks[g_cluster_rank].smem;
  if (in(dyn)) return r.blocks[rank].smem.data + (a - dyn.data);
  for (StaticShared& s : g_static_shared) {
    const Region& mine = s.copies[g_cluster_rank];
    if (in(mine)) return s.copies[rank].data + (a - mine.data);
  }
  device_fault("__cluster_map_shared_rank of an address outside the block's shared memory");
}

void device_assert(const char* msg, const char* file, unsigned line, const char* func) {
  if (g_asserts++ == 0) {
    g_first_assert = std::string(msg) + " (" + file + ":" + std::to_string(line) + " " + func +
                     ", block " + std::to_string(blockIdx.x) + " thread " +
                     std::to_string(threadIdx.x) + ")";
  }
}

void device_fault(const char* what) {
  std::fflush(stdout);
  if (g_run != nullptr) {
    std::fprintf(stderr, "EMULATED DEVICE FAULT: %s (block %u, thread %u)\n", what, blockIdx.x,
                 threadIdx.x);
  } else {
    std::fprintf(stderr, "EMULATED DEVICE FAULT: %s\n", what);
  }
  std::fflush(stderr);
  _exit(3);
}

// ---- fast math -----------------------------------------------------------------------------

namespace {
float plus_ulps(float r, float ulps) {
  if (!std::isfinite(r) || r == 0.0f) return r;
  const float ulp = std::ldexp(1.0f, std::ilogb(r) - 23);
  return r + static_cast<float>(g_fastmath_bias) * ulps * ulp;
}
}  // namespace

float fast_expf(float x) {
  const float r = std::exp(x);
  if (g_fastmath_bias == 0) return r;
  // "The maximum ulp error is 2 + floor(abs(1.173 * x))."
  return plus_ulps(r, 2.0f + std::floor(std::fabs(1.173f * x)));
}

float fast_logf(float x) {
  const float r = std::log(x);
  if (g_fastmath_bias == 0 || !std::isfinite(r)) return r;
  // "For x in [0.5, 2], the maximum absolute error is 2^-21.41, otherwise, the maximum ulp
  // error is 3."
  if (x >= 0.5f && x <= 2.0f) {
    return r + static_cast<float>(g_fastmath_bias) * std::exp2(-21.41f);
  }
  return plus_ulps(r, 3.0f);
}

// ---- launches ------------------------------------------------------------------------------

namespace {

cudaError_t refuse(LaunchRecord rec, const char* why, cudaError_t err) {
  rec.error = why;
  g_launches.push_back(rec);
  return g_last_error = err;
}

size_t max_dynamic_smem(const void* kernel) {
  const auto opted = g_max_dyn_smem.find({kernel, g_device});
  return opted != g_max_dyn_smem.end() ? opted->second : 48u << 10;
}

// The occupancy calculator's model: threads and dynamic shared memory per SM.
int blocks_per_sm(const void* kernel, unsigned threads, size_t smem) {
  const Device& d = devices()[g_device];
  if (smem > max_dynamic_smem(kernel)) return 0;
  int n = std::min(d.threads_per_sm / static_cast<int>(threads), 32);
  if (smem > 0) n = std::min(n, static_cast<int>(d.smem_per_sm / (smem + 1024)));
  return n;
}

// Why a cluster of `n` blocks cannot be launched on the current device, or nullptr.
const char* cluster_problem(const void* kernel, unsigned n) {
  if (devices()[g_device].cc_major < 9) return "thread block clusters need compute capability 9.0";
  if (n < 1 || n > static_cast<unsigned>(devices()[g_device].max_cluster)) {
    return "cluster size out of range";
  }
  if (n > 8 && g_non_portable_cluster.count({kernel, g_device}) == 0) {
    return "cluster size above 8 without cudaFuncAttributeNonPortableClusterSizeAllowed";
  }
  return nullptr;
}

// A finished cluster's shared memory: canaries checked, the dynamic regions freed (the
// static copies stay, refilled by the next cluster).
void end_cluster(ClusterRun& r) {
  for (unsigned k = 0; k < r.size; ++k) {
    Region& smem = r.blocks[k].smem;
    unretire(smem);
    if (!region_intact(smem)) device_fault("write outside the dynamic shared memory");
    free_region(smem);
    for (StaticShared& s : g_static_shared) {
      if (!region_intact(s.copies[k])) device_fault("write outside a static __shared__ variable");
    }
  }
}

}  // namespace

cudaError_t launch_attributes(const void* kernel, const cudaLaunchConfig_t& config,
                              unsigned* cluster) {
  *cluster = 0;
  const auto refused = [&](const char* why, cudaError_t err) {
    return refuse(LaunchRecord{kernel_name(kernel), config.gridDim.x, config.blockDim.x,
                               config.dynamicSmemBytes, "", std::max(*cluster, 1u)},
                  why, err);
  };
  for (unsigned i = 0; i < config.numAttrs; ++i) {
    const cudaLaunchAttribute& a = config.attrs[i];
    if (a.id != cudaLaunchAttributeClusterDimension) {
      return refused("a launch attribute the emulator does not model", cudaErrorInvalidValue);
    }
    *cluster = a.val.clusterDim.x;
    if (a.val.clusterDim.y != 1 || a.val.clusterDim.z != 1) {
      return refused("the emulator runs 1-D clusters only", cudaErrorInvalidConfiguration);
    }
    if (*cluster == 0) return refused("cluster size out of range", cudaErrorInvalidClusterSize);
  }
  return cudaSuccess;
}

cudaError_t run_grid(const void* kernel, const Config& cfg, void (*body)(void*), void* ctx) {
  const unsigned n = std::max(cfg.cluster, 1u);
  LaunchRecord rec{kernel_name(kernel), cfg.grid.x, cfg.block.x, cfg.smem, "", n};
  const Device& dev = devices()[g_device];
  if (cfg.grid.y != 1 || cfg.grid.z != 1 || cfg.block.y != 1 || cfg.block.z != 1) {
    return refuse(rec, "the emulator runs 1-D launches only", cudaErrorInvalidConfiguration);
  }
  if (cfg.grid.x < 1 || cfg.grid.x > 0x7fffffffu) {
    return refuse(rec, "grid size out of range", cudaErrorInvalidConfiguration);
  }
  if (cfg.block.x < 1 || cfg.block.x > 1024 ||
      cfg.block.x > static_cast<unsigned>(dev.threads_per_sm)) {
    return refuse(rec, "block size out of range", cudaErrorInvalidConfiguration);
  }
  if (cfg.smem > max_dynamic_smem(kernel) || cfg.smem > static_cast<size_t>(dev.smem_grant)) {
    return refuse(rec, "dynamic shared memory above what the kernel was granted",
                  cudaErrorInvalidValue);
  }
  if (cfg.cluster != 0) {
    if (const char* why = cluster_problem(kernel, cfg.cluster)) {
      return refuse(rec, why, cudaErrorInvalidClusterSize);
    }
    if (cfg.grid.x % n != 0) {
      return refuse(rec, "grid size not a multiple of the cluster size",
                    cudaErrorInvalidClusterSize);
    }
    // All blocks of a cluster are resident at once.
    if (blocks_per_sm(kernel, cfg.block.x, cfg.smem) * dev.sms < static_cast<int>(n)) {
      return refuse(rec, "a cluster does not fit on the device", cudaErrorInvalidClusterSize);
    }
    if (dev.cluster_launch_error != 0) {
      return refuse(rec, "this device refuses cluster launches",
                    static_cast<cudaError_t>(dev.cluster_launch_error));
    }
  }
  g_launches.push_back(rec);

  ensure_fibers(cfg.block.x * n);
  ClusterRun r;
  r.fibers = &g_fibers;
  r.threads = cfg.block.x;
  r.size = n;
  r.body = body;
  r.ctx = ctx;
  r.blocks.resize(n);
  const bool descending = g_schedule.threads & 1;
  for (unsigned k = 0; k < n; ++k) {
    const unsigned rank = g_schedule.blocks ? n - 1 - k : k;
    for (unsigned j = 0; j < r.threads; ++j) {
      r.order.push_back(rank * r.threads + (descending ? r.threads - 1 - j : j));
    }
  }
  blockDim = dim3(cfg.block.x, 1u, 1u);
  gridDim = dim3(cfg.grid.x, 1u, 1u);
  g_cluster_size = n;
  ClusterRun* outer = g_run;
  g_run = &r;
  const unsigned clusters = cfg.grid.x / n;
  for (unsigned c = 0; c < clusters; ++c) {
    ++g_epoch;
    r.first_block = (g_schedule.blocks ? clusters - 1 - c : c) * n;
    for (unsigned k = 0; k < n; ++k) {
      Block& b = r.blocks[k];
      b.arrived = 0;
      b.running = r.threads;
      b.warps.assign((r.threads + 31) / 32, Warp{});
      if (r.threads % 32 != 0) b.warps.back().size = r.threads % 32;
      b.smem = make_region(cfg.smem);
      std::memset(b.smem.data, 0xff, cfg.smem);
      for (StaticShared& s : g_static_shared) {
        unretire(s.copies[k]);
        std::memset(s.copies[k].data, 0xff, s.var.bytes);
      }
    }
    run_cluster(r);
    end_cluster(r);
  }
  g_run = outer;
  g_cluster_rank = 0;
  g_cluster_size = 1;
  return cudaSuccess;
}

// ---- harness control -----------------------------------------------------------------------

const std::vector<Device>& devices() {
  static const std::vector<Device> d = {
      // sms, smem_optin, smem_grant, smem_per_sm, threads_per_sm, cc_major, max_cluster,
      // ptx_version, cluster_launch_error, non_portable_error
      {2, 232448, 232448, 233472, 2048, 9, 16, 90, 0, 0},  // H100-like (few SMs: the grids loop)
      {3, 101376, 101376, 102400, 1536, 8, 0, 80, 0, 0},   // sm_86-like
      {1, 232448, 65536, 233472, 2048, 9, 16, 90, 0, 0},   // grants less shared memory than it
                                                           // reports
      {2, 232448, 232448, 233472, 2048, 9, 8, 90, 0, 0},   // runs clusters of at most 8 blocks
      {2, 232448, 232448, 233472, 2048, 9, 16, 80, 0, 0},  // H100-like, but the build's code for
                                                           // it is compute_80 PTX, compiled
                                                           // just in time
      // sm_120-like: the occupancy calculator counts clusters, but launches of them are
      // refused with cudaErrorInvalidValue (vllm-project/vllm#47164), and so is the
      // non-portable size opt-in: the launcher must fall back to a block per row.
      {2, 101376, 101376, 102400, 1536, 12, 8, 120, cudaErrorInvalidValue,
       cudaErrorInvalidValue},
      // H100-like whose cluster launches fail with an error that is no refusal of the
      // configuration (cudaErrorLaunchFailure, as an error left by earlier work comes back):
      // the launcher must return it at once, with no retry and no other launch.
      {2, 232448, 232448, 233472, 2048, 9, 16, 90, cudaErrorLaunchFailure, 0},
  };
  return d;
}

void begin_case(int device, Schedule schedule, int fastmath_bias) {
  if (device < 0 || device >= static_cast<int>(devices().size())) {
    device_fault("no such emulated device");
  }
  g_device = device;
  g_schedule = schedule;
  g_fastmath_bias = fastmath_bias;
  g_launches.clear();
  g_asserts = 0;
  g_first_assert.clear();
  g_last_error = cudaSuccess;
}

const std::vector<LaunchRecord>& launches() { return g_launches; }
int assert_count() { return g_asserts; }
const std::string& first_assert() { return g_first_assert; }

}  // namespace emu

// ---- the CUDA runtime calls of csrc/cuda/launch_utils.cuh -----------------------------------

extern "C" {

cudaError_t cudaGetDevice(int* device) {
  *device = emu::g_device;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  const emu::Device& d = emu::devices().at(device);
  switch (attr) {
    case cudaDevAttrMultiProcessorCount:
      *value = d.sms;
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = d.smem_optin;
      return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor:
      *value = d.cc_major;
      return cudaSuccess;
    case cudaDevAttrClusterLaunch:
      *value = d.cc_major >= 9;
      return cudaSuccess;
    default:  // a new query the emulator does not model yet
      return emu::g_last_error = cudaErrorInvalidValue;
  }
}

cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeNonPortableClusterSizeAllowed && (value == 0 || value == 1)) {
    if (value == 1 && emu::devices()[emu::g_device].non_portable_error != 0) {
      return emu::g_last_error =
                 static_cast<cudaError_t>(emu::devices()[emu::g_device].non_portable_error);
    }
    if (value == 1) {
      emu::g_non_portable_cluster.insert({func, emu::g_device});
    } else {
      emu::g_non_portable_cluster.erase({func, emu::g_device});
    }
    return cudaSuccess;
  }
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) {
    return emu::g_last_error = cudaErrorInvalidValue;
  }
  if (value < 0 || value > emu::devices()[emu::g_device].smem_grant) {
    return emu::g_last_error = cudaErrorInvalidValue;
  }
  emu::g_max_dyn_smem[{func, emu::g_device}] = value;
  return cudaSuccess;
}

// Only the fields the launchers read.
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, const void* /*func*/) {
  const emu::Device& d = emu::devices()[emu::g_device];
  *attr = cudaFuncAttributes{};
  attr->ptxVersion = d.ptx_version;
  attr->binaryVersion = 10 * d.cc_major;
  return cudaSuccess;
}

cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, const void* func,
                                                          int threads, size_t smem) {
  if (threads < 1 || threads > 1024) return emu::g_last_error = cudaErrorInvalidValue;
  *blocks = emu::blocks_per_sm(func, static_cast<unsigned>(threads), smem);
  return cudaSuccess;
}

// The cluster size comes from the config's attribute (required: the emulated kernels declare
// none); its grid size is not looked at.
cudaError_t cudaOccupancyMaxActiveClusters(int* clusters, const void* func,
                                           const cudaLaunchConfig_t* config) {
  unsigned n = 0;
  for (unsigned i = 0; i < config->numAttrs; ++i) {
    const cudaLaunchAttribute& a = config->attrs[i];
    if (a.id != cudaLaunchAttributeClusterDimension) continue;
    if (a.val.clusterDim.y != 1 || a.val.clusterDim.z != 1) {
      return emu::g_last_error = cudaErrorInvalidClusterSize;
    }
    n = a.val.clusterDim.x;
  }
  if (n == 0 || emu::cluster_problem(func, n) != nullptr) {
    return emu::g_last_error = cudaErrorInvalidClusterSize;
  }
  const unsigned threads = config->blockDim.x * config->blockDim.y * config->blockDim.z;
  if (threads < 1 || threads > 1024) return emu::g_last_error = cudaErrorInvalidValue;
  const int blocks = emu::blocks_per_sm(func, threads, config->dynamicSmemBytes);
  *clusters = blocks * emu::devices()[emu::g_device].sms / static_cast<int>(n);
  return cudaSuccess;
}

cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::g_last_error;
  emu::g_last_error = cudaSuccess;
  return e;
}

float __nv_tanhf(float x) { return std::tanh(x); }
float __nv_powf(float x, float y) { return std::pow(x, y); }
float __nv_log1pf(float x) { return std::log1p(x); }
float __nv_expf(float x) { return std::exp(x); }

}  // extern "C"
