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
