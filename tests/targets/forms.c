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

int main(int argc, char **argv)
{
    struct point pt = {-3, 70000, -5000000000L};
    int k = argc > 1 ? atoi(argv[1]) : 3;
    compiler_forms(-7, 200, -300, 60000, -100000, 1L << 40, "hello", &pt, global_array, k);
    written_forms();
    return 0;
}
