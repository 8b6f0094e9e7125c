"""Insert and remove many probes in a running process, timed; bench/run.py runs it in a process of its own.

    python bench/insert.py --engine ptrace|kernel --pid PID --probes FILE

FILE holds one probe per line (``uprobe:PATH:SYMBOL+OFFSET``; :func:`instruction_probes` writes such lists).
Prints one JSON object: how long resolving, attaching (every probe placed) and closing (every byte restored)
took, the probe points placed, this process's peak RSS (VmHWM), and what was seen in the target's memory at the
first and the last probe address while attached (an int3, 0xcc, or the ptrace engine's jump, 0xe9) and after
closing (the original byte).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter

from iced_x86 import Decoder, DecoderOptions

from uprobes.errors import UprobesError
from uprobes.x86_64.analysis import analyze

LIBC = "/usr/lib/x86_64-linux-gnu/libc.so.6"
_LEGACY_PREFIXES = frozenset({0xF0, 0xF2, 0xF3, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65, 0x66, 0x67})
_KERNEL_REFUSED_PREFIXES = frozenset({0xF0, 0x2E, 0x36, 0x3E, 0x26})  # lock, cs ss ds es


def instruction_probes(count: int, path: str = LIBC) -> list[str]:
    """``uprobe:PATH:FUNCTION+OFFSET`` for every instruction the ptrace engine accepts, function after function
    of ``path`` in address order, until ``count``. Instructions with a lock or cs/ss/ds/es prefix are left out,
    since the kernel refuses them (README, Engines), and so are the first 64 functions."""
    listing = subprocess.run([sys.executable, "-m", "uprobes", "list", path, "--json"], check=True,
                             capture_output=True, text=True)
    functions = [f for f in json.loads(listing.stdout)["functions"] if f["size"] > 0 and f["type"] == "func"]
    names = Counter(f["name"] for f in functions)
    offsets = Counter(f["offset"] for f in functions)
    # One symbol per function and one function per name, so that each probe is exactly one probe point.
    functions = sorted((f for f in functions if names[f["name"]] == 1 and offsets[f["offset"]] == 1),
                       key=lambda f: f["offset"])
    probes: list[str] = []
    with open(path, "rb") as f:
        for function in functions[64:]:
            f.seek(function["offset"])
            code = f.read(function["size"] + 16)
            name = function["name"]
            decoder = Decoder(64, code[:function["size"]], DecoderOptions.NONE, ip=0)
            for ins in decoder:
                if ins.is_invalid:
                    break
                raw = code[ins.ip:ins.ip + 16]
                prefixes = raw[:next((i for i, b in enumerate(raw) if b not in _LEGACY_PREFIXES), 0)]
                if any(b in _KERNEL_REFUSED_PREFIXES for b in prefixes):
                    continue
                try:
                    analyze(raw, function["address"] + ins.ip)
                except UprobesError:
                    continue
                probes.append(f"uprobe:{path}:{name}+{ins.ip}" if ins.ip else f"uprobe:{path}:{name}")
                if len(probes) == count:
                    return probes
    return probes


def _byte_at(pid: int, path: str, offset: int) -> int | None:
    """The byte at file ``offset`` of ``path`` as process ``pid`` sees it now (int3s included)."""
    real = os.path.realpath(path)
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) < 6 or os.path.realpath(fields[5].strip()) != real or "x" not in fields[1]:
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            file_offset = int(fields[2], 16)
            if file_offset <= offset < file_offset + end - start:
                with open(f"/proc/{pid}/mem", "rb") as mem:
                    mem.seek(start + offset - file_offset)
                    return mem.read(1)[0]
    return None


def _vm_hwm_kb() -> int:
    """This process's peak RSS. Not getrusage's ru_maxrss, which also counts the memory of the process that
    forked this one (exec keeps the high-water mark of the memory it replaces)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=("ptrace", "kernel"), required=True)
    parser.add_argument("--pid", type=int, required=True)
    parser.add_argument("--probes", required=True, help="a file with one probe per line")
    args = parser.parse_args()
    with open(args.probes) as f:
        texts = [line.strip() for line in f if line.strip()]

    from uprobes.probes.resolve import resolve_texts

    started = time.perf_counter()
    probes = resolve_texts(texts)
    resolved = time.perf_counter()
    watch = [probes[0], probes[-1]]
    original = [_byte_at(args.pid, p.path, p.offset) for p in watch]
    if args.engine == "ptrace":
        from uprobes.engines.ptrace.engine import PtraceEngine

        engine = PtraceEngine()
        engine.attach(probes, args.pid, counting=True)
    else:
        from uprobes.engines.kernel.engine import KernelEngine

        engine = KernelEngine()
        try:
            engine.attach(probes, args.pid, counting=True)
        except BaseException:
            engine.close()
            raise
    attached = time.perf_counter()
    during = [_byte_at(args.pid, p.path, p.offset) for p in watch]
    before_close = time.perf_counter()
    engine.close()
    closed = time.perf_counter()
    after = [_byte_at(args.pid, p.path, p.offset) for p in watch]
    print(json.dumps({
        "engine": args.engine, "probes": len(texts), "probe_points": len(probes),
        "resolve_s": resolved - started, "attach_s": attached - resolved, "close_s": closed - before_close,
        "vm_hwm_kb": _vm_hwm_kb(),
        "bytes_original": original, "bytes_attached": during, "bytes_after_close": after,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
