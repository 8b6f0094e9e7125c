/* The benchmark's target: `hits SITE N` runs N iterations that each hit exactly one probe site of kind SITE,
 * then prints N on a line of its own and how many nanoseconds they took, as `elapsed_ns=T`. `hits entry N
 * RATE` paces them at RATE iterations per second (sleeping between batches of 100).
 * `hits sleep` waits (for probes to be inserted into a running process).
 *
 * Every probe site is the first byte of its own global function, written in assembly so that the compiler
 * cannot change the probed instruction, and so that every tool can name it by symbol with no offset:
 *
 *   entry   site_entry:  push %rbp       (function entry; both engines emulate a push)
 *   alu     site_alu:    imul (%rsi),%rdi (an ALU instruction with a memory operand: stepped out of line)
 *   riprel  site_riprel: mov bench_global(%rip),%rax (a rip-relative load: stepped with a fixup)
 *   ret     site_ret     (a whole function: probed with a return probe, uretprobe:PATH:site_ret)
 *   usdt    the STAP_PROBE3 marker bench:hit with three arguments, in usdt_once()
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/sdt.h>
#include <time.h>

long bench_global = 3;
volatile long sink;

long site_entry(long x);
long site_alu(long x, long *p);
long site_riprel(long x);
long site_ret(long x);

__asm__(
    ".text\n"
    ".globl site_entry\n.type site_entry,@function\n"
    "site_entry:\n"
    "    push %rbp\n"
    "    mov %rsp,%rbp\n"
    "    lea 1(%rdi),%rax\n"
    "    pop %rbp\n"
    "    ret\n"
    ".size site_entry,.-site_entry\n"

    ".globl site_alu\n.type site_alu,@function\n"
    "site_alu:\n"
    "    imul (%rsi),%rdi\n"
    "    mov %rdi,%rax\n"
    "    ret\n"
    ".size site_alu,.-site_alu\n"

    ".globl site_riprel\n.type site_riprel,@function\n"
    "site_riprel:\n"
    "    mov bench_global(%rip),%rax\n"
    "    add %rdi,%rax\n"
    "    ret\n"
    ".size site_riprel,.-site_riprel\n"

    ".globl site_ret\n.type site_ret,@function\n"
    "site_ret:\n"
    "    push %rbp\n"
    "    mov %rsp,%rbp\n"
    "    lea 2(%rdi),%rax\n"
    "    pop %rbp\n"
    "    ret\n"
    ".size site_ret,.-site_ret\n"
);

__attribute__((noinline)) static long usdt_once(long i, long *p)
{
    long a = i, b = *p, c = i ^ 0x55;
    STAP_PROBE3(bench, hit, a, b, c);
    __asm__ volatile("" ::: "memory");
    return a + b;
}

static long now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}

/* N calls of site_entry at RATE per second: each batch of 100 starts when the schedule says, not earlier. */
static int paced_entries(long n, long rate)
{
    long start = now_ns(), sum = 0, i, slept = 0;
    for (i = 0; i < n; i++) {
        if (i % 100 == 0) {
            long before = now_ns(), ahead = start + (long)((double)i * 1e9 / rate) - before;
            if (ahead > 0) {
                struct timespec wait = {ahead / 1000000000L, ahead % 1000000000L};
                nanosleep(&wait, NULL);
                slept += now_ns() - before;
            }
        }
        sum += site_entry(i);
    }
    sink = sum;
    long elapsed = now_ns() - start;
    printf("%ld\nelapsed_ns=%ld\nbusy_ns=%ld\n", i, elapsed, elapsed - slept);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 2 && strcmp(argv[1], "sleep") == 0) {
        printf("%d\n", getpid());
        fflush(stdout);
        for (;;)
            pause();
    }
    if (argc != 3 && !(argc == 4 && strcmp(argv[1], "entry") == 0)) {
        fprintf(stderr, "usage: hits entry|alu|riprel|ret|usdt N\n       hits entry N RATE\n       hits sleep\n");
        return 2;
    }
    const char *site = argv[1];
    long n = atol(argv[2]), sum = 0, i, start = now_ns();
    long value = 7;
    volatile long *vp = &value;
    if (argc == 4)
        return paced_entries(n, atol(argv[3]));
    if (strcmp(site, "entry") == 0)
        for (i = 0; i < n; i++) sum += site_entry(i);
    else if (strcmp(site, "alu") == 0)
        for (i = 0; i < n; i++) sum += site_alu(i, (long *)vp);
    else if (strcmp(site, "riprel") == 0)
        for (i = 0; i < n; i++) sum += site_riprel(i);
    else if (strcmp(site, "ret") == 0)
        for (i = 0; i < n; i++) sum += site_ret(i);
    else if (strcmp(site, "usdt") == 0)
        for (i = 0; i < n; i++) sum += usdt_once(i, (long *)vp);
    else {
        fprintf(stderr, "hits: unknown site %s\n", site);
        return 2;
    }
    sink = sum;  /* so that the loop is kept */
    printf("%ld\nelapsed_ns=%ld\n", i, now_ns() - start);
    return 0;
}
