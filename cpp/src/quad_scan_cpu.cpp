// quad_scan / quad_merge on the CPU (contract in quad_scan.h).
//
// Parallel over the (b, d) rows. Within a row the work goes in runs of w4 = W/4
// consecutive slots: each run reads (gather) or writes (scatter) one contiguous row
// segment of the grid. Per call and batch the runs become a flat list of contiguous
// pieces (split where a source or the destination wraps around the right edge) with
// their coefficients M and 1 - M; each piece is one pass that writes
// M * fine + (1 - M) * coarse (both terms always, as the formula) and, in the backward
// passes, adds the decision gradient of the same elements while they are loaded.
// Float rows go through the pieces in blocks of 2 or 4 rows of one batch (the pieces'
// control work shared by the block; SSE2, 4 lanes); float64 rows one at a time.
// The decision gradient: per piece and row, K lanes summed in the data type (fixed order,
// at most W/4 terms; float then adds its 4 lanes up in a fixed order), widened and added to
// the row's double sums (for float kept in registers while consecutive pieces keep their
// quadrants), stored per (b, d) in the workspace and summed over d in order, so the result
// does not depend on threading.
// Where the CPU has AVX, float rows from cached tensors take 8-lane passes without a
// gradient (the forward passes), and the float passes with a gradient reverse / fold their
// rows 8 lanes wide (not the streamed rows); the values are the same as with the 4-lane
// code (no FMA, same sums).
// When a call's tensors are larger than the caches, each row prefetches the next row's
// streams as it goes, and float rows are assembled in a scratch row and written to the
// output with non-temporal stores (no read of the destination lines before the write).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#if defined(__SSE2__)
#include <immintrin.h>
#endif
#include <vector>

#include "quadmamba/parallel.h"
#include "quadmamba/quad_scan.h"

namespace quadmamba {

QuadGeometry make_quad_geometry(int64_t H, int64_t W, int64_t sy, int64_t sx, QuadOrder order) {
  QuadGeometry g;
  g.H = H;
  g.W = W;
  g.order = order;
  check_quad_geometry(g);  // sizes and order (the roll is still 0)
  QM_CHECK(sy > -H && sy < H && sx > -W && sx < W, "shift must satisfy |sy| < H and |sx| < W, got (",
           sy, ", ", sx, ") for ", H, "x", W);
  g.sy = wrap_index(sy, H);
  g.sx = wrap_index(sx, W);
  return g;
}

void check_quad_geometry(const QuadGeometry& g) {
  QM_CHECK(g.H > 0 && g.W > 0 && g.H % 4 == 0 && g.W % 4 == 0,
           "quad geometry: H and W must be positive multiples of 4, got ", g.H, "x", g.W);
  QM_CHECK(g.sy >= 0 && g.sy < g.H && g.sx >= 0 && g.sx < g.W, "quad geometry: the roll must satisfy 0 <= sy < H and ",
           "0 <= sx < W (make_quad_geometry wraps negative shifts), got (", g.sy, ", ", g.sx, ") for ", g.H, "x", g.W);
  QM_CHECK(g.order == QuadOrder::Quadtree || g.order == QuadOrder::Official, "quad geometry: unknown order ",
           static_cast<int>(g.order));
}

namespace {

// `raster` is the (B, D, H, W) argument, `seq` the (B, 2, D, L) one (raster_is_output: the
// merge); ddecision and workspace may be undefined (the forward passes).
void check_quad_args(const TensorView& raster, const char* raster_name, const TensorView& seq,
                     const char* seq_name, const TensorView& decision, const TensorView& ddecision,
                     const TensorView& workspace, const QuadGeometry& g, bool raster_is_output = false) {
  check_quad_geometry(g);
  const auto [B, D] = check_raster_and_sequences(raster, raster_name, seq, seq_name, 2, g.H, g.W, raster_is_output);
  const Device dev = raster.device;
  const DType acc = raster.dtype == DType::Float64 ? DType::Float64 : DType::Float32;
  check_view(decision, "decision", 2, acc, dev);
  check_shape(decision, "decision", {B, 4});
  if (ddecision.defined()) {
    check_view(ddecision, "ddecision", 2, acc, dev);
    check_shape(ddecision, "ddecision", {B, 4});
    check_view(workspace, "workspace", 3, acc, dev);
    check_shape(workspace, "workspace", {B, D, 4});
  }
}

}  // namespace

void check_quad_scan_fwd_args(const TensorView& x, const TensorView& decision, const TensorView& out,
                              const QuadGeometry& g) {
  check_quad_args(x, "x", out, "out", decision, TensorView{}, TensorView{}, g);
}

void check_quad_scan_bwd_args(const TensorView& x, const TensorView& decision, const TensorView& gout,
                              const TensorView& dx, const TensorView& ddecision, const TensorView& workspace,
                              const QuadGeometry& g) {
  QM_CHECK(ddecision.defined(), "ddecision is required");
  check_quad_args(x, "x", gout, "gout", decision, ddecision, workspace, g);
  check_quad_args(dx, "dx", gout, "gout", decision, TensorView{}, TensorView{}, g, true);  // dx: an output
}

void check_quad_merge_fwd_args(const TensorView& ys, const TensorView& decision, const TensorView& y,
                               const QuadGeometry& g) {
  check_quad_args(y, "y", ys, "ys", decision, TensorView{}, TensorView{}, g, true);
}

void check_quad_merge_bwd_args(const TensorView& ys, const TensorView& decision, const TensorView& gy,
                               const TensorView& dys, const TensorView& ddecision, const TensorView& workspace,
                               const QuadGeometry& g) {
  QM_CHECK(ddecision.defined(), "ddecision is required");
  check_quad_args(gy, "gy", ys, "ys", decision, ddecision, workspace, g);
  check_quad_args(gy, "gy", dys, "dys", decision, TensorView{}, TensorView{}, g);
}

namespace {

// One contiguous piece of a pass: o[0:n] = ca * a[0:n] + cb * b[0:n], a = the fine and
// b = the coarse source, ca / cb their coefficients (both terms always, as in the formula:
// M * fine + (1 - M) * coarse). Built once per (call, batch) from the runs, split where
// either source or the destination wraps around the right edge, so each is contiguous.
template <typename T>
struct Piece {
  int64_t o, f, c, n;  // offsets of the destination and of the fine / coarse source
  T cf, cc;
  int qf, qc;  // quadrants of the fine / coarse term (decision gradient)
};

// What a pass adds to the decision gradient while it writes a piece:
//   None:    nothing;
//   Gather:  acc[qf] += sum a[i] * S[i],  acc[qc] -= sum b[i] * S[i], with the folded sequence
//            S[i] = s[i] + srev[-1 - i] read in place (s: aux0 at o, srev: aux1 at L - o);
//   Scatter: acc[qf] += sum s[i] * (a[i] - b[i])                       (s: the raster row aux at o).
enum class Grad { None, Gather, Scatter };

// Vector width in elements (16 bytes).
template <typename T>
constexpr int64_t kLanes = 16 / sizeof(T);

// The lane sums of one piece's decision-gradient terms: a for the fine term's quadrant, b
// for the coarse term's (subtracted by Gather).
template <typename T>
struct PieceSums {
  T a[kLanes<T>] = {}, b[kLanes<T>] = {};
};

// The decision-gradient sums of one row (the one-row path: float64): 4 quadrants x K lanes
// in double, added in the order of the piece list (so the result does not depend on threading).
template <typename T>
struct RowSums {
  static constexpr int64_t K = kLanes<T>;
  double sum[4][K] = {};
  inline void add(int q, const T* lanes) {
    for (int64_t k = 0; k < K; ++k) sum[q][k] += static_cast<double>(lanes[k]);
  }
  // dm[q] += sign * (sum of the lanes of quadrant q), for all q.
  void finish(double* dm, double sign) {
    for (int qq = 0; qq < 4; ++qq)
      for (int64_t k = 0; k < K; ++k) dm[qq] += sign * sum[qq][k];
  }
};

// Whether float rows take the SSE2 passes in blocks of rows: compiled in (x86) and not held
// back by QUADMAMBA_CPU_GENERIC=2. Otherwise they go one at a time through the scalar passes
// (gather_row / scatter_row), as float64 rows always do.
inline bool use_sse2() {
#if defined(__SSE2__)
  return cpu_generic_level() < 2;
#else
  return false;
#endif
}

#if defined(__SSE2__)
// Whether the CPU runs AVX (8-lane float vectors) and cpu_generic_forced() is false; checked once.
inline bool has_avx() {
  static const bool avx = (__builtin_cpu_init(), __builtin_cpu_supports("avx")) && !cpu_generic_forced();
  return avx;
}

// o1 = reverse(o0) and S = s0 + reverse(s1) (fold_directions) for float rows, compiled for
// AVX (called only where has_avx()); the same values as the generic loops.
__attribute__((target("avx"))) void reverse_row_avx(const float* __restrict o0, float* __restrict o1, int64_t L) {
  for (int64_t q = 0; q < L; ++q) o1[q] = o0[L - 1 - q];
}
__attribute__((target("avx"))) void fold_directions_avx(const float* __restrict s0, const float* __restrict s1,
                                                        int64_t L, float* __restrict S) {
  for (int64_t p = 0; p < L; ++p) S[p] = s0[p] + s1[L - 1 - p];
}

// p[0:2] in lanes 0, 1 (zeros above) and back, 8 bytes at any float alignment (through
// memcpy: _mm_load_sd / _mm_store_sd would dereference a misaligned double).
inline __m128 load_two(const float* p) {
  double d;
  std::memcpy(&d, p, sizeof(d));
  return _mm_castpd_ps(_mm_set_sd(d));
}
inline void store_two(float* p, __m128 v) {
  const double d = _mm_cvtsd_f64(_mm_castps_pd(v));
  std::memcpy(p, &d, sizeof(d));
}

// Elements p[0:n] of a piece shorter than 4 in lanes 0..n-1, zeros above (nothing past p[n-1]
// is read); reversed: lane i holds p[-1-i] (the reversed direction).
inline __m128 load_head(const float* p, int64_t n) {
  if (n == 1) return _mm_load_ss(p);
  const __m128 two = load_two(p);
  return n == 2 ? two : _mm_movelh_ps(two, _mm_load_ss(p + 2));
}
inline __m128 load_head_reversed(const float* p, int64_t n) {
  const __m128 v = load_head(p - n, n);  // p[-n], ..., p[-1]
  return n == 1 ? v : n == 2 ? _mm_shuffle_ps(v, v, _MM_SHUFFLE(3, 2, 0, 1)) : _mm_shuffle_ps(v, v, _MM_SHUFFLE(3, 0, 1, 2));
}
inline void store_head(float* p, __m128 v, int64_t n) {
  if (n == 1) {
    _mm_store_ss(p, v);
  } else {
    store_two(p, v);
    if (n == 3) _mm_store_ss(p + 2, _mm_movehl_ps(v, v));
  }
}
#endif

// One piece: o[0:n] = ca * a[0:n] + cb * b[0:n]; with a gradient, lane k of the returned sums
// adds the terms with index i = k (mod K) in a fixed order (at most W/4 terms, in T):
//   Gather:  a[i] * S[i] and b[i] * S[i], S[i] = s[i] + srev[-1 - i];
//   Scatter: s[i] * (a[i] - b[i]).
template <typename T, Grad G>
inline PieceSums<T> piece_pass(T* __restrict o, const T* __restrict a, const T* __restrict b,
                               const T* __restrict s, const T* __restrict srev, int64_t n, T ca, T cb) {
  constexpr int64_t K = kLanes<T>;
  PieceSums<T> sums;
  for (int64_t i = 0; i < n; ++i) {
    o[i] = ca * a[i] + cb * b[i];
    if constexpr (G == Grad::Gather) {
      const T si = s[i] + srev[-1 - i];
      sums.a[i % K] += a[i] * si;
      sums.b[i % K] += b[i] * si;
    } else if constexpr (G == Grad::Scatter) {
      sums.a[i % K] += s[i] * (a[i] - b[i]);
    }
  }
  return sums;
}

// S[p] = s0[p] + s1[L-1-p].
template <typename T>
inline void fold_directions(const T* __restrict s0, const T* __restrict s1, int64_t L, T* __restrict S) {
  for (int64_t p = 0; p < L; ++p) S[p] = s0[p] + s1[L - 1 - p];
}

// One run of w4 consecutive slots [p0, p0 + w4): in the gather pass its fine and coarse
// source segments (row offset in x, first column, quadrant on the rolled grid); in the
// scatter pass its destination segment of the raster (row offset, first column, the
// quadrant) and the first fine / coarse slots that feed it. Built once per call from the
// index functions; the per-row loops only copy.
struct GatherRun {
  int64_t p0, row_f, col_f, row_c, col_c;
  int q_f, q_c;
};
struct ScatterRun {
  int64_t row, col, p_f, p_c;
  int q;
};

std::vector<GatherRun> gather_runs(const QuadGeometry& g) {
  std::vector<GatherRun> runs;
  for (int64_t p0 = 0; p0 < g.L(); p0 += g.run()) {
    int64_t yf, xf, yc, xc;
    fine_slot_to_yx(g.order, g.H, g.W, p0, yf, xf);
    coarse_slot_to_yx(g.H, g.W, p0, yc, xc);
    runs.push_back({p0, source_row(g, yf) * g.W, source_col(g, xf), source_row(g, yc) * g.W, source_col(g, xc),
                    quadrant_of(g.H, g.W, yf, xf), quadrant_of(g.H, g.W, yc, xc)});
  }
  return runs;
}

std::vector<ScatterRun> scatter_runs(const QuadGeometry& g) {
  std::vector<ScatterRun> runs;
  for (int64_t y = 0; y < g.H; ++y) {  // rolled grid row y, segments starting at x0
    for (int64_t x0 = 0; x0 < g.W; x0 += g.run()) {
      runs.push_back({source_row(g, y) * g.W, source_col(g, x0), fine_yx_to_slot(g.order, g.H, g.W, y, x0),
                      coarse_yx_to_slot(g.H, g.W, y, x0), quadrant_of(g.H, g.W, y, x0)});
    }
  }
  return runs;
}

// Gather pieces for one batch's decision: destination slots o, fine / coarse raster cells
// f / c; each run split where either source wraps around the right edge.
template <typename T>
std::vector<Piece<T>> gather_pieces(const QuadGeometry& g, const std::vector<GatherRun>& runs, const T* dec) {
  const int64_t W = g.W, R = g.run();
  std::vector<Piece<T>> pieces;
  for (const GatherRun& run : runs) {
    const int64_t cuts[4] = {0, std::min(R, W - run.col_f), std::min(R, W - run.col_c), R};
    const int64_t lo = std::min(cuts[1], cuts[2]), hi = std::max(cuts[1], cuts[2]);
    const int64_t bounds[4] = {0, lo, hi, R};
    for (int k = 0; k < 3; ++k) {
      const int64_t i = bounds[k], n = bounds[k + 1] - i;
      if (n <= 0) continue;
      Piece<T> p{};
      p.o = run.p0 + i;
      p.f = run.row_f + wrap_index(run.col_f + i, W);
      p.c = run.row_c + wrap_index(run.col_c + i, W);
      p.n = n;
      p.qf = run.q_f;
      p.qc = run.q_c;
      p.cf = dec[run.q_f];
      p.cc = T(1) - dec[run.q_c];
      pieces.push_back(p);
    }
  }
  return pieces;
}

// Scatter pieces for one batch's decision: destination raster cells o, fine / coarse slots
// f / c of the folded sequence; each run split where the destination wraps.
template <typename T>
std::vector<Piece<T>> scatter_pieces(const QuadGeometry& g, const std::vector<ScatterRun>& runs, const T* dec) {
  const int64_t W = g.W, R = g.run();
  std::vector<Piece<T>> pieces;
  for (const ScatterRun& run : runs) {
    const int64_t first = std::min(R, W - run.col);
    for (int k = 0; k < 2; ++k) {
      const int64_t i = k ? first : 0, n = k ? R - first : first;
      if (n <= 0) continue;
      Piece<T> p{};
      p.o = run.row + wrap_index(run.col + i, W);
      p.f = run.p_f + i;
      p.c = run.p_c + i;
      p.n = n;
      p.qf = p.qc = run.q;
      p.cf = dec[run.q];
      p.cc = T(1) - dec[run.q];
      pieces.push_back(p);
    }
  }
  return pieces;
}

// Software prefetch of the next row's streams, one cache line of each per piece (then the
// rest of the row): the gather reads its source out of order, which the hardware prefetcher
// cannot follow, and a row ends before the hardware catches up with the next one. Only
// worth it when the tensors do not stay in the caches between calls; with rows already
// cached the extra instructions cost more than they save.
template <typename T>
struct NextRows {
  static constexpr int64_t kLine = 64 / static_cast<int64_t>(sizeof(T));
  const T* row[3] = {nullptr, nullptr, nullptr};  // the streams row[0:n], each L elements
  int n = 0;
  int64_t ahead, L;
  NextRows(bool on, int64_t L_) : ahead(on ? 0 : L_), L(L_) {}
  inline void add(const T* r) { row[n++] = r; }
  inline void step() {
    if (ahead < L) {
      switch (n) {
        case 3: __builtin_prefetch(row[2] + ahead); [[fallthrough]];
        case 2: __builtin_prefetch(row[1] + ahead); [[fallthrough]];
        default: __builtin_prefetch(row[0] + ahead);
      }
      ahead += kLine;
    }
  }
  inline void finish() {
    while (ahead < L) step();
  }
};

// Gather pass for one (b, d) row: out0 from the raster row src (quad_scan_fwd), and when
// aux0 is given, dm[q] += the gather form of the decision gradient with
// S = aux0 + reverse(aux1) (quad_merge_bwd):
//   dM[Q(f(p))] += src[f(p)] * S[p];  dM[Q(c(p))] -= src[c(p)] * S[p].
// Then out1 = reverse(out0).
template <typename T>
void gather_row(int64_t L, const std::vector<Piece<T>>& pieces, const T* __restrict src, T* __restrict out0,
                T* __restrict out1, const T* aux0, const T* aux1, NextRows<T>& next, double* dm) {
  if (aux0) {
    RowSums<T> fine, coarse;
    for (const Piece<T>& p : pieces) {
      next.step();
      const PieceSums<T> t = piece_pass<T, Grad::Gather>(out0 + p.o, src + p.f, src + p.c, aux0 + p.o,
                                                          aux1 + (L - p.o), p.n, p.cf, p.cc);
      fine.add(p.qf, t.a);
      coarse.add(p.qc, t.b);
    }
    fine.finish(dm, 1.0);
    coarse.finish(dm, -1.0);
  } else {
    for (const Piece<T>& p : pieces) {
      next.step();
      piece_pass<T, Grad::None>(out0 + p.o, src + p.f, src + p.c, nullptr, nullptr, p.n, p.cf, p.cc);
    }
  }
  next.finish();
  for (int64_t q = 0; q < L; ++q) out1[q] = out0[L - 1 - q];
}

// Scatter pass for one (b, d) row: the raster row dst from s0/s1 (quad_merge_fwd), and
// when aux is given, dm[q] += the scatter form of the decision gradient with the raster
// row aux (quad_scan_bwd): dM[q] += sum_t aux[t] * (S[f^-1(t)] - S[c^-1(t)]).
template <typename T>
void scatter_row(int64_t L, const std::vector<Piece<T>>& pieces, const T* s0, const T* s1, T* __restrict dst,
                 const T* __restrict aux, T* __restrict S, NextRows<T>& next, double* dm) {
  fold_directions(s0, s1, L, S);
  if (aux) {
    RowSums<T> sums;
    for (const Piece<T>& p : pieces) {
      next.step();
      sums.add(p.qf, piece_pass<T, Grad::Scatter>(dst + p.o, S + p.f, S + p.c, aux + p.o, nullptr, p.n, p.cf, p.cc).a);
    }
    sums.finish(dm, 1.0);
  } else {
    for (const Piece<T>& p : pieces) {
      next.step();
      piece_pass<T, Grad::None>(dst + p.o, S + p.f, S + p.c, nullptr, nullptr, p.n, p.cf, p.cc);
    }
  }
  next.finish();
}

#if defined(__SSE2__)
// Float rows in blocks of R consecutive rows of one batch (in every stream the rows of a
// block lie L elements apart): each piece's control work (its offsets, its tail, the
// quadrant) is done once for the R rows. With a gradient, a row's lane sums of a piece
// are added up to one float for the fine and one for the coarse quadrant (fixed order:
// (l0 + l2) + (l1 + l3)), widened and added to the row's pair acc[r] = (fine, coarse),
// which stays in a register while consecutive pieces keep their quadrants.
template <Grad G, int R>
struct BlockSums {
  __m128d acc[R];
  double fine[R][4], coarse[R][4];  // per row and quadrant, added when a quadrant changes
  int qf, qc;
  explicit BlockSums(int qf0, int qc0) : qf(qf0), qc(qc0) {
    for (int r = 0; r < R; ++r) {
      acc[r] = _mm_setzero_pd();
      for (int q = 0; q < 4; ++q) fine[r][q] = coarse[r][q] = 0;
    }
  }
  inline void flush() {
    for (int r = 0; r < R; ++r) {
      fine[r][qf] += _mm_cvtsd_f64(acc[r]);
      coarse[r][qc] += _mm_cvtsd_f64(_mm_unpackhi_pd(acc[r], acc[r]));
      acc[r] = _mm_setzero_pd();
    }
  }
  inline void quadrants(int qf_, int qc_) {
    if (qf_ != qf || qc_ != qc) {
      flush();
      qf = qf_;
      qc = qc_;
    }
  }
  // acc[r] += (sum of the lanes of ta, sum of the lanes of tb)
  inline void add(int r, __m128 ta, __m128 tb) {
    const __m128 w = _mm_add_ps(_mm_unpacklo_ps(ta, tb), _mm_unpackhi_ps(ta, tb));  // a0+a2, b0+b2, a1+a3, b1+b3
    acc[r] = _mm_add_pd(acc[r], _mm_cvtps_pd(_mm_add_ps(w, _mm_movehl_ps(w, w))));
  }
  // dm[r][q] += fine[r][q] - coarse[r][q]
  void finish(double (*dm)[4]) {
    flush();
    for (int r = 0; r < R; ++r)
      for (int q = 0; q < 4; ++q) dm[r][q] += fine[r][q] - coarse[r][q];
  }
};

// One piece for the R rows of a block: o_r[0:n] = ca * a_r[0:n] + cb * b_r[0:n] with
// x_r = x + r * L; with a gradient, the terms of Grad go to sums (see piece_pass).
template <Grad G, int R>
inline void piece_block(float* o, const float* a, const float* b, const float* s, const float* srev, int64_t L,
                        int64_t n, float ca, float cb, BlockSums<G, R>& sums) {
  const __m128 va = _mm_set1_ps(ca), vb = _mm_set1_ps(cb);
  __m128 ta[R], tb[R];
  if (n < 4) {  // lanes past n are loaded as zeros and not stored
    for (int r = 0; r < R; ++r) {
      const int64_t k = r * L;
      const __m128 xa = load_head(a + k, n), xb = load_head(b + k, n);
      store_head(o + k, _mm_add_ps(_mm_mul_ps(va, xa), _mm_mul_ps(vb, xb)), n);
      if constexpr (G == Grad::Gather) {
        const __m128 xs = _mm_add_ps(load_head(s + k, n), load_head_reversed(srev + k, n));
        ta[r] = _mm_mul_ps(xa, xs);
        tb[r] = _mm_mul_ps(xb, xs);
      } else if constexpr (G == Grad::Scatter) {
        ta[r] = _mm_mul_ps(load_head(s + k, n), _mm_sub_ps(xa, xb));
        tb[r] = _mm_setzero_ps();
      }
    }
  } else {
    for (int r = 0; r < R; ++r) ta[r] = tb[r] = _mm_setzero_ps();
    // full chunks, then one overlapping last chunk: its writes repeat equal values, its
    // sums keep only the lanes past the previous chunk.
    alignas(16) static const uint32_t tail_mask[8] = {0, 0, 0, 0, ~0u, ~0u, ~0u, ~0u};
    for (int64_t i = 0;; i += 4) {
      __m128 keep = _mm_castsi128_ps(_mm_set1_epi32(-1));
      if (i + 4 > n) {
        keep = _mm_loadu_ps(reinterpret_cast<const float*>(tail_mask) + (n - i));
        i = n - 4;
      }
      for (int r = 0; r < R; ++r) {
        const int64_t k = r * L + i;
        const __m128 xa = _mm_loadu_ps(a + k), xb = _mm_loadu_ps(b + k);
        _mm_storeu_ps(o + k, _mm_add_ps(_mm_mul_ps(va, xa), _mm_mul_ps(vb, xb)));
        if constexpr (G == Grad::Gather) {
          const __m128 rv = _mm_loadu_ps(srev + r * L - i - 4);
          const __m128 xs = _mm_and_ps(keep, _mm_add_ps(_mm_loadu_ps(s + k), _mm_shuffle_ps(rv, rv, _MM_SHUFFLE(0, 1, 2, 3))));
          ta[r] = _mm_add_ps(ta[r], _mm_mul_ps(xa, xs));
          tb[r] = _mm_add_ps(tb[r], _mm_mul_ps(xb, xs));
        } else if constexpr (G == Grad::Scatter) {
          const __m128 xs = _mm_and_ps(keep, _mm_loadu_ps(s + k));
          ta[r] = _mm_add_ps(ta[r], _mm_mul_ps(xs, _mm_sub_ps(xa, xb)));
        }
      }
      if (i + 4 == n) break;
    }
  }
  if constexpr (G != Grad::None)
    for (int r = 0; r < R; ++r) sums.add(r, ta[r], tb[r]);
}

// The passes without a gradient (quad_scan_fwd, quad_merge_fwd) for float rows from cached
// tensors, compiled for AVX (called only where has_avx()): pieces of 8 or more in 8-lane
// chunks, then one overlapping last chunk (its writes repeat equal values); shorter pieces
// as in piece_block. Each element is ca * a + cb * b as there (no FMA): identical results.
template <int R>
__attribute__((target("avx"))) inline void piece_block_avx(float* o, const float* a, const float* b, int64_t L,
                                                           int64_t n, float ca, float cb) {
  if (n < 8) {
    BlockSums<Grad::None, R> none(0, 0);
    piece_block<Grad::None, R>(o, a, b, nullptr, nullptr, L, n, ca, cb, none);
    return;
  }
  const __m256 va = _mm256_set1_ps(ca), vb = _mm256_set1_ps(cb);
  for (int64_t i = 0;; i += 8) {
    if (i + 8 > n) i = n - 8;
    for (int r = 0; r < R; ++r) {
      const int64_t k = r * L + i;
      const __m256 xa = _mm256_loadu_ps(a + k), xb = _mm256_loadu_ps(b + k);
      _mm256_storeu_ps(o + k, _mm256_add_ps(_mm256_mul_ps(va, xa), _mm256_mul_ps(vb, xb)));
    }
    if (i + 8 == n) break;
  }
}

// gather_block<Grad::None, R> (no streaming, no prefetch) with piece_block_avx.
template <int R>
__attribute__((target("avx"))) void gather_block_avx(int64_t L, const std::vector<Piece<float>>& pieces,
                                                     const float* src, float* out0, float* out1) {
  for (const Piece<float>& p : pieces) piece_block_avx<R>(out0 + p.o, src + p.f, src + p.c, L, p.n, p.cf, p.cc);
  for (int r = 0; r < R; ++r) reverse_row_avx(out0 + r * L, out1 + r * L, L);
}

// scatter_block<Grad::None, R> (no streaming, no prefetch) with piece_block_avx.
template <int R>
__attribute__((target("avx"))) void scatter_block_avx(int64_t L, const std::vector<Piece<float>>& pieces,
                                                      const float* s0, const float* s1, float* dst, float* S) {
  for (int r = 0; r < R; ++r) fold_directions_avx(s0 + r * L, s1 + r * L, L, S + r * L);
  for (const Piece<float>& p : pieces) piece_block_avx<R>(dst + p.o, S + p.f, S + p.c, L, p.n, p.cf, p.cc);
}

// Row writes that bypass the caches (non-temporal stores; dst 16-byte aligned, L a
// multiple of 4): for outputs larger than the caches they save reading each destination
// line before it is written. dst = src, and dst = reverse(src).
inline void stream_row(const float* src, float* dst, int64_t L) {
  for (int64_t q = 0; q < L; q += 4) _mm_stream_ps(dst + q, _mm_loadu_ps(src + q));
}
inline void stream_row_reversed(const float* src, float* dst, int64_t L) {
  for (int64_t q = 0; q < L; q += 4) {
    const __m128 v = _mm_loadu_ps(src + (L - 4 - q));
    _mm_stream_ps(dst + q, _mm_shuffle_ps(v, v, _MM_SHUFFLE(0, 1, 2, 3)));
  }
}

// gather_row for the R float rows of a block (dm: R x 4). Stream (R = 1): the pieces
// write to tmp (one row) and both directions are streamed from there to out0 / out1.
template <Grad G, int R, bool Stream = false>
void gather_block(int64_t L, const std::vector<Piece<float>>& pieces, const float* src, float* out0, float* out1,
                  const float* aux0, const float* aux1, float* tmp, NextRows<float>& next, double (*dm)[4]) {
  BlockSums<G, R> sums(pieces.empty() ? 0 : pieces[0].qf, pieces.empty() ? 0 : pieces[0].qc);
  float* o = Stream ? tmp : out0;
  for (const Piece<float>& p : pieces) {
    next.step();
    if constexpr (G != Grad::None) sums.quadrants(p.qf, p.qc);
    piece_block<G, R>(o + p.o, src + p.f, src + p.c, G == Grad::None ? nullptr : aux0 + p.o,
                      G == Grad::None ? nullptr : aux1 + (L - p.o), L, p.n, p.cf, p.cc, sums);
  }
  next.finish();
  if constexpr (G != Grad::None) sums.finish(dm);
  if constexpr (Stream) {
    stream_row(tmp, out0, L);
    stream_row_reversed(tmp, out1, L);
    return;
  }
  for (int r = 0; r < R; ++r) {
    const float* o0 = out0 + r * L;
    float* o1 = out1 + r * L;
    if (has_avx()) {
      reverse_row_avx(o0, o1, L);
      continue;
    }
    for (int64_t q = 0; q < L; ++q) o1[q] = o0[L - 1 - q];
  }
}

// scatter_row for the R float rows of a block; S holds R rows. Stream (R = 1): the pieces
// write to tmp (one row) and the row is streamed from there to dst.
template <Grad G, int R, bool Stream = false>
void scatter_block(int64_t L, const std::vector<Piece<float>>& pieces, const float* s0, const float* s1, float* dst,
                   const float* aux, float* S, float* tmp, NextRows<float>& next, double (*dm)[4]) {
  for (int r = 0; r < R; ++r) {
    if (!Stream && has_avx()) fold_directions_avx(s0 + r * L, s1 + r * L, L, S + r * L);  // (streamed: measured slower)
    else fold_directions(s0 + r * L, s1 + r * L, L, S + r * L);
  }
  BlockSums<G, R> sums(pieces.empty() ? 0 : pieces[0].qf, pieces.empty() ? 0 : pieces[0].qc);
  float* o = Stream ? tmp : dst;
  for (const Piece<float>& p : pieces) {
    next.step();
    if constexpr (G != Grad::None) sums.quadrants(p.qf, p.qc);
    piece_block<G, R>(o + p.o, S + p.f, S + p.c, G == Grad::None ? nullptr : aux + p.o, nullptr, L, p.n, p.cf,
                      p.cc, sums);
  }
  next.finish();
  if constexpr (G != Grad::None) sums.finish(dm);
  if constexpr (Stream) stream_row(tmp, dst, L);
}

#endif

// Rows per block in the float passes: 4, or 2 for rows longer than 2048 (the block's streams
// stay in the L1 and L2 caches); 1 when prefetching (streams from memory: more rows at once
// measured slower).
inline int block_rows(int64_t L, bool prefetch) { return prefetch ? 1 : L > 2048 ? 2 : 4; }

// Sums the per-(b, d) partials over d in order: ddecision[b, q] = sum_d workspace[b, d, q].
template <typename T>
void reduce_partials(const T* workspace, T* ddecision, int64_t B, int64_t D) {
  for (int64_t b = 0; b < B; ++b) {
    for (int q = 0; q < 4; ++q) {
      double s = 0;
      for (int64_t d = 0; d < D; ++d) s += static_cast<double>(workspace[(b * D + d) * 4 + q]);
      ddecision[b * 4 + q] = static_cast<T>(s);
    }
  }
}

// Whether the passes prefetch the next rows: when the bytes a call reads exceed this, they
// come from memory rather than from the caches (measured at the model shapes on the CPU).
constexpr int64_t kPrefetchBytes = 8 << 20;

// How one pass runs. It prefetches the next rows when the `streams` tensors of B*D*L
// elements it touches exceed kPrefetchBytes; float rows are then streamed (non-temporal
// stores) if the output is 16-byte aligned. Otherwise its forward pass is 8 lanes wide
// where the CPU has AVX.
struct PassMode {
  bool prefetch, stream, avx;
};

template <typename T>
PassMode pass_mode(int streams, int64_t elements, const T* out) {
  PassMode m;
  m.prefetch = streams * elements * static_cast<int64_t>(sizeof(T)) > kPrefetchBytes;
  m.stream = std::is_same_v<T, float> && m.prefetch && reinterpret_cast<uintptr_t>(out) % 16 == 0;
#if defined(__SSE2__)
  m.avx = !m.prefetch && has_avx();
#else
  m.avx = false;
#endif
  return m;
}

// Calls block(R, Streamed) for a block of `rows` rows with R (4, 2 or 1) and Streamed (single
// rows written through scratch with non-temporal stores) as compile-time constants.
template <typename F>
void for_block_size(int rows, bool streamed, const F& block) {
  using std::integral_constant;
  if (rows == 4) block(integral_constant<int, 4>{}, std::false_type{});
  else if (rows == 2) block(integral_constant<int, 2>{}, std::false_type{});
  else if (streamed) block(integral_constant<int, 1>{}, std::true_type{});
  else block(integral_constant<int, 1>{}, std::false_type{});
}

// Runs `block(bd, rows, next, S, dm)` for every row bd = b * D + d in parallel, in blocks
// of `rows` = block_rows(L, prefetch) consecutive rows of one batch (single rows where a
// batch or a thread's range ends; always single rows for float64); next holds the next
// block's streams for prefetching, S is scratch for the block's rows and dm their 4
// decision-gradient partials each (copied to workspace when given).
template <typename T, typename F>
void for_rows(int64_t B, int64_t D, int64_t L, bool prefetch, const TensorView& workspace, const F& block) {
  const int R = std::is_same_v<T, float> && use_sse2() ? block_rows(L, prefetch) : 1;  // rows per block
  const int64_t grain = std::max<int64_t>(R, 16384 / std::max<int64_t>(L, 1));
  parallel_for(0, B * D, grain, [&](int64_t lo, int64_t hi) {
    std::vector<T> S(static_cast<size_t>(std::max(R, 2) * L));
    for (int64_t bd = lo; bd < hi;) {
      const int rows = bd % D + R <= D && bd + R <= hi ? R : 1;
      double dm[4][4] = {};
      NextRows<T> next(prefetch && bd + rows < hi, rows * L);
      block(bd, rows, next, S.data(), dm);
      if (workspace.defined()) {
        for (int r = 0; r < rows; ++r)
          for (int q = 0; q < 4; ++q) workspace.ptr<T>()[(bd + r) * 4 + q] = static_cast<T>(dm[r][q]);
      }
      bd += rows;
    }
#if defined(__SSE2__)
    _mm_sfence();  // the streamed rows are visible before the call returns
#endif
  });
}

// Offset of row bd = b * D + d of direction dir in a (B, 2, D, L) sequence.
inline int64_t seq_offset(int64_t bd, int dir, int64_t D, int64_t L) {
  return ((bd / D * 2 + dir) * D + bd % D) * L;
}

template <typename T>
void gather(const TensorView& src, const TensorView& decision, const TensorView& out,
            const TensorView& aux, const TensorView& ddecision, const TensorView& workspace,
            const QuadGeometry& g) {
  const int64_t B = src.shape[0], D = src.shape[1], L = g.L();
  const T* x = src.ptr<T>();
  const T* dec = decision.ptr<T>();
  T* o = out.ptr<T>();
  const T* a = aux.defined() ? aux.ptr<T>() : nullptr;
  const std::vector<GatherRun> runs = gather_runs(g);
  std::vector<std::vector<Piece<T>>> pieces;
  for (int64_t b = 0; b < B; ++b) pieces.push_back(gather_pieces<T>(g, runs, dec + b * 4));
  const PassMode mode = pass_mode(a ? 3 : 1, B * D * L, o);
  for_rows<T>(B, D, L, mode.prefetch, workspace, [&](int64_t bd, int rows, NextRows<T>& next, [[maybe_unused]] T* S, double (*dm)[4]) {
    const int64_t s0 = seq_offset(bd, 0, D, L), s1 = seq_offset(bd, 1, D, L);
    next.add(x + (bd + rows) * L);
    if (a) {
      next.add(a + seq_offset(bd + rows, 0, D, L));
      next.add(a + seq_offset(bd + rows, 1, D, L));
    }
    const auto& pc = pieces[bd / D];
#if defined(__SSE2__)
    if constexpr (std::is_same_v<T, float>) if (use_sse2()) {
      // A block of R rows: the decision-gradient pass, or the forward pass 8 lanes wide (AVX)
      // or 4 lanes wide. Single rows of tensors larger than the caches are streamed through
      // scratch.
      for_block_size(rows, mode.stream && rows == 1, [&](auto R, auto Streamed) {
        constexpr int kR = decltype(R)::value;
        constexpr bool kS = decltype(Streamed)::value;
        float* tmp = kS ? S + L : nullptr;
        if (a) gather_block<Grad::Gather, kR, kS>(L, pc, x + bd * L, o + s0, o + s1, a + s0, a + s1, tmp, next, dm);
        else if (!kS && mode.avx) gather_block_avx<kR>(L, pc, x + bd * L, o + s0, o + s1);
        else gather_block<Grad::None, kR, kS>(L, pc, x + bd * L, o + s0, o + s1, nullptr, nullptr, tmp, next, dm);
      });
      return;
    }
#endif
    // One row (rows == 1: for_rows makes blocks only for the SSE2 passes above).
    gather_row<T>(L, pc, x + bd * L, o + s0, o + s1, a ? a + s0 : nullptr, a ? a + s1 : nullptr, next, dm[0]);
  });
  if (ddecision.defined()) reduce_partials<T>(workspace.ptr<T>(), ddecision.ptr<T>(), B, D);
}

template <typename T>
void scatter(const TensorView& seq, const TensorView& decision, const TensorView& dst,
             const TensorView& aux, const TensorView& ddecision, const TensorView& workspace,
             const QuadGeometry& g) {
  const int64_t B = dst.shape[0], D = dst.shape[1], L = g.L();
  const T* s = seq.ptr<T>();
  const T* dec = decision.ptr<T>();
  T* y = dst.ptr<T>();
  const T* a = aux.defined() ? aux.ptr<T>() : nullptr;
  const std::vector<ScatterRun> runs = scatter_runs(g);
  std::vector<std::vector<Piece<T>>> pieces;
  for (int64_t b = 0; b < B; ++b) pieces.push_back(scatter_pieces<T>(g, runs, dec + b * 4));
  const PassMode mode = pass_mode(a ? 3 : 2, B * D * L, y);
  for_rows<T>(B, D, L, mode.prefetch, workspace, [&](int64_t bd, int rows, NextRows<T>& next, T* S, double (*dm)[4]) {
    const int64_t s0 = seq_offset(bd, 0, D, L), s1 = seq_offset(bd, 1, D, L);
    next.add(s + seq_offset(bd + rows, 0, D, L));
    next.add(s + seq_offset(bd + rows, 1, D, L));
    if (a) next.add(a + (bd + rows) * L);
    const auto& pc = pieces[bd / D];
#if defined(__SSE2__)
    if constexpr (std::is_same_v<T, float>) if (use_sse2()) {
      // Blocks of R rows as in gather.
      for_block_size(rows, mode.stream && rows == 1, [&](auto R, auto Streamed) {
        constexpr int kR = decltype(R)::value;
        constexpr bool kS = decltype(Streamed)::value;
        float* tmp = kS ? S + L : nullptr;
        if (a) scatter_block<Grad::Scatter, kR, kS>(L, pc, s + s0, s + s1, y + bd * L, a + bd * L, S, tmp, next, dm);
        else if (!kS && mode.avx) scatter_block_avx<kR>(L, pc, s + s0, s + s1, y + bd * L, S);
        else scatter_block<Grad::None, kR, kS>(L, pc, s + s0, s + s1, y + bd * L, nullptr, S, tmp, next, dm);
      });
      return;
    }
#endif
    // One row (rows == 1: for_rows makes blocks only for the SSE2 passes above).
    scatter_row<T>(L, pc, s + s0, s + s1, y + bd * L, a ? a + bd * L : nullptr, S, next, dm[0]);
  });
  if (ddecision.defined()) reduce_partials<T>(workspace.ptr<T>(), ddecision.ptr<T>(), B, D);
}

void check_cpu(const TensorView& t) {
  QM_CHECK(t.device.is_cpu(), "quad scan CPU kernels got tensors on a CUDA device");
  QM_CHECK(t.dtype == DType::Float32 || t.dtype == DType::Float64,
           "quad scan CPU kernels take float32 or float64 data, got ", dtype_name(t.dtype));
}

}  // namespace

void quad_scan_fwd_cpu(const TensorView& x, const TensorView& decision, const TensorView& out,
                       const QuadGeometry& g) {
  check_quad_scan_fwd_args(x, decision, out, g);
  check_cpu(x);
  if (x.dtype == DType::Float64) gather<double>(x, decision, out, {}, {}, {}, g);
  else gather<float>(x, decision, out, {}, {}, {}, g);
}

void quad_scan_bwd_cpu(const TensorView& x, const TensorView& decision, const TensorView& gout,
                       const TensorView& dx, const TensorView& ddecision, const TensorView& workspace,
                       const QuadGeometry& g) {
  check_quad_scan_bwd_args(x, decision, gout, dx, ddecision, workspace, g);
  check_cpu(x);
  if (x.dtype == DType::Float64) scatter<double>(gout, decision, dx, x, ddecision, workspace, g);
  else scatter<float>(gout, decision, dx, x, ddecision, workspace, g);
}

void quad_merge_fwd_cpu(const TensorView& ys, const TensorView& decision, const TensorView& y,
                        const QuadGeometry& g) {
  check_quad_merge_fwd_args(ys, decision, y, g);
  check_cpu(y);
  if (y.dtype == DType::Float64) scatter<double>(ys, decision, y, {}, {}, {}, g);
  else scatter<float>(ys, decision, y, {}, {}, {}, g);
}

void quad_merge_bwd_cpu(const TensorView& ys, const TensorView& decision, const TensorView& gy,
                        const TensorView& dys, const TensorView& ddecision, const TensorView& workspace,
                        const QuadGeometry& g) {
  check_quad_merge_bwd_args(ys, decision, gy, dys, ddecision, workspace, g);
  check_cpu(gy);
  if (gy.dtype == DType::Float64) gather<double>(gy, decision, dys, ys, ddecision, workspace, g);
  else gather<float>(gy, decision, dys, ys, ddecision, workspace, g);
}

const char* quad_scan_cpu_isa() {
#if defined(__SSE2__)
  if (use_sse2()) return has_avx() ? "avx" : "sse2";
#endif
  return "portable";
}

}  // namespace quadmamba
