/* A shared library with functions and a semaphore-guarded marker, used by uselib. */
#include "demo_provider.h"

int lib_counter = 0;

__attribute__((noinline)) int lib_add(int a, int b)
{
    lib_counter++;
    if (DEMO_ORDER_DONE_ENABLED())
        DEMO_ORDER_DONE(a, (long)b);
    return a + b;
}

int lib_twice(int a)
{
    return lib_add(a, a);
}

unsigned lib_order_done_semaphore(void)
{
    return demo_order__done_semaphore;
}

/* A second site of the same marker, sharing its semaphore. */
__attribute__((noinline)) int lib_sub(int a, int b)
{
    if (DEMO_ORDER_DONE_ENABLED())
        DEMO_ORDER_DONE(a, (long)-b);
    return a - b;
}
