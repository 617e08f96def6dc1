// AMX tiles for the FA-2 kernels' bfloat16 products (flash_fwd_kernel.cpp, flash_bwd_kernel.cpp): Intel's Advanced
// Matrix Extensions, eight tile registers of up to 16 rows x 64 bytes and TDPBF16PS, C (16 x 16
// float32) += A (16 x 32 bfloat16) B (16 pairs x 16 columns x 2 bfloat16), the pairs of B interleaved
// along the sum as vdpbf16ps takes them (Intel 64 and IA-32 Architectures Software Developer's Manual,
// vol. 1 ch. 18 "Programming with Intel AMX", vol. 2 TDPBF16PS/TILELOADD/LDTILECFG; Linux's
// Documentation/arch/x86/xstate.rst for the permission below). Every tile is configured 16 x 64 bytes.
//
// QKV_AMX is 2 where the compiler targets AMX-TILE and AMX-BF16 (with AVX512-BF16: -march=native on a
// Sapphire Rapids or later Xeon) on Linux: the processor's tiles, used when the kernel asks Linux for
// the tile data state (arch_prctl ARCH_REQ_XCOMP_PERM, once per process) and gets it, and the tiles pass
// amx_self_check; where Linux refuses or the check fails, the kernel runs its vdpbf16ps tiles
// (qkv_flash_amx and qkv_flash_bwd_amx say which). QKV_AMX is 1 with
// -DQKV_AMX_EMULATE on a build with AVX512-BF16: a software model of the same five operations, so the
// kernel's use of the tiles (the packing, the tile walk, the padding) is tested on CPUs without AMX
// (tests/core/test_native_flash_amx.py); slow, for tests only. -DQKV_NO_AMX leaves the tiles out (0),
// for A/B runs (benchmarks/kernels_ab.py --define-after QKV_NO_AMX=1). -DQKV_EXPECT_AMX=N stops a build
// whose QKV_AMX is not N, and -DQKV_AMX_EMULATE_WRONG makes the model read B's pairs swapped, as a
// processor unlike the model would: the tests' checks of the build and of the kernel's self-check.
// -DQKV_AMX_FAKE_TILES (with -mamx-tile -mamx-bf16 -I tests/core/amx_fake) compiles the processor's path,
// QKV_AMX 2, against stand-ins for GCC's AMX headers that emulate the instructions in asm: the real
// path's code, as GCC optimizes it, run on a CPU without AMX (tests/core/test_native_flash_amx.py).
//
// The model follows the Software Developer's Manual's pseudocode of TDPBF16PS: for each row m and
// column n, two float32 sums from zero, even += a[m][2k] b[k][n][0] and odd += a[m][2k+1] b[k][n][1]
// in order over the 16 pairs k, then c[m][n] += even + odd; each product exact in float32, each sum
// rounded to nearest even, bfloat16 subnormal inputs read as zero and subnormal results written as
// zero. (The Intrinsics Guide's older pseudocode sums into c directly, pair by pair; the tests hold
// the kernel to the tolerance rule, not to bits, so either order passes.)
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__linux__) && \
    !defined(QKV_NO_AMX) && !defined(QKV_AMX_EMULATE)
#define QKV_AMX 2
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#elif defined(QKV_AMX_EMULATE) && defined(__AVX512BF16__) && !defined(QKV_NO_AMX)
#define QKV_AMX 1
#else
#define QKV_AMX 0
#endif
#if defined(QKV_EXPECT_AMX) && QKV_EXPECT_AMX != QKV_AMX
#error "QKV_AMX differs from QKV_EXPECT_AMX (a test's check of which tiles the build has)"
#endif

#if QKV_AMX
namespace {

constexpr int TILE_ROWS = 16;   // rows of every tile
constexpr int TILE_BYTES = 64;  // bytes per row: 16 float32, 32 bfloat16 or 16 pairs

#if QKV_AMX == 2
// LDTILECFG's 64-byte operand: palette 1, every tile used 16 rows x 64 bytes.
struct alignas(64) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Linux's answer to this process's request for the tile data (asked once; the answer holds for every
// thread): 0 where granted, else the errno (EINVAL: a kernel before 5.16 or a CPU without the state;
// ENOSPC: a thread's alternate signal stack too small for the larger signal frame).
inline int amx_permission_errno() {
#ifdef QKV_AMX_FAKE_TILES  // tests: the tiles of tests/core/amx_fake (software; no permission to ask)
  return 0;
#endif
  static const int err =
      syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0 ? 0 : errno;
  return err;
}
inline bool amx_permitted() { return amx_permission_errno() == 0; }

// The calling thread's tiles configured (before its first tile operation); amx_end releases them.
// The configuration is a constant (in .rodata), not a local: GCC 12's _tile_loadconfig tells the
// optimizer it reads 8 bytes, so the stores that build a local configuration past byte 8 may be dropped
// as dead (they were, at -Os, and in amx_begin compiled on its own: a review's finding), leaving the
// tiles unconfigured.
alignas(64) constexpr TileConfig AMX_CONFIG = {1, 0, {},
                                               {64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0},
                                               {16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0}};
static_assert(sizeof(TileConfig) == 64, "LDTILECFG's operand is 64 bytes");
inline void amx_begin() { _tile_loadconfig(&AMX_CONFIG); }
inline void amx_end() { _tile_release(); }

// A compiler barrier: GCC 12's tile loads and stores pass only the address to their asm, with no memory
// operand (and the loads no "memory" clobber), so without it the optimizer may drop or move stores to
// the buffers a tile then reads (P's bfloat16 words, the packed operands), or reads of what a tile wrote.
inline void tile_fence() { asm volatile("" ::: "memory"); }

// The intrinsics take the tile's number as a literal (GCC pastes it into the instruction).
template <int T>
inline void tile_load(const void* p, int64_t stride) {
  static_assert(T >= 0 && T < 8, "tiles 0 to 7");
  tile_fence();
  if constexpr (T == 0) _tile_loadd(0, p, stride);
  else if constexpr (T == 1) _tile_loadd(1, p, stride);
  else if constexpr (T == 2) _tile_loadd(2, p, stride);
  else if constexpr (T == 3) _tile_loadd(3, p, stride);
  else if constexpr (T == 4) _tile_loadd(4, p, stride);
  else if constexpr (T == 5) _tile_loadd(5, p, stride);
  else if constexpr (T == 6) _tile_loadd(6, p, stride);
  else _tile_loadd(7, p, stride);
}
template <int T>
inline void tile_store(void* p, int64_t stride) {
  static_assert(T >= 0 && T < 4, "the accumulators are tiles 0 to 3");
  if constexpr (T == 0) _tile_stored(0, p, stride);
  else if constexpr (T == 1) _tile_stored(1, p, stride);
  else if constexpr (T == 2) _tile_stored(2, p, stride);
  else _tile_stored(3, p, stride);
  tile_fence();
}
template <int T>
inline void tile_zero() {
  static_assert(T >= 0 && T < 4, "the accumulators are tiles 0 to 3");
  if constexpr (T == 0) _tile_zero(0);
  else if constexpr (T == 1) _tile_zero(1);
  else if constexpr (T == 2) _tile_zero(2);
  else _tile_zero(3);
}
// Accumulator C (0 to 3) += A (4 or 5) B (6 or 7): C = 2 (A - 4) + (B - 6).
template <int C, int A, int B>
inline void tile_dp() {
  static_assert(A >= 4 && A < 6 && B >= 6 && B < 8 && C == 2 * (A - 4) + (B - 6), "C = 2 (A - 4) + (B - 6)");
  if constexpr (C == 0) _tile_dpbf16ps(0, 4, 6);
  else if constexpr (C == 1) _tile_dpbf16ps(1, 4, 7);
  else if constexpr (C == 2) _tile_dpbf16ps(2, 5, 6);
  else _tile_dpbf16ps(3, 5, 7);
}

#else  // QKV_AMX == 1: the software model

inline int amx_permission_errno() { return 0; }
inline bool amx_permitted() { return true; }

struct EmulatedTiles {
  alignas(64) uint8_t t[8][TILE_ROWS][TILE_BYTES];
};
inline EmulatedTiles& emulated_tiles() {
  static thread_local EmulatedTiles tiles;
  return tiles;
}
inline void amx_begin() { std::memset(&emulated_tiles(), 0, sizeof(EmulatedTiles)); }
inline void amx_end() {}

template <int T>
inline void tile_load(const void* p, int64_t stride) {
  for (int r = 0; r < TILE_ROWS; ++r) std::memcpy(emulated_tiles().t[T][r], (const char*)p + r * stride, TILE_BYTES);
}
template <int T>
inline void tile_store(void* p, int64_t stride) {
  for (int r = 0; r < TILE_ROWS; ++r) std::memcpy((char*)p + r * stride, emulated_tiles().t[T][r], TILE_BYTES);
}
template <int T>
inline void tile_zero() {
  std::memset(emulated_tiles().t[T], 0, sizeof(emulated_tiles().t[T]));
}

// A bfloat16 as float32, a subnormal as (signed) zero.
inline float tile_bf16(uint16_t h) {
  if ((h & 0x7f80u) == 0) h &= 0x8000u;
  const uint32_t w = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &w, 4);
  return f;
}
// x, a subnormal as (signed) zero.
inline float tile_ftz(float x) {
  uint32_t w;
  std::memcpy(&w, &x, 4);
  if ((w & 0x7f800000u) == 0) w &= 0x80000000u;
  std::memcpy(&x, &w, 4);
  return x;
}

template <int C, int A, int B>
inline void tile_dp() {
  static_assert(A >= 4 && A < 6 && B >= 6 && B < 8 && C == 2 * (A - 4) + (B - 6), "C = 2 (A - 4) + (B - 6)");
  EmulatedTiles& e = emulated_tiles();
  for (int m = 0; m < TILE_ROWS; ++m) {
    float c[16], a[32], even[16] = {}, odd[16] = {};
    std::memcpy(c, e.t[C][m], 64);
    for (int x = 0; x < 32; ++x) {
      uint16_t h;
      std::memcpy(&h, e.t[A][m] + 2 * x, 2);
      a[x] = tile_bf16(h);
    }
    for (int k = 0; k < 16; ++k)
      for (int n = 0; n < 16; ++n) {
        uint16_t b0, b1;
#ifndef QKV_AMX_EMULATE_WRONG
        std::memcpy(&b0, e.t[B][k] + 4 * n, 2);
        std::memcpy(&b1, e.t[B][k] + 4 * n + 2, 2);
#else  // a processor that read B's pairs the other way round (the test of the kernel's self-check)
        std::memcpy(&b0, e.t[B][k] + 4 * n + 2, 2);
        std::memcpy(&b1, e.t[B][k] + 4 * n, 2);
#endif
        // Each sum rounded; the products are exact (8-bit by 8-bit significands), so a fused
        // multiply-add rounds them the same.
        even[n] = tile_ftz(even[n] + a[2 * k] * tile_bf16(b0));
        odd[n] = tile_ftz(odd[n] + a[2 * k + 1] * tile_bf16(b1));
      }
    for (int n = 0; n < 16; ++n) c[n] = tile_ftz(c[n] + tile_ftz(even[n] + odd[n]));
    std::memcpy(e.t[C][m], c, 64);
  }
}
#endif

// C = A B on 2 x 2 accumulator tiles, the kernels' one tile walk: C's 16 RT rows x 16 CT columns of
// float32 (rows c_stride bytes apart; the second column tile 64 bytes on, the second row tile 16 rows
// on) = the sum over `steps` steps of A (16 RT rows of 16 pairs of bfloat16, rows a_stride bytes apart;
// each step a_step bytes on) times B (16 pairs x 16 CT columns, rows b_stride bytes apart; each step
// b_step bytes on; the second column tile 64 bytes on). b_last: the last step's B instead, rows
// b_last_stride bytes apart (a packed copy, zero past the operand), or null. Tiles 0-3 hold C's (row
// tile i, column tile j) in tile 2i + j, from zero; 4-5 A's row tiles, 6-7 B's column tiles. ADD: C +=
// A B instead, the tiles starting from C's own values (each step's sums added to them in turn).
template <int RT, int CT, bool ADD = false>
inline void tile_gemm(const void* a, int64_t a_stride, int64_t a_step, const void* b, int64_t b_stride,
                      int64_t b_step, int64_t steps, void* c, int64_t c_stride, const void* b_last = nullptr,
                      int64_t b_last_stride = 0) {
  static_assert(RT >= 1 && RT <= 2 && CT >= 1 && CT <= 2, "1 or 2 row and column tiles");
  const char* ap = (const char*)a;
  const char* bp = (const char*)b;
  char* cp = (char*)c;
  if constexpr (ADD) {
    tile_load<0>(cp, c_stride);
    if constexpr (CT == 2) tile_load<1>(cp + TILE_BYTES, c_stride);
    if constexpr (RT == 2) tile_load<2>(cp + 16 * c_stride, c_stride);
    if constexpr (RT == 2 && CT == 2) tile_load<3>(cp + 16 * c_stride + TILE_BYTES, c_stride);
  } else {
    tile_zero<0>();
    if constexpr (CT == 2) tile_zero<1>();
    if constexpr (RT == 2) tile_zero<2>();
    if constexpr (RT == 2 && CT == 2) tile_zero<3>();
  }
  for (int64_t k = 0; k < steps; ++k) {
    const char* bk = bp + k * b_step;
    int64_t bs = b_stride;
    if (b_last && k == steps - 1) bk = (const char*)b_last, bs = b_last_stride;
    tile_load<4>(ap + k * a_step, a_stride);
    if constexpr (RT == 2) tile_load<5>(ap + 16 * a_stride + k * a_step, a_stride);
    tile_load<6>(bk, bs);
    if constexpr (CT == 2) tile_load<7>(bk + TILE_BYTES, bs);
    tile_dp<0, 4, 6>();
    if constexpr (CT == 2) tile_dp<1, 4, 7>();
    if constexpr (RT == 2) tile_dp<2, 5, 6>();
    if constexpr (RT == 2 && CT == 2) tile_dp<3, 5, 7>();
  }
  tile_store<0>(cp, c_stride);
  if constexpr (CT == 2) tile_store<1>(cp + TILE_BYTES, c_stride);
  if constexpr (RT == 2) tile_store<2>(cp + 16 * c_stride, c_stride);
  if constexpr (RT == 2 && CT == 2) tile_store<3>(cp + 16 * c_stride + TILE_BYTES, c_stride);
}

// tile_gemm with two row tiles where two_rows, two column tiles where two_cols (ADD: C += A B).
template <bool ADD = false>
inline void tile_gemm_of(bool two_rows, bool two_cols, const void* a, int64_t a_stride, int64_t a_step,
                         const void* b, int64_t b_stride, int64_t b_step, int64_t steps, void* c, int64_t c_stride,
                         const void* b_last = nullptr, int64_t b_last_stride = 0) {
  if (two_rows && two_cols)
    tile_gemm<2, 2, ADD>(a, a_stride, a_step, b, b_stride, b_step, steps, c, c_stride, b_last, b_last_stride);
  else if (two_rows)
    tile_gemm<2, 1, ADD>(a, a_stride, a_step, b, b_stride, b_step, steps, c, c_stride, b_last, b_last_stride);
  else if (two_cols)
    tile_gemm<1, 2, ADD>(a, a_stride, a_step, b, b_stride, b_step, steps, c, c_stride, b_last, b_last_stride);
  else
    tile_gemm<1, 1, ADD>(a, a_stride, a_step, b, b_stride, b_step, steps, c, c_stride, b_last, b_last_stride);
}

// Whether the tiles compute what the kernels expect of them: tile_gemm<2, 2>, the kernels' tile walk,
// over two steps of 16 pairs, on small
// integers whose sums are exact in float32 in any order, against plain loops. A tile configuration or
// operand layout that the processor reads otherwise than this header models is caught here, before a
// kernel uses the tiles.
inline bool amx_self_check() {
  constexpr int K2 = 32, N = 32;  // pairs of the sum, columns
  alignas(64) uint32_t a[32 * K2], b[K2 * N];
  alignas(64) float c[32 * N];
  auto small = [](int64_t x) -> uint32_t {  // -3 .. 3 as a bfloat16 (exact: the float's top half)
    const float f = float(x % 7 - 3);
    uint32_t w;
    std::memcpy(&w, &f, 4);
    return w >> 16;
  };
  auto value = [](uint32_t h) {
    const uint32_t w = (h & 0xffffu) << 16;
    float f;
    std::memcpy(&f, &w, 4);
    return f;
  };
  for (int r = 0; r < 32; ++r)
    for (int p = 0; p < K2; ++p) a[r * K2 + p] = small(5 * r + 3 * p + 1) | small(r + 2 * p + 4) << 16;
  for (int p = 0; p < K2; ++p)
    for (int n = 0; n < N; ++n) b[p * N + n] = small(2 * n + 5 * p) | small(3 * p + n + 2) << 16;
  amx_begin();
  tile_gemm<2, 2>(a, K2 * 4, 64, b, N * 4, 16 * N * 4, K2 / 16, c, N * 4);
  amx_end();
  for (int r = 0; r < 32; ++r)
    for (int n = 0; n < N; ++n) {
      float want = 0.0f;
      for (int p = 0; p < K2; ++p)
        want += value(a[r * K2 + p]) * value(b[p * N + n]) + value(a[r * K2 + p] >> 16) * value(b[p * N + n] >> 16);
      if (c[r * N + n] != want) return false;
    }
  return true;
}

// Where the tiles run: QKV_AMX (2 the processor's, 1 the model), -1 Linux refused the tile data, -2
// the self-check failed. Decided once per process (per kernel library).
inline int amx_state() {
  static const int state = !amx_permitted() ? -1 : amx_self_check() ? QKV_AMX : -2;
  return state;
}

}  // namespace
#endif  // QKV_AMX
