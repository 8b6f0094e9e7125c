/* Markers of the bundled demo program; `dtrace -h` turns this into demo_provider.h with semaphores. */
provider demo {
    probe order__start(int id, const char *item, long quantity);
    probe order__done(int id, long total);
};
