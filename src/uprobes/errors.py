"""Errors a user can act on.

Every error that can reach a user derives from :class:`UprobesError`; its ``str()`` is one line that names
the problem and, where there is one, what to do about it. The CLI prints it and exits 2; anything else is
a bug in uprobes.
"""

__all__ = ["UprobesError", "ElfError", "ProbeSyntaxError", "ResolveError", "ProcessError", "KernelEngineError",
           "UnprobeableInstruction"]


class UprobesError(Exception):
    """An error caused by input or environment, reported to the user as one line."""

    def __str__(self) -> str:
        # Messages quote what the user gave, which may hold newlines or other control characters.
        return "".join(c if c.isprintable() else repr(c)[1:-1] for c in super().__str__())


class ElfError(UprobesError):
    """A file cannot be used as an ELF object: missing, not ELF, wrong class/machine, malformed."""


class ProbeSyntaxError(UprobesError):
    """A probe or fetch-argument text does not parse; the message names the bad token."""


class ResolveError(UprobesError):
    """A well-formed probe names something that is not there: a symbol, a marker, an offset."""


class NotInObject(ResolveError):
    """The object does not have what the probe names (its symbol, marker or source; or it is no ELF object to
    name them in): another object may."""


class ProcessError(UprobesError):
    """A process cannot be inspected: gone, or not ours to read."""


class KernelEngineError(UprobesError):
    """The kernel's uprobes cannot be used or refused a probe: not root, no tracefs, a rejected definition."""


class UnprobeableInstruction(UprobesError):
    """The instruction at a probe address can be neither emulated nor stepped out of line; the message says why."""
