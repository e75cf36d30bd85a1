// cuda_status / cuda_device_count for CUDA builds (contract in quadmamba/common.h), and
// cuda_primary_context_active (common.cuh).
// Without a driver, or with one older than the linked runtime, cudaGetDeviceCount returns an
// error (cudaErrorInsufficientDriver, cudaErrorNoDevice, ...) and leaves its output untouched:
// no usable device, and the runtime's message says why.
#include <cuda_runtime.h>

#include "common.cuh"
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

namespace {

// A driver function reached through the runtime (so that the module needs no link to
// libcuda); nullptr when the driver does not have it.
void* driver_function(const char* symbol) {
  void* fn = nullptr;
#if CUDART_VERSION >= 12000
  cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
#if CUDART_VERSION >= 12050
  const cudaError_t err = cudaGetDriverEntryPointByVersion(symbol, &fn, 12000, cudaEnableDefault, &found);
#else
  const cudaError_t err = cudaGetDriverEntryPoint(symbol, &fn, cudaEnableDefault, &found);
#endif
  const bool ok = err == cudaSuccess && found == cudaDriverEntryPointSuccess;
#else
  const cudaError_t err = cudaGetDriverEntryPoint(symbol, &fn, cudaEnableDefault);
  const bool ok = err == cudaSuccess;
#endif
  if (err != cudaSuccess) cudaGetLastError();  // clear the error state
  return ok ? fn : nullptr;
}

}  // namespace

int cuda_primary_context_active(int device) {
  // CUresult cuDeviceGet(CUdevice*, int ordinal); CUresult cuDevicePrimaryCtxGetState(CUdevice,
  // unsigned int* flags, int* active); CUDA_SUCCESS is 0 and a CUdevice an int.
  using DeviceGet = int (*)(int*, int);
  using PrimaryCtxGetState = int (*)(int, unsigned int*, int*);
  static const auto device_get = reinterpret_cast<DeviceGet>(driver_function("cuDeviceGet"));
  static const auto get_state = reinterpret_cast<PrimaryCtxGetState>(driver_function("cuDevicePrimaryCtxGetState"));
  int handle = 0, active = 0;
  unsigned int flags = 0;
  if (!device_get || !get_state || device_get(&handle, device) != 0 || get_state(handle, &flags, &active) != 0)
    return -1;
  return active ? 1 : 0;
}

}  // namespace quadmamba
