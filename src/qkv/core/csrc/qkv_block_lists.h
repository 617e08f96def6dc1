// The block lists of a BlockMask, as both FlashAttention-2 kernels (flash_fwd_kernel.cpp,
// flash_bwd_kernel.cpp) read them: FlexAttention's kv_indices / q_indices layout (Dong et al.,
// 2024) in CSR form, built once per mask by qkv/core/engines/native_blocks.py, whose ctypes
// Structure QkvBlockLists has these fields in this order. A kernel includes this header; the
// kernel cache (qkv/core/_kernels.py) hashes it with the kernel's source, so a change here
// rebuilds both.
#pragma once
#include <cstdint>

struct QkvBlockLists {
  int64_t bq, bk;          // rows and keys per mask block (bk == 128: the kernels return code 4 otherwise)
  int64_t nq, nk;          // query blocks ceil(Lq / bq), key blocks ceil(Lk / bk)
  const int32_t* q_ptr;    // (nq + 1) CSR offsets, query-major
  const int32_t* q_kb;     // (nnz) key block of each entry, ascending within a query block
  const int32_t* q_tile;   // (nnz) -1: every score of the block allowed for every (b, h); else tile index t
  const int32_t* k_ptr;    // (nk + 1) the same entries, key-major
  const int32_t* k_qb;     // (nnz) query block of each entry, ascending within a key block
  const int32_t* k_tile;   // (nnz) tile index as above
  const uint8_t* tiles;    // (Bm, Hm, ntiles, bq, bk / 8) bits: bit (c & 7) of byte (c >> 3) of row r of tile t
                           // set = query qb*bq + r may see key kb*bk + c (for mask batch row bm, mask head hm)
  int64_t Bm, Hm, ntiles;  // Bm is 1 or B (b -> b if Bm == B else 0); Hm is 1 or Hq, indexed by the QUERY head
};
