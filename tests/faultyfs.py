"""A FUSE file system that mirrors a directory and fails reads on demand: a failing disk, for
real, where device-mapper is not available. Run as a process of its own:

    python tests/faultyfs.py SRC MOUNTPOINT CONTROL.json

CONTROL.json (re-read on every read; absent or {} = no faults) maps a file name to a list of
faults, each {"start": byte, "end": byte, "kind": "eio" | "short"}: a read that overlaps
[start, end) fails with EIO, or returns only its first half (a short read). Mounted with
direct_io, so every read, O_DIRECT or not, reaches this process and nothing is cached.
Every read is appended to CONTROL.json + ".log" as "name offset bytes-asked bytes-given" (or
EIO).
"""
from __future__ import annotations

import errno
import json
import os
import sys

import mfusepy as fuse


class FaultyFS(fuse.Operations):
    use_ns = True  # times in nanoseconds (mfusepy's current API)

    def __init__(self, src: str, control: str):
        self.src, self.control = src, control
        self.log = open(control + ".log", "a", buffering=1)

    def _path(self, path: str) -> str:
        return os.path.join(self.src, path.lstrip("/"))

    def _faults(self, name: str) -> list:
        try:
            with open(self.control) as f:
                return json.load(f).get(name, [])
        except (OSError, ValueError):
            return []

    def getattr(self, path, fh=None):
        st = os.lstat(self._path(path))
        return {k: getattr(st, k) for k in ("st_mode", "st_size", "st_nlink", "st_uid", "st_gid",
                                            "st_atime", "st_mtime", "st_ctime")}

    def readdir(self, path, fh):
        return [".", "..", *os.listdir(self._path(path))]

    def open(self, path, flags):
        return os.open(self._path(path), os.O_RDONLY)

    def read(self, path, size, offset, fh):
        name, asked = path.lstrip("/"), size
        for f in self._faults(name):
            if offset < f["end"] and offset + size > f["start"]:
                if f["kind"] == "eio":
                    self.log.write(f"{name} {offset} {asked} EIO\n")
                    raise fuse.FuseOSError(errno.EIO)
                size = max(1, size // 2)
                break
        data = os.pread(fh, size, offset)
        self.log.write(f"{name} {offset} {asked} {len(data)}\n")
        return data

    def release(self, path, fh):
        os.close(fh)
        return 0


def main(src: str, mountpoint: str, control: str) -> None:
    fuse.FUSE(FaultyFS(src, control), mountpoint, foreground=True, ro=True, direct_io=True)


if __name__ == "__main__":
    main(*sys.argv[1:4])
