// The emulator: fibers and barriers for the threads of a block, emulated shared memory, the
// few CUDA runtime calls the launchers make, and the fast-math intrinsics' error model.
#include "emu_runtime.h"

#include <cxxabi.h>
#include <dlfcn.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
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

namespace emu {

unsigned g_thread = 0, g_block = 0, g_block_dim = 1, g_grid_dim = 1;
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

enum class State { Ready, AtSyncthreads, AtShuffle, Done };

struct Fiber {
  Context ctx;
  State state = State::Ready;
  char* stack = nullptr;  // kStackBytes usable, a PROT_NONE guard page below
  void* fake_stack = nullptr;
};

struct Warp {
  unsigned size = 32, arrived = 0, gen = 0;
  uint64_t slot[2][32] = {};
};

struct BlockRun {
  std::vector<Fiber>* fibers;
  unsigned threads;
  unsigned arrived = 0;
  std::vector<Warp> warps;
  void (*body)(void*);
  void* ctx;
  unsigned cur = 0;
  Context sched;
  const void* sched_stack = nullptr;
  size_t sched_stack_size = 0;
};

BlockRun* g_run = nullptr;
std::vector<Fiber> g_fibers;  // stacks reused by every launch
void* g_smem = nullptr;
std::vector<std::pair<void*, size_t>> g_static_shared;

void switch_to_scheduler(bool exiting) {
  BlockRun& r = *g_run;
  Fiber& f = (*r.fibers)[r.cur];
#if EMU_ASAN
  __sanitizer_start_switch_fiber(exiting ? nullptr : &f.fake_stack, r.sched_stack,
                                 r.sched_stack_size);
#endif
  Context::swap(f.ctx, r.sched);  // an exiting fiber is never resumed
#if EMU_ASAN
  __sanitizer_finish_switch_fiber(f.fake_stack, &r.sched_stack, &r.sched_stack_size);
#endif
  g_thread = r.cur;
}

void fiber_main() {
  BlockRun& r = *g_run;
#if EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &r.sched_stack, &r.sched_stack_size);
#endif
  g_thread = r.cur;
  r.body(r.ctx);
  (*r.fibers)[r.cur].state = State::Done;
  switch_to_scheduler(true);
}

void run_fiber(BlockRun& r, unsigned i) {
  Fiber& f = (*r.fibers)[i];
  r.cur = i;
  g_thread = i;
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
    default:
      return "exited";
  }
}

[[noreturn]] void deadlock(const BlockRun& r) {
  std::string msg = "deadlock or barrier divergence in block " + std::to_string(g_block) + ":";
  for (int s = 1; s <= 3; ++s) {
    std::string ids;
    int n = 0;
    for (unsigned i = 0; i < r.threads; ++i) {
      if (static_cast<int>((*r.fibers)[i].state) != s) continue;
      if (n++ < 8) ids += " " + std::to_string(i);
    }
    if (n > 0) {
      msg += std::string(" ") + std::to_string(n) + " at " + state_name(static_cast<State>(s)) +
             " (threads" + ids + (n > 8 ? " ..." : "") + ");";
    }
  }
  device_fault(msg.c_str());
}

void run_block(BlockRun& r) {
  std::vector<Fiber>& fibers = *r.fibers;
  for (unsigned i = 0; i < r.threads; ++i) {
    Fiber& f = fibers[i];
    f.state = State::Ready;
    f.fake_stack = nullptr;
#if EMU_ASAN
    __asan_unpoison_memory_region(f.stack, kStackBytes);
#endif
    f.ctx.init(f.stack, kStackBytes, fiber_main);
  }
  const bool descending = g_schedule.threads & 1, greedy = g_schedule.threads & 2;
  for (;;) {
    for (unsigned k = 0; k < r.threads; ++k) {
      const unsigned i = descending ? r.threads - 1 - k : k;
      if (fibers[i].state != State::Ready) continue;
      run_fiber(r, i);
      if (greedy) k = ~0u;  // restart from the first thread: it (its warp) runs ahead
    }
    bool all_done = true, any_ready = false;
    for (unsigned i = 0; i < r.threads; ++i) {
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
  BlockRun& r = *g_run;
  if (++r.arrived == r.threads) {
    r.arrived = 0;
    for (unsigned i = 0; i < r.threads; ++i) {
      Fiber& f = (*r.fibers)[i];
      if (f.state == State::AtSyncthreads) f.state = State::Ready;
    }
    return;
  }
  (*r.fibers)[r.cur].state = State::AtSyncthreads;
  switch_to_scheduler(false);
}

uint64_t shfl_xor_bits(unsigned mask, uint64_t bits, int lane_mask, int width) {
  BlockRun& r = *g_run;
  if (mask != 0xffffffffu) device_fault("__shfl_xor_sync with a partial mask");
  if (width != 32) device_fault("__shfl_xor_sync with width != 32");
  if (lane_mask < 0 || lane_mask > 31) device_fault("__shfl_xor_sync lane mask out of range");
  const unsigned me = r.cur, lane = me & 31u;
  Warp& w = r.warps[me >> 5];
  if (w.size != 32) device_fault("__shfl_xor_sync with a full mask in a partial warp");
  const unsigned gen = w.gen;
  // Two slot sets: a lane can only write this set again after the whole warp has passed the
  // next shuffle, i.e. after every lane has read what it needed from it.
  w.slot[gen & 1u][lane] = bits;
  if (++w.arrived == 32) {
    w.arrived = 0;
    ++w.gen;
    for (unsigned i = me & ~31u; i < (me & ~31u) + 32; ++i) {
      Fiber& f = (*r.fibers)[i];
      if (f.state == State::AtShuffle) f.state = State::Ready;
    }
  } else {
    (*r.fibers)[me].state = State::AtShuffle;
    switch_to_scheduler(false);
  }
  return w.slot[gen & 1u][lane ^ static_cast<unsigned>(lane_mask)];
}

void* dynamic_smem_ptr() { return g_smem; }

void register_shared(void* p, size_t bytes) {
  g_static_shared.emplace_back(p, bytes);
  std::memset(p, 0xff, bytes);
}

void device_assert(const char* msg, const char* file, unsigned line, const char* func) {
  if (g_asserts++ == 0) {
    g_first_assert = std::string(msg) + " (" + file + ":" + std::to_string(line) + " " + func +
                     ", block " + std::to_string(g_block) + " thread " +
                     std::to_string(g_thread) + ")";
  }
}

void device_fault(const char* what) {
  std::fflush(stdout);
  if (g_run != nullptr) {
    std::fprintf(stderr, "EMULATED DEVICE FAULT: %s (block %u, thread %u)\n", what, g_block,
                 g_thread);
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

void run_grid(const void* kernel, const Config& cfg, void (*body)(void*), void* ctx) {
  LaunchRecord rec{kernel_name(kernel), cfg.grid.x, cfg.block.x, cfg.smem, ""};
  const Device& dev = devices()[g_device];
  const auto opted = g_max_dyn_smem.find({kernel, g_device});
  const size_t max_smem = opted != g_max_dyn_smem.end() ? opted->second : 48u << 10;
  cudaError_t err = cudaSuccess;
  if (cfg.grid.y != 1 || cfg.grid.z != 1 || cfg.block.y != 1 || cfg.block.z != 1) {
    rec.error = "the emulator runs 1-D launches only";
    err = cudaErrorInvalidConfiguration;
  } else if (cfg.grid.x < 1 || cfg.grid.x > 0x7fffffffu) {
    rec.error = "grid size out of range";
    err = cudaErrorInvalidConfiguration;
  } else if (cfg.block.x < 1 || cfg.block.x > 1024 ||
             cfg.block.x > static_cast<unsigned>(dev.threads_per_sm)) {
    rec.error = "block size out of range";
    err = cudaErrorInvalidConfiguration;
  } else if (cfg.smem > max_smem || cfg.smem > static_cast<size_t>(dev.smem_grant)) {
    rec.error = "dynamic shared memory above what the kernel was granted";
    err = cudaErrorInvalidValue;
  }
  if (err != cudaSuccess) {
    g_last_error = err;
    g_launches.push_back(rec);
    return;
  }
  g_launches.push_back(rec);

  ensure_fibers(cfg.block.x);
  BlockRun r;
  r.fibers = &g_fibers;
  r.threads = cfg.block.x;
  r.body = body;
  r.ctx = ctx;
  g_block_dim = cfg.block.x;
  g_grid_dim = cfg.grid.x;
  BlockRun* outer = g_run;
  g_run = &r;
  for (unsigned k = 0; k < cfg.grid.x; ++k) {
    g_block = g_schedule.blocks ? cfg.grid.x - 1 - k : k;
    r.arrived = 0;
    r.warps.assign((r.threads + 31) / 32, Warp{});
    if (r.threads % 32 != 0) r.warps.back().size = r.threads % 32;
    Region smem = make_region(cfg.smem);
    std::memset(smem.data, 0xff, cfg.smem);
    g_smem = smem.data;
    for (auto& [p, n] : g_static_shared) std::memset(p, 0xff, n);
    run_block(r);
    if (!region_intact(smem)) device_fault("write outside the dynamic shared memory");
    free_region(smem);
    g_smem = nullptr;
  }
  g_run = outer;
}

// ---- harness control -----------------------------------------------------------------------

const std::vector<Device>& devices() {
  static const std::vector<Device> d = {
      // sms, smem_optin, smem_grant, smem_per_sm, threads_per_sm
      {2, 232448, 232448, 233472, 2048},  // H100-like (few SMs: the grids loop)
      {3, 101376, 101376, 102400, 1536},  // sm_86-like
      {1, 232448, 65536, 233472, 2048},   // grants less shared memory than it reports
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
    default:  // a new query the emulator does not model yet
      return emu::g_last_error = cudaErrorInvalidValue;
  }
}

cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) {
    return emu::g_last_error = cudaErrorInvalidValue;
  }
  if (value < 0 || value > emu::devices()[emu::g_device].smem_grant) {
    return emu::g_last_error = cudaErrorInvalidValue;
  }
  emu::g_max_dyn_smem[{func, emu::g_device}] = value;
  return cudaSuccess;
}

cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, const void* func,
                                                          int threads, size_t smem) {
  const emu::Device& d = emu::devices()[emu::g_device];
  const auto opted = emu::g_max_dyn_smem.find({func, emu::g_device});
  const size_t max_smem = opted != emu::g_max_dyn_smem.end() ? opted->second : 48u << 10;
  if (threads < 1 || threads > 1024) return emu::g_last_error = cudaErrorInvalidValue;
  if (smem > max_smem) {
    *blocks = 0;
    return cudaSuccess;
  }
  int n = std::min(d.threads_per_sm / threads, 32);
  if (smem > 0) n = std::min(n, static_cast<int>(d.smem_per_sm / (smem + 1024)));
  *blocks = n;
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
