// The vector types and helpers the qkv kernels share (decode_kernel.cpp, flash_fwd_kernel.cpp,
// flash_bwd_kernel.cpp): GCC/Clang vector extensions of 16 floats, the broadcast, exp by Cephes'
// expf polynomial (on 16 floats, or on any float vector); and the build's own width VW with its
// vector vw (the narrow tiles of builds without AVX-512), their reductions, a lane mask and
// vexp_nonpos (the FA-2 kernels' narrow exp). A kernel
// includes this header; the kernel cache (qkv/core/_kernels.py) hashes it with each kernel's source,
// so a change here rebuilds all three.
#pragma once
#include <cstddef>
#include <cstdint>
#if defined(__AVX512F__) || defined(__AVX__) || defined(__SSE__)
#include <immintrin.h>
#endif

// Whether the build's multiply-adds are fused (FMA on x86, fmla on ARM): the kernels' exports say so
// (qkv_decode_has_fma, qkv_flash_has_fma) and the FA-2 backward's D_i is summed with std::fma under it.
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
#define QKV_FMA 1
#else
#define QKV_FMA 0
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

// x in every lane of any GCC float vector V (lane by lane: exact, as splat is); v16 by splat.
template <typename V>
inline V splat_as(float x) {
  if constexpr (sizeof(V) == sizeof(v16)) {
    return (V)splat(x);
#ifdef __AVX__
  } else if constexpr (sizeof(V) == 32) {
    return (V)_mm256_set1_ps(x);  // one vbroadcastss (from memory: a load); the shuffle below took three
#endif
#ifdef __SSE__
  } else if constexpr (sizeof(V) == 16) {
    return (V)_mm_set1_ps(x);
#endif
  } else {
    V r{};  // x in lane 0, then lane 0 everywhere (a broadcast; GCC made lane-by-lane inserts of a loop)
    r[0] = x;
    typedef decltype(r < r) I;
    return __builtin_shuffle(r, I{});
  }
}

// exp(x), Cephes' expf polynomial: about 1 ulp; 0 below -87.3 (where exp underflows to subnormals)
// and for -inf; inputs above 88 are taken as 88. The kernels call it on scores minus their running
// max (x <= 0). On any GCC float vector V: v16 (vexp), and the decode kernel's narrower vectors in
// builds without AVX-512.
template <typename V>
inline V vexp_as(V x) {
  typedef decltype(x < x) I;  // the signed integer vector of V's lanes
  const V lo = splat_as<V>(-87.33654f);
  I tiny = x < lo;
  x = x < lo ? lo : x;
  x = x > splat_as<V>(88.0f) ? splat_as<V>(88.0f) : x;
  V n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  V r = x - n * 0.693359375f + n * 2.12194440e-4f;
  V y = splat_as<V>(1.9875691500e-4f);
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  I e = (__builtin_convertvector(n, I) + 127) << 23;
  V out = y * (V)e;
  return tiny ? splat_as<V>(0.0f) : out;
}

inline v16 vexp(v16 x) { return vexp_as(x); }

// x as it is, rounded: an empty asm the compiler cannot see through, so a product held in x is not
// fused into a later add or subtract (GCC contracts a * b - c into one multiply-add, rounding once).
// The FA-2 backward recomputes P = exp(scale s - lse) from the scaled score the forward rounded: fused,
// the top key of a row at scale 1000 got P = exp(the product's rounding error), not 1, and dv at
// large logits went 870x outside the tolerance rule. Elsewhere than x86 and ARM, through memory.
template <typename V>
inline void keep_rounded(V& x) {
#if defined(__AVX512F__)
  asm("" : "+v"(x));
#elif defined(__SSE__)
#ifdef __AVX__
  constexpr size_t widest = 32;  // ymm
#else
  constexpr size_t widest = 16;  // xmm
#endif
  if constexpr (sizeof(V) <= widest) {
    asm("" : "+x"(x));
  } else {
    volatile V y = x;
    x = y;
  }
#elif defined(__aarch64__)
  if constexpr (sizeof(V) <= 16) {
    asm("" : "+w"(x));
  } else {
    volatile V y = x;
    x = y;
  }
#else
  volatile V y = x;
  x = y;
#endif
}

// t < lo ? lo : t, a NaN t kept: on x86 one vmaxps (maxps) where the select took a compare and a blend
// (x86's max returns its second operand, t, where either is NaN); elsewhere (NEON) the select itself.
template <typename V>
inline V max_keep_nan(V lo, V t) {
#if defined(__AVX__)
  if constexpr (sizeof(V) == 32) return (V)_mm256_max_ps((__m256)lo, (__m256)t);
#endif
#if defined(__SSE__)
  if constexpr (sizeof(V) == 16) return (V)_mm_max_ps((__m128)lo, (__m128)t);
#endif
  return t < lo ? lo : t;
}

// exp(x) for x <= 0 (a score minus its row's max, or its lse): 2^t, t = x log2(e), split t = n + r
// (|r| <= 1/2), 2^r by Cephes' exp2f polynomial (about 1 ulp), 2^n put into the exponent. The
// rounding of t grows the error with |x|, as in flash_fwd_kernel.cpp's exp2_frame: 1.5 ulp on [-1, 1], 8 ulp
// near -10, 62 ulp (3.9e-6 relative) near -87, by a review's sweep against std::exp; the
// probabilities so far below their row's largest weigh nothing in the output. 0 for t below -126.5
// and for -inf (subnormal results from -87.68 to -87.34, where vexp_as gives 0); exp(0) = 1 exactly;
// a NaN stays NaN. For x up to 88 it is exp(x) as well. The FA-2 kernels' narrow builds use it (14 operations,
// against vexp_as's 24: no clamp above, no select); their AVX-512 builds, flash_fwd_kernel.cpp's exp2_frame.
template <typename V>
inline V vexp_nonpos(V x) {
  typedef decltype(x < x) I;
  const V lo = splat_as<V>(-127.0f);
  V t = x * 1.44269504088896341f;
  t = max_keep_nan(lo, t);  // -inf -> -127: 2^-127 becomes 0 below; a NaN stays NaN
  const V big = t + 12582912.0f;  // 1.5 * 2^23 + n, n = t rounded to nearest (|t| < 2^22)
  const V n = big - 12582912.0f;
  const V r = t - n;
  V p = splat_as<V>(1.535336188319500e-4f);
  p = p * r + 1.339887440266574e-3f;
  p = p * r + 9.618437357674640e-3f;
  p = p * r + 5.550332471162809e-2f;
  p = p * r + 2.402264791363012e-1f;
  p = p * r + 6.931472028550421e-1f;
  p = p * r + 1.0f;
  // 2^n; 0 for n = -127. n + 127 from big's low bits (big's bits are 0x4B400000 + n), one integer
  // subtraction where a conversion of n and an addition took two: the same bits.
  const I e = ((I)big - (0x4B400000 - 127)) << 23;
  return p * (V)e;
}

// The build's own vector: VW floats, 16 with AVX-512, 8 with AVX or AVX2, 4 elsewhere (SSE, NEON),
// for the tiles of builds without AVX-512 (a 16-float tile there is split into two or four registers
// per vector, and its accumulators no longer fit the 16 registers). With VW = 16, vw is v16.
#if defined(__AVX512F__)
#define QKV_VW 16
#elif defined(__AVX__)
#define QKV_VW 8
#else
#define QKV_VW 4
#endif
constexpr int VW = QKV_VW;
typedef float vw __attribute__((vector_size(4 * VW)));
typedef float vwu __attribute__((vector_size(4 * VW), aligned(4)));  // an unaligned load or store
typedef int32_t iwv __attribute__((vector_size(4 * VW)));
typedef uint32_t uwv __attribute__((vector_size(4 * VW)));
typedef uint16_t hwu __attribute__((vector_size(2 * VW), aligned(2)));

// The greatest and the sum of a vw's lanes (the sum in lane order).
inline float hmaxw(vw a) {
  float m = a[0];
  for (int t = 1; t < VW; ++t) m = a[t] > m ? a[t] : m;
  return m;
}
inline float hsumw(vw a) {
  float x = 0.0f;
  for (int t = 0; t < VW; ++t) x += a[t];
  return x;
}

// The sum of a vw's lanes by halves (lanes t and t + VW/2 first, and so on): log2(VW) dependent adds,
// where hsumw's lane order takes VW.
inline float hsum_pairs(vw a) {
#if QKV_VW == 8
  const __m128 h = _mm_add_ps(_mm256_castps256_ps128((__m256)a), _mm256_extractf128_ps((__m256)a, 1));
  const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
#else
  float x[VW];
  for (int t = 0; t < VW; ++t) x[t] = a[t];
  for (int w = VW / 2; w >= 1; w /= 2)
    for (int t = 0; t < w; ++t) x[t] += x[t + w];
  return x[0];
#endif
}

// x where bit t of `bits` is set (lane t), -inf elsewhere.
inline vw keepw(vw x, uint32_t bits) {
  iwv iota{};
  for (int t = 0; t < VW; ++t) iota[t] = t;
  const iwv on = (((iwv{} + (int32_t)bits) >> iota) & 1) != 0;
  return on ? x : splat_as<vw>(-__builtin_inff());
}

#ifdef __AVX512F__
// dst (16 x 16 32-bit words, rows ds words apart) = the transpose of src (16 x 16 words, rows ss apart): four
// rounds of interleaves (32-bit, 64-bit, then 128-bit lanes twice), 64 shuffles for 256 words.
inline void transpose16(const uint32_t* src, int64_t ss, uint32_t* dst, int64_t ds) {
  __m512i r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(src + i * ss);
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 16; i += 8)
    for (int j = 0; j < 4; ++j) {
      t[i + j] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0x88);
      t[i + j + 4] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0xdd);
    }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0x88);
    r[j + 8] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0xdd);
  }
  for (int i = 0; i < 16; ++i) _mm512_storeu_si512(dst + i * ds, r[i]);
}
#endif

}  // namespace
