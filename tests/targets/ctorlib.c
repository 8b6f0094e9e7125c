/* Loaded with dlopen by lifecycle: its constructor runs a probed function before dlopen returns. */
__attribute__((noinline)) long lib_ctor(long x)
{
    __asm__ volatile("" ::: "memory");
    return x + 1;
}

__attribute__((constructor)) static void at_load(void)
{
    lib_ctor(41);
}

long lib_work(long i)
{
    return i * 2;
}
