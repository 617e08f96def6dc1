// qkv decode kernel: a few query rows against a long KV cache, fused in one pass.
//
// The algorithm is FlashAttention-2's online softmax (Dao, 2023) over blocks of cached keys,
// split over the cache as in Flash-Decoding (Dao, Haziza, Massa and Sizov, 2023): every
// (batch row, kv head, cache split) is a work item that reads its keys and values once, and
// returns its partial softmax state (row max, row sum, weighted values relative to the row
// max); qkv_decode merges the splits through their row max and finishes (out, lse). The grouped
// query heads of a kv head are the rows of one item (Ainslie et al., 2023, GQA), so a key is
// read once for all of them. Items go to whichever thread is free; each piece of the cache is
// prefetched into L2 as the same piece PF_AHEAD keys earlier is read (see Ahead). Each block's
// weighted values are summed from zero and added to the item's accumulator once, so an output over
// many keys carries the rounding of (block + blocks) terms: one running sum over 1797 keys of
// values sharing a large offset (1000 + noise) missed the tolerance rule in 10 of 10 draws, at
// 6x the error of the reference's blocked matrix product (docs/benchmarks.md, the seventh part).
//
// Scores are formed in float32 from a float32 query and keys that are float32 or bfloat16
// (widened in registers: a bfloat16 is the top half of a float32), so no wider copy of the
// cache is ever written. Where the compiler targets AVX512-BF16, a bfloat16 cache runs both
// products on vdpbf16ps (pairs of exact bfloat16 products summed in float32): the scores from
// the bfloat16 query, and the values product from the softmax weights rounded to bfloat16,
// as FlashAttention-2 does on GPUs (values_tile_bf16). A head size that is not a multiple of 16
// (32 on the bfloat16 dot product) runs its last dims in one masked step where the compiler
// targets AVX-512 (BW, VL), and their cache lines are prefetched as the others are: before,
// they ran one by one and unprefetched (bfloat16, D = Dv = 72, 32768 keys, B=1, Hq=32, Hkv=8, the
// kernel alone, the builds before and after called in turns in one process: 8.6-9.7 -> 3.4-4.1
// ms; D = 80: 4.3-4.5 -> 3.3-3.5 ms; float32 D = 72: 10.9-11.3 -> 5.9-6.8 ms; D = 128 and float32
// D = 80 unchanged). No torch headers: the library is plain C++17 with GCC/Clang vector
// extensions, compiled on first use by qkv/core/_kernels.py with the machine's compiler and
// -march=native, loaded with ctypes (which releases the GIL for the call). A build for a CPU
// without AVX-512 (AVX2, SSE, NEON) runs the same algorithm on tiles of narrower vectors (VW floats:
// scores_tile_narrow, values_tile_narrow; a bfloat16 cache whose head sizes allow, on pairs of
// bfloat16 values read as one 32-bit word: scores_tile_pairs, values_tile_pairs), and says its width
// (qkv_decode_vector_width), by which `auto` (backend/decode.py) chooses it.
//
// Layouts (element strides, innermost dimension contiguous):
//   q    (B, Hkv, M, D) float32, contiguous, already multiplied by the scale; row m = g*Lq + i
//        is query head h*G + g, query i.
//   k    (B, Hkv, Lk, D) and v (B, Hkv, Lk, Dv), strides kst/vst = (b, h, key).
//   allow, bias: optional (b, hq, i, j) arrays with strides ast/bst (0 where broadcast).
//   row_lo, row_hi (Lq,): query i sees keys [row_lo[i], row_hi[i]) (causal, window); both null:
//        every query sees all of [j0, j1).
//   out_m, out_l (B, Hkv, S, M) and out_acc (B, Hkv, S, M, Dv), S = nsplit.
//   out_bad (B, Hkv, S) int32: 1 where a work item formed a score that is NaN or infinite
//        (from a non-finite key, or an overflow) before any mask applied, so that the caller
//        can recompute the step by qkv's rule for non-finite inputs (core/finite.py) without
//        reading the cache a second time.
//   qkv_decode: q (B, Hq, Lq, D) as the caller holds it (strides qst), out (B, Hkv, M, Dv) =
//        (B, Hq, Lq, Dv) in the cache's dtype and lse (B, Hkv, M) float32, bad (uint8).
//
// Measured on a 2-core AMD EPYC (Zen 4, AVX512-BF16, a shared VM whose memory read ran at 25-49
// GB/s from run to run), B=1, Hq=32, Hkv=8, D=128, one query, 2 threads. The kernel alone,
// called through ctypes in turns with a float32 read of as many bytes, best of 11, before
// (prefetches in bursts: a block's values while its scores were formed, the next block's keys
// while its values were summed; one split per kv head, items dealt round robin) and after:
// bfloat16 32768 keys 5.40 -> 4.66 ms (read 4.71 ms), 6.05 -> 5.52 ms (read 4.79 ms); float32
// 32768 10.72 -> 9.12 ms (read 8.46 ms); one thread, bfloat16 8.82 -> 7.65 ms, float32 22.0
// -> 15.0 ms. The whole step through qkv.attention, `python benchmarks/decode.py --lengths
// 32768 131072 --queries 1 --repeats 7`, the code before and after run in turns, twice each:
// bfloat16 32768 7.50, 7.47 ms (before) -> 6.91, 6.40 ms (after); 131072 24.17, 22.57 -> 20.38,
// 23.43 ms; float32 32768 12.90, 16.42 -> 11.85, 11.26 ms; 131072 48.21, 47.13 -> 33.13, 38.52
// ms. Of a 6 ms step, 0.8-1.1 ms is spent outside this kernel in Python and torch operations,
// each slow because the cache just streamed through every cache level (see qkv_decode).

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>
#if defined(__AVX512F__) || defined(__AVX2__) || defined(__SSE2__)
#include <immintrin.h>
#elif defined(__ARM_NEON)
#include <arm_neon.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#include "qkv_simd.h"  // v16 and its kin, splat, vexp: shared by the kernels
#include "qkv_threads.h"  // on_threads: shared by the kernels

namespace {


constexpr int BK = 64;  // keys per block of the online softmax
constexpr float NEG_INF = -INFINITY;


// 16 consecutive values at p as float32: float32 (kind 0) or bfloat16 widened (kind 1).
template <int KIND>
inline v16 load16(const void* p) {
  if constexpr (KIND == 0) {
    return *(const v16u*)p;
  } else {
#ifdef __AVX512F__
    // One zero-extending load and a shift (GCC 12 splits the generic conversion in halves).
    return (v16)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16);
#else
    u16v w = __builtin_convertvector(*(const h16u*)p, u16v) << 16;
    return (v16)w;
#endif
  }
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define QKV_MASKED_TAILS 1
// The first t < 16 values at p as float32, the other lanes 0: a masked load, which reads (and
// can fault on) only those t values. The last dims of a row whose size is not a multiple of 16.
template <int KIND>
inline v16 load_first(const void* p, int64_t t) {
  const __mmask16 mk = (__mmask16)((1u << t) - 1u);
  if constexpr (KIND == 0) {
    return (v16)_mm512_maskz_loadu_ps(mk, p);
  } else {
    return (v16)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mk, p)), 16);
  }
}
#else
#define QKV_MASKED_TAILS 0
#endif

template <int KIND>
inline float load1(const void* p) {
  if constexpr (KIND == 0) {
    return *(const float*)p;
  } else {
    uint32_t w = uint32_t(*(const uint16_t*)p) << 16;
    float f;
    std::memcpy(&f, &w, 4);
    return f;
  }
}

// float32 to bfloat16 as torch rounds it: to nearest, ties to even (bit for bit with torch on
// every value that is not NaN); NaN stays a quiet NaN (0x7fc0, where torch's vector path may give
// other NaN bits: a NaN output sets the step's flag, and the guard recomputes it).
inline uint16_t to_bf16(float f) {
  uint32_t w;
  std::memcpy(&w, &f, 4);
  if (f != f) return 0x7fc0;
  return uint16_t((w + 0x7fffu + ((w >> 16) & 1u)) >> 16);
}

template <int KIND>
inline const void* at(const void* base, int64_t elems) {
  return (const char*)base + elems * (KIND == 0 ? 4 : 2);
}

inline float hsum(v16 a) {
  float s = 0.0f;
  for (int t = 0; t < 16; ++t) s += a[t];
  return s;
}

// Sixteen accumulators -> the sixteen sums of their lanes, in order (a tree of shuffles).
__attribute__((always_inline)) inline v16 reduce16(const v16* a) {
  v16 t[8], u[4], w[2];
  for (int p = 0; p < 8; ++p)
    t[p] = __builtin_shuffle(a[2 * p], a[2 * p + 1], i16v{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23}) +
           __builtin_shuffle(a[2 * p], a[2 * p + 1], i16v{8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31});
  for (int p = 0; p < 4; ++p)
    u[p] = __builtin_shuffle(t[2 * p], t[2 * p + 1], i16v{0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27}) +
           __builtin_shuffle(t[2 * p], t[2 * p + 1], i16v{4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31});
  for (int p = 0; p < 2; ++p)
    w[p] = __builtin_shuffle(u[2 * p], u[2 * p + 1], i16v{0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29}) +
           __builtin_shuffle(u[2 * p], u[2 * p + 1], i16v{2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31});
  return __builtin_shuffle(w[0], w[1], i16v{0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30}) +
         __builtin_shuffle(w[0], w[1], i16v{1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31});
}


inline float sexp(float x) { return x == NEG_INF ? 0.0f : std::exp(x); }

// Prefetching. Every tile that reads a piece of a cache row (keys in the scores, values in
// the weighted sum) asks, in the same loop step, for the same bytes of the row PF_AHEAD keys
// later (`Ahead`), into L2 (__builtin_prefetch locality 1: prefetcht2): so the keys and the
// values streams are each requested one line per line read, at the rate the arithmetic
// consumes them, PF_AHEAD keys (a 64-key block: 16 KiB of bfloat16 keys, as much of values)
// ahead. On the 2-core AMD EPYC (Zen 4, in a VM) this was tuned on, the hardware prefetchers
// do little for these two streams: with no software prefetch a bfloat16 cache ran at half
// the speed, and prefetching one line in 2 or 4 (leaving the rest to the hardware) was as
// slow. The earlier scheme (a block's values requested in bursts while its scores were
// formed, the next block's keys while its values were summed) left the core's misses
// outstanding in bursts, so the cache was read and computed on in turn rather than at once:
// one thread, bfloat16, 32768 keys, B=1, Hkv=8, G=4, D=128, the kernel called directly:
// 8.59-9.40 ms before, 6.40-7.02 ms with this scheme (distances 32/64/128/256 keys: 7.7, 7.0,
// 6.6, 6.3 ms in one run and 32-key 9.0 vs 64-key 9.1 in another: flat beyond 32); L1
// prefetches (locality 3) 1.6x slower than L2 ones; a non-temporal one (locality 0) 1.5x.
constexpr int64_t PF_AHEAD = 64;

// The prefetch target of a tile: row c of the tile asks for row c of `p` (the tile's first row
// PF_AHEAD keys on, `stride` bytes apart) when c < n (the rows whose ahead row the work item
// still reads); n <= 0: none.
struct Ahead {
  const char* p = nullptr;
  int64_t n = 0, stride = 0;
  // Bytes [o, o + len) of row c, a line at a time.
  inline void ask(int64_t c, int64_t o, int64_t len) const {
    if (c < n)
      for (int64_t e = o; e < o + len; e += 64) __builtin_prefetch(p + c * stride + e, 0, 1);
  }
  // The line at byte o of row c: ask(c, o, 1) without its loop, for the bfloat16 scores tile
  // (its step reads a line of each key): 2-6% faster on a warm cache (bfloat16, 4096 keys, the
  // builds called in turns in one process), the same on a 32k cache streamed from memory.
  __attribute__((always_inline)) inline void ask1(int64_t c, int64_t o) const {
    if (c < n) __builtin_prefetch(p + c * stride + o, 0, 1);
  }
  // The 64-byte pieces of row c that start in [o, o + len) (offsets from the row's start): the
  // narrow tiles' steps, which read less than a piece each, ask for each piece once.
  inline void ask_starts(int64_t c, int64_t o, int64_t len) const {
    if (c < n)
      for (int64_t e = (o + 63) & ~int64_t(63); e < o + len; e += 64) __builtin_prefetch(p + c * stride + e, 0, 1);
  }
  // Every line that holds a byte of [o, o + len) of row c: the last dims of a row (the steps
  // before them ask a line per 64 bytes from the row's start, so a row whose size is not a
  // multiple of 64 bytes leaves the line its tail reaches into to this).
  inline void ask_lines(int64_t c, int64_t o, int64_t len) const {
    if (c < n && len > 0) {
      const uintptr_t a = (uintptr_t)(p + c * stride + o), last = a + (uintptr_t)len - 1;
      for (uintptr_t x = a & ~uintptr_t(63); x <= last; x += 64) __builtin_prefetch((const void*)x, 0, 1);
    }
  }
};

// The Ahead of the rows [r0, r0 + rows) of a cache whose row 0 is `base`, `stride` bytes apart,
// for a work item that reads rows below `hi`.
inline Ahead ahead_of(const void* base, int64_t r0, int64_t rows, int64_t hi, int64_t stride) {
  Ahead a;
  a.p = (const char*)base + (r0 + PF_AHEAD) * stride;
  a.n = std::min<int64_t>(rows, hi - r0 - PF_AHEAD);
  a.stride = stride;
  return a;
}

// Narrow vectors: builds without AVX-512 (AVX and AVX2: 8 floats, 16 registers; SSE and NEON: 4).
// The 16-float tiles below (scores_tile, values_tile) hold sixteen 16-float accumulators, which
// such a build splits into 32 or 64 registers, more than it has: GCC spilled them to the stack and
// took the reductions and the softmax's vectors apart lane by lane, and a decode step ran at a
// seventh of the AVX-512 build's speed (float32, 4096 keys, B=1, Hq=32, Hkv=8, D=128, the whole
// step: 6.3 ms against 0.82 ms, the x86-64-v3 build on the same AMD EPYC). These tiles run the
// same products on vectors of VW floats: the sixteen dot products of a scores tile in groups of VW
// (VW accumulators each), the values in passes of 8 accumulators; the softmax steps VW lanes at a
// time (vexp_as). The kernel alone, 2 threads, 4096 keys, after: float32 1.0-1.1 ms (AVX-512
// build: 0.84-0.96 ms), bfloat16 0.65-0.73 ms (0.42-0.45 ms with the bfloat16 dot product).
// (QKV_VW, VW and the vw types are qkv_simd.h's, shared with the FA-2 kernels.)

// VW consecutive values at p as float32: float32 (kind 0) or bfloat16 widened (kind 1).
template <int KIND>
inline vw loadw(const void* p) {
  if constexpr (KIND == 0) {
    return *(const vwu*)p;
  } else {
#if QKV_VW == 8 && defined(__AVX2__)
    // One zero-extending load and a shift (GCC splits the generic conversion in halves).
    return (vw)_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16);
#elif QKV_VW == 4 && defined(__SSE2__)
    // Zeros interleaved below the 4 bit patterns: each 32-bit lane is (pattern << 16).
    return (vw)_mm_unpacklo_epi16(_mm_setzero_si128(), _mm_loadl_epi64((const __m128i*)p));
#elif QKV_VW == 4 && defined(__ARM_NEON)
    return (vw)vreinterpretq_f32_u32(vshll_n_u16(vld1_u16((const uint16_t*)p), 16));
#else
    return (vw)(__builtin_convertvector(*(const hwu*)p, uwv) << 16);
#endif
  }
}


// VW accumulators -> the VW sums of their lanes, in order (reduce16's tree for 8 or 4 lanes).
__attribute__((always_inline)) inline vw reducew(const vw* a) {
#if QKV_VW == 8
  vw t[4], u[2];
  for (int p = 0; p < 4; ++p)
    t[p] = __builtin_shuffle(a[2 * p], a[2 * p + 1], iwv{0, 1, 2, 3, 8, 9, 10, 11}) +
           __builtin_shuffle(a[2 * p], a[2 * p + 1], iwv{4, 5, 6, 7, 12, 13, 14, 15});
  for (int p = 0; p < 2; ++p)
    u[p] = __builtin_shuffle(t[2 * p], t[2 * p + 1], iwv{0, 1, 4, 5, 8, 9, 12, 13}) +
           __builtin_shuffle(t[2 * p], t[2 * p + 1], iwv{2, 3, 6, 7, 10, 11, 14, 15});
  return __builtin_shuffle(u[0], u[1], iwv{0, 2, 4, 6, 8, 10, 12, 14}) +
         __builtin_shuffle(u[0], u[1], iwv{1, 3, 5, 7, 9, 11, 13, 15});
#elif QKV_VW == 4
  vw t[2];
  for (int p = 0; p < 2; ++p)
    t[p] = __builtin_shuffle(a[2 * p], a[2 * p + 1], iwv{0, 1, 4, 5}) +
           __builtin_shuffle(a[2 * p], a[2 * p + 1], iwv{2, 3, 6, 7});
  return __builtin_shuffle(t[0], t[1], iwv{0, 2, 4, 6}) + __builtin_shuffle(t[0], t[1], iwv{1, 3, 5, 7});
#else
  return a[0];  // never called: the AVX-512 build's tiles reduce with reduce16
#endif
}

// scores_tile on narrow vectors: s[r*BK + c] = q[r] . k[c] for RM rows and RK keys (RM*RK = 16), in
// groups of VW dot products: all the rows (up to VW) by VW / GR keys, so that each key is loaded (and
// a bfloat16 key widened) once per tile, as in scores_tile. The groups of the first rows ask for
// their keys' lines PF_AHEAD on.
template <int KIND, int RM, int RK>
__attribute__((always_inline)) inline void scores_tile_narrow(const float* q, int64_t D, const void* k,
                                                              int64_t kstride, float* s, const Ahead& pf) {
  static_assert(RM * RK == 16 && 16 % VW == 0, "one tile is sixteen dot products");
  constexpr int64_t esize = KIND == 0 ? 4 : 2;
  constexpr int GR = RM < VW ? RM : VW, GC = VW / GR;  // each key read (and widened) once per group
  static_assert(RK % GC == 0 && RM % GR == 0, "the groups tile the tile");
  for (int r0 = 0; r0 < RM; r0 += GR)
    for (int c0 = 0; c0 < RK; c0 += GC) {
      vw acc[VW];
      for (int t = 0; t < VW; ++t) acc[t] = splat_as<vw>(0.0f);
      int64_t d = 0;
      for (; d + VW <= D; d += VW) {
        if (r0 == 0 && (d * esize) % 64 == 0)
          for (int c = c0; c < c0 + GC; ++c) pf.ask(c, d * esize, 1);  // one line per 64 bytes read
        vw qv[GR];
        for (int r = 0; r < GR; ++r) qv[r] = *(const vwu*)(q + (r0 + r) * D + d);
        for (int c = 0; c < GC; ++c) {
          const vw kv = loadw<KIND>(at<KIND>(k, (c0 + c) * kstride + d));
          for (int r = 0; r < GR; ++r) acc[r * GC + c] += qv[r] * kv;
        }
      }
      if (r0 == 0 && d < D)  // a head size that is not a multiple of VW: its last dims, one by one
        for (int c = c0; c < c0 + GC; ++c) pf.ask_lines(c, d * esize, (D - d) * esize);
      vw sums = reducew(acc);
      for (int r = 0; r < GR; ++r)
        for (int c = 0; c < GC; ++c) {
          float x = sums[r * GC + c];
          for (int64_t e = d; e < D; ++e) x += q[(r0 + r) * D + e] * load1<KIND>(at<KIND>(k, (c0 + c) * kstride + e));
          s[(r0 + r) * BK + c0 + c] = x;
        }
    }
}

// values_tile on narrow vectors: acc[r] (Dv) += sum over the n keys of p[r*BK + c] * v[c], for RM
// rows, dims [d0, Dv): RS rows at a time, 8 / RS vectors of each per pass over the keys (the other
// row groups read the pass's values again from L1), then one vector, then the last dims one by one.
// The first group's passes ask for their values' lines PF_AHEAD keys on. RS is chosen by the caller
// (values_block): on the x86-64-v3 build, a float32 step against a cache streamed from memory ran
// fastest a row at a time (a pass reads 4 lines of each key; 4 rows at a time, a line, ran 1.3-1.5x
// slower), a chunk of queries (compute-bound) 4 at a time, and bfloat16 2 at a time.
template <int KIND, int RM, int RS>
inline void values_tile_narrow(const float* p, const void* v, int64_t vstride, int64_t n, int64_t d0, int64_t Dv,
                               float* acc, const Ahead& pf) {
  static_assert(RM % RS == 0 && 8 % RS == 0, "row groups tile the rows");
  constexpr int64_t esize = KIND == 0 ? 4 : 2;
  constexpr int CH = 8 / RS;  // RS * CH = 8 accumulators
  int64_t d = d0;
  for (; d + CH * VW <= Dv; d += CH * VW)
    for (int r0 = 0; r0 < RM; r0 += RS) {
      vw o[RS][CH];
      for (int r = 0; r < RS; ++r)
        for (int t = 0; t < CH; ++t) o[r][t] = splat_as<vw>(0.0f);  // the block's sum, from zero
      for (int64_t c = 0; c < n; ++c) {
        if (r0 == 0) pf.ask_starts(c, d * esize, CH * VW * esize);
        const void* row = at<KIND>(v, c * vstride + d);
        vw vv[CH];
        for (int t = 0; t < CH; ++t) vv[t] = loadw<KIND>(at<KIND>(row, VW * t));
        for (int r = 0; r < RS; ++r) {
          const vw pr = splat_as<vw>(p[(r0 + r) * BK + c]);
          for (int t = 0; t < CH; ++t) o[r][t] += pr * vv[t];
        }
      }
      for (int r = 0; r < RS; ++r)
        for (int t = 0; t < CH; ++t) {
          vwu* a = (vwu*)(acc + (r0 + r) * Dv + d + VW * t);
          *a = *a + o[r][t];
        }
    }
  for (; d + VW <= Dv; d += VW) {
    vw o[RM];
    for (int r = 0; r < RM; ++r) o[r] = splat_as<vw>(0.0f);
    for (int64_t c = 0; c < n; ++c) {
      pf.ask_starts(c, d * esize, VW * esize);
      const vw vv = loadw<KIND>(at<KIND>(v, c * vstride + d));
      for (int r = 0; r < RM; ++r) o[r] += splat_as<vw>(p[r * BK + c]) * vv;
    }
    for (int r = 0; r < RM; ++r) *(vwu*)(acc + r * Dv + d) = *(const vwu*)(acc + r * Dv + d) + o[r];
  }
  if (d < Dv)  // the last dims (Dv mod VW), one by one
    for (int64_t c = 0; c < n; ++c) pf.ask_lines(c, d * esize, (Dv - d) * esize);
  for (; d < Dv; ++d)
    for (int r = 0; r < RM; ++r) {
      float x = 0.0f;
      for (int64_t c = 0; c < n; ++c) x += p[r * BK + c] * load1<KIND>(at<KIND>(v, c * vstride + d));
      acc[r * Dv + d] += x;
    }
}


#if QKV_VW < 16
// bfloat16 pairs (builds without AVX-512): 2*VW bfloat16 values at p, read as VW 32-bit words,
// are the VW even-numbered values (each word's low half, shifted up) and the VW odd-numbered ones
// (its high half, the low half cleared) as float32, exactly: one load and two integer operations per
// 2*VW values, where widening them in order (loadw) took a zero-extending load and a shift per VW.
// The tiles on pairs keep the even dims' and the odd dims' terms apart (values_pairs) or sum them
// against a query in the same layout (scores_tile_pairs). On a 2-core Zen 3 EPYC (AVX2, no AVX-512),
// bfloat16, B=1, Hq=32, Hkv=8, D=128, one query, the kernel alone, the builds before and after called
// in turns (best of 11-31, eight runs over an hour of a noisy VM): 32768 keys streamed from memory
// 0.79-0.94x the time, 1024 keys (in L3) 0.81-1.04x (one run slower); the whole step,
// `python benchmarks/kernels_ab.py --before 74a3b61 --decode`: 0.83-0.92x.
__attribute__((always_inline)) inline void load_pairs(const void* p, vw& even, vw& odd) {
  typedef uint32_t uwu __attribute__((vector_size(4 * VW), aligned(2)));  // an unaligned load of words
  const uwv w = *(const uwu*)p;
  even = (vw)(w << 16);
  odd = (vw)(w & 0xFFFF0000u);
}

// A query row in the pairs' layout: each chunk of 2*VW dims as its VW even dims, then its VW odd
// dims (qp[c*2VW + t] = q[c*2VW + 2t], qp[c*2VW + VW + t] = q[c*2VW + 2t + 1]), D a multiple of 2*VW.
inline void to_pairs_layout(const float* q, int64_t D, float* qp) {
  for (int64_t c = 0; c < D; c += 2 * VW)
    for (int t = 0; t < VW; ++t) qp[c + t] = q[c + 2 * t], qp[c + VW + t] = q[c + 2 * t + 1];
}

// scores_tile_narrow for a bfloat16 cache on pairs: s[r*BK + c] = q[r] . k[c] for RM rows and RK keys
// (RM*RK = 16), the rows qp in the pairs' layout (D a multiple of 2*VW), in groups of VW dot products
// (GR rows by GC keys): per 2*VW dims a key is read once (load_pairs) and each of its products adds
// the even dims' and the odd dims' terms to one accumulator. The sums run in another order than
// scores_tile_narrow's (even and odd dims alternate). The groups of the first rows ask for their
// keys' lines PF_AHEAD on.
template <int RM, int RK>
__attribute__((always_inline)) inline void scores_tile_pairs(const float* qp, int64_t D, const void* k,
                                                             int64_t kstride, float* s, const Ahead& pf) {
  static_assert(RM * RK == 16 && 16 % VW == 0, "one tile is sixteen dot products");
  constexpr int GC = RK < VW ? RK : VW, GR = VW / GC;  // 8 floats: 2 rows by 4 keys, or 1 by 8
  static_assert(RK % GC == 0 && RM % GR == 0, "the groups tile the tile");
  for (int r0 = 0; r0 < RM; r0 += GR)
    for (int c0 = 0; c0 < RK; c0 += GC) {
      vw acc[VW];
      for (int t = 0; t < VW; ++t) acc[t] = splat_as<vw>(0.0f);
      for (int64_t d = 0; d < D; d += 2 * VW) {
        if (r0 == 0 && (d * 2) % 64 == 0)
          for (int c = c0; c < c0 + GC; ++c) pf.ask(c, d * 2, 1);  // one line per 64 bytes read
        vw qe[GR], qo[GR];
        for (int r = 0; r < GR; ++r) {
          qe[r] = *(const vwu*)(qp + (r0 + r) * D + d);
          qo[r] = *(const vwu*)(qp + (r0 + r) * D + d + VW);
        }
        for (int c = 0; c < GC; ++c) {
          vw ke, ko;
          load_pairs(at<1>(k, (c0 + c) * kstride + d), ke, ko);
          for (int r = 0; r < GR; ++r) {
            acc[r * GC + c] += qe[r] * ke;
            acc[r * GC + c] += qo[r] * ko;
          }
        }
      }
      const vw sums = reducew(acc);
      for (int r = 0; r < GR; ++r)
        for (int c = 0; c < GC; ++c) s[(r0 + r) * BK + c0 + c] = sums[r * GC + c];
    }
}

// values_tile_narrow for a bfloat16 cache on pairs: acc[r] (Dv) += sum over the n keys of
// p[r*BK + c] * v[c], for RM rows, dims [d0, d1) (d1 - d0 a multiple of 2*VW*CH): RS rows by CH
// chunks of 2*VW dims per pass over the keys (2*RS*CH accumulators, at most 8: the even dims' and the
// odd dims' apart), interleaved back into order as the block's sums are added to acc. Each dim's sum
// over the keys runs in the order of values_tile_narrow's, from zero: for the same weights, the same
// bits. The first row group's passes ask for their values' lines PF_AHEAD keys on.
template <int RM, int RS, int CH>
inline void values_pairs(const float* p, const void* v, int64_t vstride, int64_t n, int64_t d0, int64_t d1,
                         int64_t Dv, float* acc, const Ahead& pf) {
  static_assert(RM % RS == 0 && RS * CH <= 4, "row groups tile the rows; up to 8 accumulators");
  for (int64_t d = d0; d < d1; d += 2 * VW * CH)
    for (int r0 = 0; r0 < RM; r0 += RS) {
      vw oe[RS][CH], oo[RS][CH];
      for (int r = 0; r < RS; ++r)
        for (int t = 0; t < CH; ++t) oe[r][t] = oo[r][t] = splat_as<vw>(0.0f);  // the block's sum, from zero
      for (int64_t c = 0; c < n; ++c) {
        if (r0 == 0) pf.ask_starts(c, d * 2, 2 * VW * CH * 2);
        vw ve[CH], vo[CH];
        for (int t = 0; t < CH; ++t) load_pairs(at<1>(v, c * vstride + d + 2 * VW * t), ve[t], vo[t]);
        for (int r = 0; r < RS; ++r) {
          const vw pr = splat_as<vw>(p[(r0 + r) * BK + c]);
          for (int t = 0; t < CH; ++t) {
            oe[r][t] += pr * ve[t];
            oo[r][t] += pr * vo[t];
          }
        }
      }
      for (int r = 0; r < RS; ++r)
        for (int t = 0; t < CH; ++t) {
          // (e0 o0 e1 o1 ...): the first VW dims from the lower halves, the next VW from the upper
#if QKV_VW == 8
          const vw lo = __builtin_shuffle(oe[r][t], oo[r][t], iwv{0, 8, 1, 9, 2, 10, 3, 11});
          const vw hi = __builtin_shuffle(oe[r][t], oo[r][t], iwv{4, 12, 5, 13, 6, 14, 7, 15});
#else  // 4 floats
          const vw lo = __builtin_shuffle(oe[r][t], oo[r][t], iwv{0, 4, 1, 5});
          const vw hi = __builtin_shuffle(oe[r][t], oo[r][t], iwv{2, 6, 3, 7});
#endif
          vwu* a = (vwu*)(acc + (r0 + r) * Dv + d + 2 * VW * t);
          a[0] = a[0] + lo;
          a[1] = a[1] + hi;
        }
    }
}

// values_pairs over all of [0, Dv): RS rows by 4 / RS chunks per pass, then the dims left one chunk at
// a time.
template <int RM, int RS>
inline void values_pairs_rows(const float* p, const void* v, int64_t vstride, int64_t n, int64_t Dv, float* acc,
                              const Ahead& pf) {
  constexpr int CH = 4 / RS;
  const int64_t d1 = Dv - Dv % (2 * VW * CH);
  values_pairs<RM, RS, CH>(p, v, vstride, n, 0, d1, Dv, acc, pf);
  if (d1 < Dv) values_pairs<RM, RS, 1>(p, v, vstride, n, d1, Dv, Dv, acc, pf);
}

// The values product of a bfloat16 cache on pairs (Dv a multiple of 2*VW): for a few queries, a row at a
// time, 4 chunks of 2*VW dims per pass over the block's keys (64 dims on AVX2: two lines of each value
// row); the other rows read the block's values again from L1. For a chunk of queries (compute-bound), 2
// rows by 2 chunks. On the Zen 3 EPYC (bfloat16, B=1, Hq=32, Hkv=8, D=128, the kernel alone, builds called
// in turns): one query, 4 rows by one chunk per pass (eight half-line passes over the block) ran 1.4x
// slower than a row by 4 chunks on a 32768-key cache streamed from memory, and 5-8% faster on a 1024-key
// cache in L3; 8 queries (32 rows), 2 rows by 2 chunks 0.92-0.97x a row's time at 4096 and 32768 keys.
template <int RM>
inline void values_tile_pairs(const float* p, const void* v, int64_t vstride, int64_t n, int64_t Dv, float* acc,
                              const Ahead& pf, bool chunk) {
  if constexpr (RM % 2 == 0) {
    if (chunk) {
      values_pairs_rows<RM, 2>(p, v, vstride, n, Dv, acc, pf);
      return;
    }
  }
  values_pairs_rows<RM, 1>(p, v, vstride, n, Dv, acc, pf);
}
#endif  // QKV_VW < 16


struct Args {
  const float* q;
  const uint16_t* q16;  // the same rows unscaled in bfloat16, or null
  float qscale;
  const void* k;
  const void* v;
  int64_t kst[3], vst[3];
  int64_t B, Hkv, G, Lq, D, Dv, M;
  const int64_t* row_lo;
  const int64_t* row_hi;
  const uint8_t* allow;
  int64_t ast[4];
  const float* bias;
  int64_t bst[4];
  int64_t j0, j1, nsplit, split_len;
  float* out_m;
  float* out_l;
  float* out_acc;
  int32_t* out_bad;
};

// s[r*BK + c] = q[m0 + r] . k[j + c] for RM rows and RK keys, RM*RK = 16.
// Prefetches through `pf` (see Ahead) the same dims of the keys PF_AHEAD on.
template <int KIND, int RM, int RK>  // always inlined (its masked last step made GCC call it: float32 3-10% slower)
__attribute__((always_inline)) inline void scores_tile(const float* q, int64_t D, const void* k, int64_t kstride, float* s,
                                                       const Ahead& pf) {
  static_assert(RM * RK == 16, "one tile is sixteen dot products");
  if constexpr (VW < 16) {  // a build without AVX-512
    scores_tile_narrow<KIND, RM, RK>(q, D, k, kstride, s, pf);
    return;
  }
  constexpr int64_t esize = KIND == 0 ? 4 : 2;
  v16 acc[16];
  for (int t = 0; t < 16; ++t) acc[t] = splat(0.0f);
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) {
    v16 qv[RM];
    for (int r = 0; r < RM; ++r) qv[r] = *(const v16u*)(q + r * D + d);
    if ((d * esize) % 64 == 0)
      for (int c = 0; c < RK; ++c) pf.ask(c, d * esize, 1);  // one line per 64 bytes read
    for (int c = 0; c < RK; ++c) {
      v16 kv = load16<KIND>(at<KIND>(k, c * kstride + d));
      for (int r = 0; r < RM; ++r) acc[r * RK + c] += qv[r] * kv;
    }
  }
  if (d < D)  // a head size that is not a multiple of 16: its last dims
    for (int c = 0; c < RK; ++c) pf.ask_lines(c, d * esize, (D - d) * esize);
#if QKV_MASKED_TAILS
  if (d < D) {  // in one masked step
    v16 qv[RM];
    for (int r = 0; r < RM; ++r) qv[r] = load_first<0>(q + r * D + d, D - d);
    for (int c = 0; c < RK; ++c) {
      v16 kv = load_first<KIND>(at<KIND>(k, c * kstride + d), D - d);
      for (int r = 0; r < RM; ++r) acc[r * RK + c] += qv[r] * kv;
    }
    d = D;
  }
#endif
  v16 sums = reduce16(acc);
  if (d < D) {  // one by one
    for (int r = 0; r < RM; ++r)
      for (int c = 0; c < RK; ++c)
        for (int64_t e = d; e < D; ++e) sums[r * RK + c] += q[r * D + e] * load1<KIND>(at<KIND>(k, c * kstride + e));
  }
  if constexpr (RM == 1) {
    *(v16u*)s = sums;
  } else {
    float lanes[16];
    *(v16u*)lanes = sums;
    for (int r = 0; r < RM; ++r) std::memcpy(s + r * BK, lanes + r * RK, sizeof(float) * RK);
  }
}

#ifdef __AVX512BF16__
// The same tile for bfloat16 queries q16 and keys, with the processor's bfloat16 dot
// product (pairs of exact products summed in float32), times `scale`.
template <int RM, int RK>
__attribute__((always_inline)) inline void scores_tile_bf16(const uint16_t* q16, int64_t D, const void* k, int64_t kstride, float scale, float* s,
                                                             const Ahead& pf) {
  static_assert(RM * RK == 16, "one tile is sixteen dot products");
  v16 acc[16];
  for (int t = 0; t < 16; ++t) acc[t] = splat(0.0f);
  int64_t d = 0;
  for (; d + 32 <= D; d += 32) {
    __m512bh qv[RM];
    for (int r = 0; r < RM; ++r) qv[r] = (__m512bh)_mm512_loadu_si512(q16 + r * D + d);
    for (int c = 0; c < RK; ++c) pf.ask1(c, 2 * d);  // the line of the same 32 dims PF_AHEAD keys on
    for (int c = 0; c < RK; ++c) {
      __m512bh kv = (__m512bh)_mm512_loadu_si512((const uint16_t*)k + c * kstride + d);
      for (int r = 0; r < RM; ++r) acc[r * RK + c] = (v16)_mm512_dpbf16_ps((__m512)acc[r * RK + c], qv[r], kv);
    }
  }
  if (d < D)  // a head size that is not a multiple of 32: its last dims
    for (int c = 0; c < RK; ++c) pf.ask_lines(c, 2 * d, 2 * (D - d));
#if QKV_MASKED_TAILS
  if (d < D) {  // in one masked step on the dot product (the pairs past D are zeros)
    const __mmask32 mk = (__mmask32)((1u << (D - d)) - 1u);
    __m512bh qv[RM];
    for (int r = 0; r < RM; ++r) qv[r] = (__m512bh)_mm512_maskz_loadu_epi16(mk, q16 + r * D + d);
    for (int c = 0; c < RK; ++c) {
      __m512bh kv = (__m512bh)_mm512_maskz_loadu_epi16(mk, (const uint16_t*)k + c * kstride + d);
      for (int r = 0; r < RM; ++r) acc[r * RK + c] = (v16)_mm512_dpbf16_ps((__m512)acc[r * RK + c], qv[r], kv);
    }
    d = D;
  }
#endif
  for (; d + 16 <= D; d += 16)
    for (int c = 0; c < RK; ++c) {
      v16 kv = load16<1>((const uint16_t*)k + c * kstride + d);
      for (int r = 0; r < RM; ++r) acc[r * RK + c] += load16<1>(q16 + r * D + d) * kv;
    }
  v16 sums = reduce16(acc);
  for (; d < D; ++d)
    for (int r = 0; r < RM; ++r)
      for (int c = 0; c < RK; ++c)
        sums[r * RK + c] += load1<1>(q16 + r * D + d) * load1<1>((const uint16_t*)k + c * kstride + d);
  sums *= scale;
  if constexpr (RM == 1) {
    *(v16u*)s = sums;
  } else {
    float lanes[16];
    *(v16u*)lanes = sums;
    for (int r = 0; r < RM; ++r) std::memcpy(s + r * BK, lanes + r * RK, sizeof(float) * RK);
  }
}
#endif

template <int KIND>
inline float dot1(const float* q, int64_t D, const void* k) {
  v16 acc = splat(0.0f);
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) acc += *(const v16u*)(q + d) * load16<KIND>(at<KIND>(k, d));
  float x = hsum(acc);
  for (; d < D; ++d) x += q[d] * load1<KIND>(at<KIND>(k, d));
  return x;
}

// acc[r] (Dv) += sum over the n keys of p[r*BK + c] * v[c], for RM rows, dims [d0, Dv).
// While it reads dims of key c's values it asks for the same dims of row c of `pf` (Ahead).
template <int KIND, int RM>
inline void values_tile(const float* p, const void* v, int64_t vstride, int64_t n, int64_t d0, int64_t Dv, float* acc,
                        const Ahead& pf) {
  constexpr int64_t esize = KIND == 0 ? 4 : 2;
  int64_t d = d0;
  for (; d + 64 <= Dv; d += 64) {
    v16 o[RM][4];
    for (int r = 0; r < RM; ++r)
      for (int t = 0; t < 4; ++t) o[r][t] = splat(0.0f);  // the block's sum, from zero
    for (int64_t c = 0; c < n; ++c) {
      pf.ask(c, d * esize, 64 * esize);
      const void* row = at<KIND>(v, c * vstride + d);
      v16 vv[4];
      for (int t = 0; t < 4; ++t) vv[t] = load16<KIND>(at<KIND>(row, 16 * t));
      for (int r = 0; r < RM; ++r) {
        v16 pr = splat(p[r * BK + c]);
        for (int t = 0; t < 4; ++t) o[r][t] += pr * vv[t];
      }
    }
    for (int r = 0; r < RM; ++r)
      for (int t = 0; t < 4; ++t) *(v16u*)(acc + r * Dv + d + 16 * t) = *(const v16u*)(acc + r * Dv + d + 16 * t) + o[r][t];
  }
  for (; d + 16 <= Dv; d += 16) {
    v16 o[RM];
    for (int r = 0; r < RM; ++r) o[r] = splat(0.0f);
    for (int64_t c = 0; c < n; ++c) {
      if ((d * esize) % 64 == 0) pf.ask(c, d * esize, 16 * esize);
      v16 vv = load16<KIND>(at<KIND>(v, c * vstride + d));
      for (int r = 0; r < RM; ++r) o[r] += splat(p[r * BK + c]) * vv;
    }
    for (int r = 0; r < RM; ++r) *(v16u*)(acc + r * Dv + d) = *(const v16u*)(acc + r * Dv + d) + o[r];
  }
  if (d < Dv)  // the last dims (Dv mod 16)
    for (int64_t c = 0; c < n; ++c) pf.ask_lines(c, d * esize, (Dv - d) * esize);
#if QKV_MASKED_TAILS
  if (d < Dv) {  // in one masked step, the keys in the same order as one by one
    const int64_t t = Dv - d;
    const __mmask16 mk = (__mmask16)((1u << t) - 1u);
    v16 o[RM];
    for (int r = 0; r < RM; ++r) o[r] = splat(0.0f);
    for (int64_t c = 0; c < n; ++c) {
      v16 vv = load_first<KIND>(at<KIND>(v, c * vstride + d), t);
      for (int r = 0; r < RM; ++r) o[r] += splat(p[r * BK + c]) * vv;
    }
    for (int r = 0; r < RM; ++r) _mm512_mask_storeu_ps(acc + r * Dv + d, mk, (__m512)(load_first<0>(acc + r * Dv + d, t) + o[r]));
    d = Dv;
  }
#endif
  for (; d < Dv; ++d)  // one by one
    for (int r = 0; r < RM; ++r) {
      float x = 0.0f;
      for (int64_t c = 0; c < n; ++c) x += p[r * BK + c] * load1<KIND>(at<KIND>(v, c * vstride + d));
      acc[r * Dv + d] += x;
    }
}

#ifdef __AVX512BF16__
// The values product of a bfloat16 cache on the processor's bfloat16 dot product, as
// FlashAttention-2 does on GPUs (Dao, 2023: P is cast to 16 bits before P V): the weights p are
// rounded to bfloat16 (nearest even), two keys' value rows are interleaved into (v[c][d],
// v[c+1][d]) pairs, and one vdpbf16ps per row per 16 dims adds both keys' exact products
// p[c] v[c][d] + p[c+1] v[c+1][d] to a float32 accumulator (instead of widening each row and
// one float32 FMA per key). An odd last key is paired with a row of zeros.
//
// vpunpck{l,h}wd interleave within 128-bit lanes, so the two accumulators of 32 dims hold
// them in the order the unpacks give: lo = dims {0-3, 8-11, 16-19, 24-27}, hi = the others
// (+4); each block's sums start from zero and are permuted back to acc's order and added to it once.
template <int RM, int NH>  // NH halves of 32 dims from d
inline void values_pairs_bf16(const uint32_t (*pw)[BK / 2], const uint16_t* v, int64_t vstride, int64_t n, int64_t d,
                              int64_t Dv, float* acc, const Ahead& pf) {
  const __m512i back0 = _mm512_set_epi32(23, 22, 21, 20, 7, 6, 5, 4, 19, 18, 17, 16, 3, 2, 1, 0);
  const __m512i back1 = _mm512_set_epi32(31, 30, 29, 28, 15, 14, 13, 12, 27, 26, 25, 24, 11, 10, 9, 8);
  __m512 o[RM][2 * NH];  // the block's sum, from zero, in the unpacks' order
  for (int r = 0; r < RM; ++r)
    for (int t = 0; t < 2 * NH; ++t) o[r][t] = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + 2 <= n; c += 2) {
    pf.ask(c, 2 * d, 64 * NH);  // the same dims of both keys PF_AHEAD on, before the loads
    pf.ask(c + 1, 2 * d, 64 * NH);
    const uint16_t* r0 = v + c * vstride + d;
    __m512bh w[2 * NH];
    for (int h = 0; h < NH; ++h) {
      const __m512i x = _mm512_loadu_si512(r0 + 32 * h), y = _mm512_loadu_si512(r0 + vstride + 32 * h);
      w[2 * h] = (__m512bh)_mm512_unpacklo_epi16(x, y);
      w[2 * h + 1] = (__m512bh)_mm512_unpackhi_epi16(x, y);
    }
    for (int r = 0; r < RM; ++r) {
      const __m512bh pp = (__m512bh)_mm512_set1_epi32((int)pw[r][c / 2]);
      for (int t = 0; t < 2 * NH; ++t) o[r][t] = _mm512_dpbf16_ps(o[r][t], pp, w[t]);
    }
  }
  if (c < n) {  // the odd last key, with zeros for its pair (its p pair's second half is 0 too)
    pf.ask(c, 2 * d, 64 * NH);
    const uint16_t* r0 = v + c * vstride + d;
    __m512bh w[2 * NH];
    for (int h = 0; h < NH; ++h) {
      const __m512i x = _mm512_loadu_si512(r0 + 32 * h), y = _mm512_setzero_si512();
      w[2 * h] = (__m512bh)_mm512_unpacklo_epi16(x, y);
      w[2 * h + 1] = (__m512bh)_mm512_unpackhi_epi16(x, y);
    }
    for (int r = 0; r < RM; ++r) {
      const __m512bh pp = (__m512bh)_mm512_set1_epi32((int)(pw[r][c / 2] & 0xffffu));
      for (int t = 0; t < 2 * NH; ++t) o[r][t] = _mm512_dpbf16_ps(o[r][t], pp, w[t]);
    }
  }
  for (int r = 0; r < RM; ++r)
    for (int h = 0; h < NH; ++h) {
      const __m512 lo = o[r][2 * h], hi = o[r][2 * h + 1];
      float* a = acc + r * Dv + d + 32 * h;
      _mm512_storeu_ps(a, _mm512_add_ps(_mm512_loadu_ps(a), _mm512_permutex2var_ps(lo, back0, hi)));
      _mm512_storeu_ps(a + 16, _mm512_add_ps(_mm512_loadu_ps(a + 16), _mm512_permutex2var_ps(lo, back1, hi)));
    }
}

// values_tile for a bfloat16 cache: dims in pieces of 64 and 32 on the bfloat16 dot product,
// the rest (Dv mod 32) widened to float32 by values_tile.
template <int RM>
inline void values_tile_bf16(const float* p, const uint16_t* v, int64_t vstride, int64_t n, int64_t Dv, float* acc,
                             const Ahead& pf) {
  if (Dv < 32) {
    values_tile<1, RM>(p, v, vstride, n, 0, Dv, acc, pf);
    return;
  }
  // pw[r][c / 2] = (p[r][c], p[r][c + 1]) rounded to bfloat16, p[r][c] in the low half: the
  // (M, BK) block of weights, whose entries from n on are 0.
  alignas(64) uint32_t pw[RM][BK / 2];
  for (int r = 0; r < RM; ++r)
    for (int c = 0; c < BK; c += 32)
      _mm512_store_si512(pw[r] + c / 2, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(p + r * BK + c + 16),
                                                                     _mm512_loadu_ps(p + r * BK + c)));
  int64_t d = 0;
  for (; d + 64 <= Dv; d += 64) values_pairs_bf16<RM, 2>(pw, v, vstride, n, d, Dv, acc, pf);
  for (; d + 32 <= Dv; d += 32) values_pairs_bf16<RM, 1>(pw, v, vstride, n, d, Dv, acc, pf);
  if (d < Dv) values_tile<1, RM>(p, v, vstride, n, d, Dv, acc, pf);
}
#endif

template <int KIND, int RM>
inline void values_block(const float* p, const void* v, int64_t vstride, int64_t n, int64_t Dv, float* acc,
                         const Ahead& pf, bool chunk) {
#if QKV_VW < 16  // a build without AVX-512; chunk: more than 4 rows (a chunk of queries), compute-bound
  if (KIND == 1 && Dv % (2 * VW) == 0)
    values_tile_pairs<RM>(p, v, vstride, n, Dv, acc, pf, chunk);
  else if (chunk)
    values_tile_narrow<KIND, RM, (RM % 4 == 0 ? 4 : 1)>(p, v, vstride, n, 0, Dv, acc, pf);
  else
    values_tile_narrow<KIND, RM, (KIND == 1 && RM % 2 == 0 ? 2 : 1)>(p, v, vstride, n, 0, Dv, acc, pf);
  return;
#else
  (void)chunk;
#endif
#ifdef __AVX512BF16__
  if constexpr (KIND == 1) {
    values_tile_bf16<RM>(p, (const uint16_t*)v, vstride, n, Dv, acc, pf);
    return;
  }
#endif
  values_tile<KIND, RM>(p, v, vstride, n, 0, Dv, acc, pf);
}

// One work item: batch row b, kv head h, keys [a, e) -> its partial softmax state.
template <int KIND>
void run_item(const Args& A, int64_t b, int64_t h, int64_t split, std::vector<float>& sbuf, std::vector<float>& qbuf) {
  const int64_t M = A.M, D = A.D, Dv = A.Dv;
  const int64_t item = (b * A.Hkv + h) * A.nsplit + split;
  float* m_out = A.out_m + item * M;
  float* l_out = A.out_l + item * M;
  float* acc = A.out_acc + item * M * Dv;
  for (int64_t m = 0; m < M; ++m) m_out[m] = NEG_INF, l_out[m] = 0.0f;
  std::memset(acc, 0, sizeof(float) * M * Dv);

  // Keys [a, e) of the split; empty for a split past the end (more splits than keys).
  int64_t a = std::min(A.j1, A.j0 + split * A.split_len), e = std::min(A.j1, a + A.split_len);
  // Keys some row may see under the band.
  int64_t lo = e, hi = a;
  for (int64_t i = 0; i < A.Lq; ++i) {
    lo = std::min(lo, std::max(a, A.row_lo ? A.row_lo[i] : A.j0));
    hi = std::max(hi, std::min(e, A.row_hi ? A.row_hi[i] : A.j1));
  }
  const float* q = A.q + (b * A.Hkv + h) * M * D;
  const uint16_t* q16 = A.q16 ? A.q16 + (b * A.Hkv + h) * M * D : nullptr;
  (void)q16;  // read only by the bfloat16 dot product (AVX512-BF16)
  // A bfloat16 cache on a build without AVX-512: the scores on pairs (scores_tile_pairs), from the
  // item's query rows in the pairs' layout, where D allows.
  const float* qp = nullptr;
#if QKV_VW < 16
  if (KIND == 1 && D % (2 * VW) == 0) {
    qbuf.resize(M * D);
    for (int64_t m = 0; m < M; ++m) to_pairs_layout(q + m * D, D, qbuf.data() + m * D);
    qp = qbuf.data();
  }
#else
  (void)qbuf, (void)qp;
#endif
  const void* kb = at<KIND>(A.k, b * A.kst[0] + h * A.kst[1]);
  const void* vb = at<KIND>(A.v, b * A.vst[0] + h * A.vst[1]);
  const int64_t ks = A.kst[2], vs = A.vst[2], esize = KIND == 0 ? 4 : 2;
  float* s = sbuf.data();  // (M, BK) scores, then probabilities, of one block
  // The item's first PF_AHEAD keys and values, which no tile asks for (each asks PF_AHEAD keys on).
  for (int64_t r = lo; r < std::min(hi, lo + PF_AHEAD); ++r) {
    for (int64_t o = 0; o < D * esize; o += 64) __builtin_prefetch((const char*)kb + r * ks * esize + o, 0, 1);
    for (int64_t o = 0; o < Dv * esize; o += 64) __builtin_prefetch((const char*)vb + r * vs * esize + o, 0, 1);
  }
  vw raw_check = splat_as<vw>(0.0f);  // sum of x - x over raw scores: 0, or NaN once one is not finite
  float raw_check1 = 0.0f;

  for (int64_t j = lo; j < hi; j += BK) {
    const int64_t n = std::min<int64_t>(BK, hi - j);
    const void* kj = at<KIND>(kb, j * ks);
    const void* vj = at<KIND>(vb, j * vs);
    // Scores: rows in fours against keys in fours, then single rows against sixteen keys.
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) {
      int64_t c = 0;
      for (; c + 4 <= n; c += 4) {
        // The first rows' pass over the keys prefetches them (Ahead).
        const Ahead pf = m == 0 ? ahead_of(kb, j + c, 4, hi, ks * esize) : Ahead();
#ifdef __AVX512BF16__
        if (KIND == 1 && q16)
          scores_tile_bf16<4, 4>(q16 + m * D, D, at<KIND>(kj, c * ks), ks, A.qscale, s + m * BK + c, pf);
        else
#endif
#if QKV_VW < 16
        if (KIND == 1 && qp)
          scores_tile_pairs<4, 4>(qp + m * D, D, at<KIND>(kj, c * ks), ks, s + m * BK + c, pf);
        else
#endif
          scores_tile<KIND, 4, 4>(q + m * D, D, at<KIND>(kj, c * ks), ks, s + m * BK + c, pf);
      }
      for (; c < n; ++c)
        for (int r = 0; r < 4; ++r) s[(m + r) * BK + c] = dot1<KIND>(q + (m + r) * D, D, at<KIND>(kj, c * ks));
    }
    for (; m < M; ++m) {
      int64_t c = 0;
      for (; c + 16 <= n; c += 16) {
        const Ahead pf = m == 0 ? ahead_of(kb, j + c, 16, hi, ks * esize) : Ahead();  // M < 4: the first pass
#ifdef __AVX512BF16__
        if (KIND == 1 && q16)
          scores_tile_bf16<1, 16>(q16 + m * D, D, at<KIND>(kj, c * ks), ks, A.qscale, s + m * BK + c, pf);
        else
#endif
#if QKV_VW < 16
        if (KIND == 1 && qp)
          scores_tile_pairs<1, 16>(qp + m * D, D, at<KIND>(kj, c * ks), ks, s + m * BK + c, pf);
        else
#endif
          scores_tile<KIND, 1, 16>(q + m * D, D, at<KIND>(kj, c * ks), ks, s + m * BK + c, pf);
      }
      for (; c < n; ++c) s[m * BK + c] = dot1<KIND>(q + m * D, D, at<KIND>(kj, c * ks));
    }
    // Constraints, online softmax, and the rescaled accumulators.
    for (m = 0; m < M; ++m) {
      float* sr = s + m * BK;
      const int64_t g = m / A.Lq, i = m % A.Lq, hq = h * A.G + g;
      const int64_t rlo = A.row_lo ? A.row_lo[i] : A.j0, rhi = A.row_hi ? A.row_hi[i] : A.j1;
      {
        int64_t c = 0;
        for (; c + VW <= n; c += VW) {
          vw x = *(vwu*)(sr + c);
          raw_check += x - x;
        }
        for (; c < n; ++c) raw_check1 += sr[c] - sr[c];
      }
      if (j < rlo || j + n > rhi)
        for (int64_t c = 0; c < n; ++c)
          if (j + c < rlo || j + c >= rhi) sr[c] = NEG_INF;
      if (A.allow) {
        const uint8_t* ar = A.allow + b * A.ast[0] + hq * A.ast[1] + i * A.ast[2] + j * A.ast[3];
        for (int64_t c = 0; c < n; ++c)
          if (!ar[c * A.ast[3]]) sr[c] = NEG_INF;
      }
      if (A.bias) {
        const float* br = A.bias + b * A.bst[0] + hq * A.bst[1] + i * A.bst[2] + j * A.bst[3];
        for (int64_t c = 0; c < n; ++c) {  // a -inf entry masks the key, even a non-finite score
          const float bc = br[c * A.bst[3]];
          sr[c] = bc == NEG_INF ? NEG_INF : sr[c] + bc;
        }
      }
      float mx = NEG_INF;
      int64_t c = 0;
      if (n >= VW) {
        vw mv = *(vwu*)sr;
        for (c = VW; c + VW <= n; c += VW) {
          vw x = *(vwu*)(sr + c);
          mv = x > mv ? x : mv;
        }
        for (int t = 0; t < VW; ++t) mx = mv[t] > mx ? mv[t] : mx;
      }
      for (; c < n; ++c) mx = sr[c] > mx ? sr[c] : mx;
      const float old = m_out[m], now = mx > old ? mx : old;
      if (now == NEG_INF) {  // nothing seen yet: this block adds nothing
        for (int64_t c = 0; c < BK; ++c) sr[c] = 0.0f;
        continue;
      }
      if (now > old) {
        const float alpha = sexp(old - now);
        l_out[m] *= alpha;
        float* ar = acc + m * Dv;
        for (int64_t d = 0; d < Dv; ++d) ar[d] *= alpha;
        m_out[m] = now;
      }
      float sum = 0.0f;
      c = 0;
      vw vsw = splat_as<vw>(0.0f);
      for (; c + VW <= n; c += VW) {
        vw pv = vexp_as(*(vwu*)(sr + c) - now);
        *(vwu*)(sr + c) = pv;
        vsw += pv;
      }
      sum = hsumw(vsw);
      for (; c < n; ++c) sum += (sr[c] = sexp(sr[c] - now));
      for (; c < BK; ++c) sr[c] = 0.0f;
      l_out[m] += sum;
    }
    // Weighted values; the first rows' pass prefetches the values PF_AHEAD keys on.
    const Ahead vpf = ahead_of(vb, j, n, hi, vs * esize);
    for (m = 0; m + 4 <= M; m += 4)
      values_block<KIND, 4>(s + m * BK, vj, vs, n, Dv, acc + m * Dv, m == 0 ? vpf : Ahead(), M > 4);
    for (; m < M; ++m)
      values_block<KIND, 1>(s + m * BK, vj, vs, n, Dv, acc + m * Dv, m == 0 ? vpf : Ahead(), M > 4);
  }
  A.out_bad[item] = (hsumw(raw_check) + raw_check1) != 0.0f;  // NaN != 0 as well
}

// Work items are handed out in order, the next to whichever thread is free (an atomic
// counter): the threads of the 2-core VM this was tuned on read different parts of a cache at
// different speeds (one finished its fixed share of 32768 keys in 5.5 ms, the other in 6.3).
template <int KIND>
void run_all(const Args& A, int nthreads) {
  const int64_t items = A.B * A.Hkv * A.nsplit;
  std::atomic<int64_t> next{0};
  auto worker = [&](int) {
    std::vector<float> sbuf(A.M * BK), qbuf;
    for (int64_t it = next++; it < items; it = next++) {
      const int64_t split = it % A.nsplit, bh = it / A.nsplit;
      run_item<KIND>(A, bh / A.Hkv, bh % A.Hkv, split, sbuf, qbuf);
    }
  };
  on_threads(nthreads, worker);  // torch's OpenMP threads (qkv_threads.h)
}

}  // namespace

extern "C" {

// Returns 0 on success, 1 for an unknown dtype kind. The caller checks shapes and strides.
int qkv_decode_partials(int kind, const float* q, const uint16_t* q16, float qscale, const void* k, const void* v, const int64_t* kst,
                        const int64_t* vst, int64_t B, int64_t Hkv, int64_t G, int64_t Lq, int64_t D, int64_t Dv,
                        const int64_t* row_lo, const int64_t* row_hi, const uint8_t* allow, const int64_t* ast,
                        const float* bias, const int64_t* bst, int64_t j0, int64_t j1, int64_t nsplit,
                        float* out_m, float* out_l, float* out_acc, int32_t* out_bad, int nthreads) {
  Args A;
  A.q = q, A.q16 = q16, A.qscale = qscale, A.k = k, A.v = v;
  for (int t = 0; t < 3; ++t) A.kst[t] = kst[t], A.vst[t] = vst[t];
  A.B = B, A.Hkv = Hkv, A.G = G, A.Lq = Lq, A.D = D, A.Dv = Dv, A.M = G * Lq;
  A.row_lo = row_lo, A.row_hi = row_hi;
  A.allow = allow, A.bias = bias;
  for (int t = 0; t < 4; ++t) A.ast[t] = allow ? ast[t] : 0, A.bst[t] = bias ? bst[t] : 0;
  A.j0 = j0, A.j1 = j1, A.nsplit = nsplit < 1 ? 1 : nsplit;
  A.split_len = (j1 - j0 + A.nsplit - 1) / A.nsplit;
  if (A.split_len < 1) A.split_len = 1;
  A.out_m = out_m, A.out_l = out_l, A.out_acc = out_acc, A.out_bad = out_bad;
  if (nthreads < 1) nthreads = 1;
  if (kind == 0) {
    run_all<0>(A, nthreads);
  } else if (kind == 1) {
    run_all<1>(A, nthreads);
  } else {
    return 1;
  }
  return 0;
}

// The whole step, from the queries as the caller holds them: q (B, Hq, Lq, D) float32 (kind
// 0) or bfloat16 (kind 1, the cache's dtype), element strides qst = (b, head, query) and the
// last dimension contiguous. Its rows are gathered into the layout of qkv_decode_partials,
// float32 times the scale (as torch's q.float() * scale rounds) and, where bf16_dot, the
// unscaled bfloat16 rows (a query entry that is NaN or infinite makes the raw scores of its
// row so: every row of a work item is scored against every key it reads). The partial states
// are merged through their row max as flash.merge_states does and finished as flash.finish
// does: out (B, Hkv, M, Dv) = (B, Hq, Lq, Dv) in the cache's dtype (bfloat16 rounded to
// nearest even, NaN kept, as torch's .to(torch.bfloat16)) = acc / row_sum (0 for a row that
// saw no key), lse (B, Hkv, M) float32 = row_max + log(row_sum) (-inf for such a row), *bad = 1
// if a raw score is not finite (a work item's flag), or an output is not
// finite, or an lse is NaN or +inf (the non-finite guard's checks, core/finite.py), else 0.
// Done here rather than in torch because after a long cache has streamed through the caches
// every small torch operation runs cold: engines/decode_native.py spent 0.50 ms outside the
// kernel with the merge and the finish (and the band) in torch, 0.13 ms with them here, and
// the gathered queries and the output's cast took 0.08-0.10 ms more, of a 5-6 ms step at 32768
// keys (bfloat16, B=1, Hkv=8, G=4, D=128).
// Returns 0 on success, 1 for an unknown dtype kind.
int qkv_decode(int kind, const void* q, const int64_t* qst, int bf16_dot, float qscale, const void* k, const void* v,
               const int64_t* kst, const int64_t* vst, int64_t B, int64_t Hkv, int64_t G, int64_t Lq, int64_t D,
               int64_t Dv, const int64_t* row_lo, const int64_t* row_hi, const uint8_t* allow, const int64_t* ast,
               const float* bias, const int64_t* bst, int64_t j0, int64_t j1, int64_t nsplit,
               void* out, float* lse, uint8_t* bad, int nthreads) {
  if (kind != 0 && kind != 1) return 1;
  const int64_t M = G * Lq, S = nsplit < 1 ? 1 : nsplit, rows = B * Hkv * M;
  // q_rows (B, Hkv, M, D) float32 scaled, q16 the same rows unscaled in bfloat16: row
  // (b, h, m = g*Lq + i) is query head h*G + g, query i, of q (B, Hq = Hkv*G, Lq, D).
  std::unique_ptr<float[]> q_rows(new float[rows * D]);
  std::unique_ptr<uint16_t[]> q16(kind == 1 && bf16_dot ? new uint16_t[rows * D] : nullptr);
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t b = row / (Hkv * M), h = row / M % Hkv, m = row % M, g = m / Lq, i = m % Lq;
    const int64_t from = b * qst[0] + (h * G + g) * qst[1] + i * qst[2];
    float* qr = q_rows.get() + row * D;
    for (int64_t d = 0; d < D; ++d)
      qr[d] = (kind == 0 ? ((const float*)q)[from + d] : load1<1>((const uint16_t*)q + from + d)) * qscale;
    if (q16) std::memcpy(q16.get() + row * D, (const uint16_t*)q + from, D * sizeof(uint16_t));
  }
  float* o32 = kind == 0 ? (float*)out : nullptr;  // bfloat16: rounded from a float32 row below
  std::unique_ptr<float[]> orow(kind == 1 ? new float[Dv] : nullptr);
  std::unique_ptr<float[]> pm(new float[B * Hkv * S * M]), pl(new float[B * Hkv * S * M]),
      pacc(new float[B * Hkv * S * M * Dv]);
  std::unique_ptr<int32_t[]> pbad(new int32_t[B * Hkv * S]);
  const int rc = qkv_decode_partials(kind, q_rows.get(), q16.get(), qscale, k, v, kst, vst, B, Hkv, G, Lq, D, Dv, row_lo,
                                     row_hi, allow, ast, bias, bst, j0, j1, S, pm.get(), pl.get(), pacc.get(), pbad.get(),
                                     nthreads);
  if (rc != 0) return rc;
  int32_t any = 0;
  for (int64_t t = 0; t < B * Hkv * S; ++t) any |= pbad[t];
  for (int64_t row = 0; row < rows; ++row) {  // row = (b * Hkv + h) * M + m; split s of it at (bh * S + s) * M + m
    const int64_t bh = row / M, m = row % M;
    float mx = NEG_INF;
    for (int64_t sp = 0; sp < S; ++sp) {
      const float x = pm[(bh * S + sp) * M + m];
      if (x != x) any = 1;  // a NaN row max (std::max would drop it): flagged here, not only by the scores' check
      mx = std::max(mx, x);
    }
    float* o = o32 ? o32 + row * Dv : orow.get();
    for (int64_t d = 0; d < Dv; ++d) o[d] = 0.0f;
    float l = 0.0f;
    if (mx != NEG_INF)
      for (int64_t sp = 0; sp < S; ++sp) {
        const int64_t at_s = (bh * S + sp) * M + m;
        const float w = sexp(pm[at_s] - mx);  // 0 for a split that saw no key (its acc is 0)
        l += w * pl[at_s];
        const float* a = pacc.get() + at_s * Dv;
        for (int64_t d = 0; d < Dv; ++d) o[d] += w * a[d];
      }
    if (l > 0.0f)
      for (int64_t d = 0; d < Dv; ++d) o[d] /= l;
    lse[row] = (mx == NEG_INF ? 0.0f : mx) + std::log(l);  // log(0) = -inf: a row that saw nothing
    float probe = 0.0f;  // 0 * x is NaN exactly when x is NaN or infinite
    for (int64_t d = 0; d < Dv; ++d) probe += 0.0f * o[d];
    if (probe != 0.0f || std::isnan(lse[row]) || lse[row] == -NEG_INF) any = 1;
    if (!o32)
      for (int64_t d = 0; d < Dv; ++d) ((uint16_t*)out)[row * Dv + d] = to_bf16(o[d]);
  }
  *bad = any != 0;
  return 0;
}

// The kernel's interface version, checked by the loader.
int qkv_decode_version() { return 6; }

// Floats per vector of this build's tiles: 16 with AVX-512, 8 with AVX (AVX2 builds), 4 otherwise
// (SSE, NEON). `auto`'s rule (backend/decode.py) was measured per width, and for width 8 with and
// without fused multiply-add (AVX2 has it; AVX alone, e.g. -march=sandybridge, does not).
int qkv_decode_vector_width() { return VW; }

// Whether the build's tiles run on fused multiply-adds (FMA on x86, NEON's fmla on ARM).
int qkv_decode_has_fma() { return QKV_FMA; }

// Whether bfloat16 scores use the processor's bfloat16 dot product (then pass q16).
int qkv_decode_has_bf16_dot() {
#ifdef __AVX512BF16__
  return 1;
#else
  return 0;
#endif
}
}
