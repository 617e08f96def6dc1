// The vector types and the two helpers every qkv kernel uses (decode_kernel.cpp, flash_fwd_kernel.cpp,
// flash_bwd_kernel.cpp): GCC/Clang vector extensions of 16 floats, the broadcast, and exp by Cephes'
// expf polynomial. A kernel includes this header; the kernel cache (qkv/core/_kernels.py) hashes it
// with each kernel's source, so a change here rebuilds all three.
#pragma once
#include <cstdint>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace {

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));  // an unaligned load or store
typedef int32_t i16v __attribute__((vector_size(64)));
typedef uint32_t u16v __attribute__((vector_size(64)));
typedef uint16_t h16u __attribute__((vector_size(32), aligned(2)));  // 16 bfloat16 bit patterns

// x in all lanes (v16{} + x would add +0.0 first: not an identity for -0.0).
inline v16 splat(float x) {
#ifdef __AVX512F__
  return (v16)_mm512_set1_ps(x);
#else
  return v16{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x};
#endif
}

// exp(x), Cephes' expf polynomial: about 1 ulp; 0 below -87.3 (where exp underflows to subnormals)
// and for -inf; inputs above 88 are taken as 88. The kernels call it on scores minus their running
// max (x <= 0).
inline v16 vexp(v16 x) {
  const v16 lo = splat(-87.33654f);
  i16v tiny = x < lo;
  x = x < lo ? lo : x;
  x = x > splat(88.0f) ? splat(88.0f) : x;
  v16 n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  v16 r = x - n * 0.693359375f + n * 2.12194440e-4f;
  v16 y = splat(1.9875691500e-4f);
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  i16v e = (__builtin_convertvector(n, i16v) + 127) << 23;
  v16 out = y * (v16)e;
  return tiny ? splat(0.0f) : out;
}

}  // namespace
