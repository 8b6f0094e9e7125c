"""Finding the separate debug file of a stripped object, as GDB does: by build-id, then by debuglink."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .objfile import ElfObject

__all__ = ["DEBUG_ROOTS", "find_debug_file"]

DEBUG_ROOTS = ("/usr/lib/debug",)


def find_debug_file(obj: ElfObject, roots: tuple[str, ...] = DEBUG_ROOTS) -> str | None:
    """Path of the debug file for ``obj``, or None. Candidates are checked against the build-id when both have one."""
    from .objfile import ElfObject
    from ..errors import ElfError

    candidates = []
    if obj.build_id and len(obj.build_id) > 2:
        candidates += [os.path.join(root, ".build-id", obj.build_id[:2], obj.build_id[2:] + ".debug")
                       for root in roots]
    if obj.debuglink:
        directory = os.path.dirname(obj.path)
        candidates += [os.path.join(directory, obj.debuglink), os.path.join(directory, ".debug", obj.debuglink)]
        candidates += [os.path.join(root, directory.lstrip("/"), obj.debuglink) for root in roots]
    for path in candidates:
        if not os.path.isfile(path) or os.path.realpath(path) == obj.path:
            continue
        try:
            debug = ElfObject.open(path)
        except ElfError:
            continue
        if obj.build_id is None or debug.build_id in (None, obj.build_id):
            return debug.path
    return None
