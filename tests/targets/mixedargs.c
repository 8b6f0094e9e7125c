/* A marker written in assembly whose arguments mix a sized one and size-less ones, as STAP_PROBE_ASM lets
 * people write them: mixed:hit's argument string is "8@$7 %rdi %rax". Usage: mixedargs N
 * For i = 0..N-1 it fires with %rdi = 100 + i and %rax = 3 * i, and prints "hit 7 RDI RAX" for each. */
#include <stdio.h>
#include <stdlib.h>
#include <sys/sdt.h>

__attribute__((noinline)) static void fire(long first, long second)
{
    __asm__ __volatile__(STAP_PROBE_ASM(mixed, hit, 8@$7 %%rdi %%rax) :: "D"(first), "a"(second));
}

int main(int argc, char **argv)
{
    int n = argc > 1 ? atoi(argv[1]) : 3;
    for (long i = 0; i < n; i++) {
        fire(100 + i, 3 * i);
        printf("hit 7 %ld %ld\n", 100 + i, 3 * i);
    }
    return 0;
}
