// The quadtree index math (quadtree_index.h) against hand-written tables, and its
// properties: bijection, inverse(forward(p)) == p, roll wrap-around.
#include <gtest/gtest.h>

#include <algorithm>
#include <vector>

#include "quadmamba/quad_scan.h"
#include "quadmamba/quadtree_index.h"

using namespace quadmamba;

namespace {

std::vector<int64_t> coarse_table(int64_t H, int64_t W) {
  std::vector<int64_t> t;
  for (int64_t p = 0; p < H * W; ++p) {
    int64_t y, x;
    coarse_slot_to_yx(H, W, p, y, x);
    t.push_back(y * W + x);
  }
  return t;
}

std::vector<int64_t> fine_table(QuadOrder order, int64_t H, int64_t W) {
  std::vector<int64_t> t;
  for (int64_t p = 0; p < H * W; ++p) {
    int64_t y, x;
    fine_slot_to_yx(order, H, W, p, y, x);
    t.push_back(y * W + x);
  }
  return t;
}

}  // namespace

// 4x4, token y*4 + x: coarse quadrants (2x2, raster inside); the quadtree fine order has
// 1-token sub-quadrants (= coarse); the official fine order is 1x1 windows (= raster).
TEST(QuadtreeIndex, HandTables4x4) {
  const std::vector<int64_t> coarse = {0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15};
  std::vector<int64_t> raster(16);
  for (int i = 0; i < 16; ++i) raster[i] = i;
  EXPECT_EQ(coarse_table(4, 4), coarse);
  EXPECT_EQ(fine_table(QuadOrder::Quadtree, 4, 4), coarse);
  EXPECT_EQ(fine_table(QuadOrder::Official, 4, 4), raster);
}

// 8 rows x 4 columns, token y*4 + x: quadrants 4x2, sub-quadrants / windows 2x1.
TEST(QuadtreeIndex, HandTables8x4) {
  const std::vector<int64_t> coarse = {0,  1,  4,  5,  8,  9,  12, 13, 2,  3,  6,  7,  10, 11, 14, 15,
                                       16, 17, 20, 21, 24, 25, 28, 29, 18, 19, 22, 23, 26, 27, 30, 31};
  const std::vector<int64_t> quadtree = {0,  4,  1,  5,  8,  12, 9,  13, 2,  6,  3,  7,  10, 14, 11, 15,
                                         16, 20, 17, 21, 24, 28, 25, 29, 18, 22, 19, 23, 26, 30, 27, 31};
  const std::vector<int64_t> official = {0,  4,  1,  5,  2,  6,  3,  7,  8,  12, 9,  13, 10, 14, 11, 15,
                                         16, 20, 17, 21, 18, 22, 19, 23, 24, 28, 25, 29, 26, 30, 27, 31};
  EXPECT_EQ(coarse_table(8, 4), coarse);
  EXPECT_EQ(fine_table(QuadOrder::Quadtree, 8, 4), quadtree);
  EXPECT_EQ(fine_table(QuadOrder::Official, 8, 4), official);
}

TEST(QuadtreeIndex, QuadrantOf) {
  // 8x4: rows 0-3 top, columns 0-1 left.
  EXPECT_EQ(quadrant_of(8, 4, 0, 0), 0);
  EXPECT_EQ(quadrant_of(8, 4, 3, 1), 0);
  EXPECT_EQ(quadrant_of(8, 4, 3, 2), 1);
  EXPECT_EQ(quadrant_of(8, 4, 4, 1), 2);
  EXPECT_EQ(quadrant_of(8, 4, 7, 3), 3);
}

TEST(QuadtreeIndex, BijectionAndInverses) {
  for (int64_t H : {4, 8, 12, 20}) {
    for (int64_t W : {4, 8, 16, 28}) {
      for (QuadOrder order : {QuadOrder::Quadtree, QuadOrder::Official}) {
        for (auto shift : {std::pair<int64_t, int64_t>{0, 0}, {1, -1}, {-(H - 1), W - 1}, {H / 2, W / 4}}) {
          const QuadGeometry g = make_quad_geometry(H, W, shift.first, shift.second, order);
          const int64_t L = H * W;
          std::vector<int> seen_f(L, 0), seen_c(L, 0);
          for (int64_t p = 0; p < L; ++p) {
            const int64_t tf = fine_source(g, p), tc = coarse_source(g, p);
            ASSERT_TRUE(tf >= 0 && tf < L && tc >= 0 && tc < L) << H << "x" << W << " p=" << p;
            seen_f[tf]++;
            seen_c[tc]++;
            ASSERT_EQ(fine_slot_of(g, tf), p) << H << "x" << W << " p=" << p;
            ASSERT_EQ(coarse_slot_of(g, tc), p) << H << "x" << W << " p=" << p;
            // Coarse slot blocks hold one quadrant each (also with the quadtree fine order).
            ASSERT_EQ(quadrant_of_token(g, tc), p / (L / 4));
            if (order == QuadOrder::Quadtree) ASSERT_EQ(quadrant_of_token(g, tf), p / (L / 4));
          }
          for (int64_t t = 0; t < L; ++t) {
            ASSERT_EQ(seen_f[t], 1) << "fine order is not a permutation, token " << t;
            ASSERT_EQ(seen_c[t], 1) << "coarse order is not a permutation, token " << t;
          }
        }
      }
    }
  }
}

// Runs of W/4 slots map to contiguous row segments (the CPU kernel copies whole runs).
TEST(QuadtreeIndex, RunsAreRowSegments) {
  for (QuadOrder order : {QuadOrder::Quadtree, QuadOrder::Official}) {
    const int64_t H = 12, W = 16, R = W / 4;
    for (int64_t p = 0; p < H * W; ++p) {
      int64_t y0, x0, y, x;
      fine_slot_to_yx(order, H, W, p - p % R, y0, x0);
      fine_slot_to_yx(order, H, W, p, y, x);
      ASSERT_EQ(y, y0);
      ASSERT_EQ(x, x0 + p % R);
      ASSERT_EQ(x0 % R, 0);
      coarse_slot_to_yx(H, W, p - p % R, y0, x0);
      coarse_slot_to_yx(H, W, p, y, x);
      ASSERT_EQ(y, y0);
      ASSERT_EQ(x, x0 + p % R);
    }
  }
}

TEST(QuadtreeIndex, RollWrapAround) {
  // torch.roll by s: rolled[i] = x[(i - s) mod n].
  const QuadGeometry g = make_quad_geometry(8, 12, 3, -5, QuadOrder::Quadtree);
  EXPECT_EQ(g.sy, 3);
  EXPECT_EQ(g.sx, 7);
  EXPECT_EQ(source_row(g, 0), 5);
  EXPECT_EQ(source_row(g, 3), 0);
  EXPECT_EQ(source_row(g, 7), 4);
  EXPECT_EQ(source_col(g, 0), 5);
  EXPECT_EQ(source_col(g, 6), 11);
  EXPECT_EQ(source_col(g, 7), 0);
  for (int64_t y = 0; y < 8; ++y) EXPECT_EQ(rolled_row(g, source_row(g, y)), y);
  for (int64_t x = 0; x < 12; ++x) EXPECT_EQ(rolled_col(g, source_col(g, x)), x);
  // Shift (1, 1) on 4x4: coarse slot 0 reads the rolled TL corner = token 15.
  const QuadGeometry g4 = make_quad_geometry(4, 4, 1, 1, QuadOrder::Quadtree);
  const std::vector<int64_t> want = {15, 12, 3, 0, 13, 14, 1, 2, 7, 4, 11, 8, 5, 6, 9, 10};
  for (int64_t p = 0; p < 16; ++p) EXPECT_EQ(coarse_source(g4, p), want[p]) << "p=" << p;
}

TEST(QuadtreeIndex, GeometryChecks) {
  EXPECT_THROW(make_quad_geometry(6, 8, 0, 0, QuadOrder::Quadtree), Error);
  EXPECT_THROW(make_quad_geometry(8, 8, 8, 0, QuadOrder::Quadtree), Error);
  EXPECT_THROW(make_quad_geometry(8, 8, 0, -8, QuadOrder::Quadtree), Error);
  EXPECT_NO_THROW(make_quad_geometry(8, 8, -7, 7, QuadOrder::Official));
}
