/* Line probes counted against the program's own counts (issue 19): each line marked COUNTED adds one to a
 * counter every time it runs, and the program prints the counters at the end:
 *   clamp C after A spread S bump B
 * Built with gcc -O0 and -O2 and clang -O2. Usage: lines N
 * - clampx() is inlined twice into both(): at -O2 gcc merges the two copies' first line into one instruction,
 *   and starts each copy at an address its ranges leave out;
 * - after the loop, clang -O2 branches from the loop's test into the middle of the next line's code;
 * - the printf written over three lines goes back and forth between them at -O0;
 * - bump() (lines.h) is a static function of two files. */
#include <stdio.h>
#include <stdlib.h>
#include "lines.h"

int bump_runs, clamp_runs, after_runs, spread_runs;
int other_file(int v);

static inline int clampx(int v, int lo, int hi)
{
    clamp_runs++; /* COUNTED CLAMP */
    return v < lo ? lo : v > hi ? hi : v;
}

__attribute__((noinline)) int both(int x)
{
    return clampx(x + 5, 3, 7) + clampx(x - 5, -1, 1);
}

int main(int argc, char **argv)
{
    int n = argc > 1 ? atoi(argv[1]) : 5;
    long total = 0;
    for (int i = 0; i < n; i++) {
        total += both(i) + bump(i) + other_file(i);
        spread_runs++, printf("%s %d %ld\n", /* COUNTED SPREAD */
                              i % 2 ? "odd" : "even",
                              i, total); /* COUNTED SPREAD_END */
    }
    after_runs++, printf("clamp %d after %d spread %d bump %d\n", clamp_runs, after_runs, spread_runs, /* COUNTED AFTER */
                         bump_runs);
    return 0;
}
