/* Markers whose names carry quotes, as some USDT headers write them (STAP_PROBE(test, "probe1")), beside a plain
 * one, for tests/test_addressing.py. Usage: quoted N -- each marker is hit N times, then it prints N. */
#include <stdio.h>
#include <stdlib.h>
#include <sys/sdt.h>

int main(int argc, char **argv)
{
    int n = argc > 1 ? atoi(argv[1]) : 3;
    for (int i = 0; i < n; i++) {
        STAP_PROBE1(test, "probe1", i);
        STAP_PROBE1(test, probe2, i);
    }
    printf("%d\n", n);
    return 0;
}
