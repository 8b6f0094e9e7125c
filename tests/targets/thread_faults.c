/* Threads under probes meeting job control, stack overflow, sent SIGTRAPs and exec:
 * `thread_faults MODE ARGS` (tests/test_ptrace_thread_faults.py).
 *
 *   stopcont THREADS N  THREADS workers (at most 8) each call their own bumpT() N times. Its first instruction
 *                       is `addq $1, counters+8*T(%rip)`: rip-relative, so the ptrace engine single-steps it out
 *                       of line (never emulated or boosted). Prints the sum of the counters: THREADS*N when every
 *                       call ran the instruction exactly once. The test stops and continues the process meanwhile.
 *   overflow push|call K  runs the recursive dive() on a 64 KiB stack of its own whose lowest page is a
 *                       PROT_NONE guard. Each level writes the next three 8-byte slots below it in turn (the
 *                       call's return address, push %rbp, push %rbx), so the stack top is chosen to make level
 *                       K's `push %rbp` (dive+0; push mode) or the `call dive` entering level K (dive+10;
 *                       call mode) the first write into the guard page. A SIGSEGV handler on an alternate stack
 *                       records where the fault was (rip as dive + offset, si_addr as guard end + offset) and
 *                       the depth; then the guard page is read through /proc/self/mem: untouched or written.
 *                       Prints those.
 *   fixups THREADS N    THREADS workers each call, N times: riprel() (a rip-relative load: a slot and a step),
 *                       indirect() (`call *%rsi`: a stepped call whose pushed return address is fixed up),
 *                       direct() (`call rel32`: emulated), flags() (`pushf`: a stepped pushf whose TF is fixed
 *                       up) and pusher() (`push %rbp`: emulated). The main thread waits in pthread_join
 *                       meanwhile (running, as far as ptrace is concerned). Prints the total of the results;
 *                       a wrong riprel() sum or a TF seen set in flags() aborts.
 *   traps THREADS N K kill|tgkill
 *                       THREADS workers each call their bumpT() N times while the main thread sends K SIGTRAPs,
 *                       each after the previous one was handled: `kill` sends them to the process (kill(getpid()),
 *                       the main thread blocking SIGTRAP, so the workers take them); `tgkill` to the workers in
 *                       turn. Workers wait for the sender before they end. Prints how many SIGTRAPs the handler
 *                       saw, how many did not come as sent (si_code SI_USER or SI_TKILL, from this process), how
 *                       many it gave up waiting for (5 s each) and the counter. Under ptrace a thread-directed
 *                       SIGTRAP can be lost for good: the kernel merges it with the thread's own trap (int3 or
 *                       single-step) when that is pending at the same instant (one bit per standard signal in the
 *                       thread's pending set); a process-directed one is queued in the shared set, apart.
 *   waittraps THREADS K workers call their bumpT() until the handler has seen K SIGTRAPs sent from outside (kill
 *                       -TRAP; the main thread blocks SIGTRAP, so the workers take them); the handler writes one
 *                       'T' to stdout per SIGTRAP, so the sender can wait for each. Prints how many it saw, how
 *                       many did not come as sent (SI_USER), the calls and the counter.
 *   exec N NAME         calls tick() N times, then execs NAME (a path) as `NAME ticks N`.
 *   ticks N             calls tick() N times and exits with status 7.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <ucontext.h>
#include <unistd.h>

long counters[8];
long depth;
long riprel_value = 5;

void bump0(void), bump1(void), bump2(void), bump3(void), bump4(void), bump5(void), bump6(void), bump7(void);
static void (*const bumps[8])(void) = {bump0, bump1, bump2, bump3, bump4, bump5, bump6, bump7};

static long counter(void)
{
    long sum = 0;
    for (int i = 0; i < 8; i++)
        sum += counters[i];
    return sum;
}
void dive(void);
void dive_from(void *top);
long riprel(long x);
long indirect(long x, long (*fn)(long));
long direct(long x);
unsigned long flags(void);
long pusher(long x);
long tick(long x);

__asm__(
    ".text\n"
    /* bump0..bump7: `addq $1, counters+8*N(%rip)`, one for each worker, so no two threads race on one counter */
    ".irp n,0,1,2,3,4,5,6,7\n"
    ".globl bump\\n\n.type bump\\n,@function\n"
    "bump\\n:\n"
    "    addq $1, counters+8*\\n(%rip)\n"
    "    ret\n"
    ".size bump\\n,.-bump\\n\n"
    ".endr\n"

    /* Every 8-byte slot below the start is written in turn: the call's return address, %rbp, %rbx. */
    ".globl dive\n.type dive,@function\n"
    "dive:\n"
    "    push %rbp\n"
    "    push %rbx\n"
    "    addq $1, depth(%rip)\n"
    "    call dive\n"
    "    pop %rbx\n"
    "    pop %rbp\n"
    "    ret\n"
    ".size dive,.-dive\n"

    ".globl dive_from\n.type dive_from,@function\n"
    "dive_from:\n"
    "    mov %rdi, %rsp\n"
    "    call dive\n"
    "    ud2\n"
    ".size dive_from,.-dive_from\n"

    ".globl riprel\n.type riprel,@function\n"
    "riprel:\n"
    "    mov riprel_value(%rip), %rax\n"
    "    add %rdi, %rax\n"
    "    ret\n"
    ".size riprel,.-riprel\n"

    ".globl indirect\n.type indirect,@function\n"
    "indirect:\n"
    "    sub $8, %rsp\n"
    "    call *%rsi\n"
    "    add $8, %rsp\n"
    "    ret\n"
    ".size indirect,.-indirect\n"

    ".globl direct\n.type direct,@function\n"
    "direct:\n"
    "    sub $8, %rsp\n"
    "    call twice\n"
    "    add $8, %rsp\n"
    "    ret\n"
    ".size direct,.-direct\n"

    ".globl flags\n.type flags,@function\n"
    "flags:\n"
    "    pushf\n"
    "    pop %rax\n"
    "    ret\n"
    ".size flags,.-flags\n"

    ".globl pusher\n.type pusher,@function\n"
    "pusher:\n"
    "    push %rbp\n"
    "    lea 3(%rdi), %rax\n"
    "    pop %rbp\n"
    "    ret\n"
    ".size pusher,.-pusher\n");

long twice(long x)
{
    return 2 * x;
}

__attribute__((noinline)) long tick(long x)
{
    __asm__ volatile("" ::: "memory");
    return x * 3 + 1;
}

static long per_thread, traps_wanted;
static volatile int sender_done;
static long received, foreign;
static int expected_code;  /* SI_TKILL (tgkill) or SI_USER (kill) */
static pid_t expected_pid;  /* the sender: 0 for this process, -1 for any */
static int acknowledge;     /* write a 'T' to stdout for each SIGTRAP handled */

static void on_trap(int sig, siginfo_t *info, void *context)
{
    (void)sig, (void)context;
    int expected = expected_code;
    pid_t sender = expected_pid ? expected_pid : getpid();
    if (info->si_code != expected || (expected_pid >= 0 && info->si_pid != sender))
        __atomic_fetch_add(&foreign, 1, __ATOMIC_SEQ_CST);
    __atomic_fetch_add(&received, 1, __ATOMIC_SEQ_CST);
    if (acknowledge) {
        ssize_t written = write(1, "T", 1);
        (void)written;
    }
}

static void catch_traps(void)
{
    struct sigaction sa = {.sa_sigaction = on_trap, .sa_flags = SA_RESTART | SA_SIGINFO};
    sigaction(SIGTRAP, &sa, NULL);
}

static void *bumper(void *arg)
{
    void (*bump)(void) = bumps[(long)arg];
    for (long i = 0; i < per_thread; i++)
        bump();
    while (!sender_done)
        usleep(1000);
    return arg;
}

static pid_t worker_tids[64];
static volatile int started;

static void *bumper_traced(void *arg)
{
    worker_tids[(long)arg] = (pid_t)syscall(SYS_gettid);
    __atomic_fetch_add(&started, 1, __ATOMIC_SEQ_CST);
    return bumper(arg);
}

static void *bump_until_traps(void *arg)
{
    void (*bump)(void) = bumps[(long)arg];
    long calls = 0;
    while (__atomic_load_n(&received, __ATOMIC_SEQ_CST) < traps_wanted) {
        bump();
        calls++;
    }
    return (void *)calls;
}

static void *fixup_worker(void *arg)
{
    long t = (long)arg, sums[4] = {0}, tf = 0;
    for (long i = 0; i < per_thread; i++) {
        sums[0] += riprel(i);
        sums[1] += indirect(i, twice);
        sums[2] += direct(i + t);
        sums[3] += pusher(i);
        if (flags() & 0x100)
            tf++;
    }
    if (sums[0] != per_thread * 5 + per_thread * (per_thread - 1) / 2 || tf)
        abort();
    return (void *)(sums[0] + sums[1] + sums[2] + sums[3]);
}

static int spawn(int threads, void *(*fn)(void *), pthread_t *tids)
{
    for (long t = 0; t < threads; t++)
        if (pthread_create(&tids[t], NULL, fn, (void *)t) != 0)
            return -1;
    return 0;
}

static long join(int threads, pthread_t *tids)
{
    long total = 0;
    for (int t = 0; t < threads; t++) {
        void *r;
        pthread_join(tids[t], &r);
        total += (long)r;
    }
    return total;
}

/* -- overflow -- */

static sigjmp_buf overflowed;
static uintptr_t guard_end;
static uintptr_t fault_rip, fault_addr;
static long fault_depth;

static void on_segv(int sig, siginfo_t *info, void *context)
{
    (void)sig;
    ucontext_t *uc = context;
    fault_rip = (uintptr_t)uc->uc_mcontext.gregs[REG_RIP];
    fault_addr = (uintptr_t)info->si_addr;
    fault_depth = depth;
    siglongjmp(overflowed, 1);
}

static void describe(char *out, size_t size, uintptr_t rip)
{
    if (rip >= (uintptr_t)dive && rip < (uintptr_t)dive_from)
        snprintf(out, size, "dive+%lu", (unsigned long)(rip - (uintptr_t)dive));
    else
        snprintf(out, size, "elsewhere");
}

static int overflow(const char *how, long levels)
{
    const long page = sysconf(_SC_PAGESIZE), size = 16 * page;
    char *stack = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (stack == MAP_FAILED || mprotect(stack, page, PROT_NONE) != 0)
        return 2;
    guard_end = (uintptr_t)stack + page;
    /* push: level K's push %rbp writes [guard_end - 8, guard_end); call: the call entering level K does. */
    uintptr_t top = guard_end + 24 * levels + (strcmp(how, "push") == 0 ? 8 : 0);
    if (top >= (uintptr_t)stack + size)
        return 2;
    stack_t alt = {.ss_sp = malloc(1 << 16), .ss_size = 1 << 16};
    sigaltstack(&alt, NULL);
    struct sigaction sa = {.sa_sigaction = on_segv, .sa_flags = SA_SIGINFO | SA_ONSTACK};
    sigaction(SIGSEGV, &sa, NULL);
    if (sigsetjmp(overflowed, 1) == 0) {
        dive_from((void *)top);
        return 3;  /* never: dive recurses until the guard page stops it */
    }
    char where[64];
    describe(where, sizeof where, fault_rip);
    char *guard = malloc(page);
    int mem = open("/proc/self/mem", O_RDONLY);
    int written = -1;
    if (mem >= 0 && pread(mem, guard, page, (off_t)(guard_end - page)) == page) {
        written = 0;
        for (long i = 0; i < page; i++)
            written |= guard[i] != 0;
    }
    printf("overflow %s: SIGSEGV at %s, address guard_end%+ld, depth %ld, guard page %s\n", how, where,
           (long)(fault_addr - guard_end), fault_depth,
           written < 0 ? "unreadable" : written ? "WRITTEN" : "untouched");
    return 0;
}

int main(int argc, char **argv)
{
    const char *mode = argc > 1 ? argv[1] : "";
    pthread_t tids[64];
    setvbuf(stdout, NULL, _IONBF, 0);
    if (strcmp(mode, "stopcont") == 0 && argc == 4) {
        int threads = atoi(argv[2]);
        per_thread = atol(argv[3]);
        sender_done = 1;
        if (threads < 1 || threads > 8 || spawn(threads, bumper, tids) != 0)
            return 2;
        join(threads, tids);
        printf("stopcont threads %d calls %ld counter %ld\n", threads, per_thread, counter());
        return counter() == threads * per_thread ? 0 : 1;
    }
    if (strcmp(mode, "overflow") == 0 && argc == 4)
        return overflow(argv[2], atol(argv[3]));
    if (strcmp(mode, "fixups") == 0 && argc == 4) {
        int threads = atoi(argv[2]);
        per_thread = atol(argv[3]);
        if (threads > 64 || spawn(threads, fixup_worker, tids) != 0)
            return 2;
        printf("fixups threads %d calls %ld total %ld\n", threads, per_thread, join(threads, tids));
        return 0;
    }
    if (strcmp(mode, "traps") == 0 && argc == 6) {
        int threads = atoi(argv[2]);
        per_thread = atol(argv[3]);
        traps_wanted = atol(argv[4]);
        int directed = strcmp(argv[5], "tgkill") == 0;
        if (!directed && strcmp(argv[5], "kill") != 0)
            return 2;
        expected_code = directed ? SI_TKILL : SI_USER;
        catch_traps();
        if (threads < 1 || threads > 8 || spawn(threads, bumper_traced, tids) != 0)
            return 2;
        while (__atomic_load_n(&started, __ATOMIC_SEQ_CST) < threads)
            sched_yield();
        if (!directed) {
            sigset_t trap;
            sigemptyset(&trap);
            sigaddset(&trap, SIGTRAP);
            pthread_sigmask(SIG_BLOCK, &trap, NULL);
        }
        long lost = 0;
        for (long k = 0; k < traps_wanted; k++) {
            if (directed)
                syscall(SYS_tgkill, getpid(), worker_tids[k % threads], SIGTRAP);
            else
                kill(getpid(), SIGTRAP);
            /* each is handled before the next is sent (one pending SIGTRAP is all a thread can hold) */
            struct timespec start, now;
            clock_gettime(CLOCK_MONOTONIC, &start);
            while (__atomic_load_n(&received, __ATOMIC_SEQ_CST) < k + 1 - lost) {
                sched_yield();
                clock_gettime(CLOCK_MONOTONIC, &now);
                if (now.tv_sec - start.tv_sec >= 5) {  /* never handled: say so instead of waiting forever */
                    lost++;
                    break;
                }
            }
        }
        sender_done = 1;
        join(threads, tids);
        printf("traps %ld handled %ld foreign %ld lost %ld counter %ld\n", traps_wanted, received, foreign, lost,
               counter());
        return 0;
    }
    if (strcmp(mode, "waittraps") == 0 && argc == 4) {
        int threads = atoi(argv[2]);
        traps_wanted = atol(argv[3]);
        expected_code = SI_USER;
        expected_pid = -1;
        acknowledge = 1;
        catch_traps();
        if (threads < 1 || threads > 8 || spawn(threads, bump_until_traps, tids) != 0)
            return 2;
        /* The workers take every SIGTRAP sent to the process: they are the ones in the middle of hits. */
        sigset_t trap;
        sigemptyset(&trap);
        sigaddset(&trap, SIGTRAP);
        pthread_sigmask(SIG_BLOCK, &trap, NULL);
        long calls = join(threads, tids);
        printf("\nwaittraps %ld handled %ld foreign %ld\ncalls %ld counter %ld\n", traps_wanted, received, foreign,
               calls, counter());
        return 0;
    }
    if (strcmp(mode, "exec") == 0 && argc == 4) {
        long n = atol(argv[2]), sum = 0;
        for (long i = 0; i < n; i++)
            sum += tick(i);
        printf("before exec: %ld\n", sum);
        execl(argv[3], argv[3], "ticks", argv[2], (char *)NULL);
        perror("execl");
        return 2;
    }
    if (strcmp(mode, "ticks") == 0 && argc == 3) {
        long n = atol(argv[2]), sum = 0;
        for (long i = 0; i < n; i++)
            sum += tick(i);
        printf("after exec: %ld\n", sum);
        return 7;
    }
    fprintf(stderr, "usage: thread_faults stopcont|overflow|fixups|traps|waittraps|exec|ticks ARGS (see its source)\n");
    return 2;
}
