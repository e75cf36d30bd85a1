// quad_scan / quad_merge on CUDA (contract in cpp/include/quadmamba/quad_scan.h).
//
// Two kernels, each one pass over the data:
//   gather  (quad_scan_fwd, and quad_merge_bwd with the decision gradient): a thread per
//           sequence slot p, writing out[0][p] and out[1][L-1-p] (both coalesced) from
//           the fine and coarse source tokens;
//   scatter (quad_merge_fwd, and quad_scan_bwd with the decision gradient): a thread per
//           raster token t, writing y[t] (coalesced) from the slots f^-1(t), c^-1(t).
// One block per (b, tile of kRows channels, chunk of L); with kGrad the block reduces its
// 4 decision-gradient sums (Acc<T> accumulation) into its entry of the workspace, and
// reduce_partials sums a batch element's entries in order: no atomics, bitwise
// repeatable. Offsets are 64-bit.
#include <algorithm>

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

// v[q] for a runtime q, by selects (keeps v in registers instead of local memory).
template <typename A>
__device__ __forceinline__ A pick(const A (&v)[4], int q) {
  return q == 0 ? v[0] : (q == 1 ? v[1] : (q == 2 ? v[2] : v[3]));
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

// Block (blockIdx.x = b*tiles + tile, blockIdx.y = chunk) owns kRows channels of one
// batch element and one chunk of the L slots (tokens): the index math of a slot or token
// (several integer divisions) is done once and reused for the kRows rows; the chunks keep
// enough blocks in flight for small batches.
constexpr int kRows = 8;

struct BlockRange {
  int64_t b, tile, tiles, d0, begin, end, partial;  // partial: index of this block's sums
  int rows;
};

__device__ __forceinline__ BlockRange block_range(int64_t D, int64_t L) {
  BlockRange r;
  r.tiles = (D + kRows - 1) / kRows;
  r.b = blockIdx.x / r.tiles;
  r.tile = blockIdx.x % r.tiles;
  r.d0 = r.tile * kRows;
  r.rows = static_cast<int>(D - r.d0 < kRows ? D - r.d0 : kRows);
  const int64_t chunks = gridDim.y, per = (L + chunks - 1) / chunks;
  r.begin = blockIdx.y * per;
  r.end = r.begin + per < L ? r.begin + per : L;
  r.partial = static_cast<int64_t>(blockIdx.x) * chunks + blockIdx.y;
  return r;
}

// out[b,0,d,p] = M[f(p)] x[f(p)] + (1 - M[c(p)]) x[c(p)],  out[b,1,d,L-1-p] = out[b,0,d,p].
// kGrad: dM[Q(f(p))] += src[f(p)] S[p], dM[Q(c(p))] -= src[c(p)] S[p], S = aux0 + rev(aux1).
template <typename T, bool kGrad>
__global__ void __launch_bounds__(kThreads)
gather_kernel(const T* __restrict__ src, const typename Acc<T>::type* __restrict__ decision,
              T* __restrict__ out, const T* __restrict__ aux, typename Acc<T>::type* __restrict__ workspace,
              QuadGeometry g, int64_t D) {
  using A = typename Acc<T>::type;
  const int64_t L = g.L();
  const BlockRange br = block_range(D, L);
  const int64_t b = br.b, d0 = br.d0;
  const int rows = br.rows;
  const T* x = src + (b * D + d0) * L;                // row r at x + r*L
  const int64_t seq0 = (b * 2 * D + d0) * L, seq1 = seq0 + D * L;  // + r*L
  A dec[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) dec[q] = decision[b * 4 + q];
  A dm[4] = {0, 0, 0, 0};
  for (int64_t p = br.begin + threadIdx.x; p < br.end; p += kThreads) {
    int64_t yf, xf, yc, xc;
    fine_slot_to_yx(g.order, g.H, g.W, p, yf, xf);
    coarse_slot_to_yx(g.H, g.W, p, yc, xc);
    const int qf = quadrant_of(g.H, g.W, yf, xf), qc = quadrant_of(g.H, g.W, yc, xc);
    const int64_t tf = source_row(g, yf) * g.W + source_col(g, xf);
    const int64_t tc = source_row(g, yc) * g.W + source_col(g, xc);
    const A mf = pick(dec, qf), mc = A(1) - pick(dec, qc);
    for (int r = 0; r < rows; ++r) {
      const int64_t off = r * L;
      const A vf = to_acc(x[off + tf]), vc = to_acc(x[off + tc]);
      const T v = from_acc<T>(mf * vf + mc * vc);
      out[seq0 + off + p] = v;
      out[seq1 + off + L - 1 - p] = v;
      if (kGrad) {
        const A s = to_acc(aux[seq0 + off + p]) + to_acc(aux[seq1 + off + L - 1 - p]);
        add_to_quadrant(dm, qf, vf * s);
        add_to_quadrant(dm, qc, -vc * s);
      }
    }
  }
  if (kGrad) block_sum4(dm, workspace + br.partial * 4);
}

// y[b,d,t] = M[t] S[f^-1(t)] + (1 - M[t]) S[c^-1(t)],  S = seq0 + rev(seq1).
// kGrad: dM[Q(t)] += aux[t] (S[f^-1(t)] - S[c^-1(t)]).
template <typename T, bool kGrad>
__global__ void __launch_bounds__(kThreads)
scatter_kernel(const T* __restrict__ seq, const typename Acc<T>::type* __restrict__ decision,
               T* __restrict__ dst, const T* __restrict__ aux, typename Acc<T>::type* __restrict__ workspace,
               QuadGeometry g, int64_t D) {
  using A = typename Acc<T>::type;
  const int64_t L = g.L();
  const BlockRange br = block_range(D, L);
  const int64_t b = br.b, d0 = br.d0;
  const int rows = br.rows;
  const T* s0 = seq + (b * 2 * D + d0) * L;  // row r at s0 + r*L
  const T* s1 = s0 + D * L;
  const int64_t ras = (b * D + d0) * L;      // + r*L
  A dec[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) dec[q] = decision[b * 4 + q];
  A dm[4] = {0, 0, 0, 0};
  for (int64_t t = br.begin + threadIdx.x; t < br.end; t += kThreads) {
    const int64_t y = rolled_row(g, t / g.W), x = rolled_col(g, t % g.W);
    const int64_t pf = fine_yx_to_slot(g.order, g.H, g.W, y, x);
    const int64_t pc = coarse_yx_to_slot(g.H, g.W, y, x);
    const int q = quadrant_of(g.H, g.W, y, x);
    const A m = pick(dec, q);
    for (int r = 0; r < rows; ++r) {
      const int64_t off = r * L;
      const A sf = to_acc(s0[off + pf]) + to_acc(s1[off + L - 1 - pf]);
      const A sc = to_acc(s0[off + pc]) + to_acc(s1[off + L - 1 - pc]);
      dst[ras + off + t] = from_acc<T>(m * sf + (A(1) - m) * sc);
      if (kGrad) add_to_quadrant(dm, q, to_acc(aux[ras + off + t]) * (sf - sc));
    }
  }
  if (kGrad) block_sum4(dm, workspace + br.partial * 4);
}

// ddecision[b, q] = sum of the `per_batch` block sums of batch element b, in order.
template <typename A>
__global__ void reduce_partials_kernel(const A* __restrict__ workspace, A* __restrict__ ddecision, int64_t B,
                                       int64_t per_batch) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;  // b*4 + q
  if (i >= B * 4) return;
  const int64_t b = i / 4, q = i % 4;
  A s = 0;
  for (int64_t k = 0; k < per_batch; ++k) s += workspace[(b * per_batch + k) * 4 + q];
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
  // Grid: (b, tile) x chunk of the L slots, kThreads slots per chunk (at most 65535 chunks);
  // with the decision gradient also tiles * chunks <= D, so the block sums fit the (B, D, 4)
  // workspace (large L with few channels then runs fewer, longer chunks).
  const bool grad = ddecision.defined();
  const int64_t tiles = (D + kRows - 1) / kRows, L = g.L();
  const int64_t slot_chunks = std::min<int64_t>((L + kThreads - 1) / kThreads, 65535);
  const int64_t chunks = grad ? std::max<int64_t>(1, std::min<int64_t>(D / tiles, slot_chunks)) : slot_chunks;
  QM_CHECK(B * tiles < (int64_t{1} << 31), op, ": B*D = ", B * D, " exceeds the CUDA grid limit");
  CudaDeviceGuard guard(in.device.index);
  const auto stream = static_cast<cudaStream_t>(stream_ptr);
  dispatch_float(in.dtype, op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = typename Acc<T>::type;
    const T* src = in.ptr<T>();
    const A* dec = decision.ptr<A>();
    T* dst = out.ptr<T>();
    const T* ax = grad ? aux.ptr<T>() : nullptr;
    A* ws = grad ? workspace.ptr<A>() : nullptr;
    const dim3 grid(static_cast<unsigned>(B * tiles), static_cast<unsigned>(chunks));
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
      reduce_partials_kernel<A><<<blocks, kThreads, 0, stream>>>(ws, ddecision.ptr<A>(), B, tiles * chunks);
      QM_CUDA_CHECK_LAUNCH();
    }
  });
}

}  // namespace

void quad_scan_fwd_cuda(const TensorView& x, const TensorView& decision, const TensorView& out,
                        const QuadGeometry& g, void* stream) {
  check_quad_scan_fwd_args(x, decision, out, g);
  launch(Pass::Gather, x, decision, out, {}, {}, {}, g, x.shape[0], x.shape[1], stream, "quad_scan_fwd");
}

void quad_scan_bwd_cuda(const TensorView& x, const TensorView& decision, const TensorView& gout,
                        const TensorView& dx, const TensorView& ddecision, const TensorView& workspace,
                        const QuadGeometry& g, void* stream) {
  check_quad_scan_bwd_args(x, decision, gout, dx, ddecision, workspace, g);
  launch(Pass::Scatter, gout, decision, dx, x, ddecision, workspace, g, x.shape[0], x.shape[1], stream,
         "quad_scan_bwd");
}

void quad_merge_fwd_cuda(const TensorView& ys, const TensorView& decision, const TensorView& y,
                         const QuadGeometry& g, void* stream) {
  check_quad_merge_fwd_args(ys, decision, y, g);
  launch(Pass::Scatter, ys, decision, y, {}, {}, {}, g, y.shape[0], y.shape[1], stream, "quad_merge_fwd");
}

void quad_merge_bwd_cuda(const TensorView& ys, const TensorView& decision, const TensorView& gy,
                         const TensorView& dys, const TensorView& ddecision, const TensorView& workspace,
                         const QuadGeometry& g, void* stream) {
  check_quad_merge_bwd_args(ys, decision, gy, dys, ddecision, workspace, g);
  launch(Pass::Gather, gy, decision, dys, ys, ddecision, workspace, g, gy.shape[0], gy.shape[1], stream,
         "quad_merge_bwd");
}

}  // namespace quadmamba
