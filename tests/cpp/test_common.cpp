// Tests of the core's shared pieces: checks, views, the parallel loop.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <string>
#include <utility>
#include <vector>

#include "quadmamba/common.h"
#include "quadmamba/parallel.h"
#include "quadmamba/tensor_view.h"

using namespace quadmamba;

TEST(Common, CheckThrowsWithMessageAndLocation) {
  try {
    QM_CHECK(1 + 1 == 3, "x must be ", 3, ", got ", 2);
    FAIL() << "QM_CHECK did not throw";
  } catch (const Error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("x must be 3, got 2"), std::string::npos) << what;
    EXPECT_NE(what.find("test_common.cpp"), std::string::npos) << what;
  }
}

TEST(TensorView, ContiguousStridesAndChecks) {
  std::vector<float> buf(2 * 3 * 4);
  TensorView v(buf.data(), DType::Float32, {2, 3, 4});
  EXPECT_EQ(v.numel(), 24);
  EXPECT_EQ(v.strides[0], 12);
  EXPECT_EQ(v.strides[1], 4);
  EXPECT_EQ(v.strides[2], 1);
  EXPECT_TRUE(v.is_contiguous());
  v.strides[2] = 2;
  EXPECT_FALSE(v.is_contiguous());
  v.strides[2] = 1;
  EXPECT_NO_THROW(check_view(v, "u", 3, DType::Float32, Device{}));
  EXPECT_THROW(check_view(v, "u", 2, DType::Float32, Device{}), Error);
  EXPECT_THROW(check_view(v, "u", 3, DType::Float64, Device{}), Error);
  EXPECT_THROW(check_shape(v, "u", {2, 3, 5}), Error);
  TensorView negative(buf.data(), DType::Float32, {2, -3, 4});
  EXPECT_THROW(check_view(negative, "u", 3, DType::Float32, Device{}), Error);
  try {  // an empty tensor arrives without data: said so, not "required"
    check_view(TensorView(nullptr, DType::Float32, {0, 3, 4}), "u", 3, DType::Float32, Device{});
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("u has no data (an empty tensor?"), std::string::npos) << e.what();
  }
  // sizes whose product wraps around int64 (4 * (2^62 + 4) = 16 modulo 2^64): too large, not
  // a 16-element view; an empty dim does not hide the others' product
  for (int64_t first : {int64_t{1}, int64_t{0}}) {
    TensorView huge(buf.data(), DType::Float32, {1, 1, 1, 1});   // sizes set by hand: no products formed
    const int64_t W = (int64_t{1} << 62) + 4;
    const int64_t shape[4] = {first, 1, 4, W}, strides[4] = {16, 16, W, 1};
    for (int d = 0; d < 4; ++d) {
      huge.shape[d] = shape[d];
      huge.strides[d] = strides[d];
    }
    try {
      check_view(huge, "x", 4, DType::Float32, Device{});
      FAIL() << "no error";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("x is too large"), std::string::npos) << e.what();
    }
  }
}

TEST(Parallel, RangesAreAtLeastTheGrain) {
  for (int64_t n : {4, 5, 7, 100}) {
    for (int64_t grain : {1, 3, 4, 50}) {
      std::vector<std::pair<int64_t, int64_t>> ranges(64, {-1, -1});
      std::atomic<int> count{0};
      parallel_for(0, n, grain, [&](int64_t lo, int64_t hi) { ranges[static_cast<size_t>(count++)] = {lo, hi}; });
      ranges.resize(static_cast<size_t>(count.load()));
      std::sort(ranges.begin(), ranges.end());
      for (size_t i = 0; i + 1 < ranges.size(); ++i)  // all but the last range
        EXPECT_GE(ranges[i].second - ranges[i].first, grain) << "n=" << n << " grain=" << grain;
    }
  }
}

TEST(Parallel, CoversRangeExactlyOnce) {
  for (int64_t n : {0, 1, 7, 1000, 12345}) {
    std::vector<std::atomic<int>> hits(static_cast<size_t>(n));
    for (auto& h : hits) h = 0;
    parallel_for(0, n, 3, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) hits[static_cast<size_t>(i)]++;
    });
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(hits[static_cast<size_t>(i)].load(), 1) << "n=" << n << " i=" << i;
  }
}

TEST(Parallel, RethrowsWorkerErrors) {
  EXPECT_THROW(parallel_for(0, 1000, 1, [](int64_t, int64_t hi) { QM_CHECK(hi < 1000, "boom"); }),
               Error);
}

TEST(Parallel, FollowsTheThreadLimitWithoutOpenMP) {
#if defined(QUADMAMBA_WITH_OPENMP)
  GTEST_SKIP() << "OpenMP build: the OpenMP runtime's thread count applies";
#else
  for (int limit : {1, 3}) {
    set_num_threads(limit);
    EXPECT_EQ(num_threads(), limit);
    std::atomic<int> ranges{0};
    parallel_for(0, 1000, 1, [&](int64_t, int64_t) { ranges++; });
    EXPECT_EQ(ranges.load(), limit) << "limit=" << limit;
  }
  set_num_threads(0);
  EXPECT_GE(num_threads(), 1);
#endif
}

TEST(Device, CountIsZeroWithoutCudaBuild) {
  if (cuda_built()) GTEST_SKIP() << "CUDA build: device count depends on the machine";
  EXPECT_EQ(cuda_device_count(), 0);
  const CudaStatus s = cuda_status();
  EXPECT_EQ(s.runtime_version, 0);
  EXPECT_EQ(s.driver_version, 0);
  EXPECT_EQ(s.device_count, 0);
  EXPECT_EQ(s.error, "");
}

TEST(Device, StatusOfCudaBuildSaysWhyThereIsNoDevice) {
  if (!cuda_built()) GTEST_SKIP() << "CPU-only build";
  const CudaStatus s = cuda_status();
  EXPECT_GE(s.runtime_version, 11000);  // the linked runtime answers without a driver
  EXPECT_EQ(s.device_count, cuda_device_count());
  if (s.device_count == 0) {
    EXPECT_NE(s.error, "") << "no device and no reason";
  } else {
    EXPECT_EQ(s.error, "");
    EXPECT_GE(s.driver_version / 1000, s.runtime_version / 1000) << "a device with a driver older than the runtime";
  }
}
