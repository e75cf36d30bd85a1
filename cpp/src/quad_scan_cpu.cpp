// quad_scan / quad_merge on the CPU (contract in quad_scan.h).
//
// Parallel over the (b, d) rows. Within a row the work goes in runs of w4 = W/4
// consecutive slots: each run reads (gather) or writes (scatter) one contiguous row
// segment of the grid, split in two where the roll wraps it around the right edge.
// The decision gradient: each run's sum (at most W/4 terms, fixed vectorised order) is
// added to the row's double accumulators, stored per (b, d) in the workspace and summed
// over d in order, so the result does not depend on threading.
#include <algorithm>
#include <vector>

#include "quadmamba/parallel.h"
#include "quadmamba/quad_scan.h"

namespace quadmamba {

QuadGeometry make_quad_geometry(int64_t H, int64_t W, int64_t sy, int64_t sx, QuadOrder order) {
  QM_CHECK(H > 0 && W > 0 && H % 4 == 0 && W % 4 == 0,
           "quad scan needs H and W positive multiples of 4, got ", H, "x", W);
  QM_CHECK(sy > -H && sy < H && sx > -W && sx < W, "shift must satisfy |sy| < H and |sx| < W, got (",
           sy, ", ", sx, ") for ", H, "x", W);
  QM_CHECK(order == QuadOrder::Quadtree || order == QuadOrder::Official, "unknown quad order ",
           static_cast<int>(order));
  QuadGeometry g;
  g.H = H;
  g.W = W;
  g.sy = wrap_index(sy, H);
  g.sx = wrap_index(sx, W);
  g.order = order;
  return g;
}

void check_quad_args(const TensorView& raster, const char* raster_name, const TensorView& seq,
                     const char* seq_name, const TensorView& decision, const TensorView& ddecision,
                     const TensorView& workspace, const QuadGeometry& g) {
  const DType t = raster.dtype;
  const Device dev = raster.device;
  const DType acc = t == DType::Float64 ? DType::Float64 : DType::Float32;
  QM_CHECK(t == DType::Float32 || t == DType::Float64 || t == DType::Float16 || t == DType::BFloat16,
           raster_name, " must be a floating dtype, got ", dtype_name(t));
  check_view(raster, raster_name, 4, t, dev);
  const int64_t B = raster.shape[0], D = raster.shape[1];
  check_shape(raster, raster_name, {B, D, g.H, g.W});
  check_view(seq, seq_name, 4, t, dev);
  check_shape(seq, seq_name, {B, 2, D, g.L()});
  check_view(decision, "decision", 2, acc, dev);
  check_shape(decision, "decision", {B, 4});
  if (ddecision.defined()) {
    check_view(ddecision, "ddecision", 2, acc, dev);
    check_shape(ddecision, "ddecision", {B, 4});
    check_view(workspace, "workspace", 3, acc, dev);
    check_shape(workspace, "workspace", {B, D, 4});
  }
}

namespace {

// dst[0:n] (=|+=) coef * src[0:n], with coef == 1 as a plain copy.
template <typename T>
inline void axpy_run(T* dst, const T* src, int64_t n, T coef, bool accumulate) {
  if (!accumulate) {
    if (coef == T(1)) {
      for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
    } else {
      for (int64_t i = 0; i < n; ++i) dst[i] = coef * src[i];
    }
  } else if (coef == T(1)) {
    for (int64_t i = 0; i < n; ++i) dst[i] += src[i];
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] += coef * src[i];
  }
}

// Calls fn(offset_in_run, column, length) for the (at most two) contiguous pieces of
// the run of n columns starting at column x0 of a row of width W that wraps around.
template <typename F>
inline void for_pieces(int64_t x0, int64_t n, int64_t W, const F& fn) {
  const int64_t first = std::min(n, W - x0);
  fn(int64_t{0}, x0, first);
  if (first < n) fn(first, int64_t{0}, n - first);
}

// Sums of one run (at most W/4 terms) in T with a fixed vectorised order, added to the
// row's double accumulators by the callers.
#if defined(QUADMAMBA_WITH_OPENMP)
#define QM_SIMD_SUM _Pragma("omp simd reduction(+ : s)")
#else
#define QM_SIMD_SUM
#endif

template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  T s = 0;
  QM_SIMD_SUM
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// sum_i a[i] * (b[i] - c[i]).
template <typename T>
inline T dot_diff(const T* a, const T* b, const T* c, int64_t n) {
  T s = 0;
  QM_SIMD_SUM
  for (int64_t i = 0; i < n; ++i) s += a[i] * (b[i] - c[i]);
  return s;
}

// S[p] = s0[p] + s1[L-1-p].
template <typename T>
inline void fold_directions(const T* s0, const T* s1, int64_t L, T* S) {
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

// Gather pass for one (b, d) row: out0/out1 from the raster row src (quad_scan_fwd),
// and when aux0 is given, dm[q] += the gather form of the decision gradient with
// S = aux0 + reverse(aux1) (quad_merge_bwd).
template <typename T>
void gather_row(const QuadGeometry& g, const std::vector<GatherRun>& runs, const T* src, const T* dec,
                T* out0, T* out1, const T* aux0, const T* aux1, T* S, double* dm) {
  const int64_t W = g.W, L = g.L(), R = g.run();
  if (aux0) fold_directions(aux0, aux1, L, S);
  for (const GatherRun& run : runs) {
    const T* row_f = src + run.row_f;
    const T* row_c = src + run.row_c;
    const T cf = dec[run.q_f], cc = T(1) - dec[run.q_c];
    T* o = out0 + run.p0;
    bool written = false;
    if (cf != T(0)) {
      for_pieces(run.col_f, R, W, [&](int64_t i, int64_t col, int64_t n) { axpy_run(o + i, row_f + col, n, cf, false); });
      written = true;
    }
    if (cc != T(0)) {
      for_pieces(run.col_c, R, W, [&](int64_t i, int64_t col, int64_t n) { axpy_run(o + i, row_c + col, n, cc, written); });
      written = true;
    }
    if (!written) std::fill(o, o + R, T(0));
    if (aux0) {
      // dM[Q(f(p))] += src[f(p)] * S[p];  dM[Q(c(p))] -= src[c(p)] * S[p].
      const T* s = S + run.p0;
      for_pieces(run.col_f, R, W, [&](int64_t i, int64_t col, int64_t n) { dm[run.q_f] += dot(row_f + col, s + i, n); });
      for_pieces(run.col_c, R, W, [&](int64_t i, int64_t col, int64_t n) { dm[run.q_c] -= dot(row_c + col, s + i, n); });
    }
  }
  for (int64_t p = 0; p < L; ++p) out1[p] = out0[L - 1 - p];
}

// Scatter pass for one (b, d) row: the raster row dst from s0/s1 (quad_merge_fwd), and
// when aux is given, dm[q] += the scatter form of the decision gradient with the raster
// row aux (quad_scan_bwd).
template <typename T>
void scatter_row(const QuadGeometry& g, const std::vector<ScatterRun>& runs, const T* s0, const T* s1,
                 const T* dec, T* dst, const T* aux, T* S, double* dm) {
  const int64_t W = g.W, L = g.L(), R = g.run();
  fold_directions(s0, s1, L, S);
  for (const ScatterRun& run : runs) {
    T* row = dst + run.row;
    const T* aux_row = aux ? aux + run.row : nullptr;
    const T m = dec[run.q], cc = T(1) - m;
    for_pieces(run.col, R, W, [&](int64_t i, int64_t c, int64_t n) {
      const T* sf = S + run.p_f + i;
      const T* sc = S + run.p_c + i;
      bool written = false;
      if (m != T(0)) {
        axpy_run(row + c, sf, n, m, false);
        written = true;
      }
      if (cc != T(0)) {
        axpy_run(row + c, sc, n, cc, written);
        written = true;
      }
      if (!written) std::fill(row + c, row + c + n, T(0));
      if (aux_row) {
        // dM[q] += sum_t aux[t] * (S[f^-1(t)] - S[c^-1(t)]).
        dm[run.q] += dot_diff(aux_row + c, sf, sc, n);
      }
    });
  }
}

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

// Runs `row(b, d, S, dm)` for every (b, d) in parallel; S is a row-sized scratch buffer
// and dm the row's 4 decision-gradient partials (copied to workspace when given).
template <typename T, typename F>
void for_rows(int64_t B, int64_t D, int64_t L, const TensorView& workspace, const F& row) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(L, 1));
  parallel_for(0, B * D, grain, [&](int64_t lo, int64_t hi) {
    std::vector<T> S(static_cast<size_t>(L));
    for (int64_t bd = lo; bd < hi; ++bd) {
      double dm[4] = {0, 0, 0, 0};
      row(bd / D, bd % D, S.data(), dm);
      if (workspace.defined()) {
        for (int q = 0; q < 4; ++q) workspace.ptr<T>()[bd * 4 + q] = static_cast<T>(dm[q]);
      }
    }
  });
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
  for_rows<T>(B, D, L, workspace, [&](int64_t b, int64_t d, T* S, double* dm) {
    const int64_t seq0 = ((b * 2) * D + d) * L, seq1 = ((b * 2 + 1) * D + d) * L;
    gather_row<T>(g, runs, x + (b * D + d) * L, dec + b * 4, o + seq0, o + seq1, a ? a + seq0 : nullptr,
                  a ? a + seq1 : nullptr, S, dm);
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
  for_rows<T>(B, D, L, workspace, [&](int64_t b, int64_t d, T* S, double* dm) {
    const int64_t seq0 = ((b * 2) * D + d) * L, seq1 = ((b * 2 + 1) * D + d) * L;
    const int64_t r = (b * D + d) * L;
    scatter_row<T>(g, runs, s + seq0, s + seq1, dec + b * 4, y + r, a ? a + r : nullptr, S, dm);
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
  check_quad_args(x, "x", out, "out", decision, TensorView{}, TensorView{}, g);
  check_cpu(x);
  if (x.dtype == DType::Float64) gather<double>(x, decision, out, {}, {}, {}, g);
  else gather<float>(x, decision, out, {}, {}, {}, g);
}

void quad_scan_bwd_cpu(const TensorView& x, const TensorView& decision, const TensorView& gout,
                       const TensorView& dx, const TensorView& ddecision, const TensorView& workspace,
                       const QuadGeometry& g) {
  check_quad_args(x, "x", gout, "gout", decision, ddecision, workspace, g);
  check_quad_args(dx, "dx", gout, "gout", decision, TensorView{}, TensorView{}, g);
  QM_CHECK(ddecision.defined(), "ddecision is required");
  check_cpu(x);
  if (x.dtype == DType::Float64) scatter<double>(gout, decision, dx, x, ddecision, workspace, g);
  else scatter<float>(gout, decision, dx, x, ddecision, workspace, g);
}

void quad_merge_fwd_cpu(const TensorView& ys, const TensorView& decision, const TensorView& y,
                        const QuadGeometry& g) {
  check_quad_args(y, "y", ys, "ys", decision, TensorView{}, TensorView{}, g);
  check_cpu(y);
  if (y.dtype == DType::Float64) scatter<double>(ys, decision, y, {}, {}, {}, g);
  else scatter<float>(ys, decision, y, {}, {}, {}, g);
}

void quad_merge_bwd_cpu(const TensorView& ys, const TensorView& decision, const TensorView& gy,
                        const TensorView& dys, const TensorView& ddecision, const TensorView& workspace,
                        const QuadGeometry& g) {
  check_quad_args(gy, "gy", ys, "ys", decision, ddecision, workspace, g);
  check_quad_args(gy, "gy", dys, "dys", decision, TensorView{}, TensorView{}, g);
  QM_CHECK(ddecision.defined(), "ddecision is required");
  check_cpu(gy);
  if (gy.dtype == DType::Float64) gather<double>(gy, decision, dys, ys, ddecision, workspace, g);
  else gather<float>(gy, decision, dys, ys, ddecision, workspace, g);
}

}  // namespace quadmamba
