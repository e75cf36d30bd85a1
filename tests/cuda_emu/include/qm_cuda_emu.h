// A CPU emulation of the part of CUDA that quadmamba's kernels use, for tests only.
//
// The kernels in cuda/*.cu are compiled as C++ against this header (tests/cuda_emu/translate.py
// first rewrites every `kernel<<<grid, block, smem, stream>>>(args)` launch into
// `qm_emu::launcher(kernel, grid, block, smem, stream)(args)`), so that the CUDA C++ tests
// run on machines without a GPU. What it models, and how:
//   - Every CUDA thread of a block is a fiber (ucontext) with its own stack; the blocks of a
//     launch run one after another on the calling thread; a launch returns when it is done
//     (streams are ignored, every call is synchronous).
//   - Fibers run until they reach a synchronisation point: __syncthreads() (all threads of
//     the block that have not returned) or a warp shuffle (all 32 lanes of the warp, mask
//     0xffffffff only). Between two points a fiber runs alone, so the order in which fibers
//     are resumed decides every race: QM_CUDA_EMU_ORDER = forward | reverse | shuffle[:seed]
//     (default shuffle:1) picks it, and a missing __syncthreads shows up as a wrong result
//     under some order.
//   - Misuse the hardware leaves undefined is an error that aborts with a message: a barrier
//     that can never complete (divergent __syncthreads or shuffle), a shuffle after lanes of
//     the warp returned, a launch configuration outside the CUDA limits (this one is reported
//     through cudaGetLastError, as CUDA does).
//   - Device memory is host memory from posix_memalign (exact sizes, so AddressSanitizer
//     catches out-of-bounds accesses of the kernels); uint4 and float2 carry their CUDA
//     alignment (UndefinedBehaviorSanitizer catches misaligned vector accesses).
//   - __half / __nv_bfloat16 are 16-bit storage types converted with round-to-nearest-even,
//     as the CUDA intrinsics __float2half_rn / __float2bfloat16_rn do.
//   - --use_fast_math, as the CUDA builds compile: translate.py --fast-math turns the
//     kernels' expf into qm_emu::fast_expf, which rounds like __expf (x * log2(e) rounded to
//     float, then 2^p; results below FLT_MIN flushed to zero), and their launches into
//     fast_math_launcher, which runs the kernel with denormal inputs and results of float
//     arithmetic flushed to zero (-ftz=true; the x86 MXCSR FTZ + DAZ bits, aarch64's FPCR.FZ).
//   - nvcc contracts multiply-adds into FMAs by default: where the host CPU has FMA, CMake
//     compiles the emulated kernels with FMA contraction (the compiler picks which ones).
// Not modelled: timing, memory ordering between blocks, the rest of --use_fast_math
// (approximate division and square root, ex2.approx's own ~2 ulp), dynamic shared memory,
// more than one device.
#pragma once

#include <math.h>
#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
// One launch runs at a time and its blocks one after another, so a block's shared
// variables can be the function's static variables.
#define __shared__ static

struct uint3 {
  unsigned x = 0, y = 0, z = 0;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(8) float2 {
  float x, y;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

inline uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;
constexpr int warpSize = 32;

// ---- runtime API ---------------------------------------------------------------------
#define CUDART_VERSION 13000  // the runtime version the emulation answers as
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
  cudaErrorNotSupported = 801,
};
enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4,
};
struct CUstream_st;
using cudaStream_t = CUstream_st*;

namespace qm_emu {

// expf under --use_fast_math (__expf = ex2.approx.ftz(x * log2(e))): the product rounded to
// float (the main error: up to about |x| * 2^-23 relative), 2^p, denormal results flushed to zero.
inline float fast_expf(float x) {
  const float p = x * 1.44269504088896341f;
  const float r = exp2f(p);
  return r < 1.17549435e-38f ? 0.f : r;
}

[[noreturn]] inline void fail(const std::string& what) {
  std::fprintf(stderr, "CUDA emulator: %s\n", what.c_str());
  std::fflush(stderr);
  std::abort();
}

inline cudaError_t& last_error() {
  static cudaError_t e = cudaSuccess;
  return e;
}

}  // namespace qm_emu

inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorNotSupported: return "operation not supported";
  }
  return "unknown error";
}
inline cudaError_t cudaGetLastError() {
  const cudaError_t e = qm_emu::last_error();
  qm_emu::last_error() = cudaSuccess;
  return e;
}
inline cudaError_t cudaPeekAtLastError() { return qm_emu::last_error(); }
// The emulation answers as a CUDA 13.0 runtime with a driver that supports it.
inline cudaError_t cudaRuntimeGetVersion(int* version) {
  *version = 13000;
  return cudaSuccess;
}
inline cudaError_t cudaDriverGetVersion(int* version) {
  *version = 13000;
  return cudaSuccess;
}
// Devices: one by default (qm_emu::set_device_count for more), each with a primary context that
// becomes active, as from CUDA 12 on, when cudaSetDevice selects it or a call that needs it
// (cudaMalloc, a launch) runs with it current; the current device is per thread (0 at first).
namespace qm_emu {
constexpr int kMaxDevices = 8;
struct Devices {
  std::atomic<int> count{1};
  std::atomic<bool> context[kMaxDevices] = {};
};
inline Devices& devices() {
  static Devices d;
  return d;
}
inline int& current_device() {
  thread_local int d = 0;
  return d;
}
inline void use_context() { devices().context[current_device()] = true; }
// Test hook: n emulated devices (1..kMaxDevices), every primary context inactive again.
inline void set_device_count(int n) {
  if (n < 1 || n > kMaxDevices) fail("set_device_count: 1..8 devices");
  devices().count = n;
  for (auto& c : devices().context) c = false;
}
inline bool primary_context_active(int device) { return devices().context[device]; }
// The driver functions handed out by cudaGetDriverEntryPointByVersion (CUresult: 0 = success,
// 101 = CUDA_ERROR_INVALID_DEVICE; a CUdevice is its ordinal here).
inline int cu_device_get(int* device, int ordinal) {
  if (ordinal < 0 || ordinal >= devices().count) return 101;
  *device = ordinal;
  return 0;
}
inline int cu_device_primary_ctx_get_state(int device, unsigned int* flags, int* active) {
  if (device < 0 || device >= devices().count) return 101;
  *flags = 0;
  *active = primary_context_active(device) ? 1 : 0;
  return 0;
}
}  // namespace qm_emu

inline cudaError_t cudaGetDeviceCount(int* count) {
  *count = qm_emu::devices().count;
  return cudaSuccess;
}
inline cudaError_t cudaGetDevice(int* device) {
  *device = qm_emu::current_device();
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int device) {
  if (device < 0 || device >= qm_emu::devices().count) return cudaErrorInvalidDevice;
  qm_emu::current_device() = device;
  qm_emu::use_context();
  return cudaSuccess;
}
enum cudaDriverEntryPointQueryResult {
  cudaDriverEntryPointSuccess = 0,
  cudaDriverEntryPointSymbolNotFound = 1,
  cudaDriverEntryPointVersionNotSufficent = 2,
};
#define cudaEnableDefault 0x0
inline cudaError_t cudaGetDriverEntryPointByVersion(const char* symbol, void** fn, unsigned int, unsigned long long,
                                                    cudaDriverEntryPointQueryResult* status = nullptr) {
  void* f = nullptr;
  if (std::strcmp(symbol, "cuDeviceGet") == 0) f = reinterpret_cast<void*>(&qm_emu::cu_device_get);
  if (std::strcmp(symbol, "cuDevicePrimaryCtxGetState") == 0)
    f = reinterpret_cast<void*>(&qm_emu::cu_device_primary_ctx_get_state);
  *fn = f;
  if (status) *status = f ? cudaDriverEntryPointSuccess : cudaDriverEntryPointSymbolNotFound;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaMalloc(void** ptr, size_t bytes) {
  qm_emu::use_context();
  *ptr = nullptr;
  if (bytes == 0) return cudaSuccess;
  return posix_memalign(ptr, 256, bytes) == 0 ? cudaSuccess : cudaErrorMemoryAllocation;
}
template <typename T>
cudaError_t cudaMalloc(T** ptr, size_t bytes) {
  return cudaMalloc(reinterpret_cast<void**>(ptr), bytes);
}
inline cudaError_t cudaFree(void* ptr) {
  std::free(ptr);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind) {
  if (bytes) std::memcpy(dst, src, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t = nullptr) {
  return cudaMemcpy(dst, src, bytes, kind);
}
inline cudaError_t cudaMemset(void* ptr, int value, size_t bytes) {
  if (bytes) std::memset(ptr, value, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t = nullptr) {
  return cudaMemset(ptr, value, bytes);
}

// ---- the scheduler ---------------------------------------------------------------------
namespace qm_emu {

enum class Wait { None, Block, Warp };
enum class Shfl { Up, Down, Xor, Idx };

struct Fiber {
  ucontext_t ctx;
  uint3 tid;
  int lane = 0, warp = 0;
  bool done = false;
  Wait wait = Wait::None;
  Shfl op = Shfl::Up;
};

struct Warp {
  uint64_t slots[2][32];  // the values of one shuffle round, by lane (two rounds alternate)
  int parity = 0;
};

struct Launch {
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  ucontext_t scheduler;
  Fiber* current = nullptr;
  const std::function<void()>* body = nullptr;
};

inline Launch*& active() {
  static Launch* launch = nullptr;
  return launch;
}

// Fiber stacks, kept between launches (threads per block at most 1024).
constexpr size_t kStackBytes = 64 * 1024;
inline char* stack(int i) {
  static std::vector<std::unique_ptr<char[]>> stacks;
  while (static_cast<int>(stacks.size()) <= i) stacks.emplace_back(new char[kStackBytes]);
  return stacks[i].get();
}

inline void fiber_main() {
  Launch& l = *active();
  (*l.body)();
  l.current->done = true;
  // Returning resumes uc_link, the scheduler.
}

// Hands control back to the scheduler until this fiber's wait is released.
inline void yield(Wait w) {
  Launch& l = *active();
  Fiber* f = l.current;
  f->wait = w;
  swapcontext(&f->ctx, &l.scheduler);
}

// How fibers are resumed (QM_CUDA_EMU_ORDER): "forward" and "reverse" run every runnable
// fiber once per round in thread order or its reverse; "shuffle[:seed]" runs them in a
// random order and gives every warp of a block a random speed (the chance that its fibers
// run in a round, 0.05..1), so that some warps run many synchronisation steps ahead of
// others (a race between warps needs the late warp to lag).
struct Schedule {
  enum Kind { Forward, Reverse, Shuffle } kind = Shuffle;
  std::mt19937 gen{1u};
  Schedule() : Schedule(std::getenv("QM_CUDA_EMU_ORDER") ? std::getenv("QM_CUDA_EMU_ORDER") : "shuffle:1") {}
  explicit Schedule(const std::string& spec) {
    if (spec == "forward") {
      kind = Forward;
    } else if (spec == "reverse") {
      kind = Reverse;
    } else if (spec == "shuffle" || spec.rfind("shuffle:", 0) == 0) {
      kind = Shuffle;
      if (spec.size() > 8) gen.seed(static_cast<uint32_t>(std::stoul(spec.substr(8))));
    } else {
      fail("QM_CUDA_EMU_ORDER must be forward, reverse or shuffle[:seed], got '" + spec + "'");
    }
  }
  std::vector<double> speeds(size_t warps) {
    std::vector<double> s(warps, 1.0);
    std::uniform_real_distribution<double> u(0.05, 1.0);
    if (kind == Shuffle)
      for (double& v : s) v = u(gen);
    return s;
  }
  std::vector<int> order(int n) {
    std::vector<int> o(n);
    for (int i = 0; i < n; ++i) o[i] = i;
    if (kind == Reverse) std::reverse(o.begin(), o.end());
    if (kind == Shuffle) std::shuffle(o.begin(), o.end(), gen);
    return o;
  }
  // Whether a warp of this speed runs in this round.
  bool runs(double speed) { return kind != Shuffle || std::uniform_real_distribution<double>(0, 1)(gen) < speed; }
};

inline Schedule& schedule() {
  static Schedule s;
  return s;
}

inline std::string str(uint3 v) {
  return "(" + std::to_string(v.x) + ", " + std::to_string(v.y) + ", " + std::to_string(v.z) + ")";
}

// Runs fiber f until it waits or returns. (getcontext / swapcontext return twice: they stay
// in small functions of their own, so no caller's locals are live across them.)
__attribute__((noinline)) inline void resume(Launch& l, Fiber& f) {
  l.current = &f;
  threadIdx = f.tid;
  swapcontext(&l.scheduler, &f.ctx);
}

// Makes fiber i start `body` on its stack when next resumed.
__attribute__((noinline)) inline void start(Launch& l, int i) {
  Fiber& f = l.fibers[i];
  f.done = false;
  f.wait = Wait::None;
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = stack(i);
  f.ctx.uc_stack.ss_size = kStackBytes;
  f.ctx.uc_link = &l.scheduler;
  makecontext(&f.ctx, fiber_main, 0);
}

// Runs one block: every fiber from the start of `body` to its return.
inline void run_block(Launch& l) {
  const int n = static_cast<int>(l.fibers.size());
  for (int i = 0; i < n; ++i) start(l, i);
  for (Warp& w : l.warps) w.parity = 0;
  Schedule& sched = schedule();
  const std::vector<double> speed = sched.speeds(l.warps.size());
  for (;;) {
    // One round: resume runnable fibers (of the warps that run this round) until they
    // return or wait.
    bool any_runnable = false;
    for (const Fiber& f : l.fibers) any_runnable = any_runnable || (!f.done && f.wait == Wait::None);
    for (bool resumed = false; any_runnable && !resumed;) {
      std::vector<char> warp_runs(l.warps.size());
      for (size_t w = 0; w < warp_runs.size(); ++w) warp_runs[w] = sched.runs(speed[w]);
      for (int i : sched.order(n)) {
        Fiber& f = l.fibers[i];
        if (f.done || f.wait != Wait::None || !warp_runs[f.warp]) continue;
        resume(l, f);
        resumed = true;
      }
    }
    // Release the barriers whose participants all wait.
    bool released = false, all_done = true, all_block = true;
    for (size_t w = 0; w < l.warps.size(); ++w) {
      int active_lanes = 0, at_shfl = 0, lanes = 0;
      for (int i = static_cast<int>(w) * 32; i < std::min(n, static_cast<int>(w + 1) * 32); ++i) {
        ++lanes;
        active_lanes += !l.fibers[i].done;
        at_shfl += !l.fibers[i].done && l.fibers[i].wait == Wait::Warp;
      }
      if (at_shfl == 0 || at_shfl != active_lanes) continue;
      if (active_lanes != 32)
        fail("warp " + std::to_string(w) + " of block " + str(blockIdx) + ": a shuffle with mask 0xffffffff while " +
             std::to_string(32 - active_lanes) + " of its 32 lanes have returned or do not exist");
      const Shfl op = l.fibers[w * 32].op;
      for (int i = static_cast<int>(w) * 32; i < static_cast<int>(w + 1) * 32; ++i) {
        if (l.fibers[i].op != op) fail("lanes of warp " + std::to_string(w) + " of block " + str(blockIdx) +
                                       " meet at different shuffle kinds");
        l.fibers[i].wait = Wait::None;
      }
      l.warps[w].parity ^= 1;
      released = true;
    }
    for (const Fiber& f : l.fibers) {
      all_done = all_done && f.done;
      all_block = all_block && (f.done || f.wait == Wait::Block);
    }
    if (all_done) return;
    if (!released && all_block) {
      for (Fiber& f : l.fibers)
        if (!f.done) f.wait = Wait::None;
      released = true;
    }
    bool runnable = false;
    for (const Fiber& f : l.fibers) runnable = runnable || (!f.done && f.wait == Wait::None);
    if (!released && !runnable) {
      int at_block = 0, at_warp = 0, done = 0;
      for (const Fiber& f : l.fibers) {
        done += f.done;
        at_block += !f.done && f.wait == Wait::Block;
        at_warp += !f.done && f.wait == Wait::Warp;
      }
      fail("block " + str(blockIdx) + " cannot make progress (divergent barrier): " + std::to_string(at_block) +
           " threads at __syncthreads, " + std::to_string(at_warp) + " at a warp shuffle, " +
           std::to_string(done) + " returned");
    }
  }
}

inline void run(dim3 grid, dim3 block, size_t shared_bytes, const std::function<void()>& body) {
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  const bool ok = threads >= 1 && threads <= 1024 && block.z <= 64 && grid.x >= 1 && grid.x <= 0x7fffffffu &&
                  grid.y >= 1 && grid.y <= 65535 && grid.z >= 1 && grid.z <= 65535;
  if (!ok) {
    last_error() = cudaErrorInvalidConfiguration;
    return;
  }
  if (shared_bytes != 0) fail("dynamic shared memory is not emulated");
  if (active()) fail("a kernel launched from inside a kernel");
  Launch l;
  l.body = &body;
  l.fibers.resize(threads);
  l.warps.resize((threads + 31) / 32);
  for (uint64_t i = 0; i < threads; ++i) {
    Fiber& f = l.fibers[i];
    f.tid.x = static_cast<unsigned>(i % block.x);
    f.tid.y = static_cast<unsigned>(i / block.x % block.y);
    f.tid.z = static_cast<unsigned>(i / (uint64_t{block.x} * block.y));
    f.lane = static_cast<int>(i % 32);
    f.warp = static_cast<int>(i / 32);
  }
  active() = &l;
  blockDim = block;
  gridDim = grid;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = uint3{x, y, z};
        run_block(l);
      }
  active() = nullptr;
}

// While alive and `enabled`, float arithmetic on this thread flushes denormal inputs and
// results to zero (as CUDA's -ftz=true, part of --use_fast_math). Set before a launch creates
// its fibers: their contexts (getcontext / swapcontext) carry the floating-point control register.
class FlushDenormals {
 public:
  explicit FlushDenormals(bool enabled) : enabled_(enabled) {
    if (!enabled_) return;
#if defined(__x86_64__) || defined(__i386__)
    unsigned csr;
    __asm__ volatile("stmxcsr %0" : "=m"(csr));
    saved_ = csr;
    csr |= (1u << 15) | (1u << 6);  // FTZ, DAZ
    __asm__ volatile("ldmxcsr %0" : : "m"(csr));
#elif defined(__aarch64__)
    uint64_t fpcr;
    __asm__ volatile("mrs %0, fpcr" : "=r"(fpcr));
    saved_ = fpcr;
    fpcr |= uint64_t{1} << 24;  // FZ
    __asm__ volatile("msr fpcr, %0" : : "r"(fpcr));
#endif
  }
  ~FlushDenormals() {
    if (!enabled_) return;
#if defined(__x86_64__) || defined(__i386__)
    unsigned csr = static_cast<unsigned>(saved_);
    __asm__ volatile("ldmxcsr %0" : : "m"(csr));
#elif defined(__aarch64__)
    __asm__ volatile("msr fpcr, %0" : : "r"(saved_));
#endif
  }
  FlushDenormals(const FlushDenormals&) = delete;
  FlushDenormals& operator=(const FlushDenormals&) = delete;

 private:
  bool enabled_;
  uint64_t saved_ = 0;
};

template <typename... P>
struct Launcher {
  void (*kernel)(P...);
  dim3 grid, block;
  size_t shared_bytes;
  bool flush_denormals;
  template <typename... A>
  void operator()(A&&... args) const {
    // The arguments are converted to the parameter types once, as for a launch; every
    // thread's call copies them.
    const std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
    const std::function<void()> body = [&] { std::apply(kernel, params); };
    const FlushDenormals ftz(flush_denormals);
    use_context();
    run(grid, block, shared_bytes, body);
  }
};

template <typename... P>
Launcher<P...> launcher(void (*kernel)(P...), dim3 grid, dim3 block, size_t shared_bytes = 0,
                        cudaStream_t = nullptr) {
  return Launcher<P...>{kernel, grid, block, shared_bytes, false};
}

// The launch of a kernel compiled with --use_fast_math (translate.py --fast-math).
template <typename... P>
Launcher<P...> fast_math_launcher(void (*kernel)(P...), dim3 grid, dim3 block, size_t shared_bytes = 0,
                                  cudaStream_t = nullptr) {
  return Launcher<P...>{kernel, grid, block, shared_bytes, true};
}

inline Fiber& in_kernel(const char* what) {
  Launch* l = active();
  if (!l || !l->current) fail(std::string(what) + " called outside a kernel");
  return *l->current;
}

template <typename T>
T shuffle(unsigned mask, T v, Shfl op, int arg, int width, const char* what) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a value of at most 8 bytes");
  Fiber& f = in_kernel(what);
  if (mask != 0xffffffffu) fail(std::string(what) + ": only the full mask 0xffffffff is emulated");
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0) fail(std::string(what) + ": width must be a power of 2 <= 32");
  Warp& w = active()->warps[f.warp];
  const int buf = w.parity;
  std::memcpy(&w.slots[buf][f.lane], &v, sizeof(T));
  f.op = op;
  yield(Wait::Warp);
  const int base = f.lane / width * width, pos = f.lane % width;
  int src = f.lane;
  switch (op) {
    case Shfl::Up: src = pos >= arg ? f.lane - arg : f.lane; break;
    case Shfl::Down: src = pos + arg < width ? f.lane + arg : f.lane; break;
    case Shfl::Xor: src = (f.lane ^ arg) < base + width ? (f.lane ^ arg) : f.lane; break;
    case Shfl::Idx: src = base + ((arg % width) + width) % width; break;
  }
  T r;
  std::memcpy(&r, &w.slots[buf][src], sizeof(T));
  return r;
}

}  // namespace qm_emu

inline void __syncthreads() {
  qm_emu::in_kernel("__syncthreads");
  qm_emu::yield(qm_emu::Wait::Block);
}

template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = warpSize) {
  return qm_emu::shuffle(mask, v, qm_emu::Shfl::Up, static_cast<int>(delta), width, "__shfl_up_sync");
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = warpSize) {
  return qm_emu::shuffle(mask, v, qm_emu::Shfl::Down, static_cast<int>(delta), width, "__shfl_down_sync");
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = warpSize) {
  return qm_emu::shuffle(mask, v, qm_emu::Shfl::Xor, lane_mask, width, "__shfl_xor_sync");
}
template <typename T>
T __shfl_sync(unsigned mask, T v, int src_lane, int width = warpSize) {
  return qm_emu::shuffle(mask, v, qm_emu::Shfl::Idx, src_lane, width, "__shfl_sync");
}

// Fibers of one launch never run at the same time: a read-modify-write is atomic.
template <typename T>
T atomicAdd(T* address, T value) {
  qm_emu::in_kernel("atomicAdd");
  const T old = *address;
  *address = old + value;
  return old;
}
