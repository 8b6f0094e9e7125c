/* A storm of handled real-time signals while the main thread calls a probed function.
 * Usage: sigstorm [SIGNALS [CALLS]]  -- prints how many signals the handler saw and a checksum. */
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static volatile sig_atomic_t received = 0;
static long signals = 2000;

static void on_signal(int sig) { (void)sig; received++; }

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
    struct sigaction sa = {.sa_handler = on_signal, .sa_flags = SA_RESTART};
    sigaction(SIGRTMIN, &sa, NULL);
    pthread_t sender;
    pthread_create(&sender, NULL, storm, NULL);
    long check = 0;
    for (long i = 0; i < calls; i++)
        check += work(i);
    pthread_join(sender, NULL);
    for (int i = 0; i < 20000 && received < signals; i++)
        usleep(1000);
    printf("signals %d of %ld check %ld\n", (int)received, signals, check);
    return 0;
}
