"""Where the engine's own breakpoints go: the dynamic linker's rendezvous and the C++ unwinder's hooks.

- The dynamic linker calls ``_dl_debug_state`` (``r_debug.r_brk``) after it maps or unmaps objects and before
  their constructors run: a breakpoint there places the probes of every object a program links or dlopens
  (section 5 of the ptrace note).
- The C++ unwinder cannot walk through a return address replaced by the trampoline (the kernel's uretprobes
  make such a throw end in std::terminate). So when a thread starts unwinding, its pending return addresses
  are put back; where the exception is caught (``__cxa_begin_catch``), the frames it unwound are dropped.
"""

from __future__ import annotations

import os

from ...elf.objfile import ElfObject
from ...errors import UprobesError
from ...proc.maps import Mapping, path_in_process
from ...proc.status import AT_BASE, auxv
from .placement import Role

__all__ = ["role_sites"]

# role -> (which object: "interpreter" or a library's file-name prefix, the functions)
_ROLES: dict[Role, tuple[str, tuple[str, ...]]] = {
    Role.RENDEZVOUS: ("interpreter", ("_dl_debug_state",)),
    Role.UNWIND: ("libgcc_s.so", ("_Unwind_RaiseException", "_Unwind_ForcedUnwind", "_Unwind_Resume_or_Rethrow")),
    Role.CATCH: ("libstdc++.so", ("__cxa_begin_catch",)),
}


def role_sites(pid: int, mappings: list[Mapping], returns: bool) -> list[tuple[int, Role, int, str]]:
    """(address, role, inode, function) of each hook the process maps now; the unwinder's only with ``returns``
    (return probes are asked for). A static program has no interpreter: nothing is loaded later."""
    base = auxv(pid, AT_BASE)
    sites = []
    for role, (where, functions) in _ROLES.items():
        if role is not Role.RENDEZVOUS and not returns:
            continue
        for mapping in mappings:
            if not mapping.executable or not mapping.file_backed:
                continue
            if where == "interpreter":
                if not base or mapping.start - mapping.offset != base:
                    continue
            elif not os.path.basename(mapping.path).startswith(where):
                continue
            sites += [(address, role, mapping.inode, name) for address, name in _addresses(pid, mapping, functions)]
    return sites


def _addresses(pid: int, mapping: Mapping, functions: tuple[str, ...]) -> list[tuple[int, str]]:
    """Where each of ``functions`` that the mapping (of process ``pid``) holds is, and its name."""
    try:
        obj = ElfObject.open(path_in_process(pid, mapping.path))
        found = [(obj.symbols.lookup(name), name) for name in functions]
        offsets = [(obj.vaddr_to_offset(symbols[0].value), name) for symbols, name in found if symbols]
    except UprobesError:
        return []
    return [(mapping.start - mapping.offset + offset, name) for offset, name in offsets
            if mapping.offset <= offset < mapping.offset + mapping.end - mapping.start]
