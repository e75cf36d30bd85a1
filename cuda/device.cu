// cuda_device_count for CUDA builds. Without a driver cudaGetDeviceCount returns
// an error (e.g. cudaErrorInsufficientDriver / cudaErrorNoDevice) and leaves its
// output untouched: both read as "no device".
#include <cuda_runtime.h>

#include "quadmamba/common.h"

namespace quadmamba {

int cuda_device_count() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error state
    return 0;
  }
  return count;
}

}  // namespace quadmamba
