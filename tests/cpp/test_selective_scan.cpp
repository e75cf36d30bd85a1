// Tests of the selective scan core: hand-computed short sequences, the CPU kernels
// against a naive loop (forward and backward, float and double), and CPU against
// CUDA when a device is present.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "quadmamba/selective_scan.h"
#include "test_support.h"

using namespace quadmamba;
using namespace quadmamba_test;

namespace {

struct Shape {
  int64_t batch, groups, per_group, dstate, length;
  bool with_D, with_bias, softplus;
  int64_t channels() const { return groups * per_group; }
  std::string str() const {
    return "B=" + std::to_string(batch) + " K=" + std::to_string(groups) + " Dg=" +
           std::to_string(per_group) + " N=" + std::to_string(dstate) + " L=" +
           std::to_string(length) + " D=" + std::to_string(with_D) + " bias=" +
           std::to_string(with_bias) + " softplus=" + std::to_string(softplus);
  }
};

// All inputs and outputs of one call, in double (converted to T for the kernels). With
// rank > 0 the kernels take the low-rank delta (lowrank (B, K, R, L), proj (KD, R)), and delta
// holds its projection (what naive() reads).
struct Problem {
  Shape s;
  std::vector<double> u, delta, A, B, C, D, bias, dy;
  int64_t rank = 0;
  std::vector<double> lowrank, proj;
};

Problem make_problem(const Shape& s, uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::uniform_real_distribution<double> uniform(0.0, 1.0);
  Problem p;
  p.s = s;
  const int64_t KD = s.channels(), L = s.length, N = s.dstate;
  const int64_t rows = s.batch * KD * L, bc = s.batch * s.groups * N * L;
  for (int64_t i = 0; i < rows; ++i) {
    p.u.push_back(normal(gen));
    p.delta.push_back(s.softplus ? 0.5 * normal(gen) - 1.0 : 0.5 * uniform(gen) + 0.05);
    p.dy.push_back(normal(gen));
  }
  for (int64_t i = 0; i < KD * N; ++i) p.A.push_back(-(2.0 * uniform(gen) + 0.2));
  for (int64_t i = 0; i < bc; ++i) {
    p.B.push_back(normal(gen));
    p.C.push_back(normal(gen));
  }
  if (s.with_D)
    for (int64_t i = 0; i < KD; ++i) p.D.push_back(normal(gen));
  if (s.with_bias)
    for (int64_t i = 0; i < KD; ++i) p.bias.push_back(0.3 * (s.softplus ? normal(gen) : uniform(gen)));
  return p;
}

// p with a rank-R delta: lowrank, proj drawn positive (delta in (0, 0.5): bounded decays with
// and without softplus), delta their projection.
Problem with_low_rank(Problem p, int64_t R, uint32_t seed) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<double> uniform(0.0, 1.0);
  const Shape& s = p.s;
  const int64_t KD = s.channels(), L = s.length, Dg = s.per_group;
  p.rank = R;
  p.lowrank.clear();
  p.proj.clear();
  for (int64_t i = 0; i < s.batch * s.groups * R * L; ++i) p.lowrank.push_back(0.05 + 0.95 * uniform(gen));
  for (int64_t i = 0; i < KD * R; ++i) p.proj.push_back(0.5 / R * uniform(gen));
  for (int64_t b = 0; b < s.batch; ++b)
    for (int64_t d = 0; d < KD; ++d)
      for (int64_t t = 0; t < L; ++t) {
        double v = 0.0;
        for (int64_t r = 0; r < R; ++r) v += p.proj[d * R + r] * p.lowrank[((b * s.groups + d / Dg) * R + r) * L + t];
        p.delta[(b * KD + d) * L + t] = v;
      }
  return p;
}

struct Grads {
  std::vector<double> y, du, ddelta, dA, dB, dC, dD, dbias;
};

double softplus(double x) { return x > 20.0 ? x : std::log1p(std::exp(x)); }
double sigmoid(double x) { return x > 20.0 ? 1.0 : 1.0 / (1.0 + std::exp(-x)); }

// The contract's formulas, one step at a time, every state stored.
Grads naive(const Problem& p) {
  const Shape& s = p.s;
  const int64_t KD = s.channels(), L = s.length, N = s.dstate, Dg = s.per_group;
  Grads g;
  g.y.assign(s.batch * KD * L, 0.0);
  g.du = g.y;
  g.ddelta = g.y;
  g.dA.assign(KD * N, 0.0);
  g.dB.assign(s.batch * s.groups * N * L, 0.0);
  g.dC = g.dB;
  g.dD.assign(KD, 0.0);
  g.dbias.assign(KD, 0.0);
  for (int64_t b = 0; b < s.batch; ++b) {
    for (int64_t d = 0; d < KD; ++d) {
      const int64_t k = d / Dg, row = (b * KD + d) * L, bk = (b * s.groups + k) * N * L;
      const double Dv = s.with_D ? p.D[d] : 0.0, bias = s.with_bias ? p.bias[d] : 0.0;
      std::vector<double> x(L), dl(L), h((L + 1) * N, 0.0), a(L * N);  // h[(t + 1) N + n] = h_t
      for (int64_t t = 0; t < L; ++t) {
        x[t] = p.delta[row + t] + bias;
        dl[t] = s.softplus ? softplus(x[t]) : x[t];
        double y = Dv * p.u[row + t];
        for (int64_t n = 0; n < N; ++n) {
          a[t * N + n] = std::exp(dl[t] * p.A[d * N + n]);
          h[(t + 1) * N + n] = a[t * N + n] * h[t * N + n] + dl[t] * p.u[row + t] * p.B[bk + n * L + t];
          y += p.C[bk + n * L + t] * h[(t + 1) * N + n];
        }
        g.y[row + t] = y;
      }
      std::vector<double> q(N, 0.0), anext(N, 1.0);
      for (int64_t t = L - 1; t >= 0; --t) {
        const double gt = p.dy[row + t], ut = p.u[row + t];
        double dus = 0.0, ddl = 0.0;
        for (int64_t n = 0; n < N; ++n) {
          const double Bv = p.B[bk + n * L + t], Cv = p.C[bk + n * L + t];
          q[n] = Cv * gt + anext[n] * q[n];
          const double hprev = h[t * N + n], ht = h[(t + 1) * N + n], at = a[t * N + n];
          g.dC[bk + n * L + t] += gt * ht;
          g.dB[bk + n * L + t] += q[n] * dl[t] * ut;
          dus += q[n] * Bv;
          ddl += q[n] * (p.A[d * N + n] * at * hprev + Bv * ut);
          g.dA[d * N + n] += dl[t] * q[n] * at * hprev;
          anext[n] = at;
        }
        g.du[row + t] = Dv * gt + dl[t] * dus;
        const double dd = s.softplus ? ddl * sigmoid(x[t]) : ddl;
        g.ddelta[row + t] = dd;
        g.dbias[d] += dd;
        g.dD[d] += gt * ut;
      }
    }
  }
  return g;
}

// Runs the CPU kernels in precision T; outputs are pre-filled with NaN.
template <typename T>
Grads run_cpu(const Problem& p) {
  const Shape& s = p.s;
  const int64_t KD = s.channels(), L = s.length, N = s.dstate, Bn = s.batch, K = s.groups;
  auto u = as<T>(p.u), delta = as<T>(p.rank ? p.lowrank : p.delta), A = as<T>(p.A), B = as<T>(p.B),
       C = as<T>(p.C), D = as<T>(p.D), bias = as<T>(p.bias), dy = as<T>(p.dy), proj = as<T>(p.proj);
  const DType dt = dtype_of<T>();
  const TensorView vu(u.data(), dt, {Bn, KD, L}),
      vdelta = p.rank ? TensorView(delta.data(), dt, {Bn, K, p.rank, L}) : TensorView(delta.data(), dt, {Bn, KD, L}),
      vA(A.data(), dt, {KD, N}), vB(B.data(), dt, {Bn, K, N, L}), vC(C.data(), dt, {Bn, K, N, L}),
      vdy(dy.data(), dt, {Bn, KD, L});
  const TensorView vproj = p.rank ? TensorView(proj.data(), dt, {KD, p.rank}) : TensorView();
  const TensorView vD = s.with_D ? TensorView(D.data(), dt, {KD}) : TensorView();
  const TensorView vbias = s.with_bias ? TensorView(bias.data(), dt, {KD}) : TensorView();
  const T nan = std::nan("");
  std::vector<T> y(u.size(), nan), du(u.size(), nan), ddelta(u.size(), nan), dA(A.size(), nan),
      dB(B.size(), nan), dC(C.size(), nan), dD(KD, nan), dbias(KD, nan);
  const auto params = selective_scan_params(vu, vdelta, vA, vB, vC, vD, vbias, s.softplus, vproj);
  selective_scan_fwd_cpu(params, vu, vdelta, vA, vB, vC, vD, vbias, TensorView(y.data(), dt, {Bn, KD, L}), vproj);
  selective_scan_bwd_cpu(params, vu, vdelta, vA, vB, vC, vD, vbias, vdy,
                         TensorView(du.data(), dt, {Bn, KD, L}), TensorView(ddelta.data(), dt, {Bn, KD, L}),
                         TensorView(dA.data(), dt, {KD, N}), TensorView(dB.data(), dt, {Bn, K, N, L}),
                         TensorView(dC.data(), dt, {Bn, K, N, L}), TensorView(dD.data(), dt, {KD}),
                         TensorView(dbias.data(), dt, {KD}), vproj);
  auto back = [](const std::vector<T>& v) { return std::vector<double>(v.begin(), v.end()); };
  return Grads{back(y), back(du), back(ddelta), back(dA), back(dB), back(dC), back(dD), back(dbias)};
}

// |a - e| <= atol * max|e| + rtol * |e| elementwise; NaN fails.
void expect_close(const std::vector<double>& actual, const std::vector<double>& expected,
                  const std::string& what, double rtol, double atol) {
  ASSERT_EQ(actual.size(), expected.size()) << what;
  double scale = 1e-30;
  for (double e : expected) scale = std::max(scale, std::fabs(e));
  for (size_t i = 0; i < actual.size(); ++i) {
    const double err = std::fabs(actual[i] - expected[i]);
    ASSERT_TRUE(err <= atol * scale + rtol * std::fabs(expected[i]))
        << what << " index " << i << ": got " << actual[i] << ", expected " << expected[i]
        << " (err " << err << ", scale " << scale << ")";
  }
}

void expect_grads(const Grads& a, const Grads& e, const Shape& s, const std::string& tag, double rtol,
                  double atol) {
  const std::string where = tag + " " + s.str();
  expect_close(a.y, e.y, "y " + where, rtol, atol);
  expect_close(a.du, e.du, "du " + where, rtol, atol);
  expect_close(a.ddelta, e.ddelta, "ddelta " + where, rtol, atol);
  expect_close(a.dA, e.dA, "dA " + where, rtol, atol);
  expect_close(a.dB, e.dB, "dB " + where, rtol, atol);
  expect_close(a.dC, e.dC, "dC " + where, rtol, atol);
  expect_close(a.dD, e.dD, "dD " + where, rtol, atol);
  expect_close(a.dbias, e.dbias, "dbias " + where, rtol, atol);
}

const std::vector<Shape> kShapes = {
    {1, 1, 1, 1, 1, true, true, true},     {2, 2, 3, 4, 63, false, true, true},
    {1, 4, 9, 16, 64, true, false, false}, {2, 1, 8, 1, 65, true, true, true},
    {1, 2, 16, 2, 129, false, false, true}, {3, 2, 5, 1, 200, true, true, false},
    {1, 1, 17, 3, 128, true, true, true},
};

}  // namespace

TEST(SelectiveScanCpu, HandComputedShortSequences) {
  // One channel, N = 1, no softplus: dl = delta, a_t = exp(dl_t A), h_t = a_t h_{t-1} + dl_t u_t B_t.
  const double u[3] = {1.0, -2.0, 0.5}, delta[3] = {0.5, 0.25, 1.0}, Bv[3] = {2.0, 1.0, -1.0},
               Cv[3] = {1.0, 3.0, 2.0};
  const double A = -1.0, Dskip = 0.5;
  for (int64_t L = 1; L <= 3; ++L) {
    double h = 0.0, expected[3];
    for (int t = 0; t < L; ++t) {
      h = std::exp(delta[t] * A) * h + delta[t] * u[t] * Bv[t];
      expected[t] = Cv[t] * h + Dskip * u[t];
    }
    // Written out for L = 2: h0 = 0.5*1*2 = 1, y0 = 1 + 0.5 = 1.5;
    // h1 = exp(-0.25) + 0.25*(-2)*1, y1 = 3 h1 - 1.
    if (L >= 2) {
      EXPECT_NEAR(expected[0], 1.5, 1e-15);
      EXPECT_NEAR(expected[1], 3.0 * (std::exp(-0.25) - 0.5) - 1.0, 1e-15);
    }
    std::vector<double> vu(u, u + L), vdelta(delta, delta + L), vB(Bv, Bv + L), vC(Cv, Cv + L);
    std::vector<double> vA{A}, vD{Dskip}, y(L, std::nan(""));
    const TensorView tu(vu.data(), DType::Float64, {1, 1, L}), tdelta(vdelta.data(), DType::Float64, {1, 1, L}),
        tA(vA.data(), DType::Float64, {1, 1}), tB(vB.data(), DType::Float64, {1, 1, 1, L}),
        tC(vC.data(), DType::Float64, {1, 1, 1, L}), tD(vD.data(), DType::Float64, {1});
    const auto p = selective_scan_params(tu, tdelta, tA, tB, tC, tD, TensorView(), false);
    selective_scan_fwd_cpu(p, tu, tdelta, tA, tB, tC, tD, TensorView(),
                           TensorView(y.data(), DType::Float64, {1, 1, L}));
    for (int t = 0; t < L; ++t) EXPECT_NEAR(y[t], expected[t], 1e-14) << "L=" << L << " t=" << t;
  }
}

TEST(SelectiveScanCpu, MatchesNaiveLoopDouble) {
  uint32_t seed = 1;
  for (const Shape& s : kShapes) {
    const Problem p = make_problem(s, seed++);
    expect_grads(run_cpu<double>(p), naive(p), s, "double", 1e-10, 1e-10);
  }
}

TEST(SelectiveScanCpu, MatchesNaiveLoopFloat) {
  uint32_t seed = 100;
  for (const Shape& s : kShapes) {
    const Problem p = make_problem(s, seed++);
    expect_grads(run_cpu<float>(p), naive(p), s, "float", 1e-4, 1e-5);
  }
}

// A low-rank delta (delta_proj) gives what its projection gives as a full delta: the contract's
// loop on the projected delta, ddelta its gradient (R = 1, 3, 16; rows of 1-3 tiles, 8-lane
// groups full and partial).
TEST(SelectiveScanCpu, LowRankDeltaMatchesItsProjection) {
  uint32_t seed = 300;
  for (const Shape& s : kShapes) {
    for (const int64_t R : {1, 3, 16}) {
      const Problem p = with_low_rank(make_problem(s, seed), R, seed + 1);
      seed += 2;
      expect_grads(run_cpu<double>(p), naive(p), s, "double R=" + std::to_string(R), 1e-10, 1e-10);
      expect_grads(run_cpu<float>(p), naive(p), s, "float R=" + std::to_string(R), 1e-4, 1e-5);
    }
  }
}

TEST(SelectiveScanCpu, LowRankDeltaShapesAreChecked) {
  std::vector<float> buf(4096, 0.5f);
  const TensorView u(buf.data(), DType::Float32, {1, 4, 8}), A(buf.data(), DType::Float32, {4, 1}),
      B(buf.data(), DType::Float32, {1, 2, 1, 8}), low(buf.data(), DType::Float32, {1, 2, 3, 8}),
      proj(buf.data(), DType::Float32, {4, 3});
  const auto p = selective_scan_params(u, low, A, B, B, TensorView(), TensorView(), true, proj);
  EXPECT_EQ(p.rank, 3);
  const TensorView proj_bad(buf.data(), DType::Float32, {4, 2}), low_bad(buf.data(), DType::Float32, {1, 2, 3, 7}),
      proj64(buf.data(), DType::Float64, {4, 3});
  EXPECT_THROW(selective_scan_params(u, low, A, B, B, TensorView(), TensorView(), true, proj_bad), Error);
  EXPECT_THROW(selective_scan_params(u, low_bad, A, B, B, TensorView(), TensorView(), true, proj), Error);
  EXPECT_THROW(selective_scan_params(u, u, A, B, B, TensorView(), TensorView(), true, proj), Error);   // rank 3 delta
  EXPECT_THROW(selective_scan_params(u, low, A, B, B, TensorView(), TensorView(), true, proj64), Error);
  EXPECT_THROW(selective_scan_params(u, low, A, B, B, TensorView(), TensorView(), true), Error);  // no proj: 4-D delta
}

// The steps that pad a tile's last row vector (past L) must not reach the gradients: with a
// positive A and a large bias, exp(A softplus(bias)) overflows, and a padding of
// softplus(bias) instead of 0 turned dA and dbias into NaN. L = 20, 24, 72 end tiles
// 4, 8 and 8 steps into a row vector (8 or 16 steps wide).
TEST(SelectiveScanCpu, PaddingStepsDoNotReachGradients) {
  uint32_t seed = 300;
  for (int64_t L : {20, 24, 72}) {
    const Shape s{2, 2, 9, 1, L, true, true, true};
    Problem p = make_problem(s, seed++);
    for (double& v : p.A) v = 10.0;
    for (double& v : p.bias) v = 10.0;
    for (double& v : p.delta) v = -20.0;
    expect_grads(run_cpu<double>(p), naive(p), s, "double", 1e-10, 1e-10);
    expect_grads(run_cpu<float>(p), naive(p), s, "float", 1e-4, 1e-5);
  }
}

// The float32 exp of the scan over the whole float range, through the op: with L = 2,
// u = (128, 0), delta = (1/128, 1) (no softplus), B = (1, 0), C = (0, 1), N = 1: h_0 = 1 (its
// decay exp(A/128) stays finite) and y[d, 1] = h_1 = exp(A[d]). One channel
// per A in [-110, 90] (step 1/64), plus the edges. Normal results within 3 ulp, subnormal ones
// within one subnormal ulp, exp(A < -104) = 0, exp(A > log(FLT_MAX)) = inf.
TEST(SelectiveScanCpu, FloatExpOverTheWholeRange) {
  std::vector<float> A;
  for (int i = -110 * 64; i <= 90 * 64; ++i) A.push_back(static_cast<float>(i) / 64.f);
  for (float a : {-103.97f, -103.28f, -87.34f, -87.33f, 88.3f, 88.72f, 88.7228f, 88.72283f, 88.7229f})
    A.push_back(a);
  const int64_t KD = static_cast<int64_t>(A.size());
  std::vector<float> u(KD * 2), delta(KD * 2, 1.f), Bv = {1.f, 0.f}, Cv = {0.f, 1.f}, y(KD * 2, NAN);
  for (int64_t d = 0; d < KD; ++d) {
    u[d * 2] = 128.f;
    delta[d * 2] = 1.f / 128.f;
  }
  const TensorView vu(u.data(), DType::Float32, {1, KD, 2}), vdelta(delta.data(), DType::Float32, {1, KD, 2}),
      vA(A.data(), DType::Float32, {KD, 1}), vB(Bv.data(), DType::Float32, {1, 1, 1, 2}),
      vC(Cv.data(), DType::Float32, {1, 1, 1, 2}), vy(y.data(), DType::Float32, {1, KD, 2});
  const auto p = selective_scan_params(vu, vdelta, vA, vB, vC, TensorView(), TensorView(), false);
  selective_scan_fwd_cpu(p, vu, vdelta, vA, vB, vC, TensorView(), TensorView(), vy);
  const double kMin = std::ldexp(1.0, -126), kSub = std::ldexp(1.0, -149);
  int bad = 0;
  for (int64_t d = 0; d < KD; ++d) {
    const double ref = std::exp(static_cast<double>(A[d]));
    const double got = y[d * 2 + 1];
    bool ok;
    if (ref > std::numeric_limits<float>::max()) ok = std::isinf(got) && got > 0;
    else if (A[d] < -104.f) ok = got == 0.0;
    else if (ref >= kMin) ok = std::abs(got - ref) <= 3 * std::ldexp(1.0, -23) * ref;
    else ok = std::abs(got - ref) <= kSub;
    if (!ok && bad++ < 5) ADD_FAILURE() << "exp(" << A[d] << ") = " << got << ", expected " << ref;
  }
  EXPECT_EQ(bad, 0) << "of " << KD << " values of A";
}

TEST(SelectiveScanCpu, RejectsBadShapes) {
  std::vector<float> buf(64, 0.f);
  const TensorView u(buf.data(), DType::Float32, {1, 4, 2}), A(buf.data(), DType::Float32, {4, 1}),
      B(buf.data(), DType::Float32, {1, 3, 1, 2}), Abig(buf.data(), DType::Float32, {4, 17});
  EXPECT_THROW(selective_scan_params(u, u, A, B, B, TensorView(), TensorView(), true), Error);  // K = 3
  const TensorView B2(buf.data(), DType::Float32, {1, 2, 17, 2});
  EXPECT_THROW(selective_scan_params(u, u, Abig, B2, B2, TensorView(), TensorView(), true), Error);
  const TensorView Ad(buf.data(), DType::Float64, {4, 1}), Bok(buf.data(), DType::Float32, {1, 2, 1, 2});
  EXPECT_THROW(selective_scan_params(u, u, Ad, Bok, Bok, TensorView(), TensorView(), true), Error);
  EXPECT_NO_THROW(selective_scan_params(u, u, A, Bok, Bok, TensorView(), TensorView(), true));
  // the entry points check the tensors against p (a D of the wrong size would be read past its end)
  const auto p = selective_scan_params(u, u, A, Bok, Bok, TensorView(), TensorView(), true);
  std::vector<float> y(8), small(1);
  const TensorView vy(y.data(), DType::Float32, {1, 4, 2}), D1(small.data(), DType::Float32, {1});
  EXPECT_THROW(selective_scan_fwd_cpu(p, u, u, A, Bok, Bok, D1, TensorView(), vy), Error);
  const TensorView u2(buf.data(), DType::Float32, {1, 4, 1});
  EXPECT_THROW(selective_scan_fwd_cpu(p, u2, u2, A, Bok, Bok, TensorView(), TensorView(), vy), Error);
}

TEST(SelectiveScanCpu, EmptyBatchGivesZeroParameterGradients) {
  // B = 0 (views with data, as a caller holding empty buffers may pass): nothing to compute,
  // and the gradients of A, D, delta_bias are empty sums.
  std::vector<float> buf(64, 0.f), dA(8, 7.f), dD(4, 7.f), db(4, 7.f);
  const TensorView u(buf.data(), DType::Float32, {0, 4, 8}), A(buf.data(), DType::Float32, {4, 2}),
      B(buf.data(), DType::Float32, {0, 1, 2, 8}), D(buf.data(), DType::Float32, {4});
  const auto p = selective_scan_params(u, u, A, B, B, D, D, true);
  selective_scan_fwd_cpu(p, u, u, A, B, B, D, D, u);
  selective_scan_bwd_cpu(p, u, u, A, B, B, D, D, u, u, u, TensorView(dA.data(), DType::Float32, {4, 2}), B, B,
                         TensorView(dD.data(), DType::Float32, {4}), TensorView(db.data(), DType::Float32, {4}));
  for (float v : dA) EXPECT_EQ(v, 0.f);
  for (float v : dD) EXPECT_EQ(v, 0.f);
  for (float v : db) EXPECT_EQ(v, 0.f);
}

TEST(SelectiveScanCpu, NoChannelsGiveZeroBAndCGradients) {
  // KD = 0: dB and dC are sums over the (no) channels of each group, zeros.
  std::vector<float> buf(64, 0.f), dB(16, 7.f), dC(16, 7.f);
  const TensorView u0(buf.data(), DType::Float32, {1, 0, 8}), A0(buf.data(), DType::Float32, {0, 2}),
      B0(buf.data(), DType::Float32, {1, 1, 2, 8});
  const auto p0 = selective_scan_params(u0, u0, A0, B0, B0, TensorView(), TensorView(), true);
  selective_scan_bwd_cpu(p0, u0, u0, A0, B0, B0, TensorView(), TensorView(), u0, u0, u0, A0,
                         TensorView(dB.data(), DType::Float32, {1, 1, 2, 8}),
                         TensorView(dC.data(), DType::Float32, {1, 1, 2, 8}), TensorView(), TensorView());
  for (float v : dB) EXPECT_EQ(v, 0.f);
  for (float v : dC) EXPECT_EQ(v, 0.f);
}

#if defined(QUADMAMBA_WITH_CUDA)
namespace {

// The CUDA kernels with u, delta, B, C, dy (and du, ddelta) in T, y in TY (T, or float32);
// A, D, delta_bias and their gradients in float32. Outputs are NaN-poisoned (every entry
// must be written).
template <typename T, typename TY = T>
Grads run_cuda(const Problem& p, bool deterministic = false) {
  const Shape& s = p.s;
  const int64_t KD = s.channels(), L = s.length, N = s.dstate, Bn = s.batch, K = s.groups;
  const size_t rows = p.u.size();
  const double nan = std::nan("");
  DeviceBuffer<T> u(p.u), delta(p.delta), B(p.B), C(p.C), dy(p.dy);
  DeviceBuffer<float> A(p.A), D(p.D), bias(p.bias);
  // dA, dB, dC, dD, dbias: zeroed (accumulated with atomics), or NaN-poisoned in the
  // deterministic mode (written there).
  const double init = deterministic ? nan : 0.0;
  const std::vector<double> nan_rows(rows, nan), init_bc(p.B.size(), init), init_a(p.A.size(), init),
      init_kd(KD, init);
  DeviceBuffer<TY> y(nan_rows);
  DeviceBuffer<T> du(nan_rows), ddelta(nan_rows);
  DeviceBuffer<float> dA(init_a), dB(init_bc), dC(init_bc), dD(init_kd), dbias(init_kd);
  const int64_t chunks = (L + selective_scan_chunk_cuda() - 1) / selective_scan_chunk_cuda();
  DeviceBuffer<float> ws(std::vector<double>(Bn * KD * chunks * N, nan));  // contents ignored
  // Deterministic mode: NaN-poisoned partials (every entry must be written before it is read).
  DeviceBuffer<float> part(std::vector<double>(deterministic ? 2 * Bn * KD * N * L : 0, nan)),
      rowpart(std::vector<double>(deterministic ? Bn * KD * (N + 2) : 0, nan));
  const TensorView vu = u.view({Bn, KD, L}), vdelta = delta.view({Bn, KD, L}), vA = A.view({KD, N}),
                   vB = B.view({Bn, K, N, L}), vC = C.view({Bn, K, N, L}), vdy = dy.view({Bn, KD, L});
  const TensorView vD = s.with_D ? D.view({KD}) : TensorView();
  const TensorView vbias = s.with_bias ? bias.view({KD}) : TensorView();
  auto params = selective_scan_params(vu, vdelta, vA, vB, vC, vD, vbias, s.softplus);
  selective_scan_fwd_cuda(params, vu, vdelta, vA, vB, vC, vD, vbias, y.view({Bn, KD, L}));
  selective_scan_bwd_cuda(params, vu, vdelta, vA, vB, vC, vD, vbias, vdy, du.view({Bn, KD, L}),
                          ddelta.view({Bn, KD, L}), dA.view({KD, N}), dB.view({Bn, K, N, L}),
                          dC.view({Bn, K, N, L}), dD.view({KD}), dbias.view({KD}), ws.view({Bn, KD, chunks, N}),
                          deterministic ? part.view({2, Bn, KD, N, L}) : TensorView(),
                          deterministic ? rowpart.view({Bn, KD, N + 2}) : TensorView());
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  return Grads{as<double>(y.get()), as<double>(du.get()), as<double>(ddelta.get()), as<double>(dA.get()),
               as<double>(dB.get()), as<double>(dC.get()), as<double>(dD.get()), as<double>(dbias.get())};
}

// p with u, delta, B, C, dy rounded to T (what a T tensor holds).
template <typename T>
Problem rounded(Problem p) {
  for (auto* v : {&p.u, &p.delta, &p.B, &p.C, &p.dy})
    for (double& e : *v) e = from_elem(to_elem<T>(e));
  return p;
}

}  // namespace

TEST(SelectiveScanCuda, MatchesCpu) {
  if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  std::vector<Shape> shapes = kShapes;
  // Block sizes of the CUDA kernels (32 threads for L <= 256, 64 for L <= 512, else 128),
  // their chunk boundaries (1024 backward, 2048 forward) and longer sequences.
  shapes.push_back({2, 2, 3, 1, 256, true, true, true});
  shapes.push_back({1, 2, 2, 2, 257, true, false, true});
  shapes.push_back({1, 1, 3, 1, 512, false, true, true});
  shapes.push_back({2, 1, 2, 1, 513, true, true, false});
  shapes.push_back({1, 2, 3, 1, 1025, true, true, true});
  shapes.push_back({2, 1, 2, 4, 2049, true, true, true});
  shapes.push_back({1, 2, 2, 1, 5000, true, true, true});
  shapes.push_back({1, 1, 1, 2, 2048, false, true, true});     // exactly one forward chunk
  shapes.push_back({1, 1, 2, 1, 100000, true, true, true});    // long: 49 / 98 chunks
  uint32_t seed = 500;
  for (const Shape& s : shapes) {
    const Problem p = make_problem(s, seed++);
    expect_grads(run_cuda<float>(p), run_cpu<double>(p), s, "cuda", 1e-4, 1e-5);
  }
}

TEST(SelectiveScanCuda, InfiniteLastStateLeavesDAAsOnCpu) {
  // dA sums dl_t q_t a_t h_{t-1} for t < L: the last state h_{L-1} is not in it. The last
  // chunk's padding (L not a multiple of the chunk) must not bring it in as 0 * inf.
  if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  for (int64_t L : {300, 1100}) {
    const Shape s{1, 1, 3, 1, L, true, true, true};
    Problem p = make_problem(s, 77);
    for (int64_t d = 0; d < 3; ++d) p.u[d * L + L - 1] = INFINITY;  // h_{L-1} = +-inf
    const Grads got = run_cuda<float>(p), want = run_cpu<double>(p);
    for (double v : want.dA) ASSERT_TRUE(std::isfinite(v)) << v;
    expect_close(got.dA, want.dA, "dA, infinite last state, L=" + std::to_string(L), 1e-4, 1e-5);
  }
}

TEST(SelectiveScanCuda, DeterministicModeMatchesCpuAndRepeatsBitwise) {
  if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  std::vector<Shape> shapes = kShapes;
  shapes.push_back({3, 2, 8, 1, 1500, true, true, true});
  shapes.push_back({2, 2, 4, 2, 300, true, true, true});
  uint32_t seed = 900;
  for (const Shape& s : shapes) {
    const Problem p = make_problem(s, seed++);
    const Grads first = run_cuda<float>(p, true), second = run_cuda<float>(p, true);
    expect_grads(first, run_cpu<double>(p), s, "cuda deterministic", 1e-4, 1e-5);
    EXPECT_EQ(first.dB, second.dB);
    EXPECT_EQ(first.dC, second.dC);
    EXPECT_EQ(first.dA, second.dA);
    EXPECT_EQ(first.dD, second.dD);
    EXPECT_EQ(first.dbias, second.dbias);
  }
}

// float16 / bfloat16 inputs: the float32 arithmetic of the kernels on the rounded inputs,
// against the CPU float64 kernels on the same values; y, du, ddelta are rounded to the
// input type once (relative error <= 2^-11 for float16, 2^-8 for bfloat16, with margin).
template <typename T>
void check_half_inputs(double rtol) {
  const std::vector<Shape> shapes = {
      {2, 2, 3, 4, 63, false, true, true},  {1, 4, 9, 16, 64, true, false, false},
      {2, 1, 8, 1, 65, true, true, true},   {1, 2, 2, 1, 1025, true, true, true},
      {1, 1, 3, 2, 2056, true, true, true},
  };
  uint32_t seed = 700;
  for (const Shape& s : shapes) {
    const Problem p = rounded<T>(make_problem(s, seed++));
    const Grads got = run_cuda<T>(p), want = run_cpu<double>(p);
    const std::string where = std::string(std::is_same<T, __half>::value ? "float16 " : "bfloat16 ") + s.str();
    expect_close(got.y, want.y, "y " + where, rtol, 1e-5);
    expect_close(got.du, want.du, "du " + where, rtol, 1e-5);
    expect_close(got.ddelta, want.ddelta, "ddelta " + where, rtol, 1e-5);
    expect_close(got.dA, want.dA, "dA " + where, 1e-4, 1e-5);
    expect_close(got.dB, want.dB, "dB " + where, 1e-4, 1e-5);
    expect_close(got.dC, want.dC, "dC " + where, 1e-4, 1e-5);
    expect_close(got.dD, want.dD, "dD " + where, 1e-4, 1e-5);
    expect_close(got.dbias, want.dbias, "dbias " + where, 1e-4, 1e-5);
    // y in float32 (not rounded to T): float32 accuracy.
    expect_close(run_cuda<T, float>(p).y, want.y, "float32 y " + where, 1e-4, 1e-5);
  }
}

TEST(SelectiveScanCuda, HalfAndBFloat16InputsMatchCpu) {
  if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  check_half_inputs<__half>(2e-3);
  check_half_inputs<__nv_bfloat16>(1.6e-2);
}
#else
TEST(SelectiveScanCuda, MatchesCpu) { GTEST_SKIP() << "built without CUDA kernels"; }
TEST(SelectiveScanCuda, InfiniteLastStateLeavesDAAsOnCpu) { GTEST_SKIP() << "built without CUDA kernels"; }
TEST(SelectiveScanCuda, HalfAndBFloat16InputsMatchCpu) { GTEST_SKIP() << "built without CUDA kernels"; }
TEST(SelectiveScanCuda, DeterministicModeMatchesCpuAndRepeatsBitwise) {
  GTEST_SKIP() << "built without CUDA kernels";
}
#endif

TEST(SelectiveScanCpu, ReportsItsInstructionSet) {
  const std::string isa = selective_scan_cpu_isa();
  EXPECT_TRUE(isa == "avx512" || isa == "avx2" || isa == "portable") << isa;
}
