// cuda_device_count for builds without CUDA kernels.
#include "quadmamba/common.h"

#if !defined(QUADMAMBA_WITH_CUDA)
namespace quadmamba {
int cuda_device_count() { return 0; }
}  // namespace quadmamba
#endif
