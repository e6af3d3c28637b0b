"""Process memory: current RSS, the peak RSS over a stretch of work (sampled by a background thread), glibc's
malloc thresholds, and the pages of memory-mapped checkpoints: letting go of those only read, and writing over
the others without copying them from the file first."""

import bisect
import ctypes
import ctypes.util
import functools
import os
import sys
import threading
from contextlib import contextmanager

import psutil

_process = psutil.Process()


@functools.cache
def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") else None
    except OSError:
        return None


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


@functools.cache
def _mallinfo2():
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = _MallInfo2
    return libc.mallinfo2


def heap_free_bytes() -> int | None:
    """Bytes glibc's heaps hold free (mallinfo2's fordblks, every arena; resident or not). None without glibc
    2.33's mallinfo2."""
    mallinfo2 = _mallinfo2()
    return None if mallinfo2 is None else mallinfo2().fordblks


def return_free_memory(at_least: int = 0) -> None:
    """Hand the allocator's free pages back to the system (glibc's malloc_trim). glibc keeps freed chunks of up
    to 32 MiB on its heap (settle_malloc_thresholds); in a layer-wise pass those are the previous blocks'
    activations. Measured on SmolLM2 SmoothQuant, trimming after each block: a peak RSS of 1,340 MiB against
    1,578 MiB.

    With `at_least`, only when the heaps hold that much free: what is handed back, the next allocations fault in
    again. RTN on SmolLM2 had 6 MiB free after each block; trimming it every block made the step 0.45 s instead
    of 0.37 s (medians of 8), and without any trim the free space grew to 23-27 MiB by the end."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "malloc_trim"):
        return
    if at_least and (free := heap_free_bytes()) is not None and free < at_least:
        return
    libc.malloc_trim(0)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
_HEAP_BLOCKS_UP_TO = 32 << 20  # glibc's own ceiling for the threshold it adapts (DEFAULT_MMAP_THRESHOLD_MAX)


@functools.cache
def settle_malloc_thresholds() -> None:
    """Serve blocks of up to 32 MiB from glibc's heap and keep up to 64 MiB free at its top (mallopt), the
    values glibc's adaptive thresholds reach anyway once the process has freed a large block.

    Until then glibc maps every block of 128 KiB or more afresh and unmaps it on free, so each temporary tensor
    costs page faults, and how fast a step ran depended on what the process had happened to free before it.
    Measured on SmolLM2 (float32 folder), HQQ 4-bit: 25.6-27.7 s with 7-8 M page faults when nothing before the
    run had freed a large block, 10.6 s with 0.48 M after loading the tokenizer had, 10.1 s with 0.40 M with these
    settings from the start (RTN W4: 2.1, 1.4 and 1.4 s; peak RSS within 10 MiB). Free heap pages still go back
    to the system after each block of a layer-wise step (return_free_memory)."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, _HEAP_BLOCKS_UP_TO)
        libc.mallopt(_M_TRIM_THRESHOLD, 2 * _HEAP_BLOCKS_UP_TO)


_MADV_DONTNEED = 4
_PAGEMAP_PRESENT, _PAGEMAP_FILE = 1 << 63, 1 << 61  # /proc/self/pagemap: in memory; a page of a file (or shared)
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _present_pages(address: int, length: int, *, of_a_file: bool):
    """(first page number, a mask over the pages of [address, address + length)): present pages of a file (or
    shared) with `of_a_file`, else present anonymous ones, the process's own. None where /proc/self/pagemap
    cannot be read (elsewhere than Linux)."""
    if _glibc() is None or length <= 0:
        return None
    first, end = address // _PAGE, -(-(address + length) // _PAGE)
    try:
        with open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
            raw = os.pread(pagemap.fileno(), (end - first) * 8, first * 8)
    except OSError:
        return None
    import numpy as np

    flags = np.frombuffer(raw, dtype=np.uint64)
    present = (flags & np.uint64(_PAGEMAP_PRESENT)) != 0
    return first, present & (((flags & np.uint64(_PAGEMAP_FILE)) != 0) == of_a_file)


def release_read_only_file_pages(address: int, length: int) -> None:
    """Unmap the pages of [address, address + length) that are unmodified pages of a memory-mapped file.

    transformers maps safetensors checkpoints into memory, so merely reading a weight (to count its zeros, say)
    keeps it in this process's resident set for good, though the page cache holds it and a later read finds it
    there again. Only pages that /proc/self/pagemap shows as present file pages are released: a page this process
    wrote to is a private anonymous copy and is never touched. Call it only where nothing writes to the range
    at the same time (a write between the check and the release would be lost). Elsewhere than Linux: nothing."""
    pages = _present_pages(address, length, of_a_file=True)
    if pages is None:
        return
    import numpy as np

    first, file_page = pages
    edges = np.flatnonzero(np.diff(np.concatenate(([False], file_page, [False])).astype(np.int8)))
    libc = _glibc()
    for start, stop in zip(edges[0::2].tolist(), edges[1::2].tolist()):  # runs of file pages: [start, stop)
        address, length = ctypes.c_void_p((first + start) * _PAGE), ctypes.c_size_t((stop - start) * _PAGE)
        libc.madvise(address, length, _MADV_DONTNEED)


def _holds_own_pages(address: int, length: int) -> bool:
    """Whether any page of [address, address + length) is this process's own: present and anonymous (the heap,
    or a page of a mapped file it wrote to). True where pagemap cannot be read."""
    pages = _present_pages(address, length, of_a_file=False)
    return True if pages is None else bool(pages[1].any())


def _read_mappings() -> list[tuple[int, int, bool]]:
    """/proc/self/maps as (start, end, whether a writable private mapping of a file), in address order."""
    table = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                span, perms, _offset, _device, inode, *_path = line.split()
                start, end = (int(x, 16) for x in span.split("-"))
                table.append((start, end, perms[1] == "w" and perms[3] == "p" and inode != "0"))
    except OSError:
        pass
    return table


def _find_mapping(table: list[tuple[int, int, bool]], address: int, length: int) -> bool | None:
    """Whether [address, address + length) lies in one private file mapping of `table`; None where no mapping
    of it holds `address`."""
    at = bisect.bisect_right(table, (address, float("inf"))) - 1
    if at < 0 or not table[at][0] <= address < table[at][1]:
        return None
    start, end, private_file = table[at]
    return private_file and address + length <= end


_cached = threading.local()  # the mappings table of mappings_read_once, per thread


@contextmanager
def mappings_read_once():
    """Within the block, this thread reads /proc/self/maps once for fresh_pages_for_overwrite (again only for an
    address none of the listed mappings holds) instead of once for each tensor: 0.6 ms a read, 0.13 s over
    SmolLM2's 210 linear layers. For a stretch that unmaps no file holding the tensors written, such as a step
    writing into the weights of a model it holds. The splits its own fresh pages make in a mapping do not matter:
    once written, those pages are the process's own and are never looked up again."""
    outer = getattr(_cached, "table", None)
    _cached.table = []
    try:
        yield
    finally:
        _cached.table = outer


def _private_file_mapping(address: int, length: int) -> bool:
    """Whether [address, address + length) lies in one writable private mapping of a file (/proc/self/maps)."""
    table = getattr(_cached, "table", None)
    found = None if not table else _find_mapping(table, address, length)
    if found is None:
        fresh = _read_mappings()
        if table is not None:
            _cached.table = fresh
        found = _find_mapping(fresh, address, length)
    return bool(found)


@functools.cache
def _mmap():
    return ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                            ctypes.c_int, ctypes.c_long, use_errno=True)(("mmap", _glibc()))


_PROT_READ_WRITE, _MAP_PRIVATE_ANONYMOUS_FIXED = 0x1 | 0x2, 0x02 | 0x20 | 0x10


def fresh_pages_for_overwrite(address: int, length: int) -> None:
    """Before [address, address + length) is overwritten whole: where it is still a memory-mapped file's unmodified
    pages, put fresh anonymous pages in their place (mmap MAP_FIXED over the range's whole pages).

    A checkpoint transformers memory-maps privately copies each page from the file on the first write to it, a
    page fault and a 4 KiB copy for every page: writing RTN's weights into SmolLM2 took 0.86-0.90 s that way and
    0.24-0.27 s onto fresh pages, the same values and the same memory afterwards. Not advised as huge pages
    (MADV_HUGEPAGE): writing int8 weights onto them took 0.39-0.46 s, against 0.22-0.24 s on plain pages.
    Nothing but the caller may read the range until it has written it: its whole pages read as zeros. Where a
    page of the range is already the process's own (written before) or the range is not a private file mapping,
    nothing is done. Elsewhere than Linux: nothing."""
    libc = _glibc()
    first, end = -(-address // _PAGE) * _PAGE, (address + length) // _PAGE * _PAGE
    if libc is None or end <= first:
        return
    # pagemap first: it is read for the tensor alone, where /proc/self/maps lists every mapping of the process.
    # Not the edge pages: a neighbour written before may share them.
    if _holds_own_pages(first, end - first) or not _private_file_mapping(address, length):
        return
    if _mmap()(first, end - first, _PROT_READ_WRITE, _MAP_PRIVATE_ANONYMOUS_FIXED, -1, 0) != first:
        raise OSError(ctypes.get_errno(), f"mmap MAP_FIXED at {first:#x} failed")


def available_memory_bytes() -> int:
    """Memory the system can give without swapping (MemAvailable)."""
    return psutil.virtual_memory().available


def rss_bytes() -> int:
    return _process.memory_info().rss


class PeakRSS:
    """`with PeakRSS() as peak: ...` then `peak.bytes`: the highest RSS seen, sampled every `interval` s."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.bytes = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True, name="peak-rss")

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.bytes = max(self.bytes, rss_bytes())

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.bytes = max(self.bytes, rss_bytes())
