/* libsemcycle.so, loaded and unloaded in cycles by `placement semcycle`: a semaphore-guarded marker, and a
 * count of the calls that found it enabled (the program's own view of whether anyone listened). */
#include "cycle_provider.h"

static unsigned long fired;

__attribute__((noinline)) void cycle_tick_site(long i)
{
    if (CYCLE_TICK_ENABLED()) {
        fired++;
        CYCLE_TICK(i);
    }
}

unsigned long cycle_fired(void)
{
    return fired;
}

volatile unsigned short *cycle_semaphore(void)
{
    return &cycle_tick_semaphore;
}
