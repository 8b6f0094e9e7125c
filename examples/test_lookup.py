"""Example tests written with the uprobes pytest plugin: they check what lookup.c does inside, not only what it
prints. Run them with ``pytest examples/`` (the plugin comes with the package; gcc builds the program).

The ``uprobes`` fixture runs a command under probes (the ptrace engine: no root needed) and gives the hits."""

import subprocess

import pytest


@pytest.fixture(scope="module")
def lookup(tmp_path_factory):
    """The example program, built with gcc."""
    program = tmp_path_factory.mktemp("build") / "lookup"
    subprocess.run(["gcc", "-O2", "-g", "-o", str(program), "examples/lookup.c"], check=True)
    return str(program)


def test_the_store_is_read_once_per_key(uprobes, lookup):
    run = uprobes.run([lookup, "3", "5", "3", "3", "5", "7"], f"uprobe:{lookup}:store_read key=%di:s64")
    assert run.status == 0 and run.stdout.splitlines()[0] == b"3 10"
    run.assert_called("store_read", times=3)
    assert [hit.args["key"] for hit in run.hits("store_read")] == [3, 5, 7]


def test_the_cache_is_asked_before_the_store(uprobes, lookup):
    run = uprobes.run([lookup, "4"], f"uprobe:{lookup}:cache_get", f"uprobe:{lookup}:store_read",
                      f"uprobe:{lookup}:cache_put")
    run.assert_order("cache_get", "store_read", "cache_put")


def test_a_hit_never_reads_the_store(uprobes, lookup):
    run = uprobes.run([lookup, "6", "6"], f"uprobe:{lookup}:store_read key=%di:s64",
                      f"uretprobe:{lookup}:cache_get found=$retval:s32")
    run.assert_called("store_read", times=1)
    assert [hit.retval for hit in run.hits("cache_get%return")] == [0, 1]
