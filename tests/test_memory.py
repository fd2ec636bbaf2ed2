"""Handing freed memory back to the system between batches of images."""

import ctypes
import os

import numpy as np
import pytest

import skpadim._images
from skpadim import _memory
from skpadim._images import iter_image_batches

MIB = 2**20


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not _memory._malloc_trim() or not os.path.exists("/proc/self/statm"),
                    reason="needs glibc's malloc_trim and /proc (another C library or system)")
@pytest.mark.skipif("LD_PRELOAD" in os.environ or any(k.startswith("MALLOC_") for k in os.environ),
                    reason="needs glibc's allocator with its default settings (another one is "
                           "preloaded, or its settings are changed)")
def test_release_freed_memory_returns_the_pages_the_allocator_kept():
    libc = ctypes.CDLL(None)
    libc.malloc.argtypes, libc.malloc.restype = [ctypes.c_size_t], ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    # 400 MiB in blocks below glibc's mmap threshold (so they come from its
    # heap); every other one is freed, which leaves 200 MiB of holes between
    # blocks in use, that free() itself does not give back.
    size, count = 64 * 1024, 6400
    blocks = [libc.malloc(size) for _ in range(count)]
    try:
        assert all(blocks)
        for block in blocks:
            ctypes.memset(block, 1, size)
        written = _rss_bytes()
        for block in blocks[::2]:
            libc.free(block)
        freed = _rss_bytes()
        assert written - freed < 50 * MIB  # the allocator kept the freed pages...
        assert _memory.release_freed_memory()
        assert freed - _rss_bytes() > 150 * MIB  # ... and gave them back here
    finally:
        for block in blocks[1::2]:
            libc.free(block)


def test_release_freed_memory_can_be_called_when_nothing_is_free():
    _memory.release_freed_memory()
    assert isinstance(_memory.release_freed_memory(), bool)


def test_release_freed_memory_does_nothing_without_malloc_trim(monkeypatch):
    # A C library without malloc_trim (musl, macOS) or none to load (Windows).
    def no_c_library(name):
        raise OSError("no C library")

    monkeypatch.setattr(_memory, "_MALLOC_TRIM", None)
    monkeypatch.setattr(_memory.ctypes, "CDLL", no_c_library)
    assert _memory._malloc_trim() is False
    assert _memory.release_freed_memory() is False


@pytest.mark.parametrize("as_list", [False, True])
def test_image_batches_release_memory_between_batches(monkeypatch, as_list):
    calls = []
    monkeypatch.setattr(skpadim._images, "release_freed_memory", lambda: calls.append(1))
    X = np.zeros((10, 8, 8, 3), dtype=np.uint8)
    X = list(X) if as_list else X
    seen = []
    for batch in iter_image_batches(X, 3):
        seen.append(len(batch))
        # Before the first batch nothing is freed yet; before each later one,
        # once.
        assert len(calls) == len(seen) - 1
    assert seen == [3, 3, 3, 1]
