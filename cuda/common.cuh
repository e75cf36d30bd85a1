// Device-side helpers shared by the CUDA kernels.
#pragma once

#include <cuda_runtime.h>

#include "quadmamba/common.h"

// Throws quadmamba::Error with the CUDA error string when a runtime call fails.
#define QM_CUDA_CHECK(expr)                                                        \
  do {                                                                             \
    const cudaError_t qm_err_ = (expr);                                            \
    QM_CHECK(qm_err_ == cudaSuccess, "CUDA error: ", cudaGetErrorString(qm_err_)); \
  } while (0)

// Checks the launch of the kernel just issued.
#define QM_CUDA_CHECK_LAUNCH() QM_CUDA_CHECK(cudaGetLastError())

namespace quadmamba {

// 1 when `device` (a runtime ordinal) has an active primary context, 0 when it has none, -1
// when the driver cannot tell (device.cu).
int cuda_primary_context_active(int device);

// Makes `index` the current CUDA device for the lifetime of the guard (kernels of a tensor on
// device i must launch with device i current), then makes the previous device current again,
// unless that device has no active primary context: a thread that never used it (its current
// device is then the default 0) keeps `index`, since cudaSetDevice would create a context there
// (hundreds of MB on a GPU the program may not otherwise touch). PyTorch's guards do the same.
class CudaDeviceGuard {
 public:
  explicit CudaDeviceGuard(int index) {
    QM_CUDA_CHECK(cudaGetDevice(&previous_));
    if (index != previous_) QM_CUDA_CHECK(cudaSetDevice(index));
  }
  ~CudaDeviceGuard() {
    int current = -1;
    if (cudaGetDevice(&current) != cudaSuccess || current == previous_) return;
    if (cuda_primary_context_active(previous_) != 0) cudaSetDevice(previous_);  // -1 (unknown): restore
  }
  CudaDeviceGuard(const CudaDeviceGuard&) = delete;
  CudaDeviceGuard& operator=(const CudaDeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

}  // namespace quadmamba
