"""C++ names as people write them (``ns::f(long)``), by the C++ runtime's own demangler: libstdc++'s
``__cxa_demangle``, through ctypes. Where libstdc++ cannot be loaded, names stay as they are."""

from __future__ import annotations

import ctypes
import functools

__all__ = ["demangle"]


def _demangler():
    try:
        runtime, libc = ctypes.CDLL("libstdc++.so.6"), ctypes.CDLL(None)
    except OSError:
        return None, None
    function = runtime.__cxa_demangle
    function.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int)]
    function.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    return function, libc.free


_cxa_demangle, _free = _demangler()


@functools.lru_cache(maxsize=1 << 16)
def demangle(name: str) -> str:
    """``name`` demangled if it is a mangled C++ name (``_Z...``), else as it is."""
    if _cxa_demangle is None or not name.startswith("_Z"):
        return name
    status = ctypes.c_int()
    text = _cxa_demangle(name.encode("utf-8", "surrogateescape"), None, None, ctypes.byref(status))
    if status.value or not text:
        return name
    try:
        return ctypes.string_at(text).decode("utf-8", "replace")
    finally:
        _free(text)
