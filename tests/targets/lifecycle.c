/* A program for the tests of a program's life under probes.
 *   lifecycle fork N K      N children each call handle(child, j) K times; the parent calls it once
 *   lifecycle forkret N     spawn(c) forks N times and returns in both: c in the parent, 1000 + c in the child
 *   lifecycle vforks S      vfork children that call handle(0, 0) and exit, until SIGTERM (at most S seconds)
 *   lifecycle vfork PROGRAM ARGS...   vfork, the child calls handle(0, 0) then execs PROGRAM
 *   lifecycle exec N        calls handle(N, 0), then execs itself with N-1 until 0
 *   lifecycle dlopen LIB N  dlopen LIB (whose constructor calls lib_ctor), call lib_work N times,
 *                           dlclose, and again
 *   lifecycle recurse N T   T threads each compute fact(1..N) recursively, and a longjmp out of deep()
 *   lifecycle coroutines N  main and a coroutine (swapcontext, its stack in .bss) take turns N times, each
 *                           switching away from inside hop(): a return probe's returns come back on either stack
 *   lifecycle marker LIB N  dlopen LIB (libprobed.so), print its marker's semaphore, call lib_add(i, 2i) N times
 *   lifecycle watch LIB     dlopen LIB, then print its marker's semaphore for each line read from stdin
 *   lifecycle fault         load() reads a PROT_NONE page; the SIGSEGV handler opens it and the load runs again
 *   lifecycle tail N        tail calls: tail_f(N) jumps to tail_g, tail_h calls tail_f; acc() jumps to itself
 *   lifecycle later LIB     waits for a line on stdin, then dlopens LIB and calls lib_work(0..2)
 *   lifecycle stages LIB N  waits for a line on stdin, dlopens LIB, prints "loaded", waits for another line, then
 *                           calls lib_work(0..N-1)
 *   lifecycle orphans N     N children call handle(c, 0) after their parent has exited, and check that their
 *                           code is the file's, byte for byte
 *   lifecycle clonevm N     N children made by clone(CLONE_VM) (memory shared, not threads) call handle(c, 1);
 *                           prints how many anonymous executable mappings the process has at the end
 * Prints what it computed, so the tests can compare it with what the probes saw. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <ucontext.h>
#include <unistd.h>

/* dlopen PATH, or end the program saying why */
static void *open_library(const char *path)
{
    void *lib = dlopen(path, RTLD_NOW);
    if (!lib) {
        fprintf(stderr, "%s\n", dlerror());
        exit(1);
    }
    return lib;
}

static volatile sig_atomic_t stop_requested;

static void request_stop(int sig)
{
    (void)sig;
    stop_requested = 1;
}

__attribute__((noinline)) long handle(long who, long j)
{
    __asm__ volatile("" ::: "memory");
    return who * 100 + j;
}

/* Returns twice, once in each process: a return probe's pending return is in the child's copy of the stack. */
__attribute__((noinline)) long spawn(long c)
{
    pid_t pid = fork();
    __asm__ volatile("" ::: "memory");
    return pid == 0 ? 1000 + c : c;
}

static char *guarded;
static volatile sig_atomic_t faults;

long load(volatile long *p);

static void open_guarded(int sig, siginfo_t *info, void *context)
{
    (void)sig;
    greg_t ip = ((ucontext_t *)context)->uc_mcontext.gregs[REG_RIP];
    if (info->si_addr == guarded && mprotect(guarded, 4096, PROT_READ | PROT_WRITE) == 0)
        faults += ip == (greg_t)load ? 1 : 100;  /* the load is load()'s first instruction */
}

__attribute__((noinline)) long load(volatile long *p)
{
    return *p * 3 + 1;
}

__attribute__((noinline)) long fact(long n)
{
    if (n <= 1)
        return 1;
    return n * fact(n - 1);
}

static jmp_buf escape;

__attribute__((noinline)) long deep(long n)
{
    if (n <= 0)
        longjmp(escape, 1);
    return n > 100 ? 0 : deep(n - 1) + 1;
}

static long recurse_n;

__attribute__((noinline)) long tail_g(long x)
{
    __asm__ volatile("" ::: "memory");
    return x * 3;
}

__attribute__((noinline, optimize("optimize-sibling-calls"))) long tail_f(long x)
{
    __asm__ volatile("" ::: "memory");
    return tail_g(x + 1); /* a sibling call at -O2: jmp tail_g */
}

__attribute__((noinline)) long tail_h(long x)
{
    long r = tail_f(x) + 1;
    __asm__ volatile("" ::: "memory");
    return r;
}

typedef long (*accumulator)(long, long, void *);

__attribute__((noinline, optimize("optimize-sibling-calls"))) long acc(long n, long sum, void *self)
{
    if (n == 0)
        return sum;
    return ((accumulator)self)(n - 1, sum + n, self); /* jmp *%rdx */
}

/* Whether this process's code in memory is its file's, byte for byte (no int3 or other byte left). */
static int text_is_clean(void)
{
    FILE *maps = fopen("/proc/self/maps", "r");
    char line[512], exe[256] = "";
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    int clean = maps != NULL && n > 0;
    exe[n > 0 ? n : 0] = 0;
    while (clean && fgets(line, sizeof line, maps)) {
        unsigned long start, end, offset;
        char perms[8], path[256] = "";
        if (sscanf(line, "%lx-%lx %7s %lx %*s %*s %255s", &start, &end, perms, &offset, path) < 4 ||
            perms[2] != 'x' || strcmp(path, exe))
            continue;
        FILE *file = fopen(exe, "rb");
        char *expected = malloc(end - start);
        size_t got = file && fseek(file, offset, SEEK_SET) == 0 ? fread(expected, 1, end - start, file) : 0;
        clean = got > 0 && memcmp(expected, (void *)start, got) == 0;
        free(expected);
        if (file)
            fclose(file);
    }
    if (maps)
        fclose(maps);
    return clean;
}

static int clone_child(void *arg)
{
    return (int)handle((long)arg, 1);
}

static ucontext_t main_context, coroutine_context;
static char coroutine_stack[256 * 1024];
static long hops, coroutine_sum;

/* Switches to the other context with its own return pending, returns when switched back to. */
__attribute__((noinline)) long hop(long k, ucontext_t *from, ucontext_t *to)
{
    swapcontext(from, to);
    __asm__ volatile("" ::: "memory");
    return 10 * k;
}

static void coroutine(void)
{
    for (long i = 0; i < hops; i++)
        coroutine_sum += hop(1000 + i, &coroutine_context, &main_context);
}

static void *recurser(void *arg)
{
    long sum = 0;
    for (long i = 1; i <= recurse_n; i++)
        sum += fact(i);
    return (void *)sum;
}

int main(int argc, char **argv)
{
    if (argc < 2)
        return 2;
    const char *mode = argv[1];
    if (!strcmp(mode, "fork")) {
        int n = atoi(argv[2]), k = atoi(argv[3]);
        for (int c = 0; c < n; c++) {
            pid_t pid = fork();
            if (pid == 0) {
                long sum = 0;
                for (int j = 0; j < k; j++)
                    sum += handle(c, j);
                printf("child %d pid %d sum %ld\n", c, getpid(), sum);
                fflush(stdout);
                _exit(c);
            }
        }
        int status, exits = 0;
        while (wait(&status) > 0)
            exits += WEXITSTATUS(status);
        printf("parent %ld exits %d\n", handle(-1, 0), exits);
        return 0;
    }
    if (!strcmp(mode, "forkret")) {
        int n = atoi(argv[2]);
        long sum = 0;
        for (int c = 0; c < n; c++) {
            long r = spawn(c);
            if (r >= 1000) {
                printf("child %ld returned %ld handle %ld\n", r - 1000, r, handle(r, 0));
                fflush(stdout);
                _exit(0);
            }
            sum += r;
        }
        int status;
        while (wait(&status) > 0)
            ;
        printf("parent sum %ld\n", sum);
        return 0;
    }
    if (!strcmp(mode, "vforks")) {
        time_t end = time(NULL) + atoi(argv[2]);
        long spawned = 0, abnormal = 0;
        struct sigaction stop = {.sa_handler = request_stop, .sa_flags = SA_RESTART};
        sigaction(SIGTERM, &stop, NULL);
        while (!stop_requested && time(NULL) < end) {
            pid_t pid = vfork();
            if (pid == 0) {
                handle(0, 0);
                _exit(0);
            }
            int status;
            waitpid(pid, &status, 0);
            spawned++;
            if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
                abnormal++;
        }
        printf("vforks abnormal %ld of %s\n", abnormal, spawned > 0 ? "some" : "none");
        return 0;
    }
    if (!strcmp(mode, "vfork")) {
        pid_t pid = vfork();
        if (pid == 0) {
            handle(0, 0);
            execv(argv[2], argv + 2);
            _exit(127);
        }
        int status;
        waitpid(pid, &status, 0);
        printf("vfork child %d status %d handle %ld\n", pid, WEXITSTATUS(status), handle(1, 1));
        return 0;
    }
    if (!strcmp(mode, "exec")) {
        long n = atol(argv[2]);
        printf("exec %ld handle %ld pid %d\n", n, handle(n, 0), getpid());
        fflush(stdout);
        if (n > 0) {
            char next[32];
            snprintf(next, sizeof next, "%ld", n - 1);
            execl("/proc/self/exe", argv[0], "exec", next, (char *)NULL);
            return 127;
        }
        return 0;
    }
    if (!strcmp(mode, "dlopen")) {
        int n = atoi(argv[3]);
        long sum = 0;
        for (int round = 0; round < 2; round++) {
            void *lib = open_library(argv[2]);
            long (*work)(long) = (long (*)(long))dlsym(lib, "lib_work");
            for (int i = 0; i < n; i++)
                sum += work(i);
            dlclose(lib);
        }
        printf("dlopen sum %ld\n", sum);
        return 0;
    }
    if (!strcmp(mode, "marker") || !strcmp(mode, "watch")) {
        void *lib = open_library(argv[2]);
        unsigned (*semaphore)(void) = (unsigned (*)(void))dlsym(lib, "lib_order_done_semaphore");
        char line[64];
        if (!strcmp(mode, "watch")) {
            while (fgets(line, sizeof line, stdin)) {
                printf("semaphore %u\n", semaphore());
                fflush(stdout);
            }
            return 0;
        }
        int (*add)(int, int) = (int (*)(int, int))dlsym(lib, "lib_add");
        printf("semaphore %u\n", semaphore());
        long total = 0;
        for (int i = 0; i < atoi(argv[3]); i++)
            total += add(i, 2 * i);
        printf("total %ld\n", total);
        return 0;
    }
    if (!strcmp(mode, "fault")) {
        guarded = mmap(NULL, 4096, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        struct sigaction sa = {.sa_sigaction = open_guarded, .sa_flags = SA_SIGINFO};
        sigaction(SIGSEGV, &sa, NULL);
        long value = load((volatile long *)guarded);
        printf("fault load %ld faults %d at %s\n", value, (int)faults, faults ? "the load" : "nowhere");
        return 0;
    }
    if (!strcmp(mode, "tail")) {
        long n = atol(argv[2]);
        long f = tail_f(n);
        long h = tail_h(n);
        printf("tail f %ld h %ld acc %ld\n", f, h, acc(n, 0, (void *)acc));
        return 0;
    }
    if (!strcmp(mode, "later")) {
        char line[16];
        if (!fgets(line, sizeof line, stdin))
            return 1;
        void *lib = open_library(argv[2]);
        long (*work)(long) = (long (*)(long))dlsym(lib, "lib_work");
        long sum = 0;
        for (int i = 0; i < 3; i++)
            sum += work(i);
        printf("later sum %ld\n", sum);
        return 0;
    }
    if (!strcmp(mode, "stages")) {
        char line[16];
        if (!fgets(line, sizeof line, stdin))
            return 1;
        void *lib = open_library(argv[2]);
        printf("loaded\n");
        fflush(stdout);
        if (!fgets(line, sizeof line, stdin))
            return 1;
        long (*work)(long) = (long (*)(long))dlsym(lib, "lib_work");
        long sum = 0;
        for (int i = 0; i < atoi(argv[3]); i++)
            sum += work(i);
        printf("stages sum %ld\n", sum);
        return 0;
    }
    if (!strcmp(mode, "orphans")) {
        int n = atoi(argv[2]);
        for (int c = 0; c < n; c++) {
            if (fork() == 0) {
                sleep(1); /* the parent, and a tracer that ends with it, are gone by then */
                printf("orphan %d handle %ld %s\n", c, handle(c, 0), text_is_clean() ? "clean" : "CHANGED");
                fflush(stdout);
                _exit(0);
            }
        }
        printf("parent handle %ld\n", handle(-1, 0));
        return 0;
    }
    if (!strcmp(mode, "clonevm")) {
        int n = atoi(argv[2]);
        long sum = 0;
        for (int c = 0; c < n; c++) {
            char *stack = malloc(65536);
            int status;
            pid_t pid = clone(clone_child, stack + 65536, CLONE_VM | SIGCHLD, (void *)(long)c);
            waitpid(pid, &status, 0);
            sum += WEXITSTATUS(status);
            free(stack);
        }
        FILE *maps = fopen("/proc/self/maps", "r");
        char line[512];
        int areas = 0;
        while (maps && fgets(line, sizeof line, maps)) {
            char perms[8], path[256] = "";
            if (sscanf(line, "%*s %7s %*s %*s %*s %255s", perms, path) >= 1 && perms[2] == 'x' && !path[0])
                areas++;
        }
        if (maps)
            fclose(maps);
        printf("clonevm sum %ld handle %ld areas %d\n", sum, handle(-1, 0), areas);
        return 0;
    }
    if (!strcmp(mode, "coroutines")) {
        hops = atol(argv[2]);
        getcontext(&coroutine_context);
        coroutine_context.uc_stack.ss_sp = coroutine_stack;
        coroutine_context.uc_stack.ss_size = sizeof coroutine_stack;
        coroutine_context.uc_link = &main_context;
        makecontext(&coroutine_context, coroutine, 0);
        long sum = 0;
        for (long i = 0; i < hops; i++)
            sum += hop(i, &main_context, &coroutine_context);
        swapcontext(&main_context, &coroutine_context);  /* the coroutine's last hop returns, and it ends */
        printf("coroutines main %ld coroutine %ld\n", sum, coroutine_sum);
        return 0;
    }
    if (!strcmp(mode, "recurse")) {
        recurse_n = atol(argv[2]);
        int threads = atoi(argv[3]);
        pthread_t tids[16];
        long total = 0;
        for (int t = 0; t < threads; t++)
            pthread_create(&tids[t], NULL, recurser, NULL);
        for (int t = 0; t < threads; t++) {
            void *sum;
            pthread_join(tids[t], &sum);
            total += (long)sum;
        }
        if (!setjmp(escape))
            deep(5);
        printf("recurse total %ld after longjmp %ld\n", total, fact(4));
        return 0;
    }
    return 2;
}
