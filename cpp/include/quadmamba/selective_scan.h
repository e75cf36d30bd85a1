// Selective scan (S6): forward and backward.
//
// ---- Contract -----------------------------------------------------------------
// Letters: B batch, KD = K*D channels, K groups (scan directions), Dg = KD / K
// channels per group, N state size (1 <= N <= 16), L sequence length (L >= 1).
// Channel d belongs to group k = d / Dg.
//
// Forward, for every (b, d), state h in R^N with h_{-1} = 0, t = 0..L-1:
//   x_t  = delta[b,d,t] + delta_bias[d]                  (bias optional, else 0)
//   dl_t = softplus(x_t) if delta_softplus else x_t      (softplus(x) = x for x > 20)
//   a_t  = exp(dl_t * A[d,:])                            (elementwise over n)
//   h_t  = a_t * h_{t-1} + dl_t * u[b,d,t] * B[b,k,:,t]
//   y[b,d,t] = sum_n C[b,k,n,t] h_t[n] + Dskip[d] * u[b,d,t]   (Dskip optional, else 0)
//
// Backward, g_t = dy[b,d,t], adjoint q in R^N with q_L = 0, t = L-1..0:
//   q_t        = C[b,k,:,t] g_t + a_{t+1} * q_{t+1}
//   dC[b,k,:,t]   += g_t h_t                       (sum over the Dg channels of group k)
//   dB[b,k,:,t]   += q_t dl_t u_t                  (sum over the Dg channels of group k)
//   du[b,d,t]      = Dskip[d] g_t + dl_t sum_n q_t[n] B[b,k,n,t]
//   ddl_t          = sum_n q_t[n] (A[d,n] a_t[n] h_{t-1}[n] + B[b,k,n,t] u_t)
//   dA[d,:]       += sum_{b,t} dl_t q_t a_t h_{t-1}
//   dDskip[d]     += sum_{b,t} g_t u_t
//   ddelta[b,d,t]  = ddl_t * sigmoid(x_t)  (softplus; sigmoid := 1 for x_t > 20) else ddl_t
//   ddelta_bias[d]+= sum_{b,t} ddelta[b,d,t]
// The backward recomputes h from the inputs (chunk by chunk); no per-step state
// is stored anywhere.
//
// Low-rank delta (CPU; the models' delta is a rank-R projection): given delta_proj (KD, R),
// delta is (B, K, R, L) and stands for
//   delta_full[b,d,t] = sum_r delta_proj[d,r] delta[b,k,r,t]        (k = d / Dg, r in order)
// everywhere above; the projection is formed tile by tile inside the kernels (the (B, KD, L)
// tensor is never stored). The backward's ddelta is then the gradient of delta_full, (B, KD,
// L); those of delta and delta_proj are two matrix products the caller forms:
//   d delta[b,k,r,t] = sum_{d in k} delta_proj[d,r] ddelta[b,d,t]
//   d delta_proj[d,r] = sum_{b,t} ddelta[b,d,t] delta[b,k,r,t]
//
// Arguments (all views contiguous, strides in elements, one device for all):
//   u, delta          (B, KD, L)    float32 | float64 (CPU); float32 | float16 | bfloat16 (CUDA)
//                                   (delta: (B, K, R, L) with delta_proj)
//   delta_proj        (KD, R)       dtype of A, R >= 1, optional (CPU entry points only; the
//                                   CUDA ones refuse it)
//   A                 (KD, N)       float32 (float64 when u is float64)
//   B, C              (B, K, N, L)  dtype of u
//   Dskip, delta_bias (KD,)         dtype of A, optional (data == nullptr: absent)
//   y                 (B, KD, L)    dtype of u (CUDA, float16 / bfloat16 u: or float32), output,
//                                   fully overwritten
//   dy                (B, KD, L)    dtype of u
//   du, ddelta        (B, KD, L)    dtype of u, outputs, fully overwritten
//   dA                (KD, N)       CPU: dtype of A, overwritten.
//                                   CUDA: float32, MUST BE PRE-ZEROED (accumulated).
//   dB, dC            (B, K, N, L)  CPU: dtype of u, overwritten.
//                                   CUDA: float32, MUST BE PRE-ZEROED (accumulated).
//   dDskip, ddelta_bias (KD,)       optional (written when given, whether or not
//                                   Dskip / delta_bias are); dtype and zeroing as dA.
//   workspace (CUDA backward only)  float32 (B, KD, ceil(L / selective_scan_chunk_cuda()), N):
//                                   the recomputed state at every chunk start; contents ignored.
//   partials, row_partials (CUDA backward only, optional, both or neither): float32
//                                   (2, B, KD, N, L) and (B, KD, N + 2), contents ignored.
//                                   Given: the deterministic mode. Every row (b, d) stores its
//                                   terms of dB, dC there and its sums of dA, dDskip,
//                                   ddelta_bias; second kernels then add them in a fixed order
//                                   (over the channels of a group, over the batch) and WRITE
//                                   dA, dB, dC, dDskip, ddelta_bias (no zeroing needed).
// Non-finite values: once a state is infinite, the CUDA scan (a parallel scan over
// chunks, whose composed decay can underflow to 0) may give NaN where the CPU's sequential
// recurrence gives +-inf.
// Accumulation is in float32 (float64 for float64 inputs). The CPU path is
// deterministic (fixed-order reductions). The CUDA backward reduces dB, dC over
// channels and dA, dDskip, ddelta_bias over the batch with float32 atomics, or, given
// the partials buffers, in a fixed order (bitwise repeatable; one more pass over
// 2 * B * KD * N * L floats).
#pragma once

#include <cstdint>

#include "quadmamba/tensor_view.h"

namespace quadmamba {

constexpr int kSelectiveScanMaxN = 16;

// Sizes and flags shared by every entry point (filled by selective_scan_params).
struct SelectiveScanParams {
  int64_t batch = 0;     // B
  int64_t channels = 0;  // KD
  int64_t groups = 0;    // K
  int64_t length = 0;    // L
  int64_t dstate = 0;    // N
  int64_t rank = 0;      // R of a low-rank delta (delta_proj given), 0: delta is (B, KD, L)
  bool delta_softplus = true;
  void* stream = nullptr;  // cudaStream_t for the CUDA entry points
};

// Validates the forward arguments (shapes, dtypes, device, contiguity) and
// returns the sizes. A, Dskip, delta_bias, delta_proj have float64 for float64 u, else float32.
SelectiveScanParams selective_scan_params(const TensorView& u, const TensorView& delta,
                                          const TensorView& A, const TensorView& B,
                                          const TensorView& C, const TensorView& Dskip,
                                          const TensorView& delta_bias, bool delta_softplus,
                                          const TensorView& delta_proj = TensorView());

// Checks that the tensors have the sizes recorded in p (every entry point below calls it:
// p must come from selective_scan_params of the same tensors).
void check_selective_scan_inputs(const SelectiveScanParams& p, const TensorView& u, const TensorView& delta,
                                 const TensorView& A, const TensorView& B, const TensorView& C,
                                 const TensorView& Dskip, const TensorView& delta_bias,
                                 const TensorView& delta_proj = TensorView());

void selective_scan_fwd_cpu(const SelectiveScanParams& p, const TensorView& u,
                            const TensorView& delta, const TensorView& A, const TensorView& B,
                            const TensorView& C, const TensorView& Dskip,
                            const TensorView& delta_bias, const TensorView& y,
                            const TensorView& delta_proj = TensorView());

void selective_scan_bwd_cpu(const SelectiveScanParams& p, const TensorView& u,
                            const TensorView& delta, const TensorView& A, const TensorView& B,
                            const TensorView& C, const TensorView& Dskip,
                            const TensorView& delta_bias, const TensorView& dy,
                            const TensorView& du, const TensorView& ddelta, const TensorView& dA,
                            const TensorView& dB, const TensorView& dC, const TensorView& dDskip,
                            const TensorView& ddelta_bias, const TensorView& delta_proj = TensorView());

// The instruction set the CPU kernels above run with on this machine: "avx512" (AVX-512
// F/VL/DQ/BW: the elementwise work on 16-float vectors), "avx2" (AVX2 + FMA) or "portable"
// (the 8-lane vector code as the compiler lowers it for the target, e.g. SSE2 or NEON
// pairs). QUADMAMBA_CPU_GENERIC=1 (or 2) forces "portable", QUADMAMBA_CPU_NO_AVX512=1 at
// most "avx2" (common.h).
const char* selective_scan_cpu_isa();

// Sequence positions one CUDA thread block handles per step (the chunk length).
int64_t selective_scan_chunk_cuda();

void selective_scan_fwd_cuda(const SelectiveScanParams& p, const TensorView& u,
                             const TensorView& delta, const TensorView& A, const TensorView& B,
                             const TensorView& C, const TensorView& Dskip,
                             const TensorView& delta_bias, const TensorView& y);

void selective_scan_bwd_cuda(const SelectiveScanParams& p, const TensorView& u,
                             const TensorView& delta, const TensorView& A, const TensorView& B,
                             const TensorView& C, const TensorView& Dskip,
                             const TensorView& delta_bias, const TensorView& dy,
                             const TensorView& du, const TensorView& ddelta, const TensorView& dA,
                             const TensorView& dB, const TensorView& dC, const TensorView& dDskip,
                             const TensorView& ddelta_bias, const TensorView& workspace,
                             const TensorView& partials, const TensorView& row_partials);

}  // namespace quadmamba
