// Element types of the gather/scatter kernels (quad_scan.cu, cross_scan.cu): loads and
// stores of the data type T with arithmetic in Acc<T> (float, or double for double).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "quadmamba/common.h"

namespace quadmamba {

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_acc(typename Acc<T>::type v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T> struct TypeTag { using type = T; };

// Calls f(TypeTag<T>{}) with T the C++ type of a floating data dtype.
template <typename F>
void dispatch_float(DType dtype, const char* op, const F& f) {
  switch (dtype) {
    case DType::Float32: return f(TypeTag<float>{});
    case DType::Float64: return f(TypeTag<double>{});
    case DType::Float16: return f(TypeTag<__half>{});
    case DType::BFloat16: return f(TypeTag<__nv_bfloat16>{});
    default: QM_CHECK(false, op, ": unsupported dtype ", dtype_name(dtype));
  }
}

}  // namespace quadmamba
