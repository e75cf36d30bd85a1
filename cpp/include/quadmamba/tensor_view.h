// A non-owning view of a strided array: data pointer, shape and strides (in
// elements, not bytes), element type and device. The core never allocates the
// arrays it is given; callers (the Python layer) own every buffer.
#pragma once

#include <algorithm>
#include <cstdint>
#include <initializer_list>

#include "quadmamba/common.h"

namespace quadmamba {

struct TensorView {
  static constexpr int kMaxDims = 6;

  void* data = nullptr;
  DType dtype = DType::Float32;
  Device device{};
  int ndim = 0;
  int64_t shape[kMaxDims] = {0};
  int64_t strides[kMaxDims] = {0};

  TensorView() = default;

  // Contiguous view over `data` with the given shape.
  TensorView(void* data_, DType dtype_, std::initializer_list<int64_t> shape_, Device device_ = {})
      : data(data_), dtype(dtype_), device(device_), ndim(static_cast<int>(shape_.size())) {
    QM_CHECK(ndim <= kMaxDims, "TensorView supports at most ", kMaxDims, " dims, got ", ndim);
    int i = 0;
    for (int64_t s : shape_) shape[i++] = s;
    int64_t stride = 1;
    for (int d = ndim - 1; d >= 0; --d) {
      strides[d] = stride;
      stride *= shape[d];
    }
  }

  bool defined() const { return data != nullptr; }

  int64_t size(int d) const { return shape[d < 0 ? d + ndim : d]; }

  int64_t numel() const {
    int64_t n = 1;
    for (int d = 0; d < ndim; ++d) n *= shape[d];
    return n;
  }

  bool is_contiguous() const {
    int64_t expected = 1;
    for (int d = ndim - 1; d >= 0; --d) {
      if (shape[d] != 1 && strides[d] != expected) return false;
      expected *= shape[d];
    }
    return true;
  }

  template <typename T>
  T* ptr() const { return static_cast<T*>(data); }
};

// Argument checks shared by the ops: `name` is the argument's name in messages.
inline void check_view(const TensorView& t, const char* name, int ndim, DType dtype, Device device) {
  QM_CHECK(t.defined(), name, t.ndim > 0 ? " has no data (an empty tensor? the kernels take at least one element)"
                                         : " is required");
  QM_CHECK(t.ndim == ndim, name, " must have ", ndim, " dims, got ", t.ndim);
  for (int d = 0; d < t.ndim; ++d) QM_CHECK(t.shape[d] >= 0, name, " has a negative size ", t.shape[d], " in dim ", d);
  // Its bytes must be countable in int64 (with empty dims counted as 1, so that the products
  // the kernels form from the other dims, such as H * W, fit too).
  int64_t bytes = dtype_size(t.dtype);
  for (int d = 0; d < t.ndim; ++d)
    QM_CHECK(!__builtin_mul_overflow(bytes, std::max<int64_t>(t.shape[d], 1), &bytes), name,
             " is too large: its size in bytes overflows 64-bit integers");
  QM_CHECK(t.dtype == dtype, name, " must be ", dtype_name(dtype), ", got ", dtype_name(t.dtype));
  QM_CHECK(t.device == device, name, " is on a different device than the other arguments");
  QM_CHECK(t.is_contiguous(), name, " must be contiguous");
}

inline void check_shape(const TensorView& t, const char* name, std::initializer_list<int64_t> shape) {
  QM_CHECK(t.ndim == static_cast<int>(shape.size()), name, " must have ", shape.size(), " dims, got ", t.ndim);
  int d = 0;
  for (int64_t s : shape) {
    QM_CHECK(t.shape[d] == s, name, " has size ", t.shape[d], " in dim ", d, ", expected ", s);
    ++d;
  }
}

// The raster (B, D, H, W) and the K sequences over it (B, K, D, H*W) of a scan (raster the
// input) or a merge (raster_is_output): both 4-d, contiguous, of one floating dtype and one
// device, taken from the input, as are B and D, so that a message names the wrong argument.
// H, W: the grid; where negative, the raster's own (H, W >= 1). Returns {B, D}.
struct RasterSeqSizes {
  int64_t B, D;
};

inline RasterSeqSizes check_raster_and_sequences(const TensorView& raster, const char* raster_name,
                                                 const TensorView& seq, const char* seq_name, int64_t K,
                                                 int64_t H, int64_t W, bool raster_is_output) {
  const TensorView& in = raster_is_output ? seq : raster;
  const TensorView& out = raster_is_output ? raster : seq;
  const char* in_name = raster_is_output ? seq_name : raster_name;
  const char* out_name = raster_is_output ? raster_name : seq_name;
  const DType t = in.dtype;
  QM_CHECK(t == DType::Float32 || t == DType::Float64 || t == DType::Float16 || t == DType::BFloat16,
           in_name, " must be a floating dtype, got ", dtype_name(t));
  check_view(in, in_name, 4, t, in.device);
  check_view(out, out_name, 4, t, in.device);
  const RasterSeqSizes s{in.shape[0], raster_is_output ? seq.shape[2] : raster.shape[1]};
  if (H < 0 || W < 0) {
    H = raster.shape[2];
    W = raster.shape[3];
    QM_CHECK(H >= 1 && W >= 1, raster_name, " must have H, W >= 1, got ", H, "x", W);
  }
  check_shape(raster, raster_name, {s.B, s.D, H, W});
  check_shape(seq, seq_name, {s.B, K, s.D, H * W});
  return s;
}

}  // namespace quadmamba
