// qkv FlashAttention-2 forward kernel for CPUs: exact attention in one pass over the keys,
// memory linear in length.
//
// The algorithm is FlashAttention-2's forward (Dao, 2023, "FlashAttention-2: Faster Attention
// with Better Parallelism and Work Partitioning", Algorithm 1): a block of query rows keeps a
// running row maximum, a running row sum and a float32 output accumulator, and walks the key
// blocks that the causal/window band (and the block lists, below) let it see; each block's
// scores S = Q K^T are formed, the online softmax (Milakov & Gimelshein, 2018) rescales what
// was accumulated so far, and P V is added. Key blocks outside the band are skipped entirely;
// only blocks on the band's edges are masked, row by row, by qkv's band definition
// (AttentionSpec.band_edges): row i sees keys [lo_i, hi_i), lo_i = clamp(i + offset - left, 0,
// Lk), hi_i = max(lo_i, clamp(i + offset + right + 1, 0, Lk)), left/right -1 = unbounded.
// Within a key block only the chunks of 16 keys that some row of the item sees are computed
// (scores, softmax and P V over [c0, c1) of the 8 chunks), so a narrow band (a sliding window)
// pays for the keys it spans rounded to 16, not to the block of 128. On a partial block of the
// block lists (below) the same from the tile: the chunks from the first key any row of the item
// has a bit for to the last (the OR of the item's rows of the tile), and P V over exactly those
// keys; a block none of its rows has a bit in is skipped. A window given as a BlockMask so pays
// what the band does.
//
// Block lists (QkvBlockLists, built by engines/native_blocks.py from a BlockMask; the layout
// of FlexAttention's kv_indices, Dong et al., 2024): per query block of the mask, the key
// blocks to visit, each full (no mask applied: the unmasked path) or partial with a tile of
// bits per (mask batch row, mask head), 16 bits per 16 keys, used as the AVX-512 mask register
// of one blend. The band applies on top. Work items never straddle two query blocks of the
// mask (a mask block of bq rows is cut into equal pieces of at most the item size: 32 rows where
// at least half its listed blocks are partial, else 64), so an item walks one list; key blocks
// that no list names are neither packed nor read.
//
// Work items are (batch row, kv head, block of query positions) on torch's OpenMP threads
// (std::thread where the compiler has no OpenMP), the costliest (latest causal rows, or most
// listed blocks) first. The grouped query heads of a kv head (GQA, Ainslie et al., 2023) are
// the rows of one item: query head h reads kv head h / (Hq / Hkv), and a key block is read once
// for the whole group.
//
// Two phases. (1) Packing: each kv head's keys are laid out once per call in key blocks of
// BK = 128, transposed so that the 128 keys of one head dimension are 8 contiguous vectors
// (float32: kt[bh][block][d][128]; bfloat16 with AVX512-BF16: pairs of the head dimension
// interleaved, kp[bh][block][d/2][128][2], the operand layout of vdpbf16ps). Values: float32
// rows padded to a multiple of 16 (vp[bh][key][Dvp]); bfloat16 with AVX512-BF16: pairs of
// keys interleaved, vp2[bh][key/2][Dvp][2] (vdpbf16ps's operand for P V). Zero padding makes
// every head size 1..256 run the same vector code: the scores loop runs over d with vectors
// over keys, the values loop over keys (or key pairs) with vectors over the value dimension.
// Whole key blocks go 16 x 16 words at a time (transpose16: bfloat16 pairs, and float32 where D is
// a multiple of 16). As it packs the keys and values and loads each item's queries, the kernel
// keeps the largest |x| it reads (abs_bits), the extremes qkv's non-finite guard would otherwise
// read q, k and v again for (absmax below; core/finite.py): a window of 256 at 16384 tokens spent
// 4.6-4.9% of its call on that scan (docs/benchmarks.md, the seventeenth part).
// (2) Attention over the work items, from per-thread buffers (L1/L2-sized). float32 scores run
// piece by piece of SC = 64 terms of the dot product, each piece over all the rows of the item
// before the next (a piece of a key block is 64 x 128 floats, 32 KiB: it stays in L1 for the item's
// rows, where the whole block, 64 KiB at D = 128, was read from L2 once per tile of 3 rows), each
// piece's sum from zero and added to the score (see SC); P V runs 64 value columns at a time over
// all the rows (32 KiB of values), each block of keys summed from zero (see values_tile).
//
// Products are float32: float32 FMAs, or vdpbf16ps on bfloat16 pairs (exact products summed
// in float32) where the compiler targets __AVX512BF16__, else bfloat16 widened to float32.
// Scores are multiplied by `scale` after the dot product (as the reference does). With
// vdpbf16ps the probabilities P are rounded to bfloat16 (nearest even) for P V, as
// FlashAttention-2 does on GPUs (and as flash_bwd_kernel.cpp does): the row sums, and so the
// lse, are of P unrounded; the accumulators are float32. bfloat16 outputs are rounded to
// nearest-even once, at the end. A row that sees no key gets out 0 and lse -inf. The register
// tiles use AVX-512 intrinsics where the compiler targets __AVX512F__ (-march=native on such
// CPUs). Elsewhere (AVX2, SSE, ARM's NEON) narrow tiles of their own (scores_narrow, values_narrow,
// below) on vectors of 8 or 4 floats in GCC/Clang vector extensions, bfloat16 widened to float32 at
// packing, P V in float32, the softmax's exp by vexp_nonpos, the next key block prefetched: the same
// results up to rounding (docs/benchmarks.md, "The native kernels, sixth part": an AVX2 build runs
// at 0.89x-1.37x SDPA, before these tiles 0.12x-0.15x). A build without fused multiply-adds is
// refused by the native backend (qkv_flash_has_fma).
//
// AMX (qkv_amx.h): where the compiler targets AMX-BF16 (-march=native on a Xeon with AMX), Linux grants
// the tile data and the tiles pass a self-check at first use, bfloat16's two products run on tiles
// instead of vdpbf16ps: the scores as 16-row x 16-key tiles over steps of 32 of the head (Dh rounded up
// to 16 pairs; kp's layout is already TDPBF16PS's B operand, 16 pairs of a 16-key chunk 512 bytes
// apart), P V as 16-row x 16-column tiles over steps of 32 keys (vp2's layout is B's too; P's bfloat16
// words, p2, are A's), 2 x 2 accumulator tiles at a time (amx_scores, amx_values). P V runs over whole
// pairs of chunks from the block's first, a chunk so added given P = 0; each block's P V is summed from zero in the tiles and
// added once, as elsewhere; without block lists the blocks go four at a time (amx_span: one softmax step
// and one P V sum per span). Tested on a software model of the tiles (-DQKV_AMX_EMULATE,
// tests/core/test_native_flash_amx.py), and run by the whole suite on an Intel Xeon with AMX (a 2-core
// KVM guest, family 6 model 207, 2026-12-01): bfloat16 3.7x-4.7x faster than the vdpbf16ps path, and
// 1.05x-1.26x torch SDPA (on oneDNN's AMX kernels) at 4096 and 16384 tokens (docs/benchmarks.md,
// "The native kernels, ninth part"). On a second such Xeon (family 6 model 167, 2026-12-02) the spans'
// rows padded (AMX_SROW, AMX_PROW), P by vreduceps (exp2_frame), the span's bounds as locals, items
// of 256 rows without a band (128 causal from 8192 queries), the items head by head, the queries packed
// times a power-of-two scale and whole key blocks packed 16 x 16 took the bfloat16 forward to
// 0.66x-0.76x its time at 4096 and 16384 tokens (the fifteenth part); P as 2^(s cx - n) from one
// multiply-add, and the standing step checked on P's largest bfloat16 word instead of the scores' max,
// to 0.79x-0.87x of that causal and 0.90x-0.97x without a band (the sixteenth part).
//
// Measured (AMD EPYC Zen 4 with AVX512-BF16, 2 threads, B=1, H=8, D=64, torch SDPA time / this
// kernel's, benchmarks/attention.py, 2026-11-30): float32 1.07x (no band) and 1.19x (causal) at
// L=4096, 1.13x and 1.20x at 16384; bfloat16 1.88x and 2.06x at 4096, 1.81x and 1.85x at 16384
// (before P V ran on vdpbf16ps: 1.41x and 1.61x, 1.40x and 1.37x). Sliding window 256, causal,
// L=16384: float32 0.082 s, torch.compile(flex_attention) 0.136 s (1.66x; this kernel before the
// 16-key chunks, 32-row items and the packing arena: 0.111 s), bfloat16 0.046 s. The same window
// as a BlockMask (qkv.attention(mask=, backend="sparse"), the kernel before the narrowed partial
// blocks and the 32-row items on the lists timed in turns with this one in one process, best of
// 9, 2026-11-30): float32 0.097 s -> 0.082 s (1.19x; the band in the same run 0.083 s), bfloat16
// 0.055 s -> 0.046 s (1.19x; band 0.050 s); benchmarks/sparse.py --lengths 16384 --patterns
// window --flex-at 16384 --bf16-at 16384, runs alternated with the kernel before: float32
// 0.069-0.088 s in five runs (a sixth, disturbed by other jobs, 0.171 s), 1.64-2.06x Flex's time
// in the same run; before, seven runs, 0.086-0.104 s, 1.38-1.56x in the six where Flex took
// 0.136-0.154 s; bfloat16 0.044-0.056 s (before 0.054-0.056 s).
//
// D=128 float32 (benchmarks/attention.py --backends native --dim 128 --dtypes float32 --lengths
// 1024 4096 --repeats 5, and --lengths 16384 --repeats 2; 2026-11-30, runs alternated with the
// kernel before the pieces over all the rows; torch SDPA time / this kernel's):
// no band 0.98x, 1.36x, 1.38x at L=1024 (SDPA 25.9-44.9 ms, this kernel 26.4-32.5 ms), 1.02x and
// 0.98x at 4096 (410 and 413 ms), 1.00x at 16384 (6.62 s); causal 1.27-1.29x at 1024, 1.09x
// (three runs) at 4096, 1.11x at 16384 (3.22 s). Before: no band 0.83-0.89x at 1024, 0.84-0.86x
// at 4096 (481-488 ms), 0.86x at 16384 (7.88 s); causal 1.09-1.12x, 0.92-0.94x (246-251 ms),
// 0.92x (3.92 s). So no band is at parity with SDPA, not clearly above it.
// In one process (the builds timed in turns, best of 5, one thread, thread CPU time, L=2048, no
// band): scores 93 ms, P V 98 ms, softmax 10 ms, packing and the rest 3 ms of 203 ms (parts timed
// by leaving each out; SDPA 202 ms); before, 242 ms. The scores and P V run at 88-92 GFLOP/s,
// torch's own float32 matmul of the same shapes on one thread at 84-90. Tried and not kept (no
// gain or slower, same measurement): pieces of 32 or 16 terms (16 KiB of keys), score tiles of
// 6 rows x 4 chunks, P V over 64 or 32 keys at a time, items of 60 or 66 rows, P V tiles of 4
// rows, keys packed 16 keys at a time (the packing 3.2 -> 2.7 ms at L=1024, the call within
// noise); for bfloat16 at D=128, scores in pieces of 32 or 16 pairs and P V by 64 columns over all
// the rows (2-10% slower). D=64 and bfloat16 run the code they ran before (same benchmark, L=4096,
// alternated: D=64 float32 1.08x and 1.17x, before 1.08x and 1.19x; bfloat16 1.99x and 2.06x,
// before 1.92x and 2.11x; bfloat16 D=128 1.82x and 2.02x, before 1.80x and 1.93x).
//
// ABI (strides in elements, innermost stride 1; kind 0 = float32, 1 = bfloat16 bits):
//   q (B, Hq, Lq, D) strides qst, k (B, Hkv, Lk, D) kst, v (B, Hkv, Lk, Dv) vst;
//   out contiguous (B, Hq, Lq, Dv) of the input dtype; lse contiguous (B, Hq, Lq) float32;
//   blocks: QkvBlockLists* or null (the band alone); lse_lo contiguous (B, Hq, Lq) float32 or null:
//   lse's low part (lse + lse_lo is max + log(sum) to about 1e-7, for the backward); absmax (3,) uint32 or
//   null: the largest |x| of the queries, the keys and the values the call read, as the bits of the input
//   dtype (abs_bits: float32's low 31, bfloat16's low 15; infinity and NaN above every finite value), for
//   the non-finite guard (core/finite.py) without a pass of its own over q, k and v. Version 5.
// No torch headers: plain C++17, compiled on first use by qkv/core/_kernels.py.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>
#ifdef __AVX512F__
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __linux__
#include <sys/mman.h>
#endif

#include "qkv_block_lists.h"  // struct QkvBlockLists, shared with the other FA-2 kernel
#include "qkv_simd.h"  // v16 and its kin, splat, vexp: shared by the kernels
#include "qkv_amx.h"   // QKV_AMX and the tile operations (the bfloat16 products on AMX tiles)

namespace {


// Block sizes, measured on a 2-core AVX-512 EPYC (Zen 4), one thread, B=1, H=8, L=2048, D=64:
// keys in blocks of 128 ran 4% (float32) to 13% (bfloat16) faster than 64, and 256 slower;
// items of 32, 64 or 128 rows and P V tiles of 4 or 6 rows were within noise. The key block is
// also the block lists' (QkvBlockLists.bk must be 128); QKV_ROWS and QKV_RM are for experiments.
// Narrow builds (QKV_VW < 16) take items of 96 rows, sixteen of their 6-row scores tiles: on a Zen 3
// EPYC (AVX2 only), float32, B=1, H=8, D=64, 2 threads, the builds called in turns in one process
// (best of 11-41), with 6x2 scores tiles 96 rows ran 3-13% faster than 64 at L=1024 and 4096, causal
// and not, and 128 rows within 3% of 96 (docs/benchmarks.md, "The native kernels, eleventh part").
#ifndef QKV_ROWS
#if QKV_VW < 16
#define QKV_ROWS 96
#else
#define QKV_ROWS 64
#endif
#endif
#ifndef QKV_RM
#define QKV_RM 6
#endif
constexpr int BK = 128;      // keys per block
constexpr int NV = BK / 16;  // chunks of 16 keys (one vector) per block
#ifndef QKV_AMX_SPAN
#define QKV_AMX_SPAN 4
#endif
// With AMX and no block lists, key blocks are visited AMX_SPAN at a time (a span: blocks g AMX_SPAN to
// g AMX_SPAN + AMX_SPAN - 1, aligned whatever the item), one online-softmax step per span (see amx_span).
constexpr int AMX_SPAN = QKV_AMX_SPAN;
static_assert(AMX_SPAN >= 1 && AMX_SPAN <= 8, "spans of 1 to 8 key blocks");
constexpr int64_t AMX_SW = AMX_SPAN * BK;  // floats of S per row in a span (p2: AMX_SW / 2 words)
// A row of S and of p2 is padded past the span's keys. Unpadded, S's rows lie 2048 bytes apart and
// p2's 1024, so a tile's 16 rows fall on 2 (S) and 4 (p2) of L1's 64 sets. On an Intel Xeon with AMX
// (family 6 model 167, 2 threads, bfloat16, L=4096; benchmarks/kernels_ab.py --define-after
// QKV_AMX_S_PAD=16): 0.95-0.97x the time with S padded, and 0.95-0.97x with p2 padded as well
// (docs/benchmarks.md, "The native kernels, fifteenth part"). In a throwaway loop of the scores' tiles
// alone, a 2 x 2 group stored into S took 33 ns per tile unpadded, 24 ns padded by 16 floats and 15 ns
// into a buffer held in L1.
#ifndef QKV_AMX_S_PAD
#define QKV_AMX_S_PAD 16
#endif
#ifndef QKV_AMX_P_PAD
#define QKV_AMX_P_PAD 16
#endif
constexpr int64_t AMX_SROW = AMX_SW + QKV_AMX_S_PAD;      // floats from one row of S to the next
constexpr int64_t AMX_PROW = AMX_SW / 2 + QKV_AMX_P_PAD;  // words from one row of p2 to the next
static_assert(QKV_AMX_S_PAD % 16 == 0 && QKV_AMX_P_PAD % 16 == 0, "rows of whole 64-byte lines");
// How far a span's max may pass a row's frame before the step takes a new one (amx_span): P at most 8
// against the frame, checked on P's largest bfloat16 word (at most 8's, 0x4100: a max up to about
// ln 8 = 2.08 above the frame; one vpmaxuw per pair of chunks). Until the sixteenth part the slack was 2
// (P up to e^2), checked on the span's max of the scores (one vmaxps per chunk). With P under 2 instead
// (a slack of ln 2) 12441 of 229376 steps on random scores took FA-2's step (L=4096, D=64, no band); at
// 8, 67. Where scores rise along the keys (tests/core/test_native_flash_amx.py's ramps), a slack of 16
// left out and dq further from the float64 reference than FA-2's step (out 0.25-0.36 of the rule's bound
// against 0.19-0.21, dq 1.3-1.9x the error); at 2 they were as before but for one case.
constexpr uint16_t AMX_STAND_WORD = 0x4100;  // 8.0 in bfloat16
// float32 scores are summed over the head in pieces of SC terms, each from zero, added in order (the
// backward kernel recomputes them so: its SC). At SC = 64 a head of 64 or fewer is one chain of
// multiply-adds, the order of MKL's sgemm on this CPU (bit for bit at K <= 192, measured): the
// reference's scores for two or more query rows. For one row the reference runs MKL's gemv, which
// sums in another order with about 1.45x less rounding, and a one-row call at scale 1 (D=64, 242
// keys) misses the tolerance rule in 22 of 300 draws (at most 2.1x the bound). Pieces of 32 or 16
// cut that to 5 and 1 of 300, but part from gemm's order: at scale 1000 (D=64, 33 x 130) they miss
// in 3 of 200 draws where SC = 64 misses in none, and the float32 forward ran 3% (32) and 10-12%
// (16) slower at D = 64 and 128, each piece reloading and storing the scores (benchmarks/kernels_ab.py
// --define-after QKV_SC=32; docs/benchmarks.md, the seventh part). An experiment knob, like QKV_RM.
#ifndef QKV_SC
#define QKV_SC 64
#endif
constexpr int64_t SC = QKV_SC;
constexpr int RM = QKV_RM;   // query rows per register tile of P V (RM x 4 vectors)
// Query rows per register tile of the scores over NC chunks: 24 accumulators (at most 6 rows).
constexpr int rows_for(int nc) { return 24 / nc < 6 ? 24 / nc : 6; }
static_assert(NV == 8 && RM >= 1 && RM <= 6, "tile sizes");
constexpr int MAX_DIM = 256;
constexpr float NEG_INF = -INFINITY;
constexpr float LOG2E = 1.44269504088896341f;


// Keeps a loaded vector in its register: without it GCC folds the load into each of the
// multiply-adds that use it, loading it once per row instead of once.
inline void in_register(v16& x) {
#ifdef __AVX512F__
  asm volatile("" : "+v"(x));
#else
  (void)x;
#endif
}

inline float bf16_to_f32(uint16_t h) {
  uint32_t w = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &w, 4);
  return f;
}

// Round to nearest even; a NaN stays a (quiet) NaN.
inline uint16_t f32_to_bf16(float f) {
  uint32_t w;
  std::memcpy(&w, &f, 4);
  if ((w & 0x7fffffffu) > 0x7f800000u) return uint16_t((w >> 16) | 0x40);
  w += 0x7fffu + ((w >> 16) & 1u);
  return uint16_t(w >> 16);
}

template <int KIND>
inline float load1(const void* base, int64_t idx) {
  if constexpr (KIND == 0) {
    return ((const float*)base)[idx];
  } else {
    return bf16_to_f32(((const uint16_t*)base)[idx]);
  }
}

// |x| of entry idx as the bits of its dtype: float32's low 31, bfloat16's low 15. They order as |x| does, with
// infinity above every finite value and NaN above infinity: the extremes the non-finite guard needs of the
// queries, keys and values the kernel reads (qkv_flash_fwd's absmax; core/finite.py), taken as they are read.
template <int KIND>
inline uint32_t abs_bits(const void* base, int64_t idx) {
  if constexpr (KIND == 0) {
    uint32_t w;
    std::memcpy(&w, (const float*)base + idx, 4);
    return w & 0x7fffffffu;
  } else {
    return ((const uint16_t*)base)[idx] & 0x7fffu;
  }
}

#ifdef __AVX512F__
// The largest abs_bits of rows x n entries at base, rows `stride` entries apart, n * (4 or 2 bytes) a multiple of
// 64: the rows a packing just read (so from L1), 64 bytes a step.
template <int KIND>
inline uint32_t rows_abs_bits(const void* base, int64_t rows, int64_t stride, int64_t n) {
  const int64_t es = KIND == 0 ? 4 : 2;
  const __m512i keep = _mm512_set1_epi32(KIND == 0 ? 0x7fffffff : 0x7fff7fff);
  __m512i m = _mm512_setzero_si512();
  for (int64_t r = 0; r < rows; ++r) {
    const char* row = (const char*)base + r * stride * es;
    for (int64_t o = 0; o < n * es; o += 64) {
      const __m512i x = _mm512_and_si512(_mm512_loadu_si512(row + o), keep);
      if constexpr (KIND == 0) m = _mm512_max_epu32(m, x);
      else m = _mm512_max_epu16(m, x);
    }
  }
  if constexpr (KIND == 1) m = _mm512_max_epu32(_mm512_and_si512(m, _mm512_set1_epi32(0xffff)), _mm512_srli_epi32(m, 16));
  return _mm512_reduce_max_epu32(m);
}
#endif

inline float hmax(v16 a) {
#ifdef __AVX512F__
  return _mm512_reduce_max_ps((__m512)a);
#endif
  float m = a[0];
  for (int t = 1; t < 16; ++t) m = a[t] > m ? a[t] : m;
  return m;
}

inline float hsum(v16 a) {
#ifdef __AVX512F__
  return _mm512_reduce_add_ps((__m512)a);
#endif
  float s = 0.0f;
  for (int t = 0; t < 16; ++t) s += a[t];
  return s;
}


// P on AVX-512 builds, 2^t: t = (x - max) log2(e) of a scaled score x and its row's max (one key block at
// a time: the difference first, exact near the max, so P is 1 exactly there and a one-key row's output is
// its value), or on AMX spans t = s cx - n of a score s as S holds it, cx = scale log2(e) (log2(e) where
// the queries were packed times the scale) and n the row's frame, its top s cx rounded (amx_span).
// r = t - floor(t) in [0, 1) in one instruction (vreduceps, rounding down: its subtraction rounds down too,
// so t a hair below an integer gives r just below 1), 2^r by 1 + r (c1 + r (c2 + ...)) and 2^floor(t)
// applied by vscalefps from t itself (it floors its exponent operand): eight or nine instructions. The
// polynomials are fitted (linear programming on 4000 points of [0, 1], p(0) = 1 held exactly) for the least
// largest relative error: DEG 6, float32's P, 1.03e-7 evaluated in float32 (8.6e-8 but where vreduceps
// rounds an r just below 1 down; about 1 ulp, as Cephes' exp2f on |r| <= 1/2, which the kernel used before
// the sixteenth part, with a rounding and a subtraction where vreduceps is one); DEG 5, bfloat16's P,
// 6.7e-8 fitted and 1.6e-7 evaluated. P's rounding to bfloat16 moves it by up to 2^-8 relative; the row sum
// is of P unrounded, so the lse moves by at most 1.6e-7 more (absolute), within its float32 rule (8 ulps
// at its magnitude). Degree 3 (1.0e-4) broke that rule for
// the lse in the suite (test_native_flash.py: 5.6e-5 against 6.0e-6), and degree 4 (2.9e-6) would take
// half of that bound on its own. 2^0 is 1 exactly (r = 0, p(0) = 1, floor 0); t = -inf gives 0 with no
// clamp (vreduceps gives r = 0 there, and vscalefps 1 x 2^-inf), and t far below -149 gives 0 too. A NaN t
// gives NaN: amx_span's standing pass finds it among P's words, and the other passes take it as -inf first
// (nan_to_minus_inf: P = 0, out of the max). The one-block passes' change from exp_minus (a rounding, a
// subtraction and the -151 clamp) to this ran as fast (float32 0.98x-1.03x; bfloat16 on vdpbf16ps
// 0.97x-0.99x). Underflowing results cost: on an Intel Xeon (family 6 model 167) each vscalefps whose
// result underflows takes a microcode assist of about 150 cycles against 1, so masked lanes come as -inf
// (0 exactly), never clamped to a finite floor such as -151 (the kernel before the sixteenth part: windows
// of 256 at 16384 tokens ran 1.4x (bfloat16) and 1.2x (float32) the time). Without vreduceps (AVX-512
// without DQ) the floor and a subtraction, on t clamped at -151 (-inf there scales to 0 all the same).
#ifdef __AVX512F__
template <int DEG>
inline v16 exp2_frame(__m512 t) {
  static_assert(DEG == 5 || DEG == 6, "polynomials of degree 5 and 6");
#ifdef __AVX512DQ__
  const __m512 r = _mm512_reduce_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);  // t - floor(t)
#else
  const __m512 tc = _mm512_max_ps(t, _mm512_set1_ps(-151.0f));
  const __m512 r = _mm512_sub_ps(tc, _mm512_roundscale_ps(tc, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC));
#endif
  __m512 p;
  if constexpr (DEG == 6) {
    p = _mm512_set1_ps(0.0002138116688001901f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.0012528285151347518f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.009670049883425236f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.055487096309661865f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.24022918939590454f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.6931470036506653f));
  } else {
    p = _mm512_set1_ps(0.0018729661824181676f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.00900223758071661f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.05581318214535713f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.2401595264673233f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.6931519508361816f));
  }
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return (v16)_mm512_scalef_ps(p, t);  // p 2^floor(t)
}

// t, a NaN taken as -inf (vmaxps returns its second operand where either is NaN).
inline __m512 nan_to_minus_inf(__m512 t) { return _mm512_max_ps(t, _mm512_set1_ps(-INFINITY)); }
#endif

constexpr size_t HUGE_BYTES = size_t(2) << 20;

// 64-byte aligned, uninitialised storage (every element used is written before it is read).
template <typename T>
struct Buffer {
  T* p = nullptr;
  bool failed = false;  // an allocation that did not succeed
  explicit Buffer(size_t n = 0) { reset(n); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer() { std::free(p); }
  void reset(size_t n) {
    std::free(p);
    size_t bytes = (n * sizeof(T) + 63) / 64 * 64;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (bytes >= HUGE_BYTES) {  // transparent huge pages: a fresh buffer faults in 2 MiB at a time, not 4 KiB
      bytes = (bytes + HUGE_BYTES - 1) / HUGE_BYTES * HUGE_BYTES;
      p = (T*)std::aligned_alloc(HUGE_BYTES, bytes);
      if (p) madvise(p, bytes, MADV_HUGEPAGE);
      failed = !p;
      return;
    }
#endif
    p = bytes ? (T*)std::aligned_alloc(64, bytes) : nullptr;
    failed = bytes && !p;
  }
};

// A query range of a work item: rows [i0, i1) inside one query block of the block lists (mqb;
// -1 without lists).
struct Item {
  int64_t i0, i1, mqb;
};

struct Problem {
  int kind;
  int64_t B, Hq, Hkv, G, Lq, Lk, D, Dv;
  const void *q, *k, *v;
  int64_t qst[4], kst[4], vst[4];
  float scale;
  int64_t left, right, offset;  // left/right -1: unbounded
  void* out;
  float* lse;
  float* lse_lo;  // lse's low part, or null
  const QkvBlockLists* bl;  // block lists, or null
  uint32_t* absmax;  // (3,): the largest |x| of the queries, keys and values read, as bits (see abs_bits), or null
  // Derived.
  bool dp;        // bfloat16 with vdpbf16ps: packed key pairs kp and value pairs vp2, P rounded to bfloat16
  bool amx;       // dp's products on AMX tiles (qkv_amx.h): Dh a multiple of 16, scratch rows of 32
  int64_t nkb;    // key blocks per head, ceil(Lk / BK)
  bool scale_pow2;  // scale a power of two from 2^-8 to 1 (AMX spans pack the queries times it: run_item)
  int64_t Dh;     // head-dimension pairs, ceil(D / 2), with AMX rounded up to 16 (a tile's) (dp only)
  int64_t Dvp;    // Dv rounded up to a multiple of 16
  int64_t bq;     // query positions per work item at most (its rows: G * bq)
  std::vector<Item> items;  // query ranges, costliest first
  // The packed keys and values of the kv heads bh0 .. bh0 + (heads per group) - 1 (slot bh - bh0):
  int64_t bh0;
  float* kt;      // [slot][nkb][D][BK]
  uint16_t* kp;   // [slot][nkb][Dh][BK][2]
  float* vp;      // [slot][nkb*BK][Dvp] (not dp)
  uint32_t* vp2;  // [slot][nkb*BK/2][Dvp] words: bfloat16 values of keys 2w (low half) and 2w+1 (dp)

  int64_t row_lo(int64_t i) const {
    return left < 0 ? 0 : std::clamp<int64_t>(i + offset - left, 0, Lk);
  }
  int64_t row_hi(int64_t i) const {
    const int64_t hi = right < 0 ? Lk : std::clamp<int64_t>(i + offset + right + 1, 0, Lk);
    return std::max(hi, row_lo(i));
  }
};

// ---------------------------------------------------------------- phase 1: packing

// The packing of key block kb of kv head bh; `seen` (keys, values): raised to the largest abs_bits read.
template <int KIND>
void pack_block(const Problem& P, int64_t bh, int64_t kb, uint32_t* seen) {
  const int64_t b = bh / P.Hkv, h = bh % P.Hkv;
  const int64_t j0 = kb * BK, n = std::min<int64_t>(BK, P.Lk - j0);
  const char* kbase = (const char*)P.k + (b * P.kst[0] + h * P.kst[1]) * (KIND == 0 ? 4 : 2);
  const char* vbase = (const char*)P.v + (b * P.vst[0] + h * P.vst[1]) * (KIND == 0 ? 4 : 2);
  if (P.dp) {
    uint16_t* dst = P.kp + ((bh - P.bh0) * P.nkb + kb) * P.Dh * BK * 2;
#if defined(__AVX512F__) && defined(__AVX512BW__)
    // A whole block whose rows are whole pairs of 16-word groups (D = 2 Dh, Dh a multiple of 16, rows an
    // even number of elements apart): the block's 32-bit words (a pair of the head each) transposed 16 x 16
    // at a time, and the values interleaved 16 columns at a time, the same words as the loops below, which
    // wrote them a word at a time: 8-9% of the bfloat16 forward's time (one thread, L=4096, causal, AMX
    // tiles; docs/benchmarks.md, the fifteenth part).
    if (n == BK && P.D == 2 * P.Dh && P.Dh % 16 == 0 && P.kst[2] % 2 == 0 && P.vst[2] % 2 == 0 &&
        P.Dv == P.Dvp) {
      const uint32_t* k32 = (const uint32_t*)((const uint16_t*)kbase + j0 * P.kst[2]);
      for (int64_t p0 = 0; p0 < P.Dh; p0 += 16)
        for (int64_t c0 = 0; c0 < BK; c0 += 16)
          transpose16(k32 + c0 * (P.kst[2] / 2) + p0, P.kst[2] / 2, (uint32_t*)dst + p0 * BK + c0, BK);
      seen[0] = std::max(seen[0], rows_abs_bits<1>(k32, BK, P.kst[2], P.D));
      uint32_t* v32 = P.vp2 + ((bh - P.bh0) * P.nkb * BK + j0) / 2 * P.Dvp;
      __m512i vm = _mm512_setzero_si512();  // the words' largest abs_bits, both halves
      const __m512i keep = _mm512_set1_epi32(0x7fff7fff);
      for (int64_t w = 0; w < BK / 2; ++w) {
        const uint16_t* r0 = (const uint16_t*)vbase + (j0 + 2 * w) * P.vst[2];
        const uint16_t* r1 = r0 + P.vst[2];
        for (int64_t d = 0; d < P.Dvp; d += 16) {  // word (w, d): key 2w's value low, 2w + 1's high
          const __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(r0 + d)));
          const __m512i hi = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(r1 + d)));
          const __m512i word = _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16));
          _mm512_storeu_si512(v32 + w * P.Dvp + d, word);
          vm = _mm512_max_epu16(vm, _mm512_and_si512(word, keep));
        }
      }
      vm = _mm512_max_epu32(_mm512_and_si512(vm, _mm512_set1_epi32(0xffff)), _mm512_srli_epi32(vm, 16));
      seen[1] = std::max(seen[1], (uint32_t)_mm512_reduce_max_epu32(vm));
      return;
    }
#endif
    uint32_t km = 0, vm = 0;
    for (int64_t c = 0; c < BK; ++c) {
      const uint16_t* row = (const uint16_t*)kbase + (j0 + c) * P.kst[2];
      for (int64_t d = 0; d < 2 * P.Dh; ++d) {
        const uint16_t x = (c < n && d < P.D) ? row[d] : 0;
        dst[((d >> 1) * BK + c) * 2 + (d & 1)] = x;
        km = std::max<uint32_t>(km, x & 0x7fffu);
      }
    }
    // Values in pairs of keys: word (w, d) holds keys 2w and 2w + 1 of column d (vdpbf16ps's operand).
    uint16_t* vdst = (uint16_t*)(P.vp2 + ((bh - P.bh0) * P.nkb * BK + j0) / 2 * P.Dvp);
    for (int64_t c = 0; c < BK; ++c) {
      uint16_t* r = vdst + (c >> 1) * P.Dvp * 2 + (c & 1);
      const uint16_t* row = (const uint16_t*)vbase + (j0 + c) * P.vst[2];
      for (int64_t d = 0; d < P.Dvp; ++d) {
        const uint16_t x = (c < n && d < P.Dv) ? row[d] : 0;
        r[2 * d] = x;
        vm = std::max<uint32_t>(vm, x & 0x7fffu);
      }
    }
    seen[0] = std::max(seen[0], km), seen[1] = std::max(seen[1], vm);
    return;
  }
  float* dst = P.kt + ((bh - P.bh0) * P.nkb + kb) * P.D * BK;
#ifdef __AVX512F__
  // float32, a whole block whose rows are whole 16-float groups: the keys transposed 16 x 16 at a time
  // (transpose16: float32 entries are 32-bit words), the same floats as the loop below writes one at a time.
  if (KIND == 0 && n == BK && P.D % 16 == 0) {
    const uint32_t* k32 = (const uint32_t*)kbase + j0 * P.kst[2];  // (BK, D) rows kst[2] words apart
    for (int64_t d0 = 0; d0 < P.D; d0 += 16)
      for (int64_t c0 = 0; c0 < BK; c0 += 16)
        transpose16(k32 + c0 * P.kst[2] + d0, P.kst[2], (uint32_t*)dst + d0 * BK + c0, BK);  // kt (D, BK)
    seen[0] = std::max(seen[0], rows_abs_bits<0>(k32, BK, P.kst[2], P.D));
  } else
#endif
  {
    uint32_t km = 0;
    for (int64_t c = 0; c < BK; ++c) {
      if (c < n) {
        const void* row = kbase + (j0 + c) * P.kst[2] * (KIND == 0 ? 4 : 2);
        for (int64_t d = 0; d < P.D; ++d) dst[d * BK + c] = load1<KIND>(row, d), km = std::max(km, abs_bits<KIND>(row, d));
      } else {
        for (int64_t d = 0; d < P.D; ++d) dst[d * BK + c] = 0.0f;
      }
    }
    seen[0] = std::max(seen[0], km);
  }
  float* vdst = P.vp + ((bh - P.bh0) * P.nkb * BK + j0) * P.Dvp;
  uint32_t vm = 0;
  for (int64_t c = 0; c < BK; ++c) {
    float* r = vdst + c * P.Dvp;
    int64_t d = 0;
    if (c < n) {
      const void* row = vbase + (j0 + c) * P.vst[2] * (KIND == 0 ? 4 : 2);
      for (; d < P.Dv; ++d) r[d] = load1<KIND>(row, d), vm = std::max(vm, abs_bits<KIND>(row, d));
    }
    for (; d < P.Dvp; ++d) r[d] = 0.0f;
  }
  seen[1] = std::max(seen[1], vm);
}

// ---------------------------------------------------------------- phase 2: attention

// The register tiles. With AVX-512 they are written with intrinsics and each loaded vector is
// pinned to its register (`pin`): GCC otherwise folds a load into every multiply-add that uses
// it, reloading it once per row, and the loads, not the multiply-adds, set the pace. Elsewhere
// the same loops in vector extensions; builds without AVX-512 run the narrow tiles below instead.
#ifdef __AVX512F__
typedef __m512 vreg;
inline vreg vzero() { return _mm512_setzero_ps(); }
inline vreg vload(const float* p) { return _mm512_load_ps(p); }
inline vreg vbcast(float x) { return _mm512_set1_ps(x); }
inline vreg vfma(vreg a, vreg b, vreg c) { return _mm512_fmadd_ps(a, b, c); }
inline vreg vmul(vreg a, vreg b) { return _mm512_mul_ps(a, b); }
inline vreg vadd(vreg a, vreg b) { return _mm512_add_ps(a, b); }
inline void vstore(float* p, vreg x) { _mm512_store_ps(p, x); }
template <typename T>
inline void pin(T& x) { asm("" : "+v"(x)); }
#else
typedef v16 vreg;
inline vreg vzero() { return splat(0.0f); }
inline vreg vload(const float* p) { return *(const v16*)p; }
inline vreg vbcast(float x) { return splat(x); }
inline vreg vfma(vreg a, vreg b, vreg c) { return a * b + c; }
inline vreg vmul(vreg a, vreg b) { return a * b; }
inline vreg vadd(vreg a, vreg b) { return a + b; }
inline void vstore(float* p, vreg x) { *(v16*)p = x; }
template <typename T>
inline void pin(T&) {}
#endif

// s[r][16t + c] = q[r] . key 16t + c of the block for chunks t < NC, R rows: q (R, D) float32,
// kt (D, BK) (already offset to the first chunk), s rows of BK; one piece of the sum: the sum over
// D runs in pieces of SC terms added together, as the backward kernel sums its recomputed scores
// (flash_bwd_kernel.cpp), so the lse it reads was made by the same arithmetic and P = exp(s - lse)
// is the forward's P (one unbroken chain over D = 256 differed by enough to break the tolerance
// rule for dq at large logits). This call sums terms [d0, d0 + n) (q and kt offset to d0) and
// stores the sum (first piece) or adds it to s.
template <int R, int NC>
__attribute__((noinline)) void scores_f32_piece(const float* q, int64_t D, int64_t n, const float* kt, float* s,
                                                bool first) {
  vreg acc[R][NC];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < NC; ++t) acc[r][t] = vzero();
  for (int64_t d = 0; d < n; ++d) {
    vreg kv[NC];
    for (int t = 0; t < NC; ++t) kv[t] = vload(kt + d * BK + 16 * t), pin(kv[t]);
    for (int r = 0; r < R; ++r) {
      const vreg qv = vbcast(q[r * D + d]);
      for (int t = 0; t < NC; ++t) acc[r][t] = vfma(qv, kv[t], acc[r][t]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < NC; ++t) {
      float* out = s + r * BK + 16 * t;
      vstore(out, first ? acc[r][t] : vadd(vload(out), acc[r][t]));
    }
}

#ifdef __AVX512BF16__
// The same with bfloat16 pairs: q (R, 2*Dh) bfloat16 bits, kp (Dh, BK, 2) (offset to the first chunk).
template <int R, int NC>
__attribute__((noinline)) void scores_bf16(const uint16_t* q, int64_t Dh, const uint16_t* kp, float* s) {
  __m512 acc[R][NC];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < NC; ++t) acc[r][t] = _mm512_setzero_ps();
  for (int64_t p = 0; p < Dh; ++p) {
    __m512i kv[NC];
    for (int t = 0; t < NC; ++t) kv[t] = _mm512_load_si512(kp + (p * BK + 16 * t) * 2), pin(kv[t]);
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      std::memcpy(&pair, q + r * 2 * Dh + 2 * p, 4);
      const __m512bh qv = (__m512bh)_mm512_set1_epi32(pair);
      for (int t = 0; t < NC; ++t) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], qv, (__m512bh)kv[t]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < NC; ++t) _mm512_store_ps(s + r * BK + 16 * t, acc[r][t]);
}

// acc[r][0 .. 16W) = alpha[r] * acc[r] + sum over key pairs w < npairs of p2[r][w] . vp2[w]:
// P rounded to bfloat16, as pairs of keys (p2 rows of BK/2 words), values vp2 (npairs, Dvp) words.
template <int R, int W>
__attribute__((noinline)) void values_tile_bf16(const uint32_t* p2, const uint32_t* vp2, int64_t Dvp, int64_t npairs,
                                                float* acc, const float* alpha) {
  __m512 o[R][W];  // this block's sum, from zero (see values_tile)
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < W; ++t) o[r][t] = _mm512_setzero_ps();
  for (int64_t w = 0; w < npairs; ++w) {
    __m512i vv[W];
    for (int t = 0; t < W; ++t) vv[t] = _mm512_load_si512(vp2 + w * Dvp + 16 * t), pin(vv[t]);
    for (int r = 0; r < R; ++r) {
      const __m512bh pr = (__m512bh)_mm512_set1_epi32((int32_t)p2[r * (BK / 2) + w]);
      for (int t = 0; t < W; ++t) o[r][t] = _mm512_dpbf16_ps(o[r][t], pr, (__m512bh)vv[t]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < W; ++t) {
      float* a = acc + r * Dvp + 16 * t;
      _mm512_store_ps(a, _mm512_fmadd_ps(_mm512_load_ps(a), _mm512_set1_ps(alpha[r]), o[r][t]));
    }
}

template <int R>
inline void values_rows_bf16(const uint32_t* p2, const uint32_t* vp2, int64_t Dvp, int64_t npairs, float* acc,
                             const float* alpha) {
  int64_t d = 0;
  for (; d + 64 <= Dvp; d += 64) values_tile_bf16<R, 4>(p2, vp2 + d, Dvp, npairs, acc + d, alpha);
  switch ((Dvp - d) / 16) {
    case 3: values_tile_bf16<R, 3>(p2, vp2 + d, Dvp, npairs, acc + d, alpha); break;
    case 2: values_tile_bf16<R, 2>(p2, vp2 + d, Dvp, npairs, acc + d, alpha); break;
    case 1: values_tile_bf16<R, 1>(p2, vp2 + d, Dvp, npairs, acc + d, alpha); break;
    default: break;
  }
}
#endif

// acc[r][0 .. 16W) = alpha[r] * acc[r] + sum over keys c < n of p[r][c] * vp[c], R rows. The block's
// sum starts from zero and is added to the rescaled accumulator once, so an output over Lk keys carries
// the rounding of (block + Lk / block) terms, not of one running sum over Lk: with values sharing a
// large offset (v = 1000 + noise, 1797 keys) one running sum missed the tolerance rule in 10 of 10
// draws at 6x the reference's error, which sums P V in MKL's blocks (docs/benchmarks.md, seventh part).
template <int R, int W>
__attribute__((noinline)) void values_tile(const float* p, const float* vp, int64_t Dvp, int64_t n, float* acc, const float* alpha) {
  vreg o[R][W];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < W; ++t) o[r][t] = vzero();
  for (int64_t c = 0; c < n; ++c) {
    vreg vv[W];
    for (int t = 0; t < W; ++t) vv[t] = vload(vp + c * Dvp + 16 * t), pin(vv[t]);
    for (int r = 0; r < R; ++r) {
      const vreg pr = vbcast(p[r * BK + c]);
      for (int t = 0; t < W; ++t) o[r][t] = vfma(pr, vv[t], o[r][t]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < W; ++t) vstore(acc + r * Dvp + 16 * t, vfma(vload(acc + r * Dvp + 16 * t), vbcast(alpha[r]), o[r][t]));
}

// values_tile over W = w vectors (1 to 4) of columns.
template <int R>
inline void values_cols(const float* p, const float* vp, int64_t Dvp, int64_t n, float* acc, const float* alpha, int64_t w) {
  switch (w) {
    case 4: values_tile<R, 4>(p, vp, Dvp, n, acc, alpha); break;
    case 3: values_tile<R, 3>(p, vp, Dvp, n, acc, alpha); break;
    case 2: values_tile<R, 2>(p, vp, Dvp, n, acc, alpha); break;
    case 1: values_tile<R, 1>(p, vp, Dvp, n, acc, alpha); break;
    default: break;
  }
}

// f(rows, m) over rows [0, M), rows a std::integral_constant: TILE at a time, then the rest in one tile.
template <int TILE = RM, typename F>
inline void by_tiles(int64_t M, F&& f) {
  static_assert(TILE >= 1 && TILE <= 6, "tiles of 1 to 6 rows");
  int64_t m = 0;
  for (; m + TILE <= M; m += TILE) f(std::integral_constant<int, TILE>{}, m);
  switch (M - m) {
    case 5: f(std::integral_constant<int, 5>{}, m); break;
    case 4: f(std::integral_constant<int, 4>{}, m); break;
    case 3: f(std::integral_constant<int, 3>{}, m); break;
    case 2: f(std::integral_constant<int, 2>{}, m); break;
    case 1: f(std::integral_constant<int, 1>{}, m); break;
    default: break;
  }
}

// f(nc) for nc in 1..NV as a std::integral_constant.
template <typename F>
inline void by_chunks(int nc, F&& f) {
  switch (nc) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    default: break;
  }
}

// alpha of FA-2's step from a row's max `old` to `now` (>= old) in the one-block passes: 0 before the
// row's first key, exp(old - now) else, without the call where the max stands (most blocks past a row's
// first; a max of +inf still gives exp(inf - inf), NaN, as FA-2's). perf put 2.6% of a float32 forward's
// samples in std::exp on an Intel Xeon (family 6 model 167); the A/B of skipping it was within its noise
// (0.97x-1.02x; docs/benchmarks.md, the sixteenth part).
inline float rescale(float old, float now) {
  return old == NEG_INF ? 0.0f : old == now && old != -NEG_INF ? 1.0f : std::exp(old - now);
}

// Bits [a, b) of 16 (a, b clamped to [0, 16]).
inline uint32_t range_bits(int64_t a, int64_t b) {
  a = std::clamp<int64_t>(a, 0, 16), b = std::clamp<int64_t>(b, 0, 16);
  return b > a ? ((1u << b) - 1u) & ~((1u << a) - 1u) : 0u;
}

// x where bit c of `bits` is set, -inf elsewhere (AVX-512: one masked blend from the mask register).
inline v16 keep(v16 x, uint32_t bits) {
#ifdef __AVX512F__
  return (v16)_mm512_mask_blend_ps((__mmask16)bits, _mm512_set1_ps(NEG_INF), (__m512)x);
#else
  const i16v iota = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const i16v on = (((i16v{} + (int32_t)bits) >> iota) & 1) != 0;
  return on ? x : splat(NEG_INF);
#endif
}

#if QKV_VW < 16
// Narrow tiles: builds without AVX-512 (AVX, AVX2: vectors of 8 floats; SSE, NEON: 4; 16 registers).
// The 16-float tiles above hold up to 24 16-float accumulators, which such a build splits into 48 or
// 96 registers, more than it has: GCC spilled them to the stack, and the AVX2 build of this kernel
// ran at 0.11-0.15x torch's SDPA. These run the same products on vectors of VW floats, tiles of
// NR rows by NG vectors for the scores (VW * NG keys of the block at a time), VNR by VNG for P V (VW *
// VNG value columns): 16 registers or fewer (the 6x2 scores tile: 12 accumulators, 2 key vectors and a
// broadcast; NEON has 32). Each (row, key) score is the
// same chain of multiply-adds over d as the 16-float tiles' (pieces of SC terms added together), as
// the backward kernel's narrow gemm (flash_bwd_kernel.cpp) recomputes it. Tile sizes: the x86-64-v3
// build on an AMD EPYC (Zen 4), float32, L=2048 and 4096, in one process with SDPA, best of 5-7:
// 4x3, 3x4, 6x2, 5x2 and 4x2 scores and 4x3, 3x4, 6x2 P V tiles all within 0.85x-0.94x of SDPA
// (noise); 2x4 P V slower (0.74x-0.84x); 4x4 slower still (0.62x: spilled). On a CPU whose widest
// vectors are AVX2's (a Zen 3 EPYC) the scores tile is 6 rows by 2 vectors: GCC keeps the 3x4
// tile's key vectors in memory (each multiply-add reads its key vector again: 12 loads and 3
// broadcasts per 12 multiply-adds, more than the two 256-bit loads a cycle Zen 3 has), where the
// 6x2 tile loads 2 and broadcasts 6. Alone, on data in L1, 6x2 ran at 93-95 GFLOP/s of the core's
// 101 against 3x4's 69-74; in the kernel, 6x2 with items of 96 rows ran 12-16% faster than 3x4 with
// 64 (float32, L=1024 to 16384; docs/benchmarks.md, "The native kernels, eleventh part").
#ifndef QKV_NR
#define QKV_NR 6  // rows of a narrow scores tile
#endif
#ifndef QKV_NG
#define QKV_NG 2  // vectors of a narrow scores tile (a chunk of 16 keys: 2 or 4 vectors; a block's 16 or 32)
#endif
#ifndef QKV_VNR
#define QKV_VNR 6  // rows of a narrow P V tile
#endif
#ifndef QKV_VNG
#define QKV_VNG 2  // vectors of a narrow P V tile (Dvp, a multiple of 16, is an even number of vectors)
#endif
constexpr int NR = QKV_NR, NG = QKV_NG, VNR = QKV_VNR, VNG = QKV_VNG;
static_assert(NR >= 1 && NR <= 6 && NG >= 1 && NG <= 4 && VNR >= 1 && VNR <= 6 && VNG >= 1 && VNG <= 4,
              "narrow tile sizes");

// s[r][VW g + c] (+)= q[r] . key VW g + c, g < G, over the terms [0, n) of one piece: q (R rows of
// stride D, offset to the piece), kt (n, BK) offset to the piece and the first key; first: store.
template <int R, int G>
__attribute__((noinline)) void scores_narrow(const float* q, int64_t D, int64_t n, const float* kt, float* s,
                                             bool first) {
  vw acc[R][G];
  for (int r = 0; r < R; ++r)
    for (int g = 0; g < G; ++g) acc[r][g] = splat_as<vw>(0.0f);
  for (int64_t d = 0; d < n; ++d) {
    vw kv[G];
    for (int g = 0; g < G; ++g) kv[g] = *(const vw*)(kt + d * BK + VW * g);
    for (int r = 0; r < R; ++r) {
      const vw qv = splat_as<vw>(q[r * D + d]);
      for (int g = 0; g < G; ++g) acc[r][g] += qv * kv[g];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int g = 0; g < G; ++g) {
      vw* out = (vw*)(s + r * BK + VW * g);
      *out = first ? acc[r][g] : *out + acc[r][g];
    }
}

// acc[r][0 .. VW G) = alpha[r] * acc[r] + sum over keys c < n of p[r][c] * vp[c], R rows (p rows of
// BK, acc and vp rows of Dvp).
template <int R, int G>
__attribute__((noinline)) void values_narrow(const float* p, const float* vp, int64_t Dvp, int64_t n, float* acc,
                                             const float* alpha) {
  vw o[R][G];  // this block's sum, from zero (see values_tile)
  for (int r = 0; r < R; ++r)
    for (int g = 0; g < G; ++g) o[r][g] = splat_as<vw>(0.0f);
  for (int64_t c = 0; c < n; ++c) {
    vw vv[G];
    for (int g = 0; g < G; ++g) vv[g] = *(const vw*)(vp + c * Dvp + VW * g);
    for (int r = 0; r < R; ++r) {
      const vw pr = splat_as<vw>(p[r * BK + c]);
      for (int g = 0; g < G; ++g) o[r][g] += pr * vv[g];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int g = 0; g < G; ++g) {
      vw* a = (vw*)(acc + r * Dvp + VW * g);
      *a = *a * splat_as<vw>(alpha[r]) + o[r][g];
    }
}

// f(g, v) over vectors [0, nv) in groups of GROUP (the last group smaller), g a std::integral_constant.
template <int GROUP, typename F>
inline void by_groups(int64_t nv, F&& f) {
  int64_t v = 0;
  for (; v + GROUP <= nv; v += GROUP) f(std::integral_constant<int, GROUP>{}, v);
  switch (nv - v) {
    case 3: f(std::integral_constant<int, 3>{}, v); break;
    case 2: f(std::integral_constant<int, 2>{}, v); break;
    case 1: f(std::integral_constant<int, 1>{}, v); break;
    default: break;
  }
}
#endif

struct Scratch {
  Buffer<float> qf;      // (M, D) float32 queries (float32 path)
  Buffer<uint16_t> q16;  // (Mp, 2*Dh) bfloat16 queries (dp path)
  Buffer<float> s;       // (Mp, BK) scores, then probabilities (float32 path); AMX: (Mp, AMX_SROW)
  Buffer<uint32_t> p2;   // (Mp, BK/2) probabilities rounded to bfloat16, pairs of keys per word (dp path);
                         // AMX: (Mp, AMX_PROW)
  Buffer<float> ob;      // (32, 32) one block's P V of 32 rows x 32 columns, from the tiles (AMX)
  Buffer<float> acc;     // (M, Dvp) output accumulators
  Buffer<float> mx, sum, alpha;  // (M) running max, running sum, this block's rescale
  Buffer<float> top;             // (M) AMX spans: the score (as S holds it) whose s cx is the frame mx
  Buffer<int64_t> lo, hi;        // (M) each row's visible keys
  Buffer<int64_t> trow;          // (M) each row's offset in the tile bits, tile 0 (block lists)
  uint32_t seen[3] = {0, 0, 0};  // this thread's largest abs_bits of the queries, keys and values it read
  // Mp = M, or with AMX M rounded up to 32: a tile reads and writes 16 rows, and rows past an item's
  // (zero at first, then an earlier item's) give sums no row uses.
  Scratch(const Problem& P) {
    const int64_t M = P.G * P.bq, Mp = P.amx ? (M + 31) / 32 * 32 : M;
    const int64_t SW = P.amx ? AMX_SROW : BK;  // a row of scores: a span's keys with AMX (amx_span)
    const int64_t PW = P.amx ? AMX_PROW : BK / 2;
    qf.reset(P.dp ? 0 : M * P.D);
    q16.reset(P.dp ? Mp * 2 * P.Dh : 0);
    s.reset(Mp * SW);
    p2.reset(P.dp ? Mp * PW : 0);
    ob.reset(P.amx ? 32 * 32 : 0);
    acc.reset(M * P.Dvp);
    mx.reset(M), sum.reset(M), alpha.reset(M + RM), top.reset(M);
    lo.reset(M), hi.reset(M), trow.reset(M);
    if (P.amx && !failed()) {
      std::memset(q16.p, 0, sizeof(uint16_t) * Mp * 2 * P.Dh);
      std::memset(s.p, 0, sizeof(float) * Mp * SW);
      std::memset(p2.p, 0, sizeof(uint32_t) * Mp * PW);
    }
  }
  bool failed() const {
    return qf.failed || q16.failed || s.failed || p2.failed || ob.failed || acc.failed || mx.failed || sum.failed ||
           alpha.failed || top.failed || lo.failed || hi.failed || trow.failed;
  }
};

#if QKV_AMX
// t = s cx - n of chunk t of a row of a span's scores s as the tiles left them (sr: the row of S; j0:
// the span's first key; one multiply-add), -inf off the row's keys [lo, hi), checked only on chunks
// that some row of the item does not see whole (keys [full_lo, full_hi) every row sees). The max pass
// takes cx = sign(cx) and minus_n 0: s sign(cx), exact, whose max is the top score s* (the frame n is
// s* cx rounded, the max of s cx rounded: rounding is monotone).
inline __m512 span_t(const float* sr, int t, __m512 cx, __m512 minus_n, int64_t lo, int64_t hi, int64_t j0,
                     int64_t full_lo, int64_t full_hi) {
  const int64_t jt = j0 + 16 * t;  // the chunk's first key
  v16 x = (v16)_mm512_fmadd_ps(*(const __m512*)(sr + 16 * t), cx, minus_n);
  if (!(jt >= full_lo && jt + 16 <= full_hi)) {
    const uint32_t bits = range_bits(lo - jt, hi - jt);
    if (bits != 0xffffu) x = keep(x, bits);
  }
  return (__m512)x;
}

// The bfloat16 products on AMX tiles (qkv_amx.h's tile_gemm: 2 x 2 accumulator tiles).
//
// S rows [0, M) (and up to 31 rows past them) x chunks [0, nc) of 16 keys: s[r][c] = q[r] . key c over
// the head's Dh pairs (a multiple of 16: a tile step is 32 bfloat16 of the head). q16 (Mp, 2 Dh); kp the
// block's packed keys (Dh, BK, 2), a B tile as it lies (16 pairs of 16 keys, rows BK * 4 bytes apart);
// kp and S (rows of sw floats) offset to the first chunk.
inline void amx_scores(const uint16_t* q16, int64_t Dh, int64_t M, const uint16_t* kp, float* S, int nc,
                       int64_t sw = BK) {
  for (int64_t m = 0; m < M; m += 32)
    for (int t = 0; t < nc; t += 2)
      tile_gemm_of(M - m > 16, nc - t > 1, q16 + m * 2 * Dh, 4 * Dh, 64, kp + 32 * t, BK * 4, 16 * BK * 4, Dh / 16,
                   S + m * sw + 16 * t, sw * 4);
}

// acc[r] = alpha[r] acc[r] + P V for rows r < M: this block's sum from zero, added once (see values_tile),
// 32 rows x 32 columns at a time through ob (32, 32). p2 (rows of pw words) and vp2 ((pairs, Dvp) words)
// offset to the first pair; np pairs, a multiple of 16 (a tile step is 32 keys).
inline void amx_values(const uint32_t* p2, const uint32_t* vp2, int64_t Dvp, int64_t np, int64_t M, float* acc,
                       const float* alpha, float* ob, int64_t pw = BK / 2) {
  for (int64_t m = 0; m < M; m += 32)
    for (int64_t d = 0; d < Dvp; d += 32) {
      const bool two_cols = Dvp - d > 16;  // Dvp is a multiple of 16
      // A: P's rows of pw words (pairs of keys); B: vp2's rows of Dvp words (a pair of keys each)
      tile_gemm_of(M - m > 16, two_cols, p2 + m * pw, pw * 4, 64, vp2 + d, Dvp * 4, 16 * Dvp * 4, np / 16, ob,
                   32 * 4);
      const int64_t rows = std::min<int64_t>(32, M - m), cols = two_cols ? 32 : 16;
      for (int64_t r = 0; r < rows; ++r) {
        const vreg a = vbcast(alpha[m + r]);
        for (int64_t c = 0; c < cols; c += 16) {
          float* x = acc + (m + r) * Dvp + d + c;
          vstore(x, vfma(vload(x), a, vload(ob + r * 32 + c)));
        }
      }
    }
}

#endif

template <int KIND>
void run_item(const Problem& P, const Item& it, int64_t bh, Scratch& W) {
  const int64_t b = bh / P.Hkv, h = bh % P.Hkv;
  const int64_t i0 = it.i0, i1 = it.i1, nr = i1 - i0, M = P.G * nr;
  const int64_t D = P.D, Dvp = P.Dvp, Dh = P.Dh;
  const QkvBlockLists* L = P.bl;
#if QKV_AMX
  // On AMX spans with a scale that is a power of two from 2^-8 to 1 (1/sqrt(D) at D = 4, 16, 64, 256), the
  // queries are packed times the scale (16 at a time), so the tiles leave S scaled. In the fifteenth part
  // that saved the softmax's pass a multiply per 16 scores (0.96-0.97x the time); since the sixteenth the
  // pass folds the scale into its multiply-add (cx) either way, and -DQKV_AMX_NO_PRESCALE builds ran at
  // 0.97-1.01x of this (within the runs' noise of 2-4%). The same bits: a power of two moves each product
  // and partial sum by the same exponent and cannot overflow (scale <= 1), but where a value falls below
  // float32's normals (2^-126), which the tiles (and vcvtneps2bf16) flush to zero: a query entry under
  // 2^-118, a partial sum under 2^-118 of a score. Measured in docs/benchmarks.md, the fifteenth part.
#ifndef QKV_AMX_NO_PRESCALE  // (tests and A/B runs: the raw scores times the scale, as elsewhere)
  const bool prescaled = P.amx && !L && P.scale_pow2;
#else
  constexpr bool prescaled = false;
#endif
  const bool spans = P.amx && !L;
  // AMX spans keep a row's frame in powers of two (amx_span's step 2): P = 2^(s cx - n) of S's scores s, n
  // the max of s cx rounded; s_eff, what S's scores are still to be multiplied by.
  const float s_eff = prescaled ? 1.0f : P.scale, cx = s_eff * LOG2E;
#endif
  // Row m = g * nr + r is query head h * G + g, position i0 + r.
  uint32_t qm = 0;  // the largest abs_bits of the item's queries
  for (int64_t m = 0; m < M; ++m) {
    const int64_t g = m / nr, i = i0 + m % nr, hq = h * P.G + g;
    const int64_t off = b * P.qst[0] + hq * P.qst[1] + i * P.qst[2];
#if QKV_AMX
    if (prescaled) {  // the row's D bfloat16 times the scale (exact), 16 at a time, then zeros to 2 Dh
      const uint16_t* src = (const uint16_t*)P.q + off;
      uint16_t* dst = W.q16.p + m * 2 * Dh;
      const __m512 sc = _mm512_set1_ps(P.scale);
      __m256i top = _mm256_setzero_si256();
      for (int64_t d = 0; d < D; d += 16) {
        const __mmask16 k = d + 16 <= D ? (__mmask16)0xffff : (__mmask16)((1u << (D - d)) - 1u);
        const __m256i raw = _mm256_maskz_loadu_epi16(k, src + d);
        top = _mm256_max_epu16(top, _mm256_and_si256(raw, _mm256_set1_epi16(0x7fff)));
        const __m512i w = _mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16);
        const __m512 scaled_q = _mm512_mul_ps(_mm512_castsi512_ps(w), sc);  // exact: a power of two
        _mm256_mask_storeu_epi16(dst + d, k, (__m256i)_mm512_cvtneps_pbh(scaled_q));
      }
      qm = std::max(qm, (uint32_t)_mm512_reduce_max_epu32(_mm512_cvtepu16_epi32(top)));
      std::memset(dst + D, 0, sizeof(uint16_t) * (2 * Dh - D));
    } else
#endif
    if (P.dp) {
      const uint16_t* src = (const uint16_t*)P.q + off;
      uint16_t* dst = W.q16.p + m * 2 * Dh;
      for (int64_t d = 0; d < 2 * Dh; ++d) dst[d] = d < D ? src[d] : 0;
      for (int64_t d = 0; d < D; ++d) qm = std::max<uint32_t>(qm, src[d] & 0x7fffu);
    } else {
      float* dst = W.qf.p + m * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = load1<KIND>(P.q, off + d), qm = std::max(qm, abs_bits<KIND>(P.q, off + d));
    }
    W.lo.p[m] = P.row_lo(i), W.hi.p[m] = P.row_hi(i);
    W.mx.p[m] = NEG_INF, W.sum.p[m] = 0.0f, W.top.p[m] = NEG_INF;
    if (L) {  // tile bits of (mask batch row, mask head, tile 0, row i - mqb * bq)
      const int64_t bm = L->Bm == 1 ? 0 : b, hm = L->Hm == 1 ? 0 : hq;
      W.trow.p[m] = ((bm * L->Hm + hm) * L->ntiles * L->bq + (i - it.mqb * L->bq)) * (BK / 8);
    }
  }
  W.seen[0] = std::max(W.seen[0], qm);
  std::memset(W.acc.p, 0, sizeof(float) * M * Dvp);
  // Keys any row of the item sees (lo and hi grow with the row).
  const int64_t klo = P.row_lo(i0), khi = P.row_hi(i1 - 1);
  const int64_t full_lo = P.row_lo(i1 - 1), full_hi = P.row_hi(i0);  // keys every row sees
  float* S = W.s.p;
  // One key block kb (tile: -1, or the index of its bits), chunks of 16 keys [c0, c1).
  auto visit = [&](int64_t kb, int32_t tile) {
    const int64_t j0 = kb * BK;
#if QKV_VW < 16
    // The next block's packed keys and values, on their way to L1 while this one is computed: the
    // narrow tiles read a block's keys NG vectors at a time, strided by BK floats, which the hardware
    // prefetcher misses once the head's keys and values outgrow L2 (measured: AVX2 build, float32,
    // L=4096, no band, 0.84-0.86x SDPA without, 0.93-0.95x with; to L2 only, 0.92-0.94x).
    if (kb + 1 < P.nkb && (kb + 1) * BK < khi) {  // (a block past the band is never visited)
      const char* nk = (const char*)(P.kt + ((bh - P.bh0) * P.nkb + kb + 1) * D * BK);
      const char* nv = (const char*)(P.vp + ((bh - P.bh0) * P.nkb * BK + (kb + 1) * BK) * Dvp);
      for (int64_t o = 0; o < D * BK * 4; o += 64) __builtin_prefetch(nk + o, 0, 3);
      for (int64_t o = 0; o < BK * Dvp * 4; o += 64) __builtin_prefetch(nv + o, 0, 3);
    }
#endif
    // Keys [a, z) of the block that some row of the item sees: the band's, narrowed on a partial
    // block to the keys some row has a bit for (the OR of the item's rows of the tile: 128 bits).
    int64_t a = std::max<int64_t>(0, klo - j0), z = std::min<int64_t>(BK, khi - j0);
    const uint8_t* tbits = tile >= 0 ? L->tiles + (int64_t)tile * L->bq * (BK / 8) : nullptr;
    if (tbits) {
      uint64_t any0 = 0, any1 = 0;  // keys 0..63 and 64..127
      for (int64_t m = 0; m < M; ++m) {
        uint64_t w[2];
        std::memcpy(w, tbits + W.trow.p[m], 16);
        any0 |= w[0], any1 |= w[1];
      }
      if (!(any0 | any1)) return;  // no row of the item sees a key of this block
      const int64_t first = any0 ? __builtin_ctzll(any0) : 64 + __builtin_ctzll(any1);
      const int64_t last = any1 ? 127 - __builtin_clzll(any1) : 63 - __builtin_clzll(any0);
      a = std::max(a, first), z = std::min(z, last + 1);
    }
    if (z <= a) return;
    const int c0 = (int)(a / 16), c1 = (int)((z + 15) / 16);
    // 1. Scores of the chunks, rows_for(chunks) rows at a time (narrow builds: NR rows by NG vectors).
#if QKV_VW < 16
    {
      const float* kt = P.kt + ((bh - P.bh0) * P.nkb + kb) * D * BK + 16 * c0;
      float* S0 = S + 16 * c0;
      for (int64_t d0 = 0; d0 < D; d0 += SC)  // pieces of SC terms, each over all the rows
        by_groups<NG>((c1 - c0) * (16 / VW), [&](auto g, int64_t v) {
          by_tiles<NR>(M, [&](auto rows, int64_t m) {
            scores_narrow<decltype(rows)::value, decltype(g)::value>(W.qf.p + m * D + d0, D,
                                                                     std::min<int64_t>(SC, D - d0), kt + d0 * BK + VW * v,
                                                                     S0 + m * BK + VW * v, d0 == 0);
          });
        });
    }
#else
#if QKV_AMX
    if (P.amx)
      amx_scores(W.q16.p, Dh, M, P.kp + ((bh - P.bh0) * P.nkb + kb) * Dh * BK * 2 + 32 * c0, S + 16 * c0, c1 - c0);
    else
#endif
    by_chunks(c1 - c0, [&](auto chunks) {
      constexpr int NC = decltype(chunks)::value, RS = rows_for(NC);
#ifdef __AVX512BF16__
      if (P.dp) {
        const uint16_t* kp = P.kp + ((bh - P.bh0) * P.nkb + kb) * Dh * BK * 2 + 32 * c0;
        by_tiles<RS>(M, [&](auto rows, int64_t m) {
          scores_bf16<decltype(rows)::value, NC>(W.q16.p + m * 2 * Dh, Dh, kp, S + m * BK + 16 * c0);
        });
        return;
      }
#endif
      const float* kt = P.kt + ((bh - P.bh0) * P.nkb + kb) * D * BK + 16 * c0;
      // piece by piece, each piece's keys (SC x 16 NC floats) for all the rows
      for (int64_t d0 = 0; d0 < D; d0 += SC)
        by_tiles<RS>(M, [&](auto rows, int64_t m) {
          scores_f32_piece<decltype(rows)::value, NC>(W.qf.p + m * D + d0, D, std::min<int64_t>(SC, D - d0),
                                                      kt + d0 * BK, S + m * BK + 16 * c0, d0 == 0);
        });
    });
#endif
    // 2. Scale, the band on its edge blocks and the tile's bits, online softmax.
    const bool edge = !(j0 >= full_lo && j0 + BK <= full_hi);
#if QKV_VW < 16  // the same on vectors of VW keys (P.dp is false: no vdpbf16ps without AVX-512), in
    // two passes over the item's rows: each row's max (and alpha), then each row's P and sum. A row's
    // exp is a long chain of dependent operations; in one pass per row a row's max waited on its scores
    // and the next row's work waited on the exp (on a Zen 3 EPYC, float32, in turns: 0.97x-1.01x the
    // one-pass kernel's time at L=1024 and 4096, 0.96x causal). The same bits but the sum's: its two
    // running vectors are added by halves (hsum_pairs).
    for (int64_t m = 0; m < M; ++m) {
      constexpr int PER = 16 / VW;                 // vectors per chunk of 16 keys
      constexpr uint32_t ALL = (1u << VW) - 1u;   // every lane
      const int v0 = c0 * PER, v1 = c1 * PER;
      float* sr = S + m * BK;
      vw mv = splat_as<vw>(0.0f);
      for (int v = v0; v < v1; ++v) {  // scaled and masked in place, and their lane-wise max
        vw x = *(vw*)(sr + VW * v) * P.scale;
        uint32_t bits = ALL;
        if (edge) bits = range_bits(W.lo.p[m] - j0 - VW * v, W.hi.p[m] - j0 - VW * v) & ALL;
        if (tbits) {
          uint16_t word;
          std::memcpy(&word, tbits + W.trow.p[m] + 2 * (v / PER), 2);  // keys of the vector's chunk
          bits &= uint32_t(word) >> (VW * (v % PER));
        }
        if (bits != ALL) x = keepw(x, bits);
        *(vw*)(sr + VW * v) = x;
        mv = v == v0 || x > mv ? x : mv;
      }
      const float old = W.mx.p[m], bmax = hmaxw(mv), now = bmax > old ? bmax : old;
      if (now == NEG_INF) {  // nothing seen yet: this block adds nothing
        for (int v = v0; v < v1; ++v) *(vw*)(sr + VW * v) = splat_as<vw>(0.0f);
        W.alpha.p[m] = 1.0f;
        continue;
      }
      W.alpha.p[m] = rescale(old, now);
      W.mx.p[m] = now;
    }
    for (int64_t m = 0; m < M; ++m) {  // P = exp(x - max), row by row
      const float now = W.mx.p[m];
      if (now == NEG_INF) continue;  // nothing seen yet (its P zeroed above)
      constexpr int PER = 16 / VW;
      const int v0 = c0 * PER, v1 = c1 * PER;
      float* sr = S + m * BK;
      vw total[2] = {splat_as<vw>(0.0f), splat_as<vw>(0.0f)};
      for (int v = v0; v < v1; ++v) {
        const vw pv = vexp_nonpos<vw>(*(vw*)(sr + VW * v) - now);
        *(vw*)(sr + VW * v) = pv;
        total[v & 1] += pv;
      }
      W.sum.p[m] = W.sum.p[m] * W.alpha.p[m] + hsum_pairs(total[0] + total[1]);
    }
#else
    // x of chunk t of row m: the score times the scale, -inf off the band (on edge blocks) and off the tile's
    // bits (block lists).
    auto masked = [&](const float* sr, int64_t m, int t) {
      v16 x = *(const v16*)(sr + 16 * t) * P.scale;
      uint32_t bits = 0xffffu;
      if (edge) bits = range_bits(W.lo.p[m] - j0 - 16 * t, W.hi.p[m] - j0 - 16 * t);
      if (tbits) {
        uint16_t word;
        std::memcpy(&word, tbits + W.trow.p[m] + 2 * t, 2);  // keys 16t .. 16t + 15 of the row
        bits &= word;
      }
      return bits != 0xffffu ? keep(x, bits) : x;
    };
    if (!P.dp) {  // float32: in two passes over the item's rows, as the narrow builds (above), the same bits
      // (x stored in S between them). One pass per row waited on the row's max across the vector before
      // its exps: on an Intel Xeon with AMX (family 6 model 167) the float32 forward at 1024 and 4096 ran in
      // 0.95x-0.98x the time in two, at 16384 0.97x and 1.00x (docs/benchmarks.md, the sixteenth part).
      for (int64_t m = 0; m < M; ++m) {
        float* sr = S + m * BK;
        v16 mv = splat(NEG_INF);
        for (int t = c0; t < c1; ++t) {
          const v16 x = masked(sr, m, t);
          *(v16*)(sr + 16 * t) = x;
          mv = x > mv ? x : mv;
        }
        const float old = W.mx.p[m], bmax = hmax(mv), now = bmax > old ? bmax : old;
        W.alpha.p[m] = rescale(old, now);
        W.mx.p[m] = now;
      }
      for (int64_t m = 0; m < M; ++m) {
        float* sr = S + m * BK;
        const float now = W.mx.p[m];
        if (now == NEG_INF) {  // nothing seen yet: this block adds nothing
          for (int t = c0; t < c1; ++t) *(v16*)(sr + 16 * t) = splat(0.0f);
          W.alpha.p[m] = 1.0f;
          continue;
        }
        v16 total = splat(0.0f);
        for (int t = c0; t < c1; ++t) {
          const v16 pv = exp2_frame<6>(nan_to_minus_inf((__m512)((*(v16*)(sr + 16 * t) - now) * LOG2E)));
          *(v16*)(sr + 16 * t) = pv;
          total += pv;
        }
        W.sum.p[m] = W.sum.p[m] * W.alpha.p[m] + hsum(total);
      }
    }
#ifdef __AVX512BF16__
    else {  // bfloat16 on vdpbf16ps or AMX tiles: one pass per row
      for (int64_t m = 0; m < M; ++m) {
        v16 x[NV];
        for (int t = c0; t < c1; ++t) x[t] = masked(S + m * BK, m, t);
        v16 mv = x[c0];
        for (int t = c0 + 1; t < c1; ++t) mv = x[t] > mv ? x[t] : mv;
        const float old = W.mx.p[m], bmax = hmax(mv), now = bmax > old ? bmax : old;
        if (now == NEG_INF) {  // nothing seen yet: this block adds nothing
          for (int t = c0; t < c1; ++t) std::memset(W.p2.p + m * (BK / 2) + 8 * t, 0, 32);
          W.alpha.p[m] = 1.0f;
          continue;
        }
        const float alpha = rescale(old, now);
        v16 total = splat(0.0f);
        for (int t = c0; t < c1; ++t) {  // P rounded to bfloat16; the row sum (and so the lse) of P unrounded
          const v16 pv = exp2_frame<5>(nan_to_minus_inf((__m512)((x[t] - now) * LOG2E)));
          _mm256_store_si256((__m256i*)(W.p2.p + m * (BK / 2) + 8 * t), (__m256i)_mm512_cvtneps_pbh((__m512)pv));
          total += pv;
        }
        W.sum.p[m] = W.sum.p[m] * alpha + hsum(total);
        W.mx.p[m] = now;
        W.alpha.p[m] = alpha;
      }
    }
#endif
#endif
    // 3. acc = alpha * acc + P V over the keys some row sees, [s0, s0 + n) = [a, z) of the block
    // (from an even key with vdpbf16ps, whose words hold pairs of keys; P is 0 outside [a, z)).
    const int64_t s0 = P.dp ? a & ~int64_t(1) : a, n = z - s0;
#if QKV_AMX
    if (P.amx) {  // over whole steps of 32 keys (pairs of chunks) from the block's first: [e0, e1), so the
      // sums are grouped the same whatever the item's rows (and so the thread count)
      const int e0 = c0 & ~1, e1 = (c1 + 1) & ~1;
      for (int64_t m = 0; m < M; ++m) {  // P = 0 on the chunk so added (its words hold an earlier block's)
        if (e0 < c0) std::memset(W.p2.p + m * (BK / 2) + 8 * e0, 0, 32);
        if (e1 > c1) std::memset(W.p2.p + m * (BK / 2) + 8 * c1, 0, 32);
      }
      const uint32_t* vp2 = P.vp2 + ((bh - P.bh0) * P.nkb * BK + j0 + 16 * e0) / 2 * Dvp;
      amx_values(W.p2.p + 8 * e0, vp2, Dvp, 8 * (e1 - e0), M, W.acc.p, W.alpha.p, W.ob.p);
      return;
    }
#endif
#ifdef __AVX512BF16__
    if (P.dp) {
      const uint32_t* vp2 = P.vp2 + ((bh - P.bh0) * P.nkb * BK + j0 + s0) / 2 * Dvp;
      by_tiles(M, [&](auto rows, int64_t m) {
        values_rows_bf16<decltype(rows)::value>(W.p2.p + m * (BK / 2) + s0 / 2, vp2, Dvp, (n + 1) / 2,
                                                W.acc.p + m * Dvp, W.alpha.p + m);
      });
      return;
    }
#endif
    const float* vp = P.vp + ((bh - P.bh0) * P.nkb * BK + j0 + s0) * Dvp;
#if QKV_VW < 16  // VNG vectors of columns at a time for all the rows
    by_groups<VNG>(Dvp / VW, [&](auto g, int64_t v) {
      by_tiles<VNR>(M, [&](auto rows, int64_t m) {
        values_narrow<decltype(rows)::value, decltype(g)::value>(S + m * BK + s0, vp + VW * v, Dvp, n,
                                                                 W.acc.p + m * Dvp + VW * v, W.alpha.p + m);
      });
    });
    return;
#endif
    for (int64_t d = 0; d < Dvp; d += 64)  // 64 columns at a time (at most 32 KiB of values) for all the rows
      by_tiles(M, [&](auto rows, int64_t m) {
        values_cols<decltype(rows)::value>(S + m * BK + s0, vp + d, Dvp, n, W.acc.p + m * Dvp + d, W.alpha.p + m,
                                           std::min<int64_t>(64, Dvp - d) / 16);
      });
  };
#if QKV_AMX
  // AMX without block lists: the key blocks AMX_SPAN at a time (a span), one online-softmax step per row
  // per span. The row's fixed costs of a step (its max and sum across the vector, the rescale's exp, the
  // output tiles' store and rescale in amx_values) are paid once per span, not once per block (measured:
  // docs/benchmarks.md, "The native kernels, ninth part"). Spans start at multiples of AMX_SPAN blocks
  // whatever the item's rows, and the chunks an item leaves out of a span are ones its rows see nothing
  // of (P = 0, and a step of zeros adds exact zeros), so a row's bits do not depend on the items (and so
  // on the thread count). Chunks [c0, c1) of the span's NV AMX_SPAN are computed; S and p2 rows hold the span.
  auto amx_span = [&](int64_t kb0, int64_t kb1) {
    const int64_t j0 = kb0 * BK;
    const int64_t a = std::max<int64_t>(0, klo - j0), z = std::min<int64_t>((kb1 - kb0) * BK, khi - j0);
    if (z <= a) return;
    const int c0 = (int)(a / 16), c1 = (int)((z + 15) / 16);
    const int e0 = c0 & ~1, e1 = (c1 + 1) & ~1;  // whole steps of 32 keys from the span's first
    const int span_c0 = c0, span_c1 = c1, span_e0 = e0, span_e1 = e1;  // for p_pass's locals
    // 1. Scores, key block by key block (each block's keys packed apart).
    for (int64_t kb = kb0; kb < kb1; ++kb) {
      const int f = (int)(kb - kb0) * NV, b0 = std::max(c0, f), b1 = std::min(c1, f + NV);
      if (b1 > b0)
        amx_scores(W.q16.p, Dh, M, P.kp + ((bh - P.bh0) * P.nkb + kb) * Dh * BK * 2 + 32 * (b0 - f), S + 16 * b0,
                   b1 - b0, AMX_SROW);
    }
    // 2. The online softmax over the span, row by row, in powers of two: a row's frame n is its max s
    // times cx (rounded to float; -inf before the row has seen a key), and P = 2^(s cx - n) (exp2_frame), so
    // that the pass over a chunk is one multiply-add before the exponential. The scores are masked by
    // the band (on the chunks some row of the item does not see whole) as they are read from S, which
    // keeps them as the tiles left them. A row with a frame takes P = 2^(s cx - n) in one pass over the
    // span (the standing pass), keeping the largest of P's bfloat16 words on the way (P >= 0, so the words
    // order as P does, and a NaN's lies above them all): where it is at most 8's (AMX_STAND_WORD), the
    // step stands (alpha 1: acc and the sum stay in their frame; P up to 8). Otherwise, or where the row
    // has no frame yet, the step runs as FA-2's: the max first, then P = 2^(s cx - n') in the new frame n'
    // and alpha = 2^(n - n'), a NaN t taken as -inf so that a NaN score gives P = 0 and stays out of the max.
    // Where the max is at most the frame's, both give the same bits. One pass instead of two over S:
    // 0.87-0.95x the time (docs/benchmarks.md, the tenth part); the multiply-add, and the words' max in
    // place of the scores' (one vpmaxuw per pair of chunks, not a vmaxps per chunk): 0.79-0.87x causal,
    // 0.90-0.97x without a band (the sixteenth part). The frame is the row's own history, so a row's bits
    // do not depend on the items (or the thread count). FlashAttention-4's kernels skip the rescale the
    // same way until the max has grown past a threshold (Dao et al., 2025).
    //
    // P of chunks [c0, c1) rounded to bfloat16 into pr, two chunks per vcvtne2ps2bf16 (vcvtneps2bf16's
    // rounding, one instruction and one store fewer per pair), and P = 0 on the chunks the whole steps
    // [e0, e1) add past them; returns the sum of P unrounded (in chunk order), the row sum's (and so the
    // lse's). CLAMPED (FA-2's step): a NaN t taken as -inf; else (the standing pass) the words' max into `words`.
    auto p_pass = [&](auto clamped, const float* sr, uint32_t* pr, int64_t lo, int64_t hi, float n,
                      __m512i& words) {
      // What the loop reads of the span, as locals: the stores of P go through vector types that may
      // alias anything, after which values read through this lambda's references were loaded again for
      // every chunk (0.97x the time as locals; docs/benchmarks.md, the fifteenth part).
      constexpr bool CLAMPED = decltype(clamped)::value;
      const __m512 cxv = _mm512_set1_ps(cx), minus_n = _mm512_set1_ps(-n);
      const int64_t jb = j0, flo = full_lo, fhi = full_hi;
      const int c0 = span_c0, c1 = span_c1, e0 = span_e0, e1 = span_e1;
      auto p_of = [=](int t) {  // P of chunk t
        __m512 tt = span_t(sr, t, cxv, minus_n, lo, hi, jb, flo, fhi);
        if constexpr (CLAMPED) tt = nan_to_minus_inf(tt);
        return exp2_frame<5>(tt);
      };
      v16 total = splat(0.0f);
      __m512i top = _mm512_setzero_si512();  // the largest words of P so far (standing pass)
      int t = c0;
      if (t & 1) {  // an odd first chunk alone (its pair's first half is outside [c0, c1))
        const v16 pv = p_of(t);
        const __m256i w = (__m256i)_mm512_cvtneps_pbh((__m512)pv);
        _mm256_store_si256((__m256i*)(pr + 8 * t), w);
        if constexpr (!CLAMPED) top = _mm512_max_epu16(top, _mm512_zextsi256_si512(w));
        total += pv, ++t;
      }
      for (; t + 1 < c1; t += 2) {
        const v16 p0 = p_of(t), p1 = p_of(t + 1);
        const __m512i w = (__m512i)_mm512_cvtne2ps_pbh((__m512)p1, (__m512)p0);
        _mm512_store_si512((__m512i*)(pr + 8 * t), w);
        if constexpr (!CLAMPED) top = _mm512_max_epu16(top, w);
        total += p0, total += p1;
      }
      if (t < c1) {
        const v16 pv = p_of(t);
        const __m256i w = (__m256i)_mm512_cvtneps_pbh((__m512)pv);
        _mm256_store_si256((__m256i*)(pr + 8 * t), w);
        if constexpr (!CLAMPED) top = _mm512_max_epu16(top, _mm512_zextsi256_si512(w));
        total += pv;
      }
      if (e0 < c0) std::memset(pr + 8 * e0, 0, 32);
      if (e1 > c1) std::memset(pr + 8 * c1, 0, 32);
      words = top;
      return total;
    };
    for (int64_t m = 0; m < M; ++m) {
      const float* sr = S + m * AMX_SROW;
      uint32_t* pr = W.p2.p + m * AMX_PROW;
      const int64_t lo = W.lo.p[m], hi = W.hi.p[m];
      const float old = W.mx.p[m];  // the row's frame n
      __m512i words;
      if (std::isfinite(old)) {  // one pass in the frame (+inf: two, which give NaN as FA-2's)
        const v16 total = p_pass(std::false_type{}, sr, pr, lo, hi, old, words);
        // the largest bfloat16 word of P (P >= 0: words in P's order, NaN above them all) at most 8's
        if (_mm512_cmpgt_epu16_mask(words, _mm512_set1_epi16(AMX_STAND_WORD)) == 0) {  // the step stands
          W.sum.p[m] += hsum(total);
          W.alpha.p[m] = 1.0f;
          continue;
        }
      }
      // The max of s sign(cx) (exact; a NaN stays out of it), so the top score s* and its frame fl(s* cx),
      // the max of s cx rounded (rounding is monotone).
      v16 mv = splat(NEG_INF);
      const float sign = cx < 0.0f ? -1.0f : 1.0f;
      const __m512 signv = _mm512_set1_ps(sign), zero = _mm512_setzero_ps();
      for (int t = c0; t < c1; ++t) {
        const v16 x = (v16)span_t(sr, t, signv, zero, lo, hi, j0, full_lo, full_hi);
        mv = x > mv ? x : mv;
      }
      const float best = hmax(mv), s_top = best * sign, n_top = best == NEG_INF ? NEG_INF : s_top * cx;
      const float now = std::max(n_top, old);  // old: -inf, or +inf (then alpha NaN, as FA-2's)
      if (n_top > old) W.top.p[m] = s_top;
      if (now == NEG_INF) {  // nothing seen yet: this span adds nothing
        std::memset(pr + 8 * e0, 0, 32 * (e1 - e0));
        W.alpha.p[m] = 1.0f;
        continue;
      }
      const float alpha = old == NEG_INF ? 0.0f : std::exp2(old - now);
      const v16 total = p_pass(std::true_type{}, sr, pr, lo, hi, now, words);
      W.sum.p[m] = W.sum.p[m] * alpha + hsum(total);
      W.mx.p[m] = now;
      W.alpha.p[m] = alpha;
    }
    // 3. acc = alpha acc + P V over the span's steps [e0, e1) (vp2's keys run on across blocks).
    const uint32_t* vp2 = P.vp2 + ((bh - P.bh0) * P.nkb * BK + j0 + 16 * e0) / 2 * Dvp;
    amx_values(W.p2.p + 8 * e0, vp2, Dvp, 8 * (e1 - e0), M, W.acc.p, W.alpha.p, W.ob.p, AMX_PROW);
  };
  if (P.amx) amx_begin();  // this thread's tiles configured
  if (spans && khi > klo) {
    for (int64_t kb0 = klo / BK / AMX_SPAN * AMX_SPAN; kb0 * BK < khi; kb0 += AMX_SPAN)
      amx_span(kb0, std::min<int64_t>(P.nkb, kb0 + AMX_SPAN));
  } else
#endif
  if (khi > klo) {
    if (!L) {
      for (int64_t kb = klo / BK; kb * BK < khi; ++kb) visit(kb, -1);
    } else {
      for (int64_t e = L->q_ptr[it.mqb]; e < L->q_ptr[it.mqb + 1]; ++e) {
        const int64_t kb = L->q_kb[e];
        if (kb * BK < khi && kb * BK + BK > klo) visit(kb, L->q_tile[e]);  // listed, and inside the band
      }
    }
  }
#if QKV_AMX
  if (P.amx) amx_end();
#endif
  // 4. out = acc / sum, lse = max + log(sum); a row that saw nothing: 0 and -inf.
  for (int64_t m = 0; m < M; ++m) {
    const int64_t g = m / nr, i = i0 + m % nr, hq = h * P.G + g;
    const int64_t row = (b * P.Hq + hq) * P.Lq + i;
    const float l = W.sum.p[m];
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    // lse = max + log(sum) in double, then rounded; its low part (what the rounding left out) for the
    // backward, where a float lse at large logits (ulp 0.002 at 26685) would move P by up to 1e-3.
#if QKV_AMX
    // AMX spans: the top score scaled as the backward scales it, and the frame's rounding (n - s* cx, exact in
    // double) put back, so lse + lse_lo ends within the polynomial's error (about 1e-7) of the backward's
    // scaled top score where P is 1 there (n / cx left the scaled score's rounding in lse_lo: up to half an
    // ulp of the lse, 1.2e-4 at 2048; test_the_lse_ends_at_the_top_score_the_backward_scales)
    const double frame = !spans ? double(W.mx.p[m])
                                : double(float(double(W.top.p[m]) * s_eff)) +
                                      (double(W.mx.p[m]) - double(W.top.p[m]) * double(cx)) * 0.6931471805599453;
#else
    const double frame = double(W.mx.p[m]);
#endif
    const double full = l > 0.0f ? frame + std::log(double(l)) : 0.0;
    P.lse[row] = l > 0.0f ? float(full) : NEG_INF;
    if (P.lse_lo) P.lse_lo[row] = l > 0.0f ? float(full - double(float(full))) : 0.0f;
    const float* a = W.acc.p + m * Dvp;
    if (KIND == 0) {
      float* o = (float*)P.out + row * P.Dv;
      for (int64_t d = 0; d < P.Dv; ++d) o[d] = a[d] * inv;
    } else {
      uint16_t* o = (uint16_t*)P.out + row * P.Dv;
      for (int64_t d = 0; d < P.Dv; ++d) o[d] = f32_to_bf16(a[d] * inv);
    }
  }
}

// fn(item, thread) for item in [0, count), items handed out one at a time.
template <typename F>
void parallel_for(int64_t count, int nthreads, F&& fn) {
  if (count <= 0) return;
  if (nthreads > count) nthreads = (int)count;
#ifdef _OPENMP
  // torch's own OpenMP runtime (libgomp is already loaded by torch), so the kernel runs on the
  // threads torch's operators use.
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1)
  for (int64_t x = 0; x < count; ++x) fn(x, omp_get_thread_num());
#else
  std::atomic<int64_t> next{0};
  auto worker = [&](int t) {
    for (int64_t x = next++; x < count; x = next++) fn(x, t);
  };
  std::vector<std::thread> pool;
  for (int t = 1; t < nthreads; ++t) pool.emplace_back(worker, t);
  worker(0);
  for (auto& th : pool) th.join();
#endif
}

// The kv heads are packed and run in groups of at most GROUP_BYTES of packed keys and values (at
// least one head per group): the buffers are reused from group to group, so a long call faults in
// fresh pages for one group, not for every head. Measured (window 256, L=16384, B=1, H=8, D=64,
// float32, one thread, thread CPU time): 4 KiB pages and one group 169 ms, groups of 8 MiB 135 ms;
// huge pages (Buffer above) and one group 137-141 ms, groups of 24 to 64 MiB 134-137 ms. Each group
// adds a barrier between the packing and the attention phases, which costs most when other jobs
// share the cores (two threads, wall time: 8 MiB groups slower than one group), hence 64 MiB.
// The packing buffers are kept from call to call (one arena, at most GROUP_BYTES, for one call at a
// time; a concurrent call or a larger one allocates its own): a fresh buffer costs page faults and
// the kernel's zeroing of every page, 4% of a window-256 call at L=16384.
struct Arena {
  std::mutex mu;
  Buffer<char> buf;
  int64_t size = 0;
};
Arena& arena() {
  // Never destroyed (the process's exit returns the memory): a destructor run by exit() could free
  // the buffer under a thread still inside the kernel (ctypes releases the GIL), or destroy a
  // locked mutex.
  static Arena* a = new Arena;
  return *a;
}

#ifndef QKV_GROUP_BYTES
#define QKV_GROUP_BYTES (int64_t(64) << 20)
#endif
constexpr int64_t GROUP_BYTES = QKV_GROUP_BYTES;

template <int KIND>
int run(Problem& P, int nthreads) {
  const int64_t BH = P.B * P.Hkv;
  const int64_t per_head = P.dp ? P.nkb * BK * (P.Dh * 2 * 2 + P.Dvp * 2) : P.nkb * BK * (P.D + P.Dvp) * 4;
  const int64_t hg = std::clamp<int64_t>(GROUP_BYTES / std::max<int64_t>(per_head, 1), 1, BH);
  auto bytes = [](int64_t n) { return (n + 63) / 64 * 64; };  // each buffer 64-byte aligned in the arena
  const int64_t kt_b = bytes(P.dp ? 0 : hg * P.nkb * P.D * BK * 4), kp_b = bytes(P.dp ? hg * P.nkb * P.Dh * BK * 4 : 0);
  const int64_t vp_b = bytes(P.dp ? 0 : hg * P.nkb * BK * P.Dvp * 4), vp2_b = bytes(P.dp ? hg * P.nkb * BK / 2 * P.Dvp * 4 : 0);
  const int64_t total = kt_b + kp_b + vp_b + vp2_b;
  if (total < 0) return 3;  // sizes past int64
  // The arena of the previous call where it is free and the packed data fits GROUP_BYTES; else fresh.
  Arena& A = arena();
  std::unique_lock<std::mutex> lock(A.mu, std::try_to_lock);
  Buffer<char> fresh;
  char* base;
  if (lock.owns_lock() && total <= GROUP_BYTES) {
    if (A.size < total) {
      A.buf.reset(total);
      A.size = A.buf.failed ? 0 : total;
      if (A.buf.failed) return 3;
    }
    base = A.buf.p;
  } else {
    if (lock.owns_lock()) lock.unlock();
    fresh.reset(total);
    if (fresh.failed) return 3;
    base = fresh.p;
  }
  P.kt = kt_b ? (float*)base : nullptr;
  P.kp = kp_b ? (uint16_t*)(base + kt_b) : nullptr;
  P.vp = vp_b ? (float*)(base + kt_b + kp_b) : nullptr;
  P.vp2 = vp2_b ? (uint32_t*)(base + kt_b + kp_b + vp_b) : nullptr;
  // Only the key blocks some query sees (a window over a long cache leaves most of it out; block
  // lists leave out the blocks they do not list).
  const int64_t kb0 = P.row_lo(0) / BK, kb1 = (P.row_hi(P.Lq - 1) + BK - 1) / BK;
  std::vector<int64_t> blocks;
  for (int64_t kb = kb0; kb < kb1; ++kb)
    if (!P.bl || P.bl->k_ptr[kb + 1] > P.bl->k_ptr[kb]) blocks.push_back(kb);
  const int64_t nb = (int64_t)blocks.size(), ni = (int64_t)P.items.size();
  std::vector<std::unique_ptr<Scratch>> scratch;
  for (int t = 0; t < nthreads; ++t) {
    scratch.emplace_back(new Scratch(P));
    if (scratch.back()->failed()) return 3;
  }
  for (int64_t bh0 = 0; bh0 < BH; bh0 += hg) {
    const int64_t nh = std::min(hg, BH - bh0);
    P.bh0 = bh0;
    if (nb)
      parallel_for(nh * nb, nthreads,
                   [&](int64_t x, int t) { pack_block<KIND>(P, bh0 + x / nb, blocks[x % nb], scratch[t]->seen + 1); });
    // Items in turn across the heads (each item's heads, then the next item), so that a causal band's
    // costliest items run first everywhere. On AMX tiles, head by head instead: an item then finds its
    // head's packed keys and values where the head's items before it left them (in L2 at 4096 tokens,
    // bfloat16: 1 MiB a head), not in L3. On an Intel Xeon with AMX (family 6 model 167, 2 threads, B=1,
    // H=8, D=64; benchmarks/kernels_ab.py): causal 0.89x the time at 4096, 0.96x at 16384; without a band
    // 0.98x (docs/benchmarks.md, the fifteenth part). Other CPUs keep the turns (not measured there).
    if (P.amx)
      parallel_for(nh * ni, nthreads,
                   [&](int64_t x, int t) { run_item<KIND>(P, P.items[x % ni], bh0 + x / ni, *scratch[t]); });
    else
      parallel_for(nh * ni, nthreads,
                   [&](int64_t x, int t) { run_item<KIND>(P, P.items[x / nh], bh0 + x % nh, *scratch[t]); });
  }
  if (P.absmax)
    for (int j = 0; j < 3; ++j) {
      P.absmax[j] = 0;
      for (int t = 0; t < nthreads; ++t) P.absmax[j] = std::max(P.absmax[j], scratch[t]->seen[j]);
    }
  return 0;
}

// Whether block lists fit the call (0) or not (4).
int check_lists(const QkvBlockLists* L, int64_t B, int64_t Hq, int64_t Lq, int64_t Lk) {
  if (L->bk != BK || L->bq < 1 || L->nq != (Lq + L->bq - 1) / L->bq || L->nk != (Lk + BK - 1) / BK) return 4;
  if ((L->Bm != 1 && L->Bm != B) || (L->Hm != 1 && L->Hm != Hq) || L->ntiles < 0) return 4;
  if (!L->q_ptr || !L->k_ptr || L->q_ptr[0] != 0 || L->q_ptr[L->nq] != L->k_ptr[L->nk]) return 4;
  const int64_t nnz = L->q_ptr[L->nq];
  if (nnz > 0 && (!L->q_kb || !L->q_tile)) return 4;
  if (L->ntiles > 0 && !L->tiles) return 4;
  for (int64_t e = 0; e < nnz; ++e)
    if (L->q_kb[e] < 0 || L->q_kb[e] >= L->nk || L->q_tile[e] < -1 || L->q_tile[e] >= L->ntiles) return 4;
  return 0;
}

}  // namespace

extern "C" {

// Returns 0, or 1 for an unknown kind, 2 for an unsupported size (D or Dv outside 1..256, or
// Hq not a multiple of Hkv), 3 where the packed keys and values could not be allocated, 4 for
// block lists that do not fit the call (key blocks other than 128, counts that do not match
// the lengths, Bm or Hm other than 1, B or 1, Hq, an index out of range).
int qkv_flash_fwd(int kind, int64_t B, int64_t Hq, int64_t Hkv, int64_t Lq, int64_t Lk, int64_t D, int64_t Dv,
                  const void* q, const int64_t* qst, const void* k, const int64_t* kst, const void* v,
                  const int64_t* vst, float scale, int64_t left, int64_t right, int64_t offset, void* out,
                  float* lse, int threads, const QkvBlockLists* blocks, float* lse_lo, uint32_t* absmax) {
  if (absmax) absmax[0] = absmax[1] = absmax[2] = 0;
  if (kind != 0 && kind != 1) return 1;
  if (D < 1 || D > MAX_DIM || Dv < 1 || Dv > MAX_DIM || Hkv < 1 || Hq < Hkv || Hq % Hkv != 0) return 2;
  if (B <= 0 || Lq <= 0) return 0;
  if (Lk < 0) Lk = 0;
  if (blocks && check_lists(blocks, B, Hq, Lq, Lk) != 0) return 4;
  Problem P{};
  P.kind = kind;
  P.B = B, P.Hq = Hq, P.Hkv = Hkv, P.G = Hq / Hkv, P.Lq = Lq, P.Lk = Lk, P.D = D, P.Dv = Dv;
  P.q = q, P.k = k, P.v = v;
  for (int t = 0; t < 4; ++t) P.qst[t] = qst[t], P.kst[t] = kst[t], P.vst[t] = vst[t];
  P.scale = scale, P.left = left, P.right = right, P.offset = offset;
  P.out = out, P.lse = lse, P.lse_lo = lse_lo, P.bl = blocks, P.absmax = absmax;
#ifdef __AVX512BF16__
  P.dp = kind == 1;
#else
  P.dp = false;
#endif
#if QKV_AMX
  P.amx = P.dp && amx_state() > 0;
#else
  P.amx = false;
#endif
  P.nkb = (P.Lk + BK - 1) / BK;
  {
    int e = 0;
    P.scale_pow2 = std::isfinite(scale) && scale > 0.0f && std::frexp(scale, &e) == 0.5f && e >= -7 && e <= 1;
  }
  P.Dh = P.amx ? (D + 31) / 32 * 16 : (D + 1) / 2;
  P.Dvp = (Dv + 15) / 16 * 16;
  if (threads < 1) threads = 1;
  // About 64 rows per item (the group's heads times the positions), 32 under a band bounded on
  // both sides (a sliding window: the keys an item spans exceed a row's by its rows - 1; measured
  // 4-8% faster at window 256, the same elsewhere), fewer positions where that leaves too few
  // items to keep the threads busy. With block lists, 32 rows in the query blocks whose listed
  // blocks are at least half partial (below). On AMX tiles without block lists: 256 rows without a
  // band, and causal (no left edge, right edge 0) 128 from 8192 queries; other bands as above. On an
  // Intel Xeon with AMX (family 6 model 167, 2 threads, B=1, H=8, D=64, bfloat16;
  // benchmarks/kernels_ab.py --define-after QKV_AMX_ROWS_FULL=N), against 64 rows: without a band 0.82x
  // the time at 4096 and 0.79x at 16384 (256 rows), 0.87x and 0.83x (192), 0.84x and 0.81x (384); causal
  // 128 rows 0.92x at 16384, 0.95x at 8192, but 1.05x at 4096 and 1.18x at 2048, so 64 there
  // (docs/benchmarks.md, the fifteenth part). float32 on a CPU whose tiles run (amx_state: the AMX kind;
  // its float32 products are the AVX-512 tiles of this file, not AMX's) the same: 256 rows without a band,
  // 128 causal from 8192 queries; a head's packed float32 keys and values (128 KiB per 1024 keys at D=64)
  // are read from L2 or L3 once per item. On the same Xeon (float32, 256 or 128 rows against 64): without a band 0.96x-0.97x the time at 1024 and 4096, 0.81x-0.86x at
  // 16384 (256 rows against 64; against 128: 0.96x-0.99x); causal 128 rows 0.93x-0.96x at 16384 but
  // 1.01x-1.04x at 1024 and 4096 (the sixteenth part, with the float32 rows as knobs of their own then).
  int64_t rows = left >= 0 && right >= 0 ? QKV_ROWS / 2 : QKV_ROWS;
#ifndef QKV_AMX_ROWS_FULL
#define QKV_AMX_ROWS_FULL 256
#endif
#ifndef QKV_AMX_ROWS_CAUSAL
#define QKV_AMX_ROWS_CAUSAL 128
#endif
#if QKV_AMX
  if (!blocks && left < 0 && amx_state() > 0) {  // the AMX kind, both dtypes (bfloat16: P.amx)
    if (right < 0) rows = QKV_AMX_ROWS_FULL;
    else if (right == 0 && Lq >= 8192) rows = QKV_AMX_ROWS_CAUSAL;
  }
#endif
  P.bq = std::max<int64_t>(1, rows / P.G);
  while (P.bq > 8 && B * Hkv * ((Lq + P.bq - 1) / P.bq) < 4 * threads) P.bq /= 2;
  P.bq = std::min(P.bq, Lq);
  if (!blocks) {  // blocks of bq positions, the last (under a causal band the costliest) first
    for (int64_t qb = (Lq + P.bq - 1) / P.bq - 1; qb >= 0; --qb)
      P.items.push_back({qb * P.bq, std::min(Lq, qb * P.bq + P.bq), -1});
  } else {
    // Each query block of the lists in equal pieces of at most bq positions, most blocks listed
    // first; 32 rows where at least half the listed blocks are partial: an item computes the chunks
    // of a partial block that any of its rows has a bit in, and where the bits move with the row (a
    // window's or a causal diagonal) that is about the rows' own keys plus the item's rows. Measured
    // (this rule against items of 64 and of 32 rows in every query block, the three kernels timed
    // in turns in one process, best of 5; B=1, H=8, D=64, 2 threads, float32 and bfloat16): causal
    // window 256 and global 16 + window 256 at L=4096 and 16384 5-9% faster than 64 rows, as fast as
    // 32; packed documents the same within noise; causal as a BlockMask at L=16384 (64 blocks listed
    // per query block on average) as fast as 64 rows, where 32 rows everywhere ran 5-10% slower.
#ifndef QKV_LIST_RULE
#define QKV_LIST_RULE 1  // 0: items of bq positions in every query block (for experiments)
#endif
    for (int64_t mqb = blocks->nq - 1; mqb >= 0; --mqb) {
      int64_t partial = 0;
      for (int64_t e = blocks->q_ptr[mqb]; e < blocks->q_ptr[mqb + 1]; ++e) partial += blocks->q_tile[e] >= 0;
      const int64_t listed = blocks->q_ptr[mqb + 1] - blocks->q_ptr[mqb];
      const bool narrow = QKV_LIST_RULE && 2 * partial >= listed;
      const int64_t bq = narrow ? std::min(P.bq, std::max<int64_t>(1, QKV_ROWS / 2 / P.G)) : P.bq;
      const int64_t r0 = mqb * blocks->bq, len = std::min(Lq, r0 + blocks->bq) - r0, pieces = (len + bq - 1) / bq;
      for (int64_t p = 0; p < pieces; ++p) P.items.push_back({r0 + len * p / pieces, r0 + len * (p + 1) / pieces, mqb});
    }
    const int32_t* ptr = blocks->q_ptr;
    std::stable_sort(P.items.begin(), P.items.end(), [ptr](const Item& a, const Item& c) {
      return ptr[a.mqb + 1] - ptr[a.mqb] > ptr[c.mqb + 1] - ptr[c.mqb];
    });
  }
  return kind == 0 ? run<0>(P, threads) : run<1>(P, threads);
}

// The kernel's interface version, checked by the binding (3: qkv_flash_vector_width, qkv_flash_has_fma;
// 4: lse_lo; 5: absmax).
int qkv_flash_fwd_version() { return 5; }

// The floats per vector of the build's tiles: 16 (AVX-512), 8 (AVX, AVX2: the narrow tiles) or 4.
int qkv_flash_vector_width() { return VW; }

// Whether the build's products run on fused multiply-adds (FMA on x86, fmla on ARM). Without them
// each product is rounded before it is added, and the scores at large logits, and the gradients
// at head sizes near 256, miss the tolerance rule (the native backend, backend/native.py, refuses such
// a build by name; the sparse backend takes only the AVX-512 build).
int qkv_flash_has_fma() { return QKV_FMA; }

// Where the bfloat16 forward's products run on AMX tiles (qkv_amx.h): 2 on the processor's (the build
// targets AMX-BF16, Linux granted the tile data and the tiles passed amx_self_check), 1 on the software
// model (a -DQKV_AMX_EMULATE build, for tests), 0 nowhere (no tiles in this build); nowhere, the
// vdpbf16ps tiles running instead, because Linux refused the tile data (-1) or the self-check failed (-2).
int qkv_flash_amx() {
#if QKV_AMX
  return amx_state();
#else
  return 0;
#endif
}

// The errno of the kernel's request for the tile data (0: granted, or not asked: no tiles in the build).
int qkv_flash_amx_errno() {
#if QKV_AMX
  return amx_permission_errno();
#else
  return 0;
#endif
}

// Whether bfloat16 scores use the processor's bfloat16 dot product (vdpbf16ps).
int qkv_flash_has_bf16_dot() {
#ifdef __AVX512BF16__
  return 1;
#else
  return 0;
#endif
}
}
