// Tests of the CPU emulation of CUDA (tests/cuda_emu/include/qm_cuda_emu.h) itself: the
// semantics the kernel tests rely on (shuffles, barriers, returned threads, atomics,
// launch limits, 16-bit conversions) and the errors it reports. Built only with
// QUADMAMBA_CUDA_EMULATOR=ON (it sets the emulator's schedule).
#include <gtest/gtest.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

namespace {

constexpr int kThreads = 96;  // three warps

template <typename T>
struct Device {
  T* ptr = nullptr;
  size_t n;
  explicit Device(size_t n_, T fill = T()) : n(n_) {
    EXPECT_EQ(cudaMalloc(&ptr, n * sizeof(T)), cudaSuccess);
    std::vector<T> h(n, fill);
    EXPECT_EQ(cudaMemcpy(ptr, h.data(), n * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
  }
  ~Device() { cudaFree(ptr); }
  std::vector<T> get() const {
    std::vector<T> h(n);
    EXPECT_EQ(cudaMemcpy(h.data(), ptr, n * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
    return h;
  }
};

__global__ void shuffles(int* out, int width) {
  const int t = threadIdx.x, v = 1000 + t;
  out[0 * kThreads + t] = __shfl_up_sync(0xffffffffu, v, 3, width);
  out[1 * kThreads + t] = __shfl_down_sync(0xffffffffu, v, 5, width);
  out[2 * kThreads + t] = __shfl_xor_sync(0xffffffffu, v, 6, width);
  out[3 * kThreads + t] = __shfl_sync(0xffffffffu, v, 7 + width, width);
}

TEST(CudaEmulator, ShufflesFollowTheCudaDefinitions) {
  for (int width : {32, 8}) {
    Device<int> out(4 * kThreads, -1);
    shuffles<<<1, kThreads>>>(out.ptr, width);
    ASSERT_EQ(cudaGetLastError(), cudaSuccess);
    const std::vector<int> got = out.get();
    for (int t = 0; t < kThreads; ++t) {
      const int lane = t % 32, base = lane / width * width, pos = lane % width, warp0 = t - lane;
      const int up = pos >= 3 ? t - 3 : t;
      const int down = pos + 5 < width ? t + 5 : t;
      const int x = lane ^ 6, xr = x < base + width ? warp0 + x : t;  // later groups: own value
      const int idx = warp0 + base + 7 % width;
      EXPECT_EQ(got[0 * kThreads + t], 1000 + up) << "up, width " << width << ", thread " << t;
      EXPECT_EQ(got[1 * kThreads + t], 1000 + down) << "down, width " << width << ", thread " << t;
      EXPECT_EQ(got[2 * kThreads + t], 1000 + xr) << "xor, width " << width << ", thread " << t;
      EXPECT_EQ(got[3 * kThreads + t], 1000 + idx) << "idx, width " << width << ", thread " << t;
    }
  }
}

__global__ void rotate_through_shared(int* out) {
  __shared__ int buf[kThreads];
  const int t = threadIdx.x;
  buf[t] = (blockIdx.x + 1) * 1000 + t;
  __syncthreads();
  const int v = buf[(t + 37) % kThreads];
  __syncthreads();  // every read is done before the next block's... (one block at a time anyway)
  out[blockIdx.x * kThreads + t] = v;
}

TEST(CudaEmulator, SyncthreadsOrdersSharedMemoryUnderEverySchedule) {
  for (const char* order : {"forward", "reverse", "shuffle:5"}) {
    qm_emu::schedule() = qm_emu::Schedule(order);
    Device<int> out(3 * kThreads, -1);
    rotate_through_shared<<<3, kThreads>>>(out.ptr);
    const std::vector<int> got = out.get();
    for (int b = 0; b < 3; ++b)
      for (int t = 0; t < kThreads; ++t)
        EXPECT_EQ(got[b * kThreads + t], (b + 1) * 1000 + (t + 37) % kThreads) << order;
  }
  qm_emu::schedule() = qm_emu::Schedule();
}

__global__ void racy_broadcast(int* out) {
  __shared__ int value;
  if (threadIdx.x == 0) value = 7 + static_cast<int>(blockIdx.x);
  // Missing __syncthreads(): the other threads may read `value` before thread 0 wrote it.
  out[blockIdx.x * kThreads + threadIdx.x] = value;
}

TEST(CudaEmulator, ScheduleExposesAMissingBarrier) {
  auto wrong = [](const char* order) {
    qm_emu::schedule() = qm_emu::Schedule(order);
    Device<int> out(4 * kThreads, -1);
    racy_broadcast<<<4, kThreads>>>(out.ptr);
    int bad = 0;
    const std::vector<int> got = out.get();
    for (int b = 0; b < 4; ++b)
      for (int t = 0; t < kThreads; ++t) bad += got[b * kThreads + t] != 7 + b;
    return bad;
  };
  EXPECT_EQ(wrong("forward"), 0);  // thread 0 runs first: the race stays hidden
  EXPECT_GT(wrong("reverse"), 0);
  EXPECT_GT(wrong("shuffle:3"), 0);
  qm_emu::schedule() = qm_emu::Schedule();
}

__global__ void early_return_then_sync(int* out) {
  __shared__ int buf[kThreads];
  const int t = threadIdx.x;
  if (t >= 40) return;  // returned threads no longer take part in __syncthreads
  buf[t] = t;
  __syncthreads();
  out[t] = buf[39 - t];
}

__global__ void indices_and_atomics(int* ids, unsigned long long* sum) {
  const int block = blockIdx.y * gridDim.x + blockIdx.x;
  const int t = threadIdx.y * blockDim.x + threadIdx.x;
  ids[block * blockDim.x * blockDim.y + t] = block * 1000 + t;
  atomicAdd(sum, static_cast<unsigned long long>(t + 1));
}

TEST(CudaEmulator, ReturnedThreadsIndicesAndAtomics) {
  Device<int> out(kThreads, -1);
  early_return_then_sync<<<1, kThreads>>>(out.ptr);
  std::vector<int> got = out.get();
  for (int t = 0; t < kThreads; ++t) EXPECT_EQ(got[t], t < 40 ? 39 - t : -1);

  Device<int> ids(6 * 64, -1);
  Device<unsigned long long> sum(1, 0);
  indices_and_atomics<<<dim3(3, 2), dim3(16, 4)>>>(ids.ptr, sum.ptr);
  ASSERT_EQ(cudaGetLastError(), cudaSuccess);
  got = ids.get();
  for (int b = 0; b < 6; ++b)
    for (int t = 0; t < 64; ++t) EXPECT_EQ(got[b * 64 + t], b * 1000 + t);
  EXPECT_EQ(sum.get()[0], 6ull * 64 * 65 / 2);
}

TEST(CudaEmulator, LaunchOutsideTheLimitsIsALaunchError) {
  Device<int> out(1, -1);
  early_return_then_sync<<<1, 1025>>>(out.ptr);
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidConfiguration);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);  // read and cleared
  early_return_then_sync<<<dim3(1, 65536), 32>>>(out.ptr);
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidConfiguration);
  EXPECT_EQ(out.get()[0], -1);  // nothing ran
}

__global__ void divergent_barrier(int* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, static_cast<int>(threadIdx.x), 1);
  }
}

__global__ void shuffle_after_return(int* out) {
  if (threadIdx.x >= 16) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, static_cast<int>(threadIdx.x), 1);
}

TEST(CudaEmulatorDeathTest, UndefinedSynchronisationAborts) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  Device<int> out(32, 0);
  EXPECT_DEATH(divergent_barrier<<<1, 32>>>(out.ptr), "cannot make progress");
  EXPECT_DEATH(shuffle_after_return<<<1, 32>>>(out.ptr), "have returned");
  EXPECT_DEATH(shuffles<<<1, 48>>>(out.ptr, 32), "do not exist");
}

// 16-bit types: float16 against the compiler's _Float16 where it has one, and round trips.
TEST(CudaEmulator, HalfConversionsRoundToNearestEven) {
  for (uint32_t bits = 0; bits < 65536; ++bits) {
    const __half h{static_cast<uint16_t>(bits)};
    const float f = __half2float(h);
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(__half2float(__float2half_rn(f))));
      continue;
    }
    EXPECT_EQ(__float2half_rn(f).bits, bits) << "round trip of half bits " << bits;
#if defined(__FLT16_MANT_DIG__)
    _Float16 ref;
    std::memcpy(&ref, &h, 2);
    EXPECT_EQ(f, static_cast<float>(ref)) << "half bits " << bits;
#endif
  }
#if defined(__FLT16_MANT_DIG__)
  std::mt19937 gen(11);
  for (int i = 0; i < 2000000; ++i) {
    uint32_t x = gen();
    if (i % 4 == 0) x = (x & 0xffffe000u) | 0x1000u;  // exactly halfway between two halves
    float f;
    std::memcpy(&f, &x, 4);
    if (std::isnan(f)) continue;
    const _Float16 ref = static_cast<_Float16>(f);
    uint16_t want;
    std::memcpy(&want, &ref, 2);
    ASSERT_EQ(__float2half_rn(f).bits, want) << "float bits " << x;
  }
#endif
}

TEST(CudaEmulator, BFloat16ConversionsRoundToNearestEven) {
  EXPECT_EQ(__float2bfloat16_rn(1.0f).bits, 0x3f80);
  EXPECT_EQ(__float2bfloat16_rn(1.00390625f).bits, 0x3f80);  // halfway, to even
  EXPECT_EQ(__float2bfloat16_rn(1.01171875f).bits, 0x3f82);  // halfway, to even (up)
  const uint32_t above = 0x3f808001u;                           // just above halfway
  float f;
  std::memcpy(&f, &above, 4);
  EXPECT_EQ(__float2bfloat16_rn(f).bits, 0x3f81);
  EXPECT_EQ(__float2bfloat16_rn(-3.0e38f).bits, 0xff62);
  EXPECT_EQ(__float2bfloat16_rn(3.4e38f).bits, 0x7f80);      // rounds up to inf
  EXPECT_TRUE(std::isnan(__bfloat162float(__float2bfloat16_rn(NAN))));
  for (uint32_t bits = 0; bits < 65536; ++bits) {
    f = __bfloat162float(__nv_bfloat16{static_cast<uint16_t>(bits)});
    if (!std::isnan(f)) EXPECT_EQ(__float2bfloat16_rn(f).bits, bits);
  }
}

// The --use_fast_math expf (translate.py --fast-math): 2^p of the float product
// p = x * log2(e) (log2(e) itself rounded to float), so off exp(x) by up to about
// |x| * 2^-23 relative (the rounding of p, and of the constant); denormal results are 0.
TEST(CudaEmulator, FastExpfRoundsAsTheIntrinsic) {
  EXPECT_EQ(qm_emu::fast_expf(0.f), 1.f);
  EXPECT_EQ(qm_emu::fast_expf(-100.f), 0.f);  // e^-100 = 3.7e-44, a denormal float
  EXPECT_GT(qm_emu::fast_expf(-87.f), 0.f);
  EXPECT_TRUE(std::isinf(qm_emu::fast_expf(89.f)));
  std::mt19937 gen(3);
  std::uniform_real_distribution<float> dist(-87.f, 88.f);
  for (int i = 0; i < 200000; ++i) {
    const float x = dist(gen);
    const double p = static_cast<float>(x * 1.44269504088896341f);
    const double got = qm_emu::fast_expf(x), exact = std::exp(static_cast<double>(x));
    ASSERT_LE(std::fabs(got - std::exp2(p)), 0x1p-23 * std::exp2(p)) << "x = " << x;  // exp2f: < 1 ulp
    ASSERT_LE(std::fabs(got - exact), (std::fabs(x) * 0x1p-23 + 0x1p-22) * exact) << "x = " << x;
  }
}

// nvcc contracts a * b + c into one fused multiply-add by default (--fmad=true), and the
// emulated kernels are compiled so too where the host CPU has FMA (CMake defines
// QM_EMU_FMA_CONTRACTED then). a = 1 + 2^-12: a * a = 1 + 2^-11 + 2^-24 rounds (to even) to
// 1 + 2^-11, so the product rounded apart gives a * a - (1 + 2^-11) = 0, fused 2^-24.
__global__ void multiply_add(const float* a, const float* c, float* out) {
  out[threadIdx.x] = a[threadIdx.x] * a[threadIdx.x] + c[threadIdx.x];
}

TEST(CudaEmulator, MultiplyAddsContractAsNvccWhereTheHostHasFma) {
#if defined(QM_EMU_FMA_CONTRACTED)
  const float expected = 0x1p-24f;
#else
  const float expected = 0.f;
#endif
  Device<float> a(32, 1.f + 0x1p-12f), c(32, -(1.f + 0x1p-11f)), out(32, NAN);
  multiply_add<<<1, 32>>>(a.ptr, c.ptr, out.ptr);
  ASSERT_EQ(cudaGetLastError(), cudaSuccess);
  for (float v : out.get()) EXPECT_EQ(v, expected);
}

// --use_fast_math's -ftz=true: translate.py --fast-math launches kernels through
// fast_math_launcher, which flushes denormal inputs and results of float arithmetic to zero
// while the kernel runs (and only then).
__global__ void scale(const float* x, float s, float* out) { out[threadIdx.x] = x[threadIdx.x] * s; }

TEST(CudaEmulator, FastMathLaunchesFlushDenormals) {
  const float denormal = 0x1p-140f, small = 0x1p-70f;  // small * small = 2^-140: denormal
  Device<float> d(32, denormal), s(32, small), n(32, 3.f), out(32, NAN);
  const auto all = [&](float want) {
    for (float v : out.get()) ASSERT_EQ(v, want);
  };
  scale<<<1, 32>>>(d.ptr, 1.f, out.ptr);  // a plain launch keeps denormals
  all(denormal);
  scale<<<1, 32>>>(s.ptr, small, out.ptr);
  all(denormal);
  ::qm_emu::fast_math_launcher(scale, 1, 32)(d.ptr, 1.f, out.ptr);  // denormal input: 0
  all(0.f);
  ::qm_emu::fast_math_launcher(scale, 1, 32)(s.ptr, small, out.ptr);  // denormal result: 0
  all(0.f);
  ::qm_emu::fast_math_launcher(scale, 1, 32)(n.ptr, 2.f, out.ptr);
  all(6.f);
  volatile float host = small;  // the host's arithmetic after the launch is unchanged
  EXPECT_EQ(host * host, denormal);
}

}  // namespace
