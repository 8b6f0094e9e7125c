/* The code of build/flat.bin (tests/targets/flatcode.c runs it): one position-independent function. */
long twice_plus_one(long x)
{
    return 2 * x + 1;
}
