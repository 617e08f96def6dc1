/* A stand-in for GCC 12's <amxtileintrin.h>, for tests/core/test_native_flash_amx.py: the real AMX path
   of the kernels (QKV_AMX == 2, csrc/qkv_amx.h) compiled with -I this folder runs on a CPU without AMX.
   Each intrinsic keeps GCC 12's asm operand constraints, so the optimizer sees what it sees with the real
   header (e.g. that LDTILECFG reads only 8 bytes of its operand: the reason the kernels' tile
   configuration is a constant), but its asm text emulates the instruction: the tiles are the hidden
   global qkv_fake_tiles[8][16][64] (one thread at a time), qkv_fake_cfgd says configured. LDTILECFG
   checks the 64 bytes it is given (palette 1, tiles 0-7 of 16 rows x 64 bytes, the rest zero), counts
   them (qkv_fake_count(0); bad ones qkv_fake_count(1)) and executes ud2 (SIGILL) if they are wrong; every
   tile operation executes ud2 when the tiles are not configured (the hardware's #UD). x86-64 with
   AVX-512 (zmm31 and kin). Written in a review of the AMX path (issue 21). */
#ifndef _AMXTILEINTRIN_H_INCLUDED
#define _AMXTILEINTRIN_H_INCLUDED
__attribute__((visibility("hidden"), aligned(64), used)) unsigned char qkv_fake_tiles[8][16][64];
__attribute__((visibility("hidden"), used)) unsigned char qkv_fake_cfgd;
__attribute__((visibility("hidden"), used)) unsigned long qkv_fake_cfg_count, qkv_fake_bad_cfg;
#ifdef __cplusplus
extern "C"
#endif
__attribute__((visibility("default"), used)) unsigned long qkv_fake_count(int w) { return w ? qkv_fake_bad_cfg : qkv_fake_cfg_count; }

#define QKV_FAKE_NEED_CFG "cmpb $1, qkv_fake_cfgd(%%rip)\n\tje 9f\n\tud2\n9:\n\t"

extern __inline void __attribute__((__gnu_inline__, __always_inline__, __artificial__))
_tile_loadconfig (const void *__config)
{
  __asm__ volatile (
    "lea %0, %%rax\n\t"
    "cmpq $1, 0(%%rax)\n\tjne 8f\n\t"
    "cmpq $0, 8(%%rax)\n\tjne 8f\n\t"
    "movabs $0x0040004000400040, %%r11\n\t"
    "cmp %%r11, 16(%%rax)\n\tjne 8f\n\t"
    "cmp %%r11, 24(%%rax)\n\tjne 8f\n\t"
    "cmpq $0, 32(%%rax)\n\tjne 8f\n\t"
    "cmpq $0, 40(%%rax)\n\tjne 8f\n\t"
    "movabs $0x1010101010101010, %%r11\n\t"
    "cmp %%r11, 48(%%rax)\n\tjne 8f\n\t"
    "cmpq $0, 56(%%rax)\n\tjne 8f\n\t"
    "incq qkv_fake_cfg_count(%%rip)\n\t"
    "movb $1, qkv_fake_cfgd(%%rip)\n\t"
    "lea qkv_fake_tiles(%%rip), %%r11\n\t"
    "vpxord %%zmm31, %%zmm31, %%zmm31\n\t"
    "mov $128, %%eax\n"
    "7:\n\tvmovdqu64 %%zmm31, (%%r11)\n\tadd $64, %%r11\n\tdec %%eax\n\tjnz 7b\n\t"
    "jmp 6f\n"
    "8:\n\tincq qkv_fake_bad_cfg(%%rip)\n\tud2\n"
    "6:\n"
    :: "m" (*((const void **)__config)) : "rax", "r11", "xmm31", "cc");
}

extern __inline void __attribute__((__gnu_inline__, __always_inline__, __artificial__))
_tile_release (void)
{
  __asm__ volatile ("movb $0, qkv_fake_cfgd(%%rip)" ::);
}

#define _tile_loadd(dst,base,stride) _tile_loadd_internal (dst, base, stride)
#define _tile_loadd_internal(dst,base,stride)				\
  __asm__ volatile (QKV_FAKE_NEED_CFG						\
    "lea qkv_fake_tiles+" #dst "*1024(%%rip), %%r11\n\t"			\
    "mov %0, %%r10\n\tmov $16, %%eax\n"				\
    "1:\n\tvmovdqu64 (%%r10), %%zmm31\n\tvmovdqu64 %%zmm31, (%%r11)\n\t"	\
    "add %1, %%r10\n\tadd $64, %%r11\n\tdec %%eax\n\tjnz 1b"		\
   :: "r" ((const void*) (base)), "r" ((long) (stride)) : "rax", "r10", "r11", "xmm31", "cc")

#define _tile_stored(dst,base,stride) _tile_stored_internal (dst, base, stride)
#define _tile_stored_internal(src,base,stride)				\
  __asm__ volatile (QKV_FAKE_NEED_CFG						\
    "lea qkv_fake_tiles+" #src "*1024(%%rip), %%r11\n\t"			\
    "mov %0, %%r10\n\tmov $16, %%eax\n"				\
    "1:\n\tvmovdqu64 (%%r11), %%zmm31\n\tvmovdqu64 %%zmm31, (%%r10)\n\t"	\
    "add %1, %%r10\n\tadd $64, %%r11\n\tdec %%eax\n\tjnz 1b"		\
   :: "r" ((void*) (base)), "r" ((long) (stride)) : "memory", "rax", "r10", "r11", "xmm31", "cc")

#define _tile_zero(dst) _tile_zero_internal (dst)
#define _tile_zero_internal(dst)						\
  __asm__ volatile (QKV_FAKE_NEED_CFG						\
    "lea qkv_fake_tiles+" #dst "*1024(%%rip), %%r11\n\t"			\
    "vpxord %%zmm31, %%zmm31, %%zmm31\n\tmov $16, %%eax\n"		\
    "1:\n\tvmovdqu64 %%zmm31, (%%r11)\n\tadd $64, %%r11\n\tdec %%eax\n\tjnz 1b" \
    ::: "rax", "r11", "xmm31", "cc")
#endif
