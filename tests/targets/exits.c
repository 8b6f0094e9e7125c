/* Functions that leave in each way a return probe on a function's exits must see, for tests/test_return_modes.py.
 * Usage: exits N
 * For i = 0..N-1 it calls, and prints what each returned, one line per call in the order they returned:
 *   classify(i)  a switch through a jump table, a ret per case
 *   pick(i)      early returns
 *   relay(i)     a tail call: jmp scaled (scaled's own return value is the result)
 *   depth(i)     recursion down to depth(0)
 *   leap(i)      calls fall(i), which leaves by longjmp for odd i (fall never returns then; leap returns -1)
 *   spread(i, i + 1, ..., i + 7)  eight arguments: six in registers, two on the stack
 *   ftail(i)     a double, by a tail call to triple (its value is triple's)
 *   hop(i)       a tail call through a table of functions that holds hop itself (hop(i) calls hop(i - 1)
 *                for odd i, land(i - 1) for even i, down to 7 at 0)
 *   cgoto(i)     a computed goto to one of two labels, each returning
 * and each line reads "NAME ARG RESULT" (%g for doubles). */
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>

static jmp_buf back;

__attribute__((noinline)) long classify(long x)
{
    switch (x % 8) {
    case 0: return x * 3;
    case 1: return x + 7;
    case 2: return x ^ 5;
    case 3: return -x;
    case 4: return x * x;
    case 5: return x - 11;
    case 6: return x << 2;
    default: return 1;
    }
}

__attribute__((noinline)) long pick(long x)
{
    if (x < 2)
        return -100;
    if (x % 3 == 0)
        return x / 3;
    __asm__ volatile("" ::: "memory");
    return x * 1000;
}

__attribute__((noinline)) long scaled(long x)
{
    __asm__ volatile("" ::: "memory");
    return x * 7;
}

__attribute__((noinline)) long relay(long x)
{
    return scaled(x + 1);
}

__attribute__((noinline)) long depth(long x)
{
    if (x == 0)
        return 0;
    long below = depth(x - 1);
    printf("depth %ld %ld\n", x - 1, below);
    return below + x;
}

__attribute__((noinline)) long fall(long x)
{
    if (x % 2)
        longjmp(back, 1);
    __asm__ volatile("" ::: "memory");
    return x + 1;
}

__attribute__((noinline)) long leap(long x)
{
    if (setjmp(back))
        return -1;
    return fall(x) * 2;
}

__attribute__((noipa)) long spread(long a, long b, long c, long d, long e, long f, long g, long h)
{
    return a + 2 * b + 3 * c + 4 * d + 5 * e + 6 * f + 7 * g + 8 * h;
}

__attribute__((noinline)) double triple(double x)
{
    __asm__ volatile("" ::: "memory");
    return x * 3.0 + 1.0;
}

__attribute__((noinline)) double ftail(double x)
{
    return triple(x * 2.0);
}

typedef long (*hop_fn)(long);
long hop(long x);

__attribute__((noinline)) long land(long x)
{
    __asm__ volatile("" ::: "memory");
    return x * 100;
}

hop_fn hops[2] = {land, hop};

__attribute__((noinline)) long hop(long x)
{
    if (x <= 0)
        return 7;
    hop_fn next = hops[x & 1];
    return next(x - 1);
}

__attribute__((noinline)) long cgoto(long x)
{
    void *to = (x & 1) ? &&odd : &&even;
    long r = x;
    __asm__ volatile("" : "+r"(to));
    goto *to;
odd:
    r = r * 3 + 1;
    __asm__ volatile("" : "+r"(r));
    return r;
even:
    r = r / 2;
    __asm__ volatile("" : "+r"(r));
    return r + 1000;
}

int main(int argc, char **argv)
{
    long n = argc > 1 ? atol(argv[1]) : 8;
    for (long i = 0; i < n; i++) {
        printf("classify %ld %ld\n", i, classify(i));
        printf("pick %ld %ld\n", i, pick(i));
        printf("relay %ld %ld\n", i, relay(i));
        long d = depth(i);
        printf("depth %ld %ld\n", i, d);
        printf("leap %ld %ld\n", i, leap(i));
        printf("spread %ld %ld\n", i, spread(i, i + 1, i + 2, i + 3, i + 4, i + 5, i + 6, i + 7));
        printf("ftail %ld %g\n", i, ftail((double)i));
        printf("hop %ld %ld\n", i, hop(i));
        printf("cgoto %ld %ld\n", i, cgoto(i));
    }
    return 0;
}
