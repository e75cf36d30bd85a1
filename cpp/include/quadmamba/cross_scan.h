// cross_scan / cross_merge: the 4 directions of a feature map (plain stages) and their
// adjoint, one pass each (plain-PyTorch spec: python/quadmamba/ops/reference.py::
// cross_scan_ref / cross_merge_ref).
//
// cross_scan_fwd, for t = y*W + x (row-major slot) and s = x*H + y (column-major slot):
//   out[b, 0, d, t]       = x[b, d, y, x]        row-major
//   out[b, 1, d, s]       = x[b, d, y, x]        column-major
//   out[b, 2, d, L-1-t]   = x[b, d, y, x]        row-major, reversed
//   out[b, 3, d, L-1-s]   = x[b, d, y, x]        column-major, reversed
// cross_merge_fwd (the adjoint):
//   y[b, d, y, x] = ys[b,0,d,t] + ys[b,1,d,s] + ys[b,2,d,L-1-t] + ys[b,3,d,L-1-s]
// Each op is the other's backward: d(cross_scan)/dx applied to g is cross_merge_fwd(g),
// and d(cross_merge)/dys applied to g is cross_scan_fwd(g); no separate backward entry
// points exist.
//
// Arguments (contiguous, one device): x, y (B, D, H, W) and out, ys (B, 4, D, L = H*W) of
// one dtype T: CPU float32 or float64; CUDA float32, float64, float16 or bfloat16 (fp16 /
// bf16 sums in float32). Any H, W >= 1. stream: cudaStream_t (CUDA only).
#pragma once

#include "quadmamba/tensor_view.h"

namespace quadmamba {

void cross_scan_fwd_cpu(const TensorView& x, const TensorView& out);
void cross_merge_fwd_cpu(const TensorView& ys, const TensorView& y);

void cross_scan_fwd_cuda(const TensorView& x, const TensorView& out, void* stream);
void cross_merge_fwd_cuda(const TensorView& ys, const TensorView& y, void* stream);

// Shape / dtype / device checks shared by the CPU and CUDA entry points; raster_is_output:
// the merge (sizes taken from the input ys, so messages name the wrong argument).
void check_cross_args(const TensorView& raster, const char* raster_name, const TensorView& seq,
                      const char* seq_name, bool raster_is_output);

}  // namespace quadmamba
