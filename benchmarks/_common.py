"""Helpers shared by the benchmark scripts: timing, memory, environment, results.

Memory is the resident set size (RSS) of the process. ``ru_maxrss`` is the
high-water mark of the whole process since it started, so the scripts run each
measured configuration in a fresh subprocess (:func:`run_worker`) and read it
there; :class:`PeakRSS` samples the RSS in a thread to get the peak of one phase
inside a process.
"""

import csv
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"

MIB = 2.0**20

# Benchmark the checkout these scripts belong to, whether or not skpadim is installed.
if str(REPO_DIR) not in sys.path:
    sys.path.insert(0, str(REPO_DIR))


# -- memory --------------------------------------------------------------------
def max_rss_bytes():
    """Peak RSS of this process since it started (``getrusage``'s ``ru_maxrss``)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def current_rss_bytes():
    """Current RSS of this process."""
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def glibc_heap():
    """``(in use, kept free)`` bytes of glibc's allocator, or None elsewhere.

    In use: the blocks allocated now (in its heaps, and mapped on their own).
    Kept free: memory freed by the program that the heaps still hold, part of the
    RSS wherever it has been written to, to serve later allocations without new
    page faults. None where glibc's ``mallinfo2`` is missing (glibc before 2.33,
    other C libraries); with another allocator preloaded (jemalloc, tcmalloc)
    glibc's figures miss most of the memory.
    """
    global _MALLINFO2
    if _MALLINFO2 is None:
        try:
            import ctypes

            class _Mallinfo2(ctypes.Structure):
                _fields_ = [(name, ctypes.c_size_t) for name in (
                    "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                    "uordblks", "fordblks", "keepcost")]

            function = ctypes.CDLL(None).mallinfo2  # glibc 2.33 and later
            function.restype = _Mallinfo2
            _MALLINFO2 = function
        except Exception:  # no such function, or no C library to load it from
            _MALLINFO2 = False
    if not _MALLINFO2:
        return None
    info = _MALLINFO2()
    return info.uordblks + info.hblkhd, info.fordblks


_MALLINFO2 = None


class PeakRSS:
    """Context manager sampling the RSS in a thread: the peak during a phase.

    ``start`` is the RSS when the phase began, ``peak`` the largest value seen
    (sampled every ``interval`` seconds, so a spike shorter than that may be
    missed), ``increase`` their difference. ``quantile(q)`` is that of all the
    samples: the peak of a long phase is the rarest coincidence of its
    allocations, so it can rise with the phase's length while the RSS that the
    phase keeps returning to does not.
    """

    def __init__(self, interval=0.005, heap=False):
        self.interval = interval
        self.start = self.peak = 0
        self.samples = []
        # With ``heap``, the largest in-use and kept-free byte counts of the C
        # library's allocator seen (see glibc_heap), or None where it cannot tell.
        self.heap = heap
        self.heap_in_use = self.heap_kept_free = None

    def __enter__(self):
        self.start = self.peak = current_rss_bytes()
        self.samples = [self.start]
        self._sample_heap()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            rss = current_rss_bytes()
            self.samples.append(rss)
            self.peak = max(self.peak, rss)
            self._sample_heap()
            self._stop.wait(self.interval)

    def _sample_heap(self):
        heap = glibc_heap() if self.heap else None
        if heap is not None:
            self.heap_in_use = max(self.heap_in_use or 0, heap[0])
            self.heap_kept_free = max(self.heap_kept_free or 0, heap[1])

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.samples.append(current_rss_bytes())
        self.peak = max(self.peak, self.samples[-1])
        return False

    @property
    def increase(self):
        return self.peak - self.start

    def quantile(self, q):
        """The ``q`` quantile (0 to 1) of the sampled RSS, in bytes."""
        return float(np.quantile(self.samples, q))


# -- time ----------------------------------------------------------------------
class Timer:
    """``with Timer(cuda) as t: ...`` then ``t.seconds`` (wall clock, GPU synchronised)."""

    def __init__(self, cuda=False):
        self.cuda = cuda
        self.seconds = None

    def _sync(self):
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def __enter__(self):
        self._sync()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self._sync()
        self.seconds = time.perf_counter() - self._t0
        return False


# -- threads and environment ---------------------------------------------------
def set_threads(n):
    """Use ``n`` intra-op threads in torch (and the BLAS libraries it calls)."""
    import torch

    torch.set_num_threads(int(n))
    return torch.get_num_threads()


def thread_env(n):
    """Environment for a worker process that should use ``n`` threads."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(n)
    # The workers import skpadim from this checkout, whatever is installed.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_DIR), env.get("PYTHONPATH")]))
    return env


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module):
    try:
        return __import__(module).__version__
    except Exception:  # not installed, or no __version__
        return None


def git_commit():
    """The checked-out commit, with "+uncommitted" when tracked files that make
    a result (the package, the benchmarks, setup.py) differ from it: the commit
    alone would name code that did not produce the result. Prose (README,
    doc/) and results written by earlier runs are not code."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO_DIR), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=10,
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "-C", str(REPO_DIR), "status", "--porcelain", "--untracked-files=no", "--",
             "skpadim", "benchmarks", "setup.py", ":(exclude)benchmarks/results"],
            capture_output=True, text=True, timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    if not head:
        return None
    return head + "+uncommitted" if changed else head


def environment(threads=None, device="cpu", extra_modules=()):
    """A dict describing the machine and the software, stored with every result."""
    import torch

    info = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads if threads is not None else torch.get_num_threads(),
        # How idle OpenMP threads wait (None: the library's default, spin then
        # sleep): sleeping at once makes every small parallel call pay a wake-up.
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        # The C library's allocator settings (glibc's MALLOC_*_ variables): they
        # decide how much freed memory a process keeps, hence its peak RSS.
        "malloc_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")},
        "device": device,
        "torch": torch.__version__,
        "skpadim_commit": git_commit(),
    }
    for module in ("skpadim", "numpy", "sklearn", "torchvision", *extra_modules):
        info[module] = _version(module)
    if device == "cuda" and torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


def gemm_gflops(threads, size=2048, repeats=5):
    """This machine's float32 matrix-product rate (GFLOP/s) with ``threads``
    threads: the yardstick of a run's timings (on the same virtual machine type
    it has varied twofold from one day to the next)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        a = torch.randn(size, size)
        a @ a
        start = time.perf_counter()
        for _ in range(repeats):
            a @ a
        return 2.0 * size**3 * repeats / (time.perf_counter() - start) / 1e9
    finally:
        torch.set_num_threads(before)


def print_environment(info):
    keys = ("cpu_model", "cpu_count", "torch_threads", "device", "torch", "skpadim_commit")
    print("  ".join(f"{k}={info.get(k)}" for k in keys))


# -- subprocesses --------------------------------------------------------------
def run_worker(script, config, workdir, threads, label):
    """Run ``script --worker CONFIG.json`` in a fresh Python process; return its JSON result.

    A fresh process per measured configuration makes its ``ru_maxrss`` the peak
    of that configuration alone.
    """
    workdir = Path(workdir)
    cfg_path = workdir / f"{label}.config.json"
    out_path = workdir / f"{label}.result.json"
    cfg_path.write_text(json.dumps(dict(config, result_path=str(out_path)), default=str))
    proc = subprocess.run(
        [sys.executable, str(script), "--worker", str(cfg_path)],
        env=thread_env(threads),
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0 or not out_path.is_file():
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-25:])
        raise RuntimeError(f"worker {label!r} failed (exit code {proc.returncode}):\n{tail}")
    return json.loads(out_path.read_text())


def write_worker_result(config, result):
    """In a worker started by :func:`run_worker`: hand ``result`` back to it."""
    Path(config["result_path"]).write_text(json.dumps(result))


# -- data ----------------------------------------------------------------------
def spaced_indices(n, k):
    """``k`` indices spread evenly over ``range(n)`` (all of them if k is None or >= n).

    On a frame sorted by defect type this keeps every type in a subset.
    """
    if k is None or k >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, k).round().astype(int))


def spread_over_aspects(paths, k):
    """Indices of ``k`` of the image ``paths`` spread evenly over their height/width.

    A training subset drawn this way spans the whole range of proportions: the
    detector refuses test images whose height/width lies well outside the range
    it was fitted on. All indices (in order of proportion) if k is None or >= n.
    """
    from skpadim._images import image_shapes

    order = np.argsort([h / w for h, w in image_shapes(list(paths))], kind="stable")
    return order[spaced_indices(len(order), k)]


# -- results -------------------------------------------------------------------
def nearest_neighbour_masks(masks, size):
    """Boolean masks resized to ``size`` (H, W) by nearest neighbour, as plain
    PaDiM runs resize them (``load_masks(size=...)`` keeps every defect pixel
    instead, which grows them by about 2% on magnetic tile at 224 x 224)."""
    from PIL import Image

    resized = [Image.fromarray(np.asarray(m, dtype=np.uint8) * 255).resize(size[::-1], Image.NEAREST)
               for m in masks]
    return np.stack([np.asarray(r) > 127 for r in resized])


def slug(text):
    keep = "".join(c if c.isalnum() or c in "-." else "-" for c in str(text))
    return "-".join(part for part in keep.split("-") if part)


def _fmt(value):
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def format_table(rows, columns, headers=None):
    """Plain-text table of ``rows`` (dicts) restricted to ``columns``."""
    headers = headers or columns
    cells = [[_fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.rjust(w) for h, w in zip(headers, widths))
    out = [line, "-" * len(line)]
    out += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(out)


def write_results(name, rows, columns, meta, results_dir=None):
    """Write ``rows`` to ``<results_dir>/<name>.csv`` and rows + meta to ``<name>.json``."""
    results_dir = Path(results_dir or RESULTS_DIR)
    results_dir.mkdir(parents=True, exist_ok=True)
    csv_path = results_dir / f"{name}.csv"
    json_path = results_dir / f"{name}.json"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: ("" if row.get(c) is None else row.get(c)) for c in columns})
    payload = _finite({**meta, "rows": rows})
    json_path.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    return csv_path, json_path


def _finite(obj):
    """NaN and infinities -> None, so that the JSON is standard."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, (float, np.floating)) and not np.isfinite(obj):
        return None
    return obj


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
