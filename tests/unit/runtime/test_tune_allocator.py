"""`tune_allocator()` keeps glibc from mapping memory for every TLS read (the 256 KiB a read asks for
is allocated whole and shrunk to what arrived). Checked in a fresh interpreter each time: malloc's
settings are process-wide."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from loom.runtime import tune_allocator

# os.read(fd, n) allocates n bytes and shrinks the result to what was read, as SSLObject.read(n) does.
PROBE = """
import ctypes, os, sys
from loom.runtime import tune_allocator

class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
        "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Mallinfo2
tuned = tune_allocator() if sys.argv[1] == "tuned" else False
r, w = os.pipe()
mapped = 0
for _ in range(50):
    os.write(w, b"x" * 1024)
    before = libc.mallinfo2().hblks
    chunk = os.read(r, 256 * 1024)
    mapped += libc.mallinfo2().hblks - before
    assert len(chunk) == 1024
    del chunk
print(tuned, mapped)
"""

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt thresholds are glibc's")


def probe(mode: str, env: dict[str, str] | None = None) -> tuple[str, int]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=60, env=env, check=True
    )
    tuned, mapped = done.stdout.split()
    return tuned, int(mapped)


@glibc_only
def test_untuned_glibc_maps_every_large_read() -> None:
    # The cost this setting removes: every read leaves a mapping of its own behind its small result.
    assert probe("default") == ("False", 50)


@glibc_only
def test_tuned_reads_come_from_the_heap() -> None:
    assert probe("tuned") == ("True", 0)


@glibc_only
def test_operator_settings_in_the_environment_win() -> None:
    env = {"PATH": "/usr/bin:/bin", "MALLOC_MMAP_THRESHOLD_": "131072"}
    assert probe("tuned", env) == ("False", 50)  # their threshold stands: reads are mapped again


@pytest.mark.parametrize(
    "environ",
    [
        {"MALLOC_MMAP_THRESHOLD_": "131072"},
        {"MALLOC_TRIM_THRESHOLD_": "0"},
        {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"},
        {"GLIBC_TUNABLES": "glibc.malloc.check=0:glibc.malloc.mmap_threshold=65536"},
    ],
)
def test_any_operator_malloc_threshold_leaves_both_alone(environ: dict[str, str]) -> None:
    assert tune_allocator(environ) is False
