"""Resident memory: giving back the pages of TensorFlow's libraries that only
its start-up needed (`release_library_pages`), and this process's own peak
(`peak_rss_mb`).

Importing TensorFlow maps about 350 MB of its shared libraries into the
resident set: the dynamic linker reads the whole symbol table and the
relocations of libtensorflow_cc.so (its .dynstr section alone is 83 MB) and
the static initialisers of every kernel run once. Training the default model
touches only 60 to 90 MB of those pages again, but the others stay resident,
and count in the peak (ru_maxrss), for as long as nothing unmaps them.

They are unmodified copies of the files, so `release_library_pages` unmaps
them (madvise MADV_DONTNEED), which is what the kernel itself does to such
pages under memory pressure: a page that is used again is mapped back from
the page cache on its first access. The trainer calls it once TensorFlow is
running and again after the first step (which alone runs the tracing and
graph-optimisation code). Measured with `python -m benchmarks.bench --train`
(default model, 128 x 80 tokens, XLA off, 1 replica): peak RSS 300 MB lower
in float32 and in bfloat16, the same ms/step.
"""

from __future__ import annotations

import ctypes
import os
import resource
import sys

MADV_DONTNEED = 4  # <sys/mman.h> on Linux


def release_library_pages() -> int:
    """Unmaps from this process the resident pages of TensorFlow's shared
    libraries that were never written to (read-only mappings with no
    private copy of any page). Returns the resident KiB it released; 0 where
    /proc/self/smaps or madvise is missing (not Linux) or TensorFlow is not
    imported."""
    tf = sys.modules.get("tensorflow")
    if tf is None or not sys.platform.startswith("linux") or not getattr(tf, "__file__", None):
        return 0
    root = os.path.dirname(os.path.realpath(tf.__file__)) + os.sep
    try:
        with open("/proc/self/smaps") as f:
            smaps = f.read()
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    released = 0
    for start, end, rss in _clean_mappings(smaps, root):
        if madvise(start, end - start, MADV_DONTNEED) == 0:
            released += rss
    return released


def peak_rss_mb() -> float:
    """The peak resident memory of this process, in MB (2**20 bytes).

    On Linux, VmHWM: a child's ru_maxrss also counts the address space it
    was forked (or vforked) from until its exec, so a benchmark child of a
    process that had read and tokenized a corpus (1,056 MB) reported that
    process's peak instead of its own (930 MB). Elsewhere, ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass

    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def _clean_mappings(smaps: str, root: str):
    """(start, end, resident KiB) of each mapping of a file under root that is
    not writable and holds no anonymous (copied-on-write) page."""
    mapping = None
    for line in smaps.splitlines():
        head = line.split(None, 5)
        if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            if mapping:
                yield from _keep(mapping, root)
            start, end = (int(a, 16) for a in head[0].split("-"))
            mapping = dict(start=start, end=end, perms=head[1], path=head[5] if len(head) > 5 else "")
        elif mapping is not None and head and head[0] in ("Rss:", "Anonymous:", "Locked:"):
            mapping[head[0][:-1]] = int(head[1])
    if mapping:
        yield from _keep(mapping, root)


def _keep(m: dict, root: str):
    if (
        m["path"].startswith(root)
        and "w" not in m["perms"]
        and m.get("Anonymous", 1) == 0
        and m.get("Locked", 0) == 0
        and m.get("Rss", 0) > 0
    ):
        yield m["start"], m["end"], m["Rss"]
