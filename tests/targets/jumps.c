/* Probe sites of every shape a jump probe must get right, each a function written in assembly so that the
 * compiler cannot change the bytes a jump replaces. Every call's result is checked: a wrong one aborts.
 *
 *   jumps run N          each site N times; prints "run N check C"
 *   jumps threads T N    T threads each call jump_entry N times; prints "threads T N check C"
 *   jumps signals N      like run, while a profiling timer interrupts it every 50 µs and its handler calls
 *                        jump_entry too; prints "run N check C" and "signals S" on stderr (S varies)
 *   jumps busy T SECONDS T threads call every site until SECONDS have passed (for attach and detach)
 *   jumps sandboxed T SECONDS   the same under a seccomp filter that refuses memfd_create (EPERM)
 *
 *   site               bytes the jump replaces                                    what could go wrong
 *   jump_entry         push %rbp; mov %rsp,%rbp; push %rbx (function entry)       several instructions
 *   jump_flags+3       movabs $imm,%rcx, between a cmp and the jl that reads it   flags clobbered
 *   (a site where the flags are dead has a trampoline that never touches the stack)
 *   jump_redzone+8     movabs $0,%rax, in a leaf that keeps a value at -8(%rsp),  red zone clobbered
 *                      between a test and the js that reads it (the flags saved)
 *   jump_call          mov %rdi,%rax; call jump_helper (the call last)            return address into the trampoline
 *   jump_jcc           test %rdi,%rdi; je (a short jcc, widened)                  branch relocation
 *   jump_riprel        mov jump_global(%rip),%rax                                 rip-relative relocation
 *   jump_loop          xor %eax,%eax; add %rdi,%rax, and the loop jumps back      a branch inside: must trap
 *                      to the add
 *   jump_switch        xor %eax,%eax; add $1,%eax, and a jump table (.rodata,     a table entry inside: must trap
 *                      offsets from its start) sends the loop back to the add
 */
#include <errno.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

long jump_global = 40;
long jump_entry(long x);
long jump_flags(long a, long b);
long jump_redzone(long x);
long jump_call(long x);
long jump_jcc(long x);
long jump_riprel(long x);
long jump_loop(long n);
long jump_switch(long n);

__asm__(
    ".text\n"
    ".globl jump_entry\n.type jump_entry,@function\n"
    "jump_entry:\n"
    "    push %rbp\n"
    "    mov %rsp,%rbp\n"
    "    push %rbx\n"
    "    lea 1(%rdi),%rax\n"
    "    pop %rbx\n"
    "    pop %rbp\n"
    "    ret\n"
    ".size jump_entry,.-jump_entry\n"

    ".globl jump_flags\n.type jump_flags,@function\n"
    "jump_flags:\n"
    "    cmp %rsi,%rdi\n"
    "    movabs $0x1122334455667788,%rcx\n"
    "    jl 1f\n"
    "    mov $2,%eax\n"
    "    ret\n"
    "1:  mov $1,%eax\n"
    "    ret\n"
    ".size jump_flags,.-jump_flags\n"

    ".globl jump_redzone\n.type jump_redzone,@function\n"
    "jump_redzone:\n"
    "    mov %rdi,-8(%rsp)\n"
    "    test %rdi,%rdi\n"
    "    movabs $0,%rax\n"
    "    js 1f\n"
    "    add -8(%rsp),%rax\n"
    "    ret\n"
    "1:  sub -8(%rsp),%rax\n"
    "    ret\n"
    ".size jump_redzone,.-jump_redzone\n"

    ".globl jump_helper\n.type jump_helper,@function\n"
    "jump_helper:\n"
    "    lea 10(%rax),%rax\n"
    "    ret\n"
    ".size jump_helper,.-jump_helper\n"

    ".globl jump_call\n.type jump_call,@function\n"
    "jump_call:\n"
    "    mov %rdi,%rax\n"
    "    call jump_helper\n"
    "    add $1,%rax\n"
    "    ret\n"
    ".size jump_call,.-jump_call\n"

    ".globl jump_jcc\n.type jump_jcc,@function\n"
    "jump_jcc:\n"
    "    test %rdi,%rdi\n"
    "    je 1f\n"
    "    lea 5(%rdi),%rax\n"
    "    ret\n"
    "1:  mov $7,%eax\n"
    "    ret\n"
    ".size jump_jcc,.-jump_jcc\n"

    ".globl jump_riprel\n.type jump_riprel,@function\n"
    "jump_riprel:\n"
    "    mov jump_global(%rip),%rax\n"
    "    add %rdi,%rax\n"
    "    ret\n"
    ".size jump_riprel,.-jump_riprel\n"

    ".globl jump_loop\n.type jump_loop,@function\n"
    "jump_loop:\n"
    "    xor %eax,%eax\n"
    "1:  add %rdi,%rax\n"
    "    dec %rdi\n"
    "    jnz 1b\n"
    "    ret\n"
    ".size jump_loop,.-jump_loop\n"

    ".globl jump_switch\n.type jump_switch,@function\n"
    "jump_switch:\n"
    "    xor %eax,%eax\n"
    ".Lswitch_again:\n"
    "    add $1,%eax\n"
    "    test %rdi,%rdi\n"
    "    je .Lswitch_done\n"
    "    dec %rdi\n"
    "    mov %rdi,%rcx\n"
    "    and $1,%ecx\n"
    "    lea .Lswitch_table(%rip),%rdx\n"
    "    movslq (%rdx,%rcx,4),%rcx\n"
    "    add %rdx,%rcx\n"
    "    jmp *%rcx\n"
    ".Lswitch_odd:\n"
    "    add $10,%eax\n"
    "    lea .Lswitch_table(%rip),%rdx\n"
    "    movslq (%rdx),%rcx\n"
    "    add %rdx,%rcx\n"
    "    jmp *%rcx\n"
    ".Lswitch_done:\n"
    "    ret\n"
    ".size jump_switch,.-jump_switch\n"
    ".section .rodata\n.align 4\n"
    ".Lswitch_table:\n"
    "    .long .Lswitch_again-.Lswitch_table, .Lswitch_odd-.Lswitch_table\n"
    ".text\n");

/* What jump_switch computes: one per pass, and ten more for every odd n it counts down through. */
static long switch_result(long n)
{
    long r = 1;
    for (; n > 0; n--)
        r += 1 + ((n - 1) & 1) * 10;
    return r;
}

static void check(int ok, const char *what)
{
    if (!ok) {
        fprintf(stderr, "wrong result from %s\n", what);
        abort();
    }
}

/* One call of every site with argument i; returns the sum of their results. */
static long every_site(long i)
{
    long x = i & 1023, sum = 0, r;
    r = jump_entry(x);            check(r == x + 1, "jump_entry");               sum += r;
    r = jump_flags(x, 512);       check(r == (x < 512 ? 1 : 2), "jump_flags");  sum += r;
    r = jump_flags(512, x);       check(r == (512 < x ? 1 : 2), "jump_flags");  sum += r;
    r = jump_redzone(x);          check(r == x, "jump_redzone");                sum += r;
    r = jump_call(x);             check(r == x + 11, "jump_call");              sum += r;
    r = jump_jcc(x);              check(r == (x ? x + 5 : 7), "jump_jcc");      sum += r;
    r = jump_riprel(x);           check(r == x + 40, "jump_riprel");            sum += r;
    r = jump_loop(x % 5 + 1);     check(r == (x % 5 + 1) * (x % 5 + 2) / 2, "jump_loop"); sum += r;
    r = jump_switch(x % 4);       check(r == switch_result(x % 4), "jump_switch"); sum += r;
    return sum;
}

static volatile sig_atomic_t signals_seen;
static volatile long handler_sum;

static void on_profile(int sig)
{
    (void)sig;
    signals_seen++;
    handler_sum += jump_entry(signals_seen & 7) - 1 - (signals_seen & 7);  /* 0 unless jump_entry is wrong */
}

static long busy_seconds;

static void *busy(void *arg)
{
    (void)arg;
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    long sum = 0, i = 0;
    do {
        for (int k = 0; k < 1000; k++, i++)
            sum += every_site(i);
        clock_gettime(CLOCK_MONOTONIC, &now);
    } while (now.tv_sec - start.tv_sec < busy_seconds);
    return (void *)sum;
}

/* What a sandboxed program does: memfd_create fails with EPERM (where a tracer would map its jump area). */
static void forbid_memfd_create(void)
{
    struct sock_filter filter[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_memfd_create, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog program = {sizeof filter / sizeof filter[0], filter};
    check(prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0, "PR_SET_NO_NEW_PRIVS");
    check(prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &program) == 0, "PR_SET_SECCOMP");
}

static long threads_calls;

static void *entry_caller(void *arg)
{
    long sum = 0;
    for (long i = 0; i < threads_calls; i++) {
        long r = jump_entry(i);
        check(r == i + 1, "jump_entry");
        sum += r;
    }
    return (void *)(sum + (long)arg * 0);
}

int main(int argc, char **argv)
{
    const char *mode = argc > 1 ? argv[1] : "run";
    if (!strcmp(mode, "threads") && argc > 3) {
        int threads = atoi(argv[2]);
        threads_calls = atol(argv[3]);
        pthread_t ids[64];
        long total = 0;
        for (int t = 0; t < threads && t < 64; t++)
            pthread_create(&ids[t], NULL, entry_caller, (void *)(long)t);
        for (int t = 0; t < threads && t < 64; t++) {
            void *sum;
            pthread_join(ids[t], &sum);
            total += (long)sum;
        }
        printf("threads %d %ld check %ld\n", threads, threads_calls, total);
        return 0;
    }
    if ((!strcmp(mode, "busy") || !strcmp(mode, "sandboxed")) && argc > 3) {
        if (!strcmp(mode, "sandboxed"))
            forbid_memfd_create();
        int threads = atoi(argv[2]);
        busy_seconds = atol(argv[3]);
        pthread_t ids[64];
        for (int t = 0; t < threads && t < 64; t++)
            pthread_create(&ids[t], NULL, busy, NULL);
        for (int t = 0; t < threads && t < 64; t++)
            pthread_join(ids[t], NULL);
        printf("busy %d done\n", threads);
        return 0;
    }
    long n = argc > 2 ? atol(argv[2]) : 1000;
    if (!strcmp(mode, "signals")) {
        signal(SIGPROF, on_profile);
        struct itimerval every = {{0, 50}, {0, 50}};
        setitimer(ITIMER_PROF, &every, NULL);
    }
    long sum = 0;
    for (long i = 0; i < n; i++)
        sum += every_site(i);
    if (!strcmp(mode, "signals")) {
        struct itimerval off = {{0, 0}, {0, 0}};
        setitimer(ITIMER_PROF, &off, NULL);
        check(handler_sum == 0, "jump_entry in a signal handler");
        fprintf(stderr, "signals %ld\n", (long)signals_seen);
    }
    printf("run %ld check %ld\n", n, sum);
    return 0;
}
