"""Trampolines of jump probes: what a replaced site jumps to, generated at insertion with iced-x86's encoder.

A counting trampoline, for a site in the middle of a function::

    lea   -128(%rsp),%rsp      # step over the red zone the interrupted code may be using
    pushfq                     # lock inc changes the flags
    lock incq counter(%rip)    # the site's counter, on its own cache line
    popfq
    lea   128(%rsp),%rsp
    <the displaced instructions, re-encoded here>
    jmp   site + length        # back to the program

Where the flags are dead (a function's entry, or code that writes them all before it reads any, or calls or
returns first: :attr:`~uprobes.x86_64.jumps.JumpSite.flags_live`), only the ``lock inc`` is there, and the
trampoline never touches the stack. A displaced ``call rel32`` (only ever the last one) runs as a push of the original return address
and a ``jmp``: a real call would leave a return address pointing into the trampoline.

Every instruction of a trampoline has a :class:`Resume`: how a thread stopped just before it gets back onto
the program's own path (the stack it is owed, the flags saved on it, the original address to go on at, and
whether the hit was counted already). Stopping every thread at detach, and a signal for a thread in the
trampoline, both use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from iced_x86 import BlockEncoder, Code, Decoder, DecoderOptions, FlowControl, Instruction, MemoryOperand, Register

from .abi import NR_PROCESS_VM_READV
from .codegen import encode
from .jumps import JumpSite

__all__ = ["CaptureLoad", "CaptureRegister", "Compare", "FULL", "HIJACK", "Logic", "Mask", "RETURN", "RingLayout",
           "Resume", "ShadowLayout", "Test", "Trampoline",
           "counting_trampoline", "recording_trampoline", "return_trampoline", "tsc_reader", "RED_ZONE"]

RED_ZONE = 128
# What the tracer does at an int3 of a trampoline (Trampoline.traps)
HIJACK = "hijack"  # send the function's return to its return trampoline (the shadow stack needs more)
RETURN = "return"  # take a return (the shadow stack needs more)
FULL = "full"  # the hit of a Python handler's probe, whose record found the ring full
_MASK32 = (1 << 32) - 1
_FALLS_THROUGH = frozenset({FlowControl.NEXT, FlowControl.CONDITIONAL_BRANCH})


@dataclass(frozen=True)
class Resume:
    """A thread stopped at this point of a trampoline is, in the program's terms, at ``rip``, once ``stack`` bytes
    are added back to rsp, the flags saved at ``flags_at`` bytes above rsp (if any) and the registers in
    ``saved`` (user_regs field, bytes above rsp) are put back."""

    rip: int
    stack: int = 0
    flags_at: int | None = None
    counted: bool = False  # the hit was counted before this point
    saved: tuple[tuple[str, int], ...] = ()
    reserved: str | None = None  # the register holding the sequence word of a ring slot reserved, not yet written
    reserved_if_zf: bool = False  # ... reserved only if ZF is set (just after the compare-and-swap)
    recorded: bool = False  # the hit's record was written, or counted as lost
    loads: bool = False  # this instruction reads the program's memory for the record (a fault is ours)
    shadowed: bool = False  # the function's return was sent to its return trampoline (undone if sent back)
    returning: bool = False  # in a return trampoline: the return is not taken yet (the tracer takes it)
    returned: bool = False  # the return is taken: the thread goes on at the address just below its stack
    reserved_at: int | None = None  # ... the sequence word is at this many bytes above rsp instead
    reserved_span: int | str = 1  # the slots the reserved record takes (a str: the register holding how many)
    reserved_ahead: bool = False  # ... the register holds the ticket after them, not the sequence word
    shrunk_if_zf: str | None = None  # ... if ZF is set, this register holds how many (some were given back)


@dataclass(frozen=True)
class Trampoline:
    """``code`` to place at ``address``, and where each of its instructions stands in the program's terms."""

    address: int
    code: bytes
    resumes: dict[int, Resume]  # by the address of each instruction
    relocated: int = 0  # where the displaced instructions start
    traps: dict[int, str] = field(default_factory=dict)  # the int3s that leave work to the tracer: which work

    def resume(self, rip: int) -> Resume | None:
        return self.resumes.get(rip)

    def displaced(self, address: int) -> int | None:
        """Where the displaced instruction that was at ``address`` starts in the trampoline (past the count)."""
        return min((at for at, resume in self.resumes.items()
                    if at >= self.relocated and resume.rip == address and resume.counted and not resume.stack),
                   default=None)


def counting_trampoline(site: JumpSite, address: int, counter: int) -> Trampoline:
    """Count a hit at ``counter`` (8 bytes), run ``site``'s displaced instructions and go back."""
    at_site = site.address
    pieces: list[tuple[Instruction, Resume]] = []
    increment = _locked_increment(MemoryOperand(Register.RIP, displ=counter))
    if not site.flags_live:
        pieces.append((increment, Resume(at_site)))
    else:
        pieces += [(_lea_rsp(-RED_ZONE), Resume(at_site)),
                   (Instruction.create(Code.PUSHFQ), Resume(at_site, RED_ZONE)),
                   (increment, Resume(at_site, RED_ZONE + 8, flags_at=0)),
                   (Instruction.create(Code.POPFQ), Resume(at_site, RED_ZONE + 8, flags_at=0, counted=True)),
                   (_lea_rsp(RED_ZONE), Resume(at_site, RED_ZONE, counted=True))]
    pieces += _relocated(site)
    return _assemble(pieces, address)


@dataclass(frozen=True)
class RingLayout:
    """Where a recording trampoline writes: the ring's header at ``address`` (the words ``head``, ``tail`` and
    ``lost`` at those offsets), then ``count`` slots (a power of two) of ``1 << slot_shift`` bytes from ``slots``;
    in a slot, the offsets of the sequence word (written last: ticket + 1), the site's id (32 bits), the CPU
    (32 bits, from ``rdtscp``; in a record of more than one slot, the high 16 bits are how many), the time stamp
    counter, the thread's key (its fs base) and the captured words."""

    address: int
    head: int
    tail: int
    lost: int
    slots: int
    slot_shift: int
    count: int
    seq: int
    site: int
    cpu: int
    tsc: int
    key: int
    words: int
    pid: int = 0  # the header's word holding the process's id (a dereference reads through it)


@dataclass(frozen=True)
class ShadowLayout:
    """Where pending returns are kept, a stack per thread: ``threads + probes`` records of ``1 << record_shift``
    bytes from ``address``. A thread's record (its fs base at ``key``, 0: free) is one of the ``probes`` from
    index ``(fs base >> record_shift) % threads``; it holds the depth at ``depth`` and up to ``limit`` entries of
    ``1 << entry_shift`` bytes from ``entries``, the innermost last: the return address's slot on the stack, the
    address it held (``original``) and the return trampoline that replaced it."""

    address: int
    threads: int
    probes: int
    record_shift: int
    key: int
    depth: int
    entries: int
    entry_shift: int
    limit: int
    slot: int
    original: int
    trampoline: int


@dataclass(frozen=True)
class CaptureRegister:
    """A word of the record: the value a user_regs field (a general register, ``rsp``, ``eflags``) had at the hit."""

    field: str


@dataclass(frozen=True)
class CaptureLoad:
    """A word of the record: ``size`` bytes (1, 2, 4 or 8, zero-extended) at ``base + index * scale + disp`` as
    the program had them at the hit (``base`` and ``index`` user_regs fields or None). Only memory the program
    is known to have mapped there is read this way; a fault is caught by the tool (``Resume.loads``)."""

    base: str | None
    disp: int
    size: int
    index: str | None = None
    scale: int = 1

    def address(self, registers: dict[str, int]) -> int:
        """Where it was read, from the registers of the hit."""
        address = self.disp + (registers[self.base] if self.base else 0)
        address += registers[self.index] * self.scale if self.index else 0
        return address & (1 << 64) - 1


@dataclass(frozen=True)
class CaptureRead:
    """A word of the record: ``size`` bytes (1, 2, 4 or 8, zero-extended) at ``disp`` plus the value of register
    ``base`` at the hit, or plus the word ``inner`` read before it (a dereference of a dereference). Read with
    ``process_vm_readv`` on the process itself, so that a bad address is never a fault in the program: its bit
    is set in the record's :class:`CaptureFaults` word instead (bit n: the n-th word of the record)."""

    base: str | None
    disp: int
    size: int
    inner: CaptureRead | None = None

    def address(self, registers: dict[str, int], values: dict[CaptureRead, int]) -> int:
        """Where it was read, from the registers of the hit and the words read before it."""
        start = registers[self.base] if self.base is not None else values[self.inner]
        return start + self.disp & (1 << 64) - 1


@dataclass(frozen=True)
class CaptureBytes:
    """A word of the record: how many bytes were read (a negative errno: none) at ``disp`` plus register
    ``base``, plus the word ``inner`` read before it, or at ``disp`` itself (neither), with ``process_vm_readv``
    into the record's slots after its first, just after what the record's reads before it gave (so that a short
    string leaves the slots it does not need free). An array (``string`` False): ``size`` bytes at once.
    A string: up to and with its NUL, at most ``size`` bytes, in reads that never cross a page, so that it
    stops at an unreadable page where a read byte by byte would."""

    base: str | None
    disp: int
    size: int
    inner: CaptureRead | None = None
    string: bool = False

    def address(self, registers: dict[str, int], values: dict[CaptureRead, int]) -> int:
        """Where it was read, from the registers of the hit and the words read before it."""
        start = registers[self.base] if self.base is not None else values[self.inner] if self.inner else 0
        return start + self.disp & (1 << 64) - 1


@dataclass(frozen=True)
class Compare:
    """A test a trampoline makes before it records a hit: the low ``bits`` of register ``field`` at the hit,
    ``signed`` or not, ``op`` (``== != < <= > >=``) ``value``."""

    field: str
    bits: int
    signed: bool
    op: str
    value: int


@dataclass(frozen=True)
class Mask:
    """True when the low ``bits`` of register ``field`` (extended as ``signed`` says) and ``value`` have a bit in
    common."""

    field: str
    bits: int
    signed: bool
    value: int


@dataclass(frozen=True)
class Logic:
    """``and``, ``or`` of two tests, or ``not`` of one (``right`` None)."""

    op: str
    left: Test
    right: Test | None = None


Test = Compare | Mask | Logic
_JUMP_IF_NOT = {  # (op, signed) -> the branch taken when the comparison is false
    ("==", False): Code.JNE_REL32_64, ("!=", False): Code.JE_REL32_64,
    ("<", True): Code.JGE_REL32_64, ("<=", True): Code.JG_REL32_64, (">", True): Code.JLE_REL32_64,
    (">=", True): Code.JL_REL32_64, ("<", False): Code.JAE_REL32_64, ("<=", False): Code.JA_REL32_64,
    (">", False): Code.JBE_REL32_64, (">=", False): Code.JB_REL32_64,
}


def area(captures: tuple[Capture, ...]) -> int:
    """The most bytes the :class:`CaptureBytes` of a record may read, past its first slot."""
    return sum(capture.size for capture in captures if isinstance(capture, CaptureBytes))


@dataclass(frozen=True)
class CaptureFaults:
    """A word of the record: which of its :class:`CaptureRead` words could not be read (bit n: word n)."""


Capture = CaptureRegister | CaptureLoad | CaptureRead | CaptureBytes | CaptureFaults

# What a recording trampoline clobbers, saved on the stack in this order: rdtscp writes rax, rdx and rcx.
_SAVED = (Register.RAX, Register.RCX, Register.RDX, Register.RSI, Register.R11)
_RETURN_SAVED = (Register.R8, Register.R9, Register.R10)  # and what a return trampoline keeps its entry in
_FIELDS = {register: name for name in ("rax", "rcx", "rdx", "rsi", "rdi", "r11", "r8", "r9", "r10")
           for register in [getattr(Register, name.upper())]}
_LOADS = {8: Code.MOV_R64_RM64, 4: Code.MOV_R32_RM32, 2: Code.MOVZX_R32_RM16, 1: Code.MOVZX_R32_RM8}
# What a system call in a trampoline clobbers or takes its arguments in, saved around it (%rcx: the ticket)
_KEPT = (Register.RDI, Register.R8, Register.R9, Register.R10, Register.R11, Register.RCX)
_PAGE = 4096
_FIRST_READ = 256  # a string's first read; each next one as long as what was read so far more, to the page end


def recording_trampoline(site: JumpSite, address: int, counter: int | None, ring: RingLayout | None,
                         site_id: int | None, captures: tuple[Capture, ...], rdpid: bool = False,
                         returns: tuple[ShadowLayout, int] | None = None, handled: bool = False,
                         test: Test | None = None) -> Trampoline:
    """Write one record of a hit into ``ring`` (``captures`` as its words), run ``site``'s displaced
    instructions and go back; a hit whose record finds the ring full is counted at ``counter`` (the hits are the
    records and that count: a locked add per hit would cost more than the record)::

        lea -128(%rsp),%rsp; [pushfq;] push %rax, %rcx, %rdx, %rsi, %r11
        rdtscp (or rdtsc; rdpid %rsi, cheaper where there is rdpid); %rdx = tsc; %esi = cpu; %r11 = ring
        retry: %rax = head; full if head - tail >= count (signed); lock cmpxchg head+1 into head; jne retry
        %r11 = slot of ticket %rax; write tsc, cpu, site id, rdfsbase, the captured words; seq = ticket + 1
        (full: lock incq counter(%rip); lock incq lost)
        pop ...; [popfq;] lea 128(%rsp),%rsp; <displaced instructions>; jmp back

    A reserved slot is always written to the end (no branch out between the reservation and ``seq``); a
    thread stopped in between is sent back to the site by the tracer, which voids the slot (``Resume.reserved``).

    ``returns`` (the shadow stacks, a return trampoline): the function's return goes to that trampoline, the
    real return address kept on the thread's shadow stack (:meth:`_Builder.hijack`); ``counter`` and ``ring``
    None: no hit of the entry itself is counted or recorded. ``handled`` (a Python handler's record): a full
    ring is no loss, the hit goes to the tracer (:data:`FULL`) with the thread stopped. ``test`` (a probe's
    predicate over registers; with a ring, no ``returns``, not ``handled``): a hit it finds false is neither
    recorded nor counted, and the trampoline goes straight on to the displaced instructions.
    """
    if test is not None and (ring is None or returns is not None or handled):
        raise ValueError("a trampoline tests a hit only to record it")
    flags = site.flags_live or test is not None or any(isinstance(c, CaptureRegister) and c.field == "eflags"
                                                       for c in captures)
    builder = _Builder(site.address)
    builder.enter(flags, _SAVED)
    if counter is not None and ring is None:
        builder.count(counter)
    full = builder.label() if handled else None
    skip = builder.label() if test is not None else None
    if test is not None:
        builder.test(test, skip)
    if ring is not None:
        builder.record(ring, site_id, captures, rdpid, full, counter)
    if skip is not None:
        builder.bind(skip)  # the hits left out join here, as if recorded: the tracer has nothing to redo
    if returns is None and full is None:
        builder.leave()
        return builder.assemble(address, _relocated(site, recorded=ring is not None))
    slow = builder.label() if returns is not None else None
    if returns is not None:
        builder.hijack(*returns, slow)
    builder.exits({full: FULL, slow: HIJACK})
    return builder.assemble(address, _relocated(site, recorded=ring is not None, shadowed=returns is not None))


def return_trampoline(function: int, address: int, shadow: ShadowLayout, counter: int | None,
                      ring: RingLayout | None, site_id: int, captures: tuple[Capture, ...],
                      rdpid: bool = False, handled: bool = False) -> Trampoline:
    """Where a function hijacked at its entry (at ``function``) returns to: find the thread's last pending
    return, count the return at ``counter`` or record it into ``ring`` (``captures``: with the registers as the
    function left them), and go on at the address the return really had::

        lea -128(%rsp),%rsp; [pushfq;] push %rax, %rcx, %rdx, %rsi, %r11, %r8, %r9, %r10
        %rdx = the thread's record (by fs base); %r9 = its top entry, which must be this return's (its slot is
        the one the ret popped: %r10 = rsp - 8 of the program); %r8 = the record
        lock incq counter(%rip), or a record of the return (counted there only if the ring is full)
        [%r10] = the real return address; depth - 1
        pop ...; lea 128(%rsp),%rsp; lea -8(%rsp),%rsp; ret

    Anything else (no record, no entry, another slot: a longjmp, another stack) ends in an ``int3`` with every
    register as the function left them: the tracer finds the return and goes on from there (:data:`RETURN`);
    so does a record of a Python handler's that finds the ring full (``handled``: :data:`FULL`).
    """
    flags = any(isinstance(c, CaptureRegister) and c.field == "eflags" for c in captures)
    builder = _Builder(address)
    builder.returning = True
    builder.enter(flags, _SAVED + _RETURN_SAVED)
    slow = builder.label()
    builder.find_thread(shadow, slow)
    rdx, r8, r9, r10 = Register.RDX, Register.R8, Register.R9, Register.R10
    builder.add(_load(Register.RCX, rdx, shadow.depth))
    builder.add(Instruction.create_reg_reg(Code.TEST_RM64_R64, Register.RCX, Register.RCX))
    builder.branch(Code.JE_REL32_64, slow)
    builder.add(Instruction.create_reg_u32(Code.SHL_RM64_IMM8, Register.RCX, shadow.entry_shift))
    builder.add(Instruction.create_reg_mem(Code.LEA_R64_M, r9, MemoryOperand(
        rdx, Register.RCX, displ=shadow.entries - (1 << shadow.entry_shift))))
    builder.add(Instruction.create_reg_mem(Code.LEA_R64_M, r10, MemoryOperand(Register.RSP, displ=builder.stack - 8)))
    builder.add(Instruction.create_mem_reg(Code.CMP_RM64_R64, MemoryOperand(r9, displ=shadow.slot), r10))
    builder.branch(Code.JNE_REL32_64, slow)
    builder.add(Instruction.create_reg_reg(Code.MOV_R64_RM64, r8, rdx))
    if counter is not None and ring is None:
        builder.count(counter)
    full = builder.label() if handled else None
    if ring is not None:
        builder.record(ring, site_id, captures, rdpid, full, counter)
    builder.add(_load(Register.R11, r9, shadow.original))
    builder.add(_store(r10, 0, Register.R11))
    builder.add(Instruction.create_mem(Code.DEC_RM64, MemoryOperand(r8, displ=shadow.depth)))
    builder.returning, builder.returned = False, True
    builder.leave()
    builder.add(_lea_rsp(-8), stack=8)
    builder.add(Instruction.create(Code.RETNQ))
    builder.returning, builder.returned = True, False
    if full is not None:
        builder.counted = builder.recorded = False
        builder.exit(full, FULL)
    builder.counted = builder.recorded = False
    builder.exit(slow, RETURN)
    return builder.assemble(address, [])


class _Builder:
    """Generated instructions with labels, and each one's :class:`Resume` (what the thread owes the program
    if stopped before it): the stack pushed so far, the registers saved on it, the count, the ring slot, the
    pending return."""

    def __init__(self, site: int) -> None:
        self.site = site
        self.pieces: list[tuple[Instruction, Resume]] = []
        self.pushed: list[str] = []  # what is on the stack below the red zone, outermost first
        self.stack = 0
        self.counted = self.recorded = self.reserved_if_zf = False
        self.shadowed = self.returning = self.returned = False
        self.reserved: str | None = None
        self.reserved_span: int | str = 1
        self.reserved_ahead = False
        self.shrunk_if_zf: str | None = None
        self.entered_stack, self.entered_pushed = 0, []
        self.traps: dict[int, str] = {}  # the index of each int3, and what the tracer does there
        self._labels: dict[int, int | None] = {}  # label -> ip of the instruction it is bound to
        self._binding: list[int] = []  # labels bound to the next instruction added
        self._branches: list[tuple[Instruction, int]] = []

    def label(self) -> int:
        label = len(self._labels)
        self._labels[label] = None
        return label

    def bind(self, label: int) -> None:
        """``label`` names the next instruction added."""
        self._binding.append(label)

    def branch(self, code: Code, label: int) -> None:
        instruction = Instruction.create_branch(code, 0)
        self._branches.append((instruction, label))
        self.add(instruction)

    def add(self, instruction: Instruction, stack: int = 0, saves: str | None = None, loads: bool = False) -> None:
        instruction.ip = 1 << 20 | len(self.pieces)  # an ip no real instruction has: branches are bound to it
        for label in self._binding:
            self._labels[label] = instruction.ip
        self._binding.clear()
        self.pieces.append((instruction, self._resume(loads)))
        self.stack += stack
        if saves is not None:
            self.pushed.append(saves)
        elif stack == -8:
            self.pushed.pop()

    def _resume(self, loads: bool) -> Resume:
        offsets = {name: self._offset(name) for name in self.pushed if not name.startswith("_")}  # "_": scratch, or a value of the trampoline's own
        flags_at = offsets.pop("eflags", None)
        reserved_at = None  # the ticket is on the stack while its register serves a system call
        if self.reserved is not None and "_" + self.reserved in self.pushed:
            reserved_at = self._offset("_" + self.reserved)
        return Resume(self.site, self.stack, flags_at, self.counted, tuple(offsets.items()), self.reserved,
                      self.reserved_if_zf, self.recorded, loads, self.shadowed, self.returning, self.returned,
                      reserved_at, self.reserved_span, self.reserved_ahead, self.shrunk_if_zf)

    def enter(self, flags: bool, registers: tuple[Register, ...]) -> None:
        """Step over the red zone, save the flags (if ``flags``) and ``registers``."""
        self.add(_lea_rsp(-RED_ZONE), stack=RED_ZONE)
        if flags:
            self.add(Instruction.create(Code.PUSHFQ), stack=8, saves="eflags")
        for register in registers:
            self.add(Instruction.create_reg(Code.PUSH_R64, register), stack=8, saves=_FIELDS[register])
        self.entered_stack, self.entered_pushed = self.stack, list(self.pushed)

    def exit(self, label: int, kind: str) -> None:
        """At ``label`` (reached by a branch, with what :meth:`enter` saved still saved): put it back, and stop
        at an ``int3`` for the tracer to do ``kind``."""
        self.bind(label)
        self.reenter()
        self.leave()
        self.traps[len(self.pieces)] = kind
        self.add(Instruction.create(Code.INT3))

    def exits(self, kinds: dict[int | None, str]) -> None:
        """The main path (what :meth:`enter` saved put back) goes on past the exits to the tracer of ``kinds``
        (labels; None: none), each as :meth:`exit`."""
        done = self.label()
        self.branch(Code.JMP_REL32_64, done)
        flags = self.counted, self.recorded, self.shadowed
        self.shadowed = False
        for label, kind in kinds.items():
            if label is not None:
                self.counted = flags[0] and kind != FULL  # a full ring: neither recorded nor counted
                self.recorded = flags[1] and kind != FULL
                self.exit(label, kind)
        self.counted, self.recorded, self.shadowed = flags
        self.bind(done)
        self.reenter()
        self.leave()

    def reenter(self) -> None:
        """The code from here on is reached from before a :meth:`leave` (a branch): what was saved is saved."""
        self.stack, self.pushed = self.entered_stack, list(self.entered_pushed)

    def leave(self) -> None:
        """Put back what :meth:`enter` saved, and the stack pointer."""
        for name in reversed(self.pushed):
            if name == "eflags":
                self.add(Instruction.create(Code.POPFQ), stack=-8)
            else:
                self.add(Instruction.create_reg(Code.POP_R64, getattr(Register, name.upper())), stack=-8)
        self.add(_lea_rsp(RED_ZONE), stack=-RED_ZONE)

    def count(self, counter: int) -> None:
        self.add(_locked_increment(MemoryOperand(Register.RIP, displ=counter)))
        self.counted = True

    def test(self, test: Test, false: int) -> None:
        """Go to ``false`` when ``test`` does not hold for the hit's registers (through %rax and %rcx, saved);
        on through otherwise."""
        if isinstance(test, Logic):
            if test.op == "and":
                self.test(test.left, false)
                self.test(test.right, false)
                return
            right, true = self.label(), self.label()
            if test.op == "or":
                self.test(test.left, right)
                self.branch(Code.JMP_REL32_64, true)
                self.bind(right)
                self.test(test.right, false)
            else:  # not
                self.test(test.left, right)
                self.branch(Code.JMP_REL32_64, false)
                self.bind(right)
            self.bind(true)
            return
        self._original_into(Register.RAX, test.field)
        signed = test.signed
        if test.bits < 64:
            self.add(_widened(test.bits, signed))
        value = test.value & ((1 << 64) - 1)
        immediate = value - (1 << 64) if value >> 63 else value  # an imm32 is sign-extended to 64 bits
        fits = -(1 << 31) <= immediate < 1 << 31
        if not fits:
            self.add(Instruction.create_reg_u64(Code.MOV_R64_IMM64, Register.RCX, value))
        if isinstance(test, Mask):
            self.add(Instruction.create_reg_reg(Code.TEST_RM64_R64, Register.RAX, Register.RCX) if not fits else
                     Instruction.create_reg_i32(Code.TEST_RM64_IMM32, Register.RAX, immediate))
            self.branch(Code.JE_REL32_64, false)
            return
        self.add(Instruction.create_reg_reg(Code.CMP_R64_RM64, Register.RAX, Register.RCX) if not fits else
                 Instruction.create_reg_i32(Code.CMP_RM64_IMM32, Register.RAX, immediate))
        self.branch(_JUMP_IF_NOT[test.op, signed if test.op not in ("==", "!=") else False], false)

    def record(self, ring: RingLayout, site_id: int, captures: tuple[Capture, ...], rdpid: bool,
               full: int | None = None, counter: int | None = None) -> None:
        """Write one record into ``ring`` (or count it lost, and the hit at ``counter``; ``full``: go there
        instead), through %rax, %rcx, %rdx, %rsi and %r11: its first slot, and the slots after it that the bytes
        it reads need. A hit is counted (:attr:`Resume.counted`) once its record is whole."""
        if len(captures) > (1 << ring.slot_shift) - ring.words >> 3:
            raise ValueError(f"{len(captures)} words do not fit a record")
        span = 1 + -(-area(captures) >> ring.slot_shift)
        r11, counted = Register.R11, self.counted
        self.add(Instruction.create(Code.RDTSC if rdpid else Code.RDTSCP))
        self.add(Instruction.create_reg_u32(Code.SHL_RM64_IMM8, Register.RDX, 32))
        self.add(Instruction.create_reg_reg(Code.OR_R64_RM64, Register.RDX, Register.RAX))
        if rdpid:
            self.add(Instruction.create_reg(Code.RDPID_R64, Register.RSI))
        else:
            self.add(Instruction.create_reg_reg(Code.MOV_R32_RM32, Register.ESI, Register.ECX))
        self.add(Instruction.create_reg_u64(Code.MOV_R64_IMM64, r11, ring.address))
        self.add(_load(Register.RAX, r11, ring.head))
        retry, lost_label, done = self.label(), self.label(), self.label()
        self.bind(retry)
        self.add(Instruction.create_reg_reg(Code.MOV_R64_RM64, Register.RCX, Register.RAX))
        self.add(Instruction.create_reg_mem(Code.SUB_R64_RM64, Register.RCX, MemoryOperand(r11, displ=ring.tail)))
        self.add(Instruction.create_reg_i32(Code.CMP_RM64_IMM32, Register.RCX, ring.count - span + 1))
        # signed: a head loaded before other writers and the reader moved on is below the tail; cmpxchg retries it
        self.branch(Code.JGE_REL32_64, full if full is not None else lost_label)
        self.add(Instruction.create_reg_mem(Code.LEA_R64_M, Register.RCX, MemoryOperand(Register.RAX, displ=span)))
        cmpxchg = Instruction.create_mem_reg(Code.CMPXCHG_RM64_R64, MemoryOperand(r11, displ=ring.head), Register.RCX)
        cmpxchg.has_lock_prefix = True
        self.add(cmpxchg)
        self.reserved, self.reserved_if_zf = "rcx", True
        self.reserved_span, self.reserved_ahead = span, span > 1
        self.branch(Code.JNE_REL32_64, retry)
        self.reserved_if_zf = False
        if span > 1:
            self.add(Instruction.create_reg_mem(Code.LEA_R64_M, Register.RCX, MemoryOperand(Register.RAX, displ=1)))
            self.reserved_ahead = False
        self.add(Instruction.create_reg_u32(Code.AND_RM32_IMM32, Register.EAX, ring.count - 1))
        self.add(Instruction.create_reg_u32(Code.SHL_RM64_IMM8, Register.RAX, ring.slot_shift))
        self.add(Instruction.create_reg_mem(Code.LEA_R64_M, r11, MemoryOperand(r11, Register.RAX, displ=ring.slots)))
        self.add(_store(r11, ring.tsc, Register.RDX))
        self.add(_store(r11, ring.cpu, Register.ESI))
        self.add(Instruction.create_mem_u32(Code.MOV_RM32_IMM32, MemoryOperand(r11, displ=ring.site), site_id))
        self.add(Instruction.create_reg(Code.RDFSBASE_R64, Register.RAX))
        self.add(_store(r11, ring.key, Register.RAX))
        if CaptureFaults() in captures:
            faults = ring.words + 8 * captures.index(CaptureFaults())
            self.add(Instruction.create_mem_i32(Code.MOV_RM64_IMM32, MemoryOperand(r11, displ=faults), 0))
        if span > 1:
            self.add(Instruction.create_i32(Code.PUSHQ_IMM32, 0), stack=8, saves="_cursor")
        for i, capture in enumerate(captures):
            if isinstance(capture, CaptureRead):
                self._read(capture, ring, captures, i)
            elif isinstance(capture, CaptureBytes):
                self._read_bytes(capture, ring, captures, i)
            elif not isinstance(capture, CaptureFaults):
                self.capture(capture, ring.words + 8 * i)
        if span > 1:
            self._give_back(ring, span)
        self.add(_store(r11, ring.seq, Register.RCX))
        # the next slot's line, for the next hit: a ring larger than the caches misses on every slot otherwise
        self.add(Instruction.create_mem(Code.PREFETCHW_M8, MemoryOperand(r11, displ=1 << ring.slot_shift)))
        self.reserved, self.recorded, self.reserved_span, self.shrunk_if_zf = None, True, 1, None
        self.counted = self.counted or counter is not None
        if full is not None:
            return
        self.branch(Code.JMP_REL32_64, done)
        self.recorded, self.counted = False, counted
        self.bind(lost_label)
        if counter is not None:
            self.count(counter)
        self.add(_locked_increment(MemoryOperand(r11, displ=ring.lost)))
        self.recorded = True
        self.bind(done)

    def find_thread(self, shadow: ShadowLayout, missing: int) -> None:
        """%rdx = the record of this thread (its fs base the key) in ``shadow``; to ``missing`` if it has none.
        Through %rax, %rsi and %r11."""
        rax, rdx, rsi, r11 = Register.RAX, Register.RDX, Register.RSI, Register.R11
        self.add(Instruction.create_reg(Code.RDFSBASE_R64, rax))
        self.add(Instruction.create_reg_reg(Code.MOV_R64_RM64, rdx, rax))
        self.add(Instruction.create_reg_i32(Code.AND_RM64_IMM32, rdx, shadow.threads - 1 << shadow.record_shift))
        self.add(Instruction.create_reg_u64(Code.MOV_R64_IMM64, r11, shadow.address))
        self.add(Instruction.create_reg_reg(Code.ADD_R64_RM64, rdx, r11))
        self.add(Instruction.create_reg_mem(Code.LEA_R64_M, rsi, MemoryOperand(rdx, displ=shadow.probes << shadow.record_shift)))
        look, found = self.label(), self.label()
        self.bind(look)
        self.add(Instruction.create_mem_reg(Code.CMP_RM64_R64, MemoryOperand(rdx, displ=shadow.key), rax))
        self.branch(Code.JE_REL32_64, found)
        self.add(Instruction.create_reg_i32(Code.ADD_RM64_IMM32, rdx, 1 << shadow.record_shift))
        self.add(Instruction.create_reg_reg(Code.CMP_R64_RM64, rdx, rsi))
        self.branch(Code.JB_REL32_64, look)
        self.branch(Code.JMP_REL32_64, missing)
        self.bind(found)

    def hijack(self, shadow: ShadowLayout, returns_to: int, slow: int) -> None:
        """At a function's entry: push (return-address slot, its address, ``returns_to``) onto the thread's
        shadow stack, and put ``returns_to`` in the slot. The common cases only; the others go to ``slow``: no
        record, a full stack, or a top entry whose frame is not above this one (a ``longjmp`` left it, or
        another stack's) unless it is this very slot, already sent to its trampoline (a tail call)."""
        rax, rcx, rdx, rsi, r11 = Register.RAX, Register.RCX, Register.RDX, Register.RSI, Register.R11
        self.find_thread(shadow, slow)
        self.add(_load(rcx, rdx, shadow.depth))
        self.add(Instruction.create_reg_i32(Code.CMP_RM64_IMM32, rcx, shadow.limit))
        self.branch(Code.JAE_REL32_64, slow)
        self.add(Instruction.create_reg_mem(Code.LEA_R64_M, rsi, MemoryOperand(Register.RSP, displ=self.stack)))
        push = self.label()
        self.add(Instruction.create_reg_reg(Code.TEST_RM64_R64, rcx, rcx))
        self.branch(Code.JE_REL32_64, push)
        self.add(Instruction.create_reg_reg(Code.MOV_R64_RM64, rax, rcx))
        self.add(Instruction.create_reg_u32(Code.SHL_RM64_IMM8, rax, shadow.entry_shift))
        top = shadow.entries - (1 << shadow.entry_shift)
        self.add(Instruction.create_reg_mem(Code.MOV_R64_RM64, r11, MemoryOperand(rdx, rax, displ=top + shadow.slot)))
        self.add(Instruction.create_reg_reg(Code.CMP_R64_RM64, r11, rsi))
        self.branch(Code.JA_REL32_64, push)
        self.branch(Code.JB_REL32_64, slow)
        self.add(Instruction.create_reg_mem(Code.MOV_R64_RM64, r11,
                                            MemoryOperand(rdx, rax, displ=top + shadow.trampoline)))
        self.add(Instruction.create_reg_mem(Code.CMP_R64_RM64, r11, MemoryOperand(rsi)))
        self.branch(Code.JNE_REL32_64, slow)
        self.bind(push)
        self.add(Instruction.create_reg_reg(Code.MOV_R64_RM64, rax, rcx))
        self.add(Instruction.create_reg_u32(Code.SHL_RM64_IMM8, rax, shadow.entry_shift))
        self.add(Instruction.create_reg_mem(Code.LEA_R64_M, rax, MemoryOperand(rdx, rax, displ=shadow.entries)))
        self.add(_store(rax, shadow.slot, rsi))
        self.add(_load(r11, rsi, 0))
        self.add(_store(rax, shadow.original, r11))
        self.add(Instruction.create_reg_u64(Code.MOV_R64_IMM64, r11, returns_to))
        self.add(_store(rax, shadow.trampoline, r11))
        self.add(Instruction.create_reg(Code.INC_RM64, rcx))
        self.add(_store(rdx, shadow.depth, rcx))
        self.shadowed = True
        self.add(_store(rsi, 0, r11))

    def capture(self, capture: Capture, at: int) -> None:
        """Write the word ``capture`` at ``at`` in the slot (%r11), through %rax (saved, free by now)."""
        rax = Register.RAX
        if isinstance(capture, CaptureRegister):
            register = self._original(capture.field)
            if register is not None:
                self.add(_store(Register.R11, at, register))
                return
            self._original_into(rax, capture.field)
        else:
            self._load(capture)
        self.add(_store(Register.R11, at, rax))

    def _read(self, capture: CaptureRead, ring: RingLayout, captures: tuple[Capture, ...], i: int) -> None:
        """Word ``i`` of the slot (%r11): ``capture``'s bytes, read by ``process_vm_readv``; a short read sets bit
        ``i`` of the faults word."""
        rax, r11 = Register.RAX, Register.R11
        at = ring.words + 8 * i
        self._address_into(rax, capture, ring, captures)
        self.add(Instruction.create_mem_i32(Code.MOV_RM64_IMM32, MemoryOperand(r11, displ=at), 0))
        self._keep()
        self.add(Instruction.create_reg_mem(Code.LEA_R64_M, Register.RSI, MemoryOperand(r11, displ=at)))
        self._readv(ring, Register.RSI, rax, capture.size)
        self._unkeep()
        done = self.label()
        self.add(Instruction.create_reg_i32(Code.CMP_RM64_IMM32, rax, capture.size))
        self.branch(Code.JE_REL32_64, done)
        self.add(Instruction.create_reg_u64(Code.MOV_R64_IMM64, rax, 1 << i))
        faults = ring.words + 8 * captures.index(CaptureFaults())
        self.add(Instruction.create_mem_reg(Code.OR_RM64_R64, MemoryOperand(r11, displ=faults), rax))
        self.bind(done)

    def _read_bytes(self, capture: CaptureBytes, ring: RingLayout, captures: tuple[Capture, ...], i: int) -> None:
        """Word ``i`` of the slot (%r11): how many of ``capture``'s bytes were read (a string's up to its NUL, with
        it) to the record's cursor (on the stack: bytes past the first slot so far), which moves past them (a
        negative errno: none read)::

            read = 0
            next: length = min(page end - (address + read), size - read, 256 + read)
                  process_vm_readv(pid, {area + read, length}, 1, {address + read, length}, 1, 0)
                  failed (<= 0): read = read or the error; done
                  read += what it gave; done if a NUL is in it (read = up to it), or read = size; else next

        (an array: one read of all its ``size`` bytes, its result the word)."""
        rax, rdx, rsi, rdi, rcx, rsp = Register.RAX, Register.RDX, Register.RSI, Register.RDI, Register.RCX, Register.RSP
        self._address_into(rax, capture, ring, captures)
        self._keep()
        self.add(Instruction.create_reg(Code.PUSH_R64, rax), stack=8, saves="_address")
        self.add(Instruction.create_reg_mem(Code.LEA_R64_M, rsi, MemoryOperand(Register.R11,
                                                                             displ=1 << ring.slot_shift)))
        self.add(Instruction.create_reg_mem(Code.ADD_R64_RM64, rsi, self._scratch("_cursor")))
        self.add(Instruction.create_reg(Code.PUSH_R64, rsi), stack=8, saves="_area")
        self.add(Instruction.create_i32(Code.PUSHQ_IMM32, 0), stack=8, saves="_read")
        read, area_at, address_at = MemoryOperand(rsp), MemoryOperand(rsp, displ=8), MemoryOperand(rsp, displ=16)
        if not capture.string:
            self._readv(ring, rsi, rax, capture.size)
            self.add(Instruction.create_mem_reg(Code.MOV_RM64_R64, read, rax))
        else:
            again, found, failed, done = self.label(), self.label(), self.label(), self.label()
            self.bind(again)
            self.add(Instruction.create_reg_mem(Code.MOV_R64_RM64, rax, address_at))
            self.add(Instruction.create_reg_mem(Code.ADD_R64_RM64, rax, read))
            self.add(Instruction.create_reg_reg(Code.MOV_R32_RM32, Register.EDX, Register.EAX))
            self.add(Instruction.create_reg_u32(Code.AND_RM32_IMM32, Register.EDX, _PAGE - 1))
            self.add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, Register.ESI, _PAGE))
            self.add(Instruction.create_reg_reg(Code.SUB_R64_RM64, rsi, rdx))
            self.add(Instruction.create_reg_mem(Code.MOV_R64_RM64, rdx, read))
            self.add(Instruction.create_reg_mem(Code.LEA_R64_M, rdx, MemoryOperand(rdx, displ=_FIRST_READ)))
            self._at_most(rsi, rdx)
            self.add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, Register.EDX, capture.size))
            self.add(Instruction.create_reg_mem(Code.SUB_R64_RM64, rdx, read))
            self._at_most(rsi, rdx)
            self.add(Instruction.create_reg_reg(Code.MOV_R64_RM64, rdx, rsi))
            self.add(Instruction.create_reg_mem(Code.MOV_R64_RM64, rsi, area_at))
            self.add(Instruction.create_reg_mem(Code.ADD_R64_RM64, rsi, read))
            self._readv(ring, rsi, rax)
            self.add(Instruction.create_reg_reg(Code.TEST_RM64_R64, rax, rax))
            self.branch(Code.JLE_REL32_64, failed)
            self.add(Instruction.create_reg_mem(Code.MOV_R64_RM64, rdi, area_at))
            self.add(Instruction.create_reg_mem(Code.ADD_R64_RM64, rdi, read))
            self.add(Instruction.create_reg_reg(Code.MOV_R64_RM64, rcx, rax))
            self.add(Instruction.create_mem_reg(Code.ADD_RM64_R64, read, rax))
            scan = self.label()
            self.bind(scan)
            self.add(Instruction.create_mem_u32(Code.CMP_RM8_IMM8, MemoryOperand(rdi), 0))
            self.branch(Code.JE_REL32_64, found)
            self.add(Instruction.create_reg(Code.INC_RM64, rdi))
            self.add(Instruction.create_reg(Code.DEC_RM64, rcx))
            self.branch(Code.JNE_REL32_64, scan)
            self.add(Instruction.create_mem_i32(Code.CMP_RM64_IMM32, read, capture.size))
            self.branch(Code.JB_REL32_64, again)
            self.branch(Code.JMP_REL32_64, done)
            self.bind(found)  # what was read past the NUL is not kept
            self.add(Instruction.create_reg_mem(Code.LEA_R64_M, rax, MemoryOperand(rdi, displ=1)))
            self.add(Instruction.create_reg_mem(Code.SUB_R64_RM64, rax, area_at))
            self.add(Instruction.create_mem_reg(Code.MOV_RM64_R64, read, rax))
            self.branch(Code.JMP_REL32_64, done)
            self.bind(failed)
            self.add(Instruction.create_mem_i32(Code.CMP_RM64_IMM32, read, 0))
            self.branch(Code.JNE_REL32_64, done)
            self.add(Instruction.create_mem_reg(Code.MOV_RM64_R64, read, rax))
            self.bind(done)
        self.add(Instruction.create_reg_mem(Code.MOV_R64_RM64, rax, read))
        for _ in range(3):
            self.add(_lea_rsp(8), stack=-8)
        self._unkeep()
        self.add(_store(Register.R11, ring.words + 8 * i, rax))
        nothing = self.label()
        self.add(Instruction.create_reg_reg(Code.TEST_RM64_R64, rax, rax))
        self.branch(Code.JLE_REL32_64, nothing)
        self.add(Instruction.create_mem_reg(Code.ADD_RM64_R64, self._scratch("_cursor"), rax))
        self.bind(nothing)

    def _give_back(self, ring: RingLayout, span: int) -> None:
        """The record's bytes are read (their end the cursor, taken off the stack): the slots it does not need
        go back if no record was reserved after it (the ring's head moved back), and its first slot says how many
        it takes (%dx into the CPU's high 16 bits)::

            s = 1 + ceil(cursor / slot size); if s < span: lock cmpxchg ticket + s into head (if ticket + span)
            [r11 + cpu + 2] = s if that took, else span"""
        rax, rdx, rsi, rcx, r11 = Register.RAX, Register.RDX, Register.RSI, Register.RCX, Register.R11
        keep, given = self.label(), self.label()
        self.add(Instruction.create_reg_mem(Code.MOV_R64_RM64, rdx, self._scratch("_cursor")))
        self.add(_lea_rsp(8), stack=-8)
        self.add(Instruction.create_reg_mem(Code.LEA_R64_M, rdx, MemoryOperand(rdx, displ=(1 << ring.slot_shift) - 1)))
        self.add(Instruction.create_reg_u32(Code.SHR_RM64_IMM8, rdx, ring.slot_shift))
        self.add(Instruction.create_reg(Code.INC_RM64, rdx))
        self.add(Instruction.create_reg_i32(Code.CMP_RM64_IMM32, rdx, span))
        self.branch(Code.JAE_REL32_64, keep)
        self.add(Instruction.create_reg_mem(Code.LEA_R64_M, rax, MemoryOperand(rcx, displ=span - 1)))
        self.add(Instruction.create_reg_mem(Code.LEA_R64_M, rsi, MemoryOperand(rcx, rdx, displ=-1)))
        self.add(Instruction.create_reg(Code.PUSH_R64, r11), stack=8, saves="_slot")
        self.add(Instruction.create_reg_u64(Code.MOV_R64_IMM64, r11, ring.address))
        cmpxchg = Instruction.create_mem_reg(Code.CMPXCHG_RM64_R64, MemoryOperand(r11, displ=ring.head), rsi)
        cmpxchg.has_lock_prefix = True
        self.add(cmpxchg)
        self.shrunk_if_zf = "rdx"
        self.add(Instruction.create_reg(Code.POP_R64, r11), stack=-8)
        self.branch(Code.JE_REL32_64, given)
        self.shrunk_if_zf = None
        self.bind(keep)
        self.add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, Register.EDX, span))
        self.reserved_span = "rdx"
        self.bind(given)
        self.add(Instruction.create_mem_reg(Code.MOV_RM16_R16, MemoryOperand(r11, displ=ring.cpu + 2), Register.DX))

    def _scratch(self, name: str) -> MemoryOperand:
        """Where the trampoline's own value ``name`` is on the stack."""
        return MemoryOperand(Register.RSP, displ=self._offset(name))

    def _offset(self, name: str) -> int:
        """How far above the stack pointer what was saved as ``name`` is."""
        return 8 * (len(self.pushed) - 1 - self.pushed.index(name))

    def _at_most(self, register: Register, limit: Register) -> None:
        self.add(Instruction.create_reg_reg(Code.CMP_R64_RM64, register, limit))
        self.add(Instruction.create_reg_reg(Code.CMOVA_R64_RM64, register, limit))

    def _address_into(self, register: Register, capture: CaptureRead | CaptureBytes, ring: RingLayout,
                      captures: tuple[Capture, ...]) -> None:
        """Where ``capture`` reads, into ``register``."""
        if not -(1 << 31) <= capture.disp < 1 << 31 and (capture.base is not None or capture.inner is not None):
            raise ValueError(f"a displacement of {capture.disp:#x} does not fit an instruction")
        if capture.inner is not None:
            self.add(_load(register, Register.R11, ring.words + 8 * captures.index(capture.inner)))
        elif capture.base is not None:
            self._original_into(register, capture.base)
        else:
            self.add(Instruction.create_reg_u64(Code.MOV_R64_IMM64, register, capture.disp & (1 << 64) - 1))
            return
        self.add(Instruction.create_reg_mem(Code.LEA_R64_M, register, MemoryOperand(register, displ=capture.disp)))

    def _keep(self) -> None:
        """Save what a system call clobbers or takes its arguments in (one saved already holds the trampoline's
        own value: kept apart, not restored)."""
        for register in _KEPT:
            name = _FIELDS[register]
            self.add(Instruction.create_reg(Code.PUSH_R64, register), stack=8,
                     saves=name if name not in self.pushed else "_" + name)

    def _unkeep(self) -> None:
        for register in reversed(_KEPT):
            self.add(Instruction.create_reg(Code.POP_R64, register), stack=-8)

    def _readv(self, ring: RingLayout, local: Register, remote: Register, size: int | None = None) -> None:
        """%rax = ``process_vm_readv(pid, {local, length}, 1, {remote, length}, 1, 0)``, the length ``size`` or
        (None) %rdx (between :meth:`_keep` and :meth:`_unkeep`)."""
        def push_length() -> Instruction:
            return (Instruction.create_i32(Code.PUSHQ_IMM32, size) if size is not None else
                    Instruction.create_reg(Code.PUSH_R64, Register.RDX))
        for push in (push_length(), Instruction.create_reg(Code.PUSH_R64, remote), push_length(),
                     Instruction.create_reg(Code.PUSH_R64, local)):
            self.add(push, stack=8, saves="_iovec")
        self.add(Instruction.create_reg_u64(Code.MOV_R64_IMM64, Register.RDI, ring.address + ring.pid))
        self.add(_load(Register.RDI, Register.RDI, 0))
        self.add(Instruction.create_reg_reg(Code.MOV_R64_RM64, Register.RSI, Register.RSP))
        self.add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, Register.EDX, 1))
        self.add(Instruction.create_reg_mem(Code.LEA_R64_M, Register.R10, MemoryOperand(Register.RSP, displ=16)))
        self.add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, Register.R8D, 1))
        self.add(Instruction.create_reg_reg(Code.XOR_R32_RM32, Register.R9D, Register.R9D))
        self.add(Instruction.create_reg_u32(Code.MOV_R32_IMM32, Register.EAX, NR_PROCESS_VM_READV))
        self.add(Instruction.create(Code.SYSCALL))
        for _ in range(4):
            self.add(_lea_rsp(8), stack=-8)

    def _load(self, capture: CaptureLoad) -> None:
        """``capture``'s bytes into %rax, its base in %rax and its index in %rdx first (both free by now)."""
        rax, rdx = Register.RAX, Register.RDX
        disp, base, index = capture.disp, Register.NONE, Register.NONE
        if capture.base is None and capture.index is None:
            self.add(Instruction.create_reg_u64(Code.MOV_R64_IMM64, rax, disp & (1 << 64) - 1))
            disp, base = 0, rax
        if capture.base is not None:
            self._original_into(rax, capture.base)
            base = rax
        if capture.index is not None:
            self._original_into(rdx, capture.index)
            index = rdx
        if not -(1 << 31) <= disp < 1 << 31:
            raise ValueError(f"a displacement of {disp:#x} does not fit an instruction")
        register = rax if capture.size == 8 else Register.EAX
        operand = MemoryOperand(base, index, capture.scale, displ=disp)
        self.add(Instruction.create_reg_mem(_LOADS[capture.size], register, operand), loads=True)

    def _original(self, field: str) -> Register | None:
        """The register holding ``field``'s value of the hit, if it still does."""
        if field in self.pushed or field == "rsp":
            return None  # saved: it may hold something else by now
        return getattr(Register, field.upper())

    def _original_into(self, register: Register, field: str) -> None:
        if field == "rsp":
            self.add(Instruction.create_reg_mem(Code.LEA_R64_M, register, MemoryOperand(Register.RSP,
                                                                                          displ=self.stack)))
        elif field in self.pushed:
            at = self._offset(field)
            self.add(_load(register, Register.RSP, at))
        else:
            self.add(Instruction.create_reg_reg(Code.MOV_R64_RM64, register, getattr(Register, field.upper())))

    def assemble(self, address: int, after: list[tuple[Instruction, Resume]]) -> Trampoline:
        """The generated part as one block (its branches bound to their labels), then ``after``."""
        for branch, label in self._branches:
            branch.near_branch64 = self._labels[label]
        block = BlockEncoder(64)
        block.add_many([ins for ins, _ in self.pieces])
        code = block.encode(address)
        starts = [ins.ip for ins in Decoder(64, code, DecoderOptions.NONE, ip=address)]
        if len(starts) != len(self.pieces):
            raise ValueError("the block encoder changed the number of generated instructions")
        tail = _assemble(after, address + len(code))
        return Trampoline(address, code + tail.code,
                          {**dict(zip(starts, (resume for _, resume in self.pieces))), **tail.resumes},
                          address + len(code), {starts[index]: kind for index, kind in self.traps.items()})


def _widened(bits: int, signed: bool) -> Instruction:
    """%rax from its low ``bits``, sign- or zero-extended."""
    if bits == 32:
        return (Instruction.create_reg_reg(Code.MOVSXD_R64_RM32, Register.RAX, Register.EAX) if signed else
                Instruction.create_reg_reg(Code.MOV_R32_RM32, Register.EAX, Register.EAX))
    small = {8: Register.AL, 16: Register.AX}[bits]
    code = {(8, True): Code.MOVSX_R64_RM8, (8, False): Code.MOVZX_R64_RM8, (16, True): Code.MOVSX_R64_RM16,
            (16, False): Code.MOVZX_R64_RM16}[bits, signed]
    return Instruction.create_reg_reg(code, Register.RAX, small)


def _load(register: Register, base: Register, displ: int) -> Instruction:
    return Instruction.create_reg_mem(Code.MOV_R64_RM64, register, MemoryOperand(base, displ=displ))


def _store(base: Register, displ: int, register: Register) -> Instruction:
    code = Code.MOV_RM64_R64 if register not in (Register.ESI, Register.EAX) else Code.MOV_RM32_R32
    return Instruction.create_mem_reg(code, MemoryOperand(base, displ=displ), register)


def tsc_reader() -> list[Instruction]:
    """A function returning the time stamp counter: ``rdtsc; shl $32,%rdx; or %rdx,%rax; ret``."""
    return [Instruction.create(Code.RDTSC), Instruction.create_reg_u32(Code.SHL_RM64_IMM8, Register.RDX, 32),
            Instruction.create_reg_reg(Code.OR_R64_RM64, Register.RAX, Register.RDX), Instruction.create(Code.RETNQ)]


def _relocated(site: JumpSite, recorded: bool = False, shadowed: bool = False) -> list[tuple[Instruction, Resume]]:
    """``site``'s displaced instructions, each resuming at itself: the hit ``recorded`` by then, and the return
    ``shadowed`` (sent to its trampoline) where a thread moved out goes back to the site to run the entry again;
    past the first instruction the function is entered, and its return stays with the trampoline."""
    pieces = []
    for ins in site.displaced:
        if ins.flow_control == FlowControl.CALL:
            pieces += _call_as_push_and_jump(ins)
        else:
            pieces.append((ins, Resume(ins.ip, counted=True)))
    if site.displaced[-1].flow_control in _FALLS_THROUGH:
        back = site.address + site.length
        pieces.append((Instruction.create_branch(Code.JMP_REL32_64, back), Resume(back, counted=True)))
    if not (recorded or shadowed):
        return pieces
    return [(ins, replace(resume, recorded=recorded, shadowed=shadowed and resume.rip == site.address))
            for ins, resume in pieces]


def _call_as_push_and_jump(call: Instruction) -> list[tuple[Instruction, Resume]]:
    """``call target`` as: make room, write the original return address in two halves (no register, no flags
    touched), jump. Until the jump, the thread resumes at the call itself; at the jump, at the target."""
    returns_to = call.next_ip
    return [(_lea_rsp(-8), Resume(call.ip, counted=True)),
            (Instruction.create_mem_u32(Code.MOV_RM32_IMM32, MemoryOperand(Register.RSP), returns_to & _MASK32),
             Resume(call.ip, 8, counted=True)),
            (Instruction.create_mem_u32(Code.MOV_RM32_IMM32, MemoryOperand(Register.RSP, displ=4), returns_to >> 32),
             Resume(call.ip, 8, counted=True)),
            (Instruction.create_branch(Code.JMP_REL32_64, call.near_branch_target),
             Resume(call.near_branch_target, counted=True))]


def _locked_increment(operand: MemoryOperand) -> Instruction:
    """``lock incq`` of the word at ``operand``."""
    increment = Instruction.create_mem(Code.INC_RM64, operand)
    increment.has_lock_prefix = True
    return increment


def _lea_rsp(delta: int) -> Instruction:
    return Instruction.create_reg_mem(Code.LEA_R64_M, Register.RSP, MemoryOperand(Register.RSP, displ=delta))


def _assemble(pieces: list[tuple[Instruction, Resume]], address: int) -> Trampoline:
    encoded = encode([ins for ins, _ in pieces], address)
    resumes, at = {}, address
    for code, (_, resume) in zip(encoded, pieces):
        resumes[at] = resume
        at += len(code)
    return Trampoline(address, b"".join(encoded), resumes)
