// qkv FlashAttention-2 backward kernel for CPUs (Dao, 2023, "FlashAttention-2", Algorithm 2).
//
// Given q, k, v, the forward's output O and its log-sum-exp lse, and dO, it recomputes each
// block's probabilities P = exp(scale * q k^T - lse) (never stored whole) and forms
//   D_i = rowsum(dO_i * O_i), dV += P^T dO, dP = dO V^T, dS = P * (dP - D_i),
//   dQ += scale * dS K, dK += scale * dS^T Q,
// over blocks of BQ query rows and BK keys, skipping blocks outside the causal/window band
// (AttentionSpec.band_edges: row i sees keys [lo_i, hi_i)); a row with lse = -inf saw no key
// and gets probabilities, hence gradients, 0.
//
// Gradient through lse (attention_with_lse's second output, ring attention's merges): lse_i =
// log sum_j exp(s_ij) has d lse_i / d s_ij = p_ij, so an incoming d_lse adds p_ij * dlse_i to
// dS_ij: D_i - dlse_i takes D_i's place (d_lse null = 0).
//
// Block lists (a BlockMask's, engines/native_blocks.py; the struct QkvBlockLists of qkv_block_lists.h, shared
// with the forward kernel): as FlexAttention's backward (Dong et al., 2024) walks q_indices per
// key block, a key block of BK = 64 keys here visits only the query blocks that overlap the
// query blocks listed for its mask key block (128 keys: two of ours) in the key-major lists.
// Query blocks stay BQ rows from multiples of BQ, whatever the mask's bq (64, 96, 100, 256...);
// a block that straddles mask query blocks looks each row's up (listed full, a tile, or not
// listed: nothing seen). Blocks wholly inside the band whose rows are all listed full are
// computed unmasked; only the others pay for masking P and dS, by 64 bits per row (band AND
// tile bits), so keys no row sees get dK = dV = 0 and rows that see nothing dQ = 0.
//
// Narrowed partial blocks (as the forward narrows its partial blocks to the keys its rows see):
// a masked block (a band edge, a tile's bits, the last key or query block) is computed in strips
// of 16 rows, each strip over only the 16-key chunks [ca, cz) some row of the strip sees, P and
// dS zero in the other cells; dV and dK sum, per run of chunks, over the hull of the strips that
// computed them, dQ, per run of strips, over their chunks. A causal diagonal or a window's far
// edge (a triangle) is 10 of the 16 (strip, chunk) cells, a window of 256 then costs 4.25 blocks
// of 64 keys per row instead of 5; an odd window's edge mid-block, a BlockMask's global rows or
// keys, rows that see nothing, fewer. Only exact zeros are left out of sums that start from zero,
// so the gradients are the same bits as whole blocks' (tests compare with a build made with
// -DQKV_BWD_NARROW=0). Measured (an in-process A/B of the two builds, the backward alone and a
// training step fwd+bwd by autograd, in turns, best of 7, bit-identical gradients; B=1, H=8, D=64,
// 2 threads, AMD EPYC Zen 4 with AVX512-BF16; /tmp/ab/bwd_ab2.py, not in the repository):
//   pattern (float32 | bfloat16)           backward          fwd+bwd
//   causal window 256 band, L=16384        1.10x | 1.10x     1.06x | 1.08x
//   causal window 256 BlockMask, L=16384   1.10x | 1.09x     1.07x | 1.11x
//   global 16 + window 256, L=4096         1.19x | 1.15x     1.14x | 1.11x
//   packed documents (causal), L=4096      1.04x | 1.02x     1.02x | 1.03x
//   causal window 37 band, L=4096          1.41x | 1.30x     1.25x | 1.17x
//   causal window 200 BlockMask, L=4096    1.28x | 1.27x     1.19x | 1.16x
//   causal band, L=4096                    1.00x | 1.02x     1.01x | 0.99x  (diagonal only: within noise)
//   no mask, L=4096                        1.00x | 1.00x     1.00x | 1.00x  (no partial block)
//
// Parallel work without atomics. FA-2 (section 3.2) parallelises its backward over key blocks,
// each owning its dK/dV, and adds dQ with atomic adds across thread blocks. On a CPU with a few
// cores there are far fewer threads than (batch, head) pairs, so a work item here is a whole
// (batch row, kv head): it owns dK/dV of its keys AND dQ of all its grouped query heads (GQA,
// Ainslie et al. 2023: query head h reads kv head h / G; the G heads are summed into one dK/dV
// and no key is copied per query head), so nothing is shared and nothing is recomputed. Only
// when the items cannot be shared evenly among the threads (and are fewer than 4 per thread)
// are an item's keys cut into S <= threads splits of about equal work (tiles in the band),
// each split with a private dQ buffer, summed at the end (the "per-thread dQ buffers"
// alternative, at S times dQ's memory); with one split dQ accumulates in dq itself. Items are
// taken from a shared counter (dynamic scheduling).
//
// Arithmetic is float32: queries and dO are widened once into padded float32 copies (head size
// rounded up to 16, zeros beyond D), keys and values block by block, so every product is an
// AVX-512 multiply-add over 16 lanes (without AVX-512, micro_narrow's over 8 or 4) and any
// head size 1..256 runs the same code (float32 queries and dO whose head size is a multiple
// of 16 need no padding and are read in place, as bfloat16 ones with even sizes and strides
// are on the dot-product path: no copy, no fresh pages to fault in, which at a narrow window
// cost as much as a fifth of the time); bfloat16 inputs are exact in float32. Each product's
// sum over a block (and over at most 64 terms of the head) starts from zero and is added to its
// accumulator once, so a gradient summed over thousands of rows or keys carries the rounding
// error of (blocks + block size) terms, as SDPA's, not of one running sum (6x larger at
// L=4096). D_i cancels against dP (exactly, in exact arithmetic, where row i sees one key), so
// the float32 path forms it with dP's own arithmetic.
// With __AVX512BF16__ bfloat16 inputs run all five products on vdpbf16ps (pairs of exact
// products summed in float32): q k^T and dO V^T on the raw inputs, and P^T dO, dS^T Q and dS K
// with P and dS rounded to bfloat16 (round to nearest even), as FA-2 does on GPUs (it feeds P
// and dS to the tensor cores in the input precision); accumulation stays float32 and the
// gradients stay within the tolerance rule (tests/core/test_native_flash_bwd.py) at under half
// its bound. Outputs dq, dk, dv: float32.
// With AMX (qkv_amx.h: -march=native on a Xeon with AMX-BF16, the tile data granted by Linux, the tiles'
// self-check passed) the same five products run on tiles instead (gemm_amx: A packed 32 rows at a time
// into steps of 16 pairs, gathered where P^T and dS^T are read, B in place; 2 x 2 accumulator tiles),
// the same sums in another order. Tested on the software model of the tiles
// (tests/core/test_native_flash_amx.py), and run by the whole suite on an Intel Xeon with AMX (a 2-core
// KVM guest, family 6 model 207, 2026-12-01): forward + backward in bfloat16 3.3x-4.2x faster than the
// vdpbf16ps path (benchmarks/kernels_ab.py --define-before QKV_NO_AMX=1 --backward, L=4096 and 16384).
//
// Plain C++17 with GCC/Clang vector extensions (no torch headers), compiled on first use by
// qkv/core/_kernels.py with -O3 -march=native -fopenmp, loaded with ctypes. OpenMP runs on
// torch's libgomp; without OpenMP, std::thread.

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <stdexcept>
#include <thread>
#include <type_traits>
#include <vector>
#ifdef __AVX512F__
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#include "qkv_block_lists.h"  // struct QkvBlockLists, shared with the other FA-2 kernel
#include "qkv_simd.h"  // v16 and its kin, splat, vexp: shared by the kernels
#include "qkv_threads.h"  // on_threads: shared by the kernels
#include "qkv_amx.h"   // QKV_AMX and the tile operations (the bfloat16 products on AMX tiles)

namespace {


constexpr int BQ = 64;  // query rows per block
constexpr int BK = 64;  // keys per block
constexpr float NEG_INF = -INFINITY;

inline v16 ld(const float* p) { return *(const v16u*)p; }
inline void st(float* p, v16 x) { *(v16u*)p = x; }

inline float bf2f(uint16_t h) {
  uint32_t w = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &w, 4);
  return f;
}

template <int KIND>
inline float load1(const void* base, int64_t i) {
  if constexpr (KIND == 0)
    return ((const float*)base)[i];
  else
    return bf2f(((const uint16_t*)base)[i]);
}

// n values (n any) of a row at p -> float32 at dst, zeros up to np (a multiple of 16).
template <int KIND>
inline void widen_row(const void* p, int64_t n, int64_t np, float* dst) {
  int64_t d = 0;
  if constexpr (KIND == 0) {
    for (; d + 16 <= n; d += 16) st(dst + d, ld((const float*)p + d));
  } else {
    for (; d + 16 <= n; d += 16) {
#ifdef __AVX512F__
      st(dst + d, (v16)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)((const uint16_t*)p + d))), 16));
#else
      u16v w = __builtin_convertvector(*(const h16u*)((const uint16_t*)p + d), u16v) << 16;
      st(dst + d, (v16)w);
#endif
    }
  }
  for (; d < n; ++d) dst[d] = load1<KIND>(p, d);
  for (; d < np; ++d) dst[d] = 0.0f;
}


// C[m, n] (+)= sum_k A[m*as_m + k*as_k] * B[k*ldb + n] for MR rows and NV*16 columns; the sum
// over k starts from 0 and is added to C once (ACC), see the top of the file.
template <int MR, int NV, bool ACC>
inline void micro(int64_t K, const float* A, int64_t as_m, int64_t as_k, const float* B, int64_t ldb, float* C,
                  int64_t ldc) {
  v16 acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int t = 0; t < NV; ++t) acc[r][t] = splat(0.0f);
  for (int64_t k = 0; k < K; ++k) {
    v16 b[NV];
    for (int t = 0; t < NV; ++t) {
      b[t] = ld(B + k * ldb + 16 * t);
#ifdef __AVX512F__
      if constexpr (MR > 1) __asm__("" : "+v"(b[t]));  // kept in a register, not reloaded per row
#endif
    }
    for (int r = 0; r < MR; ++r) {
      const v16 a = splat(A[r * as_m + k * as_k]);
      for (int t = 0; t < NV; ++t) acc[r][t] += a * b[t];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int t = 0; t < NV; ++t) st(C + r * ldc + 16 * t, ACC ? ld(C + r * ldc + 16 * t) + acc[r][t] : acc[r][t]);
}

#if QKV_VW < 16
// Builds without AVX-512 (vectors of VW = 8 or 4 floats, 16 registers): `micro` above holds MR x NV
// 16-float accumulators, 2 or 4 registers each, more than there are (GCC spilled them, and the AVX2
// build's backward ran at a seventh of torch's). The same sums on NW vectors of VW floats per row:
// tiles of MR rows by NW * VW columns, each element the same chain of multiply-adds over k as in
// `micro` (so the recomputed scores are the forward's narrow tiles' bits, flash_fwd_kernel.cpp).
#ifndef QKV_BWD_NW
#define QKV_BWD_NW 2  // vectors per row of a narrow tile (6 rows x 2: 12 accumulators, 2 loads, 1 broadcast)
#endif
constexpr int NW = QKV_BWD_NW;
static_assert(NW >= 1 && NW <= 4, "narrow tile width");

template <int MR, bool ACC>
inline void micro_narrow(int64_t K, const float* A, int64_t as_m, int64_t as_k, const float* B, int64_t ldb, float* C,
                         int64_t ldc) {
  vw acc[MR][NW];
  for (int r = 0; r < MR; ++r)
    for (int t = 0; t < NW; ++t) acc[r][t] = splat_as<vw>(0.0f);
  for (int64_t k = 0; k < K; ++k) {
    vw b[NW];
    for (int t = 0; t < NW; ++t) b[t] = *(const vwu*)(B + k * ldb + VW * t);
    for (int r = 0; r < MR; ++r) {
      const vw a = splat_as<vw>(A[r * as_m + k * as_k]);
      for (int t = 0; t < NW; ++t) acc[r][t] += a * b[t];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int t = 0; t < NW; ++t) {
      vwu* c = (vwu*)(C + r * ldc + VW * t);
      *c = ACC ? *c + acc[r][t] : acc[r][t];
    }
}
#endif

template <int MR, bool ACC>
inline void micro_cols(int64_t N, int64_t K, const float* A, int64_t as_m, int64_t as_k, const float* B, int64_t ldb,
                       float* C, int64_t ldc) {
#if QKV_VW < 16
  static_assert(16 % (NW * VW) == 0, "the narrow tiles cover 16 columns exactly");
  for (int64_t n = 0; n < N; n += NW * VW) micro_narrow<MR, ACC>(K, A, as_m, as_k, B + n, ldb, C + n, ldc);
  return;
#endif
  int64_t n = 0;
  for (; n + 64 <= N; n += 64) micro<MR, 4, ACC>(K, A, as_m, as_k, B + n, ldb, C + n, ldc);
  switch ((N - n) / 16) {
    case 3: micro<MR, 3, ACC>(K, A, as_m, as_k, B + n, ldb, C + n, ldc); break;
    case 2: micro<MR, 2, ACC>(K, A, as_m, as_k, B + n, ldb, C + n, ldc); break;
    case 1: micro<MR, 1, ACC>(K, A, as_m, as_k, B + n, ldb, C + n, ldc); break;
    default: break;
  }
}

// float32 products are summed over at most KC terms at a time, each partial sum added to C
// once: the rounding error of a long dot product (dP = dO . v over Dv = 256, which then cancels
// against delta where a row sees few keys) grows with KC plus K / KC terms rather than with K,
// as in BLAS kernels that split K. (bfloat16 runs are not split: their tolerance is 2^16 times
// wider than this error.)
constexpr int64_t KC = 64;
// The scores S = Q K^T in pieces of SC terms of the head, as the forward kernel sums them (its SC,
// flash_fwd_kernel.cpp): the lse it wrote is then of these very scores, and P = exp(s - lse) is its P.
#ifndef QKV_SC
#define QKV_SC 64
#endif
constexpr int64_t SC = QKV_SC;

// f(i, end) for each maximal run [i, end) of 0..n-1 whose members are all same(i, j) as the first.
template <class Same, class F>
inline void for_runs(int n, Same same, F f) {
  for (int i = 0; i < n;) {
    int end = i + 1;
    while (end < n && same(i, end)) ++end;
    f(i, end);
    i = end;
  }
}

template <int MR, int64_t KP = KC>
inline void micro_cols_k(bool acc, int64_t N, int64_t K, const float* A, int64_t as_m, int64_t as_k, const float* B,
                         int64_t ldb, float* C, int64_t ldc) {
  for (int64_t k = 0; k < K; k += KP) {
    const int64_t kn = std::min(KP, K - k);
    if (acc || k > 0)
      micro_cols<MR, true>(N, kn, A + k * as_k, as_m, as_k, B + k * ldb, ldb, C, ldc);
    else
      micro_cols<MR, false>(N, kn, A + k * as_k, as_m, as_k, B + k * ldb, ldb, C, ldc);
  }
}

// C (M x N, N a multiple of 16) (+)= A (M x K, element strides as_m, as_k) B (K x N, row stride ldb),
// summed over at most KP terms at a time (KC; the scores SC, below).
template <bool ACC, int64_t KP = KC>
void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t as_m, int64_t as_k, const float* B, int64_t ldb,
          float* C, int64_t ldc) {
  int64_t m = 0;
  for (; m + 6 <= M; m += 6) micro_cols_k<6, KP>(ACC, N, K, A + m * as_m, as_m, as_k, B, ldb, C + m * ldc, ldc);
  for (; m + 4 <= M; m += 4) micro_cols_k<4, KP>(ACC, N, K, A + m * as_m, as_m, as_k, B, ldb, C + m * ldc, ldc);
  for (int r = 0; r < (int)(M - m); ++r)  // the last rows (fewer than 4; an int count)
    micro_cols_k<1, KP>(ACC, N, K, A + (m + r) * as_m, as_m, as_k, B, ldb, C + (m + r) * ldc, ldc);
}

#ifdef __AVX512BF16__
// bfloat16 products with vdpbf16ps (pairs of exact products summed in float32): in "pair"
// layouts a 32-bit word holds the two bfloat16 values of k = 2p and 2p + 1.
// C[m, n] (+)= sum_p A[m*as_m + p*as_k] . B[p*ldb + n] over K2 pairs p, A and B in words.
template <int MR, int NV, bool ACC>
inline void micro_bf16(int64_t K2, const uint32_t* A, int64_t as_m, int64_t as_k, const uint32_t* B, int64_t ldb,
                       float* C, int64_t ldc) {
  __m512 acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int t = 0; t < NV; ++t) acc[r][t] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K2; ++k) {
    __m512bh b[NV];
    for (int t = 0; t < NV; ++t) b[t] = (__m512bh)_mm512_loadu_si512(B + k * ldb + 16 * t);
    for (int r = 0; r < MR; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32((int)A[r * as_m + k * as_k]);
      for (int t = 0; t < NV; ++t) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], a, b[t]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int t = 0; t < NV; ++t)
      _mm512_storeu_ps(C + r * ldc + 16 * t, ACC ? _mm512_add_ps(_mm512_loadu_ps(C + r * ldc + 16 * t), acc[r][t]) : acc[r][t]);
}

template <int MR, bool ACC>
inline void micro_bf16_cols(int64_t N, int64_t K2, const uint32_t* A, int64_t as_m, int64_t as_k, const uint32_t* B,
                            int64_t ldb, float* C, int64_t ldc) {
  int64_t n = 0;
  for (; n + 64 <= N; n += 64) micro_bf16<MR, 4, ACC>(K2, A, as_m, as_k, B + n, ldb, C + n, ldc);
  switch ((N - n) / 16) {
    case 3: micro_bf16<MR, 3, ACC>(K2, A, as_m, as_k, B + n, ldb, C + n, ldc); break;
    case 2: micro_bf16<MR, 2, ACC>(K2, A, as_m, as_k, B + n, ldb, C + n, ldc); break;
    case 1: micro_bf16<MR, 1, ACC>(K2, A, as_m, as_k, B + n, ldb, C + n, ldc); break;
    default: break;
  }
}

// C (M x N, N a multiple of 16) (+)= A (M x K2 pairs) B (K2 pairs x N), bfloat16 pairs.
template <bool ACC>
void gemm_bf16(int64_t M, int64_t N, int64_t K2, const uint32_t* A, int64_t as_m, int64_t as_k, const uint32_t* B,
               int64_t ldb, float* C, int64_t ldc) {
  int64_t m = 0;
  for (; m + 6 <= M; m += 6) micro_bf16_cols<6, ACC>(N, K2, A + m * as_m, as_m, as_k, B, ldb, C + m * ldc, ldc);
  for (; m + 4 <= M; m += 4) micro_bf16_cols<4, ACC>(N, K2, A + m * as_m, as_m, as_k, B, ldb, C + m * ldc, ldc);
  for (int r = 0; r < (int)(M - m); ++r)  // the last rows (fewer than 4; an int count)
    micro_bf16_cols<1, ACC>(N, K2, A + (m + r) * as_m, as_m, as_k, B, ldb, C + (m + r) * ldc, ldc);
}

#if QKV_AMX
// gemm_bf16 (same arguments, the same products summed in another order) on AMX tiles (qkv_amx.h's
// tile_gemm): A packed 32 rows at a time into 16-pair steps (zero past M and K2; a transposed A, as_k != 1,
// gathered, by 16 x 16 transposes where as_m = 1), B read in place but for a part-filled last step (packed
// with zero rows into bpack, 16 x 32 words), 2 x 2 accumulator tiles. C (+)= the tiles' sums: where the
// tiles cover whole rows of C (16 or 32 of them) straight to and from C, else through a 32 x 32 buffer;
// with ACC the tiles start from C's values (C + step + step ..., each step's sum added in turn). Measured
// on a Xeon with AMX (docs/benchmarks.md, "The native kernels, ninth part"): the buffer's copy and the
// word-by-word gather were half of these products' time. The calling thread's tiles must be configured
// (amx_begin).
template <bool ACC>
void gemm_amx(int64_t M, int64_t N, int64_t K2, const uint32_t* A, int64_t as_m, int64_t as_k, const uint32_t* B,
              int64_t ldb, float* C, int64_t ldc) {
  const int64_t K2p = (K2 + 15) / 16 * 16;
  thread_local std::vector<uint32_t> apack;
  alignas(64) uint32_t bpack[16 * 32];
  alignas(64) float cbuf[32 * 32];
  if ((int64_t)apack.size() < 32 * K2p) apack.resize(32 * K2p);
  uint32_t* ap = apack.data();
  for (int64_t m0 = 0; m0 < M; m0 += 32) {
    const int64_t rows = std::min<int64_t>(32, M - m0);
    if (as_k == 1) {
      for (int64_t r = 0; r < 32; ++r)
        for (int64_t p = 0; p < K2p; ++p) ap[r * K2p + p] = r < rows && p < K2 ? A[(m0 + r) * as_m + p] : 0u;
    } else {
      for (int64_t rb = 0; rb < 32; rb += 16)
        for (int64_t pb = 0; pb < K2p; pb += 16) {
          if (as_m == 1 && rb + 16 <= rows && pb + 16 <= K2) {  // a whole 16 x 16 block of A^T, transposed
            transpose16(A + m0 + rb + pb * as_k, as_k, ap + rb * K2p + pb, K2p);
            continue;
          }
          for (int64_t p = pb; p < pb + 16; ++p)
            for (int64_t r = rb; r < rb + 16; ++r)
              ap[r * K2p + p] = r < rows && p < K2 ? A[(m0 + r) * as_m + p * as_k] : 0u;
        }
    }
    for (int64_t n0 = 0; n0 < N; n0 += 32) {
      const bool two_cols = N - n0 > 16;  // N is a multiple of 16
      const int64_t cols = two_cols ? 32 : 16;
      const uint32_t* last = nullptr;  // a part-filled last step of 16 pairs: its rows packed, zero past K2
      if (K2 % 16) {
        const int64_t k0 = K2p - 16;
        for (int64_t r = 0; r < 16; ++r)
          for (int64_t c = 0; c < cols; ++c) bpack[r * 32 + c] = k0 + r < K2 ? B[(k0 + r) * ldb + n0 + c] : 0u;
        last = bpack;
      }
      if (rows == 16 || rows == 32) {  // whole tiles of C's rows: C itself
        tile_gemm_of<ACC>(rows > 16, two_cols, ap, K2p * 4, 64, B + n0, ldb * 4, 16 * ldb * 4, K2p / 16,
                          C + m0 * ldc + n0, ldc * 4, last, 32 * 4);
        continue;
      }
      // Other row counts through cbuf, with the same arithmetic (with ACC the tiles start from C's rows), so
      // an element's bits do not depend on how its rows were grouped (narrowed blocks give a whole block's).
      if (ACC)
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t c = 0; c < cols; c += 16)
            _mm512_store_ps(cbuf + r * 32 + c, _mm512_loadu_ps(C + (m0 + r) * ldc + n0 + c));
      tile_gemm_of<ACC>(rows > 16, two_cols, ap, K2p * 4, 64, B + n0, ldb * 4, 16 * ldb * 4, K2p / 16, cbuf, 32 * 4,
                        last, 32 * 4);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; c += 16)
          _mm512_storeu_ps(C + (m0 + r) * ldc + n0 + c, _mm512_load_ps(cbuf + r * 32 + c));
    }
  }
}
#endif

// The bfloat16 products: gemm_bf16 (vdpbf16ps), or gemm_amx where the tiles run (amx).
template <bool ACC>
inline void gemm_dot(bool amx, int64_t M, int64_t N, int64_t K2, const uint32_t* A, int64_t as_m, int64_t as_k,
                     const uint32_t* B, int64_t ldb, float* C, int64_t ldc) {
#if QKV_AMX
  if (amx) return gemm_amx<ACC>(M, N, K2, A, as_m, as_k, B, ldb, C, ldc);
#else
  (void)amx;
#endif
  gemm_bf16<ACC>(M, N, K2, A, as_m, as_k, B, ldb, C, ldc);
}

// Rows lo and hi (16 float32 each) rounded to bfloat16 and interleaved: 16 words (lo[t], hi[t]).
inline __m512i pair_rows(__m512 lo, __m512 hi) {
  const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21,
                                       5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(idx, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
}
#endif

// A query block [i0, i1) to visit against one key block (see `visits`): kind 2 = no score
// masked, 1 = masked row by row; rt: offset in Args::rts of its BQ row states, -1 for none (the
// band alone).
struct Step {
  int64_t i0, i1, rt;
  int kind;
};

struct Args {
  int64_t B, Hq, Hkv, G, Lq, Lk, D, Dv, Dp, Dvp, Dp2, Dvp2;
  const void *q, *k, *v, *out, *dout;
  int64_t qst[4], kst[4], vst[4];
  const float* lse;
  const float* d_lse;        // (B, Hq, Lq) gradient through lse, or null
  const float* lse_lo;       // (B, Hq, Lq) lse's low part (lse = lse + lse_lo, more bits than a float), or null
  const QkvBlockLists* bl;   // block lists of a BlockMask, or null (the band alone)
  float scale;
  int64_t left, right, offset;
  float *dq, *dk, *dv;
  // Work buffers.
  float* qf;        // (B, Hq, Lq, Dp) float32 queries, zero-padded; null where q is read in place
  float* dof;       // (B, Hq, Lq, Dvp) float32 dO; null where dO is read in place
  // float32 inputs whose head size is a multiple of 16 (D == Dp, Dv == Dvp) are read in place
  // (rows of q at its strides, dO contiguous): no copy, and no fresh pages to fault in.
  bool q_direct, do_direct;
  bool bf16dot;     // bfloat16 inputs on the AVX512-BF16 dot product
  bool amx;         // bf16dot's products on AMX tiles (gemm_amx)
  uint16_t* q16;    // (B, Hq, Lq, Dp2) bfloat16 queries (bf16 dot product only), else null
  uint16_t* do16;   // (B, Hq, Lq, Dvp2) bfloat16 dO, else null
  // Even head sizes with even strides and 4-byte aligned rows are read in place (as words of
  // two bfloat16): q16 / do16 null.
  bool q16_direct, do16_direct;
  uint32_t* q2;     // (B, Hq, Lq2, Dp) words: queries 2p and 2p + 1 paired (bf16 dot product only)
  uint32_t* do2;    // (B, Hq, Lq2, Dvp) words: dO paired likewise
  int64_t Lq2;      // (Lq + 1) / 2
  float* delta;     // (B, Hq, Lq) rowsum(dO * O)
  float* lse_s;     // (B, Hq, Lq) lse, +inf where -inf (probabilities 0)
  float* dqp;       // (S, B, Hq, Lq, Dp) dQ accumulators per split (dq itself when S = 1 and Dp = D)
  int64_t nsplit;
  std::vector<int64_t> split_at;  // (nsplit + 1) key-block boundaries of the splits
  std::vector<int64_t> row_lo, row_hi;
  // The walk, the same for every (batch row, head), planned once: key block kb visits
  // steps[step_at[kb] .. step_at[kb + 1]); rts holds their row states (Visit::rt).
  std::vector<int64_t> step_at;
  std::vector<Step> steps;
  std::vector<int32_t> rts;
};

inline int64_t clampi(int64_t x, int64_t a, int64_t b) { return x < a ? a : (x > b ? b : x); }

// Query block [i0, i1) against key block [j0, j1): 0 = outside the band, 1 = partly, 2 = wholly inside.
inline int tile_kind(const Args& A, int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
  // lo_i and hi_i are nondecreasing in i: the block's rows see keys [lo_i0, hi_(i1-1)) at most.
  if (A.row_hi[i1 - 1] <= j0 || A.row_lo[i0] >= j1) return 0;
  return (A.row_lo[i1 - 1] <= j0 && A.row_hi[i0] >= j1) ? 2 : 1;
}

// A query block [i0, i1) to visit against one key block: kind 2 = no score masked (the band
// wholly inside, all BK keys real, every row's mask block listed as full), 1 = masked row by
// row. With block lists, rt[r] says what row i0 + r may see of the key block's mask block:
// -1 all of it, t >= 0 the bits of tile t, -2 nothing (its mask query block is not listed).
struct Visit {
  int64_t i0, i1;
  int kind;
  int32_t rt[BQ];
};

// The query blocks key block kb (keys [kb*BK, kb*BK + n)) meets: the band's, and with block
// lists only those overlapping a listed mask query block (the key-major list of mask key block
// kb*BK / bk, so blocks not listed are never visited). Query blocks are BQ rows from a multiple
// of BQ (even: the bfloat16 path pairs rows), whatever the mask's bq; a block that straddles
// mask query blocks looks each row's up. Appends to `out` (cleared first).
void visits(const Args& A, int64_t kb, std::vector<Visit>& out) {
  out.clear();
  const int64_t j0 = kb * BK, n = std::min<int64_t>(BK, A.Lk - j0);
  auto add = [&](int64_t i0, int32_t fill) -> Visit* {
    const int64_t i1 = std::min<int64_t>(A.Lq, i0 + BQ);
    const int band = tile_kind(A, i0, i1, j0, j0 + n);
    if (!band) return nullptr;
    out.emplace_back();
    Visit& w = out.back();
    w.i0 = i0, w.i1 = i1, w.kind = band == 2 && n == BK ? 2 : 1;
    if (A.bl)  // (without lists rt is not read)
      for (int r = 0; r < BQ; ++r) w.rt[r] = fill;
    return &w;
  };
  if (!A.bl) {
    for (int64_t i0 = 0; i0 < A.Lq; i0 += BQ) add(i0, -1);
    return;
  }
  const QkvBlockLists& L = *A.bl;
  const int64_t J = j0 / L.bk;
  int64_t last = -1;  // the query block of out.back(), or -1
  Visit* cur = nullptr;
  for (int64_t e = L.k_ptr[J]; e < L.k_ptr[J + 1]; ++e) {
    const int64_t r0 = L.k_qb[e] * L.bq, r1 = std::min<int64_t>(A.Lq, r0 + L.bq);
    const int32_t t = L.k_tile[e];
    for (int64_t c = r0 / BQ; c * BQ < r1; ++c) {
      if (c != last) {  // a new query block: every row unlisted until an entry lists it
        last = c;
        cur = add(c * BQ, -2);
      }
      if (!cur) continue;  // outside the band
      for (int64_t i = std::max(r0, cur->i0); i < std::min(r1, cur->i1); ++i) cur->rt[i - cur->i0] = t;
    }
  }
  // Rows of a tile whose bits for these keys are all clear for every (b, h) of the mask see
  // nothing here (-2); rows whose bits are all set see all of them (-1), so that a block with
  // no row left is not visited and one with every row full (in the band) runs unmasked: a
  // mask block of 128 x 128 keys is finer in our blocks of 64 x 64.
  const uint64_t valid = n == 64 ? ~uint64_t(0) : (uint64_t(1) << n) - 1;
  const int64_t per_tile = L.bq * (L.bk / 8), per_mask = L.ntiles * per_tile;
  size_t keep = 0;
  for (size_t x = 0; x < out.size(); ++x) {
    Visit& w = out[x];
    bool none = true, full = true;
    for (int64_t r = 0; r < w.i1 - w.i0; ++r) {
      if (w.rt[r] >= 0) {
        uint64_t any = 0, all = ~uint64_t(0);
        const uint8_t* row = L.tiles + w.rt[r] * per_tile + (w.i0 + r) % L.bq * (L.bk / 8) + (j0 % L.bk) / 8;
        for (int64_t m = 0; m < L.Bm * L.Hm; ++m) {
          uint64_t bits = 0;
          for (int y = 0; y < 8; ++y) bits |= uint64_t(row[m * per_mask + y]) << (8 * y);
          any |= bits, all &= bits;
        }
        if (!(any & valid))
          w.rt[r] = -2;
        else if ((all & valid) == valid)
          w.rt[r] = -1;
      }
      none = none && w.rt[r] == -2;
      full = full && w.rt[r] == -1;
    }
    if (none) continue;
    if (!full) w.kind = 1;
    if (keep != x) out[keep] = w;
    ++keep;
  }
  out.resize(keep);
}

// Plans the walk of every key block into A.step_at, A.steps and A.rts.
void plan_steps(Args& A) {
  const int64_t nkb = (A.Lk + BK - 1) / BK;
  std::vector<Visit> vis;
  A.step_at.assign(nkb + 1, 0);
  A.steps.clear(), A.rts.clear();
  for (int64_t kb = 0; kb < nkb; ++kb) {
    visits(A, kb, vis);
    for (const Visit& w : vis) {
      bool all_full = true;
      for (int64_t r = 0; r < w.i1 - w.i0 && A.bl; ++r) all_full = all_full && w.rt[r] == -1;
      int64_t rt = -1;
      if (!all_full) {
        rt = int64_t(A.rts.size());
        A.rts.insert(A.rts.end(), w.rt, w.rt + BQ);
      }
      A.steps.push_back(Step{w.i0, w.i1, rt, w.kind});
    }
    A.step_at[kb + 1] = int64_t(A.steps.size());
  }
}

struct Scratch {
  float *kf, *kt, *vt, *s, *dp, *dk, *dv;
  // bf16 dot product only, in words of two bfloat16: kp, vp (Dp2/2 or Dvp2/2, BK) K^T and V^T
  // paired along the head; k2 (BK/2, Dp) K paired along keys; p2, ds2 (BQ/2, BK) P and dS paired
  // along rows; dsr (BQ, BK/2) dS paired along keys.
  uint32_t *kp, *vp, *k2, *p2, *ds2, *dsr;
  void* mem;
  explicit Scratch(const Args& A) {
    const int64_t n = BK * A.Dp * 3 + BK * A.Dvp * 2 + 2 * BQ * BK + (A.Dp2 + A.Dvp2) * BK / 2 + 64 +
                      BK * A.Dp / 2 + 3 * BQ * BK / 2;
    mem = std::aligned_alloc(64, ((n * 4 + 63) / 64) * 64);
    float* p = (float*)mem;
    kf = p, p += BK * A.Dp;
    kt = p, p += BK * A.Dp;
    dk = p, p += BK * A.Dp;
    vt = p, p += BK * A.Dvp;
    dv = p, p += BK * A.Dvp;
    s = p, p += BQ * BK;
    dp = p, p += BQ * BK;
    kp = (uint32_t*)p, p += A.Dp2 * BK / 2;
    vp = (uint32_t*)p, p += A.Dvp2 * BK / 2;
    k2 = (uint32_t*)p, p += BK * A.Dp / 2;
    p2 = (uint32_t*)p, p += BQ * BK / 2;
    ds2 = (uint32_t*)p, p += BQ * BK / 2;
    dsr = (uint32_t*)p;
  }
  ~Scratch() { std::free(mem); }
};

// The keys of [j0, j0 + n) (bit c = key j0 + c, n <= BK = 64) that row i of query head hq
// (batch row b) may see: its band, and with block lists its row state t (Visit::rt).
inline uint64_t row_bits(const Args& A, int64_t b, int64_t hq, int64_t i, int64_t j0, int64_t n, int32_t t) {
  if (t == -2) return 0;
  const int64_t lo = clampi(A.row_lo[i] - j0, 0, BK), hi = clampi(A.row_hi[i] - j0, 0, n);
  if (hi <= lo) return 0;
  uint64_t m = hi - lo == 64 ? ~uint64_t(0) : ((uint64_t(1) << (hi - lo)) - 1) << lo;
  if (t >= 0) {
    const QkvBlockLists& L = *A.bl;
    const int64_t bm = L.Bm == 1 ? 0 : b, hm = L.Hm == 1 ? 0 : hq;
    // Row i % bq of tile t, from byte (j0 % bk) / 8: the 8 bytes of this key block's 64 keys.
    const uint8_t* row = L.tiles + (((bm * L.Hm + hm) * L.ntiles + t) * L.bq + i % L.bq) * (L.bk / 8) + (j0 % L.bk) / 8;
    uint64_t w = 0;
    for (int x = 0; x < 8; ++x) w |= uint64_t(row[x]) << (8 * x);
    m &= w;
  }
  return m;
}

// One query block [i0, i1) of query head hq against the loaded key block [j0, j0 + n); kind 1
// masks each row's scores by row_bits (rt: the rows' states, or null for the band alone).
//
// Narrowed partial blocks (kind 1): the rows are taken in strips of RS = 16, and each strip
// computes only the 16-key chunks [ca, cz) of the block that some row of the strip has a bit in
// (the OR of its rows' row_bits); the rest of its rows of P and dS are zeros. dV and dK then
// sum, per chunk, only over the strips that computed it (their hull of rows), and dQ, per strip,
// only over its chunks. A triangle of a causal diagonal or a window's far edge is 10 of the 16
// (strip, chunk) cells; a window's edge mid-block, the last query or key block, rows that see
// nothing (a BlockMask's) fewer still. Only exact zeros are left out of each sum (masked P and
// dS), each sum still starts from zero (with AMX: from the accumulator, in steps aligned as a whole
// block's, the steps left out adding exact zeros), so the gradients are the same bits as the whole
// block's. A block whose cells are all needed runs whole.
#ifndef QKV_BWD_NARROW
#define QKV_BWD_NARROW 1  // 0: every partial block computed whole (tests compare the two builds' bits)
#endif
template <int KIND>
void tile(const Args& A, Scratch& W, int64_t b, int64_t hq, int64_t i0, int64_t i1, int64_t j0, int64_t n, int kind,
          const int32_t* rt, float* dq) {
  const int64_t Dp = A.Dp, Dvp = A.Dvp, bq = i1 - i0;
  const int64_t row = (b * A.Hq + hq) * A.Lq + i0;
  // float32 path only: the rows of q (row stride qld) and dO (row stride Dvp), copies or in place.
  const float* qf = A.q_direct ? (const float*)A.q + b * A.qst[0] + hq * A.qst[1] + i0 * A.qst[2]
                               : (A.qf ? A.qf + row * Dp : nullptr);
  const int64_t qld = A.q_direct ? A.qst[2] : Dp;
  const float* dof = A.do_direct ? (const float*)A.dout + row * A.Dv : (A.dof ? A.dof + row * Dvp : nullptr);
  const float* lse = A.lse_s + row;
  const float* lse_lo = A.lse_lo ? A.lse_lo + row : nullptr;
  const float* delta = A.delta + row;
  float* s = W.s;
  float* dp = W.dp;
  // kind 1: each row's keys (bit c = key j0 + c), and each strip's chunks [ca, cz) (ca == cz: none).
  constexpr int RS = 16, NCH = BK / 16, NS = BQ / RS;
  const int ns = int((bq + RS - 1) / RS);
  uint64_t mk[BQ];
  int ca[NS], cz[NS];
  bool narrow = false;
  if (kind == 1) {
    int cells = 0;
    for (int sp = 0; sp < ns; ++sp) {
      uint64_t any = 0;
      for (int64_t r = sp * RS; r < std::min<int64_t>(bq, sp * RS + RS); ++r)
        any |= mk[r] = row_bits(A, b, hq, i0 + r, j0, n, rt ? rt[r] : -1);
      ca[sp] = any ? __builtin_ctzll(any) / 16 : 0;
      cz[sp] = any ? (63 - __builtin_clzll(any)) / 16 + 1 : 0;
      cells += cz[sp] - ca[sp];
    }
    narrow = QKV_BWD_NARROW && cells < ns * NCH;
  }
  if (!narrow)
    for (int sp = 0; sp < ns; ++sp) ca[sp] = 0, cz[sp] = NCH;
  const uint32_t *q16 = nullptr, *do16 = nullptr;
  int64_t q16ld = 0;
#ifdef __AVX512BF16__
  if (KIND == 1 && A.bf16dot) {
    q16 = A.q16_direct ? (const uint32_t*)((const uint16_t*)A.q + b * A.qst[0] + hq * A.qst[1] + i0 * A.qst[2])
                       : (const uint32_t*)(A.q16 + row * A.Dp2);
    q16ld = A.q16_direct ? A.qst[2] / 2 : A.Dp2 / 2;  // row stride in words
    do16 = A.do16_direct ? (const uint32_t*)((const uint16_t*)A.dout + row * A.Dv)
                         : (const uint32_t*)(A.do16 + row * A.Dvp2);
  }
#endif
  // S = Q K^T and dP = dO V^T for rows [r0, r1) and keys [k0, k1) of the block.
  auto scores = [&](int64_t r0, int64_t r1, int64_t k0, int64_t k1) {
#ifdef __AVX512BF16__
    if (KIND == 1 && A.bf16dot) {
      gemm_dot<false>(A.amx, r1 - r0, k1 - k0, A.Dp2 / 2, q16 + r0 * q16ld, q16ld, 1, W.kp + k0, BK, s + r0 * BK + k0, BK);
      gemm_dot<false>(A.amx, r1 - r0, k1 - k0, A.Dvp2 / 2, do16 + r0 * (A.Dvp2 / 2), A.Dvp2 / 2, 1, W.vp + k0, BK,
                       dp + r0 * BK + k0, BK);
      return;
    }
#endif
    gemm<false, SC>(r1 - r0, k1 - k0, Dp, qf + r0 * qld, qld, 1, W.kt + k0, BK, s + r0 * BK + k0, BK);
    gemm<false>(r1 - r0, k1 - k0, Dvp, dof + r0 * Dvp, Dvp, 1, W.vt + k0, BK, dp + r0 * BK + k0, BK);
  };
  for (int sp = 0; sp < ns;) {  // strips with the same chunks in one call
    int end = sp + 1;
    while (end < ns && ca[end] == ca[sp] && cz[end] == cz[sp]) ++end;
    if (cz[sp] > ca[sp]) scores(sp * RS, std::min<int64_t>(bq, end * RS), 16 * ca[sp], 16 * cz[sp]);
    sp = end;
  }
  // P = exp(scale S - lse) and dS = P (dP - delta) over each row's strip's chunks [c0, c1), zeros
  // elsewhere (WHOLE: every chunk, constant bounds, as before the narrowing).
  const v16 sc = splat(A.scale);
  auto probs = [&](auto whole) {
    for (int64_t r = 0; r < bq; ++r) {
      float* sr = s + r * BK;
      float* dr = dp + r * BK;
      const int c0 = whole ? 0 : 16 * ca[r / RS], c1 = whole ? BK : 16 * cz[r / RS];
      const v16 l = splat(lse[r]), dl = splat(delta[r]);
      // lse's low part, subtracted after its high part (t - lse is exact near the row's max): at large
      // logits a float lse is too coarse (ulp(26685) = 0.002: P of a row's top keys off by 1e-3).
      const float lo = lse_lo && std::isfinite(lse[r]) ? lse_lo[r] : 0.0f;
      if (!whole) {
        for (int c = 0; c < c0; c += 16) st(sr + c, splat(0.0f)), st(dr + c, splat(0.0f));
        for (int c = c1; c < BK; c += 16) st(sr + c, splat(0.0f)), st(dr + c, splat(0.0f));
      }
#if QKV_VW < 16  // the same on vectors of VW floats, and the mask by lanes
      {
        const vw scw = splat_as<vw>(A.scale), lw = splat_as<vw>(lse[r]), dlw = splat_as<vw>(delta[r]);
        const uint64_t m = kind == 1 ? mk[r] : ~uint64_t(0);
        iwv iota{};
        for (int t = 0; t < VW; ++t) iota[t] = t;
        for (int c = c0; c < c1; c += VW) {
          vw t = *(const vwu*)(sr + c) * scw;  // the scaled score, rounded as the forward rounds it
          keep_rounded(t);
          vw p = vexp_nonpos<vw>((t - lw) - lo);
          vw d = p * (*(const vwu*)(dr + c) - dlw);
          if (m != ~uint64_t(0)) {  // zero what row i0 + r may not see (and the padding keys)
            const iwv on = (((iwv{} + (int32_t)(uint32_t)(m >> c)) >> iota) & 1) != 0;
            p = on ? p : splat_as<vw>(0.0f);
            d = on ? d : splat_as<vw>(0.0f);
          }
          *(vwu*)(sr + c) = p;
          *(vwu*)(dr + c) = d;
        }
      }
      continue;
#endif
      for (int c = c0; c < c1; c += 16) {
        v16 t = ld(sr + c) * sc;  // the scaled score, rounded as the forward rounds it (not fused with - l)
        keep_rounded(t);
        v16 p = vexp((t - l) - lo);
        st(sr + c, p);
        st(dr + c, p * (ld(dr + c) - dl));
      }
      if (kind == 1) {  // zero what row i0 + r may not see (and the padding keys)
        const uint64_t m = mk[r];
        if (m != ~uint64_t(0)) {
#ifdef __AVX512F__
          for (int c = c0; c < c1; c += 16) {
            const __mmask16 keep = __mmask16(m >> c);
            _mm512_storeu_ps(sr + c, _mm512_maskz_mov_ps(keep, _mm512_loadu_ps(sr + c)));
            _mm512_storeu_ps(dr + c, _mm512_maskz_mov_ps(keep, _mm512_loadu_ps(dr + c)));
          }
#else
          for (int c = c0; c < c1; ++c)
            if (!((m >> c) & 1)) sr[c] = dr[c] = 0.0f;
#endif
        }
      }
    }
  };
  if (narrow)
    probs(std::false_type{});
  else
    probs(std::true_type{});
  // The products over the computed cells: dV += P^T dO and dK += dS^T Q per run of chunks with the
  // same hull of strips [s0, s1) (rows [16 s0, 16 s1)), dQ += dS K per run of strips with the same chunks.
  int h0[NCH], h1[NCH];
  for (int c = 0; c < NCH; ++c) {
    h0[c] = ns, h1[c] = 0;
    for (int sp = 0; sp < ns; ++sp)
      if (ca[sp] <= c && c < cz[sp]) h0[c] = std::min(h0[c], sp), h1[c] = sp + 1;
  }
  // f(c, end) for each run [c, end) of chunks with the same non-empty hull of strips;
  // g(sp, end) for each run [sp, end) of strips with the same non-empty chunks.
  auto chunk_runs = [&](auto f) {
    for_runs(NCH, [&](int x, int y) { return h0[x] == h0[y] && h1[x] == h1[y]; }, [&](int c, int end) {
      if (h1[c] > h0[c]) f(c, end);
    });
  };
  auto strip_runs = [&](auto g) {
    for_runs(ns, [&](int x, int y) { return ca[x] == ca[y] && cz[x] == cz[y]; }, [&](int sp, int end) {
      if (cz[sp] > ca[sp]) g(sp, end);
    });
  };
#ifdef __AVX512BF16__
  if (KIND == 1 && A.bf16dot) {
    // P and dS rounded to bfloat16 (as FA-2 does on GPUs) for the three products that take them.
    const int64_t pairs = (bq + 1) / 2;
    const __m512 zero = _mm512_setzero_ps();
    for (int64_t pr = 0; pr < pairs; ++pr) {
      const float *s0 = s + 2 * pr * BK, *d0 = dp + 2 * pr * BK;
      const bool two = 2 * pr + 1 < bq;
      for (int c = 0; c < BK; c += 16) {
        _mm512_storeu_si512(W.p2 + pr * BK + c, pair_rows(_mm512_loadu_ps(s0 + c), two ? _mm512_loadu_ps(s0 + BK + c) : zero));
        _mm512_storeu_si512(W.ds2 + pr * BK + c, pair_rows(_mm512_loadu_ps(d0 + c), two ? _mm512_loadu_ps(d0 + BK + c) : zero));
      }
    }
    for (int64_t r = 0; r < bq; ++r)
      for (int c = 0; c < BK; c += 32)
        _mm512_storeu_si512(W.dsr + r * (BK / 2) + c / 2,
                            (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(dp + r * BK + c + 16), _mm512_loadu_ps(dp + r * BK + c)));
    const uint32_t* do2 = A.do2 + ((b * A.Hq + hq) * A.Lq2 + i0 / 2) * Dvp;
    const uint32_t* q2 = A.q2 + ((b * A.Hq + hq) * A.Lq2 + i0 / 2) * Dp;
    chunk_runs([&](int c, int end) {
      const int64_t k0 = 16 * c, kn = 16 * (end - c);
      int64_t p0 = h0[c] * RS / 2, np = (std::min<int64_t>(bq, h1[c] * RS) - h0[c] * RS + 1) / 2;
      if (A.amx) {  // whole steps of 16 pairs from the block's first, as a whole block's (zeros of P and dS added):
        // the tiles' sums are then grouped as the unnarrowed block's, and the gradients the same bits
        const int64_t pe = std::min(pairs, (p0 + np + 15) / 16 * 16);
        p0 = p0 / 16 * 16, np = pe - p0;
      }
      gemm_dot<true>(A.amx, kn, Dvp, np, W.p2 + p0 * BK + k0, 1, BK, do2 + p0 * Dvp, Dvp, W.dv + k0 * Dvp, Dvp);  // dV += P^T dO
      gemm_dot<true>(A.amx, kn, Dp, np, W.ds2 + p0 * BK + k0, 1, BK, q2 + p0 * Dp, Dp, W.dk + k0 * Dp, Dp);       // dK += dS^T Q
    });
    strip_runs([&](int sp, int end) {
      // With the tiles, whole steps of 16 pairs (two chunks) from the block's first, as above.
      const int c0 = A.amx ? ca[sp] & ~1 : ca[sp], c1 = A.amx ? (cz[sp] + 1) & ~1 : cz[sp];
      const int64_t r0 = sp * RS, r1 = std::min<int64_t>(bq, end * RS), k0 = 16 * c0;
      gemm_dot<true>(A.amx, r1 - r0, Dp, 8 * (c1 - c0), W.dsr + r0 * (BK / 2) + k0 / 2, BK / 2, 1,
                      W.k2 + k0 / 2 * Dp, Dp, dq + r0 * Dp, Dp);  // dQ += dS K
    });
    return;
  }
#endif
  chunk_runs([&](int c, int end) {
    const int64_t k0 = 16 * c, kn = 16 * (end - c), r0 = h0[c] * RS, r1 = std::min<int64_t>(bq, h1[c] * RS);
    gemm<true>(kn, Dvp, r1 - r0, s + r0 * BK + k0, 1, BK, dof + r0 * Dvp, Dvp, W.dv + k0 * Dvp, Dvp);  // dV += P^T dO
    gemm<true>(kn, Dp, r1 - r0, dp + r0 * BK + k0, 1, BK, qf + r0 * qld, qld, W.dk + k0 * Dp, Dp);      // dK += dS^T Q
  });
  strip_runs([&](int sp, int end) {
    const int64_t r0 = sp * RS, r1 = std::min<int64_t>(bq, end * RS), k0 = 16 * ca[sp];
    gemm<true>(r1 - r0, Dp, 16 * (cz[sp] - ca[sp]), dp + r0 * BK + k0, BK, 1, W.kf + k0 * Dp, Dp, dq + r0 * Dp, Dp);  // dQ += dS K
  });
}

// One work item: batch row b, kv head h, key blocks [kb0, kb1) of split `split`.
template <int KIND>
void run_item(const Args& A, Scratch& W, int64_t b, int64_t h, int64_t split) {
  const int64_t Dp = A.Dp, Dvp = A.Dvp, D = A.D, Dv = A.Dv;
  const int64_t kb0 = A.split_at[split], kb1 = A.split_at[split + 1];
  const void* kbase = (const char*)A.k + (b * A.kst[0] + h * A.kst[1]) * (KIND == 0 ? 4 : 2);
  const void* vbase = (const char*)A.v + (b * A.vst[0] + h * A.vst[1]) * (KIND == 0 ? 4 : 2);
  const int64_t es = KIND == 0 ? 4 : 2;
  for (int64_t kb = kb0; kb < kb1; ++kb) {
    const int64_t j0 = kb * BK, n = std::min<int64_t>(BK, A.Lk - j0);
    const Step *step0 = A.steps.data() + A.step_at[kb], *step1 = A.steps.data() + A.step_at[kb + 1];
    const bool any = step1 > step0;
    if (any && !(KIND == 1 && A.bf16dot)) {
      // Keys and values of the block: float32 rows (kf), transposed (kt, vt), zero-padded.
      for (int64_t c = 0; c < BK; ++c) {
        float* kr = W.kf + c * Dp;
        if (c < n)
          widen_row<KIND>((const char*)kbase + (j0 + c) * A.kst[2] * es, D, Dp, kr);
        else
          std::memset(kr, 0, sizeof(float) * Dp);
        for (int64_t d = 0; d < Dp; ++d) W.kt[d * BK + c] = kr[d];
      }
      float* vrow = W.dv;  // dv is zeroed below; borrowed as a one-row buffer here
      for (int64_t c = 0; c < BK; ++c) {
        if (c < n)
          widen_row<KIND>((const char*)vbase + (j0 + c) * A.vst[2] * es, Dv, Dvp, vrow);
        else
          std::memset(vrow, 0, sizeof(float) * Dvp);
        for (int64_t d = 0; d < Dvp; ++d) W.vt[d * BK + c] = vrow[d];
      }
    }
#ifdef __AVX512BF16__
    if (any && KIND == 1 && A.bf16dot) {  // the raw bfloat16 values, paired: kp[d/2][c][d&1], k2[c/2][d][c&1]
      uint16_t *kp = (uint16_t*)W.kp, *vp = (uint16_t*)W.vp, *k2 = (uint16_t*)W.k2;
      for (int64_t c = 0; c < BK; ++c) {
        const uint16_t* kr = c < n ? (const uint16_t*)kbase + (j0 + c) * A.kst[2] : nullptr;
        const uint16_t* vr = c < n ? (const uint16_t*)vbase + (j0 + c) * A.vst[2] : nullptr;
        if (kr && !(D & 1)) {  // whole words: one 32-bit copy per pair
          for (int64_t w = 0; w < D / 2; ++w) std::memcpy(W.kp + w * BK + c, kr + 2 * w, 4);
        } else {
          for (int64_t d = 0; d < A.Dp2; ++d) kp[(d / 2) * 2 * BK + 2 * c + (d & 1)] = kr && d < D ? kr[d] : 0;
        }
        if (vr && !(Dv & 1)) {
          for (int64_t w = 0; w < Dv / 2; ++w) std::memcpy(W.vp + w * BK + c, vr + 2 * w, 4);
        } else {
          for (int64_t d = 0; d < A.Dvp2; ++d) vp[(d / 2) * 2 * BK + 2 * c + (d & 1)] = vr && d < Dv ? vr[d] : 0;
        }
        uint16_t* k2c = k2 + (c / 2) * Dp * 2 + (c & 1);
        if (kr) {
          for (int64_t d = 0; d < D; ++d) k2c[2 * d] = kr[d];
          for (int64_t d = D; d < Dp; ++d) k2c[2 * d] = 0;
        } else {
          for (int64_t d = 0; d < Dp; ++d) k2c[2 * d] = 0;
        }
      }
    }
#endif
    std::memset(W.dk, 0, sizeof(float) * BK * Dp);
    std::memset(W.dv, 0, sizeof(float) * BK * Dvp);
    if (any) {
      for (int64_t g = 0; g < A.G; ++g) {
        const int64_t hq = h * A.G + g;
        float* dqh = A.dqp + ((split * A.B + b) * A.Hq + hq) * A.Lq * Dp;
        for (const Step* w = step0; w < step1; ++w)
          tile<KIND>(A, W, b, hq, w->i0, w->i1, j0, n, w->kind, w->rt < 0 ? nullptr : A.rts.data() + w->rt,
                     dqh + w->i0 * Dp);
      }
    }
    // dK = scale * (sum over the group of dS^T Q), dV = sum of P^T dO, for the block's n keys.
    float* dk = A.dk + ((b * A.Hkv + h) * A.Lk + j0) * D;
    float* dv = A.dv + ((b * A.Hkv + h) * A.Lk + j0) * Dv;
    for (int64_t c = 0; c < n; ++c) {
      for (int64_t d = 0; d < D; ++d) dk[c * D + d] = A.scale * W.dk[c * Dp + d];
      std::memcpy(dv + c * Dv, W.dv + c * Dvp, sizeof(float) * Dv);
    }
  }
}

template <typename F>
void parallel(int nthreads, int64_t items, F&& f) {
  std::atomic<int64_t> next{0};
  auto worker = [&](int t) {
    for (int64_t it = next.fetch_add(1); it < items; it = next.fetch_add(1)) f(t, it);
  };
  if (nthreads <= 1 || items <= 1) {
    worker(0);
    return;
  }
  on_threads(nthreads, worker);
}

template <int KIND>
void prepare(Args& A, int nthreads) {
  // Per row: float32 (or bfloat16 and paired) copies of q and dO, delta = rowsum(dO * O),
  // lse_s, and the row's dQ accumulators zeroed (the buffers are not initialised: each row is
  // written here whole, on the thread that will mostly use it).
  const int64_t rows = A.B * A.Hq * A.Lq, per = rows * A.Dp;
  const int64_t chunk = 256;
  parallel(nthreads, (rows + chunk - 1) / chunk, [&](int, int64_t it) {
    std::vector<float> o(A.Dvp), do_row(A.Dvp);
    for (int64_t r = it * chunk; r < std::min(rows, (it + 1) * chunk); ++r) {
      const int64_t i = r % A.Lq, bh = r / A.Lq, hq = bh % A.Hq, b = bh / A.Hq;
      const int64_t es = KIND == 0 ? 4 : 2;
      const void* qr = (const char*)A.q + (b * A.qst[0] + hq * A.qst[1] + i * A.qst[2]) * es;
      if (A.qf) widen_row<KIND>(qr, A.D, A.Dp, A.qf + r * A.Dp);
      const void* dr = (const char*)A.dout + r * A.Dv * es;
      const float* dof = (const float*)dr;  // in place: Dv == Dvp, float32
      if (!A.do_direct) {
        float* w = A.dof ? A.dof + r * A.Dvp : do_row.data();
        widen_row<KIND>(dr, A.Dv, A.Dvp, w);
        dof = w;
      }
      for (int64_t s = 0; s < A.nsplit; ++s) std::memset(A.dqp + s * per + r * A.Dp, 0, sizeof(float) * A.Dp);
      widen_row<KIND>((const char*)A.out + r * A.Dv * es, A.Dv, A.Dvp, o.data());
      // delta cancels against dP = dO . v_j, almost exactly where a row sees few keys and
      // exactly where it sees one (O = v_j: dS = 0). The float32 path forms it with dP's own
      // arithmetic (the micro kernel's multiply-adds in order, in KC-term partial sums), so
      // that O = v_j gives dP - delta = 0 exactly; the bfloat16 products round differently,
      // and there delta is formed in float64.
      if (!A.bf16dot) {
        float x = 0.0f;
        for (int64_t d0 = 0; d0 < A.Dvp; d0 += KC) {
          float acc = 0.0f;
          for (int64_t d = d0; d < std::min(A.Dvp, d0 + KC); ++d) {
#if QKV_FMA
            acc = std::fma(dof[d], o[d], acc);  // fused, as the micro kernel's (explicit: GCC would
#else                                           // vectorise the products and round them)
            acc += dof[d] * o[d];
#endif
          }
          x = d0 == 0 ? acc : x + acc;
        }
        A.delta[r] = x;
      } else {
        double x = 0.0;
        for (int64_t d = 0; d < A.Dv; ++d) x += double(dof[d]) * double(o[d]);
        A.delta[r] = float(x);
      }
      const float l = A.lse[r];
      A.lse_s[r] = l == NEG_INF ? INFINITY : l;
      // The gradient through lse: d lse_i / d s_ij = p_ij, so dS_ij = P_ij (dP_ij - D_i + dlse_i);
      // D_i - dlse_i replaces D_i. A row that saw no key has P = 0 (and its dlse may be anything).
      if (l == NEG_INF)
        A.delta[r] = 0.0f;
      else if (A.d_lse)
        A.delta[r] -= A.d_lse[r];
      if (A.bf16dot) {
        const uint16_t *q16 = (const uint16_t*)qr, *d16 = (const uint16_t*)dr;
        if (A.q16)
          for (int64_t d = 0; d < A.Dp2; ++d) A.q16[r * A.Dp2 + d] = d < A.D ? q16[d] : 0;
        if (A.do16)
          for (int64_t d = 0; d < A.Dvp2; ++d) A.do16[r * A.Dvp2 + d] = d < A.Dv ? d16[d] : 0;
        // Paired rows: word (i/2, d) holds rows i & ~1 and i | 1 (zeros past D, and past Lq when odd).
        uint16_t* q2 = (uint16_t*)(A.q2 + (bh * A.Lq2 + i / 2) * A.Dp) + (i & 1);
        uint16_t* do2 = (uint16_t*)(A.do2 + (bh * A.Lq2 + i / 2) * A.Dvp) + (i & 1);
        for (int64_t d = 0; d < A.Dp; ++d) q2[2 * d] = d < A.D ? q16[d] : 0;
        for (int64_t d = 0; d < A.Dvp; ++d) do2[2 * d] = d < A.Dv ? d16[d] : 0;
        if (i == A.Lq - 1 && !(i & 1)) {  // an odd length: the last pair's second row is zeros
          for (int64_t d = 0; d < A.Dp; ++d) q2[2 * d + 1] = 0;
          for (int64_t d = 0; d < A.Dvp; ++d) do2[2 * d + 1] = 0;
        }
      }
    }
  });
}

// Returns 0, or 3 when a thread's scratch cannot be allocated (checked before any work: an
// exception or a null buffer inside the parallel region would end the process).
template <int KIND>
int run_all(Args& A, int nthreads) {
  std::vector<std::unique_ptr<Scratch>> scratch(nthreads);
  for (auto& sc : scratch) {
    sc.reset(new (std::nothrow) Scratch(A));
    if (!sc || !sc->mem) return 3;
  }
  prepare<KIND>(A, nthreads);
  const int64_t items = A.B * A.Hkv * A.nsplit;
  parallel(nthreads, items, [&](int t, int64_t it) {
    const int64_t split = it % A.nsplit, bh = it / A.nsplit;
#if QKV_AMX
    if (A.amx) amx_begin();  // this thread's tiles configured
#endif
    run_item<KIND>(A, *scratch[t], bh / A.Hkv, bh % A.Hkv, split);
#if QKV_AMX
    if (A.amx) amx_end();
#endif
  });
  scratch.clear();
  // dq = scale * (sum of the splits' accumulators), cropped to D (in place where dq was the one).
  const int64_t rows = A.B * A.Hq * A.Lq, per = rows * A.Dp, chunk = 256;
  parallel(nthreads, (rows + chunk - 1) / chunk, [&](int, int64_t it) {
    const int64_t r0 = it * chunk, r1 = std::min(rows, (it + 1) * chunk);
    if (A.dqp == A.dq) {  // one split, D == Dp: dq holds the sums
      for (int64_t x = r0 * A.D; x < r1 * A.D; ++x) A.dq[x] *= A.scale;
      return;
    }
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t d = 0; d < A.D; ++d) {
        float x = 0.0f;
        for (int64_t s = 0; s < A.nsplit; ++s) x += A.dqp[s * per + r * A.Dp + d];
        A.dq[r * A.D + d] = A.scale * x;
      }
  });
  return 0;
}

// Splits of each (batch row, kv head)'s key blocks: the fewest (at most the thread count, as
// each split costs a dQ buffer) that give the threads equal shares (a multiple of the thread
// count) or at least 4 items each; cut where the count of band tiles is even.
void plan_splits(Args& A, int nthreads) {
  const int64_t nkb = (A.Lk + BK - 1) / BK, items = A.B * A.Hkv;
  int64_t S = 1;
  while (S < nthreads && (items * S) % nthreads != 0 && items * S < 4 * nthreads) ++S;
  if (S > nkb) S = nkb;
  if (S < 1) S = 1;
  std::vector<int64_t> work(nkb + 1, 0);  // prefix sums of tiles per key block
  for (int64_t kb = 0; kb < nkb; ++kb) work[kb + 1] = work[kb] + 1 + A.step_at[kb + 1] - A.step_at[kb];
  A.nsplit = S;
  A.split_at.assign(S + 1, nkb);
  A.split_at[0] = 0;
  int64_t kb = 0;
  for (int64_t s = 1; s < S; ++s) {
    const int64_t target = work[nkb] * s / S;
    while (kb < nkb && work[kb] < target) ++kb;
    A.split_at[s] = kb;
  }
}

}  // namespace

extern "C" {

static int flash_bwd(int kind, int64_t B, int64_t Hq, int64_t Hkv, int64_t Lq, int64_t Lk, int64_t D, int64_t Dv,
                     const void* q, const int64_t* qst, const void* k, const int64_t* kst, const void* v,
                     const int64_t* vst, const void* out, const void* dout, const float* lse, const float* d_lse,
                     float scale, int64_t left, int64_t right, int64_t offset, float* dq, float* dk, float* dv,
                     int threads, const QkvBlockLists* blocks, const float* lse_lo) {
  if (kind != 0 && kind != 1) return 1;
  if (D < 1 || D > 256 || Dv < 1 || Dv > 256 || Hkv < 1 || Hq % Hkv != 0) return 2;
  if (blocks && (blocks->bk != 2 * BK || blocks->bq < 1 || blocks->nq != (Lq + blocks->bq - 1) / blocks->bq ||
                 blocks->nk != (Lk + blocks->bk - 1) / blocks->bk || (blocks->Bm != 1 && blocks->Bm != B) ||
                 (blocks->Hm != 1 && blocks->Hm != Hq) || blocks->ntiles < 0))
    return 4;
  if (threads < 1) threads = 1;
  Args A;
  A.B = B, A.Hq = Hq, A.Hkv = Hkv, A.G = Hq / Hkv, A.Lq = Lq, A.Lk = Lk, A.D = D, A.Dv = Dv;
  A.Dp = (D + 15) / 16 * 16, A.Dvp = (Dv + 15) / 16 * 16;
  A.Dp2 = (D + 1) / 2 * 2, A.Dvp2 = (Dv + 1) / 2 * 2;
  A.q = q, A.k = k, A.v = v, A.out = out, A.dout = dout, A.lse = lse, A.scale = scale;
  A.d_lse = d_lse, A.bl = blocks, A.lse_lo = lse_lo;
  for (int t = 0; t < 4; ++t) A.qst[t] = qst[t], A.kst[t] = kst[t], A.vst[t] = vst[t];
  A.left = left, A.right = right, A.offset = offset;
  A.dq = dq, A.dk = dk, A.dv = dv;
  if (B == 0 || Hq == 0) return 0;
  if (Lk == 0 || Lq == 0) {
    if (Lq) std::memset(dq, 0, sizeof(float) * B * Hq * Lq * D);  // (the pointers of empty tensors may be null)
    if (Lk) std::memset(dk, 0, sizeof(float) * B * Hkv * Lk * D);
    if (Lk) std::memset(dv, 0, sizeof(float) * B * Hkv * Lk * Dv);
    return 0;
  }
  A.row_lo.resize(Lq), A.row_hi.resize(Lq);
  for (int64_t i = 0; i < Lq; ++i) {
    const int64_t pos = i + offset;
    const int64_t lo = left < 0 ? 0 : clampi(pos - left, 0, Lk);
    const int64_t hi = right < 0 ? Lk : clampi(pos + right + 1, 0, Lk);
    A.row_lo[i] = lo, A.row_hi[i] = hi > lo ? hi : lo;
  }
  plan_steps(A);
  plan_splits(A, threads);
  const int64_t rows = B * Hq * Lq;
  bool bf16dot = false;
#ifdef __AVX512BF16__
  bf16dot = kind == 1;
#endif
  // Work buffers, uninitialised (prepare writes every element that is read). dQ accumulates in
  // dq itself where there is one split and no padding of the head.
  A.Lq2 = (Lq + 1) / 2;
  const int64_t pairs = B * Hq * A.Lq2;
  const bool direct = A.nsplit == 1 && A.Dp == D;
  A.q_direct = kind == 0 && A.Dp == D;
  A.do_direct = kind == 0 && A.Dvp == Dv;
  std::unique_ptr<float[]> qf(bf16dot || A.q_direct ? nullptr : new float[rows * A.Dp]);
  std::unique_ptr<float[]> dof(bf16dot || A.do_direct ? nullptr : new float[rows * A.Dvp]);
  std::unique_ptr<float[]> delta(new float[rows]), lse_s(new float[rows]);
  std::unique_ptr<float[]> dqp(direct ? nullptr : new float[A.nsplit * rows * A.Dp]);
  A.bf16dot = bf16dot;
#if QKV_AMX
  A.amx = bf16dot && amx_state() > 0;
#else
  A.amx = false;
#endif
  A.q16_direct = bf16dot && D % 2 == 0 && qst[0] % 2 == 0 && qst[1] % 2 == 0 && qst[2] % 2 == 0 &&
                 (reinterpret_cast<uintptr_t>(q) & 3) == 0;
  A.do16_direct = bf16dot && Dv % 2 == 0 && (reinterpret_cast<uintptr_t>(dout) & 3) == 0;  // dO is contiguous
  std::unique_ptr<uint16_t[]> q16(bf16dot && !A.q16_direct ? new uint16_t[rows * A.Dp2] : nullptr);
  std::unique_ptr<uint16_t[]> do16(bf16dot && !A.do16_direct ? new uint16_t[rows * A.Dvp2] : nullptr);
  std::unique_ptr<uint32_t[]> q2(bf16dot ? new uint32_t[pairs * A.Dp] : nullptr);
  std::unique_ptr<uint32_t[]> do2(bf16dot ? new uint32_t[pairs * A.Dvp] : nullptr);  // std::bad_alloc: code 3
  A.qf = qf.get(), A.dof = dof.get(), A.delta = delta.get(), A.lse_s = lse_s.get();
  A.dqp = direct ? dq : dqp.get();
  A.q16 = q16.get(), A.do16 = do16.get(), A.q2 = q2.get(), A.do2 = do2.get();
  return kind == 0 ? run_all<0>(A, threads) : run_all<1>(A, threads);
}

// d_lse: float32 (B, Hq, Lq) gradient through lse, or null (zero). blocks: a BlockMask's block
// lists (key blocks of 128), or null for the band alone. lse_lo: float32 (B, Hq, Lq), the low part
// of the forward's lse (qkv_flash_fwd's lse_lo: lse + lse_lo is the row's log-sum-exp to about 1e-7
// absolute where a float lse keeps ulp(lse)), or null (0). Version 3 added lse_lo.
// Returns 0, 1 for an unknown kind, 2 for an unsupported head size, 3 when the work buffers cannot
// be allocated (no exception leaves the library: it would end the process), 4 for block lists
// that do not fit the call (key blocks other than 128, block counts or Bm/Hm that do not match).
int qkv_flash_bwd(int kind, int64_t B, int64_t Hq, int64_t Hkv, int64_t Lq, int64_t Lk, int64_t D, int64_t Dv,
                  const void* q, const int64_t* qst, const void* k, const int64_t* kst, const void* v,
                  const int64_t* vst, const void* out, const void* dout, const float* lse, const float* d_lse,
                  float scale, int64_t left, int64_t right, int64_t offset, float* dq, float* dk, float* dv,
                  int threads, const QkvBlockLists* blocks, const float* lse_lo) {
  try {
    return flash_bwd(kind, B, Hq, Hkv, Lq, Lk, D, Dv, q, qst, k, kst, v, vst, out, dout, lse, d_lse, scale, left,
                     right, offset, dq, dk, dv, threads, blocks, lse_lo);
  } catch (const std::bad_alloc&) {
    return 3;
  } catch (const std::length_error&) {  // a vector longer than the address space
    return 3;
  }
}

int qkv_flash_bwd_version() { return 3; }

// Where the bfloat16 backward's products run on AMX tiles: as qkv_flash_amx (flash_fwd_kernel.cpp).
int qkv_flash_bwd_amx() {
#if QKV_AMX
  return amx_state();
#else
  return 0;
#endif
}

// The errno of the kernel's request for the tile data, as qkv_flash_amx_errno.
int qkv_flash_bwd_amx_errno() {
#if QKV_AMX
  return amx_permission_errno();
#else
  return 0;
#endif
}

}  // extern "C"
