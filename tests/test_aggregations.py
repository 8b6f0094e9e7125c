"""``count --by`` and ``hist``: hits counted per distinct argument value, and histograms of an argument, made in
the tool from the events, on both engines.

The oracle is the program: takes prints every call with its arguments and result; the counts and the buckets
are computed from those lines here (the buckets by the rule README gives: log2 as latency's, the negative ones
mirrored, or linear).
"""

from __future__ import annotations

import collections

import pytest

from conftest import run_cli, run_json
from oracles import takes_calls

N = 600


def _take(targets, condition: str = "") -> str:
    return f"uprobe:{targets / 'takes'}:take size=%di:s64 name=+0(%si):string flags=%dx:u32{condition}"


def test_counts_by_value_are_what_the_program_did(engine, targets):
    """By one argument, by two, with a predicate, and the first few with --top; text and JSON."""
    takes = str(targets / "takes")
    records, proc = run_json("count", "--engine", engine, "--by", "name,flags", _take(targets, " if size > 1000"),
                             "--", takes, str(N))
    assert proc.returncode == 0, proc.stderr
    calls = takes_calls(proc.stdout, N)
    expected = collections.Counter((name, flags) for size, name, flags, _ in calls if size > 1000)
    assert {(r["key"]["name"], r["key"]["flags"]): r["hits"] for r in records} == expected
    assert all(r["probe"] == "take" and set(r["key"]) == {"name", "flags"} for r in records)
    assert [r["hits"] for r in records] == sorted((r["hits"] for r in records), reverse=True)

    text = run_cli("count", "--engine", engine, "--by", "flags", "--top", "3", _take(targets), "--", takes, str(N))
    assert text.status == 0, text.stderr
    table = text.stdout.splitlines()[N + 1:]
    by_flags = collections.Counter(flags for _, _, flags, _ in calls)
    assert table[0].split() == ["PROBE", "flags", "HITS"] and len(table) == 4
    rows = [line.split() for line in table[1:]]
    assert all(name == "take" and by_flags[int(flags)] == int(hits) for name, flags, hits in rows)
    assert sorted(int(hits) for *_, hits in rows) == sorted(by_flags.values())[-3:]


def _log2_bucket(value: int) -> tuple[int, int]:
    if value >= 0:
        k = max(0, value.bit_length() - 1)
        return (0 if k == 0 else 1 << k), (1 << (k + 1)) - 1
    k = max(0, (-value).bit_length() - 1)
    return -((1 << (k + 1)) - 1), -(1 << k)


def _buckets(values: list[int], bucket) -> list[tuple[int, int, int]]:
    """(low, high, count) of every bucket from the lowest used to the highest, as they follow each other."""
    counts = collections.Counter(bucket(value) for value in values)
    ordered = sorted(counts)
    result, (low, high) = [], ordered[0]
    while True:
        result.append((low, high, counts.get((low, high), 0)))
        if (low, high) == ordered[-1]:
            return result
        low, high = bucket(high + 1)


def test_a_histogram_of_an_argument_has_the_program_s_values(engine, targets):
    """take's sizes, log2 and linear; take's return values (negative for most: the mirrored buckets)."""
    takes = str(targets / "takes")
    records, proc = run_json("hist", "--engine", engine, _take(targets), "size", "--", takes, str(N))
    assert proc.returncode == 0, proc.stderr
    sizes = [size for size, *_ in takes_calls(proc.stdout, N)]
    (record,) = records
    assert record["probe"] == "take" and record["arg"] == "size" and record["count"] == N
    assert (record["min"], record["max"], record["mean"]) == (min(sizes), max(sizes), sum(sizes) // N)
    assert [(b["low"], b["high"], b["count"]) for b in record["buckets"]] == _buckets(sizes, _log2_bucket)

    records, proc = run_json("hist", "--engine", engine, "--linear", "1000", _take(targets), "size", "--", takes,
                             str(N))
    (record,) = records
    assert [(b["low"], b["high"], b["count"]) for b in record["buckets"]] == \
        _buckets(sizes, lambda v: (v // 1000 * 1000, v // 1000 * 1000 + 999))

    records, proc = run_json("hist", "--engine", engine, f"uretprobe:{takes}:take r=$retval:s64", "r", "--", takes,
                             str(N))
    results = [result for *_, result in takes_calls(proc.stdout, N)]
    (record,) = records
    assert [(b["low"], b["high"], b["count"]) for b in record["buckets"]] == _buckets(results, _log2_bucket)
    assert record["buckets"][0]["low"] < 0 < record["buckets"][-1]["high"]


def test_one_histogram_per_key(engine, targets):
    takes = str(targets / "takes")
    records, proc = run_json("hist", "--engine", engine, "--by", "name", _take(targets), "size", "--", takes, str(N))
    assert proc.returncode == 0, proc.stderr
    calls = takes_calls(proc.stdout, N)
    assert {r["key"]["name"]: r["count"] for r in records} == collections.Counter(name for _, name, _, _ in calls)
    for record in records:
        sizes = [size for size, name, _, _ in calls if name == record["key"]["name"]]
        assert [(b["low"], b["high"], b["count"]) for b in record["buckets"]] == _buckets(sizes, _log2_bucket)
    text = run_cli("hist", "--engine", engine, "--by", "name", _take(targets), "size", "--", takes, "8").stdout
    assert 'take: size (name="alpha")' in text and text.count("count 2  min ") == 4


@pytest.mark.parametrize("args, message", [
    (["count", "--by", "sizes"], "--by sizes: probe '{probe}' has no argument 'sizes' (its arguments: size, name, "
                                 "flags; and $pid, $tid, $comm)"),
    (["count", "--top", "2"], "--top N keeps the N keys with the most hits: give --by ARG too"),
    (["count", "--by", "size;name"], "--by takes names of fetch arguments (or $pid, $tid, $comm), separated by "
                                     "commas, not 'size;name'"),
    (["hist", "name"], "hist name: probe '{probe}' fetches it as string; a histogram draws integers"),
    (["hist", "--by", "$comm", "bogus"], "hist bogus: probe '{probe}' has no argument 'bogus' (its arguments: "
                                         "size, name, flags; and $pid, $tid, $comm)"),
    (["hist", "--linear", "0", "size"], "uprobes: error: argument --linear: --linear takes a step above 0, "
                                        "not '0' (see uprobes hist --help)"),
    (["count", "--by", "size", "--top", "-2"], "uprobes: error: argument --top: --top takes a number of keys "
                                               "above 0, not '-2' (see uprobes count --help)"),
])
def test_aggregation_errors_are_one_line(targets, args, message):
    probe = _take(targets)
    command, *options = args
    words = [*options[:-1], probe, options[-1]] if command == "hist" else [*options, probe]
    result = run_cli(command, "--engine", "ptrace", *words, "--", str(targets / "takes"), "1")
    expected = message.format(probe=probe)
    assert result.status == 2 and result.stderr == (expected if expected.startswith("uprobes: ") else
                                                    f"uprobes: error: {expected}") + "\n"
    assert run_cli("hist", "--engine", "ptrace", probe, "--", "true").stderr.startswith(
        "uprobes: error: hist PROBE... ARG: give the name of the argument to draw last")


def test_the_python_api_judges_predicates_and_aggregates(targets):
    """A Session's handler sees only the hits its probe's predicate keeps; count() and hist() aggregate the kept
    events of the probes that fetch the names asked for."""
    from uprobes.api import Session

    takes = str(targets / "takes")
    seen = []
    with Session(command=[takes, str(N)]) as session:
        session.probe(_take(targets, " if size > 4000"), lambda hit: seen.append(hit.args["size"]))
        session.probe(f"uprobe:{takes}:take flags=%dx:u32")
        assert session.run() == 0
    calls = [(size, name, flags) for size, name, flags in
             ((i * 7919 % 5000 + 1, ("alpha", "beta", "gamma", "delta")[i % 4], i % 16) for i in range(N))]
    big = [call for call in calls if call[0] > 4000]
    assert seen == [size for size, _, _ in big] and session.hit_counts() == [len(big), N]
    assert {tuple(key.values()): hits for _, key, hits in session.count(by="name")} == \
        collections.Counter((name,) for _, name, _ in big)
    by_flags = collections.Counter()
    for _, key, hits in session.count("flags"):  # both probes fetch flags: the first's kept hits, all the second's
        by_flags[key["flags"]] += hits
    assert by_flags == collections.Counter(f for *_, f in calls) + collections.Counter(f for *_, f in big)
    ((probe, key, histogram),) = session.hist("size")
    assert probe == "take" and key == {} and histogram.buckets() == _buckets([s for s, _, _ in big], _log2_bucket)


def test_interval_reports_start_from_zero_each_time(targets):
    """Two runs of takes 0.6 s apart, reported every 0.4 s: each run's calls fall in one interval or another,
    never summed with the other's, and the intervals add up to every call (numbered in JSON)."""
    takes = str(targets / "takes")
    records, proc = run_json("count", "--engine", "ptrace", "--interval", "0.4", "--by", "name",
                             f"uprobe:{takes}:take name=+0(%si):string", "--", "sh", "-c",
                             f"{takes} 200 > /dev/null; sleep 0.6; {takes} 100 > /dev/null")
    assert proc.returncode == 0, proc.stderr
    assert len({r["interval"] for r in records}) >= 2 and all(r["hits"] <= 50 for r in records)
    total = collections.Counter()
    for record in records:
        total[record["key"]["name"]] += record["hits"]
    assert total == {"alpha": 75, "beta": 75, "gamma": 75, "delta": 75}


@pytest.mark.parametrize("ns, text", [(0, "0ns"), (999, "999ns"), (1000, "1µs"), (1024, "1.02µs"), (16384, "16.4µs"),
                                      (999_499, "999µs"), (999_500, "1ms"), (2_065_309, "2.07ms"),
                                      (1_073_741_824, "1.07s"), (1_234_000_000_000, "1234s")])
def test_durations_are_written_in_the_unit_that_suits(ns, text):
    from uprobes.output.histogram import duration

    assert duration(ns) == text
