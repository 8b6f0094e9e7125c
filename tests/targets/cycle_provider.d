/* The marker of libsemcycle.so: guarded by a semaphore, in a library loaded and unloaded in cycles. */
provider cycle {
    probe tick(long i);
};
