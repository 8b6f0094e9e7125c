/* A small program with a cache in front of a slow store, for the example tests: lookup(key) asks the cache
 * first, and reads the store (store_read) only on a miss, then remembers the value (cache_put).
 * Usage: lookup KEY...   prints "KEY VALUE" per key. */
#include <stdio.h>
#include <stdlib.h>

#define SLOTS 8

static long keys[SLOTS], values[SLOTS];
static int used[SLOTS];

__attribute__((noinline)) int cache_get(long key, long *value)
{
    int slot = (int)(key % SLOTS);
    if (used[slot] && keys[slot] == key) {
        *value = values[slot];
        return 1;
    }
    return 0;
}

__attribute__((noinline)) void cache_put(long key, long value)
{
    int slot = (int)(key % SLOTS);
    keys[slot] = key, values[slot] = value, used[slot] = 1;
}

__attribute__((noinline)) long store_read(long key)
{
    __asm__ volatile("" ::: "memory");
    return key * key + 1;
}

__attribute__((noinline)) long lookup(long key)
{
    long value;
    if (cache_get(key, &value))
        return value;
    value = store_read(key);
    cache_put(key, value);
    return value;
}

int main(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        long key = atol(argv[i]);
        printf("%ld %ld\n", key, lookup(key));
    }
    return 0;
}
