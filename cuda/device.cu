// cuda_status / cuda_device_count for CUDA builds (contract in quadmamba/common.h).
// Without a driver, or with one older than the linked runtime, cudaGetDeviceCount returns an
// error (cudaErrorInsufficientDriver, cudaErrorNoDevice, ...) and leaves its output untouched:
// no usable device, and the runtime's message says why.
#include <cuda_runtime.h>

#include "quadmamba/common.h"

namespace quadmamba {

CudaStatus cuda_status() {
  CudaStatus s;
  cudaRuntimeGetVersion(&s.runtime_version);  // the linked runtime: needs no driver
  if (cudaDriverGetVersion(&s.driver_version) != cudaSuccess) s.driver_version = 0;
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error state
    s.error = cudaGetErrorString(err);
    count = 0;
  }
  s.device_count = count;
  return s;
}

int cuda_device_count() { return cuda_status().device_count; }

}  // namespace quadmamba
