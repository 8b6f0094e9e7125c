/* A storm of handled real-time signals while the main thread calls a probed function.
 * Usage: sigstorm [SIGNALS [CALLS]]  -- prints how many signals the handler saw, the sum of the values they
 * carried, how many did not arrive as this process queued them, and a checksum of the calls. */
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static long received, foreign, values, signals = 2000;

/* Both threads run the handler, at times at once: every update is atomic. */
static void on_signal(int sig, siginfo_t *info, void *context)
{
    (void)sig, (void)context;
    __atomic_fetch_add(&received, 1, __ATOMIC_SEQ_CST);
    __atomic_fetch_add(&values, info->si_value.sival_int, __ATOMIC_SEQ_CST);
    if (info->si_code != SI_QUEUE || info->si_pid != getpid())
        __atomic_fetch_add(&foreign, 1, __ATOMIC_SEQ_CST);
}

__attribute__((noinline)) long work(long i)
{
    __asm__ volatile("" ::: "memory");
    return i * 7 % 13;
}

static void *storm(void *arg)
{
    (void)arg;
    for (long i = 0; i < signals; i++) {
        union sigval value = {.sival_int = (int)i};
        while (sigqueue(getpid(), SIGRTMIN, value) != 0)
            usleep(100);  /* the queue is full: wait for the handler */
    }
    return NULL;
}

int main(int argc, char **argv)
{
    signals = argc > 1 ? atol(argv[1]) : 2000;
    long calls = argc > 2 ? atol(argv[2]) : 20000;
    struct sigaction sa = {.sa_sigaction = on_signal, .sa_flags = SA_RESTART | SA_SIGINFO};
    sigaction(SIGRTMIN, &sa, NULL);
    pthread_t sender;
    pthread_create(&sender, NULL, storm, NULL);
    long check = 0;
    for (long i = 0; i < calls; i++)
        check += work(i);
    pthread_join(sender, NULL);
    for (int i = 0; i < 20000 && __atomic_load_n(&received, __ATOMIC_SEQ_CST) < signals; i++)
        usleep(1000);
    printf("signals %ld of %ld values %ld foreign %ld check %ld\n", received, signals, values, foreign, check);
    return 0;
}
