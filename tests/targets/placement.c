/* A program for the tests of where the ptrace engine places (and takes out) its bytes:
 *   placement semcycle LIB N   prints "ready", waits for a line; then three dlopen cycles of LIB
 *                              (libsemcycle.so), each calling its marker site N times: the first two at one
 *                              base (dlclose in between), the third after a page of ours has taken the place
 *                              of the first cycle's semaphore (sentinel 7), so LIB comes back at another base;
 *                              prints how often the marker was enabled per cycle, waits for a line, then says
 *                              whether the sentinel page is as written and what LIB's semaphore is now
 *   placement selfmod          prints "ready", waits for a line; calls answer() (mov $1,%eax; ret), rewrites
 *                              its first instruction as xor %eax,%eax; add $2,%eax (mprotect RWX), calls it
 *                              again; waits for a line, calls it a third time and says whether its code is
 *                              still what it wrote
 *   placement reuse LIB1 LIB2  dlopen LIB1, scale(5), dlclose; dlopen LIB2 (libscale*.so, one layout: it
 *                              lands at LIB1's base), scale(5), dlclose; a SIGTRAP handler counts the
 *                              program's own int3s (libscaletrap.so has one)
 *   placement later LIB        prints "ready", waits for a line; step(0..2), dlopen LIB, lib_work(0..2), prints
 *                              the sums, then waits for a line before it exits
 * Prints what it computed, so the tests compare it with an untraced run. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <link.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static int wait_line(void)
{
    char line[64];
    fflush(stdout);
    return fgets(line, sizeof line, stdin) != NULL;
}

static void *open_lib(const char *path, uintptr_t *base)
{
    void *lib = dlopen(path, RTLD_NOW);
    struct link_map *map = NULL;
    if (!lib || dlinfo(lib, RTLD_DI_LINKMAP, &map) != 0) {
        fprintf(stderr, "%s\n", dlerror());
        exit(1);
    }
    *base = map->l_addr;
    return lib;
}

static int semcycle(const char *path, int n)
{
    unsigned long fired[3];
    uintptr_t base[3];
    volatile unsigned short *semaphore[3];
    unsigned char *page = NULL;
    printf("ready\n");
    if (!wait_line())
        return 1;
    for (int cycle = 0; cycle < 3; cycle++) {
        if (cycle == 2) { /* the first cycle's semaphore page is ours now: LIB must load elsewhere */
            page = (unsigned char *)((uintptr_t)semaphore[0] & ~(uintptr_t)4095);
            if (mmap(page, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0)
                != page) {
                perror("mmap");
                return 1;
            }
            memset(page, 0x5a, 4096);
            *semaphore[0] = 7;
        }
        void *lib = open_lib(path, &base[cycle]);
        void (*tick)(long) = (void (*)(long))dlsym(lib, "cycle_tick_site");
        unsigned long (*count)(void) = (unsigned long (*)(void))dlsym(lib, "cycle_fired");
        volatile unsigned short *(*where)(void) = (volatile unsigned short *(*)(void))dlsym(lib, "cycle_semaphore");
        for (long i = 0; i < n; i++)
            tick(i);
        fired[cycle] = count();
        semaphore[cycle] = where();
        if (cycle < 2)
            dlclose(lib);
    }
    printf("cycle 1 enabled %lu times\n", fired[0]);
    printf("cycle 2 enabled %lu times, same base %s\n", fired[1], base[1] == base[0] ? "yes" : "no");
    printf("cycle 3 enabled %lu times, another base %s\n", fired[2], base[2] != base[0] ? "yes" : "no");
    if (!wait_line())
        return 1;
    int intact = *semaphore[0] == 7;
    for (int i = 0; i < 4096; i++)
        if ((unsigned char *)semaphore[0] - page != i && (unsigned char *)semaphore[0] + 1 - page != i)
            intact &= page[i] == 0x5a;
    printf("after: old semaphore page %s (%u), semaphore now %u\n", intact ? "intact" : "CHANGED",
           (unsigned)*semaphore[0], (unsigned)*semaphore[2]);
    return 0;
}

int answer(void);
__asm__(".text\n"
        ".globl answer\n"
        ".type answer, @function\n"
        "answer:\n"
        "\tmov $1, %eax\n"
        "\tret\n"
        ".size answer, .-answer\n");

static const unsigned char rewritten[5] = {0x31, 0xc0, 0x83, 0xc0, 0x02}; /* xor %eax,%eax; add $2,%eax */

static int selfmod(void)
{
    unsigned char *code = (unsigned char *)(uintptr_t)answer;
    unsigned char *page = (unsigned char *)((uintptr_t)code & ~(uintptr_t)4095);
    printf("ready\n");
    if (!wait_line())
        return 1;
    int before = answer();
    if (mprotect(page, 8192, PROT_READ | PROT_WRITE | PROT_EXEC) != 0) {
        perror("mprotect");
        return 1;
    }
    memcpy(code, rewritten, sizeof rewritten);
    mprotect(page, 8192, PROT_READ | PROT_EXEC);
    __builtin___clear_cache((char *)code, (char *)code + sizeof rewritten);
    printf("answer %d, rewritten %d\n", before, answer());
    if (!wait_line())
        return 1;
    int after = answer();
    printf("after: answer %d, code %s\n", after, memcmp(code, rewritten, sizeof rewritten) ? "CHANGED" : "as written");
    return 0;
}

static volatile sig_atomic_t traps;

static void on_trap(int sig)
{
    (void)sig;
    traps++;
}

static int reuse(const char *first, const char *second)
{
    signal(SIGTRAP, on_trap);
    uintptr_t base[2];
    long result[2];
    const char *paths[2] = {first, second};
    for (int i = 0; i < 2; i++) {
        void *lib = open_lib(paths[i], &base[i]);
        long (*scale)(long) = (long (*)(long))dlsym(lib, "scale");
        result[i] = scale(5);
        dlclose(lib);
    }
    printf("first %ld, second %ld, traps %d, same base %s\n", result[0], result[1], (int)traps,
           base[0] == base[1] ? "yes" : "no");
    return 0;
}

__attribute__((noinline)) long step(long i)
{
    __asm__ volatile("" ::: "memory");
    return i + 10;
}

static int later(const char *path)
{
    printf("ready\n");
    if (!wait_line())
        return 1;
    long steps = 0, sum = 0;
    for (long i = 0; i < 3; i++)
        steps += step(i);
    uintptr_t base;
    void *lib = open_lib(path, &base);
    long (*work)(long) = (long (*)(long))dlsym(lib, "lib_work");
    for (long i = 0; i < 3; i++)
        sum += work(i);
    printf("later steps %ld, lib sum %ld\n", steps, sum);
    return wait_line() ? 0 : 1;
}

int main(int argc, char **argv)
{
    if (argc == 4 && !strcmp(argv[1], "semcycle"))
        return semcycle(argv[2], atoi(argv[3]));
    if (argc == 2 && !strcmp(argv[1], "selfmod"))
        return selfmod();
    if (argc == 4 && !strcmp(argv[1], "reuse"))
        return reuse(argv[2], argv[3]);
    if (argc == 3 && !strcmp(argv[1], "later"))
        return later(argv[2]);
    fprintf(stderr, "usage: placement semcycle LIB N | selfmod | reuse LIB1 LIB2 | later LIB\n");
    return 2;
}
