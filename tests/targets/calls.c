/* A target with known behaviour for the engines' tests.
 * Usage: calls [N [DELAY_MS [EXIT_STATUS]]]
 * Calls work(i, 2*i, "s<i>") for i = 0..N-1 (its result is 3*i + strlen(label)), lib_twice(i) from
 * libprobed.so, and the semaphore-guarded marker calls:step(i, result). Prints how many times the guard
 * was open, then exits with EXIT_STATUS. With DELAY_MS it sleeps that long between iterations. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "calls_provider.h"

int lib_twice(int a);

__attribute__((noinline)) long work(int i, long twice, const char *label)
{
    __asm__ volatile("" ::: "memory");
    return 3L * i + (long)strlen(label) + (twice - 2L * i);
}

int main(int argc, char **argv)
{
    int n = argc > 1 ? atoi(argv[1]) : 10;
    long delay_ms = argc > 2 ? atol(argv[2]) : 0;
    int status = argc > 3 ? atoi(argv[3]) : 0;
    struct timespec pause = {delay_ms / 1000, delay_ms % 1000 * 1000000L};
    int guarded = 0;
    long sum = 0;
    char label[32];
    for (int i = 0; i < n; i++) {
        snprintf(label, sizeof label, "s%d", i);
        long result = work(i, 2L * i, label);
        sum += result + lib_twice(i);
        if (CALLS_STEP_ENABLED()) {
            guarded++;
            CALLS_STEP(i, result);
        }
        if (delay_ms)
            nanosleep(&pause, NULL);
    }
    printf("calls %d sum %ld guarded %d\n", n, sum, guarded);
    return status;
}
