// A C++ exception thrown through probed frames; prints what the functions returned.
#include <cstdio>
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

int main()
{
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
