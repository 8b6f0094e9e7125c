/* The bundled example: a tiny order processor with functions and USDT markers to probe.
 * Usage: demo [ORDERS [DELAY_MS]]  -- processes ORDERS orders (default 5), DELAY_MS apart (default 0). */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include "demo_provider.h" /* defines _SDT_HAS_SEMAPHORES before it includes <sys/sdt.h> */

static const char *items[] = {"apple", "bread", "cheese", "dates"};
long grand_total = 0;

__attribute__((noinline)) long price_of(const char *item, long quantity)
{
    long unit = 0;
    for (const char *c = item; *c; c++)
        unit += *c;
    return unit % 97 * quantity;
}

__attribute__((noinline)) long process_order(int id, const char *item, long quantity)
{
    if (DEMO_ORDER_START_ENABLED())
        DEMO_ORDER_START(id, item, quantity);
    long total = price_of(item, quantity);
    grand_total += total;
    DEMO_ORDER_DONE(id, total);
    return total;
}

int main(int argc, char **argv)
{
    int orders = argc > 1 ? atoi(argv[1]) : 5;
    long delay_ms = argc > 2 ? atol(argv[2]) : 0;
    struct timespec pause = {delay_ms / 1000, delay_ms % 1000 * 1000000L};
    for (int id = 1; id <= orders; id++) {
        const char *item = items[id % 4];
        long total = process_order(id, item, id * 2);
        printf("order %d: %ld x %s = %ld\n", id, (long)id * 2, item, total);
        fflush(stdout);
        if (delay_ms)
            nanosleep(&pause, NULL);
    }
    printf("grand total %ld\n", grand_total);
    return 0;
}
