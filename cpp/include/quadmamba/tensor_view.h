// A non-owning view of a strided array: data pointer, shape and strides (in
// elements, not bytes), element type and device. The core never allocates the
// arrays it is given; callers (the Python layer) own every buffer.
#pragma once

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

}  // namespace quadmamba
