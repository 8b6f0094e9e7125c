/* Target faults and load under probes: `faults MODE THREADS N`.
 *
 * Every worker calls stepped() in a loop; its first instruction is a rip-relative load, which the ptrace
 * engine single-steps out of line (never emulated or boosted), so threads are often mid-step.
 *   crash  THREADS workers run; after N calls of its own the main thread writes to address 0 (SIGSEGV)
 *   exit   THREADS workers run; after N calls of its own the main thread calls exit(3): an exit during steps
 *   exec   as exit, but the main thread execs `/bin/echo exec-ok`: an exec during steps
 *   churn  N threads created and joined one after another, each calling stepped() once
 *   wide   THREADS workers each make exactly N calls (more threads than out-of-line slots); prints the total
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

long counter = 1;
static long per_thread;

long stepped(long x);
__asm__(
    ".text\n.globl stepped\n.type stepped,@function\n"
    "stepped:\n"
    "    mov counter(%rip),%rax\n"
    "    add %rdi,%rax\n"
    "    ret\n"
    ".size stepped,.-stepped\n");

static void *forever(void *arg)
{
    for (long i = 0;; i++)
        if (stepped(i) != i + 1)
            abort();
    return arg;
}

static void *counted(void *arg)
{
    long sum = 0;
    for (long i = 0; i < per_thread; i++)
        sum += stepped(i);
    return (void *)sum;
}

static void *once(void *arg)
{
    return (void *)stepped((long)arg);
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: faults crash|exit|exec|churn|wide THREADS N\n");
        return 2;
    }
    const char *mode = argv[1];
    int threads = atoi(argv[2]);
    long n = atol(argv[3]);
    pthread_t tids[256];
    if (threads > 256)
        return 2;
    if (strcmp(mode, "churn") == 0) {
        long total = 0;
        for (long i = 0; i < n; i++) {
            void *r;
            pthread_create(&tids[0], NULL, once, (void *)i);
            pthread_join(tids[0], &r);
            total += (long)r;
        }
        printf("churn %ld total %ld\n", n, total);
        return 0;
    }
    if (strcmp(mode, "wide") == 0) {
        long total = 0;
        per_thread = n;
        for (long t = 0; t < threads; t++)
            pthread_create(&tids[t], NULL, counted, NULL);
        for (int t = 0; t < threads; t++) {
            void *r;
            pthread_join(tids[t], &r);
            total += (long)r;
        }
        printf("wide %d x %ld total %ld\n", threads, n, total);
        return 0;
    }
    for (long t = 0; t < threads; t++)
        pthread_create(&tids[t], NULL, forever, NULL);
    for (long i = 0; i < n; i++)
        stepped(i);
    fflush(stdout);
    if (strcmp(mode, "crash") == 0)
        *(volatile int *)0 = 1;
    if (strcmp(mode, "exit") == 0)
        exit(3);
    if (strcmp(mode, "exec") == 0) {
        execl("/bin/echo", "echo", "exec-ok", (char *)NULL);
        return 1;
    }
    return 2;
}
