/* Stacks the tests know, built four ways (see the Makefile): with frame pointers, without, with frame
 * pointers but no unwind tables (NO_CFI), and as C++ (unwound-cxx) for an exception's path.
 * Usage: unwound N [signal]
 *   main -> outer -> middle -> leaf, N times; qsort -> compare -> leaf once; recurse(3) -> ... -> leaf once;
 *   with "signal": signaller raises SIGUSR1, whose handler calls leaf (a stack through a signal frame);
 *   C++ only: catcher -> unwound::deeper -> thrower, which throws; a Guard's destructor calls leaf while the exception unwinds.
 * Each leaf prints the return addresses of the calls in progress, as libgcc's unwinder finds them
 * (backtrace(3)) or, built without unwind tables, by following the frame pointers itself up to main's
 * return address: a line "stack OBJECT+0xVADDR ..." per leaf, innermost first (leaf's own frame is the
 * call of backtrace: the tests compare the frames above it). The C++ thrower prints "throw ..." the same
 * way just before it throws (its own frame is print_stack's). */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <dlfcn.h>
#include <execinfo.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>

#ifdef __cplusplus
extern "C" { /* the functions the tests probe keep their C names */
#endif

static volatile long sink;

int main(int argc, char **argv);

static void print_address(void *address)
{
    Dl_info info;
    if (dladdr(address, &info) && info.dli_fname) {
        const char *name = info.dli_fname, *slash;
        for (slash = name; *slash; slash++)
            if (*slash == '/')
                name = slash + 1;
        printf(" %s+%#lx", name, (unsigned long)((char *)address - (char *)info.dli_fbase));
    } else {
        printf(" ?+%#lx", (unsigned long)address);
    }
}

__attribute__((noinline)) static void print_stack(const char *label)
{
    void *frames[64];
    int count = 0;
#ifdef NO_CFI
    /* Up to main's return address, the first outside this program: libc keeps no frame pointers. */
    Dl_info self, caller;
    void **frame = (void **)__builtin_frame_address(0);
    dladdr((void *)main, &self);
    frames[count++] = (void *)print_stack; /* in print_stack, as backtrace's first frame is */
    while (frame && count < 64) {
        frames[count++] = frame[1];
        if (!dladdr(frame[1], &caller) || caller.dli_fbase != self.dli_fbase)
            break;
        frame = (void **)frame[0];
    }
#else
    count = backtrace(frames, 64);
#endif
    printf("%s", label);
    for (int i = 0; i < count; i++)
        print_address(frames[i]);
    printf("\n");
}

__attribute__((noinline)) void leaf(long value)
{
    print_stack("stack");
    sink += value;
}

__attribute__((noinline)) void middle(long value) { leaf(value * 2); sink++; }
__attribute__((noinline)) void outer(long value) { middle(value + 1); sink++; }

__attribute__((noinline)) int compare(const void *a, const void *b)
{
    long x = *(const long *)a, y = *(const long *)b;
    if (x == 3 && y == 1)
        leaf(x);
    return (x > y) - (x < y);
}

__attribute__((noinline)) long recurse(int depth)
{
    if (depth == 0) {
        leaf(depth);
        return 0;
    }
    long below = recurse(depth - 1);
    sink++;
    return below + 1;
}

static void on_signal(int sig)
{
    leaf(sig);
}

__attribute__((noinline)) void signaller(void)
{
    signal(SIGUSR1, on_signal);
    raise(SIGUSR1);
    sink++;
}

#ifdef __cplusplus
}

struct Guard {
    ~Guard() { leaf(7); }
};

extern "C" __attribute__((noinline)) void thrower(long value)
{
    Guard guard;
    print_stack("throw");
    if (value >= 0)
        throw value;
}

namespace unwound {
__attribute__((noinline)) void deeper(long value) /* a C++ name on the way: unwound::deeper(long) */
{
    thrower(value);
    sink++;
}
}

extern "C" __attribute__((noinline)) long catcher(long value)
{
    try {
        unwound::deeper(value);
    } catch (long caught) {
        return caught + 1;
    }
    return 0;
}
#endif

int main(int argc, char **argv)
{
    int n = argc > 1 ? atoi(argv[1]) : 2;
    for (int i = 0; i < n; i++)
        outer(i);
    long values[] = {3, 1, 2};
    qsort(values, 3, sizeof values[0], compare);
    recurse(3);
    if (argc > 2 && argv[2][0] == 's')
        signaller();
#ifdef __cplusplus
    sink += catcher(5);
#endif
    printf("done %ld\n", sink);
    return 0;
}
