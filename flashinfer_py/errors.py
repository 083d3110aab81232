"""The exception types users catch. All are ValueError or OSError subclasses.

- FlashFormatError(ValueError): a flash directory or bundle file is not what it claims to be.
- FlashIOError(OSError): the operating system failed a read or write.
- UnsupportedModelError(ValueError): an architecture, activation or option we do not run.
- ConvertError(ValueError): the converter refused (destination exists, inconsistent checkpoint).
"""
from ._core import FlashFormatError, FlashIOError  # registered by the native module


def io_error(e: OSError, what: str, path, offset=None) -> FlashIOError:
    """A FlashIOError for an OSError that Python code hit, shaped as the native ones: errno,
    the message naming the file and offset, .path and .offset."""
    where = f" at offset {offset}" if offset is not None else ""
    err = FlashIOError(e.errno, f"{what} {path}{where} failed: {e.strerror or e}")
    err.path, err.offset = str(path), offset
    return err


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture or an option in its config is not supported."""


class ConvertError(ValueError):
    """The converter refused to run or found an inconsistent checkpoint."""


__all__ = ["FlashFormatError", "FlashIOError", "UnsupportedModelError", "ConvertError",
           "io_error"]
