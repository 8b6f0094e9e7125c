/* Functions written to cover the x86-64 instruction classes a probe can land on: rip-relative loads,
 * stores and lea; call/jmp/jcc/loop/ret; indirect calls through memory and through rip; push/pop/pushf/
 * popf; cmov; rep string operations; SSE and VEX-encoded AVX; x87; mul/div; cmpxchg, xchg, lock add;
 * setcc. Built at -O0, -O2 and -O3. Prints a checksum of everything it computed. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

long counter = 7;
double scale = 1.5;
long table[16];
long (*volatile hook)(long) = 0;
char buffer[256];

__attribute__((noinline)) long twice(long x) { return 2 * x + 1; }

__attribute__((noinline)) long rip_relative(long x)
{
    counter += x;                     /* rip-relative load and store */
    long *p = &table[x & 15];         /* lea of a global */
    *p = counter;
    return *p + (long)(scale * 2);
}

__attribute__((noinline)) long branches(long n)
{
    long sum = 0;
    for (long i = 0; i < n; i++) {    /* jcc, jmp */
        if (i % 3 == 0)
            sum += twice(i);          /* direct call */
        else if (hook)
            sum += hook(i);           /* indirect call through memory (rip) */
        else
            sum -= i;
    }
    long (*fn)(long) = twice;
    sum += fn(n);                     /* indirect call through a register */
    __asm__ volatile("mov %1, %%rcx\n1: add $1, %0\n loop 1b" : "+r"(sum) : "r"(n & 7 ? n & 7 : 1) : "rcx");
    return sum;
}

__attribute__((noinline)) long stack_ops(long x)
{
    long flags, out;
    __asm__ volatile("pushfq\n pop %0" : "=r"(flags));
    __asm__ volatile("push %1\n push %2\n pop %0\n pop %0\n pushf\n popf" : "=r"(out) : "r"(x), "r"(x + 1) : "cc");
    return out + ((flags >> 8) & 1);  /* TF must read 0 */
}

__attribute__((noinline)) long conditional(long a, long b)
{
    long r = a > b ? a : b;           /* cmov */
    unsigned char lt = a < b;         /* setcc */
    return r + lt;
}

__attribute__((noinline)) long strings(long n)
{
    char src[64];
    __asm__ volatile("rep stosb" : : "D"(src), "c"(sizeof src), "a"((int)(n & 0x7f)) : "memory");
    __asm__ volatile("rep movsb" : : "D"(buffer), "S"(src), "c"(sizeof src) : "memory");
    return buffer[n & 63] + (long)strlen(buffer + 64);
}

__attribute__((noinline, target("avx2"))) double vectors(double x)
{
    double v[4] = {x, x + 1, x + 2, x + 3}, w[4];
    __asm__ volatile("vmovupd %1, %%ymm1\n vaddpd %%ymm1, %%ymm1, %%ymm1\n vmovupd %%ymm1, %0\n vzeroupper"
                     : "=m"(w) : "m"(v) : "xmm1");
    __asm__ volatile("movsd %1, %%xmm2\n addsd %%xmm2, %%xmm2\n movsd %%xmm2, %0" : "=m"(w[0]) : "m"(scale) : "xmm2");
    return w[0] + w[1] + w[2] + w[3];
}

__attribute__((noinline)) long double x87(long double a)
{
    return a * 3.0L / 2.0L + 1.0L;
}

__attribute__((noinline)) unsigned long arithmetic(unsigned long a, unsigned long b)
{
    unsigned __int128 wide = (unsigned __int128)a * b;  /* mul */
    return (unsigned long)(wide >> 64) + a / (b | 1) + a % (b | 1);  /* div */
}

__attribute__((noinline)) long atomics(long x)
{
    long expected = counter;
    __atomic_compare_exchange_n(&counter, &expected, expected + x, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    long old = __atomic_exchange_n(&table[0], x, __ATOMIC_SEQ_CST);  /* xchg */
    __atomic_fetch_add(&table[1], x, __ATOMIC_SEQ_CST);              /* lock add */
    return old + counter + table[1];
}

int main(int argc, char **argv)
{
    long n = argc > 1 ? atol(argv[1]) : 20;
    long check = 0;
    double fcheck = 0;
    for (long i = 0; i < n; i++) {
        check += rip_relative(i);
        check += branches(i % 10);
        check += stack_ops(i);
        check += conditional(i, n - i);
        check += strings(i);
        fcheck += vectors((double)i);
        fcheck += (double)x87((long double)i);
        check += (long)arithmetic((unsigned long)i * 0x9e3779b97f4a7c15UL, (unsigned long)i + 3);
        check += atomics(i);
    }
    printf("insns %ld %ld %.3f\n", n, check, fcheck);
    return (int)(check & 0x3f);
}
