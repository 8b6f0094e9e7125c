/* A library loaded after the program starts, as a tracer that places its probes at the load meets it:
 *   loadlater LIB N alone     prints "ready", waits for a line; calls tick(0); dlopen LIB, prints "loaded",
 *                             waits for a line; calls LIB's lib_twice(i) for i < N
 *   loadlater LIB N inherit   as alone, but once released it forks first: the child prints "forked", waits
 *                             for a line and makes the N calls too
 *   loadlater LIB N reexec    as alone, but once released it forks first: the child execs this program with
 *                             "again", which loads LIB anew, prints "loaded", waits for a line, makes the calls
 *   loadlater LIB N early     as alone, but it forks between the load and "loaded": the parent's release lets
 *                             the child make the N calls too
 *   loadlater LIB N both      as early, but it forks before the load: the child loads LIB too (and prints
 *                             "loaded")
 * Each process that made the calls prints "sum S" (the parent after its child's); the first then waits for a
 * line, makes the calls once more (printing the sum) and exits. */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static int wait_line(void)
{
    char line[64];
    fflush(stdout);
    return fgets(line, sizeof line, stdin) != NULL;
}

__attribute__((noinline)) int tick(int i)
{
    __asm__ volatile("" ::: "memory");
    return i + 1;
}

typedef int (*twice_fn)(int);

static twice_fn load(const char *path)
{
    void *lib = dlopen(path, RTLD_NOW);
    if (!lib) {
        fprintf(stderr, "%s\n", dlerror());
        exit(1);
    }
    return (twice_fn)dlsym(lib, "lib_twice");
}

static void say(const char *what)
{
    printf("%s\n", what);
    fflush(stdout);
}

static void calls(twice_fn twice, long n)
{
    long sum = 0;
    for (long i = 0; i < n; i++)
        sum += twice((int)i);
    printf("sum %ld\n", sum);
    fflush(stdout);
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: loadlater LIB N alone|inherit|reexec|early|both|again\n");
        return 2;
    }
    const char *mode = argv[3];
    long n = atol(argv[2]);
    if (!strcmp(mode, "again")) {
        twice_fn twice = load(argv[1]);
        say("loaded");
        if (!wait_line())
            return 1;
        calls(twice, n);
        return 0;
    }
    int release[2];
    if (pipe(release) != 0)
        return 1;
    say("ready");
    if (!wait_line())
        return 1;
    tick(0);
    pid_t child = strcmp(mode, "both") ? -1 : fork();
    twice_fn twice = load(argv[1]);
    if (!strcmp(mode, "early"))
        child = fork();
    if (child != 0 || !strcmp(mode, "both"))
        say("loaded");
    if (child == 0) {
        char go;
        if (read(release[0], &go, 1) != 1)
            _exit(1);
        calls(twice, n);
        _exit(0);
    }
    if (!wait_line())
        return 1;
    if (!strcmp(mode, "inherit") || !strcmp(mode, "reexec"))
        child = fork();
    if (child == 0 && !strcmp(mode, "inherit")) {
        say("forked");
        if (!wait_line())
            _exit(1);
        calls(twice, n);
        _exit(0);
    }
    if (child == 0) {
        execl("/proc/self/exe", "loadlater", argv[1], argv[2], "again", (char *)NULL);
        _exit(127);
    }
    if (child > 0) {
        int status;
        if (write(release[1], "g", 1) != 1 || waitpid(child, &status, 0) != child || status != 0)
            return 1;
    }
    calls(twice, n);
    if (!wait_line())
        return 1;
    calls(twice, n);
    return 0;
}
