// cross_scan / cross_merge on CUDA (contract in cpp/include/quadmamba/cross_scan.h).
// A grid-stride loop over the B*D*L outputs with 64-bit indices; every thread writes
// consecutive addresses (coalesced); the column-major reads are strided within one
// (b, d) image, which stays in L2.
#include <algorithm>

#include "common.cuh"
#include "quadmamba/cross_scan.h"
#include "scan_dtype.cuh"

namespace quadmamba {
namespace {

constexpr int kThreads = 256;

// For output slot p of row (b, d): out0[p] = x[p], out2[L-1-p] = x[p];
// out1[p] = x[y*W + c] with p = c*H + y, out3[L-1-p] = out1[p].
template <typename T>
__global__ void __launch_bounds__(kThreads)
cross_scan_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t D, int64_t H, int64_t W) {
  const int64_t L = H * W, n = D * L, b = blockIdx.y;  // n outputs per direction and batch element
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t d = i / L, p = i % L;
    const T* row = x + (b * D + d) * L;
    const int64_t o0 = (b * 4 * D + d) * L, step = D * L;
    const T vr = row[p];
    const T vc = row[(p % H) * W + p / H];
    out[o0 + p] = vr;
    out[o0 + step + p] = vc;
    out[o0 + 2 * step + L - 1 - p] = vr;
    out[o0 + 3 * step + L - 1 - p] = vc;
  }
}

// y[t] = (ys0[t] + ys2[L-1-t]) + (ys1[s] + ys3[L-1-s]) with t = r*W + c, s = c*H + r.
template <typename T>
__global__ void __launch_bounds__(kThreads)
cross_merge_kernel(const T* __restrict__ ys, T* __restrict__ y, int64_t D, int64_t H, int64_t W) {
  using A = typename Acc<T>::type;
  const int64_t L = H * W, n = D * L, b = blockIdx.y;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t d = i / L, t = i % L, s = (t % W) * H + t / W;
    const T* s0 = ys + (b * 4 * D + d) * L;
    const int64_t step = D * L;
    const A rows = to_acc(s0[t]) + to_acc(s0[2 * step + L - 1 - t]);
    const A cols = to_acc(s0[step + s]) + to_acc(s0[3 * step + L - 1 - s]);
    y[(b * D + d) * L + t] = from_acc<T>(rows + cols);
  }
}

// Blocks per batch element: enough to fill the device, at most one per 256 outputs.
dim3 grid_for(int64_t B, int64_t per_batch) {
  const int64_t blocks = std::min<int64_t>((per_batch + kThreads - 1) / kThreads, 4096);
  return dim3(static_cast<unsigned>(std::max<int64_t>(blocks, 1)), static_cast<unsigned>(B));
}

}  // namespace

void cross_scan_fwd_cuda(const TensorView& x, const TensorView& out, void* stream_ptr) {
  check_cross_args(x, "x", out, "out", false);
  QM_CHECK(x.device.is_cuda(), "cross_scan_fwd: the CUDA kernel got CPU tensors");
  const int64_t B = x.shape[0], D = x.shape[1], H = x.shape[2], W = x.shape[3];
  if (x.numel() == 0) return;
  QM_CHECK(B <= 65535, "cross_scan_fwd: batch ", B, " exceeds the CUDA grid limit 65535");
  CudaDeviceGuard guard(x.device.index);
  const auto stream = static_cast<cudaStream_t>(stream_ptr);
  dispatch_float(x.dtype, "cross_scan_fwd", [&](auto tag) {
    using T = typename decltype(tag)::type;
    cross_scan_kernel<T><<<grid_for(B, D * H * W), kThreads, 0, stream>>>(x.ptr<T>(), out.ptr<T>(), D, H, W);
    QM_CUDA_CHECK_LAUNCH();
  });
}

void cross_merge_fwd_cuda(const TensorView& ys, const TensorView& y, void* stream_ptr) {
  check_cross_args(y, "y", ys, "ys", true);
  QM_CHECK(y.device.is_cuda(), "cross_merge_fwd: the CUDA kernel got CPU tensors");
  const int64_t B = y.shape[0], D = y.shape[1], H = y.shape[2], W = y.shape[3];
  if (y.numel() == 0) return;
  QM_CHECK(B <= 65535, "cross_merge_fwd: batch ", B, " exceeds the CUDA grid limit 65535");
  CudaDeviceGuard guard(y.device.index);
  const auto stream = static_cast<cudaStream_t>(stream_ptr);
  dispatch_float(y.dtype, "cross_merge_fwd", [&](auto tag) {
    using T = typename decltype(tag)::type;
    cross_merge_kernel<T><<<grid_for(B, D * H * W), kThreads, 0, stream>>>(ys.ptr<T>(), y.ptr<T>(), D, H, W);
    QM_CUDA_CHECK_LAUNCH();
  });
}

}  // namespace quadmamba
