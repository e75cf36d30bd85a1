// quad_scan / quad_merge: the quadtree sequences of a feature map and their adjoint,
// fused into one pass each (index math in quadtree_index.h; plain-PyTorch spec in
// python/quadmamba/ops/reference.py::quad_scan_ref / quad_merge_ref).
//
// Notation: g = QuadGeometry (H, W multiples of 4, roll (sy, sx), fine order),
// L = H*W, f(p) = fine_source(g, p), c(p) = coarse_source(g, p) (raster indices in
// the un-rolled x), f^-1 = fine_slot_of, c^-1 = coarse_slot_of, Q(t) = quadrant of
// token t on the rolled grid, M[t] = decision[b, Q(t)].
//
// quad_scan_fwd (gather; one read of x, one write of each direction):
//   out[b, 0, d, p] = M[f(p)] * x[b, d, f(p)] + (1 - M[c(p)]) * x[b, d, c(p)]
//   out[b, 1, d, p] = out[b, 0, d, L-1-p]
// quad_merge_fwd (scatter; the adjoint of quad_scan_fwd in x):
//   S[b, d, p] = ys[b, 0, d, p] + ys[b, 1, d, L-1-p]
//   y[b, d, t] = M[t] * S[b, d, f^-1(t)] + (1 - M[t]) * S[b, d, c^-1(t)]
// quad_scan_bwd: dx = quad_merge_fwd(gout) (written by the same code), fused with
//   ddecision[b, q] = sum_{t: Q(t)=q} sum_d x[b,d,t] * (G[b,d,f^-1(t)] - G[b,d,c^-1(t)]),
//   G = gout[:, 0] + reverse(gout[:, 1]).
// quad_merge_bwd: dys = quad_scan_fwd(gy) (written by the same code), fused with
//   ddecision[b, q] = sum_{t: Q(t)=q} sum_d gy[b,d,t] * (S[b,d,f^-1(t)] - S[b,d,c^-1(t)]),
//   S = ys[:, 0] + reverse(ys[:, 1]).
// Both decision gradients are the same reduction, evaluated slot by slot in the gather
// pass and token by token in the scatter pass.
// For the "quadtree" order f and c send slot p into the same quadrant, so exactly one
// term is non-zero per slot when decision is one-hot; for "official" f is still a
// permutation but the masked sum is not (1/8 of slots hold two tokens, 1/8 none).
// Both terms are always computed, as the formula (and the authors' masked sum): with a
// one-hot decision a non-finite x in the unselected term still gives NaN (0 * inf), as in
// the reference; other decision values are blended by the formula.
//
// Arguments (all contiguous, on one device; strides in elements):
//   x, y, dx, gy:        (B, D, H, W), data dtype T
//   out, ys, gout, dys:  (B, 2, D, L), T
//   decision:            (B, 4), accumulation dtype A
//   ddecision:           (B, 4), A, fully written (no pre-zeroing)
//   workspace:           (B, D, 4), A: scratch for partial sums of ddecision (per (b, d) on
//                        the CPU, per (b, group of channels) on CUDA), reduced in a fixed
//                        order (bitwise repeatable, no atomics); no pre-zeroing
//   T: CPU float32 or float64; CUDA float32, float64, float16 or bfloat16.
//   A: float64 when T is float64, else float32 (math in A, fp16/bf16 read and written
//      in their own type).
//   stream: cudaStream_t (CUDA entry points only).
#pragma once

#include "quadmamba/quadtree_index.h"
#include "quadmamba/tensor_view.h"

namespace quadmamba {

// The geometry of a call; shifts may be given in (-H, H) x (-W, W).
QuadGeometry make_quad_geometry(int64_t H, int64_t W, int64_t sy, int64_t sx, QuadOrder order);

// Checks a geometry filled in by hand as make_quad_geometry would have made it (H, W positive
// multiples of 4, 0 <= sy < H, 0 <= sx < W, a known order); every entry point below calls it.
void check_quad_geometry(const QuadGeometry& g);

void quad_scan_fwd_cpu(const TensorView& x, const TensorView& decision, const TensorView& out,
                       const QuadGeometry& g);
void quad_scan_bwd_cpu(const TensorView& x, const TensorView& decision, const TensorView& gout,
                       const TensorView& dx, const TensorView& ddecision, const TensorView& workspace,
                       const QuadGeometry& g);
void quad_merge_fwd_cpu(const TensorView& ys, const TensorView& decision, const TensorView& y,
                        const QuadGeometry& g);
void quad_merge_bwd_cpu(const TensorView& ys, const TensorView& decision, const TensorView& gy,
                        const TensorView& dys, const TensorView& ddecision, const TensorView& workspace,
                        const QuadGeometry& g);

// The instruction set the CPU kernels above run with on this machine: "avx" (8-lane forward
// passes, 4-lane SSE2 gradient passes), "sse2" (4-lane throughout) or "portable" (scalar
// loops, non-x86 builds). QUADMAMBA_CPU_GENERIC=1 turns "avx" into "sse2", =2 into
// "portable" (common.h).
const char* quad_scan_cpu_isa();

void quad_scan_fwd_cuda(const TensorView& x, const TensorView& decision, const TensorView& out,
                        const QuadGeometry& g, void* stream);
void quad_scan_bwd_cuda(const TensorView& x, const TensorView& decision, const TensorView& gout,
                        const TensorView& dx, const TensorView& ddecision, const TensorView& workspace,
                        const QuadGeometry& g, void* stream);
void quad_merge_fwd_cuda(const TensorView& ys, const TensorView& decision, const TensorView& y,
                         const QuadGeometry& g, void* stream);
void quad_merge_bwd_cuda(const TensorView& ys, const TensorView& decision, const TensorView& gy,
                         const TensorView& dys, const TensorView& ddecision, const TensorView& workspace,
                         const QuadGeometry& g, void* stream);

// The shape / dtype / device checks of the four entry points, shared by their CPU and CUDA
// versions (each throws quadmamba::Error naming the argument).
void check_quad_scan_fwd_args(const TensorView& x, const TensorView& decision, const TensorView& out,
                              const QuadGeometry& g);
void check_quad_scan_bwd_args(const TensorView& x, const TensorView& decision, const TensorView& gout,
                              const TensorView& dx, const TensorView& ddecision, const TensorView& workspace,
                              const QuadGeometry& g);
void check_quad_merge_fwd_args(const TensorView& ys, const TensorView& decision, const TensorView& y,
                               const QuadGeometry& g);
void check_quad_merge_bwd_args(const TensorView& ys, const TensorView& decision, const TensorView& gy,
                               const TensorView& dys, const TensorView& ddecision, const TensorView& workspace,
                               const QuadGeometry& g);

}  // namespace quadmamba
