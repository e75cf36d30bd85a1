// Helpers shared by the C++ kernel tests: the element types of the kernels (their DType,
// conversions through double) and, in builds with the CUDA kernels, a device array.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <type_traits>
#include <vector>

#include "quadmamba/tensor_view.h"

#if defined(QUADMAMBA_WITH_CUDA)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

namespace quadmamba_test {

template <typename T>
struct Unsupported : std::false_type {};

// The DType of a host element type.
template <typename T>
constexpr quadmamba::DType dtype_of() {
  using quadmamba::DType;
  if constexpr (std::is_same<T, float>::value) {
    return DType::Float32;
  } else if constexpr (std::is_same<T, double>::value) {
    return DType::Float64;
#if defined(QUADMAMBA_WITH_CUDA)
  } else if constexpr (std::is_same<T, __half>::value) {
    return DType::Float16;
  } else if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    return DType::BFloat16;
#endif
  } else {
    static_assert(Unsupported<T>::value, "no DType for this element type");
  }
}

// v rounded to T (float16 / bfloat16: to nearest even, through float) and back to double.
template <typename T>
T to_elem(double v) {
#if defined(QUADMAMBA_WITH_CUDA)
  if constexpr (std::is_same<T, __half>::value) {
    return __float2half_rn(static_cast<float>(v));
  } else if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    return __float2bfloat16_rn(static_cast<float>(v));
  } else
#endif
  {
    return static_cast<T>(v);
  }
}
inline double from_elem(float v) { return v; }
inline double from_elem(double v) { return v; }
#if defined(QUADMAMBA_WITH_CUDA)
inline double from_elem(__half v) { return __half2float(v); }
inline double from_elem(__nv_bfloat16 v) { return __bfloat162float(v); }
#endif

// An element of type S as a T (exact where S is T, or where S's values are T's).
template <typename T, typename S>
T convert(S v) {
  if constexpr (std::is_same<T, S>::value) {
    return v;
  } else {
    return to_elem<T>(from_elem(v));
  }
}

// Every element of v as a T.
template <typename T, typename S>
std::vector<T> as(const std::vector<S>& v) {
  if constexpr (std::is_same<T, S>::value) return v;
  std::vector<T> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = convert<T>(v[i]);
  return out;
}

#if defined(QUADMAMBA_WITH_CUDA)
// A device array of n elements T, filled from a host vector of any element type (as<T>);
// get() reads it back.
template <typename T>
struct DeviceBuffer {
  T* ptr = nullptr;
  size_t n = 0;

  template <typename S>
  explicit DeviceBuffer(const std::vector<S>& host) : n(host.size()) {
    const std::vector<T> h = as<T>(host);
    EXPECT_EQ(cudaMalloc(&ptr, std::max<size_t>(n, 1) * sizeof(T)), cudaSuccess);
    if (n) EXPECT_EQ(cudaMemcpy(ptr, h.data(), n * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { cudaFree(ptr); }

  std::vector<T> get() const {
    std::vector<T> h(n);
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    if (n) EXPECT_EQ(cudaMemcpy(h.data(), ptr, n * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
    return h;
  }
  quadmamba::TensorView view(std::initializer_list<int64_t> shape) const {
    return quadmamba::TensorView(ptr, dtype_of<T>(), shape, quadmamba::Device{0});
  }
};
#endif

}  // namespace quadmamba_test
