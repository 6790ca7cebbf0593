// Float vectors for convoy's CPU kernels, as GCC (12+) / Clang vector extensions.
//
// Written this way (not as `#pragma omp simd` reductions) because the compiler's own
// horizontal reduction of a simd loop goes through the stack one lane at a time, which cost
// more than the loop itself in these kernels' short (64-128 float) dot products. Eight lanes
// (vf8) are one AVX2 register. vfw is the widest vector the build targets: 16 lanes where
// AVX-512 is enabled, else vf8. Kernels whose inner loops are arithmetic-bound use vfw: cores
// with full-width 512-bit FMA units do twice the work per instruction, and cores that split
// a 512-bit FMA in two halves still issue fewer instructions.

#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace convoy {

using vf8 = float __attribute__((vector_size(32)));

inline vf8 load8(const float* p) {
  vf8 v;
  std::memcpy(&v, p, sizeof(v));  // an unaligned load (vmovups)
  return v;
}

// Eight int8 values widened to float. With intrinsics: GCC 12 scalarizes the same
// conversion written as __builtin_convertvector (eight byte extracts and inserts).
inline vf8 load8(const int8_t* p) {
#if defined(__AVX2__)
  const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return (vf8)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
#else
  vf8 v;
  for (int i = 0; i < 8; ++i) v[i] = static_cast<float>(p[i]);
  return v;
#endif
}

inline void store8(float* p, vf8 v) { std::memcpy(p, &v, sizeof(v)); }

#if defined(__AVX512F__)
constexpr int kLanes = 16;
using vfw = float __attribute__((vector_size(64)));
#else
constexpr int kLanes = 8;
using vfw = vf8;
#endif

inline vfw loadw(const float* p) {
  vfw v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void storew(float* p, vfw v) { std::memcpy(p, &v, sizeof(v)); }

inline vfw splatw(float x) { return vfw{} + x; }

// The sum of x's lanes kept as eight partial sums: lane i of the result adds lanes i, i + 8,
// ... of x (one shuffle and add on AVX-512, nothing on AVX2).
inline vf8 fold8(vfw x) {
#if defined(__AVX512F__)
  return __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7) +
         __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15);
#else
  return x;
#endif
}

// Makes v live in a register from here on (an empty asm that claims to change it). Where one
// loaded vector feeds several FMAs, GCC 12 otherwise folds the load into each FMA as a memory
// operand, so the loop issues a load per FMA and is bound by the load ports, not the FMA units.
inline void keep_in_register(vf8& v) {
#if defined(__AVX512VL__)
  asm("" : "+v"(v));  // any of the 32 vector registers
#elif defined(__AVX__)
  asm("" : "+x"(v));
#else
  (void)v;
#endif
}

#if defined(__AVX512F__)
inline void keep_in_register(vfw& v) { asm("" : "+v"(v)); }
#endif

// Asks for the cache line at p to be brought into L2 (a non-binding prefetch; any address is
// safe). An asm statement rather than __builtin_prefetch: GCC 12 treats the builtin as free of
// side effects and, assuming loops terminate (-ffinite-loops, on by default in C++), deletes a
// loop that does nothing but prefetch when it cannot count its trips, silently.
inline void prefetch_line(const void* p) {
#if defined(__x86_64__) || defined(__i386__)
  asm volatile("prefetcht2 %0" : : "m"(*static_cast<const char*>(p)));
#else
  __builtin_prefetch(p, 0, 1);
#endif
}

inline vf8 splat8(float x) { return vf8{x, x, x, x, x, x, x, x}; }

// Lane i of the result is the sum of x[i]'s eight lanes: eight horizontal sums in 21
// shuffles and adds (a transpose folded into the additions) instead of eight separate ones.
inline vf8 reduce8(const vf8 (&x)[8]) {
  // Lanes 0-3 hold partial sums of x[2i], lanes 4-7 of x[2i+1].
  vf8 s[4];
  for (int i = 0; i < 4; ++i) {
    s[i] = __builtin_shufflevector(x[2 * i], x[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11) +
           __builtin_shufflevector(x[2 * i], x[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15);
  }
  // Lane pairs (0-1, 2-3, 4-5, 6-7) hold partial sums of x[4i], x[4i+1], x[4i+2], x[4i+3].
  vf8 t[2];
  for (int i = 0; i < 2; ++i) {
    t[i] = __builtin_shufflevector(s[2 * i], s[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13) +
           __builtin_shufflevector(s[2 * i], s[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15);
  }
  return __builtin_shufflevector(t[0], t[1], 0, 2, 4, 6, 8, 10, 12, 14) +
         __builtin_shufflevector(t[0], t[1], 1, 3, 5, 7, 9, 11, 13, 15);
}

}  // namespace convoy
