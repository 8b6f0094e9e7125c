/* Markers whose arguments take every form gcc emits on x86-64, plus hand-written argument texts
 * (STAP_PROBE_ASM) for the forms compilers rarely emit: high-byte registers, SIB, multi-term
 * displacements, floats, symbols, sizes 16 and 24 and size-less arguments. */
#include <stdio.h>
#include <stdlib.h>
#include <sys/sdt.h>

struct point { short x; int y; long z; };
int global_int = 42;
long global_array[4] = {10, 20, 30, 40};

__attribute__((noinline)) void compiler_forms(char c, unsigned char uc, short s, unsigned short us, int i,
                                              long l, const char *p, struct point *pt, long *arr, int k)
{
    STAP_PROBE4(forms, integers, c, uc, s, us);
    STAP_PROBE3(forms, words, i, l, p);
    STAP_PROBE3(forms, constants, -1, 255, 1234567890123L);
    STAP_PROBE3(forms, fields, pt->x, pt->y, pt->z);
    STAP_PROBE2(forms, elements, arr[2], arr[k]);
    STAP_PROBE2(forms, globals, global_int, global_array[1]);
    printf("%d %u %d %u %d %ld %s %d %d %ld %ld %ld\n", c, uc, s, us, i, l, p, pt->x, pt->y, pt->z, arr[2], arr[k]);
}

__attribute__((noinline)) void written_forms(void)
{
    __asm__ volatile(STAP_PROBE_ASM(forms, high_byte, -1@%ah 1@%bh 2@%cx 8@%r8b));
    __asm__ volatile(STAP_PROBE_ASM(forms, sib, -8@16(%rax,%rbx,8) 4@(%rbx,%rcx) 8@(,%rdx,4)));
    __asm__ volatile(STAP_PROBE_ASM(forms, multi_term, -4@-4+16-16(%rbp) 8@$3+($10-$8)-$1));
    __asm__ volatile(STAP_PROBE_ASM(forms, floats, 4f@%eax 8f@%rcx 8@%xmm0));
    __asm__ volatile(STAP_PROBE_ASM(forms, symbols, -4@global_int(%rip) 8@8+global_array(%rip) 8@global_array+16(%rip)));
    __asm__ volatile(STAP_PROBE_ASM(forms, wide, 16@%rax 24@8(%rsp)));
    __asm__ volatile(STAP_PROBE_ASM(forms, sizeless, %rdi -8(%rbp)));
    __asm__ volatile(STAP_PROBE_ASM(forms, inlined, 8@%rdi));
    __asm__ volatile(STAP_PROBE_ASM(forms, inlined, -4@%esi));
}

/* The forms tracefs cannot express, with known values: each line printed is what the marker's arguments are. */
__attribute__((noinline)) void known_forms(void)
{
    static long table[8] = {100, -101, 102, -103, 104, -105, 106, -107};
    static int ints[4] = {-20, 21, -22, 23};
    __asm__ volatile(STAP_PROBE_ASM(forms, known_sib, -8@16(%%rax,%%rbx,8) -4@(%%rdx,%%rcx) 8@(,%%rsi,4))
                     :: "a"(table), "b"(3L), "d"(ints), "c"(8L), "S"((unsigned long)&table[6] / 4));
    printf("known_sib %ld %d %ld\n", table[5], ints[2], table[6]);
    __asm__ volatile(STAP_PROBE_ASM(forms, known_bytes, -1@%%ah 1@%%bh -2@%%cx 1@%%dl)
                     :: "a"(0x1234855aL), "b"(0xc8ffL), "c"(0x7fff8001L), "d"(0x1ffL));
    printf("known_bytes %d %d %d %d\n", -123, 200, -32767, 255);
    double d = 3.25;
    float f = -1.5f;
    __asm__ volatile(STAP_PROBE_ASM(forms, known_floats, 8f@%0 4f@%1 8@%0 4f@%%eax)
                     :: "x"(d), "x"(f), "a"(0x40490fdbL));
    printf("known_floats %g %g %lld %g\n", d, f, 0x400a000000000000LL, 3.14159274101257324);
}

/* One marker inlined at two sites: each site has its own argument spec. */
static inline __attribute__((always_inline)) void note_value(long value)
{
    STAP_PROBE1(forms, noted, value);
}

__attribute__((noinline)) void two_sites(long a, int b)
{
    note_value(a);
    note_value(b * 2);
    printf("noted %ld %d\n", a, b * 2);
}

int main(int argc, char **argv)
{
    struct point pt = {-3, 70000, -5000000000L};
    int k = argc > 1 ? atoi(argv[1]) : 3;
    compiler_forms(-7, 200, -300, 60000, -100000, 1L << 40, "hello", &pt, global_array, k);
    written_forms();
    known_forms();
    two_sites(1L << 33, -21);
    return 0;
}
