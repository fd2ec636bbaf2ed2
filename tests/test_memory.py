"""Returning freed memory to the system between batches (skpadim._memory)."""

import ctypes
import os
import platform

import numpy as np
import pytest

import skpadim.detector
from skpadim import PatchGaussianDetector, _memory


@pytest.fixture
def fresh_lookup(monkeypatch):
    """Forget the looked-up malloc_trim, so that a test sees the lookup run."""
    monkeypatch.setattr(_memory, "_malloc_trim", None)


def test_release_asks_glibc_and_nothing_else(fresh_lookup):
    # True exactly where the C library is glibc (the only one with malloc_trim).
    assert _memory.release_freed_memory() is (platform.libc_ver()[0] == "glibc")
    assert _memory.release_freed_memory() is (platform.libc_ver()[0] == "glibc")  # looked up once


def test_release_is_a_no_op_without_a_c_library(fresh_lookup, monkeypatch):
    def no_library(*args, **kwargs):
        raise OSError("no C library here")

    monkeypatch.setattr(ctypes, "CDLL", no_library)
    assert _memory.release_freed_memory() is False
    assert _memory._malloc_trim is False  # not looked up again


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim exists only in glibc")
def test_release_hands_back_freed_heap_memory(fresh_lookup):
    # 512 blocks of 64 KiB, written (under the mmap threshold: in the heap),
    # every other one freed, so that 16 MiB lie free between live blocks, which
    # the allocator keeps and only malloc_trim hands back.
    blocks = [np.ones(2**13) for _ in range(512)]
    del blocks[::2]
    kept = _rss()
    assert _memory.release_freed_memory() is True
    assert kept - _rss() >= 8 * 2**20
    del blocks


def test_the_detector_releases_every_few_batches(monkeypatch, tiny_extractor, normal_images):
    calls = []
    monkeypatch.setattr(skpadim.detector, "release_freed_memory", lambda: calls.append(1))
    monkeypatch.setattr(skpadim.detector, "RELEASE_EVERY_BATCHES", 4)
    det = PatchGaussianDetector(tiny_extractor, n_features=4, batch_size=2, random_state=0)
    det.fit(normal_images)  # 12 batches of 2 for the statistics, 12 for the threshold
    assert len(calls) == 2 * 2  # after batches 4 and 8 of each pass (not before the first)
    calls.clear()
    det.score_samples(normal_images[:10])  # 5 batches
    assert len(calls) == 1
    calls.clear()
    # Embeddings have no backbone activations to hand back.
    det_emb = PatchGaussianDetector(n_features=4, batch_size=2, random_state=0)
    det_emb.fit(tiny_extractor.fit_transform(normal_images))
    assert calls == []
