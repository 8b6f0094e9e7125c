/* Return probes across a stack switch: a thread calls outer(), which raises a signal handled on an
 * alternate stack mapped above the thread's own stack; the handler calls inner(). Both functions return
 * normally, so a tracer that forgets outer's pending return when inner's is taken kills the program. */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>

#define ALTSTACK_SIZE (256 * 1024)

static void *altstack;
static volatile long inner_sum;

__attribute__((noinline)) long inner(long i)
{
    __asm__ volatile("" ::: "memory");
    return i * 3 + 1;
}

static void on_usr1(int sig)
{
    (void)sig;
    inner_sum += inner(inner_sum & 7);
}

__attribute__((noinline)) long outer(long i)
{
    raise(SIGUSR1);
    __asm__ volatile("" ::: "memory");
    return i + 1;
}

static void *worker(void *arg)
{
    long rounds = (long)arg, sum = 0;
    stack_t ss = {.ss_sp = altstack, .ss_size = ALTSTACK_SIZE};
    if (sigaltstack(&ss, NULL) != 0) {
        perror("sigaltstack");
        exit(2);
    }
    for (long i = 0; i < rounds; i++)
        sum += outer(i);
    printf("altstack above the thread's stack: %s\n", (char *)altstack > (char *)&ss ? "yes" : "no");
    printf("outer %ld inner %ld\n", sum, inner_sum);
    return NULL;
}

int main(int argc, char **argv)
{
    long rounds = argc > 1 ? atol(argv[1]) : 10;
    /* Mapped before the thread's stack, so above it (mmap hands out addresses top-down). */
    altstack = mmap(NULL, ALTSTACK_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (altstack == MAP_FAILED)
        return 2;
    struct sigaction sa = {.sa_handler = on_usr1, .sa_flags = SA_ONSTACK};
    sigaction(SIGUSR1, &sa, NULL);
    pthread_t thread;
    pthread_create(&thread, NULL, worker, (void *)rounds);
    pthread_join(thread, NULL);
    return 0;
}
