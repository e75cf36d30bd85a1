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

// Makes `index` the current CUDA device for the lifetime of the guard (kernels of a
// tensor on device i must launch with device i current).
class CudaDeviceGuard {
 public:
  explicit CudaDeviceGuard(int index) {
    QM_CUDA_CHECK(cudaGetDevice(&previous_));
    if (index != previous_) QM_CUDA_CHECK(cudaSetDevice(index));
  }
  ~CudaDeviceGuard() {
    int current = -1;
    if (cudaGetDevice(&current) == cudaSuccess && current != previous_) cudaSetDevice(previous_);
  }
  CudaDeviceGuard(const CudaDeviceGuard&) = delete;
  CudaDeviceGuard& operator=(const CudaDeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

}  // namespace quadmamba
