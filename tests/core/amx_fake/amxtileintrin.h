/* A stand-in for GCC 12's <amxtileintrin.h>, for tests/core/test_native_flash_amx.py: the real AMX path
   of the kernels (QKV_AMX == 2, csrc/qkv_amx.h) compiled with -I this folder runs on a CPU without AMX.
   Each intrinsic keeps GCC 12's asm operand constraints, so the optimizer sees what it sees with the real
   header (e.g. that LDTILECFG reads only 8 bytes of its operand: the reason the kernels' tile
   configuration is a constant), but its asm text emulates the instruction: the tiles are the hidden
   qkv_fake_tiles[8][16][64], qkv_fake_cfgd says configured: globals (one thread at a time), or with
   -DQKV_FAKE_TILES_PER_THREAD thread-locals of the initial-exec model (a process that loads such a
   library needs GLIBC_TUNABLES=glibc.rtld.optional_static_tls=262144: stand_in_plugin.py). LDTILECFG
   checks the 64 bytes it is given (palette 1, tiles 0-7 of 16 rows x 64 bytes, the rest zero), counts
   them (qkv_fake_count(0); bad ones qkv_fake_count(1)) and executes ud2 (SIGILL) if they are wrong; every
   tile operation executes ud2 when the tiles are not configured (the hardware's #UD). x86-64 with
   AVX-512 (zmm31 and kin). Written in a review of the AMX path (issue 21). */
#ifndef _AMXTILEINTRIN_H_INCLUDED
#define _AMXTILEINTRIN_H_INCLUDED
#ifdef QKV_FAKE_TILES_PER_THREAD
__attribute__((visibility("hidden"), aligned(64), used, tls_model("initial-exec"))) __thread unsigned char qkv_fake_tiles[8][16][64];
__attribute__((visibility("hidden"), used, tls_model("initial-exec"))) __thread unsigned char qkv_fake_cfgd;
/* reg = the address of this thread's qkv_fake_cfgd, or of its tile n */
#define QKV_FAKE_CFGD(reg) "movq qkv_fake_cfgd@gottpoff(%%rip), " reg "\n\tadd %%fs:0, " reg "\n\t"
#define QKV_FAKE_TILE(n, reg) "movq qkv_fake_tiles@gottpoff(%%rip), " reg "\n\tadd %%fs:0, " reg "\n\tadd $" #n "*1024, " reg "\n\t"
#else
__attribute__((visibility("hidden"), aligned(64), used)) unsigned char qkv_fake_tiles[8][16][64];
__attribute__((visibility("hidden"), used)) unsigned char qkv_fake_cfgd;
#define QKV_FAKE_CFGD(reg) "lea qkv_fake_cfgd(%%rip), " reg "\n\t"
#define QKV_FAKE_TILE(n, reg) "lea qkv_fake_tiles+" #n "*1024(%%rip), " reg "\n\t"
#endif
__attribute__((visibility("hidden"), used)) unsigned long qkv_fake_cfg_count, qkv_fake_bad_cfg;
/* qkv_fake_count(0): the configurations loaded; qkv_fake_count(1): the wrong ones (racy counts with threads) */
#ifdef __cplusplus
extern "C"
#endif
__attribute__((visibility("default"), used)) unsigned long qkv_fake_count(int w) { return w ? qkv_fake_bad_cfg : qkv_fake_cfg_count; }

/* a tile operation without a configuration: ud2 (SIGILL), as the hardware's #UD */
#define QKV_FAKE_NEED_CFG QKV_FAKE_CFGD("%%r8") "cmpb $1, (%%r8)\n\tje 9f\n\tud2\n9:\n\t"

extern __inline void __attribute__((__gnu_inline__, __always_inline__, __artificial__))
_tile_loadconfig (const void *__config)
{
  /* GCC 12's operand: "m" (*(const void **)__config), 8 bytes, as the real header says */
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
    QKV_FAKE_CFGD("%%r8") "movb $1, (%%r8)\n\t"
    QKV_FAKE_TILE(0, "%%r11")
    "vpxord %%zmm31, %%zmm31, %%zmm31\n\t"
    "mov $128, %%eax\n"
    "7:\n\tvmovdqu64 %%zmm31, (%%r11)\n\tadd $64, %%r11\n\tdec %%eax\n\tjnz 7b\n\t"
    "jmp 6f\n"
    "8:\n\tincq qkv_fake_bad_cfg(%%rip)\n\tud2\n"
    "6:\n"
    :: "m" (*((const void **)__config)) : "rax", "r8", "r11", "xmm31", "cc");
}

extern __inline void __attribute__((__gnu_inline__, __always_inline__, __artificial__))
_tile_release (void)
{
  __asm__ volatile (QKV_FAKE_CFGD("%%r8") "movb $0, (%%r8)" ::: "r8");
}

/* GCC 12's operands: the address and the stride in registers, no memory operand (the loads: no clobber) */
#define _tile_loadd(dst,base,stride) _tile_loadd_internal (dst, base, stride)
#define _tile_loadd_internal(dst,base,stride)				\
  __asm__ volatile (QKV_FAKE_NEED_CFG						\
    QKV_FAKE_TILE(dst, "%%r11")						\
    "mov %0, %%r10\n\tmov $16, %%eax\n"				\
    "1:\n\tvmovdqu64 (%%r10), %%zmm31\n\tvmovdqu64 %%zmm31, (%%r11)\n\t"	\
    "add %1, %%r10\n\tadd $64, %%r11\n\tdec %%eax\n\tjnz 1b"		\
   :: "r" ((const void*) (base)), "r" ((long) (stride)) : "rax", "r8", "r10", "r11", "xmm31", "cc")

#define _tile_stored(dst,base,stride) _tile_stored_internal (dst, base, stride)
#define _tile_stored_internal(src,base,stride)				\
  __asm__ volatile (QKV_FAKE_NEED_CFG						\
    QKV_FAKE_TILE(src, "%%r11")						\
    "mov %0, %%r10\n\tmov $16, %%eax\n"				\
    "1:\n\tvmovdqu64 (%%r11), %%zmm31\n\tvmovdqu64 %%zmm31, (%%r10)\n\t"	\
    "add %1, %%r10\n\tadd $64, %%r11\n\tdec %%eax\n\tjnz 1b"		\
   :: "r" ((void*) (base)), "r" ((long) (stride)) : "memory", "rax", "r8", "r10", "r11", "xmm31", "cc")

#define _tile_zero(dst) _tile_zero_internal (dst)
#define _tile_zero_internal(dst)						\
  __asm__ volatile (QKV_FAKE_NEED_CFG						\
    QKV_FAKE_TILE(dst, "%%r11")						\
    "vpxord %%zmm31, %%zmm31, %%zmm31\n\tmov $16, %%eax\n"		\
    "1:\n\tvmovdqu64 %%zmm31, (%%r11)\n\tadd $64, %%r11\n\tdec %%eax\n\tjnz 1b" \
    ::: "rax", "r8", "r11", "xmm31", "cc")
#endif
