/* Code run from anonymous memory, as a JIT compiler's, for tests/test_stacks.py.
 * Usage: jitted N
 * Copies hop() (compiled, and position-independent: it calls through a register) into an anonymous executable
 * mapping, lists the copy in /tmp/perf-PID.map as "jitted_hop" (as a JIT compiler does for perf, and leaves
 * it there), then calls the copy N times with leaf, so that leaf's stack runs through it. Prints "jitted SUM",
 * and lives on 0.3 s, as a runtime would: a tracer that names stacks after the hits still finds its map. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define COPIED 64

__attribute__((noinline)) long leaf(long x)
{
    __asm__ volatile("" ::: "memory");
    return x * 2;
}

__attribute__((noinline)) long hop(long (*f)(long), long x)
{
    return f(x) + 1;
}

int main(int argc, char **argv)
{
    long n = argc > 1 ? atol(argv[1]) : 3, sum = 0;
    unsigned char *code = mmap(NULL, 4096, PROT_READ | PROT_WRITE | PROT_EXEC, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (code == MAP_FAILED)
        return 1;
    memcpy(code, (void *)hop, COPIED);
    char path[64];
    snprintf(path, sizeof path, "/tmp/perf-%d.map", getpid());
    FILE *map = fopen(path, "w");
    if (!map)
        return 1;
    fprintf(map, "%lx %x jitted_hop\n", (unsigned long)code, COPIED);
    fclose(map);
    long (*copy)(long (*)(long), long) = (long (*)(long (*)(long), long))code;
    for (long i = 0; i < n; i++)
        sum += copy(leaf, i);
    printf("jitted %ld\n", sum);
    fflush(stdout);
    usleep(300000);
    return 0;
}
