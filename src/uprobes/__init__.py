"""uprobes: Linux user-space probes for x86-64 programs.

Probe any instruction, function, function return or SDT/USDT marker, named the way bpftrace or the
kernel's ``uprobe_events`` name them. Start with :func:`uprobes.probes.resolve.resolve_text` and
:func:`uprobes.sdt.notes.read_markers`.
"""

__version__ = "0.1.0"
