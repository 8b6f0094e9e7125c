/* THREADS threads each call hit() CALLS times; prints the total the calls returned.
 * Usage: threads [THREADS [CALLS [DELAY_US]]]  -- DELAY_US sleeps between calls (for attach/detach tests).
 * Each call's result is checked (a wrong one aborts: a probe changed what the program computes), and each
 * iteration passes the semaphore-guarded marker threads:tick (so a tracer raises and restores a semaphore). */
#define _SDT_HAS_SEMAPHORES 1
#include <sys/sdt.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

unsigned short threads_tick_semaphore __attribute__((section(".probes"))) = 0;
static long calls = 1000;
static long delay_us = 0;

__attribute__((noinline)) long hit(long thread, long i)
{
    __asm__ volatile("" ::: "memory");
    return thread * 3 + (i & 7);
}

static void *worker(void *arg)
{
    long thread = (long)arg, sum = 0;
    for (long i = 0; i < calls; i++) {
        long r = hit(thread, i);
        if (r != thread * 3 + (i & 7))
            abort();
        sum += r;
        if (threads_tick_semaphore)
            STAP_PROBE2(threads, tick, thread, i);
        if (delay_us)
            usleep(delay_us);
    }
    return (void *)sum;
}

int main(int argc, char **argv)
{
    int n = argc > 1 ? atoi(argv[1]) : 8;
    calls = argc > 2 ? atol(argv[2]) : 1000;
    delay_us = argc > 3 ? atol(argv[3]) : 0;
    pthread_t tids[64];
    long total = 0;
    for (long t = 0; t < n; t++)
        pthread_create(&tids[t], NULL, worker, (void *)t);
    for (int t = 0; t < n; t++) {
        void *sum;
        pthread_join(tids[t], &sum);
        total += (long)sum;
    }
    printf("threads %d calls %ld total %ld\n", n, calls, total);
    return 0;
}
