// Kernel bodies of the softmax-family losses (cross-entropy, focal): forward, backward and
// the fused forward that also writes the gradient. Torch-free: only kernel_params.h and
// CUDA headers.
//
// A group of threads (thread, warp or block: group_reduce.cuh; or, on sm_90, a cluster of
// blocks: cluster_group.cuh) owns one row at a time.
// Pass 1 (forward modes) reads the row once for the online log-sum-exp; pass 2 re-reads it
// to write the gradient and/or sum the label-smoothing / probability-target term. On the
// vector path (classes contiguous, rows 16-byte compatible) each thread moves 16 bytes per
// load and keeps what it loaded in pass 1 in its own slots of a shared-memory row cache, so
// pass 2 reads those from shared memory instead of global memory: the logits come from
// DRAM once. Whatever does not fit is re-read from global memory, last-read first, while it
// is most likely still in L2. Pass 2's vector loops write every element as a non-target
// one; the thread that wrote the target's vector then rewrites that one element.
#pragma once

#include <assert.h>  // declares __assert_fail for device code too
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "../kernel_params.h"
#include "bulk_copy.cuh"
#include "cluster_group.cuh"
#include "device_math.cuh"
#include "group_reduce.cuh"
#include "launch.h"
#include "softmax_row_math.cuh"
#include "vec_io.cuh"

namespace tlf::cuda {

// Loads in flight per thread and batch: kUnroll for the vector pass 1 (the DRAM read);
// fewer in pass 2, which mostly reads the row cache or L2, and for scalar loads.
// kMinBlocks: resident blocks per SM the register allocation must allow (a warp or thread
// per row needs many rows in flight; a block per row runs one or a few blocks per SM).
template <class G>
struct GroupTraits {
  static constexpr int kMaxThreads = 256;
  static constexpr int kMinBlocks = 2;
  static constexpr int kUnroll = 4;
};
template <>
struct GroupTraits<BlockGroup> {
  // One block per row and (with a large row cache) one block per SM: six 16-byte loads per
  // thread keep 48 KiB in flight per SM to cover DRAM latency. More would spill registers
  // in the fused kernel (four on sm_8x, where six already does).
  static constexpr int kMaxThreads = 512;
  static constexpr int kMinBlocks = 1;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  static constexpr int kUnroll = 4;
#else
  static constexpr int kUnroll = 6;
#endif
};
template <>
struct GroupTraits<ClusterGroup> {
  // A block holds a 1/n share of the row: four blocks (rows) per SM, so that one's loads
  // overlap another's reductions and stores, with a block per row's registers per thread
  // and loads in flight per SM.
  static constexpr int kMaxThreads = 128;
  static constexpr int kMinBlocks = 4;
  static constexpr int kUnroll = GroupTraits<BlockGroup>::kUnroll;
};

// A block's bulk-copy barriers (kBulk): one per chunk of the row cache. A row arms the
// first few (as many as its cache has chunks, which can differ between rows whose 16-byte
// alignment differs), each completing one phase; bit k of `parity` is barrier k's current
// phase parity.
constexpr int kBulkMaxChunks = 32;
struct BulkBarriers {
  uint64_t* bars = nullptr;
  uint32_t parity = 0;
};

__device__ __forceinline__ void fail_bad_target() {
  __assert_fail("class index target out of range: need 0 <= target < C or target == ignore_index",
                __FILE__, __LINE__, __func__);
}

// kBulk (a block or a cluster per row on sm_90 and newer, vector rows): the row's first
// vectors, as many as the row cache holds, are brought into it by the bulk-copy engine
// (bulk_copy.cuh) in chunks of whole multiples of the group size, each block copying its
// own share. Pass 1 reads them from there, in the same
// order and batches as it would have loaded them, so the results are the same bits; the
// backward (no pass 1) reads them in its cached loop. Uncached vectors are loaded as ever.
template <typename T, Mode kMode, class G, bool kVec, bool kBulk = false>
class SoftmaxRow {
  using acc_t = acc_of<T>;
  using V = Vec16<T>;
  static constexpr int kN = V::kVec;
  static constexpr int kU = GroupTraits<G>::kUnroll;
  // Pass-2 vector loads: the backward's only pass reads DRAM; otherwise pass 2 reads what
  // pass 1 just read (row cache or L2), with a shorter latency to cover.
  static constexpr int kU2 = kMode == Mode::Backward ? kU : 2;
  static constexpr int kUS = 4;  // scalar loads per batch
  static constexpr bool kGrad = kMode != Mode::Forward;
  // A row accumulated in float keeps its lse as hi + lo (RowLse, kernel_params.h; stored
  // as a double): `lse` below is hi; lo enters per row only (A, the loss, log p_t, the
  // smoothing sum).
  static constexpr bool kSplit = std::is_same_v<acc_t, float>;

  const SoftmaxLossParams& p;
  const G& grp;
  const Transform<acc_t>& tf;
  const int64_t r, C, sc;
  const int lane, gsize;
  const T* x;
  T* gx = nullptr;
  int64_t gsc = 1;
  const bool grad_vec;  // the gradient row is 16-byte aligned wherever the input row is
  const QReader<T> q;

  // Vector geometry: [0, head) scalar, head + [0, nvec * kN) vectors, [tail, C) scalar.
  int64_t head = 0, nvec = 0, tail = 0;
  uint4* cache;
  int64_t cache_n = 0;
  // The next row this group takes, to prefetch into L2 before pass 2 (null: none).
  const T* next_x;
  int64_t prefetch_n = 0;
  // kBulk: the barriers, the chunk size in vectors, and the cache vectors [0, ready_end)
  // known to have landed (chunks [0, ready_chunk)).
  const BulkBarriers bulk;
  int64_t chunk_vecs = 0, ready_end = 0;
  int ready_chunk = 0;

  // Pass-2 state. The plain loop works in base 2 (exp2_shifted): lse2 = RN(lse log2 e) and
  // A2 = A base2_residual(lse, lse2), so A p_c = A2 exp2_shifted(s_c, lse2) (the folded
  // loop's lse2 is lse2 - log2 A2).
  acc_t lse = 0, A = 0, B = 0, D = 0, lse2 = 0, A2 = 0;
  acc_t lse_lo = 0;
  int64_t t = -1;
  // This thread stores the vector that holds the target element (vector v is always
  // thread v mod gsize's): it rewrites that element after pass 2 (write_target).
  bool owns_t = false;
  acc_t s_t = 0;  // the target logit, transformed as in the sums
  QKind q_grad = QKind::None, q_sum = QKind::None;
  bool need_sum = false;
  acc_t total = 0;

 public:
  __device__ __forceinline__ SoftmaxRow(const SoftmaxLossParams& p_, const G& g_,
                                        const Transform<acc_t>& tf_, int64_t r_, uint4* cache_,
                                        int64_t cache_cap, bool grad_vec_, const T* next_x_,
                                        int64_t prefetch_bytes, BulkBarriers bulk_ = {})
      : p(p_),
        grp(g_),
        tf(tf_),
        r(r_),
        C(p_.in.C),
        sc(p_.in.sc),
        lane(g_.lane()),
        gsize(g_.size()),
        x(static_cast<const T*>(p_.input) + p_.in.row_offset(r_)),
        grad_vec(grad_vec_),
        q(p_, r_),
        cache(cache_),
        next_x(next_x_),
        bulk(bulk_) {
    if (kGrad) {
      gx = static_cast<T*>(p.grad_input) + p.grad_layout.row_offset(r);
      gsc = p.grad_layout.sc;
    }
    if (kVec) {
      head = elems_to_alignment(x);
      if (head > C) head = C;
      nvec = (C - head) / kN;
      tail = head + nvec * kN;
      const int64_t cover = g_.cache_cover(cache_cap);
      cache_n = nvec < cover ? nvec : cover;
      if (kBulk) {
        // At most kBulkMaxChunks chunks, each a whole number of group sizes.
        // (At least one group size, also for an empty cache.)
        const int64_t per_chunk = (cache_n + kBulkMaxChunks - 1) / kBulkMaxChunks;
        chunk_vecs = gsize * (per_chunk > gsize ? (per_chunk + gsize - 1) / gsize : 1);
      }
      if (next_x != nullptr) {
        const int64_t row_bytes = C * static_cast<int64_t>(sizeof(T));
        prefetch_n = prefetch_bytes < row_bytes ? prefetch_bytes : row_bytes;
      }
    }
  }

  __device__ __forceinline__ void run() {
    // The backward's copies start first: its one pass reads them after the row's scalars.
    if constexpr (kBulk && kMode == Mode::Backward) start_bulk();
    bool ignored = false;
    if (!p.prob_target) {
      t = read_index(p, r);
      ignored = t == p.ignore_index;
      if (!ignored && (t < 0 || t >= C)) {
        fail_bad_target();
        ignored = true;  // not reached; never index with t
        t = -1;
      }
    }
    const bool counted = !p.prob_target && !ignored;
    if (kGrad && kVec && counted && t >= head && t < tail) {
      const auto t_vec = static_cast<uint64_t>(t - head) / kN;
      owns_t = t_vec % static_cast<uint64_t>(gsize) == static_cast<uint64_t>(lane);
    }
    const acc_t eps = static_cast<acc_t>(p.label_smoothing);
    const acc_t z = static_cast<acc_t>(p.z_loss);
    const acc_t* w = static_cast<const acc_t*>(p.weight);

    // The row's scalars are loaded before pass 1, whose loads hide their latency (after
    // the block's reduction they would stall every thread of the row).
    const acc_t wt = counted && w != nullptr ? w[t] : acc_t(1);
    const acc_t alpha_t = counted && p.focal ? focal_alpha<acc_t>(p, t) : acc_t(0);
    const bool has_g_lse = kMode == Mode::Backward && p.grad_lse.ptr != nullptr;
    acc_t g = 0, g_lse = 0;
    if (kGrad) {
      g = read_row_value<acc_t>(p.grad_loss, r);
      if (has_g_lse) g_lse = static_cast<acc_t>(read_row_value<double>(p.grad_lse, r));
    }

    // The target logit; its load overlaps pass 1. The owner of its vector reads it before
    // it writes anything (an in-place backward overwrites it).
    if (counted && (kMode != Mode::Backward || p.focal || owns_t)) {
      s_t = tf.apply(to_acc(x[t * sc]));
    }

    acc_t mass = 0;  // sum_c q_c of a probability target
    RowLse<acc_t> L;
    if (kMode != Mode::Backward) {
      LseState<acc_t> st;
      const bool with_mass = kMode == Mode::Fused && p.prob_target;
      pass1(st, mass, with_mass);
      grp.merge(st);
      L = lse_of<kSplit>(st.m, st.log_s());  // (hi: st.lse())
      if (with_mass) mass = grp.sum(mass);
    } else {
      L = split_lse<kSplit, acc_t>(static_cast<const double*>(p.lse_in)[r]);
      // A float row far from 0 (kernel_params.h's stored_lse_suffices) takes pass 1 again:
      // its stored double lost lo. The same value for the whole group (one row's lse), so
      // every thread takes the branch or none does. (float64 rows keep no lo here.)
      if (kSplit && !stored_lse_suffices(L.hi)) {
        LseState<acc_t> st;
        acc_t no_mass = 0;
        pass1(st, no_mass, false);
        grp.merge(st);
        L = lse_of<kSplit>(st.m, st.log_s());
      }
      if (p.prob_target) mass = grp.sum(mass_pass());
    }
    lse = L.hi;
    lse_lo = L.lo;

    const bool focal_ready = counted && p.focal;
    Focal<acc_t> focal;
    if (focal_ready) focal.compute(L.log_p(s_t), alpha_t, p.gamma);

    bool zero_row = false;
    if (kGrad) {
      if (p.prob_target) {
        // d/ds_c sum_k q_k (lse - s_k) = (sum_k q_k) p_c - q_c. (One class with a z-loss:
        // 0 for a finite logit, p = 1; mass * 0 keeps a non-finite target's nan. As the
        // CPU kernels'.)
        const bool one_class = C == 1 && z != 0;
        A = one_class ? g * (mass * acc_t(0)) : g * mass;
        if (z != 0) A += g * 2 * z * lse;
        if (has_g_lse) A += g_lse;
        D = one_class ? acc_t(0) : g;
        if (D != 0) q_grad = QKind::ProbTarget;
      } else if (ignored) {
        // Exact zeros unless the lse has a nonzero gradient, whatever the logits hold
        // (0 * p would be NaN for a NaN, +inf or all -inf row).
        if (has_g_lse && g_lse != acc_t(0)) {
          A = g_lse;
        } else {
          zero_row = true;
        }
      } else {
        if (focal_ready) {
          A = g * focal.factor;
          B = g * focal.factor;
        } else {
          acc_t coef = (acc_t(1) - eps) * wt;
          if (eps > 0) {
            const acc_t W = p.weight_sum != nullptr ? *static_cast<const acc_t*>(p.weight_sum)
                                                    : static_cast<acc_t>(C);
            coef += eps / static_cast<acc_t>(C) * W;
            D = g * (eps / static_cast<acc_t>(C));
            if (D != 0) q_grad = w != nullptr ? QKind::Weight : QKind::One;
          }
          if (C == 1 && z != 0) {
            // One class: lse = s, so only the z-loss's 2 z lse p is left of the gradient
            // (coef (p - 1) is 0 for a finite logit); formed alone, without the
            // cancellation of (coef + 2 z lse) p - coef. coef * 0 keeps a non-finite
            // weight's nan. As the CPU kernels' index_row_coef (which says why only with
            // a z-loss).
            coef = coef * acc_t(0) + 2 * z * lse;
            D = 0;
            q_grad = QKind::None;
            A = g * coef;
            B = 0;
          } else {
            if (z != 0) coef += 2 * z * lse;
            A = g * coef;
            B = g * ((acc_t(1) - eps) * wt);
          }
        }
        if (has_g_lse) A += g_lse;
      }
      // p_c = exp(s_c - hi) exp(-lo): the loops below use hi
      if constexpr (kSplit) {
        A *= L.correction();
      }
    }
    if (!counted) t = -1;  // no target element in the gradient

    if (kMode != Mode::Backward) {
      need_sum = p.prob_target || (counted && eps > 0);
      q_sum = p.prob_target ? QKind::ProbTarget : (w != nullptr ? QKind::Weight : QKind::One);
    }

    // Pass 1 of this row is done (or there is none): the next row's first lines can come
    // into L2 while this one's pass 2 runs, so its pass 1 starts without DRAM latency.
    if (kVec && next_x != nullptr) prefetch_l2(next_x, prefetch_n, lane, gsize);

    if (kGrad && zero_row) {
      // The bulk backward's copies still read the row: in place, no zero may land first.
      if constexpr (kBulk && kMode == Mode::Backward) await_all();
      write_zero_row();
    } else if (kGrad || need_sum) {
      // The common rows have loops of their own, the same formulas without the
      // per-element option branches, which cost more instructions than the math (an H200
      // profile: the fused kernel issue-bound at ~44 instructions per element). The choice
      // depends on the row's options and on lse and A, never on the mode (the separate
      // backward reads the lse the forward wrote, and forms the same A), so the fused and
      // split paths of a row run the same loop and agree bitwise.
      lse2 = lse * kLog2e<acc_t>;
      A2 = A * base2_residual(lse, lse2);
      Loop loop = loop_of(counted, eps, w);
      if constexpr (sizeof(T) == 2) {
        if (loop == Loop::Plain && A2 > acc_t(0)) {
          const acc_t folded = lse2 - log2_fast(A2);
          if (fabsf(folded) <= acc_t(128)) {
            lse2 = folded;
            loop = Loop::Folded;
          }
        }
      }
      switch (loop) {
        case Loop::Plain:
          pass2<Loop::Plain>();
          break;
        case Loop::Folded:
          if constexpr (sizeof(T) == 2) pass2<Loop::Folded>();
          break;
        case Loop::Smooth:
          pass2<Loop::Smooth>();
          break;
        default:
          pass2<Loop::Generic>();
          break;
      }
      if (need_sum) {
        total = grp.sum(total);
        // the smooth loop summed hi - s_c over the row's C classes (- (0 - lo) C: as
        // RowLse::minus, no change for lo = 0)
        if (kSplit && loop == Loop::Smooth) {
          total -= (acc_t(0) - lse_lo) * static_cast<acc_t>(C);
        }
      }
    }
    // Every chunk has landed before any thread leaves the row, also where pass 2 read none
    // (an ignored row's zeros).
    if constexpr (kBulk && kMode == Mode::Backward) await_all();

    if (kMode != Mode::Backward && lane == 0) {
      acc_t l;
      if (p.prob_target) {
        l = total;
        if (z != 0) l += z * lse * lse;
      } else if (ignored) {
        l = 0;
      } else if (focal_ready) {
        l = focal.loss;
      } else {
        const acc_t nll = L.minus(s_t);
        l = (acc_t(1) - eps) * (wt * nll);  // wt = 1 without weights: exactly nll
        if (eps > 0) l += eps / static_cast<acc_t>(C) * total;
        if (z != 0) l += z * lse * lse;
      }
      static_cast<acc_t*>(p.loss)[r] = l;
      static_cast<double*>(p.lse)[r] = stored_lse<kSplit>(L);
    }
  }

  // kBulk: the barriers this row armed (one phase each), as a mask of their indices.
  __device__ __forceinline__ uint32_t bulk_chunks_mask() const {
    const int64_t n = (cache_n + chunk_vecs - 1) / chunk_vecs;
    return n >= kBulkMaxChunks ? ~0u : (1u << n) - 1u;
  }

 private:
  __device__ __forceinline__ acc_t load_scalar(int64_t c) const { return to_acc(x[c * sc]); }

  // ---- pass 1: online log-sum-exp (and the target mass of the fused probability case) ----

  __device__ __forceinline__ void pass1(LseState<acc_t>& st, acc_t& mass, bool with_mass) {
    // (the backward starts its row's copies itself, before its scalars)
    if constexpr (kBulk && kMode != Mode::Backward) start_bulk();
    if (kVec) {
      // At most one head and one tail element per thread (both fewer than kN <= 32).
      acc_t ends[2];
      const int64_t ch = lane, ct = tail + lane;
      ends[0] = lane < head ? tf.apply(load_scalar(ch)) : neg_inf<acc_t>();
      ends[1] = ct < C ? tf.apply(load_scalar(ct)) : neg_inf<acc_t>();
      st.add(ends);
      if (with_mass) {
        if (lane < head) mass += q.prob(ch);
        if (ct < C) mass += q.prob(ct);
      }
      // The logit transform and the target mass have a loop of their own: in the common
      // rows' loop their per-vector tests would cost more than the math. The choice tests
      // p.prob_target, not with_mass (fused only): the forward of a probability target sums
      // its row in the same order as the fused kernel, so their lse agree bitwise.
      if (tf.active() || p.prob_target) {
        pass1_vectors<true>(st, mass, with_mass);
      } else {
        pass1_vectors<false>(st, mass, false);
      }
      // Every chunk has landed before any thread leaves the row (the next row's copies
      // reuse the barriers and the cache).
      if constexpr (kBulk) await_all();
    } else {
      const int64_t step = static_cast<int64_t>(gsize) * kUS;
      for (int64_t c0 = lane; c0 < C; c0 += step) {
        acc_t e[kUS];
#pragma unroll
        for (int u = 0; u < kUS; ++u) {
          const int64_t c = c0 + static_cast<int64_t>(u) * gsize;
          e[u] = c < C ? load_scalar(c) : neg_inf<acc_t>();
        }
        if (tf.active()) {
#pragma unroll
          for (int u = 0; u < kUS; ++u) {
            const int64_t c = c0 + static_cast<int64_t>(u) * gsize;
            if (c < C) e[u] = tf.apply(e[u]);
          }
        }
        st.add(e);
        if (with_mass) {
#pragma unroll
          for (int u = 0; u < kUS; ++u) {
            const int64_t c = c0 + static_cast<int64_t>(u) * gsize;
            if (c < C) mass += q.prob(c);
          }
        }
      }
    }
  }

  // kBulk: once every thread of the block is done with the previous row's cache, the
  // block's first warp starts the copies of this row's cached vectors that are the
  // block's: lane k arms barrier k and copies chunk k (vectors [k chunk_vecs, (k + 1)
  // chunk_vecs)), so the chunks start together rather than one after another. In each
  // segment of gsize vectors the block's share is one run (grp.block_share_*), which goes
  // to the slots from j * share length for segment j, where the threads' own loads would
  // have put it (cache_slot).
  __device__ __forceinline__ void start_bulk() {
    static_assert(kBulkMaxChunks <= 32, "a lane of the first warp per chunk");
    __syncthreads();
    const int k = static_cast<int>(threadIdx.x);
    const int64_t a = static_cast<int64_t>(k) * chunk_vecs;
    if (k >= kBulkMaxChunks || a >= cache_n) return;  // blocks have 32 threads or more
    async_proxy_fence();
    const T* xv = x + head;
    const int64_t off = grp.block_share_offset(), len = grp.block_share_length();
    const int64_t b = a + chunk_vecs < cache_n ? a + chunk_vecs : cache_n;
    if (len == gsize) {  // the block's share is every segment whole: one copy
      const auto bytes = static_cast<uint32_t>((b - a) * sizeof(uint4));
      mbar_expect(bulk.bars + k, bytes);
      bulk_load(cache + a, xv + a * kN, bytes, bulk.bars + k);
      return;
    }
    // The run of segment j within [a, b): vectors [f, e), empty when e <= f.
    const auto run = [&](int64_t j, int64_t& f, int64_t& e) {
      f = j * gsize + off;
      e = f + len < b ? f + len : b;
    };
    uint32_t bytes = 0;
    for (int64_t j = a / gsize, f, e; j * gsize < b; ++j) {
      run(j, f, e);
      if (e > f) bytes += static_cast<uint32_t>((e - f) * sizeof(uint4));
    }
    mbar_expect(bulk.bars + k, bytes);
    for (int64_t j = a / gsize, f, e; j * gsize < b; ++j) {
      run(j, f, e);
      if (e > f) {
        bulk_load(cache + j * len, xv + f * kN, static_cast<uint32_t>((e - f) * sizeof(uint4)),
                  bulk.bars + k);
      }
    }
  }

  // kBulk: waits until cached vector v (< cache_n) has landed, and every one before it.
  // Compared in v's own width: the 32-bit cached loop's test costs two instructions less.
  template <typename I>
  __device__ __forceinline__ void await(I v) {
    while (v >= static_cast<I>(ready_end)) {
      mbar_wait(bulk.bars + ready_chunk, (bulk.parity >> ready_chunk) & 1u);
      ++ready_chunk;
      ready_end += chunk_vecs;
    }
  }

  // kBulk: waits until every cached vector of the row has landed.
  __device__ __forceinline__ void await_all() {
    if (cache_n > 0) await(cache_n - 1);
  }

  // Pass 1's vector v: from global memory, or with kBulk from the row cache once there.
  __device__ __forceinline__ uint4 fetch(const T* xv, int64_t v) {
    if (kBulk && v < cache_n) {
      await(v);
      return cache[grp.cache_slot(v)];
    }
    return V::load(xv + v * kN);
  }

  // Pass 1's vectors, kU loads in flight per thread. Block rows without a transform or a
  // mass take whole batches (every vector in range) through pass1_whole_batches (in a warp
  // per row's kernels it would spill registers, for rows of at most 4 KiB). What is left,
  // the one partial batch at the row's end or every batch of the other rows, goes vector
  // by vector, each vector's work behind its own range test, as its load is: with those
  // branches ptxas issues all of a batch's loads before any of their consumers (a version
  // without them had the cache store of the first vector waiting on its load ahead of the
  // later loads). A thread adds its vectors in ascending order.
  template <bool kOpts>
  __device__ __forceinline__ void pass1_vectors(LseState<acc_t>& st, acc_t& mass,
                                                bool with_mass) {
    const T* xv = x + head;
    const int64_t step = static_cast<int64_t>(gsize) * kU;
    int64_t v0 = lane;
    if constexpr (!kOpts && G::kUsesBarriers) v0 = pass1_whole_batches(st);
    for (; v0 < nvec; v0 += step) {
      uint4 raw[kU];
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int64_t v = v0 + static_cast<int64_t>(u) * gsize;
        if (v < nvec) raw[u] = fetch(xv, v);
      }
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int64_t v = v0 + static_cast<int64_t>(u) * gsize;
        if (v < nvec) pass1_vector<kOpts>(st, mass, with_mass, raw[u], v);
      }
    }
  }

  // The whole batches of a row without transform or mass: one online-max update for all
  // kU * kN values (compared while still packed), one tree sum of their exponentials, and
  // the cache stores. Vector by vector, the update's compare, exp and branch cost about as
  // much as the eight terms. Returns the first batch start that is not whole.
  __device__ __forceinline__ int64_t pass1_whole_batches(LseState<acc_t>& st) {
    const T* xv = x + head;
    const int64_t step = static_cast<int64_t>(gsize) * kU;
    const int64_t whole_end = nvec - static_cast<int64_t>(kU - 1) * gsize;
    // A batch's vectors all have cache slots while v0 < cached_end; the slots of the
    // batch at v0 start at `slot`, which moves kU cache steps per batch.
    const int64_t cached_end = cache_n - static_cast<int64_t>(kU - 1) * gsize;
    const int cstep = static_cast<int>(grp.cache_step());
    uint4* slot = cache + grp.cache_slot(lane);
    int64_t v0 = lane;
    for (; v0 < whole_end; v0 += step, slot += kU * cstep) {
      uint4 raw[kU];
      if (kBulk && v0 < cached_end) {  // the whole batch from the row cache
        await(v0 + static_cast<int64_t>(kU - 1) * gsize);
#pragma unroll
        for (int u = 0; u < kU; ++u) raw[u] = slot[u * cstep];
      } else {
#pragma unroll
        for (int u = 0; u < kU; ++u) raw[u] = fetch(xv, v0 + static_cast<int64_t>(u) * gsize);
      }
      const bool live = st.raise_max(max_nan_packed<T>(raw));
      // The stores wait on a condition known only once every load of the batch is in
      // (always true: s is a sum of exponentials, or NaN). On a condition known earlier,
      // ptxas moves each store up after its own load, where it waits for that load before
      // the next load can issue.
      if (!kBulk && !(st.s < acc_t(0))) cache_batch(raw, v0, slot, cstep, v0 < cached_end);
      if (live) {
        // In base 2 (device_math.cuh's exp2_shifted), as pass 2's plain loop: one fma and
        // one ex2 per value. A row whose maximum is infinite, NaN or beyond about 7e8
        // (!base2_ok) leaves for the vector by vector loop in base e, from this batch on
        // (its maximum is already in st).
        const acc_t m2 = st.m * kLog2e<acc_t>;
        if (!base2_ok(m2)) break;
        acc_t e[kU * kN];
#pragma unroll
        for (int u = 0; u < kU; ++u) {
          acc_t one[kN];
          V::unpack(raw[u], one);
#pragma unroll
          for (int j = 0; j < kN; ++j) e[u * kN + j] = exp2_shifted(one[j], m2);
        }
        st.s += base2_residual(st.m, m2) * tree_reduce(e, [](acc_t a, acc_t b) { return a + b; });
      }
    }
    return v0;
  }

  // Stores a whole batch's vectors v0 + u * gsize in their cache slots, where they have one
  // (vector v0 + u * gsize is `step` = cache_step() slots after v0's, for every group; v0's
  // is `slot`; `all`: every vector of the batch has one).
  __device__ __forceinline__ void cache_batch(const uint4 (&raw)[kU], int64_t v0, uint4* slot,
                                              int step, bool all) {
    if (all) {  // most batches
#pragma unroll
      for (int u = 0; u < kU; ++u) slot[u * step] = raw[u];
    } else {
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        if (v0 + static_cast<int64_t>(u) * gsize < cache_n) slot[u * step] = raw[u];
      }
    }
  }

  // Adds q_c of vector v's classes in ascending order: pass 1 and mass_pass alike, so the
  // fused forward and the backward sum the mass in one order.
  __device__ __forceinline__ void add_mass(acc_t& mass, int64_t v) const {
    const int64_t c0 = head + v * kN;
    for (int j = 0; j < kN; ++j) mass += q.prob(c0 + j);
  }

  template <bool kOpts>
  __device__ __forceinline__ void pass1_vector(LseState<acc_t>& st, acc_t& mass, bool with_mass,
                                               const uint4& raw, int64_t v) {
    if (!kBulk && v < cache_n) cache[grp.cache_slot(v)] = raw;
    acc_t e[kN];
    V::unpack(raw, e);
    if (kOpts && tf.active()) {
#pragma unroll
      for (int j = 0; j < kN; ++j) e[j] = tf.apply(e[j]);
    }
    st.add(e);
    if (kOpts && with_mass) add_mass(mass, v);
  }

  // Backward with a probability target: sum_c q_c before any gradient element, each thread
  // adding its classes in pass1's order, so the separate backward and the fused forward
  // give the same bits.
  __device__ __forceinline__ acc_t mass_pass() const {
    acc_t mass = 0;
    if (kVec) {
      if (lane < head) mass += q.prob(lane);
      if (tail + lane < C) mass += q.prob(tail + lane);
      for (int64_t v = lane; v < nvec; v += gsize) add_mass(mass, v);
    } else {
      for (int64_t c = lane; c < C; c += gsize) mass += q.prob(c);
    }
    return mass;
  }

  // ---- pass 2: gradient and/or smoothing sum ----

  // Pass 2's loop for a row:
  //   Plain   no logit transform, no q_c term, no smoothing sum (plain and weighted
  //           cross-entropy, z-loss, focal): A p_c, in base 2 (A2, lse2)
  //   Folded  a plain row of a 16-bit gradient with A2 > 0: A2 p_c = 2^(s_c log2 e -
  //           (lse2 - log2 A2)), no multiply. The offset lse2 - log2 A2 is rounded once
  //           more, by at most 2^-17 while it is within 128 (5e-6 relative: the gradient
  //           is rounded to 8 or 11 bits); beyond, the plain loop.
  //   Smooth  label smoothing without weights or transform, class-index target:
  //           A p_c - D, and the smoothing sum of lse - s_c
  //   Generic anything else (probability targets, weighted smoothing, softcap, scale, and
  //           rows whose lse2 is not base2_ok).
  enum class Loop { Plain, Folded, Smooth, Generic };

  // The plain loop shifts by lse2 in base 2 where base2_ok(lse2): |lse| below about 7e8
  // (else the generic loop, base e).
  __device__ __forceinline__ Loop loop_of(bool counted, acc_t eps, const acc_t* w) const {
    if (tf.active() || p.prob_target) return Loop::Generic;
    if (!counted || eps == acc_t(0)) {  // no q_c term and no sum
      return base2_ok(lse2) ? Loop::Plain : Loop::Generic;
    }
    return w == nullptr ? Loop::Smooth : Loop::Generic;
  }

  // Gradient of one non-target element (s transformed, column c); adds its share of the
  // smoothing sum. What the generic form reduces to in the special loops: D = 0 where the
  // smooth rows have no q_c term (x - 0 == x), and need_sum only where they sum.
  template <Loop kLoop>
  __device__ __forceinline__ acc_t element(acc_t s, int64_t c) {
    if constexpr (kLoop == Loop::Plain) return A2 * exp2_shifted(s, lse2);
    if constexpr (kLoop == Loop::Folded) return exp2_shifted(s, lse2);
    if constexpr (kLoop == Loop::Smooth) {
      const acc_t d = s - lse;
      if (need_sum) total -= d;  // total += lse - s exactly: negation does not round
      return kGrad ? A * exp_fast(d) - D : acc_t(0);
    }
    const QKind qk = q_sum != QKind::None ? q_sum : q_grad;
    const acc_t qc = qk != QKind::None ? q(qk, c) : acc_t(0);
    if (need_sum) {
      const acc_t d = kSplit ? (lse - s) - (acc_t(0) - lse_lo) : lse - s;  // RowLse::minus
      total += q_sum == QKind::One ? d : qc * d;
    }
    if (!kGrad) return acc_t(0);
    const acc_t gv = q_grad != QKind::None ? A * exp_fast(s - lse) - D * qc : A * exp_fast(s - lse);
    return tf.active() ? gv * tf.deriv(s) : gv;
  }

  // The target element's gradient, with p_t - 1 formed in acc precision before rounding.
  template <Loop kLoop>
  __device__ __forceinline__ acc_t target_element(acc_t s) const {
    if constexpr (kLoop == Loop::Plain) return A2 * exp2_shifted(s, lse2) - B;
    if constexpr (kLoop == Loop::Folded) return exp2_shifted(s, lse2) - B;
    if constexpr (kLoop == Loop::Smooth) return A * exp_fast(s - lse) - D - B;
    const acc_t qt = q_grad != QKind::None ? q(q_grad, t) : acc_t(0);
    const acc_t gv = A * exp_fast(s - lse) - D * qt - B;
    return tf.active() ? gv * tf.deriv(s) : gv;
  }

  template <Loop kLoop>
  __device__ __forceinline__ void scalar_element(int64_t c, acc_t raw) {
    const acc_t s = kLoop == Loop::Generic ? tf.apply(raw) : raw;
    acc_t gv = element<kLoop>(s, c);
    if (kGrad && c == t) gv = target_element<kLoop>(s);
    if (kGrad) gx[c * gsc] = from_acc<T>(gv);
  }

  template <Loop kLoop>
  __device__ __forceinline__ void vector_element(const uint4& raw, int64_t v, T* gxv) {
    acc_t s[kN], out[kN];
    V::unpack(raw, s);
    const int64_t c0 = head + v * kN;
#pragma unroll
    for (int j = 0; j < kN; ++j) {
      if (kLoop == Loop::Generic) s[j] = tf.apply(s[j]);
      out[j] = element<kLoop>(s[j], c0 + j);
    }
    if (!kGrad) return;
    if (grad_vec) {
      V::store_streaming(gxv + v * kN, V::pack(out));
    } else {
#pragma unroll
      for (int j = 0; j < kN; ++j) gx[(c0 + j) * gsc] = from_acc<T>(out[j]);
    }
  }

  template <Loop kLoop>
  __device__ __forceinline__ void pass2() {
    if (kVec) {
      if (lane < head) scalar_element<kLoop>(lane, load_scalar(lane));
      if (tail + lane < C) scalar_element<kLoop>(tail + lane, load_scalar(tail + lane));
      const T* xv = x + head;
      T* gxv = kGrad && grad_vec ? gx + head : nullptr;
      // Uncached vectors, last-read first (most likely still in L2): whole batches (every
      // vector uncached) without per-vector range tests, then at most one partial batch.
      if (nvec > lane) {
        const int64_t last = lane + ((nvec - 1 - lane) / gsize) * gsize;
        const int64_t step = static_cast<int64_t>(gsize) * kU2;
        const int64_t whole_end = cache_n + static_cast<int64_t>(kU2 - 1) * gsize;
        int64_t v0 = last;
        for (; v0 >= whole_end; v0 -= step) {
          uint4 raw[kU2];
#pragma unroll
          for (int u = 0; u < kU2; ++u) {
            raw[u] = V::load_last(xv + (v0 - static_cast<int64_t>(u) * gsize) * kN);
          }
#pragma unroll
          for (int u = 0; u < kU2; ++u) {
            vector_element<kLoop>(raw[u], v0 - static_cast<int64_t>(u) * gsize, gxv);
          }
        }
        if (v0 >= cache_n) {
          uint4 raw[kU2];
#pragma unroll
          for (int u = 0; u < kU2; ++u) {
            const int64_t v = v0 - static_cast<int64_t>(u) * gsize;
            if (v >= cache_n) raw[u] = V::load_last(xv + v * kN);
          }
#pragma unroll
          for (int u = 0; u < kU2; ++u) {
            const int64_t v = v0 - static_cast<int64_t>(u) * gsize;
            if (v >= cache_n) vector_element<kLoop>(raw[u], v, gxv);
          }
        }
      }
      // Cached vectors: this thread wrote exactly these slots in pass 1, or (the bulk
      // backward) the bulk copies did, which it waits for. The plain backward has no pass
      // 1, hence no cache and no loop for one.
      // 32-bit indices: a cache covers fewer vectors than shared memory has 16-byte slots
      // in a cluster's blocks (< 2^18), and 64-bit ones cost a third of the loop's
      // bookkeeping instructions.
      if constexpr (kMode != Mode::Backward || kBulk) {
        const int n = static_cast<int>(cache_n);
        const int step = static_cast<int>(grp.cache_step());
        int slot = static_cast<int>(grp.cache_slot(lane));
        for (int v = lane; v < n; v += gsize, slot += step) {
          if constexpr (kMode == Mode::Backward) await(v);
          vector_element<kLoop>(cache[slot], v, gxv);
        }
      }
      if (owns_t) write_target<kLoop>();
    } else {
      const int64_t step = static_cast<int64_t>(gsize) * kUS;
      for (int64_t c0 = lane; c0 < C; c0 += step) {
        acc_t e[kUS];
#pragma unroll
        for (int u = 0; u < kUS; ++u) {
          const int64_t c = c0 + static_cast<int64_t>(u) * gsize;
          if (c < C) e[u] = load_scalar(c);
        }
#pragma unroll
        for (int u = 0; u < kUS; ++u) {
          const int64_t c = c0 + static_cast<int64_t>(u) * gsize;
          if (c < C) scalar_element<kLoop>(c, e[u]);
        }
      }
    }
  }

  // The target element of a vector row, stored over the plain gradient its vector got, so
  // that the vector loops carry no per-vector test for it (in sm_90a SASS that test, and
  // the register copies its branch forced, took up to 14 of ~50 instructions per vector).
  // This thread stored that vector, so this store lands last; same formula, same bits.
  template <Loop kLoop>
  __device__ __forceinline__ void write_target() {
    gx[t * gsc] = from_acc<T>(target_element<kLoop>(s_t));
  }

  __device__ __forceinline__ void write_zero_row() {
    const T zero = zero_of<T>();
    if (kVec && grad_vec) {
      if (lane < head) gx[lane] = zero;
      if (tail + lane < C) gx[tail + lane] = zero;
      T* gxv = gx + head;
      const uint4 zv = make_uint4(0, 0, 0, 0);  // +0.0 in every format
      for (int64_t v = lane; v < nvec; v += gsize) V::store_streaming(gxv + v * kN, zv);
    } else {
      for (int64_t c = lane; c < C; c += gsize) gx[c * gsc] = zero;
    }
  }
};

// kVec: the classes are contiguous (in.sc == 1); rows are read with 16-byte loads after
// peeling up to the first 16-byte boundary. grad_vec: the gradient can be stored the same
// way (same offset modulo 16 bytes in every row), else it is stored element by element;
// either way the reduction order, hence every output bit, depends on the input alone.
// cache_vecs: 16-byte slots of the shared-memory row cache per group (0 = no cache);
// dynamic shared memory holds (groups per block) * cache_vecs slots. The plain backward has
// no first pass to fill a cache, so it ignores one even if a launcher passes it.
// prefetch_bytes: on the vector path of a block per row, each row asks L2 for that many
// bytes (at most the row) of the block's next row (0 = none; a hint, no result depends on
// it).
// kBulk: the cached part of each row is brought into the row cache by the bulk-copy engine
// (SoftmaxRow), for pass 1, or for the backward's one pass (an in-place backward writes a
// chunk's gradient only after the chunk has landed); sm_90 and newer, a block or a cluster
// per row, vector rows only.
template <typename T, Mode kMode, class G, bool kVec, bool kBulk = false>
__global__ void __launch_bounds__(GroupTraits<G>::kMaxThreads, GroupTraits<G>::kMinBlocks)
    softmax_loss_kernel(const __grid_constant__ SoftmaxLossParams p, int64_t cache_vecs,
                        bool grad_vec, int64_t prefetch_bytes) {
  static_assert(!kBulk || (kVec && G::kUsesBarriers),
                "bulk loads serve the vector path of a block or a cluster per row");
  extern __shared__ uint4 tlf_row_cache[];
  BulkBarriers bulk;
  if constexpr (kBulk) {
    __shared__ uint64_t tlf_bulk_bars[kBulkMaxChunks];
    bulk.bars = tlf_bulk_bars;
    if (threadIdx.x == 0) {
      for (int k = 0; k < kBulkMaxChunks; ++k) mbar_init(tlf_bulk_bars + k);
      mbar_init_fence();
    }
    __syncthreads();
  }
  const G grp;
  const Transform<acc_of<T>> tf(p.logit_scale, p.softcap);
  uint4* cache = tlf_row_cache + static_cast<int64_t>(grp.slot()) * cache_vecs;
  const int64_t rows = p.in.B * p.in.D;
  // Only a block per row prefetches (the launcher gives the others none): a warp's row is
  // at most 4 KiB, and the registers are better kept for its loads.
  constexpr bool kPrefetch = kVec && G::kUsesBarriers;
  const T* input = static_cast<const T*>(p.input);
  for (int64_t r = grp.first(); r < rows; r += grp.stride()) {
    const int64_t next = r + grp.stride();
    const T* next_x = kPrefetch && prefetch_bytes > 0 && next < rows
                          ? input + p.in.row_offset(next)
                          : nullptr;
    SoftmaxRow<T, kMode, G, kVec, kBulk> row(p, grp, tf, r, cache,
                                             kMode == Mode::Backward && !kBulk ? 0 : cache_vecs,
                                             grad_vec, next_x, prefetch_bytes, bulk);
    row.run();
    if constexpr (kBulk) bulk.parity ^= row.bulk_chunks_mask();
  }
  if constexpr (std::is_same_v<G, ClusterGroup>) grp.finish();
}

}  // namespace tlf::cuda
