/* A stand-in for GCC 12's <amxbf16intrin.h> (see amxtileintrin.h here): TDPBF16PS as the Software
   Developer's Manual's pseudocode, per row and column even and odd float32 sums from zero over the 16
   pairs (each a vdpbf16ps with the other half of A's pair zeroed: one rounded multiply-add), then
   C += even + odd. Needs AVX512-BF16. */
#ifndef _AMXBF16INTRIN_H_INCLUDED
#define _AMXBF16INTRIN_H_INCLUDED
#define _tile_dpbf16ps_internal(dst,src1,src2)				\
  __asm__ volatile (QKV_FAKE_NEED_CFG						\
    QKV_FAKE_TILE(dst, "%%r11")						\
    QKV_FAKE_TILE(src1, "%%r10")					\
    QKV_FAKE_TILE(src2, "%%r9")						\
    "mov $0xffff, %%eax\n\tvpbroadcastd %%eax, %%zmm26\n\t"		\
    "mov $16, %%ecx\n"							\
    "1:\n\tvmovups (%%r11), %%zmm31\n\txor %%edx, %%edx\n\t"		\
    "vpxord %%zmm28, %%zmm28, %%zmm28\n\tvpxord %%zmm29, %%zmm29, %%zmm29\n" \
    "2:\n\tvpbroadcastd (%%r10,%%rdx,4), %%zmm30\n\t"			\
    "mov %%rdx, %%rax\n\tshl $6, %%rax\n\t"				\
    "vpandd %%zmm26, %%zmm30, %%zmm27\n\t"				\
    "vdpbf16ps (%%r9,%%rax), %%zmm27, %%zmm28\n\t"			\
    "vpandnd %%zmm30, %%zmm26, %%zmm27\n\t"				\
    "vdpbf16ps (%%r9,%%rax), %%zmm27, %%zmm29\n\t"			\
    "inc %%rdx\n\tcmp $16, %%rdx\n\tjne 2b\n\t"			\
    "vaddps %%zmm29, %%zmm28, %%zmm28\n\tvaddps %%zmm28, %%zmm31, %%zmm31\n\t" \
    "vmovups %%zmm31, (%%r11)\n\tadd $64, %%r11\n\tadd $64, %%r10\n\t"	\
    "dec %%ecx\n\tjnz 1b"						\
    ::: "rax", "rcx", "rdx", "r8", "r9", "r10", "r11", "xmm26", "xmm27", "xmm28", "xmm29", "xmm30", "xmm31", "cc")
#define _tile_dpbf16ps(dst,src1,src2) _tile_dpbf16ps_internal (dst,src1,src2)
#endif
