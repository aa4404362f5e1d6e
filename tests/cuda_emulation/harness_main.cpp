// The emulator's command line: runs a batch of kernel cases over shared buffers.
//
//   harness BATCH IN_BLOB OUT_BLOB
//
// BATCH is text. First the buffers, each `buffer NAME BYTES OFFSET`: BYTES bytes, 64-byte
// aligned, initialised from IN_BLOB at OFFSET (exact size: ASan or canaries catch any access
// outside). Then cases, `case ID`, `KEY VALUE...` lines, `end`, run in order; a case may read
// what an earlier one wrote. Pointers are `NAME BYTE_OFFSET`.
// Keys (absent pointer = null):
//   op softmax|rescale|sigmoid|sigmoid_sum   dtype 0-3 (tlf::Dtype)   device N (emulated GPU)
//   schedule THREADS BLOCKS (emu::Schedule, emu_control.h)   fastmath -1|0|1 (emu_runtime.h)
//   launch auto (the real launcher) | direct  with  group 0-3  vec 0|1  grid N  threads N  cache N
//     prefetch BYTES (direct; the next row's L2 prefetch)  cluster N (direct, group 3)
//     bulk 0|1 (direct, group 2 or 3, vec: the row cache filled by bulk copies)
//   tuning MAX_THREADS ROW_CACHE_BYTES PREFETCH_BYTES CLUSTER_BLOCKS BULK_LOAD (auto:
//     tlf::cuda::BlockRowTuning for this case; the defaults are restored after it)
//   softmax: mode 0-2 (tlf::Mode), input PTR B C D sb sc sd, index_target PTR TYPE sb sd D,
//     prob_target PTR F32 B C D sb sc sd, ignore_index, weight PTR, weight_sum PTR,
//     label_smoothing, z_loss, softcap, logit_scale, focal, gamma, alpha PTR, alpha_scale,
//     loss PTR, lse PTR, lse_in PTR, grad_loss PTR sb sd D, grad_lse PTR sb sd D,
//     grad_input PTR B C D sb sc sd
//   rescale: grad PTR B C D sb sc sd, grad_loss PTR sb sd D, grad_scale PTR sb sd D
//   sigmoid / sigmoid_sum: input PTR, target PTR, n, alpha, gamma, scale, backward 0|1,
//     loss PTR, grad_loss PTR, scalar_grad 0|1, grad_input PTR, partials PTR, out PTR
// Output, one tab-separated line each: `launch ID GRID BLOCK SMEM CLUSTER ERROR KERNEL`, then
// `result ID STATUS ASSERTS FIRST_ASSERT` (STATUS: ok or the cudaError_t number). After the
// last case every buffer is written to OUT_BLOB at its offset. An emulated device fault
// (barrier divergence, a misaligned __ldcs/__stcs, a write outside a buffer) ends the process
// with exit status 3, an ASan or UBSan report with status 1; stderr says which case ran.
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include "cuda/softmax_loss_cuda.cu"  // tlf::cuda::softmax_loss / rescale_grad_rows
#include "emu_control.h"
#include "harness.h"

namespace {

using tlf::Dtype;
using tlf::Mode;

struct Buffer {
  emu::Region region;
  size_t offset = 0;
};
std::map<std::string, Buffer> g_buffers;

[[noreturn]] void fail(const std::string& msg) {
  std::fflush(stdout);
  std::fprintf(stderr, "harness: %s\n", msg.c_str());
  std::exit(2);
}

class Case {
 public:
  std::string id;
  std::map<std::string, std::vector<std::string>> kv;

  bool has(const std::string& k) const { return kv.count(k) != 0; }
  const std::vector<std::string>& get(const std::string& k) const {
    auto it = kv.find(k);
    if (it == kv.end()) fail("case " + id + ": missing key " + k);
    return it->second;
  }
  int64_t i(const std::string& k, int64_t def, size_t at = 0) const {
    return has(k) ? std::stoll(get(k).at(at)) : def;
  }
  double f(const std::string& k, double def) const { return has(k) ? std::stod(get(k).at(0)) : def; }
  // NAME BYTE_OFFSET at value position `at`, or null when the key is absent.
  void* ptr(const std::string& k) const {
    if (!has(k)) return nullptr;
    const auto& v = get(k);
    auto it = g_buffers.find(v.at(0));
    if (it == g_buffers.end()) fail("case " + id + ": no buffer " + v.at(0));
    return it->second.region.data + std::stoll(v.at(1));
  }
  tlf::RowLayout layout(const std::string& k, size_t at) const {
    const auto& v = get(k);
    tlf::RowLayout l;
    l.B = std::stoll(v.at(at));
    l.C = std::stoll(v.at(at + 1));
    l.D = std::stoll(v.at(at + 2));
    l.sb = std::stoll(v.at(at + 3));
    l.sc = std::stoll(v.at(at + 4));
    l.sd = std::stoll(v.at(at + 5));
    return l;
  }
  tlf::RowVector row_vector(const std::string& k, size_t at = 2) const {
    tlf::RowVector r;
    if (!has(k)) return r;
    const auto& v = get(k);
    r.ptr = ptr(k);
    r.sb = std::stoll(v.at(at));
    r.sd = std::stoll(v.at(at + 1));
    r.D = std::stoll(v.at(at + 2));
    return r;
  }
  harness::Direct direct() const {
    harness::Direct d;
    d.group = static_cast<harness::Group>(i("group", 0));
    d.vec = i("vec", 0) != 0;
    d.grid = static_cast<int>(i("grid", 1));
    d.threads = static_cast<int>(i("threads", 32));
    d.cache = i("cache", 0);
    d.prefetch = i("prefetch", 0);
    d.cluster = static_cast<int>(i("cluster", 1));
    d.bulk = i("bulk", 0) != 0;
    return d;
  }
  bool direct_launch() const {
    if (!has("launch")) fail("case " + id + ": missing key launch");
    return get("launch").at(0) == "direct";
  }
};

// Keys that set a params field as they are; an absent key leaves the struct's default.
template <class P>
using Member = std::variant<int64_t P::*, double P::*, bool P::*, const void* P::*, void* P::*>;

template <class P>
void read_fields(const Case& c, P& p, std::initializer_list<std::pair<const char*, Member<P>>> keys) {
  for (const auto& [key, member] : keys) {
    if (!c.has(key)) continue;
    std::visit(
        [&, key = key](auto m) {
          using F = std::remove_reference_t<decltype(p.*m)>;
          if constexpr (std::is_pointer_v<F>) {
            p.*m = c.ptr(key);
          } else if constexpr (std::is_same_v<F, double>) {
            p.*m = c.f(key, 0.0);
          } else {
            p.*m = static_cast<F>(c.i(key, 0));
          }
        },
        member);
  }
}

template <typename F>
cudaError_t by_dtype(Dtype dt, F&& f) {
  switch (dt) {
    case Dtype::Float64:
      return f(double{});
    case Dtype::BFloat16:
      return f(__nv_bfloat16{});
    case Dtype::Float16:
      return f(__half{});
    default:
      return f(float{});
  }
}

cudaError_t run_softmax(const Case& c, Dtype dt) {
  using P = tlf::SoftmaxLossParams;
  P p;
  const Mode mode = static_cast<Mode>(c.i("mode", 0));
  p.input = c.ptr("input");
  p.in = c.layout("input", 2);
  if (c.has("index_target")) {
    p.index_target = c.row_vector("index_target", 3);
    p.index_type = static_cast<tlf::IndexType>(c.i("index_target", 0, 2));
  }
  if (c.has("prob_target")) {
    p.prob_target = true;
    p.prob_target_ptr = c.ptr("prob_target");
    p.target_is_float32 = c.i("prob_target", 0, 2) != 0;
    p.prob_target_layout = c.layout("prob_target", 3);
  }
  read_fields(c, p, {{"ignore_index", &P::ignore_index}, {"weight", &P::weight},
                     {"weight_sum", &P::weight_sum}, {"label_smoothing", &P::label_smoothing},
                     {"z_loss", &P::z_loss}, {"softcap", &P::softcap},
                     {"logit_scale", &P::logit_scale}, {"focal", &P::focal}, {"gamma", &P::gamma},
                     {"alpha", &P::alpha}, {"alpha_scale", &P::alpha_scale}, {"loss", &P::loss},
                     {"lse", &P::lse}, {"lse_in", &P::lse_in}});
  p.with_grad = mode == Mode::Fused;
  p.grad_loss = c.row_vector("grad_loss");
  p.grad_lse = c.row_vector("grad_lse");
  if (c.has("grad_input")) {
    p.grad_input = c.ptr("grad_input");
    p.grad_layout = c.layout("grad_input", 2);
  }
  if (!c.direct_launch()) {
    if (!c.has("tuning")) return tlf::cuda::softmax_loss(p, dt, mode, nullptr);
    tlf::cuda::BlockRowTuning t;
    t.max_threads = static_cast<int>(c.i("tuning", 0, 0));
    t.row_cache_bytes = c.i("tuning", 0, 1);
    t.prefetch_bytes = c.i("tuning", 0, 2);
    t.cluster_blocks = static_cast<int>(c.i("tuning", 0, 3));
    t.bulk_load = static_cast<int>(c.i("tuning", 0, 4));
    if (!tlf::cuda::set_block_row_tuning(t)) fail("case " + c.id + ": invalid tuning");
    const cudaError_t err = tlf::cuda::softmax_loss(p, dt, mode, nullptr);
    tlf::cuda::set_block_row_tuning(tlf::cuda::BlockRowTuning{});
    return err;
  }
  return by_dtype(dt, [&](auto t) {
    return harness::softmax_direct<decltype(t)>(p, mode, c.direct());
  });
}

cudaError_t run_rescale(const Case& c, Dtype dt) {
  void* grad = c.ptr("grad");
  const tlf::RowLayout l = c.layout("grad", 2);
  const tlf::RowVector gl = c.row_vector("grad_loss"), gs = c.row_vector("grad_scale");
  if (!c.direct_launch()) return tlf::cuda::rescale_grad_rows(grad, l, gl, gs, dt, nullptr);
  return by_dtype(dt, [&](auto t) {
    using T = decltype(t);
    return harness::rescale_direct<T>(static_cast<T*>(grad), l, gl, gs, c.direct());
  });
}

cudaError_t run_sigmoid(const Case& c, Dtype dt, bool sum) {
  using P = tlf::SigmoidFocalParams;
  P p;
  read_fields(c, p, {{"input", &P::input}, {"target", &P::target}, {"n", &P::n},
                     {"alpha", &P::alpha}, {"gamma", &P::gamma}, {"scale", &P::scale},
                     {"loss", &P::loss}, {"grad_loss", &P::grad_loss},
                     {"scalar_grad", &P::scalar_grad}, {"grad_input", &P::grad_input}});
  if (sum) return tlf::cuda::sigmoid_focal_sum(p, dt, c.ptr("partials"), c.ptr("out"), nullptr);
  return tlf::cuda::sigmoid_focal(p, dt, c.i("backward", 0) != 0, nullptr);
}

void run_case(const Case& c) {
  std::fprintf(stderr, "case %s\n", c.id.c_str());  // names the case in a sanitizer report
  emu::Schedule s;
  s.threads = static_cast<int>(c.i("schedule", 0, 0));
  s.blocks = static_cast<int>(c.i("schedule", 0, 1));
  emu::begin_case(static_cast<int>(c.i("device", 0)), s, static_cast<int>(c.i("fastmath", 0)));
  const Dtype dt = static_cast<Dtype>(c.i("dtype", 0));
  const std::string op = c.get("op").at(0);
  cudaError_t err;
  if (op == "softmax") {
    err = run_softmax(c, dt);
  } else if (op == "rescale") {
    err = run_rescale(c, dt);
  } else if (op == "sigmoid" || op == "sigmoid_sum") {
    err = run_sigmoid(c, dt, op == "sigmoid_sum");
  } else {
    fail("case " + c.id + ": unknown op " + op);
  }
  for (const auto& [name, b] : g_buffers) {
    if (!emu::region_intact(b.region)) {
      emu::device_fault(("case " + c.id + ": write outside buffer " + name).c_str());
    }
  }
  for (const auto& l : emu::launches()) {
    std::printf("launch\t%s\t%u\t%u\t%zu\t%u\t%s\t%s\n", c.id.c_str(), l.grid, l.block,
                l.smem, l.cluster, l.error.empty() ? "-" : l.error.c_str(), l.kernel.c_str());
  }
  std::string first = emu::first_assert();
  for (char& ch : first) {
    if (ch == '\t' || ch == '\n') ch = ' ';
  }
  std::printf("result\t%s\t%s\t%d\t%s\n", c.id.c_str(),
              err == cudaSuccess ? "ok" : std::to_string(static_cast<int>(err)).c_str(),
              emu::assert_count(), first.empty() ? "-" : first.c_str());
  std::fflush(stdout);  // whole lines only, should a later case stop the process
}

std::vector<char> read_file(const char* path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) fail(std::string("cannot read ") + path);
  return std::vector<char>(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 2 && std::string(argv[1]) == "--info") {
    std::printf("asan %d\n", emu::built_with_asan() ? 1 : 0);
    return 0;
  }
  if (argc != 4) fail("usage: harness BATCH IN_BLOB OUT_BLOB | harness --info");
  const std::vector<char> blob = read_file(argv[2]);
  std::ifstream batch(argv[1]);
  if (!batch) fail(std::string("cannot read ") + argv[1]);
  std::string line;
  Case c;
  bool in_case = false;
  while (std::getline(batch, line)) {
    std::istringstream ss(line);
    std::string key;
    if (!(ss >> key)) continue;
    std::vector<std::string> vals;
    for (std::string v; ss >> v;) vals.push_back(v);
    if (key == "buffer") {
      Buffer b;
      const size_t bytes = std::stoull(vals.at(1));
      b.offset = std::stoull(vals.at(2));
      if (b.offset + bytes > blob.size()) fail("buffer " + vals.at(0) + " past the blob");
      b.region = emu::make_region(bytes);
      std::memcpy(b.region.data, blob.data() + b.offset, bytes);
      g_buffers[vals.at(0)] = b;
    } else if (key == "case") {
      c = Case{};
      c.id = vals.at(0);
      in_case = true;
    } else if (key == "end") {
      if (!in_case) fail("end without case");
      run_case(c);
      in_case = false;
    } else {
      if (!in_case) fail("key outside a case: " + key);
      c.kv[key] = vals;
    }
  }
  std::fflush(stdout);
  std::vector<char> out(blob.size());
  for (const auto& [name, b] : g_buffers) {
    std::memcpy(out.data() + b.offset, b.region.data, b.region.bytes);
  }
  std::ofstream o(argv[3], std::ios::binary);
  o.write(out.data(), static_cast<std::streamsize>(out.size()));
  return o ? 0 : 2;
}
