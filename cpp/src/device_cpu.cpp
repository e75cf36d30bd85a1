// cuda_status / cuda_device_count for builds without CUDA kernels: no runtime, no device.
#include "quadmamba/common.h"

#if !defined(QUADMAMBA_WITH_CUDA)
namespace quadmamba {
CudaStatus cuda_status() { return CudaStatus{}; }
int cuda_device_count() { return 0; }
}  // namespace quadmamba
#endif
