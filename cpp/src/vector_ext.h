// GCC / Clang vector-extension helpers shared by the CPU kernels (private to cpp/src).
#pragma once

// Lanes of two vectors picked by constant indices (mask type M for GCC's __builtin_shuffle;
// Clang takes the indices as arguments of __builtin_shufflevector).
#if defined(__clang__)
#define QM_SHUFFLE(M, a, b, ...) ((void)sizeof(M), __builtin_shufflevector(a, b, __VA_ARGS__))
#else
#define QM_SHUFFLE(M, a, b, ...) __builtin_shuffle(a, b, M{__VA_ARGS__})
#endif

namespace quadmamba {

// x[i][j] <- x[j][i] for four 4-lane vectors V (M: the integer vector type of V's lane width);
// 8 two-input shuffles, which SSE2 and NEON do natively.
template <typename M, typename V>
static inline __attribute__((always_inline)) void transpose4x4(V* x) {
  const V t0 = QM_SHUFFLE(M, x[0], x[1], 0, 4, 1, 5), t1 = QM_SHUFFLE(M, x[0], x[1], 2, 6, 3, 7);
  const V t2 = QM_SHUFFLE(M, x[2], x[3], 0, 4, 1, 5), t3 = QM_SHUFFLE(M, x[2], x[3], 2, 6, 3, 7);
  x[0] = QM_SHUFFLE(M, t0, t2, 0, 1, 4, 5);
  x[1] = QM_SHUFFLE(M, t0, t2, 2, 3, 6, 7);
  x[2] = QM_SHUFFLE(M, t1, t3, 0, 1, 4, 5);
  x[3] = QM_SHUFFLE(M, t1, t3, 2, 3, 6, 7);
}

}  // namespace quadmamba
