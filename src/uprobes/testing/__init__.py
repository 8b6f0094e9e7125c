"""Probes in a test suite: the pytest plugin (:mod:`uprobes.testing.plugin`) and the runs it gives tests
(:mod:`uprobes.testing.runs`)."""
