// The CPU quad/cross kernels against naive loops written from the definitions, and the
// CUDA kernels against the CPU ones when a device is present.
#include <gtest/gtest.h>

#include <array>
#include <cmath>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "quadmamba/cross_scan.h"
#include "quadmamba/quad_scan.h"
#include "test_support.h"

using namespace quadmamba;
using namespace quadmamba_test;

namespace {

template <typename T>
std::vector<T> randn(size_t n, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> dist;
  std::vector<T> v(n);
  for (auto& e : v) e = static_cast<T>(dist(gen));
  return v;
}

// The orders by nested loops over the (rolled) grid, written from the spec's index form.
struct NaiveOrders {
  std::vector<int64_t> coarse, fine;  // slot -> raster token of the un-rolled input
  std::vector<int> quadrant;          // token -> quadrant on the rolled grid
  NaiveOrders(int64_t H, int64_t W, int64_t sy, int64_t sx, bool official) : quadrant(H * W) {
    sy = ((sy % H) + H) % H;
    sx = ((sx % W) + W) % W;
    auto token = [&](int64_t y, int64_t x) { return ((y - sy + H) % H) * W + (x - sx + W) % W; };
    for (int64_t y = 0; y < H; ++y)
      for (int64_t x = 0; x < W; ++x) quadrant[token(y, x)] = 2 * (y >= H / 2) + (x >= W / 2);
    for (int q1 = 0; q1 < 2; ++q1)
      for (int q2 = 0; q2 < 2; ++q2)
        for (int64_t r = 0; r < H / 2; ++r)
          for (int64_t c = 0; c < W / 2; ++c) coarse.push_back(token(q1 * H / 2 + r, q2 * W / 2 + c));
    for (int q1 = 0; q1 < 2; ++q1)
      for (int a = 0; a < 2; ++a)
        for (int b = 0; b < 2; ++b)
          for (int q4 = 0; q4 < 2; ++q4)
            for (int64_t r = 0; r < H / 4; ++r)
              for (int64_t c = 0; c < W / 4; ++c) {
                const int q2 = official ? b : a, q3 = official ? a : b;
                fine.push_back(token(q1 * H / 2 + q3 * H / 4 + r, q2 * W / 2 + q4 * W / 4 + c));
              }
  }
};

struct Case {
  int64_t B, D, H, W, sy, sx;
  bool official;
};

// The last three have runs of W/4 >= 8 slots (the 8-lane CPU passes, with an overlapping last
// chunk where W/4 is not a multiple of 8) and D >= 4 (blocks of several rows).
const Case kCases[] = {
    {2, 3, 8, 8, 0, 0, false},   {2, 3, 8, 12, 3, -5, false},   {1, 4, 12, 8, -11, 7, true},
    {3, 2, 4, 4, 1, 1, true},    {1, 2, 16, 20, 5, 0, false},   {2, 5, 16, 40, 3, -7, false},
    {1, 9, 24, 56, -2, 5, true}, {1, 4, 32, 32, 4, 4, false},
};

template <typename T>
void check_against_naive(const Case& k) {
  const int64_t B = k.B, D = k.D, H = k.H, W = k.W, L = H * W;
  const QuadOrder order = k.official ? QuadOrder::Official : QuadOrder::Quadtree;
  const QuadGeometry g = make_quad_geometry(H, W, k.sy, k.sx, order);
  const NaiveOrders n(H, W, k.sy, k.sx, k.official);
  std::vector<int64_t> finv(L), cinv(L);
  for (int64_t p = 0; p < L; ++p) {
    finv[n.fine[p]] = p;
    cinv[n.coarse[p]] = p;
  }
  auto x = randn<T>(B * D * L, 1), ys = randn<T>(B * 2 * D * L, 2);
  // One-hot rows plus one blended row (the formula holds for any decision value).
  std::vector<T> dec(B * 4, T(0));
  for (int64_t b = 0; b < B; ++b) dec[b * 4 + (b * 3 + 1) % 4] = T(1);
  dec[0] = T(0.25);
  const DType dt = dtype_of<T>();
  std::vector<T> out(B * 2 * D * L, T(NAN)), y(B * D * L, T(NAN)), dx(B * D * L, T(NAN)),
      dys(B * 2 * D * L, T(NAN)), dd1(B * 4, T(NAN)), dd2(B * 4, T(NAN)), ws(B * D * 4, T(NAN));
  TensorView xv(x.data(), dt, {B, D, H, W}), ysv(ys.data(), dt, {B, 2, D, L}), dv(dec.data(), dt, {B, 4});
  quad_scan_fwd_cpu(xv, dv, TensorView(out.data(), dt, {B, 2, D, L}), g);
  quad_merge_fwd_cpu(ysv, dv, TensorView(y.data(), dt, {B, D, H, W}), g);
  // quad_scan_bwd with gout = ys, quad_merge_bwd with gy = x.
  quad_scan_bwd_cpu(xv, dv, ysv, TensorView(dx.data(), dt, {B, D, H, W}), TensorView(dd1.data(), dt, {B, 4}),
                    TensorView(ws.data(), dt, {B, D, 4}), g);
  quad_merge_bwd_cpu(ysv, dv, xv, TensorView(dys.data(), dt, {B, 2, D, L}), TensorView(dd2.data(), dt, {B, 4}),
                     TensorView(ws.data(), dt, {B, D, 4}), g);
  const double tol = std::is_same<T, float>::value ? 1e-4 : 1e-11;
  for (int64_t b = 0; b < B; ++b) {
    // With gout = ys (quad_scan_bwd) and gy = x (quad_merge_bwd) both decision gradients are
    // sum_{t in q} sum_d x[t] (S[f^-1 t] - S[c^-1 t]), S = ys0 + rev(ys1): the scatter pass
    // and the gather pass must agree with it.
    double dm[4] = {0, 0, 0, 0};
    for (int64_t d = 0; d < D; ++d) {
      const T* xr = x.data() + (b * D + d) * L;
      const T* s0 = ys.data() + (b * 2 * D + d) * L;
      const T* s1 = s0 + D * L;
      auto M = [&](int64_t t) { return dec[b * 4 + n.quadrant[t]]; };
      auto S = [&](int64_t p) { return s0[p] + s1[L - 1 - p]; };
      for (int64_t p = 0; p < L; ++p) {
        const T want = M(n.fine[p]) * xr[n.fine[p]] + (T(1) - M(n.coarse[p])) * xr[n.coarse[p]];
        const T got0 = out[(b * 2 * D + d) * L + p], got1 = out[((b * 2 + 1) * D + d) * L + L - 1 - p];
        ASSERT_NEAR(got0, want, tol * (1 + std::abs(want))) << "scan b=" << b << " d=" << d << " p=" << p;
        ASSERT_EQ(got0, got1) << "reversed direction, p=" << p;
        ASSERT_NEAR(dys[(b * 2 * D + d) * L + p], want, tol * (1 + std::abs(want)));
      }
      for (int64_t t = 0; t < L; ++t) {
        const T want = M(t) * S(finv[t]) + (T(1) - M(t)) * S(cinv[t]);
        ASSERT_NEAR(y[(b * D + d) * L + t], want, tol * (1 + std::abs(want))) << "merge t=" << t;
        ASSERT_NEAR(dx[(b * D + d) * L + t], want, tol * (1 + std::abs(want))) << "scan bwd t=" << t;
        dm[n.quadrant[t]] += double(xr[t]) * (double(S(finv[t])) - double(S(cinv[t])));
      }
    }
    for (int q = 0; q < 4; ++q) {
      EXPECT_NEAR(dd1[b * 4 + q], dm[q], tol * (1 + std::abs(dm[q])) * 10) << "scan bwd b=" << b << " q=" << q;
      EXPECT_NEAR(dd2[b * 4 + q], dm[q], tol * (1 + std::abs(dm[q])) * 10) << "merge bwd b=" << b << " q=" << q;
    }
  }
}

}  // namespace

TEST(QuadScanCpu, MatchesNaiveLoopsFloat) {
  for (const Case& k : kCases) check_against_naive<float>(k);
}

TEST(QuadScanCpu, MatchesNaiveLoopsDouble) {
  for (const Case& k : kCases) check_against_naive<double>(k);
}

template <typename T>
void check_cross_against_naive(int64_t H, int64_t W) {
  const int64_t B = 2, D = 3, L = H * W;
  const DType dt = dtype_of<T>();
  auto x = randn<T>(B * D * L, 3), ys = randn<T>(B * 4 * D * L, 4);
  std::vector<T> out(B * 4 * D * L, NAN), y(B * D * L, NAN);
  cross_scan_fwd_cpu(TensorView(x.data(), dt, {B, D, H, W}), TensorView(out.data(), dt, {B, 4, D, L}));
  cross_merge_fwd_cpu(TensorView(ys.data(), dt, {B, 4, D, L}), TensorView(y.data(), dt, {B, D, H, W}));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t d = 0; d < D; ++d)
      for (int64_t r = 0; r < H; ++r)
        for (int64_t c = 0; c < W; ++c) {
          const int64_t t = r * W + c, s = c * H + r;
          const T v = x[(b * D + d) * L + t];
          auto at = [&](const std::vector<T>& a, int k, int64_t p) { return a[((b * 4 + k) * D + d) * L + p]; };
          ASSERT_EQ(at(out, 0, t), v);
          ASSERT_EQ(at(out, 1, s), v) << H << "x" << W;
          ASSERT_EQ(at(out, 2, L - 1 - t), v);
          ASSERT_EQ(at(out, 3, L - 1 - s), v) << H << "x" << W;
          // The order of the additions is part of the contract: (ys0 + rev ys2) + (ys1 + rev ys3).
          const T want = (at(ys, 0, t) + at(ys, 2, L - 1 - t)) + (at(ys, 1, s) + at(ys, 3, L - 1 - s));
          ASSERT_EQ(y[(b * D + d) * L + t], want) << H << "x" << W;
        }
}

TEST(CrossScanCpu, MatchesNaiveLoops) {
  for (auto [H, W] : {std::pair<int64_t, int64_t>{5, 7}, {8, 12}, {13, 9}, {1, 6}, {7, 1}, {16, 16}}) {
    check_cross_against_naive<float>(H, W);
    check_cross_against_naive<double>(H, W);
  }
}

#if defined(QUADMAMBA_WITH_CUDA)
namespace {

template <typename T>
void expect_close(const std::vector<T>& a, const std::vector<T>& b, double tol, const char* what) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i)
    ASSERT_NEAR(a[i], b[i], tol * (1 + std::abs(double(b[i])))) << what << " at " << i;
}

template <typename T>
void check_cuda_against_cpu(const Case& k, bool soft = false) {
  const int64_t B = k.B, D = k.D, H = k.H, W = k.W, L = H * W;
  const QuadGeometry g =
      make_quad_geometry(H, W, k.sy, k.sx, k.official ? QuadOrder::Official : QuadOrder::Quadtree);
  const DType dt = dtype_of<T>();
  auto x = randn<T>(B * D * L, 5), ys = randn<T>(B * 2 * D * L, 6);
  std::vector<T> dec(B * 4, T(0));
  // One-hot (the forward of the models), or soft values (blended by the formula).
  const T soft_values[4] = {T(0.3), T(0.7), T(0), T(1)};
  for (int64_t b = 0; b < B; ++b)
    for (int q = 0; q < 4; ++q) dec[b * 4 + q] = soft ? soft_values[(q + b) % 4] : T(q == (b + 2) % 4);
  std::vector<T> nan_seq(B * 2 * D * L, T(NAN)), nan_raster(B * D * L, T(NAN)), nan_dec(B * 4, T(NAN)),
      nan_ws(B * D * 4, T(NAN));
  // CPU results.
  auto out = nan_seq, y = nan_raster, dx = nan_raster, dys = nan_seq, dd1 = nan_dec, dd2 = nan_dec, ws = nan_ws;
  TensorView xv(x.data(), dt, {B, D, H, W}), ysv(ys.data(), dt, {B, 2, D, L}), dv(dec.data(), dt, {B, 4});
  quad_scan_fwd_cpu(xv, dv, TensorView(out.data(), dt, {B, 2, D, L}), g);
  quad_merge_fwd_cpu(ysv, dv, TensorView(y.data(), dt, {B, D, H, W}), g);
  quad_scan_bwd_cpu(xv, dv, ysv, TensorView(dx.data(), dt, {B, D, H, W}), TensorView(dd1.data(), dt, {B, 4}),
                    TensorView(ws.data(), dt, {B, D, 4}), g);
  quad_merge_bwd_cpu(ysv, dv, xv, TensorView(dys.data(), dt, {B, 2, D, L}), TensorView(dd2.data(), dt, {B, 4}),
                     TensorView(ws.data(), dt, {B, D, 4}), g);
  // CUDA results into NaN-poisoned buffers.
  DeviceBuffer<T> xd(x), ysd(ys), decd(dec), outd(nan_seq), yd(nan_raster), dxd(nan_raster), dysd(nan_seq),
      dd1d(nan_dec), dd2d(nan_dec), wsd(nan_ws);
  quad_scan_fwd_cuda(xd.view({B, D, H, W}), decd.view({B, 4}), outd.view({B, 2, D, L}), g, nullptr);
  quad_merge_fwd_cuda(ysd.view({B, 2, D, L}), decd.view({B, 4}), yd.view({B, D, H, W}), g, nullptr);
  quad_scan_bwd_cuda(xd.view({B, D, H, W}), decd.view({B, 4}), ysd.view({B, 2, D, L}), dxd.view({B, D, H, W}),
                     dd1d.view({B, 4}), wsd.view({B, D, 4}), g, nullptr);
  quad_merge_bwd_cuda(ysd.view({B, 2, D, L}), decd.view({B, 4}), xd.view({B, D, H, W}),
                      dysd.view({B, 2, D, L}), dd2d.view({B, 4}), wsd.view({B, D, 4}), g, nullptr);
  const double tol = std::is_same<T, float>::value ? 1e-5 : 1e-12;
  expect_close(outd.get(), out, tol, "quad_scan_fwd");
  expect_close(yd.get(), y, tol, "quad_merge_fwd");
  expect_close(dxd.get(), dx, tol, "quad_scan_bwd dx");
  expect_close(dysd.get(), dys, tol, "quad_merge_bwd dys");
  expect_close(dd1d.get(), dd1, tol * 100, "quad_scan_bwd ddecision");
  expect_close(dd2d.get(), dd2, tol * 100, "quad_merge_bwd ddecision");

  // cross_scan / cross_merge on the same grid.
  const std::vector<T> nan_cross(B * 4 * D * L, T(NAN));
  const auto cross_in = randn<T>(B * 4 * D * L, 7);
  auto cross_out = nan_cross, cross_y = nan_raster;
  cross_scan_fwd_cpu(xv, TensorView(cross_out.data(), dt, {B, 4, D, L}));
  cross_merge_fwd_cpu(TensorView(const_cast<T*>(cross_in.data()), dt, {B, 4, D, L}),
                      TensorView(cross_y.data(), dt, {B, D, H, W}));
  DeviceBuffer<T> cross_outd(nan_cross), cross_ind(cross_in), cross_yd(nan_raster);
  cross_scan_fwd_cuda(xd.view({B, D, H, W}), cross_outd.view({B, 4, D, L}), nullptr);
  cross_merge_fwd_cuda(cross_ind.view({B, 4, D, L}), cross_yd.view({B, D, H, W}), nullptr);
  expect_close(cross_outd.get(), cross_out, 0, "cross_scan_fwd");
  expect_close(cross_yd.get(), cross_y, tol, "cross_merge_fwd");
}

// Cases for the CUDA kernels beyond kCases: several channel tiles (kRows = 8) with a
// partial last tile, and several chunks of L per block row.
const Case kCudaCases[] = {
    {2, 19, 32, 24, 5, -3, false}, {1, 64, 64, 64, 9, 17, true}, {3, 9, 16, 16, -2, 6, true},
};

// float16 / bfloat16 data (decision, its gradient and the workspace in float32): the CUDA
// kernels on values rounded to H against the CPU float32 kernels on the same values.
template <typename H>
struct HalfData {
  std::vector<float> f;  // the values, rounded to H
  std::vector<H> h;
  explicit HalfData(std::vector<float> v) : f(std::move(v)), h(f.size()) {
    for (size_t i = 0; i < f.size(); ++i) {
      h[i] = to_elem<H>(f[i]);
      f[i] = static_cast<float>(from_elem(h[i]));
    }
  }
};

template <typename H>
void check_half_against_cpu(const Case& k, double tol) {
  const int64_t B = k.B, D = k.D, H_ = k.H, W = k.W, L = H_ * W;
  const QuadGeometry g =
      make_quad_geometry(H_, W, k.sy, k.sx, k.official ? QuadOrder::Official : QuadOrder::Quadtree);
  const DType f32 = DType::Float32;
  const HalfData<H> x(randn<float>(B * D * L, 15)), ys(randn<float>(B * 2 * D * L, 16)),
      cross_in(randn<float>(B * 4 * D * L, 17));
  std::vector<float> dec(B * 4, 0.f);
  for (int64_t b = 0; b < B; ++b) dec[b * 4 + (b + 1) % 4] = 1.f;
  const std::vector<float> nan_seq(B * 2 * D * L, NAN), nan_raster(B * D * L, NAN), nan_dec(B * 4, NAN),
      nan_ws(B * D * 4, NAN), nan_cross(B * 4 * D * L, NAN);
  auto out = nan_seq, y = nan_raster, dx = nan_raster, dys = nan_seq, dd1 = nan_dec, dd2 = nan_dec, ws = nan_ws,
       cross_out = nan_cross, cross_y = nan_raster;
  TensorView xv(const_cast<float*>(x.f.data()), f32, {B, D, H_, W}),
      ysv(const_cast<float*>(ys.f.data()), f32, {B, 2, D, L}), dv(dec.data(), f32, {B, 4});
  quad_scan_fwd_cpu(xv, dv, TensorView(out.data(), f32, {B, 2, D, L}), g);
  quad_merge_fwd_cpu(ysv, dv, TensorView(y.data(), f32, {B, D, H_, W}), g);
  quad_scan_bwd_cpu(xv, dv, ysv, TensorView(dx.data(), f32, {B, D, H_, W}), TensorView(dd1.data(), f32, {B, 4}),
                    TensorView(ws.data(), f32, {B, D, 4}), g);
  quad_merge_bwd_cpu(ysv, dv, xv, TensorView(dys.data(), f32, {B, 2, D, L}), TensorView(dd2.data(), f32, {B, 4}),
                     TensorView(ws.data(), f32, {B, D, 4}), g);
  cross_scan_fwd_cpu(xv, TensorView(cross_out.data(), f32, {B, 4, D, L}));
  cross_merge_fwd_cpu(TensorView(const_cast<float*>(cross_in.f.data()), f32, {B, 4, D, L}),
                      TensorView(cross_y.data(), f32, {B, D, H_, W}));

  const std::vector<H> hnan_seq(B * 2 * D * L, to_elem<H>(NAN)), hnan_raster(B * D * L, to_elem<H>(NAN)),
      hnan_cross(B * 4 * D * L, to_elem<H>(NAN));
  DeviceBuffer<H> xd(x.h), ysd(ys.h), cind(cross_in.h), outd(hnan_seq), yd(hnan_raster), dxd(hnan_raster),
      dysd(hnan_seq), coutd(hnan_cross), cyd(hnan_raster);
  DeviceBuffer<float> decd(dec), dd1d(nan_dec), dd2d(nan_dec), wsd(nan_ws);
  quad_scan_fwd_cuda(xd.view({B, D, H_, W}), decd.view({B, 4}), outd.view({B, 2, D, L}), g, nullptr);
  quad_merge_fwd_cuda(ysd.view({B, 2, D, L}), decd.view({B, 4}), yd.view({B, D, H_, W}), g, nullptr);
  quad_scan_bwd_cuda(xd.view({B, D, H_, W}), decd.view({B, 4}), ysd.view({B, 2, D, L}), dxd.view({B, D, H_, W}),
                     dd1d.view({B, 4}), wsd.view({B, D, 4}), g, nullptr);
  quad_merge_bwd_cuda(ysd.view({B, 2, D, L}), decd.view({B, 4}), xd.view({B, D, H_, W}), dysd.view({B, 2, D, L}),
                      dd2d.view({B, 4}), wsd.view({B, D, 4}), g, nullptr);
  cross_scan_fwd_cuda(xd.view({B, D, H_, W}), coutd.view({B, 4, D, L}), nullptr);
  cross_merge_fwd_cuda(cind.view({B, 4, D, L}), cyd.view({B, D, H_, W}), nullptr);
  const char* name = std::is_same<H, __half>::value ? "float16" : "bfloat16";
  // Data outputs: one rounding to H (a copy, or a sum of 2 or 4 values).
  expect_close(as<float>(outd.get()), out, tol, (std::string("quad_scan_fwd ") + name).c_str());
  expect_close(as<float>(yd.get()), y, tol, (std::string("quad_merge_fwd ") + name).c_str());
  expect_close(as<float>(dxd.get()), dx, tol, (std::string("quad_scan_bwd dx ") + name).c_str());
  expect_close(as<float>(dysd.get()), dys, tol, (std::string("quad_merge_bwd dys ") + name).c_str());
  expect_close(as<float>(coutd.get()), cross_out, 0, (std::string("cross_scan_fwd ") + name).c_str());
  expect_close(as<float>(cyd.get()), cross_y, tol, (std::string("cross_merge_fwd ") + name).c_str());
  // Decision gradients: float32 sums of the same products, in another order.
  expect_close(dd1d.get(), dd1, 1e-3, (std::string("quad_scan_bwd ddecision ") + name).c_str());
  expect_close(dd2d.get(), dd2, 1e-3, (std::string("quad_merge_bwd ddecision ") + name).c_str());
}

}  // namespace
#endif

TEST(QuadScanCuda, MatchesCpu) {
#if defined(QUADMAMBA_WITH_CUDA)
  if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  for (const Case& k : kCases) {
    check_cuda_against_cpu<float>(k);
    check_cuda_against_cpu<double>(k);
  }
  for (const Case& k : kCudaCases) {
    check_cuda_against_cpu<float>(k);
    check_cuda_against_cpu<double>(k);
  }
  for (const Case& k : {kCases[1], kCases[2], kCudaCases[0]}) {
    check_cuda_against_cpu<float>(k, true);
    check_cuda_against_cpu<double>(k, true);
  }
#else
  GTEST_SKIP() << "built without CUDA kernels";
#endif
}

TEST(QuadScanCuda, HalfAndBFloat16MatchCpu) {
#if defined(QUADMAMBA_WITH_CUDA)
  if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  for (const Case& k : {kCases[0], kCases[2], kCudaCases[0], kCudaCases[2]}) {
    check_half_against_cpu<__half>(k, 1e-3);
    check_half_against_cpu<__nv_bfloat16>(k, 8e-3);
  }
#else
  GTEST_SKIP() << "built without CUDA kernels";
#endif
}

TEST(CrossScanCuda, GridStrideLoopMatchesCpu) {
#if defined(QUADMAMBA_WITH_CUDA)
  if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  // B * D * L = 2,129,920 outputs per direction: more than the grid's 4096 blocks of 256
  // threads, so threads take further turns of the grid-stride loop; then a batch of 65537
  // (the batch is not a grid dimension: no limit of 65535).
  for (const auto [B, D, H, W] : {std::array<int64_t, 4>{2, 65, 128, 128}, {65537, 1, 4, 4}}) {
    const int64_t L = H * W;
    const auto x = randn<float>(B * D * L, 21), ys = randn<float>(B * 4 * D * L, 22);
    std::vector<float> out(B * 4 * D * L, NAN), y(B * D * L, NAN);
    cross_scan_fwd_cpu(TensorView(const_cast<float*>(x.data()), DType::Float32, {B, D, H, W}),
                       TensorView(out.data(), DType::Float32, {B, 4, D, L}));
    cross_merge_fwd_cpu(TensorView(const_cast<float*>(ys.data()), DType::Float32, {B, 4, D, L}),
                        TensorView(y.data(), DType::Float32, {B, D, H, W}));
    DeviceBuffer<float> xd(x), ysd(ys), outd(std::vector<float>(out.size(), NAN)), yd(std::vector<float>(y.size(), NAN));
    cross_scan_fwd_cuda(xd.view({B, D, H, W}), outd.view({B, 4, D, L}), nullptr);
    cross_merge_fwd_cuda(ysd.view({B, 4, D, L}), yd.view({B, D, H, W}), nullptr);
    expect_close(outd.get(), out, 0, "cross_scan_fwd");
    expect_close(yd.get(), y, 1e-6, "cross_merge_fwd");
  }
#else
  GTEST_SKIP() << "built without CUDA kernels";
#endif
}

// The device guard of the CUDA entry points, on the emulation's devices and primary contexts:
// an op on device 1, called from a thread that never used device 0 (its current device is the
// default 0), must not create a context on device 0 when it hands the thread back; a thread
// that did use device 0 gets it back as its current device.
TEST(CudaDeviceGuard, RestoresThePreviousDeviceOnlyWhereItHasAContext) {
#if defined(QUADMAMBA_CUDA_EMULATOR)
  const int64_t B = 1, D = 2, H = 4, W = 4, L = H * W;
  DeviceBuffer<float> x(randn<float>(B * D * L, 31)), out(std::vector<float>(B * 4 * D * L, NAN));
  const TensorView xv(x.ptr, DType::Float32, {B, D, H, W}, Device{1});
  const TensorView ov(out.ptr, DType::Float32, {B, 4, D, L}, Device{1});
  qm_emu::set_device_count(2);  // every context inactive
  int after = -1;
  std::thread([&] {
    cross_scan_fwd_cuda(xv, ov, nullptr);
    cudaGetDevice(&after);
  }).join();
  EXPECT_EQ(after, 1) << "a thread without a context on device 0 keeps device 1 current";
  EXPECT_FALSE(qm_emu::primary_context_active(0)) << "the guard created a context on device 0";
  EXPECT_TRUE(qm_emu::primary_context_active(1));
  std::thread([&] {
    cudaSetDevice(0);
    cross_scan_fwd_cuda(xv, ov, nullptr);
    cudaGetDevice(&after);
  }).join();
  EXPECT_EQ(after, 0) << "device 0, used by the thread, is current again";
  qm_emu::set_device_count(1);
#elif defined(QUADMAMBA_WITH_CUDA)
  GTEST_SKIP() << "needs the CUDA emulation (devices without a context cannot be arranged on real GPUs)";
#else
  GTEST_SKIP() << "built without CUDA kernels";
#endif
}

TEST(QuadScanCpu, ReportsItsInstructionSet) {
  const std::string isa = quad_scan_cpu_isa();
  EXPECT_TRUE(isa == "avx" || isa == "sse2" || isa == "portable") << isa;
}

namespace {

// The message of the Error that f throws ("" if none).
template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST(QuadScanCpu, RejectsGeometriesMadeByHand) {
  std::vector<float> x(64, 1.f), out(128), dec{1.f, 0.f, 0.f, 0.f};
  const TensorView vx(x.data(), DType::Float32, {1, 1, 8, 8}), vout(out.data(), DType::Float32, {1, 2, 1, 64}),
      vdec(dec.data(), DType::Float32, {1, 4});
  QuadGeometry g = make_quad_geometry(8, 8, 0, 0, QuadOrder::Quadtree);
  EXPECT_EQ(error_of([&] { quad_scan_fwd_cpu(vx, vdec, vout, g); }), "");
  QuadGeometry bad = g;
  bad.sx = 19;  // out of the grid: would read past x
  EXPECT_NE(error_of([&] { quad_scan_fwd_cpu(vx, vdec, vout, bad); }).find("0 <= sx < W"), std::string::npos);
  bad = g;
  bad.sy = -5;
  EXPECT_NE(error_of([&] { quad_merge_fwd_cpu(vout, vdec, vx, bad); }).find("0 <= sy < H"), std::string::npos);
  bad = g;
  bad.H = bad.W = 6;  // not multiples of 4 (the tensors would have to match it, too)
  EXPECT_NE(error_of([&] { quad_scan_fwd_cpu(vx, vdec, vout, bad); }).find("multiples of 4"), std::string::npos);
  bad = g;
  bad.order = static_cast<QuadOrder>(7);
  EXPECT_NE(error_of([&] { quad_scan_fwd_cpu(vx, vdec, vout, bad); }).find("unknown order"), std::string::npos);
}

TEST(QuadScanCpu, MessagesNameTheWrongArgument) {
  // Outputs with a wrong channel count are named, not the inputs they were compared with.
  std::vector<float> x(2 * 3 * 16, 1.f), seq(2 * 2 * 3 * 16), dx(2 * 4 * 16), dec(8, 0.f), dd(8), ws(2 * 3 * 4),
      y4(2 * 4 * 16), ys4(2 * 4 * 3 * 16);
  for (int b = 0; b < 2; ++b) dec[b * 4] = 1.f;
  const TensorView vx(x.data(), DType::Float32, {2, 3, 4, 4}), vseq(seq.data(), DType::Float32, {2, 2, 3, 16}),
      vdec(dec.data(), DType::Float32, {2, 4}), vdd(dd.data(), DType::Float32, {2, 4}),
      vws(ws.data(), DType::Float32, {2, 3, 4}), vbad(dx.data(), DType::Float32, {2, 4, 4, 4});
  const QuadGeometry g = make_quad_geometry(4, 4, 0, 0, QuadOrder::Quadtree);
  EXPECT_NE(error_of([&] { quad_scan_bwd_cpu(vx, vdec, vseq, vbad, vdd, vws, g); }).find("dx has size 4"),
            std::string::npos);
  EXPECT_NE(error_of([&] { quad_merge_fwd_cpu(vseq, vdec, vbad, g); }).find("y has size 4"), std::string::npos);
  const TensorView vys4(ys4.data(), DType::Float32, {2, 4, 3, 16}), vy4(y4.data(), DType::Float32, {2, 4, 4, 4});
  EXPECT_NE(error_of([&] { cross_merge_fwd_cpu(vys4, vy4); }).find("y has size 4"), std::string::npos);
  std::vector<float> tiny(4);
  const TensorView neg(tiny.data(), DType::Float32, {1, 1, -3, -5}), out4(tiny.data(), DType::Float32, {1, 4, 1, 15});
  EXPECT_NE(error_of([&] { cross_scan_fwd_cpu(neg, out4); }).find("negative size"), std::string::npos);
}
