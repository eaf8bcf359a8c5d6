import os
import subprocess
import sys

import pytest
import tensorflow as tf

from tfgpt.runtime import memory

ROOT = "/site-packages/tensorflow/"
SMAPS = f"""\
00400000-00500000 r--p 00000000 fe:00 11 {ROOT}libtensorflow_cc.so.2
Size:               1024 kB
Rss:                 800 kB
Anonymous:             0 kB
Locked:                0 kB
VmFlags: rd mr mw me
00500000-00600000 r-xp 00100000 fe:00 11 {ROOT}libtensorflow_cc.so.2
Rss:                 300 kB
Anonymous:             0 kB
Locked:                0 kB
00600000-00700000 r--p 00200000 fe:00 11 {ROOT}libtensorflow_cc.so.2
Rss:                 100 kB
Anonymous:            40 kB
Locked:                0 kB
00700000-00800000 rw-p 00300000 fe:00 11 {ROOT}libtensorflow_cc.so.2
Rss:                  50 kB
Anonymous:             0 kB
00800000-00900000 r-xp 00000000 fe:00 12 /usr/lib/libc.so.6
Rss:                 500 kB
Anonymous:             0 kB
00900000-00a00000 r--p 00000000 fe:00 13 {ROOT}locked.so
Rss:                  10 kB
Anonymous:             0 kB
Locked:               10 kB
00a00000-00b00000 rw-p 00000000 00:00 0
Rss:                 900 kB
Anonymous:           900 kB
"""


def test_only_clean_read_only_library_mappings_are_released():
    # Not the relocated (copied-on-write) segment, not writable data, not other
    # libraries, not locked pages, not anonymous memory.
    got = list(memory._clean_mappings(SMAPS, ROOT))
    assert got == [(0x400000, 0x500000, 800), (0x500000, 0x600000, 300)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc/self/smaps")
def test_release_library_pages_keeps_tensorflow_working():
    x = tf.random.stateless_normal([64, 64], seed=[1, 2])
    before = tf.linalg.matmul(x, x).numpy()
    assert memory.release_library_pages() > 0
    root = os.path.dirname(os.path.realpath(tf.__file__)) + os.sep
    with open("/proc/self/smaps") as f:
        left = sum(rss for _, _, rss in memory._clean_mappings(f.read(), root))
    assert left < 16 << 10  # KiB: only what other threads touched meanwhile
    after = tf.linalg.matmul(x, x).numpy()  # the pages come back as needed
    assert (before == after).all()


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux carries ru_maxrss over exec")
def test_peak_rss_of_a_child_is_its_own():
    # This process holds TensorFlow (hundreds of MB); a child started from it
    # inherits that peak in its ru_maxrss, but not in peak_rss_mb.
    code = (
        "import resource; from tfgpt.runtime.memory import peak_rss_mb; "
        "print(peak_rss_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    own, inherited = (float(v) for v in out.stdout.split())
    assert own < 100 < inherited
