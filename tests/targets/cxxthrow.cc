// C++ exceptions thrown through probed frames; prints what the functions returned.
//   cxxthrow          outer(n) calls inner(n), which throws for n == 3; main catches
//   cxxthrow caught   total(5) calls guarded(i), which catches what risky(i) throws for odd i: the frames of
//                     total and guarded stay alive and return as usual
#include <cstdio>
#include <cstring>
#include <stdexcept>

__attribute__((noinline)) long inner(long n)
{
    if (n == 3)
        throw std::runtime_error("three");
    return n * 10;
}

__attribute__((noinline)) long outer(long n)
{
    return inner(n) + 1;
}

__attribute__((noinline)) long risky(long n)
{
    if (n % 2)
        throw std::runtime_error("odd");
    return n;
}

__attribute__((noinline)) long guarded(long n)
{
    try {
        return risky(n);
    } catch (const std::exception &) {
        return -n;
    }
}

__attribute__((noinline)) long total(long n)
{
    long sum = 0;
    for (long i = 0; i < n; i++)
        sum += guarded(i);
    __asm__ volatile("" ::: "memory");
    return sum * 10;
}

int main(int argc, char **argv)
{
    if (argc > 1 && !std::strcmp(argv[1], "caught")) {
        std::printf("total %ld\n", total(5));
        return 0;
    }
    long sum = 0;
    for (long n = 0; n < 6; n++) {
        try {
            sum += outer(n);
        } catch (const std::exception &) {
            sum += 1000;
        }
    }
    std::printf("sum %ld\n", sum);
    return 0;
}
