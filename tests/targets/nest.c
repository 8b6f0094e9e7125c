/* Nested and recursive calls that say what they did, for tests/test_chrome_trace.py.
 * Usage: nest [N [DEPTH]]
 * Two threads, the main one and one named "nest-worker", each call outer(i) for i = 0..N-1, which calls
 * inner(j, i) for j = 0..i; then fact(DEPTH), which recurses down to fact(0); then catcher(7), whose callee
 * thrower(8) leaves by longjmp (so thrower never returns). Each call prints "TID enter NAME ARG" as it begins,
 * ARG being its first argument, and "TID leave NAME RESULT" as it returns (thrower prints no leave). */
#define _GNU_SOURCE
#include <pthread.h>
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>

static int n = 4, depth = 5;

static long tid(void)
{
    return syscall(SYS_gettid);
}

/* noipa: every function stays a function of its own, called (no clone, no inlining, no sibling call). */
__attribute__((noipa)) long inner(long j, long i)
{
    printf("%ld enter inner %ld\n", tid(), j);
    long result = 10 * i + j;
    printf("%ld leave inner %ld\n", tid(), result);
    return result;
}

__attribute__((noipa)) long outer(long i)
{
    printf("%ld enter outer %ld\n", tid(), i);
    long result = 0;
    for (long j = 0; j <= i; j++)
        result += inner(j, i);
    printf("%ld leave outer %ld\n", tid(), result);
    return result;
}

__attribute__((noipa)) long fact(long k)
{
    printf("%ld enter fact %ld\n", tid(), k);
    long result = k <= 0 ? 1 : k * fact(k - 1);
    printf("%ld leave fact %ld\n", tid(), result);
    return result;
}

__attribute__((noipa)) void thrower(long x, jmp_buf *env)
{
    printf("%ld enter thrower %ld\n", tid(), x);
    longjmp(*env, 1);
}

__attribute__((noipa)) long catcher(long x)
{
    jmp_buf env;
    printf("%ld enter catcher %ld\n", tid(), x);
    if (setjmp(env) == 0)
        thrower(x + 1, &env);
    printf("%ld leave catcher %ld\n", tid(), x);
    return x;
}

static void *run(void *name)
{
    if (name)
        pthread_setname_np(pthread_self(), name);  /* before its first call: every event has this name */
    for (long i = 0; i < n; i++)
        outer(i);
    fact(depth);
    catcher(7);
    return NULL;
}

int main(int argc, char **argv)
{
    n = argc > 1 ? atoi(argv[1]) : n;
    depth = argc > 2 ? atoi(argv[2]) : depth;
    pthread_t worker;
    if (pthread_create(&worker, NULL, run, "nest-worker"))
        return 1;
    run(NULL);
    pthread_join(worker, NULL);
    return 0;
}
