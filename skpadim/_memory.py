"""Handing memory that the program has freed back to the operating system.

A detector streams its images in batches: each batch's backbone activations,
tens of megabytes, are allocated and freed again. glibc's allocator keeps part
of that freed memory to serve later batches, and over thousands of batches it
keeps more and more of it (measured with ResNet-18 on 224 x 224 images: at most
155 MiB kept over 200 images, 316 MiB over 5,000, while the memory in use was
the same), so that the process's peak RSS crept up with the number of images.
Asking the allocator now and then to return what it keeps stops the creep for
the cost of faulting those pages in again once (``benchmarks/memory.py``).
"""

import ctypes
import threading

# Batches between two requests: rare enough that the pages handed back and
# faulted in again cost little next to the batches' own work, frequent enough
# that the memory kept has no time to grow.
RELEASE_EVERY_BATCHES = 16

_lock = threading.Lock()
_malloc_trim = None


def release_freed_memory():
    """Return the allocator's free memory to the system where the C library is
    glibc (``malloc_trim``); True if it was asked, False elsewhere (a no-op)."""
    global _malloc_trim
    if _malloc_trim is None:
        with _lock:
            if _malloc_trim is None:
                try:
                    function = ctypes.CDLL(None).malloc_trim
                    function.argtypes, function.restype = [ctypes.c_size_t], ctypes.c_int
                    _malloc_trim = function
                except Exception:  # no such function (not glibc), or no C library to load
                    _malloc_trim = False
    if not _malloc_trim:
        return False
    _malloc_trim(0)
    return True
