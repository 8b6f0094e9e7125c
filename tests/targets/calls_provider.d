/* The marker of the calls target: guarded by a semaphore, so it fires only while someone listens. */
provider calls {
    probe step(int i, long result);
};
