// Short rows laid across memory: (B, C, D) logits whose rows (b, d) are adjacent in d and
// whose classes are D apart (an (N, C, H, W) segmentation map, contiguous). Included by
// kernels_impl.h inside its capability's namespace, after the row kernels' helpers.
//
// The row kernels gather each such row's C classes one by one and pay their per-row
// passes, reductions across vector lanes and conversions for a few classes: 3-8x slower
// than F on (8, 21, 128, 128). Here a tile of up to W rows (consecutive d of one plane) is
// one lane each: each class of the tile is one contiguous load of W values, converted and
// transformed into a scratch tile [c][lane] once; the max and the sum of exponentials run
// down the classes, lane-wise; the gradient is stored a class (W contiguous values) at a
// time. A lane's results depend on its row alone, never on which lanes share its tile,
// so the bits do not depend on how a call's rows are split over threads. A probability
// target is loaded into a second tile [c][lane] (as q_c = t'_c w_c), its sums run down
// the classes as the max's do.
//
// The gradient is the row kernels' formula element for element (row_grad,
// write_row_grad): A exp(s - hi) [- D q_c] [* ds/dx], the target's A exp(s_t - hi) - D q_t
// - B (times its ds/dx), ignored rows +0. The per-row terms that take a transcendental
// function (the target's exp; focal loss's exp, expm1 and pow) are formed a vector of
// lanes at a time (ColumnTile::finish_lanes), where the row kernels call the library once
// per row: a few-class row's time went mostly to those calls. The fused forward here and
// the split backward (both these kernels: column_layout decides alike for both) make the
// same bits. The lse, a sum down the classes in another order than a row's, and those
// vector functions may differ from the row kernels' in the last bit for the same logits
// in another layout.
#ifndef CPU_CAPABILITY
#error "column_rows_impl.h is included by kernels_impl.h"
#endif

// Rows per tile: two vectors of the accumulation type (a bf16/fp16 vector's width in float).
template <typename acc_t>
constexpr int64_t kColumnLanes = 2 * Vectorized<acc_t>::size();
// Classes up to which rows laid across memory take the column kernels: the scratch tile
// (C x kColumnLanes values) then stays within L1/L2 (32 KiB of floats on AVX-512).
constexpr int64_t kColumnMaxClasses = 256;
// Classes up to which any other rows (contiguous (N, C) rows, channels-last maps) take
// them too, their lanes gathered and scattered element by element: shorter rows than the
// row kernels' passes pay for (a (65536, 2) forward+backward was 0.6x F's).
constexpr int64_t kShortRowClasses = 32;

// The element distance between a tile's adjacent lanes (rows r and r + 1 of one plane).
inline int64_t lane_stride(const RowLayout& l) { return l.D > 1 ? l.sd : l.sb; }

// Whether p's rows take the column kernels: rows laid across memory (D > 1, adjacent rows
// sd = 1, classes apart; with a gradient, laid out alike) or short rows of any layout,
// with class-index or probability targets (a probability target in any layout: its tile
// is gathered as the logits' is).
inline bool column_layout(const SoftmaxLossParams& p, bool with_grad) {
  const auto across = [&](const RowLayout& l) { return l.D > 1 && l.sd == 1 && l.sc != 1; };
  if (p.in.C < 1) return false;
  if (p.in.C <= kShortRowClasses) return true;
  return across(p.in) && p.in.C <= kColumnMaxClasses && (!with_grad || across(p.grad_layout));
}

// Focal's terms (kernels_impl.h) for a vector of lanes: the same formulas, branches as
// selects, with vector exp, expm1 and pow for the library's scalar calls. gamma = 0 gives
// cross-entropy's values exactly, as Focal does (no function is called then).
template <typename acc_t>
struct FocalLanes {
  using V = Vectorized<acc_t>;
  V log_pt, alpha_t, pt, q, q_pow, loss;
  acc_t gamma;
  FocalLanes(const V& log_pt_, const V& alpha_t_, acc_t gamma_)
      : log_pt(log_pt_), alpha_t(alpha_t_), pt(0), q(0), q_pow(1), gamma(gamma_) {
    if (gamma != 0) {
      pt = vexp_elementwise<acc_t>(log_pt);
      // (1 - p_t below p_t = 1/2, as Focal: expm1 only near p_t = 1)
      q = V::blendv(log_pt.expm1().neg(), V(acc_t(1)) - pt,
                    log_pt < V(acc_t(-0.6931471805599453)));
      q_pow = gamma == 1 ? q : gamma == 2 ? q * q : q.pow(V(gamma));
    }
    loss = (alpha_t * q_pow) * (V(acc_t(0)) - log_pt);
  }
  V factor() const {
    if (gamma == 0) return alpha_t;
    const V zero(acc_t(0));
    const V ratio = V::blendv(V(acc_t(-1)), log_pt / q, q > zero);
    const V corr = V::blendv(zero, V(gamma) * pt * ratio, pt > zero);
    return alpha_t * q_pow * (V(acc_t(1)) - corr);
  }
};

// A tile: up to kColumnLanes rows of one plane, their transformed logits [c][lane], and
// per-lane values the passes share.
template <typename acc_t>
struct ColumnTile {
  static constexpr int64_t W = kColumnLanes<acc_t>;
  std::vector<acc_t> s;  // C x W transformed logits
  alignas(64) acc_t M[W], S[W];
  // gradient coefficients per lane (row_grad's A, D, B folded as below)
  alignas(64) acc_t A[W], D[W], hi[W], target[W], gt[W], keep[W];
  // the rest of a lane's terms for finish_lanes: its lse's lo, its target's transformed
  // logit, B and q_t; for focal rows the loss gradient, lse gradient, exp(-lo), alpha_t,
  // and the loss it forms
  alignas(64) acc_t lo[W], st[W], B[W], qt[W], g[W], g_lse[W], corr[W], alpha[W], loss[W];
  int64_t t[W];  // the lanes' class-index targets (read_targets)
  alignas(64) acc_t lse_hi[W], lse_lo[W];  // the lanes' lse (lse_lanes)
  // probability targets: C x W weights q_c = t'_c w_c (load_prob_target), and per lane
  // sum_c q_c and sum_c q_c (lse - s_c) (prob_sums)
  std::vector<acc_t> q;
  alignas(64) acc_t mass[W], nll[W];

  explicit ColumnTile(int64_t C, bool prob_target = false)
      : s(static_cast<size_t>(C * W)), q(prob_target ? static_cast<size_t>(C * W) : 0) {}

  // Loads rows r0 .. r0 + k - 1 (one plane, adjacent) of x, transformed. Short rows read
  // one block a tile, element by element; the next tiles' blocks are prefetched. (A map's
  // C runs from C planes gained nothing from it: not kept.)
  template <typename scalar_t>
  void load(const SoftmaxLossParams& p, const scalar_t* x, int64_t r0, int64_t k,
            const Transform<acc_t>& tf) {
    const scalar_t* base = x + p.in.row_offset(r0);
    const int64_t ls = lane_stride(p.in);
    if (ls != 1 && p.in.sc == 1 && ls <= kShortRowClasses) {  // (a contiguous block)
      prefetch_ahead(base, k * ls * static_cast<int64_t>(sizeof(scalar_t)));
    }
    for (int64_t c = 0; c < p.in.C; ++c) {
      acc_t* dst = s.data() + c * W;
      load_block(base + c * p.in.sc, ls, k, dst);
      std::fill(dst + k, dst + W, acc_t(0));  // (lanes past the tile's rows: never stored)
      if (tf.active()) tf.apply(dst, W);
    }
  }

  // M and S per lane: the max down the classes, and the sum of exp(s - M); S = 0 where
  // M = -inf (no finite logit: each term exp(-inf) = 0, as row_lse skips them), and NaN
  // for a row holding NaN (the max propagates it), as row_lse's.
  void max_and_sum(int64_t C) {
    using V = Vectorized<acc_t>;
    constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
    for (int64_t j = 0; j < W; j += V::size()) {
      V m(kNegInf);
      for (int64_t c = 0; c < C; ++c) m = vmax(m, V::loadu(s.data() + c * W + j));
      V sum(acc_t(0));
      for (int64_t c = 0; c < C; ++c) sum = sum + vexp<acc_t>(V::loadu(s.data() + c * W + j) - m);
      sum = V::blendv(sum, V(acc_t(0)), m == V(kNegInf));
      m.store(M + j);
      sum.store(S + j);
    }
  }

  // Each lane's lse from M and S as lse_of(M, log S) forms it (hi + lo, lo 0 where hi is
  // not finite), a vector of lanes at a time, into lse_hi and lse_lo. A row's log was a
  // library call per lane, on each row's chain between its sums and its loss. (The
  // vector log may differ from std::log's in the last bit: the row kernels' lse of the
  // same logits in another layout could already, by its sums' order. The forward and the
  // backward's recomputation both take this one.)
  void lse_lanes() {
    using V = Vectorized<acc_t>;
    const V zero(acc_t(0));
    for (int64_t j = 0; j < W; j += V::size()) {
      const V m = V::loadu(M + j), log_s = V::loadu(S + j).log();
      const V h = m + log_s;
      const V b = h - m, a = h - b;
      const V lo = V::blendv(zero, (m - a) + (log_s - b), (h - h) == zero);
      h.store(lse_hi + j);
      lo.store(lse_lo + j);
    }
  }

  // Rows r0 .. r0 + k - 1 of p's probability target into q, as q_c = t'_c w_c with
  // t' = (1 - eps) t + eps / C (kernels_impl.h's load_prob_target, elementwise alike).
  template <typename scalar_t>
  void load_prob_target(const SoftmaxLossParams& p, int64_t r0, int64_t k) {
    if (p.target_is_float32 && !std::is_same_v<scalar_t, float>) {
      load_q(static_cast<const float*>(p.prob_target_ptr), p, r0, k);
    } else {
      load_q(static_cast<const scalar_t*>(p.prob_target_ptr), p, r0, k);
    }
  }

  template <typename target_t>
  void load_q(const target_t* target_ptr, const SoftmaxLossParams& p, int64_t r0, int64_t k) {
    using V = Vectorized<acc_t>;
    const RowLayout& tl = p.prob_target_layout;
    const target_t* base = target_ptr + tl.row_offset(r0);
    const int64_t ls = lane_stride(tl);
    const auto* w = static_cast<const acc_t*>(p.weight);
    const acc_t eps = static_cast<acc_t>(p.label_smoothing);
    const V keep_t(acc_t(1) - eps), add(eps / static_cast<acc_t>(p.in.C));
    for (int64_t c = 0; c < p.in.C; ++c) {
      acc_t* dst = q.data() + c * W;
      load_block(base + c * tl.sc, ls, k, dst);
      std::fill(dst + k, dst + W, acc_t(0));
      for (int64_t j = 0; j < W; j += V::size()) {
        V v = V::loadu(dst + j);
        if (eps > 0) v = v * keep_t + add;
        if (w != nullptr) v = v * V(w[c]);
        v.store(dst + j);
      }
    }
  }

  // Per lane, sum_c q_c into mass and (with_loss) sum_c q_c (lse - s_c) into nll, down
  // the classes, from the lanes' lse (lse_lanes).
  void prob_sums(int64_t C, bool with_loss) {
    using V = Vectorized<acc_t>;
    for (int64_t j = 0; j < W; j += V::size()) {
      V m(acc_t(0));
      for (int64_t c = 0; c < C; ++c) m = m + V::loadu(q.data() + c * W + j);
      m.store(mass + j);
      if (!with_loss) continue;
      // (lse - s as RowLse::minus: (hi - s) - (0 - lo))
      const V h = V::loadu(lse_hi + j), neg_lo = V(acc_t(0)) - V::loadu(lse_lo + j);
      V n(acc_t(0));
      for (int64_t c = 0; c < C; ++c) {
        n = n + V::loadu(q.data() + c * W + j) * ((h - V::loadu(s.data() + c * W + j)) - neg_lo);
      }
      n.store(nll + j);
    }
  }

  // Lane l's gradient coefficients for a probability target, as write_row_grad forms
  // them: A = g (sum_c q_c) [+ 2 z lse g] [+ g_lse], times exp(-lo), and D = g (q from
  // the tile). One class with a z-loss: A's mass term is mass * 0 and D = 0
  // (index_row_coef says why).
  void set_prob_coefficients(const SoftmaxLossParams& p, int64_t l, const RowLse<acc_t>& L,
                             acc_t g_loss, acc_t lse_grad, bool has_g_lse) {
    const acc_t z = static_cast<acc_t>(p.z_loss);
    const bool one_class = p.in.C == 1 && z != 0;
    acc_t a = one_class ? g_loss * (mass[l] * acc_t(0)) : g_loss * mass[l];
    if (z != 0) a += g_loss * 2 * z * L.hi;
    if (has_g_lse) a += lse_grad;
    A[l] = a * L.correction();
    D[l] = one_class ? acc_t(0) : g_loss;
    hi[l] = L.hi;
    target[l] = -1;
    gt[l] = 0;
    keep[l] = 1;
  }

  RowLse<acc_t> lse(int64_t l) const {
    RowLse<acc_t> L;
    L.hi = lse_hi[l];
    L.lo = lse_lo[l];
    return L;
  }

  // sum_c q_c (lse - s_c) per lane (row_weighted_nll_sum's, q = w or 1), for lane l.
  acc_t weighted_nll_sum(int64_t C, const acc_t* w, int64_t l, const RowLse<acc_t>& L) const {
    acc_t total = 0;
    for (int64_t c = 0; c < C; ++c) {
      const acc_t nll = L.minus(s[c * W + l]);
      total += w != nullptr ? w[c] * nll : nll;
    }
    return total;
  }

  // The gradient of lanes [0, k), a class at a time, into rows r0 .. of p.grad_input, from
  // the per-lane A, D, hi, target, gt and keep set by the caller (keep 0: an ignored row,
  // +0). smooth: D may be nonzero on some lane (q = w, or 1 without weights, or the
  // tile's q for a probability target). A fused forward's post scale (the upstream
  // guess) as row_grad applies it: to every element of a counted row, the target's too.
  template <typename scalar_t>
  void write_grad(const SoftmaxLossParams& p, int64_t r0, int64_t k, const Transform<acc_t>& tf,
                  bool smooth, const PostScale<scalar_t, acc_t>& post) {
    const acc_t* qt_tile = p.prob_target ? q.data() : nullptr;
    using V = Vectorized<acc_t>;
    const int64_t C = p.in.C;
    const auto* w = static_cast<const acc_t*>(p.weight);
    scalar_t* g = static_cast<scalar_t*>(p.grad_input) + p.grad_layout.row_offset(r0);
    const int64_t ls = lane_stride(p.grad_layout);
    // A map's whole tile of a class, W contiguous values, by streaming stores from
    // map_stream_threshold_bytes (the caller fences): an (8, 21, 128, 128) float32
    // forward+backward took 5.3 ms rather than 7.7-9.8 (AMD EPYC, 1 thread).
    const bool stream = ls == 1 && k == W && std::is_same_v<acc_t, float> &&
                        stream_gradient<scalar_t>(p, map_stream_threshold_bytes());
    alignas(64) acc_t out[W];
    for (int64_t c = 0; c < C; ++c) {
      const acc_t* sc = s.data() + c * W;
      const V vq(w != nullptr ? w[c] : acc_t(1)), vc(static_cast<acc_t>(c));
      for (int64_t j = 0; j < W; j += V::size()) {
        const V sv = V::loadu(sc + j), vD = V::loadu(D + j);
        V gv = V::loadu(A + j) * vexp<acc_t>(sv - V::loadu(hi + j));
        if (smooth) {
          // (row_grad subtracts D q only on rows where D != 0: 0 * q of a non-finite
          // weight would be NaN)
          const V minus = qt_tile != nullptr ? gv - vD * V::loadu(qt_tile + c * W + j)
                          : w != nullptr     ? gv - vD * vq
                                             : gv - vD;
          gv = V::blendv(gv, minus, vD != V(acc_t(0)));
        }
        if (tf.active()) gv = gv * tf.deriv(sv);
        gv = V::blendv(gv, V::loadu(gt + j), V::loadu(target + j) == vc);
        if (post.on) gv = post(gv);
        gv = V::blendv(V(acc_t(0)), gv, V::loadu(keep + j) != V(acc_t(0)));
        gv.store(out + j);
      }
      scalar_t* dst = g + c * p.grad_layout.sc;
      if constexpr (std::is_same_v<acc_t, float>) {
        if (stream_row(stream, dst)) {
          stream_block(out, k, dst);
          continue;
        }
      }
      store_block(out, k, dst, ls);
    }
  }

  // Lane l's terms for a focal row's loss (finish_lanes): t its target, ignored or not.
  void set_focal_lane(const SoftmaxLossParams& p, int64_t l, int64_t t, const RowLse<acc_t>& L) {
    const bool ignored = t == p.ignore_index;
    hi[l] = L.hi;
    lo[l] = L.lo;
    target[l] = ignored ? acc_t(-1) : static_cast<acc_t>(t);
    st[l] = ignored ? acc_t(0) : s[t * W + l];
    alpha[l] = ignored ? acc_t(0) : focal_alpha<acc_t>(p, t);
  }

  // Lane l's gradient coefficients, as write_row_grad / row_grad form them for an index
  // target t (ignored: keep 0 unless the lse has a gradient), g_loss the row's loss
  // gradient, lse_grad the lse's. The target's element gt, and a focal row's A and B, are
  // finish_lanes' to form.
  void set_coefficients(const SoftmaxLossParams& p, int64_t l, int64_t t, const RowLse<acc_t>& L,
                        acc_t g_loss, acc_t lse_grad, bool has_g_lse) {
    const acc_t c = L.correction();
    hi[l] = L.hi;
    lo[l] = L.lo;
    B[l] = qt[l] = D[l] = 0;
    st[l] = 0;
    if (t == p.ignore_index) {
      const bool through_lse = has_g_lse && lse_grad != 0;
      A[l] = through_lse ? lse_grad * c : acc_t(0);
      target[l] = -1;
      alpha[l] = g[l] = g_lse[l] = corr[l] = 0;
      keep[l] = through_lse ? acc_t(1) : acc_t(0);
      return;
    }
    keep[l] = 1;
    if (p.focal) {  // (finish_lanes forms A and B from Focal's factor)
      set_focal_lane(p, l, t, L);
      g[l] = g_loss;
      g_lse[l] = lse_grad;
      corr[l] = c;
      return;
    }
    // (the target logit index_row_coef takes is focal's only)
    IndexRowCoef<acc_t> kc = index_row_coef<acc_t>(p, t, L, g_loss, acc_t(0));
    if (has_g_lse) kc.A += lse_grad;
    const auto* w = static_cast<const acc_t*>(p.weight);
    const bool with_q = kc.D != 0 && w != nullptr, uniform_q = kc.D != 0 && w == nullptr;
    A[l] = kc.A * c;
    D[l] = kc.D;
    B[l] = kc.B;
    qt[l] = with_q ? w[t] : (uniform_q ? acc_t(1) : acc_t(0));
    target[l] = static_cast<acc_t>(t);
    st[l] = s[t * W + l];
  }

  // The lanes' per-row terms that take a transcendental function, a vector of lanes at a
  // time: focal rows' loss (into loss) and, with a gradient, their A = (g F [+ g_lse])
  // exp(-lo) and B = g F (index_row_coef's, F Focal's factor); then every counted lane's
  // target element gt = A exp(s_t - hi) - D q_t - B [times ds/dx] (target_grad's formula).
  void finish_lanes(const SoftmaxLossParams& p, const Transform<acc_t>& tf, bool with_grad,
                    bool has_g_lse) {
    using V = Vectorized<acc_t>;
    if (!p.focal && !with_grad) return;
    const V zero(acc_t(0));
    for (int64_t j = 0; j < W; j += V::size()) {
      const V sv = V::loadu(st + j), h = V::loadu(hi + j);
      const V counted = V::loadu(target + j) >= zero;
      V a = V::loadu(A + j), b = V::loadu(B + j);
      if (p.focal) {
        const FocalLanes<acc_t> fo((sv - h) - V::loadu(lo + j), V::loadu(alpha + j),
                                   static_cast<acc_t>(p.gamma));
        fo.loss.store(loss + j);
        if (with_grad) {
          const V gf = V::loadu(g + j) * fo.factor();
          const V ga = has_g_lse ? gf + V::loadu(g_lse + j) : gf;
          a = V::blendv(a, ga * V::loadu(corr + j), counted);
          b = V::blendv(b, gf, counted);
          a.store(A + j);
          b.store(B + j);
        }
      }
      if (!with_grad) continue;
      V e = a * vexp_elementwise<acc_t>(sv - h) - V::loadu(D + j) * V::loadu(qt + j) - b;
      if (tf.active()) e = e * tf.deriv(sv);
      e.store(gt + j);
    }
  }

  // Lanes [k, W) of the coefficients: zeros, never stored.
  void clear_from(int64_t k) {
    for (int64_t l = k; l < W; ++l) {
      A[l] = D[l] = hi[l] = gt[l] = keep[l] = 0;
      lo[l] = st[l] = B[l] = qt[l] = g[l] = g_lse[l] = corr[l] = alpha[l] = 0;
      target[l] = -1;
    }
  }
};

// Tiles of rows [begin, end): runs of adjacent rows within a plane (D > 1), at most W each.
template <typename F>
inline void for_each_column_tile(const RowLayout& l, int64_t begin, int64_t end, int64_t W,
                                 F&& f) {
  for (int64_t r = begin; r < end;) {
    const int64_t k = std::min({W, end - r, l.D > 1 ? l.D - r % l.D : end - r});
    f(r, k);
    r += k;
  }
}

// A per-row vector's element offsets for rows r0 .. r0 + k - 1 of one plane (a tile's
// rows): the first row's offset and the step between lanes, where RowVector::offset
// divides by D for every row (a 64-bit division per lane and per vector: about a tenth of
// an (8, 21, 128, 128) forward).
struct LaneOffsets {
  int64_t base, step;
  LaneOffsets(const RowVector& v, int64_t r0) : base(v.offset(r0)), step(v.D > 1 ? v.sd : v.sb) {}
  int64_t operator()(int64_t l) const { return base + l * step; }
};

template <typename acc_t>
inline acc_t lane_value(const RowVector& v, const LaneOffsets& o, int64_t l) {
  return static_cast<const acc_t*>(v.ptr)[o(l)];
}

// The class-index targets of rows r0 .. r0 + k - 1 into t, read once for the tile; then
// the first of those rows whose target is out of range (and not ignore_index), its target
// in *bad_target, or -1 if none. (A tile is checked before it is computed: the row
// kernels stop at a bad row too.)
inline int64_t read_targets(const SoftmaxLossParams& p, int64_t r0, int64_t k, int64_t* t,
                            int64_t* bad_target) {
  const LaneOffsets o(p.index_target, r0);
  const auto read = [&](const auto* ptr) {
    if (o.step == 1) prefetch_ahead(ptr + o(0), k * static_cast<int64_t>(sizeof(*ptr)));
    for (int64_t l = 0; l < k; ++l) t[l] = static_cast<int64_t>(ptr[o(l)]);
  };
  switch (p.index_type) {
    case IndexType::Int32:
      read(static_cast<const int32_t*>(p.index_target.ptr));
      break;
    case IndexType::UInt8:
      read(static_cast<const uint8_t*>(p.index_target.ptr));
      break;
    case IndexType::Int64:
    default:
      read(static_cast<const int64_t*>(p.index_target.ptr));
  }
  for (int64_t l = 0; l < k; ++l) {
    if (t[l] != p.ignore_index && (t[l] < 0 || t[l] >= p.in.C)) {
      *bad_target = t[l];
      return r0 + l;
    }
  }
  return -1;
}

// softmax_loss_fwd_rows for a column layout (column_layout(p, p.with_grad)).
template <typename scalar_t>
int64_t softmax_loss_fwd_columns(const SoftmaxLossParams& p, int64_t begin, int64_t end,
                                 int64_t* bad_target) {
  using acc_t = typename AccOf<scalar_t>::type;
  static_assert(kSplitLse<scalar_t>, "ColumnTile::lse_lanes splits every row's lse");
  const auto* x = static_cast<const scalar_t*>(p.input);
  const int64_t C = p.in.C;
  const Transform<acc_t> tf(p.logit_scale, p.softcap);
  const auto* w = static_cast<const acc_t*>(p.weight);
  const acc_t eps = static_cast<acc_t>(p.label_smoothing);
  auto* loss = static_cast<acc_t*>(p.loss);
  auto* lse_out = static_cast<double*>(p.lse);
  ColumnTile<acc_t> tile(C, p.prob_target);
  int64_t bad_row = -1;
  for_each_column_tile(p.in, begin, end, tile.W, [&](int64_t r0, int64_t k) {
    if (!p.prob_target &&
        (bad_row >= 0 || (bad_row = read_targets(p, r0, k, tile.t, bad_target)) >= 0)) {
      return;
    }
    tile.load(p, x, r0, k, tf);
    tile.max_and_sum(C);
    tile.lse_lanes();
    tile.clear_from(k);
    const LaneOffsets g_at(p.grad_loss, r0);
    if (p.prob_target) {
      tile.template load_prob_target<scalar_t>(p, r0, k);
      tile.prob_sums(C, true);
      const acc_t z = static_cast<acc_t>(p.z_loss);
      for (int64_t l = 0; l < k; ++l) {
        const RowLse<acc_t> L = tile.lse(l);
        acc_t row_loss = tile.nll[l];
        if (z != 0) row_loss += z * L.hi * L.hi;
        loss[r0 + l] = row_loss;
        lse_out[r0 + l] = stored_lse<kSplitLse<scalar_t>>(L);
        if (p.with_grad) {
          tile.set_prob_coefficients(p, l, L, lane_value<acc_t>(p.grad_loss, g_at, l), acc_t(0),
                                     false);
        }
      }
      if (p.with_grad) {
        tile.template write_grad<scalar_t>(p, r0, k, tf, true,
                                           PostScale<scalar_t, acc_t>(p.post_scale));
      }
      return;
    }
    for (int64_t l = 0; l < k; ++l) {
      const int64_t r = r0 + l;
      const int64_t t = tile.t[l];
      const RowLse<acc_t> L = tile.lse(l);
      lse_out[r] = stored_lse<kSplitLse<scalar_t>>(L);
      const bool ignored = t == p.ignore_index;
      if (p.with_grad) {
        tile.set_coefficients(p, l, t, L, lane_value<acc_t>(p.grad_loss, g_at, l), acc_t(0),
                              false);
      } else if (p.focal) {
        tile.set_focal_lane(p, l, t, L);
      }
      if (ignored) {
        loss[r] = 0;
      } else if (!p.focal) {
        loss[r] = index_row_loss<acc_t>(p, t, L, tile.s[t * tile.W + l],
                                        [&] { return tile.weighted_nll_sum(C, w, l, L); });
      }
    }
    tile.finish_lanes(p, tf, p.with_grad, false);
    if (p.focal) {
      for (int64_t l = 0; l < k; ++l) {
        if (tile.t[l] != p.ignore_index) loss[r0 + l] = tile.loss[l];
      }
    }
    if (p.with_grad) {
      tile.template write_grad<scalar_t>(p, r0, k, tf, eps > 0 && !p.focal,
                                         PostScale<scalar_t, acc_t>(p.post_scale));
    }
  });
  if (p.with_grad) stream_fence();  // (write_grad's streaming stores)
  return bad_row;
}

// softmax_loss_bwd_rows for a column layout (column_layout(p, true)): the gradient from
// the stored lse (recomputed where it does not suffice, as there).
template <typename scalar_t>
int64_t softmax_loss_bwd_columns(const SoftmaxLossParams& p, int64_t begin, int64_t end,
                                 int64_t* bad_target) {
  using acc_t = typename AccOf<scalar_t>::type;
  const auto* x = static_cast<const scalar_t*>(p.input);
  const int64_t C = p.in.C;
  const Transform<acc_t> tf(p.logit_scale, p.softcap);
  const auto* lse_in = static_cast<const double*>(p.lse_in);
  const bool has_g_lse = p.grad_lse.ptr != nullptr;
  ColumnTile<acc_t> tile(C, p.prob_target);
  int64_t bad_row = -1;
  for_each_column_tile(p.in, begin, end, tile.W, [&](int64_t r0, int64_t k) {
    if (!p.prob_target &&
        (bad_row >= 0 || (bad_row = read_targets(p, r0, k, tile.t, bad_target)) >= 0)) {
      return;
    }
    tile.load(p, x, r0, k, tf);
    bool recomputed = false;
    tile.clear_from(k);
    if (p.prob_target) {
      tile.template load_prob_target<scalar_t>(p, r0, k);
      tile.prob_sums(C, false);
    }
    const LaneOffsets g_at(p.grad_loss, r0);
    const LaneOffsets g_lse_at(p.grad_lse, r0);
    for (int64_t l = 0; l < k; ++l) {
      const int64_t r = r0 + l;
      RowLse<acc_t> L = split_lse<kSplitLse<scalar_t>, acc_t>(lse_in[r]);
      if (!stored_lse_suffices(L.hi)) {  // (as the forward made it: the same column sums)
        if (!recomputed) {
          tile.max_and_sum(C);
          tile.lse_lanes();
        }
        recomputed = true;
        L = tile.lse(l);
      }
      const acc_t g_lse =
          has_g_lse ? static_cast<acc_t>(lane_value<double>(p.grad_lse, g_lse_at, l)) : acc_t(0);
      const acc_t g_loss = lane_value<acc_t>(p.grad_loss, g_at, l);
      if (p.prob_target) {
        tile.set_prob_coefficients(p, l, L, g_loss, g_lse, has_g_lse);
      } else {
        tile.set_coefficients(p, l, tile.t[l], L, g_loss, g_lse, has_g_lse);
      }
    }
    if (!p.prob_target) tile.finish_lanes(p, tf, true, has_g_lse);
    tile.template write_grad<scalar_t>(
        p, r0, k, tf, p.prob_target || (p.label_smoothing > 0 && !p.focal),
        PostScale<scalar_t, acc_t>(1.0));
  });
  stream_fence();  // (write_grad's streaming stores)
  return bad_row;
}
