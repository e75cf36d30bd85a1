// Index math of the quadtree scan: sequence slot <-> grid position for the coarse
// order and the two fine orders, the cyclic roll of the window shift, and the
// quadrant of a position. Host + device inline functions, used by the CPU and the
// CUDA kernels alike (python/quadmamba/ops/reference.py::quad_orders is the spec).
//
// Contract (H, W positive multiples of 4, L = H*W, h = H/2, w = W/2, h4 = H/4, w4 = W/4):
//   Quadrant of grid position (y, x):   q = 2*(y >= h) + (x >= w)   (0 TL, 1 TR, 2 BL, 3 BR).
//   Coarse order, slot p -> (y, x):     p = ((q1*2 + q2)*h + r)*w + c,
//                                       y = q1*h + r, x = q2*w + c
//     (the grid viewed as (q1, r, q2, c) and read in the order (q1, q2, r, c)).
//   Fine order, slot p -> (y, x):       y = q1*h + q3*h4 + r, x = q2*w + q4*w4 + c, with
//     "quadtree": p = ((((q1*2 + q2)*2 + q3)*2 + q4)*h4 + r)*w4 + c
//                 (each quadrant's 4 sub-quadrants TL, TR, BL, BR, each raster-scanned);
//     "official": p = ((((q1*2 + q3)*2 + q2)*2 + q4)*h4 + r)*w4 + c
//                 (a plain scan of the H/4 x W/4 windows of the whole image, the
//                 authors' released code).
//   All three are permutations of [0, L); coarse and "quadtree" fine put the tokens of
//   quadrant q in slots [q*L/4, (q+1)*L/4); "official" fine puts the row band
//   y / h4 = 2*q1 + q3 there instead.
//   Runs: every order maps the slots [k*w4, (k+1)*w4) to one row segment
//   (y, x0 .. x0 + w4 - 1) with x0 a multiple of w4 (so inside one quadrant and one fine
//   window), and the inverse maps such a segment to w4 consecutive slots. The kernels
//   copy whole runs.
//   Roll: the sequences are read from the grid rolled by (sy, sx) (torch.roll over
//   (H, W)): rolled position (y, x) holds the token of x at
//       ((y - sy) mod H, (x - sx) mod W),
//   and token (ys, xs) of x sits at rolled position ((ys + sy) mod H, (xs + sx) mod W).
//   Shifts are normalised to 0 <= sy < H, 0 <= sx < W (a negative shift s is H + s).
#pragma once

#include <cstdint>

#include "quadmamba/common.h"

namespace quadmamba {

// The fine order: the paper's quadtree order or the authors' window order.
enum class QuadOrder : int { Quadtree = 0, Official = 1 };

// The geometry every quad index function needs: grid size, normalised roll, fine order.
struct QuadGeometry {
  int64_t H = 0, W = 0;
  int64_t sy = 0, sx = 0;  // 0 <= sy < H, 0 <= sx < W
  QuadOrder order = QuadOrder::Quadtree;

  QM_HOST_DEVICE int64_t L() const { return H * W; }
  // Length of a run of consecutive slots that maps to one contiguous row segment.
  QM_HOST_DEVICE int64_t run() const { return W / 4; }
};

// v mod n for v in (-n, 2n).
QM_HOST_DEVICE int64_t wrap_index(int64_t v, int64_t n) {
  return v < 0 ? v + n : (v >= n ? v - n : v);
}

// Quadrant (0 TL, 1 TR, 2 BL, 3 BR) of grid position (y, x).
QM_HOST_DEVICE int quadrant_of(int64_t H, int64_t W, int64_t y, int64_t x) {
  return 2 * static_cast<int>(y >= H / 2) + static_cast<int>(x >= W / 2);
}

// ---- coarse order ------------------------------------------------------------------
QM_HOST_DEVICE void coarse_slot_to_yx(int64_t H, int64_t W, int64_t p, int64_t& y, int64_t& x) {
  const int64_t h = H / 2, w = W / 2;
  const int64_t c = p % w;
  p /= w;
  const int64_t r = p % h;
  const int64_t q = p / h;  // 2*q1 + q2
  y = (q >> 1) * h + r;
  x = (q & 1) * w + c;
}

QM_HOST_DEVICE int64_t coarse_yx_to_slot(int64_t H, int64_t W, int64_t y, int64_t x) {
  const int64_t h = H / 2, w = W / 2;
  const int64_t q1 = y >= h, q2 = x >= w;
  return ((q1 * 2 + q2) * h + (y - q1 * h)) * w + (x - q2 * w);
}

// ---- fine orders -------------------------------------------------------------------
QM_HOST_DEVICE void fine_slot_to_yx(QuadOrder order, int64_t H, int64_t W, int64_t p, int64_t& y,
                                    int64_t& x) {
  const int64_t h4 = H / 4, w4 = W / 4;
  const int64_t c = p % w4;
  p /= w4;
  const int64_t r = p % h4;
  const int64_t k = p / h4;  // 4 bits: (q1, a, b, q4), most significant first
  const int64_t q1 = (k >> 3) & 1, a = (k >> 2) & 1, b = (k >> 1) & 1, q4 = k & 1;
  // quadtree: (q1, q2, q3, q4); official: (q1, q3, q2, q4).
  const int64_t q2 = order == QuadOrder::Quadtree ? a : b;
  const int64_t q3 = order == QuadOrder::Quadtree ? b : a;
  y = (2 * q1 + q3) * h4 + r;
  x = (2 * q2 + q4) * w4 + c;
}

QM_HOST_DEVICE int64_t fine_yx_to_slot(QuadOrder order, int64_t H, int64_t W, int64_t y, int64_t x) {
  const int64_t h4 = H / 4, w4 = W / 4;
  const int64_t band = y / h4, col = x / w4;  // band = 2*q1 + q3, col = 2*q2 + q4
  const int64_t q1 = band >> 1, q3 = band & 1, q2 = col >> 1, q4 = col & 1;
  const int64_t k = order == QuadOrder::Quadtree ? ((q1 * 2 + q2) * 2 + q3) * 2 + q4
                                                 : ((q1 * 2 + q3) * 2 + q2) * 2 + q4;
  return (k * h4 + (y - band * h4)) * w4 + (x - col * w4);
}

// ---- roll --------------------------------------------------------------------------
// Row / column of x read at rolled row y / column x (the inverse of rolled_row/col).
QM_HOST_DEVICE int64_t source_row(const QuadGeometry& g, int64_t y) { return wrap_index(y - g.sy, g.H); }
QM_HOST_DEVICE int64_t source_col(const QuadGeometry& g, int64_t x) { return wrap_index(x - g.sx, g.W); }
// Rolled row / column where row ys / column xs of x sits.
QM_HOST_DEVICE int64_t rolled_row(const QuadGeometry& g, int64_t ys) { return wrap_index(ys + g.sy, g.H); }
QM_HOST_DEVICE int64_t rolled_col(const QuadGeometry& g, int64_t xs) { return wrap_index(xs + g.sx, g.W); }

// Raster index in x of the token the coarse / fine sequence reads at slot p.
QM_HOST_DEVICE int64_t coarse_source(const QuadGeometry& g, int64_t p) {
  int64_t y, x;
  coarse_slot_to_yx(g.H, g.W, p, y, x);
  return source_row(g, y) * g.W + source_col(g, x);
}
QM_HOST_DEVICE int64_t fine_source(const QuadGeometry& g, int64_t p) {
  int64_t y, x;
  fine_slot_to_yx(g.order, g.H, g.W, p, y, x);
  return source_row(g, y) * g.W + source_col(g, x);
}
// Slot of the coarse / fine sequence that reads token t (raster index in x): the inverses.
QM_HOST_DEVICE int64_t coarse_slot_of(const QuadGeometry& g, int64_t t) {
  return coarse_yx_to_slot(g.H, g.W, rolled_row(g, t / g.W), rolled_col(g, t % g.W));
}
QM_HOST_DEVICE int64_t fine_slot_of(const QuadGeometry& g, int64_t t) {
  return fine_yx_to_slot(g.order, g.H, g.W, rolled_row(g, t / g.W), rolled_col(g, t % g.W));
}
// Quadrant (on the rolled grid, where the decision mask lives) of token t of x.
QM_HOST_DEVICE int quadrant_of_token(const QuadGeometry& g, int64_t t) {
  return quadrant_of(g.H, g.W, rolled_row(g, t / g.W), rolled_col(g, t % g.W));
}

}  // namespace quadmamba
