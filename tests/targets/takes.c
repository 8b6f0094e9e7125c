/* Calls with a known spread of arguments, for the predicate, count-by-value and histogram tests.
 * Usage: takes N
 * For i = 0..N-1, take(size, name, flags) with size = (i * 7919) % 5000 + 1, name one of "alpha", "beta",
 * "gamma", "delta" (i % 4), flags = i % 16; take returns size * 2 when flags & 4, else -size. Each call is printed
 * as "take SIZE NAME FLAGS RESULT" after it returns; the last line is "takes N". */
#include <stdio.h>
#include <stdlib.h>

static const char *const names[] = {"alpha", "beta", "gamma", "delta"};

__attribute__((noipa)) long take(long size, const char *name, unsigned flags)
{
    return flags & 4 ? size * 2 : -size;
}

int main(int argc, char **argv)
{
    long n = argc > 1 ? atol(argv[1]) : 100;
    for (long i = 0; i < n; i++) {
        long size = (i * 7919) % 5000 + 1;
        const char *name = names[i % 4];
        unsigned flags = (unsigned)(i % 16);
        long result = take(size, name, flags);
        printf("take %ld %s %u %ld\n", size, name, flags, result);
    }
    printf("takes %ld\n", n);
    return 0;
}
