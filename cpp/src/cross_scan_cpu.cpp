// cross_scan / cross_merge on the CPU (contract in cross_scan.h): parallel over the
// (b, d) rows; the column-major directions go through a tiled transpose.
#include <algorithm>
#include <cstring>

#include "quadmamba/cross_scan.h"
#include "quadmamba/parallel.h"

namespace quadmamba {

void check_cross_args(const TensorView& raster, const char* raster_name, const TensorView& seq,
                      const char* seq_name) {
  const DType t = raster.dtype;
  QM_CHECK(t == DType::Float32 || t == DType::Float64 || t == DType::Float16 || t == DType::BFloat16,
           raster_name, " must be a floating dtype, got ", dtype_name(t));
  check_view(raster, raster_name, 4, t, raster.device);
  check_view(seq, seq_name, 4, t, raster.device);
  const int64_t B = raster.shape[0], D = raster.shape[1], H = raster.shape[2], W = raster.shape[3];
  check_shape(seq, seq_name, {B, 4, D, H * W});
}

namespace {

constexpr int64_t kTile = 16;

// cols[x*H + y] = rows[y*W + x] for an H x W row-major block, tile by tile.
template <typename T>
void transpose(const T* rows, T* cols, int64_t H, int64_t W) {
  for (int64_t y0 = 0; y0 < H; y0 += kTile) {
    const int64_t y1 = std::min(H, y0 + kTile);
    for (int64_t x0 = 0; x0 < W; x0 += kTile) {
      const int64_t x1 = std::min(W, x0 + kTile);
      for (int64_t x = x0; x < x1; ++x)
        for (int64_t y = y0; y < y1; ++y) cols[x * H + y] = rows[y * W + x];
    }
  }
}

template <typename T>
void reverse_copy(const T* src, T* dst, int64_t L) {
  for (int64_t p = 0; p < L; ++p) dst[p] = src[L - 1 - p];
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
      transpose(src, o[1], H, W);
      reverse_copy(o[0], o[2], L);
      reverse_copy(o[1], o[3], L);
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
    for (int64_t bd = lo; bd < hi; ++bd) {
      const int64_t b = bd / D, d = bd % D;
      const T* s[4];
      for (int k = 0; k < 4; ++k) s[k] = ys + ((b * 4 + k) * D + d) * L;
      T* dst = y + bd * L;
      // Row-major terms (same order as the reference: rows = ys0 + rev(ys2),
      // cols = ys1 + rev(ys3), y = rows + cols).
      for (int64_t t = 0; t < L; ++t) dst[t] = s[0][t] + s[2][L - 1 - t];
      for (int64_t y0 = 0; y0 < H; y0 += kTile) {
        const int64_t y1 = std::min(H, y0 + kTile);
        for (int64_t x0 = 0; x0 < W; x0 += kTile) {
          const int64_t x1 = std::min(W, x0 + kTile);
          for (int64_t yy = y0; yy < y1; ++yy)
            for (int64_t xx = x0; xx < x1; ++xx) {
              const int64_t c = xx * H + yy;
              dst[yy * W + xx] += s[1][c] + s[3][L - 1 - c];
            }
        }
      }
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
  check_cross_args(x, "x", out, "out");
  check_cpu(x);
  if (x.dtype == DType::Float64) scan<double>(x, out);
  else scan<float>(x, out);
}

void cross_merge_fwd_cpu(const TensorView& ys, const TensorView& y) {
  check_cross_args(y, "y", ys, "ys");
  check_cpu(y);
  if (y.dtype == DType::Float64) merge<double>(ys, y);
  else merge<float>(ys, y);
}

}  // namespace quadmamba
