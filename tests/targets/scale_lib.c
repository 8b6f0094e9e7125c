/* libscale3.so, libscale7.so and libscaletrap.so: one layout, byte for byte, but for scale()'s first
 * instruction (4 bytes at the same offset in each): imul $3 / imul $7 (a boostable instruction), or the
 * program's own int3 followed by lea (%rdi),%eax and a nop. `placement reuse` loads one after the other at
 * the same base, so the second one's scale() sits where the first one's was. */
#define STR2(x) #x
#define STR(x) STR2(x)
#ifdef SCALE_TRAP
#define FIRST "int3\n\tlea (%rdi), %eax\n\tnop\n"
#else
#define FIRST "imul $" STR(FACTOR) ", %rdi, %rax\n"
#endif

__asm__(".text\n"
        ".globl scale\n"
        ".type scale, @function\n"
        "scale:\n\t" FIRST
        "\tret\n"
        ".size scale, .-scale\n");
