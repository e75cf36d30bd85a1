// __half of the CPU emulation used by the tests (see qm_cuda_emu.h): 16-bit storage,
// conversions with round-to-nearest-even.
#pragma once
#include <cstdint>
#include <cstring>

struct __half {
  uint16_t bits;
};

inline float __half2float(__half h) {
  const uint32_t sign = uint32_t(h.bits & 0x8000u) << 16, e = (h.bits >> 10) & 0x1fu, m = h.bits & 0x3ffu;
  uint32_t x;
  if (e == 0) {  // zero or subnormal: m * 2^-24, exact in float
    float v = float(m) * 5.9604644775390625e-8f;
    std::memcpy(&x, &v, 4);
    x |= sign;
  } else if (e == 31) {
    x = sign | 0x7f800000u | (m << 13);
  } else {
    x = sign | ((e + 112) << 23) | (m << 13);
  }
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}

inline __half __float2half_rn(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return __half{static_cast<uint16_t>(sign | 0x7e00u)};  // NaN
  if (ax >= 0x477ff000u) return __half{static_cast<uint16_t>(sign | 0x7c00u)};  // >= 65520: inf
  if (ax < 0x38800000u) {  // below 2^-14: a subnormal half, units of 2^-24 (n * 2^-24 is exact)
    float v;
    std::memcpy(&v, &ax, 4);
    const float units = v * 16777216.f;
    uint32_t n = static_cast<uint32_t>(units);
    const float rest = units - float(n);
    if (rest > 0.5f || (rest == 0.5f && (n & 1))) ++n;
    return __half{static_cast<uint16_t>(sign | n)};
  }
  const uint32_t r = ax - 0x38000000u;  // exponent bias 127 -> 15
  uint32_t h = r >> 13;
  const uint32_t rest = r & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1))) ++h;
  return __half{static_cast<uint16_t>(sign | h)};
}
inline __half __float2half(float f) { return __float2half_rn(f); }
