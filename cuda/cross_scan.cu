// cross_scan / cross_merge on CUDA (contract in cpp/include/quadmamba/cross_scan.h).
// A grid-stride loop over the B*D*L outputs (one 1-D grid, so any batch size) with 64-bit
// indices; every thread writes consecutive addresses (coalesced); the column-major reads
// are strided within one (b, d) image, which stays in L2.
#include <algorithm>

#include "common.cuh"
#include "quadmamba/cross_scan.h"
#include "scan_dtype.cuh"

namespace quadmamba {
namespace {

constexpr int kThreads = 256;

// For output slot p of row (b, d): out0[p] = x[p], out2[L-1-p] = x[p];
// out1[p] = x[y*W + c] with p = c*H + y, out3[L-1-p] = out1[p]. i runs over the B*D*L
// outputs of one direction: row bd = b*D + d = i / L, slot p = i % L.
template <typename T>
__global__ void __launch_bounds__(kThreads)
cross_scan_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t B, int64_t D, int64_t H, int64_t W) {
  const int64_t L = H * W, n = B * D * L;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t bd = i / L, p = i % L, b = bd / D, d = bd % D;
    const T* row = x + bd * L;
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
// i runs over the B*D*L outputs as in cross_scan_kernel.
template <typename T>
__global__ void __launch_bounds__(kThreads)
cross_merge_kernel(const T* __restrict__ ys, T* __restrict__ y, int64_t B, int64_t D, int64_t H, int64_t W) {
  using A = typename Acc<T>::type;
  const int64_t L = H * W, n = B * D * L;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t bd = i / L, t = i % L, b = bd / D, d = bd % D, s = (t % W) * H + t / W;
    const T* s0 = ys + (b * 4 * D + d) * L;
    const int64_t step = D * L;
    const A rows = to_acc(s0[t]) + to_acc(s0[2 * step + L - 1 - t]);
    const A cols = to_acc(s0[step + s]) + to_acc(s0[3 * step + L - 1 - s]);
    y[i] = from_acc<T>(rows + cols);
  }
}

// Blocks for n outputs: one per kThreads outputs, at most 4096 (about a million threads,
// several times what a GPU holds at once; beyond that each thread loops).
unsigned grid_for(int64_t n) {
  return static_cast<unsigned>(std::clamp<int64_t>((n + kThreads - 1) / kThreads, 1, 4096));
}

}  // namespace

void cross_scan_fwd_cuda(const TensorView& x, const TensorView& out, void* stream_ptr) {
  check_cross_args(x, "x", out, "out", false);
  QM_CHECK(x.device.is_cuda(), "cross_scan_fwd: the CUDA kernel got CPU tensors");
  const int64_t B = x.shape[0], D = x.shape[1], H = x.shape[2], W = x.shape[3];
  if (x.numel() == 0) return;
  CudaDeviceGuard guard(x.device.index);
  const auto stream = static_cast<cudaStream_t>(stream_ptr);
  dispatch_float(x.dtype, "cross_scan_fwd", [&](auto tag) {
    using T = typename decltype(tag)::type;
    cross_scan_kernel<T><<<grid_for(x.numel()), kThreads, 0, stream>>>(x.ptr<T>(), out.ptr<T>(), B, D, H, W);
    QM_CUDA_CHECK_LAUNCH();
  });
}

void cross_merge_fwd_cuda(const TensorView& ys, const TensorView& y, void* stream_ptr) {
  check_cross_args(y, "y", ys, "ys", true);
  QM_CHECK(y.device.is_cuda(), "cross_merge_fwd: the CUDA kernel got CPU tensors");
  const int64_t B = y.shape[0], D = y.shape[1], H = y.shape[2], W = y.shape[3];
  if (y.numel() == 0) return;
  CudaDeviceGuard guard(y.device.index);
  const auto stream = static_cast<cudaStream_t>(stream_ptr);
  dispatch_float(y.dtype, "cross_merge_fwd", [&](auto tag) {
    using T = typename decltype(tag)::type;
    cross_merge_kernel<T><<<grid_for(y.numel()), kThreads, 0, stream>>>(ys.ptr<T>(), y.ptr<T>(), B, D, H, W);
    QM_CUDA_CHECK_LAUNCH();
  });
}

}  // namespace quadmamba
