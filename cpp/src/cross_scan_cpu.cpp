// cross_scan / cross_merge on the CPU (contract in cross_scan.h): parallel over the
// (b, d) rows; the column-major directions go through a blocked transpose (4 x 4 register
// blocks for float32), the reversed ones through reversed vector copies.
#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "quadmamba/cross_scan.h"
#include "quadmamba/parallel.h"
#include "vector_ext.h"

namespace quadmamba {

void check_cross_args(const TensorView& raster, const char* raster_name, const TensorView& seq,
                      const char* seq_name, bool raster_is_output) {
  // H and W come from the raster tensor either way (the sequences hold only H * W).
  check_raster_and_sequences(raster, raster_name, seq, seq_name, 4, -1, -1, raster_is_output);
}

namespace {

// float32 moves in 4-lane vectors (SSE2 / NEON width; GCC / Clang vector extensions).
typedef float f4 __attribute__((vector_size(16)));
typedef int32_t i4 __attribute__((vector_size(16)));

inline f4 load4(const float* p) {
  f4 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store4(float* p, f4 v) { std::memcpy(p, &v, sizeof(v)); }
inline f4 reversed4(f4 v) { return QM_SHUFFLE(i4, v, v, 3, 2, 1, 0); }

// out[x*R + y] (+)= in[y*C + x] for y < R, x < C: an R x C row-major matrix transposed (and
// added to out when kAdd), in 4 x 4 blocks of registers for float32.
template <bool kAdd, typename T>
void transpose(const T* in, T* out, int64_t R, int64_t C) {
  auto one = [&](int64_t y, int64_t x) {
    if (kAdd) out[x * R + y] += in[y * C + x];
    else out[x * R + y] = in[y * C + x];
  };
  int64_t y0 = 0;
  if constexpr (std::is_same<T, float>::value) {
    for (; y0 + 4 <= R; y0 += 4) {
      int64_t x0 = 0;
      for (; x0 + 4 <= C; x0 += 4) {
        f4 c[4];  // rows y0..y0+3, then (transposed) columns x0..x0+3
        for (int i = 0; i < 4; ++i) c[i] = load4(in + (y0 + i) * C + x0);
        transpose4x4<i4>(c);
        for (int i = 0; i < 4; ++i) {  // column x0 + i: out[(x0 + i) * R + y0 ..]
          float* o = out + (x0 + i) * R + y0;
          store4(o, kAdd ? load4(o) + c[i] : c[i]);
        }
      }
      for (int64_t y = y0; y < y0 + 4; ++y)
        for (int64_t x = x0; x < C; ++x) one(y, x);
    }
  }
  for (int64_t y = y0; y < R; ++y)
    for (int64_t x = 0; x < C; ++x) one(y, x);
}

// dst[p] = a[p] + b[L-1-p] (b only, when a is null), p < L.
template <typename T>
void add_reversed(const T* a, const T* b, T* dst, int64_t L) {
  int64_t p = 0;
  if constexpr (std::is_same<T, float>::value) {
    for (; p + 4 <= L; p += 4) {
      const f4 r = reversed4(load4(b + L - 4 - p));
      store4(dst + p, a ? load4(a + p) + r : r);
    }
  }
  for (; p < L; ++p) dst[p] = a ? a[p] + b[L - 1 - p] : b[L - 1 - p];
}

template <typename T>
void scan(const TensorView& xv, const TensorView& outv) {
  const int64_t B = xv.shape[0], D = xv.shape[1], H = xv.shape[2], W = xv.shape[3], L = H * W;
  const T* x = xv.ptr<T>();
  T* out = outv.ptr<T>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(L, 1));
  parallel_for(0, B * D, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t bd = lo; bd < hi; ++bd) {
      const int64_t b = bd / D, d = bd % D;
      const T* src = x + bd * L;
      T* o[4];
      for (int k = 0; k < 4; ++k) o[k] = out + ((b * 4 + k) * D + d) * L;
      std::memcpy(o[0], src, static_cast<size_t>(L) * sizeof(T));
      transpose<false>(src, o[1], H, W);
      add_reversed<T>(nullptr, src, o[2], L);
      add_reversed<T>(nullptr, o[1], o[3], L);
    }
  });
}

template <typename T>
void merge(const TensorView& ysv, const TensorView& yv) {
  const int64_t B = yv.shape[0], D = yv.shape[1], H = yv.shape[2], W = yv.shape[3], L = H * W;
  const T* ys = ysv.ptr<T>();
  T* y = yv.ptr<T>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(L, 1));
  parallel_for(0, B * D, grain, [&](int64_t lo, int64_t hi) {
    std::vector<T> cols(static_cast<size_t>(L));  // ys1 + rev(ys3) in column-major order
    for (int64_t bd = lo; bd < hi; ++bd) {
      const int64_t b = bd / D, d = bd % D;
      const T* s[4];
      for (int k = 0; k < 4; ++k) s[k] = ys + ((b * 4 + k) * D + d) * L;
      T* dst = y + bd * L;
      // Same order of additions as the reference: rows = ys0 + rev(ys2),
      // cols = ys1 + rev(ys3), y = rows + cols.
      add_reversed(s[0], s[2], dst, L);
      add_reversed(s[1], s[3], cols.data(), L);
      transpose<true>(cols.data(), dst, W, H);  // cols is W x H row-major
    }
  });
}

void check_cpu(const TensorView& t) {
  QM_CHECK(t.device.is_cpu(), "cross scan CPU kernels got tensors on a CUDA device");
  QM_CHECK(t.dtype == DType::Float32 || t.dtype == DType::Float64,
           "cross scan CPU kernels take float32 or float64 data, got ", dtype_name(t.dtype));
}

}  // namespace

void cross_scan_fwd_cpu(const TensorView& x, const TensorView& out) {
  check_cross_args(x, "x", out, "out", false);
  check_cpu(x);
  if (x.dtype == DType::Float64) scan<double>(x, out);
  else scan<float>(x, out);
}

void cross_merge_fwd_cpu(const TensorView& ys, const TensorView& y) {
  check_cross_args(y, "y", ys, "ys", true);
  check_cpu(y);
  if (y.dtype == DType::Float64) merge<double>(ys, y);
  else merge<float>(ys, y);
}

}  // namespace quadmamba
