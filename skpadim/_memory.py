"""Handing the memory that the C library's allocator keeps after frees back to the system.

Every batch of images allocates the backbone's activations and frees them.
glibc's allocator keeps much of the freed memory to serve later allocations,
and over hundreds of batches what it keeps fragments and grows: a streaming
pass whose own memory is flat then sees its resident size creep up with the
number of images. ``malloc_trim`` returns the whole free pages it holds to the
system; called between batches, it keeps the resident size to what one batch
needs, for the price of faulting those pages in again (CPU fits on 224 x 224
images took 3% longer with ResNet-18 and 7% longer with Wide-ResNet-50, medians
of three runs). Elsewhere (other C libraries, other systems) nothing is done.
"""

import ctypes

_MALLOC_TRIM = None


def _malloc_trim():
    """glibc's ``malloc_trim``, or False where the C library has none."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            function = ctypes.CDLL(None).malloc_trim
            function.argtypes = [ctypes.c_size_t]
            function.restype = ctypes.c_int
            _MALLOC_TRIM = function
        except (AttributeError, OSError, TypeError):  # no such function, or no C library
            _MALLOC_TRIM = False
    return _MALLOC_TRIM


def release_freed_memory():
    """Return the free pages the C allocator holds to the system.

    Returns True when some memory was released, False when none was or the C
    library cannot do it.
    """
    trim = _malloc_trim()
    return bool(trim and trim(0))
