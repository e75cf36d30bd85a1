// quadmamba core: shared checks, dtype and device codes.
//
// Glossary of dimension letters used across the core (and the Python package):
//   B  batch                       H, W  spatial height and width
//   D  channels per scan direction L     sequence length (H * W)
//   K  scan directions (groups)    N     SSM state size (d_state)
//
// Errors: QM_CHECK throws quadmamba::Error (a std::invalid_argument, so the
// binding surfaces it as a Python ValueError) carrying file:line and a message.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <sstream>
#include <stdexcept>
#include <string>

namespace quadmamba {

class Error : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

namespace detail {
inline void append(std::ostringstream&) {}
template <typename T, typename... Rest>
void append(std::ostringstream& os, const T& v, const Rest&... rest) {
  os << v;
  append(os, rest...);
}
template <typename... Args>
[[noreturn]] void fail(const char* file, int line, const char* cond, const Args&... args) {
  std::ostringstream os;
  append(os, args...);
  os << " [" << cond << " failed at " << file << ":" << line << "]";
  throw Error(os.str());
}
}  // namespace detail

// How far the environment variable QUADMAMBA_CPU_GENERIC (read once) holds the CPU kernels
// back from the instruction sets they would pick, so that the tests can run every code path
// on one x86 machine: 0 (unset, or any other value): not at all; 1: no AVX / AVX2 paths (x86's
// SSE2 baseline stays); 2: no x86 intrinsics either (the scalar code non-x86 builds run).
inline int cpu_generic_level() {
  static const int level = [] {
    const char* v = std::getenv("QUADMAMBA_CPU_GENERIC");
    const std::string s = v == nullptr ? "" : v;
    return s == "1" ? 1 : s == "2" ? 2 : 0;
  }();
  return level;
}

// True when QUADMAMBA_CPU_GENERIC is 1 or 2: the CPU kernels skip their AVX / AVX2 paths.
inline bool cpu_generic_forced() { return cpu_generic_level() >= 1; }

// False when QUADMAMBA_CPU_GENERIC is 1 or 2, or QUADMAMBA_CPU_NO_AVX512=1 (read once): the
// kernels with an AVX-512 copy then run their AVX2 one (or generic), so that the tests reach
// the AVX2 code on a machine with AVX-512.
inline bool cpu_avx512_allowed() {
  static const bool allowed = [] {
    const char* v = std::getenv("QUADMAMBA_CPU_NO_AVX512");
    return !cpu_generic_forced() && !(v != nullptr && std::string(v) == "1");
  }();
  return allowed;
}

}  // namespace quadmamba

#define QM_CHECK(cond, ...)                                                  \
  do {                                                                       \
    if (!(cond)) ::quadmamba::detail::fail(__FILE__, __LINE__, #cond, __VA_ARGS__); \
  } while (0)

#if defined(__CUDACC__)
#define QM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define QM_HOST_DEVICE inline
#endif

namespace quadmamba {

// Element types; the numeric codes are part of the binding's contract with
// python/quadmamba/_backend.py.
enum class DType : int { Float32 = 0, Float64 = 1, Float16 = 2, BFloat16 = 3, Int64 = 4, Int32 = 5 };

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::Float32: return "float32";
    case DType::Float64: return "float64";
    case DType::Float16: return "float16";
    case DType::BFloat16: return "bfloat16";
    case DType::Int64: return "int64";
    case DType::Int32: return "int32";
  }
  return "unknown";
}

inline int dtype_size(DType t) {
  switch (t) {
    case DType::Float32: case DType::Int32: return 4;
    case DType::Float64: case DType::Int64: return 8;
    case DType::Float16: case DType::BFloat16: return 2;
  }
  return 0;
}

// A device: kind CPU (index -1) or CUDA (index >= 0).
struct Device {
  int index = -1;
  bool is_cpu() const { return index < 0; }
  bool is_cuda() const { return index >= 0; }
  bool operator==(const Device& o) const { return index == o.index; }
  bool operator!=(const Device& o) const { return index != o.index; }
};

// Whether the CUDA kernels were compiled into this build.
constexpr bool cuda_built() {
#if defined(QUADMAMBA_WITH_CUDA)
  return true;
#else
  return false;
#endif
}

// What the CUDA runtime linked into this build finds on this machine. A CUDA build
// links the runtime statically, so it needs an NVIDIA driver that supports that runtime's
// version (CUDA 13 needs driver release 580 or newer), whatever PyTorch's own runtime is.
struct CudaStatus {
  int runtime_version = 0;  // the linked runtime, 1000 * major + 10 * minor (13000: 13.0); 0: CPU-only build
  int driver_version = 0;   // the newest CUDA version the installed driver supports, same form; 0: no driver
  int device_count = 0;     // usable devices
  std::string error;        // the runtime's message when it finds no usable device ("" otherwise)
};
CudaStatus cuda_status();

// Number of usable CUDA devices: cuda_status().device_count (0 in a CPU-only build and on
// machines without a suitable driver or a device).
int cuda_device_count();

}  // namespace quadmamba
