/* Runs code from a file that is not ELF, as a JIT's code cache or a loader of flat binaries does, for
 * tests/test_addressing.py. Usage: flatcode FILE N [wait]
 * Maps FILE (flat machine code: flat_code.c's .text, copied out by objcopy) read-only and executable, calls the
 * function at its start with 0..N-1 and prints "flat SUM". With "wait", it prints "mapped" once FILE is mapped
 * and waits for a line on stdin before the calls. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc < 3)
        return 2;
    int fd = open(argv[1], O_RDONLY);
    if (fd < 0)
        return 1;
    void *code = mmap(NULL, 4096, PROT_READ | PROT_EXEC, MAP_PRIVATE, fd, 0);
    if (code == MAP_FAILED)
        return 1;
    if (argc > 3) {
        char line[8];
        printf("mapped\n");
        fflush(stdout);
        if (!fgets(line, sizeof line, stdin))
            return 1;
    }
    long (*twice_plus_one)(long) = (long (*)(long))code;
    long sum = 0;
    for (long i = 0; i < atol(argv[2]); i++)
        sum += twice_plus_one(i);
    printf("flat %ld\n", sum);
    return 0;
}
