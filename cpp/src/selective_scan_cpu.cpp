// Selective scan on the CPU: float32 and float64, parallel over lane groups of
// 8 neighbouring channels (quadmamba::parallel_for), the time loop sequential.
// The kernels live in selective_scan_cpu_kernel.inc and are compiled three times on
// x86_64 with GCC or Clang: generic, for AVX2+FMA, and for AVX-512 (16-float row
// vectors), chosen at run time.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>
#include <type_traits>
#include <vector>

#include "quadmamba/parallel.h"
#include "quadmamba/selective_scan.h"
#include "vector_ext.h"

namespace quadmamba {

namespace {

// Channels per lane group (SIMD lanes).
constexpr int kScanLanes = 8;

// Raw pointers and sizes of one call.
template <typename T>
struct ScanArgs {
  const T* u;
  const T* delta;
  const T* A;
  const T* B;
  const T* C;
  const T* Dskip;       // may be null
  const T* delta_bias;  // may be null
  const T* delta_proj;  // (KD, R), may be null: delta is (B, K, R, L) where given
  int64_t batch, channels, groups, length, dstate, rank, per_group, blocks_per_group;
  bool softplus;
};

// Lane group: batch b, group k, first channel d0, nl valid lanes (<= 8).
struct LaneGroup {
  int64_t b, k, d0;
  int nl;
};

#define QM_SCAN_NS generic
#define QM_SCAN_AVX2 0
#define QM_SCAN_ROW_FLOATS 8
#include "selective_scan_cpu_kernel.inc"
#undef QM_SCAN_ROW_FLOATS
#undef QM_SCAN_AVX2
#undef QM_SCAN_NS

#if defined(__x86_64__) && defined(__GNUC__)  // GCC and Clang
#define QM_SCAN_HAVE_AVX2 1
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
#define QM_SCAN_NS avx2
#define QM_SCAN_AVX2 1
#define QM_SCAN_ROW_FLOATS 8
#include "selective_scan_cpu_kernel.inc"
#undef QM_SCAN_ROW_FLOATS
#undef QM_SCAN_AVX2
#undef QM_SCAN_NS
#if defined(__clang__)
#pragma clang attribute pop
#pragma clang attribute push(__attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma"))), apply_to = function)
#else
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")
#endif
#define QM_SCAN_NS avx512
#define QM_SCAN_AVX2 1
#define QM_SCAN_ROW_FLOATS 16
#include "selective_scan_cpu_kernel.inc"
#undef QM_SCAN_ROW_FLOATS
#undef QM_SCAN_AVX2
#undef QM_SCAN_NS
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif

// The kernel copy this CPU runs: AVX-512 when it has AVX-512 F/VL/DQ/BW and
// cpu_avx512_allowed(), else AVX2 when it has AVX2 and FMA and not cpu_generic_forced(),
// else generic. Decided once.
enum class ScanIsa { generic, avx2, avx512 };
ScanIsa scan_isa() {
#if defined(QM_SCAN_HAVE_AVX2)
  static const ScanIsa isa = [] {
    __builtin_cpu_init();
    if (cpu_generic_forced() || !__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma"))
      return ScanIsa::generic;
    const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw");
    return avx512 && cpu_avx512_allowed() ? ScanIsa::avx512 : ScanIsa::avx2;
  }();
  return isa;
#else
  return ScanIsa::generic;
#endif
}

template <typename T>
ScanArgs<T> make_args(const SelectiveScanParams& p, const TensorView& u,
                               const TensorView& delta, const TensorView& A, const TensorView& B,
                               const TensorView& C, const TensorView& Dskip,
                               const TensorView& delta_bias, const TensorView& delta_proj) {
  ScanArgs<T> a;
  a.u = u.ptr<const T>();
  a.delta = delta.ptr<const T>();
  a.A = A.ptr<const T>();
  a.B = B.ptr<const T>();
  a.C = C.ptr<const T>();
  a.Dskip = Dskip.defined() ? Dskip.ptr<const T>() : nullptr;
  a.delta_bias = delta_bias.defined() ? delta_bias.ptr<const T>() : nullptr;
  a.delta_proj = delta_proj.defined() ? delta_proj.ptr<const T>() : nullptr;
  a.rank = p.rank;
  a.batch = p.batch;
  a.channels = p.channels;
  a.groups = p.groups;
  a.length = p.length;
  a.dstate = p.dstate;
  a.per_group = p.channels / p.groups;
  a.blocks_per_group = (a.per_group + kScanLanes - 1) / kScanLanes;
  a.softplus = p.delta_softplus;
  return a;
}


template <typename T>
void fwd_typed(const SelectiveScanParams& p, const TensorView& u, const TensorView& delta,
               const TensorView& A, const TensorView& B, const TensorView& C,
               const TensorView& Dskip, const TensorView& delta_bias, const TensorView& y,
               const TensorView& delta_proj) {
  const auto a = make_args<T>(p, u, delta, A, B, C, Dskip, delta_bias, delta_proj);
#if defined(QM_SCAN_HAVE_AVX2)
  if (scan_isa() == ScanIsa::avx512) return avx512::scan_fwd(a, y.ptr<T>());
  if (scan_isa() == ScanIsa::avx2) return avx2::scan_fwd(a, y.ptr<T>());
#endif
  generic::scan_fwd(a, y.ptr<T>());
}

// out[i] = sum_{j < parts} in[j * stride + i] for i < count, in order j = 0, 1, ...
template <typename T>
void sum_parts(const T* in, int64_t parts, int64_t stride, int64_t count, T* out,
               int64_t out_stride_outer, int64_t outer) {
  // `outer` independent reductions: block o reads in + o * parts * stride, writes out + o * out_stride_outer.
  parallel_for(0, outer * count, 4096, [&](int64_t lo, int64_t hi) {
    for (int64_t idx = lo; idx < hi; ++idx) {
      const int64_t o = idx / count, i = idx % count;
      const T* src = in + o * parts * stride + i;
      T acc = parts > 0 ? src[0] : T(0);  // parts = 0 (an empty batch): the empty sum
      for (int64_t j = 1; j < parts; ++j) acc += src[j * stride];
      out[o * out_stride_outer + i] = acc;
    }
  });
}

template <typename T>
void bwd_typed(const SelectiveScanParams& p, const TensorView& u, const TensorView& delta,
               const TensorView& A, const TensorView& B, const TensorView& C,
               const TensorView& Dskip, const TensorView& delta_bias, const TensorView& dy,
               const TensorView& du, const TensorView& ddelta, const TensorView& dA,
               const TensorView& dB, const TensorView& dC, const TensorView& dDskip,
               const TensorView& ddelta_bias, const TensorView& delta_proj) {
  const auto a = make_args<T>(p, u, delta, A, B, C, Dskip, delta_bias, delta_proj);
  const int64_t bpg = a.blocks_per_group, N = p.dstate, L = p.length;
  const int64_t per_item = N * L;
  // dB/dC: one partial per lane group, summed over the lane groups of a group in
  // order; with one lane group per group they are written in place.
  std::vector<T> dBp, dCp;
  T* dBw = dB.ptr<T>();
  T* dCw = dC.ptr<T>();
  if (bpg > 1) {
    dBp.resize(static_cast<size_t>(p.batch * p.groups * bpg * per_item));
    dCp.resize(dBp.size());
    dBw = dBp.data();
    dCw = dCp.data();
  }
  std::vector<T> dAp(static_cast<size_t>(p.batch * p.channels * N));
  std::vector<T> dDp(static_cast<size_t>(p.batch * p.channels));
  std::vector<T> dbp(dDp.size());
#if defined(QM_SCAN_HAVE_AVX2)
  if (scan_isa() == ScanIsa::avx512) {
    avx512::scan_bwd(a, dy.ptr<const T>(), du.ptr<T>(), ddelta.ptr<T>(), dBw, dCw,
                     dAp.data(), dDp.data(), dbp.data());
  } else if (scan_isa() == ScanIsa::avx2) {
    avx2::scan_bwd(a, dy.ptr<const T>(), du.ptr<T>(), ddelta.ptr<T>(), dBw, dCw,
                   dAp.data(), dDp.data(), dbp.data());
  } else
#endif
  {
    generic::scan_bwd(a, dy.ptr<const T>(), du.ptr<T>(), ddelta.ptr<T>(), dBw, dCw, dAp.data(),
                      dDp.data(), dbp.data());
  }
  if (bpg > 1) {
    sum_parts(dBp.data(), bpg, per_item, per_item, dB.ptr<T>(), per_item, p.batch * p.groups);
    sum_parts(dCp.data(), bpg, per_item, per_item, dC.ptr<T>(), per_item, p.batch * p.groups);
  }
  // Per-channel gradients: sum over the batch in order.
  const int64_t KD = p.channels;
  sum_parts(dAp.data(), p.batch, KD * N, KD * N, dA.ptr<T>(), 0, 1);
  if (dDskip.defined()) sum_parts(dDp.data(), p.batch, KD, KD, dDskip.ptr<T>(), 0, 1);
  if (ddelta_bias.defined()) sum_parts(dbp.data(), p.batch, KD, KD, ddelta_bias.ptr<T>(), 0, 1);
}

}  // namespace

SelectiveScanParams selective_scan_params(const TensorView& u, const TensorView& delta,
                                          const TensorView& A, const TensorView& B,
                                          const TensorView& C, const TensorView& Dskip,
                                          const TensorView& delta_bias, bool delta_softplus,
                                          const TensorView& delta_proj) {
  const Device dev = u.device;
  const DType dt = u.dtype;
  const DType wt = dt == DType::Float64 ? DType::Float64 : DType::Float32;
  check_view(u, "u", 3, dt, dev);
  check_view(delta, "delta", delta_proj.defined() ? 4 : 3, dt, dev);
  check_view(A, "A", 2, wt, dev);
  check_view(B, "B", 4, dt, dev);
  check_view(C, "C", 4, dt, dev);
  SelectiveScanParams p;
  p.batch = u.shape[0];
  p.channels = u.shape[1];
  p.length = u.shape[2];
  p.groups = B.shape[1];
  p.dstate = A.shape[1];
  p.delta_softplus = delta_softplus;
  QM_CHECK(p.length >= 1, "u: sequence length L must be >= 1");
  QM_CHECK(p.groups >= 1 && p.channels % p.groups == 0, "B: K = ", p.groups,
           " must divide KD = ", p.channels);
  QM_CHECK(p.dstate >= 1 && p.dstate <= kSelectiveScanMaxN, "A: N must be in [1, 16], got ",
           p.dstate);
  if (delta_proj.defined()) {
    check_view(delta_proj, "delta_proj", 2, wt, dev);
    p.rank = delta_proj.shape[1];
    QM_CHECK(p.rank >= 1, "delta_proj: the rank R must be >= 1, got shape (", delta_proj.shape[0], ", ",
             p.rank, ")");
    check_shape(delta_proj, "delta_proj", {p.channels, p.rank});
    check_shape(delta, "delta", {p.batch, p.groups, p.rank, p.length});
  } else {
    check_shape(delta, "delta", {p.batch, p.channels, p.length});
  }
  check_shape(A, "A", {p.channels, p.dstate});
  check_shape(B, "B", {p.batch, p.groups, p.dstate, p.length});
  check_shape(C, "C", {p.batch, p.groups, p.dstate, p.length});
  if (Dskip.defined()) {
    check_view(Dskip, "D", 1, wt, dev);
    check_shape(Dskip, "D", {p.channels});
  }
  if (delta_bias.defined()) {
    check_view(delta_bias, "delta_bias", 1, wt, dev);
    check_shape(delta_bias, "delta_bias", {p.channels});
  }
  return p;
}

void check_selective_scan_inputs(const SelectiveScanParams& p, const TensorView& u, const TensorView& delta,
                                 const TensorView& A, const TensorView& B, const TensorView& C,
                                 const TensorView& Dskip, const TensorView& delta_bias,
                                 const TensorView& delta_proj) {
  const SelectiveScanParams q =
      selective_scan_params(u, delta, A, B, C, Dskip, delta_bias, p.delta_softplus, delta_proj);
  QM_CHECK(q.batch == p.batch && q.channels == p.channels && q.groups == p.groups && q.length == p.length &&
               q.dstate == p.dstate && q.rank == p.rank,
           "the tensors do not have the sizes of p (B, KD, K, L, N, R) = (", p.batch, ", ", p.channels, ", ",
           p.groups, ", ", p.length, ", ", p.dstate, ", ", p.rank, "), they have (", q.batch, ", ", q.channels,
           ", ", q.groups, ", ", q.length, ", ", q.dstate, ", ", q.rank,
           "): pass the tensors given to selective_scan_params");
}

void selective_scan_fwd_cpu(const SelectiveScanParams& p, const TensorView& u,
                            const TensorView& delta, const TensorView& A, const TensorView& B,
                            const TensorView& C, const TensorView& Dskip,
                            const TensorView& delta_bias, const TensorView& y,
                            const TensorView& delta_proj) {
  QM_CHECK(u.device.is_cpu(), "selective_scan_fwd_cpu: tensors must be on the CPU");
  check_selective_scan_inputs(p, u, delta, A, B, C, Dskip, delta_bias, delta_proj);
  check_view(y, "y", 3, u.dtype, u.device);
  check_shape(y, "y", {p.batch, p.channels, p.length});
  if (u.dtype == DType::Float32)
    fwd_typed<float>(p, u, delta, A, B, C, Dskip, delta_bias, y, delta_proj);
  else if (u.dtype == DType::Float64)
    fwd_typed<double>(p, u, delta, A, B, C, Dskip, delta_bias, y, delta_proj);
  else
    QM_CHECK(false, "selective_scan on the CPU takes float32 or float64, got ",
             dtype_name(u.dtype));
}

void selective_scan_bwd_cpu(const SelectiveScanParams& p, const TensorView& u,
                            const TensorView& delta, const TensorView& A, const TensorView& B,
                            const TensorView& C, const TensorView& Dskip,
                            const TensorView& delta_bias, const TensorView& dy,
                            const TensorView& du, const TensorView& ddelta, const TensorView& dA,
                            const TensorView& dB, const TensorView& dC, const TensorView& dDskip,
                            const TensorView& ddelta_bias, const TensorView& delta_proj) {
  QM_CHECK(u.device.is_cpu(), "selective_scan_bwd_cpu: tensors must be on the CPU");
  check_selective_scan_inputs(p, u, delta, A, B, C, Dskip, delta_bias, delta_proj);
  const DType dt = u.dtype, wt = A.dtype;
  check_view(dy, "dy", 3, dt, u.device);
  check_shape(dy, "dy", {p.batch, p.channels, p.length});
  check_view(du, "du", 3, dt, u.device);
  check_shape(du, "du", {p.batch, p.channels, p.length});
  check_view(ddelta, "ddelta", 3, dt, u.device);
  check_shape(ddelta, "ddelta", {p.batch, p.channels, p.length});
  check_view(dA, "dA", 2, wt, u.device);
  check_shape(dA, "dA", {p.channels, p.dstate});
  check_view(dB, "dB", 4, dt, u.device);
  check_shape(dB, "dB", {p.batch, p.groups, p.dstate, p.length});
  check_view(dC, "dC", 4, dt, u.device);
  check_shape(dC, "dC", {p.batch, p.groups, p.dstate, p.length});
  if (dDskip.defined()) {
    check_view(dDskip, "dD", 1, wt, u.device);
    check_shape(dDskip, "dD", {p.channels});
  }
  if (ddelta_bias.defined()) {
    check_view(ddelta_bias, "ddelta_bias", 1, wt, u.device);
    check_shape(ddelta_bias, "ddelta_bias", {p.channels});
  }
  if (p.channels == 0) {  // dB, dC: sums over the (no) channels of each group
    std::memset(dB.data, 0, static_cast<size_t>(dB.numel()) * dtype_size(dt));
    std::memset(dC.data, 0, static_cast<size_t>(dC.numel()) * dtype_size(dt));
    return;
  }
  if (dt == DType::Float32)
    bwd_typed<float>(p, u, delta, A, B, C, Dskip, delta_bias, dy, du, ddelta, dA, dB, dC, dDskip,
                     ddelta_bias, delta_proj);
  else if (dt == DType::Float64)
    bwd_typed<double>(p, u, delta, A, B, C, Dskip, delta_bias, dy, du, ddelta, dA, dB, dC, dDskip,
                      ddelta_bias, delta_proj);
  else
    QM_CHECK(false, "selective_scan on the CPU takes float32 or float64, got ", dtype_name(dt));
}

const char* selective_scan_cpu_isa() {
  switch (scan_isa()) {
    case ScanIsa::avx512:
      return "avx512";
    case ScanIsa::avx2:
      return "avx2";
    default:
      return "portable";
  }
}

}  // namespace quadmamba
