// quad_scan / quad_merge on CUDA (contract in cpp/include/quadmamba/quad_scan.h).
//
// Two kernels, each one pass over the data:
//   gather  (quad_scan_fwd, and quad_merge_bwd with the decision gradient): a thread per
//           sequence slot p, writing out[0][p] and out[1][L-1-p] (both coalesced) from
//           the fine and coarse source tokens;
//   scatter (quad_merge_fwd, and quad_scan_bwd with the decision gradient): a thread per
//           raster token t, writing y[t] (coalesced) from the slots f^-1(t), c^-1(t).
// One block per (b, d) row; with kGrad the block reduces its 4 decision-gradient sums
// (Acc<T> accumulation) into workspace[b, d, :], and reduce_partials sums them over d
// in order: no atomics, bitwise repeatable. Offsets are 64-bit.
#include "common.cuh"
#include "quadmamba/quad_scan.h"
#include "scan_dtype.cuh"

namespace quadmamba {
namespace {

constexpr int kThreads = 256;

// Adds v to sums[q] for the runtime quadrant q without indexing a local array.
template <typename A>
__device__ __forceinline__ void add_to_quadrant(A (&sums)[4], int q, A v) {
#pragma unroll
  for (int i = 0; i < 4; ++i) sums[i] += (i == q) ? v : A(0);
}

// Sums each of the 4 values over the block; the result lands in out[0..4) (global).
template <typename A>
__device__ void block_sum4(A (&v)[4], A* out) {
  __shared__ A partial[kThreads / 32][4];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int q = 0; q < 4; ++q) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v[q] += __shfl_down_sync(0xffffffffu, v[q], offset);
    if (lane == 0) partial[warp][q] = v[q];
  }
  __syncthreads();
  if (threadIdx.x < 4) {
    A s = 0;
    for (int w = 0; w < kThreads / 32; ++w) s += partial[w][threadIdx.x];
    out[threadIdx.x] = s;
  }
}

// out[b,0,d,p] = M[f(p)] x[f(p)] + (1 - M[c(p)]) x[c(p)],  out[b,1,d,L-1-p] = out[b,0,d,p].
// kGrad: dM[Q(f(p))] += src[f(p)] S[p], dM[Q(c(p))] -= src[c(p)] S[p], S = aux0 + rev(aux1).
template <typename T, bool kGrad>
__global__ void __launch_bounds__(kThreads)
gather_kernel(const T* __restrict__ src, const typename Acc<T>::type* __restrict__ decision,
              T* __restrict__ out, const T* __restrict__ aux, typename Acc<T>::type* __restrict__ workspace,
              QuadGeometry g, int64_t D) {
  using A = typename Acc<T>::type;
  const int64_t bd = blockIdx.x, b = bd / D, d = bd % D, L = g.L();
  const T* row = src + bd * L;
  const int64_t seq0 = (b * 2 * D + d) * L, seq1 = seq0 + D * L;
  A dec[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) dec[q] = decision[b * 4 + q];
  A dm[4] = {0, 0, 0, 0};
  for (int64_t p = threadIdx.x; p < L; p += kThreads) {
    int64_t yf, xf, yc, xc;
    fine_slot_to_yx(g.order, g.H, g.W, p, yf, xf);
    coarse_slot_to_yx(g.H, g.W, p, yc, xc);
    const int qf = quadrant_of(g.H, g.W, yf, xf), qc = quadrant_of(g.H, g.W, yc, xc);
    const A vf = to_acc(row[source_row(g, yf) * g.W + source_col(g, xf)]);
    const A vc = to_acc(row[source_row(g, yc) * g.W + source_col(g, xc)]);
    const T v = from_acc<T>(dec[qf] * vf + (A(1) - dec[qc]) * vc);
    out[seq0 + p] = v;
    out[seq1 + L - 1 - p] = v;
    if (kGrad) {
      const A s = to_acc(aux[seq0 + p]) + to_acc(aux[seq1 + L - 1 - p]);
      add_to_quadrant(dm, qf, vf * s);
      add_to_quadrant(dm, qc, -vc * s);
    }
  }
  if (kGrad) block_sum4(dm, workspace + bd * 4);
}

// y[b,d,t] = M[t] S[f^-1(t)] + (1 - M[t]) S[c^-1(t)],  S = seq0 + rev(seq1).
// kGrad: dM[Q(t)] += aux[t] (S[f^-1(t)] - S[c^-1(t)]).
template <typename T, bool kGrad>
__global__ void __launch_bounds__(kThreads)
scatter_kernel(const T* __restrict__ seq, const typename Acc<T>::type* __restrict__ decision,
               T* __restrict__ dst, const T* __restrict__ aux, typename Acc<T>::type* __restrict__ workspace,
               QuadGeometry g, int64_t D) {
  using A = typename Acc<T>::type;
  const int64_t bd = blockIdx.x, b = bd / D, d = bd % D, L = g.L();
  const T* s0 = seq + (b * 2 * D + d) * L;
  const T* s1 = s0 + D * L;
  A dec[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) dec[q] = decision[b * 4 + q];
  A dm[4] = {0, 0, 0, 0};
  for (int64_t t = threadIdx.x; t < L; t += kThreads) {
    const int64_t y = rolled_row(g, t / g.W), x = rolled_col(g, t % g.W);
    const int64_t pf = fine_yx_to_slot(g.order, g.H, g.W, y, x);
    const int64_t pc = coarse_yx_to_slot(g.H, g.W, y, x);
    const int q = quadrant_of(g.H, g.W, y, x);
    const A sf = to_acc(s0[pf]) + to_acc(s1[L - 1 - pf]);
    const A sc = to_acc(s0[pc]) + to_acc(s1[L - 1 - pc]);
    dst[bd * L + t] = from_acc<T>(dec[q] * sf + (A(1) - dec[q]) * sc);
    if (kGrad) add_to_quadrant(dm, q, to_acc(aux[bd * L + t]) * (sf - sc));
  }
  if (kGrad) block_sum4(dm, workspace + bd * 4);
}

// ddecision[b, q] = sum_d workspace[b, d, q], summed in order of d.
template <typename A>
__global__ void reduce_partials_kernel(const A* __restrict__ workspace, A* __restrict__ ddecision, int64_t B,
                                       int64_t D) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;  // b*4 + q
  if (i >= B * 4) return;
  const int64_t b = i / 4, q = i % 4;
  A s = 0;
  for (int64_t d = 0; d < D; ++d) s += workspace[(b * D + d) * 4 + q];
  ddecision[i] = s;
}

enum class Pass { Gather, Scatter };

// Launches one pass; `aux`, `ddecision` and `workspace` are defined exactly when the
// decision gradient is wanted.
void launch(Pass pass, const TensorView& in, const TensorView& decision, const TensorView& out,
            const TensorView& aux, const TensorView& ddecision, const TensorView& workspace,
            const QuadGeometry& g, int64_t B, int64_t D, void* stream_ptr, const char* op) {
  QM_CHECK(in.device.is_cuda(), op, ": the CUDA kernel got CPU tensors");
  if (B * D == 0) {
    if (ddecision.defined()) {
      CudaDeviceGuard guard(in.device.index);
      QM_CUDA_CHECK(cudaMemsetAsync(ddecision.data, 0, ddecision.numel() * dtype_size(ddecision.dtype),
                                    static_cast<cudaStream_t>(stream_ptr)));
    }
    return;
  }
  QM_CHECK(B * D < (int64_t{1} << 31), op, ": B*D = ", B * D, " exceeds the CUDA grid limit 2^31 - 1");
  CudaDeviceGuard guard(in.device.index);
  const auto stream = static_cast<cudaStream_t>(stream_ptr);
  const bool grad = ddecision.defined();
  dispatch_float(in.dtype, op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = typename Acc<T>::type;
    const T* src = in.ptr<T>();
    const A* dec = decision.ptr<A>();
    T* dst = out.ptr<T>();
    const T* ax = grad ? aux.ptr<T>() : nullptr;
    A* ws = grad ? workspace.ptr<A>() : nullptr;
    const dim3 grid(static_cast<unsigned>(B * D));
    if (pass == Pass::Gather) {
      if (grad) gather_kernel<T, true><<<grid, kThreads, 0, stream>>>(src, dec, dst, ax, ws, g, D);
      else gather_kernel<T, false><<<grid, kThreads, 0, stream>>>(src, dec, dst, ax, ws, g, D);
    } else {
      if (grad) scatter_kernel<T, true><<<grid, kThreads, 0, stream>>>(src, dec, dst, ax, ws, g, D);
      else scatter_kernel<T, false><<<grid, kThreads, 0, stream>>>(src, dec, dst, ax, ws, g, D);
    }
    QM_CUDA_CHECK_LAUNCH();
    if (grad) {
      const unsigned blocks = static_cast<unsigned>((B * 4 + kThreads - 1) / kThreads);
      reduce_partials_kernel<A><<<blocks, kThreads, 0, stream>>>(ws, ddecision.ptr<A>(), B, D);
      QM_CUDA_CHECK_LAUNCH();
    }
  });
}

}  // namespace

void quad_scan_fwd_cuda(const TensorView& x, const TensorView& decision, const TensorView& out,
                        const QuadGeometry& g, void* stream) {
  check_quad_args(x, "x", out, "out", decision, TensorView{}, TensorView{}, g);
  launch(Pass::Gather, x, decision, out, {}, {}, {}, g, x.shape[0], x.shape[1], stream, "quad_scan_fwd");
}

void quad_scan_bwd_cuda(const TensorView& x, const TensorView& decision, const TensorView& gout,
                        const TensorView& dx, const TensorView& ddecision, const TensorView& workspace,
                        const QuadGeometry& g, void* stream) {
  check_quad_args(x, "x", gout, "gout", decision, ddecision, workspace, g);
  check_quad_args(dx, "dx", gout, "gout", decision, TensorView{}, TensorView{}, g);
  QM_CHECK(ddecision.defined(), "ddecision is required");
  launch(Pass::Scatter, gout, decision, dx, x, ddecision, workspace, g, x.shape[0], x.shape[1], stream,
         "quad_scan_bwd");
}

void quad_merge_fwd_cuda(const TensorView& ys, const TensorView& decision, const TensorView& y,
                         const QuadGeometry& g, void* stream) {
  check_quad_args(y, "y", ys, "ys", decision, TensorView{}, TensorView{}, g);
  launch(Pass::Scatter, ys, decision, y, {}, {}, {}, g, y.shape[0], y.shape[1], stream, "quad_merge_fwd");
}

void quad_merge_bwd_cuda(const TensorView& ys, const TensorView& decision, const TensorView& gy,
                         const TensorView& dys, const TensorView& ddecision, const TensorView& workspace,
                         const QuadGeometry& g, void* stream) {
  check_quad_args(gy, "gy", ys, "ys", decision, ddecision, workspace, g);
  check_quad_args(gy, "gy", dys, "dys", decision, TensorView{}, TensorView{}, g);
  QM_CHECK(ddecision.defined(), "ddecision is required");
  launch(Pass::Gather, gy, decision, dys, ys, ddecision, workspace, g, gy.shape[0], gy.shape[1], stream,
         "quad_merge_bwd");
}

}  // namespace quadmamba
