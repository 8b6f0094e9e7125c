"""The x86-64 registers a probe can read: one table, every name each register goes by.

Each row is one 64-bit field of ``struct user_regs_struct`` (<sys/user.h>), in the struct's order, so
``PTRACE_GETREGS`` fills a structure built from :data:`USER_REGS`. A row also gives the register's name in
the kernel's ``struct pt_regs``, which fetch arguments use (``%ax``, ``%di``, ``%r8``), and the names
instructions give it and its parts in AT&T syntax, which SDT marker arguments use::

    >>> BY_FIELD["rax"].kernel, [(p.name, p.size, p.shift) for p in BY_FIELD["rax"].parts]
    ('ax', [('rax', 8, 0), ('eax', 4, 0), ('ax', 2, 0), ('al', 1, 0), ('ah', 1, 8)])
    >>> FETCHARG_NAMES["rflags"], OPERAND_NAMES["r9d"][0].field
    ('flags', 'r9')

The same text means different things in the two namespaces: ``%ax`` is all of rax in a fetch argument and
its low 16 bits in an instruction operand, which is why lookups are by namespace.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "SubRegister", "UserRegister", "USER_REGS", "GENERAL_REGISTERS", "XMM_REGISTERS", "BY_FIELD", "BY_KERNEL_NAME",
    "FETCHARG_NAMES", "OPERAND_NAMES", "STATUS_FLAGS", "ZERO_FLAG", "DWARF_REGISTERS",
]


@dataclass(frozen=True)
class SubRegister:
    """An AT&T operand name for a register or part of it: ``%eax`` is 4 bytes, ``%ah`` 1 byte at ``shift`` 8."""

    name: str
    size: int  # bytes
    shift: int = 0  # bits right of the part's lowest bit: 8 for ah, bh, ch, dh


@dataclass(frozen=True)
class UserRegister:
    """One field of ``struct user_regs_struct``: ``field``, its ``struct pt_regs`` name ``kernel`` (None for the
    fields pt_regs lacks: fs_base, gs_base, ds, es, fs, gs), its AT&T operand names ``parts`` (the whole register
    first), and ``aliases``, further names a fetch argument accepts for the whole register (``%rflags``)."""

    field: str
    kernel: str | None
    parts: tuple[SubRegister, ...] = ()
    aliases: tuple[str, ...] = ()
    general: bool = False  # one of the 16 general-purpose registers

    def low(self, size: int) -> SubRegister:
        """The part holding the low ``size`` bytes: ``BY_FIELD["r8"].low(4).name == "r8d"``."""
        return next(part for part in self.parts if part.size == size and not part.shift)

    @property
    def fetcharg_names(self) -> tuple[str, ...]:
        """What a fetch argument may write after ``%`` for this register; empty when pt_regs has no such field."""
        if self.kernel is None:
            return ()
        return (self.kernel, *(part.name for part in self.parts[:1]), *self.aliases)


def _general(field: str, kernel: str, dword: str, word: str, byte: str, high: str | None = None) -> UserRegister:
    parts = (SubRegister(field, 8), SubRegister(dword, 4), SubRegister(word, 2), SubRegister(byte, 1))
    if high is not None:
        parts += (SubRegister(high, 1, shift=8),)
    return UserRegister(field, kernel, parts, general=True)


def _numbered(n: int) -> UserRegister:
    return _general(f"r{n}", f"r{n}", f"r{n}d", f"r{n}w", f"r{n}b")


# struct user_regs_struct in <sys/user.h>; the pt_regs names are regoffset_table in arch/x86/kernel/ptrace.c.
USER_REGS: tuple[UserRegister, ...] = (
    *(_numbered(n) for n in (15, 14, 13, 12)),
    _general("rbp", "bp", "ebp", "bp", "bpl"),
    _general("rbx", "bx", "ebx", "bx", "bl", "bh"),
    *(_numbered(n) for n in (11, 10, 9, 8)),
    _general("rax", "ax", "eax", "ax", "al", "ah"),
    _general("rcx", "cx", "ecx", "cx", "cl", "ch"),
    _general("rdx", "dx", "edx", "dx", "dl", "dh"),
    _general("rsi", "si", "esi", "si", "sil"),
    _general("rdi", "di", "edi", "di", "dil"),
    UserRegister("orig_rax", "orig_ax"),  # the system call number on entry; -1 outside a system call
    UserRegister("rip", "ip", (SubRegister("rip", 8), SubRegister("eip", 4), SubRegister("ip", 2))),
    UserRegister("cs", "cs"),
    UserRegister("eflags", "flags", aliases=("eflags", "rflags")),
    _general("rsp", "sp", "esp", "sp", "spl"),
    UserRegister("ss", "ss"),
    *(UserRegister(field, None) for field in ("fs_base", "gs_base", "ds", "es", "fs", "gs")),
)
"""Every field of ``struct user_regs_struct``, in its order (8 bytes each)."""

GENERAL_REGISTERS: tuple[UserRegister, ...] = tuple(reg for reg in USER_REGS if reg.general)
"""rax..r15, in ``struct user_regs_struct`` order."""

XMM_REGISTERS: tuple[str, ...] = tuple(f"xmm{n}" for n in range(32))
"""The vector registers an SDT argument may name (xmm16-31 exist with AVX-512)."""

BY_FIELD: dict[str, UserRegister] = {reg.field: reg for reg in USER_REGS}
"""``struct user_regs_struct`` field -> its row."""

BY_KERNEL_NAME: dict[str, UserRegister] = {reg.kernel: reg for reg in USER_REGS if reg.kernel is not None}
"""``struct pt_regs`` name (``ax``, ``flags``, ``orig_ax``) -> its row."""

FETCHARG_NAMES: dict[str, str] = {name: reg.kernel for reg in USER_REGS if reg.kernel is not None
                                  for name in reg.fetcharg_names}
"""Every register name a fetch argument accepts (``di``, ``rdi``, ``eflags``) -> the name the kernel knows."""

OPERAND_NAMES: dict[str, tuple[UserRegister, SubRegister]] = {part.name: (reg, part)
                                                              for reg in USER_REGS for part in reg.parts}
"""Every AT&T name of a general register or rip, or of a part of one (``eax``, ``r9b``, ``ah``) -> (row, part)."""

ZERO_FLAG = 0x40
STATUS_FLAGS = 0x1 | 0x4 | 0x10 | ZERO_FLAG | 0x80 | 0x400 | 0x800
"""CF PF AF ZF SF DF OF of rflags: what the program's own code reads, and a trampoline saves and puts back."""

DWARF_REGISTERS: dict[int, UserRegister] = {
    number: BY_FIELD[field] for number, field in enumerate(
        ("rax", "rdx", "rcx", "rbx", "rsi", "rdi", "rbp", "rsp", *(f"r{n}" for n in range(8, 16)), "rip"))
}
"""The general registers and rip by DWARF number (the x86-64 psABI, figure 3.36); 17-32 are xmm0-15."""
