"""Writing over the pages of a memory-mapped checkpoint (studio.core.memory, Linux only)."""

import hashlib
import sys

import numpy as np
import pytest
import torch

from studio.core.memory import fresh_pages_for_overwrite
from studio.core.structure import set_tensor

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pagemap and mmap MAP_FIXED: Linux")

SIZES = (3001, 50_001, 4093)  # float32 tensors back to back, none on a page boundary


def mapped_checkpoint(tmp_path, mode):
    """Three tensors in one file, mapped as transformers maps a checkpoint (mode 'c': private, copy on write)."""
    values = [np.random.default_rng(i).standard_normal(n).astype(np.float32) for i, n in enumerate(SIZES)]
    file = tmp_path / "weights.bin"
    file.write_bytes(b"".join(v.tobytes() for v in values))
    mapped = np.memmap(file, dtype=np.float32, mode=mode)
    starts = np.cumsum((0,) + SIZES)
    tensors = [torch.from_numpy(mapped[a:b]) for a, b in zip(starts, starts[1:])]
    assert all(torch.equal(t, torch.from_numpy(v)) for t, v in zip(tensors, values))  # read: the pages are in
    return file, values, tensors


def digest(file):
    return hashlib.sha256(file.read_bytes()).hexdigest()


def test_the_whole_pages_of_an_unwritten_private_mapping_are_replaced_and_nothing_else(tmp_path):
    file, values, (before, middle, after) = mapped_checkpoint(tmp_path, "c")
    on_disk = digest(file)
    fresh_pages_for_overwrite(middle.data_ptr(), middle.numel() * 4)
    page = 4096 // 4
    first = -(-middle.data_ptr() // 4096) * 4096
    head = (first - middle.data_ptr()) // 4
    assert torch.equal(middle[:head], torch.from_numpy(values[1][:head]))  # the page shared with `before`
    assert not middle[head:head + 10 * page].any()  # fresh pages read as zeros until written
    assert torch.equal(before, torch.from_numpy(values[0])) and torch.equal(after, torch.from_numpy(values[2]))
    assert digest(file) == on_disk


def test_an_in_place_write_gives_the_new_values_and_leaves_the_file_and_the_neighbours(tmp_path):
    file, values, (before, middle, after) = mapped_checkpoint(tmp_path, "c")
    on_disk = digest(file)
    parameter = torch.nn.Parameter(middle, requires_grad=False)
    new = torch.randn(middle.shape)
    set_tensor(parameter, new, in_place=True)
    assert parameter.data.data_ptr() == middle.data_ptr() and torch.equal(parameter.data, new)
    assert torch.equal(before, torch.from_numpy(values[0])) and torch.equal(after, torch.from_numpy(values[2]))
    assert digest(file) == on_disk
    # once written, the pages are the process's own: a second write goes into them (no zeros in between)
    fresh_pages_for_overwrite(middle.data_ptr(), middle.numel() * 4)
    assert torch.equal(parameter.data, new)


def test_shared_mappings_and_the_heap_are_left_as_they_are(tmp_path):
    _, values, (_, middle, _) = mapped_checkpoint(tmp_path, "r+")  # shared: writes reach the file, so no swap
    fresh_pages_for_overwrite(middle.data_ptr(), middle.numel() * 4)
    assert torch.equal(middle, torch.from_numpy(values[1]))
    heap = torch.randn(100_000)
    kept = heap.clone()
    fresh_pages_for_overwrite(heap.data_ptr(), heap.numel() * 4)
    assert torch.equal(heap, kept)


def test_new_values_that_are_a_view_of_the_old_are_not_lost(tmp_path):
    _, values, (_, middle, _) = mapped_checkpoint(tmp_path, "c")
    parameter = torch.nn.Parameter(middle, requires_grad=False)
    set_tensor(parameter, middle[:], in_place=True)  # the new values live in the pages being written
    assert torch.equal(parameter.data, torch.from_numpy(values[1]))
