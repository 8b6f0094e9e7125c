/* Strings and arrays for a probe to read, in every shape where a read could stop. Each call is
 * take(s, a, i): s a string, a an array of four unsigned ints, i the shape's number; the tests probe it with
 * +0(%di):string and +0(%si):u32[4], and hold what the jump path reads to what a trap reads.
 *
 *   strings shapes        each shape once, in order; prints "shapes K"
 *   strings threads T N   T threads each call take("t<thread>-<call>", a, call) N times; prints "threads T N"
 *   strings long N        N calls with "<call>:" and 3,000 more bytes (records of many slots: the ring wraps);
 *                         prints "long N"
 *
 *   shape  s                                                    a
 *   0      "hello"                                              {0, 1, 0xffffffff, 7}
 *   1      ""                                                   the same
 *   2      300 bytes (past the first read of 256)
 *   3      5,000 bytes (a read stops at 4,096)
 *   4      exactly 4,096 bytes, then its NUL
 *   5      20 bytes and no NUL, up to a page nothing is mapped after  the 8 last bytes of that page and 8 of
 *                                                                      the next (a fault)
 *   6      NULL (a fault)                                       NULL (a fault)
 *   7      the first byte of the page nothing is mapped at      the same
 *   8      10 bytes before a page's end, its NUL 10 bytes into the next page
 *   9      "\xff\xfe not UTF-8"
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static volatile long taken;

__attribute__((noinline)) long take(const char *s, const unsigned *a, long i)
{
    taken += i;  /* add %rdx,taken(%rip): the 5 bytes a jump replaces */
    __asm__ volatile("" : : "r"(s), "r"(a) : "memory");
    return i;
}

static char *filled(size_t length, char c)
{
    char *s = malloc(length + 1);
    memset(s, c, length);
    s[length] = 0;
    return s;
}

static int shapes(void)
{
    long page = sysconf(_SC_PAGESIZE);
    /* three pages: the middle one unmapped, so that the first ends where nothing is mapped */
    char *pages = mmap(NULL, 3 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (pages == MAP_FAILED)
        return perror("mmap"), 1;
    char *hole = pages + page, *after = pages + 2 * page;
    munmap(hole, page);
    memset(pages, 'e', page);                       /* no NUL up to the hole */
    memset(after, 0, page);
    char *two = mmap(NULL, 2 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (two == MAP_FAILED)
        return perror("mmap"), 1;
    memset(two, 'f', 2 * page);
    two[page + 10] = 0;                             /* 10 bytes before the end of the first, NUL 10 into the next */
    unsigned array[4] = {0, 1, 0xffffffffu, 7};
    const unsigned *straddling = (const unsigned *)(hole - 8);
    const char *strings[] = {"hello", "", filled(300, 'a'), filled(5000, 'b'), filled(4096, 'c'), hole - 20, NULL,
                             hole, two + page - 10, "\xff\xfe not UTF-8"};
    const unsigned *arrays[] = {array, array, array, array, array, straddling, NULL, (const unsigned *)hole, array,
                                array};
    int count = sizeof strings / sizeof strings[0];
    for (long i = 0; i < count; i++)
        take(strings[i], arrays[i], i);
    printf("shapes %d\n", count);
    return 0;
}

static long calls;

static void *caller(void *arg)
{
    long thread = (long)arg;
    unsigned array[4] = {(unsigned)thread, 0, 0, 0};
    char name[32];
    for (long i = 0; i < calls; i++) {
        array[1] = (unsigned)i;
        snprintf(name, sizeof name, "t%ld-%ld", thread, i);
        take(name, array, i);
    }
    return NULL;
}

int main(int argc, char **argv)
{
    const char *mode = argc > 1 ? argv[1] : "shapes";
    if (!strcmp(mode, "shapes"))
        return shapes();
    if (!strcmp(mode, "threads") && argc > 3) {
        int threads = atoi(argv[2]);
        calls = atol(argv[3]);
        pthread_t ids[64];
        for (long t = 0; t < threads && t < 64; t++)
            pthread_create(&ids[t], NULL, caller, (void *)t);
        for (int t = 0; t < threads && t < 64; t++)
            pthread_join(ids[t], NULL);
        printf("threads %d %ld\n", threads, calls);
        return 0;
    }
    if (!strcmp(mode, "long") && argc > 2) {
        long n = atol(argv[2]);
        char *s = filled(3010, 'g');
        unsigned array[4] = {0};
        for (long i = 0; i < n; i++) {
            int at = snprintf(s, 12, "%ld:", i);
            s[at] = 'g';
            array[0] = (unsigned)i;
            take(s, array, i);
        }
        printf("long %ld\n", n);
        return 0;
    }
    fprintf(stderr, "usage: strings shapes | threads T N | long N\n");
    return 2;
}
