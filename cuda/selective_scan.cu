// Selective scan on CUDA (contract and math: cpp/include/quadmamba/selective_scan.h).
//
// One thread block per row (b, d). The sequence runs in chunks of
// kThreads x kItems positions; each thread holds kItems consecutive positions.
// kThreads is 128 (forward chunk 2048, backward 1024), or, for short rows (L <= 512,
// the late stages of the models: L = 196, 49), 32 or 64 with 8 items: one chunk of at
// least L positions and fewer idle threads (threads_for below).
// The recurrence h_t = a_t h_{t-1} + b_t is a scan over pairs with the
// associative operator (a1, b1) o (a2, b2) = (a1 a2, a2 b1 + b2); the state at
// the end of a chunk is carried into the next one. The backward first recomputes
// the state at every chunk start (stored in the workspace), then walks the chunks
// from last to first: it recomputes h inside the chunk with a forward scan and
// runs the adjoint q_t = C_t g_t + a_{t+1} q_{t+1} with the same operator over
// reversed time, carrying q across chunks.
//
// Inputs u, delta, B, C, dy: float32, float16 or bfloat16 (read directly);
// A, Dskip, delta_bias: float32; all arithmetic in float32. The backward reduces
// dB, dC (over the channels of a group) and dA, dDskip, ddelta_bias (over the
// batch) with float32 atomics into caller-zeroed buffers (not bitwise repeatable), or,
// in the deterministic mode, stores every row's terms in the partials buffers and
// sums them in a fixed order with reduce_channels_kernel / reduce_batch_kernel.
//
// y is written in u's dtype, or in float32 for float16 / bfloat16 inputs when the caller
// passes a float32 y. Template instantiations: {N == 1, N <= 16} x {32, 64, 128 threads} x
// (forward: {float, half, bfloat16} inputs x {their dtype, float} outputs, 5 pairs;
// backward: {float, half, bfloat16}).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common.cuh"
#include "quadmamba/selective_scan.h"

namespace quadmamba {
namespace {

constexpr int kMaxThreads = 128;
constexpr int kBwdItems = 8;  // backward: more live arrays per thread than the forward
constexpr int kBwdChunk = kMaxThreads * kBwdItems;  // 1024: the workspace's chunk (any L)
// Forward items per thread: 16 with 128 threads (chunk 2048), else 8.
template <int kThreads>
constexpr int fwd_items() { return kThreads == kMaxThreads ? 16 : 8; }

// Threads per block for rows of L positions: 32 or 64 when their chunk of 8 items per
// thread covers the row (then one chunk, as with 128 threads, so the workspace layout
// does not change), else 128.
int threads_for(int64_t L) { return L <= 32 * kBwdItems ? 32 : L <= 64 * kBwdItems ? 64 : kMaxThreads; }
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// out[i] = row[t0 + i] for t0 + i < L, else `fill`. With `vec` (16-byte aligned rows,
// L a multiple of the 16-byte vector) full groups are read as 16-byte vectors.
template <int kItems, typename T>
__device__ __forceinline__ void load_items(const T* row, int64_t t0, int64_t L, float (&out)[kItems],
                                           float fill, bool vec) {
  constexpr int kVec = 16 / sizeof(T);
  static_assert(kItems % kVec == 0, "items must fill whole 16-byte vectors");
  if (vec && t0 + kItems <= L) {
    const uint4* src = reinterpret_cast<const uint4*>(row + t0);
#pragma unroll
    for (int v = 0; v < kItems / kVec; ++v) {
      const uint4 raw = src[v];
      T e[kVec];  // the vector's elements (memcpy: reading a uint4 through a T* would break aliasing rules)
      memcpy(e, &raw, sizeof(raw));
#pragma unroll
      for (int i = 0; i < kVec; ++i) out[v * kVec + i] = to_float(e[i]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < kItems; ++i) out[i] = t0 + i < L ? to_float(row[t0 + i]) : fill;
  }
}

template <int kItems, typename T>
__device__ __forceinline__ void store_items(T* row, int64_t t0, int64_t L, const float (&in)[kItems],
                                            bool vec) {
  constexpr int kVec = 16 / sizeof(T);
  if (vec && t0 + kItems <= L) {
    uint4* dst = reinterpret_cast<uint4*>(row + t0);
#pragma unroll
    for (int v = 0; v < kItems / kVec; ++v) {
      T e[kVec];
#pragma unroll
      for (int i = 0; i < kVec; ++i) e[i] = from_float<T>(in[v * kVec + i]);
      uint4 raw;
      memcpy(&raw, e, sizeof(raw));
      dst[v] = raw;
    }
  } else {
#pragma unroll
    for (int i = 0; i < kItems; ++i)
      if (t0 + i < L) row[t0 + i] = from_float<T>(in[i]);
  }
}

// softplus with torch's threshold (x > 20 -> x) and its derivative.
__device__ __forceinline__ float softplus(float x) { return x > 20.f ? x : log1pf(expf(x)); }
__device__ __forceinline__ float softplus_grad(float x) {
  return x > 20.f ? 1.f : 1.f / (1.f + expf(-x));
}

// (a1, b1) o (a2, b2): first apply (a1, b1), then (a2, b2) to a state s -> a s + b.
__device__ __forceinline__ float2 compose(float2 first, float2 second) {
  return make_float2(first.x * second.x, second.x * first.y + second.y);
}

__device__ __forceinline__ float2 shfl_up2(float2 v, int off) {
  return make_float2(__shfl_up_sync(kFullMask, v.x, off), __shfl_up_sync(kFullMask, v.y, off));
}
__device__ __forceinline__ float2 shfl_down2(float2 v, int off) {
  return make_float2(__shfl_down_sync(kFullMask, v.x, off), __shfl_down_sync(kFullMask, v.y, off));
}

// Block-wide scan of s_i = a_i s_{i-1} + b_i over the kThreads * kItems items of a chunk,
// starting from state s0. Processing order: increasing position (thread, item) when
// !kReverse, decreasing position when kReverse. On return b[i] holds the state after
// item i; the result is the state after the whole chunk (identical in every thread).
// Every thread of the block must call it (it synchronises); `warp_tot` is shared memory.
template <bool kReverse, int kThreads, int kItems>
__device__ __forceinline__ float block_scan(const float (&a)[kItems], float (&b)[kItems], float s0,
                                            float2* warp_tot) {
  float2 agg = make_float2(1.f, 0.f);
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    const int i = kReverse ? kItems - 1 - j : j;
    agg = compose(agg, make_float2(a[i], b[i]));
  }
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  // Inclusive scan of the thread aggregates across the warp, in processing order.
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const float2 other = kReverse ? shfl_down2(agg, off) : shfl_up2(agg, off);
    const bool has = kReverse ? lane + off < 32 : lane >= off;
    if (has) agg = compose(other, agg);
  }
  float2 excl = kReverse ? shfl_down2(agg, 1) : shfl_up2(agg, 1);
  if (lane == (kReverse ? 31 : 0)) excl = make_float2(1.f, 0.f);
  if (lane == (kReverse ? 0 : 31)) warp_tot[warp] = agg;
  __syncthreads();
  constexpr int kWarps = kThreads / 32;
  float s = s0, total = s0;
#pragma unroll
  for (int j = 0; j < kWarps; ++j) {
    const int w = kReverse ? kWarps - 1 - j : j;
    const float2 t = warp_tot[w];
    if (kReverse ? w > warp : w < warp) s = t.x * s + t.y;
    total = t.x * total + t.y;
  }
  __syncthreads();  // warp_tot is free for the next call
  s = excl.x * s + excl.y;
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    const int i = kReverse ? kItems - 1 - j : j;
    s = a[i] * s + b[i];
    b[i] = s;
  }
  return total;
}

// Sum of v over the block, fixed order (every thread gets it). `red` is shared, one float per warp.
template <int kThreads>
__device__ __forceinline__ float block_sum(float v, float* red) {
  constexpr int kWarps = kThreads / 32;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total += red[w];
  __syncthreads();
  return total;
}

struct ScanArgs {
  const void* u;
  const void* delta;
  const float* A;
  const void* B;
  const void* C;
  const float* Dskip;       // may be null
  const float* delta_bias;  // may be null
  int64_t batch, channels, groups, length, per_group;
  int dstate;
  bool softplus;
  bool vec;  // 16-byte vector loads allowed (aligned pointers, L a multiple of the vector)
};

struct FwdOut {
  void* y;
};

struct BwdIO {
  const void* dy;
  void* du;
  void* ddelta;
  float* dA;      // (KD, N), accumulated
  float* dB;      // (B, K, N, L), accumulated
  float* dC;      // (B, K, N, L), accumulated
  float* dDskip;  // (KD,), accumulated, may be null
  float* dbias;   // (KD,), accumulated, may be null
  float* states;  // (B, KD, chunks, N) workspace
  float* partials;      // deterministic mode: (2, B, KD, N, L) dB, dC terms per row; else null
  float* row_partials;  // deterministic mode: (B, KD, N + 2) dA, dDskip, dbias sums per row
};

// Forward: one block per row (b, d). kN = 1 specialises N == 1, kN = 0 takes p.dstate.
// y is written as TOut: T, or float for float16 / bfloat16 inputs.
template <typename T, typename TOut, int kN, int kThreads>
__global__ void __launch_bounds__(kThreads) scan_fwd_kernel(ScanArgs p, FwdOut out) {
  constexpr int kItems = fwd_items<kThreads>();
  constexpr int kChunk = kThreads * kItems;
  __shared__ float2 warp_tot[kThreads / 32];
  const int64_t row = blockIdx.x;  // b * KD + d
  const int64_t d = row % p.channels;
  const int64_t b = row / p.channels;
  const int64_t k = d / p.per_group;
  const int N = kN ? kN : p.dstate;
  const int64_t L = p.length;
  const T* u = static_cast<const T*>(p.u) + row * L;
  const T* delta = static_cast<const T*>(p.delta) + row * L;
  const T* Bk = static_cast<const T*>(p.B) + (b * p.groups + k) * N * L;  // Bk[n * L + t]
  const T* Ck = static_cast<const T*>(p.C) + (b * p.groups + k) * N * L;
  TOut* y = static_cast<TOut*>(out.y) + row * L;
  const float Dv = p.Dskip ? p.Dskip[d] : 0.f;
  const float bias = p.delta_bias ? p.delta_bias[d] : 0.f;

  float state[kN ? kN : kSelectiveScanMaxN];
  for (int n = 0; n < N; ++n) state[n] = 0.f;

  for (int64_t c0 = 0; c0 < L; c0 += kChunk) {
    const int64_t t0 = c0 + static_cast<int64_t>(threadIdx.x) * kItems;
    float uv[kItems], dl[kItems], yv[kItems];
    load_items(u, t0, L, uv, 0.f, p.vec);
    load_items(delta, t0, L, dl, 0.f, p.vec);
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const float x = dl[i] + bias;
      dl[i] = p.softplus ? softplus(x) : x;  // dl_t
      yv[i] = Dv * uv[i];
    }
    for (int n = 0; n < N; ++n) {
      const float An = p.A[d * N + n];
      float a[kItems], h[kItems], cv[kItems];
      load_items(Bk + n * L, t0, L, h, 0.f, p.vec);
      load_items(Ck + n * L, t0, L, cv, 0.f, p.vec);
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        a[i] = t0 + i < L ? expf(dl[i] * An) : 1.f;  // a_t (identity past the end)
        h[i] = dl[i] * uv[i] * h[i];                 // dl_t u_t B_t
      }
      state[n] = block_scan<false, kThreads>(a, h, state[n], warp_tot);  // h[i] = h_t
#pragma unroll
      for (int i = 0; i < kItems; ++i) yv[i] += cv[i] * h[i];  // y_t += C_t h_t
    }
    store_items(y, t0, L, yv, p.vec);
  }
}

// Backward: one block per row (b, d); see the file comment.
template <typename T, int kN, int kThreads>
__global__ void __launch_bounds__(kThreads) scan_bwd_kernel(ScanArgs p, BwdIO io) {
  constexpr int kItems = kBwdItems;
  constexpr int kChunk = kThreads * kItems;
  constexpr int kStates = kN ? kN : kSelectiveScanMaxN;
  __shared__ float2 warp_tot[kThreads / 32];
  __shared__ float red[kThreads / 32];
  __shared__ float sh_h[kThreads + 1];  // sh_h[i + 1]: last h of thread i; sh_h[0]: chunk-start state
  __shared__ float sh_a[kThreads + 1];  // sh_a[i]: first a of thread i; sh_a[kThreads]: next chunk's
  const int64_t row = blockIdx.x;
  const int64_t d = row % p.channels;
  const int64_t b = row / p.channels;
  const int64_t k = d / p.per_group;
  const int N = kN ? kN : p.dstate;
  const int64_t L = p.length;
  const int64_t chunks = (L + kChunk - 1) / kChunk;
  const T* u = static_cast<const T*>(p.u) + row * L;
  const T* delta = static_cast<const T*>(p.delta) + row * L;
  const T* dy = static_cast<const T*>(io.dy) + row * L;
  T* du = static_cast<T*>(io.du) + row * L;
  T* ddelta = static_cast<T*>(io.ddelta) + row * L;
  const int64_t bk = (b * p.groups + k) * N * L;
  const T* Bk = static_cast<const T*>(p.B) + bk;
  const T* Ck = static_cast<const T*>(p.C) + bk;
  float* dBk = io.dB + bk;
  float* dCk = io.dC + bk;
  // states[c * N + n] = h before chunk c; rows of the workspace hold ceil(L / kBwdChunk)
  // chunks, which equals `chunks` (threads_for uses fewer threads only where both are 1).
  float* states = io.states + row * ((L + kBwdChunk - 1) / kBwdChunk) * N;
  const float Dv = p.Dskip ? p.Dskip[d] : 0.f;
  const float bias = p.delta_bias ? p.delta_bias[d] : 0.f;
  const int tid = threadIdx.x;

  // Pass 1: the state at every chunk start.
  {
    float s[kStates];
    for (int n = 0; n < N; ++n) s[n] = 0.f;
    for (int64_t c = 0; c < chunks; ++c) {
      if (tid == 0)
        for (int n = 0; n < N; ++n) states[c * N + n] = s[n];
      if (c == chunks - 1) break;
      const int64_t t0 = c * kChunk + static_cast<int64_t>(tid) * kItems;
      float uv[kItems], dl[kItems];
      load_items(u, t0, L, uv, 0.f, p.vec);
      load_items(delta, t0, L, dl, 0.f, p.vec);
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const float x = dl[i] + bias;
        dl[i] = p.softplus ? softplus(x) : x;
      }
      for (int n = 0; n < N; ++n) {
        const float An = p.A[d * N + n];
        float a[kItems], h[kItems];
        load_items(Bk + n * L, t0, L, h, 0.f, p.vec);
#pragma unroll
        for (int i = 0; i < kItems; ++i) {
          a[i] = expf(dl[i] * An);
          h[i] = dl[i] * uv[i] * h[i];
        }
        s[n] = block_scan<false, kThreads>(a, h, s[n], warp_tot);
      }
    }
  }
  __syncthreads();  // the states written by thread 0 are visible to the block

  // Pass 2: chunks from last to first.
  float q_carry[kStates];  // q at the first position of the later chunk
  float a_carry[kStates];  // a at the first position of the later chunk (thread 0 keeps it)
  float dA_acc[kStates];
  for (int n = 0; n < N; ++n) {
    q_carry[n] = 0.f;  // q_L = 0
    a_carry[n] = 1.f;  // multiplies q_L = 0
    dA_acc[n] = 0.f;
  }
  float dD_acc = 0.f, db_acc = 0.f;
  for (int64_t c = chunks - 1; c >= 0; --c) {
    const int64_t t0 = c * kChunk + static_cast<int64_t>(tid) * kItems;
    float uv[kItems], dl[kItems], g[kItems], duv[kItems], ddl[kItems];
    load_items(u, t0, L, uv, 0.f, p.vec);
    load_items(delta, t0, L, dl, 0.f, p.vec);
    load_items(dy, t0, L, g, 0.f, p.vec);
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const float x = dl[i] + bias;
      dl[i] = p.softplus ? softplus(x) : x;
      duv[i] = Dv * g[i];
      ddl[i] = 0.f;
      dD_acc += g[i] * uv[i];
    }
    for (int n = 0; n < N; ++n) {
      const float An = p.A[d * N + n];
      const float s0 = states[c * N + n];
      float bv[kItems], cv[kItems], a[kItems], h[kItems];
      load_items(Bk + n * L, t0, L, bv, 0.f, p.vec);
      load_items(Ck + n * L, t0, L, cv, 0.f, p.vec);
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        a[i] = t0 + i < L ? expf(dl[i] * An) : 1.f;
        h[i] = dl[i] * uv[i] * bv[i];
      }
      block_scan<false, kThreads>(a, h, s0, warp_tot);  // h[i] = h_t
      // Neighbours: h_{t-1} of the first item, a_{t+1} of the last item.
      sh_h[tid + 1] = h[kItems - 1];
      sh_a[tid] = a[0];
      if (tid == 0) {
        sh_h[0] = s0;
        sh_a[kThreads] = a_carry[n];
        a_carry[n] = a[0];
      }
      __syncthreads();
      const float hprev_first = sh_h[tid];
      const float anext_last = sh_a[tid + 1];
      // (The next writes to sh_h / sh_a follow the __syncthreads inside block_scan.)
      float an[kItems], q[kItems];
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        an[i] = i + 1 < kItems ? a[i + 1] : anext_last;  // a_{t+1}
        q[i] = cv[i] * g[i];                              // C_t g_t
      }
      q_carry[n] = block_scan<true, kThreads>(an, q, q_carry[n], warp_tot);  // q[i] = q_t
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const float hprev = i > 0 ? h[i - 1] : hprev_first;  // h_{t-1}
        if (t0 + i < L) {
          const float dc = g[i] * h[i], db = q[i] * dl[i] * uv[i];  // g_t h_t, q_t dl_t u_t
          if (io.partials) {
            io.partials[(row * N + n) * L + t0 + i] = db;
            io.partials[((p.batch * p.channels + row) * N + n) * L + t0 + i] = dc;
          } else {
            atomicAdd(dCk + n * L + t0 + i, dc);  // dC += g_t h_t
            atomicAdd(dBk + n * L + t0 + i, db);  // dB += q_t dl_t u_t
          }
        }
        duv[i] += dl[i] * q[i] * bv[i];  // du += dl_t q_t B_t
        // Past L (the last chunk's padding) q = 0 and h_{t-1} is the last state: the product is
        // left out, so that a non-finite last state does not reach dA as 0 * inf.
        const float qah = t0 + i < L ? q[i] * a[i] * hprev : 0.f;
        ddl[i] += An * qah + q[i] * bv[i] * uv[i];  // q_t (A a_t h_{t-1} + B_t u_t)
        dA_acc[n] += dl[i] * qah;                    // dl_t q_t a_t h_{t-1}
      }
    }
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const float x = (t0 + i < L ? to_float(delta[t0 + i]) : 0.f) + bias;
      ddl[i] = p.softplus ? ddl[i] * softplus_grad(x) : ddl[i];  // ddelta_t
      db_acc += t0 + i < L ? ddl[i] : 0.f;
    }
    store_items(du, t0, L, duv, p.vec);
    store_items(ddelta, t0, L, ddl, p.vec);
  }

  float* rp = io.row_partials ? io.row_partials + row * (N + 2) : nullptr;
  for (int n = 0; n < N; ++n) {
    const float total = block_sum<kThreads>(dA_acc[n], red);
    if (tid == 0) rp ? void(rp[n] = total) : void(atomicAdd(io.dA + d * N + n, total));
  }
  if (io.dDskip) {
    const float total = block_sum<kThreads>(dD_acc, red);
    if (tid == 0) rp ? void(rp[N] = total) : void(atomicAdd(io.dDskip + d, total));
  }
  if (io.dbias) {
    const float total = block_sum<kThreads>(db_acc, red);
    if (tid == 0) rp ? void(rp[N + 1] = total) : void(atomicAdd(io.dbias + d, total));
  }
}

// Deterministic mode, dB and dC: out[(b, k, i)] = sum over the channels j of group k, in
// order, of part[(b, k * per_group + j, i)], i < N * L; part = partials[0] for dB and
// partials[1] for dC (blockIdx.y).
__global__ void reduce_channels_kernel(const float* partials, float* dB, float* dC, int64_t batch,
                                       int64_t channels, int64_t groups, int64_t NL) {
  const float* part = partials + blockIdx.y * batch * channels * NL;
  float* out = blockIdx.y == 0 ? dB : dC;
  const int64_t per_group = channels / groups;
  const int64_t total = batch * groups * NL;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = idx % NL, bk = idx / NL;  // bk = b * groups + k
    const float* src = part + (bk * per_group) * NL + i;  // channel k * per_group of batch b
    float s = 0.f;
    for (int64_t j = 0; j < per_group; ++j) s += src[j * NL];
    out[idx] = s;
  }
}

// Deterministic mode, dA, dDskip, ddelta_bias: the per-row sums added over the batch in order.
__global__ void reduce_batch_kernel(const float* row_partials, float* dA, float* dDskip, float* dbias,
                                    int64_t batch, int64_t channels, int N) {
  const int64_t width = N + 2;
  const int64_t total = channels * width;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t d = idx / width, j = idx % width;
    float s = 0.f;
    for (int64_t b = 0; b < batch; ++b) s += row_partials[(b * channels + d) * width + j];
    if (j < N) dA[d * N + j] = s;
    else if (j == N && dDskip) dDskip[d] = s;
    else if (j == N + 1 && dbias) dbias[d] = s;
  }
}

bool aligned16(const void* ptr) { return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

ScanArgs make_args(const SelectiveScanParams& p, const TensorView& u, const TensorView& delta,
                   const TensorView& A, const TensorView& B, const TensorView& C,
                   const TensorView& Dskip, const TensorView& delta_bias) {
  QM_CHECK(u.device.is_cuda(), "selective_scan CUDA: u must be a CUDA tensor");
  QM_CHECK(u.dtype == DType::Float32 || u.dtype == DType::Float16 || u.dtype == DType::BFloat16,
           "selective_scan CUDA: u must be float32, float16 or bfloat16, got ", dtype_name(u.dtype));
  QM_CHECK(A.dtype == DType::Float32, "selective_scan CUDA: A must be float32, got ",
           dtype_name(A.dtype));
  QM_CHECK(p.rank == 0, "selective_scan CUDA: the kernels take delta as (B, KD, L); a low-rank delta "
           "(delta_proj) is a CPU feature: pass delta_proj @ delta");
  check_selective_scan_inputs(p, u, delta, A, B, C, Dskip, delta_bias);
  QM_CHECK(p.batch >= 1 && p.channels >= 1, "selective_scan CUDA: B = ", p.batch, ", KD = ", p.channels,
           ": empty tensors have nothing to launch (the Python op returns empty outputs for them)");
  QM_CHECK(p.batch * p.channels <= 0x7fffffffLL, "selective_scan CUDA: B * KD = ",
           p.batch * p.channels, " exceeds the grid limit");
  ScanArgs a;
  a.u = u.data;
  a.delta = delta.data;
  a.A = A.ptr<const float>();
  a.B = B.data;
  a.C = C.data;
  a.Dskip = Dskip.defined() ? Dskip.ptr<const float>() : nullptr;
  a.delta_bias = delta_bias.defined() ? delta_bias.ptr<const float>() : nullptr;
  a.batch = p.batch;
  a.channels = p.channels;
  a.groups = p.groups;
  a.length = p.length;
  a.per_group = p.channels / p.groups;
  a.dstate = static_cast<int>(p.dstate);
  a.softplus = p.delta_softplus;
  const int64_t vec_elems = 16 / dtype_size(u.dtype);
  a.vec = p.length % vec_elems == 0 && aligned16(u.data) && aligned16(delta.data) &&
          aligned16(B.data) && aligned16(C.data);
  return a;
}

// Calls f(std::integral_constant<int, n>{}) with n = threads (32, 64 or kMaxThreads).
template <typename F>
void with_threads(int threads, const F& f) {
  if (threads == 32) f(std::integral_constant<int, 32>{});
  else if (threads == 64) f(std::integral_constant<int, 64>{});
  else f(std::integral_constant<int, kMaxThreads>{});
}

template <typename T, typename TOut>
void launch_fwd(const SelectiveScanParams& p, const ScanArgs& a, FwdOut out) {
  const dim3 grid(static_cast<unsigned>(p.batch * p.channels));
  cudaStream_t stream = static_cast<cudaStream_t>(p.stream);
  with_threads(threads_for(p.length), [&](auto threads) {
    constexpr int kT = decltype(threads)::value;
    if (p.dstate == 1) scan_fwd_kernel<T, TOut, 1, kT><<<grid, kT, 0, stream>>>(a, out);
    else scan_fwd_kernel<T, TOut, 0, kT><<<grid, kT, 0, stream>>>(a, out);
  });
  QM_CUDA_CHECK_LAUNCH();
}

template <typename T>
void launch_bwd(const SelectiveScanParams& p, const ScanArgs& a, BwdIO io) {
  const dim3 grid(static_cast<unsigned>(p.batch * p.channels));
  cudaStream_t stream = static_cast<cudaStream_t>(p.stream);
  with_threads(threads_for(p.length), [&](auto threads) {
    constexpr int kT = decltype(threads)::value;
    if (p.dstate == 1) scan_bwd_kernel<T, 1, kT><<<grid, kT, 0, stream>>>(a, io);
    else scan_bwd_kernel<T, 0, kT><<<grid, kT, 0, stream>>>(a, io);
  });
  QM_CUDA_CHECK_LAUNCH();
  if (io.partials) {
    constexpr int kReduceThreads = 256;
    const int64_t NL = p.dstate * p.length;
    const int64_t blocks = std::min<int64_t>((p.batch * p.groups * NL + kReduceThreads - 1) / kReduceThreads, 65535);
    reduce_channels_kernel<<<dim3(static_cast<unsigned>(blocks), 2), kReduceThreads, 0, stream>>>(
        io.partials, io.dB, io.dC, p.batch, p.channels, p.groups, NL);
    QM_CUDA_CHECK_LAUNCH();
    const int64_t rblocks = std::min<int64_t>((p.channels * (p.dstate + 2) + kReduceThreads - 1) / kReduceThreads, 65535);
    reduce_batch_kernel<<<static_cast<unsigned>(rblocks), kReduceThreads, 0, stream>>>(
        io.row_partials, io.dA, io.dDskip, io.dbias, p.batch, p.channels, static_cast<int>(p.dstate));
    QM_CUDA_CHECK_LAUNCH();
  }
}

void check_float32(const TensorView& t, const char* name, Device dev,
                   std::initializer_list<int64_t> shape) {
  check_view(t, name, static_cast<int>(shape.size()), DType::Float32, dev);
  check_shape(t, name, shape);
}

}  // namespace

int64_t selective_scan_chunk_cuda() { return kBwdChunk; }

void selective_scan_fwd_cuda(const SelectiveScanParams& p, const TensorView& u,
                             const TensorView& delta, const TensorView& A, const TensorView& B,
                             const TensorView& C, const TensorView& Dskip,
                             const TensorView& delta_bias, const TensorView& y) {
  ScanArgs a = make_args(p, u, delta, A, B, C, Dskip, delta_bias);
  const bool y_float = y.dtype == DType::Float32 && u.dtype != DType::Float32;
  check_view(y, "y", 3, y_float ? DType::Float32 : u.dtype, u.device);
  check_shape(y, "y", {p.batch, p.channels, p.length});
  a.vec = a.vec && aligned16(y.data);  // (L is a multiple of u's 16-byte vector, so of y's)
  const FwdOut out{y.data};
  CudaDeviceGuard guard(u.device.index);
  switch (u.dtype) {
    case DType::Float32: launch_fwd<float, float>(p, a, out); break;
    case DType::Float16:
      y_float ? launch_fwd<__half, float>(p, a, out) : launch_fwd<__half, __half>(p, a, out);
      break;
    case DType::BFloat16:
      y_float ? launch_fwd<__nv_bfloat16, float>(p, a, out) : launch_fwd<__nv_bfloat16, __nv_bfloat16>(p, a, out);
      break;
    default: QM_CHECK(false, "unreachable dtype");
  }
}

void selective_scan_bwd_cuda(const SelectiveScanParams& p, const TensorView& u,
                             const TensorView& delta, const TensorView& A, const TensorView& B,
                             const TensorView& C, const TensorView& Dskip,
                             const TensorView& delta_bias, const TensorView& dy,
                             const TensorView& du, const TensorView& ddelta, const TensorView& dA,
                             const TensorView& dB, const TensorView& dC, const TensorView& dDskip,
                             const TensorView& ddelta_bias, const TensorView& workspace,
                             const TensorView& partials, const TensorView& row_partials) {
  ScanArgs a = make_args(p, u, delta, A, B, C, Dskip, delta_bias);
  const Device dev = u.device;
  for (const auto* t : {&dy, &du, &ddelta}) {
    const char* name = t == &dy ? "dy" : t == &du ? "du" : "ddelta";
    check_view(*t, name, 3, u.dtype, dev);
    check_shape(*t, name, {p.batch, p.channels, p.length});
  }
  check_float32(dA, "dA", dev, {p.channels, p.dstate});
  check_float32(dB, "dB", dev, {p.batch, p.groups, p.dstate, p.length});
  check_float32(dC, "dC", dev, {p.batch, p.groups, p.dstate, p.length});
  if (dDskip.defined()) check_float32(dDskip, "dD", dev, {p.channels});
  if (ddelta_bias.defined()) check_float32(ddelta_bias, "ddelta_bias", dev, {p.channels});
  const int64_t chunks = (p.length + kBwdChunk - 1) / kBwdChunk;
  check_float32(workspace, "workspace", dev, {p.batch, p.channels, chunks, p.dstate});
  a.vec = a.vec && aligned16(dy.data) && aligned16(du.data) && aligned16(ddelta.data);
  BwdIO io;
  io.dy = dy.data;
  io.du = du.data;
  io.ddelta = ddelta.data;
  io.dA = dA.ptr<float>();
  io.dB = dB.ptr<float>();
  io.dC = dC.ptr<float>();
  io.dDskip = dDskip.defined() ? dDskip.ptr<float>() : nullptr;
  io.dbias = ddelta_bias.defined() ? ddelta_bias.ptr<float>() : nullptr;
  io.states = workspace.ptr<float>();
  QM_CHECK(partials.defined() == row_partials.defined(),
           "selective_scan CUDA: give both partials and row_partials (deterministic mode) or neither");
  io.partials = nullptr;
  io.row_partials = nullptr;
  if (partials.defined()) {
    check_view(partials, "partials", 5, DType::Float32, dev);
    check_shape(partials, "partials", {2, p.batch, p.channels, p.dstate, p.length});
    check_float32(row_partials, "row_partials", dev, {p.batch, p.channels, p.dstate + 2});
    io.partials = partials.ptr<float>();
    io.row_partials = row_partials.ptr<float>();
  }
  CudaDeviceGuard guard(dev.index);
  switch (u.dtype) {
    case DType::Float32: launch_bwd<float>(p, a, io); break;
    case DType::Float16: launch_bwd<__half>(p, a, io); break;
    case DType::BFloat16: launch_bwd<__nv_bfloat16>(p, a, io); break;
    default: QM_CHECK(false, "unreachable dtype");
  }
}

}  // namespace quadmamba
