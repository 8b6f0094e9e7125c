"""SDT (USDT) markers: the ``.note.stapsdt`` notes of an object and the x86-64 argument grammar."""

from .arguments import SdtArgument, parse_arguments
from .notes import SdtMarker, SdtSite, read_markers

__all__ = ["SdtArgument", "SdtMarker", "SdtSite", "parse_arguments", "read_markers"]
