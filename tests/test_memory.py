"""Writing over the pages of a memory-mapped checkpoint (studio.core.memory, Linux only)."""

import hashlib
import sys

import numpy as np
import pytest
import torch

from studio.core import memory
from studio.core.evaluation.size import size_report
from studio.core.memory import fresh_pages_for_overwrite
from studio.core.structure import set_tensor

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pagemap and mmap MAP_FIXED: Linux")

SIZES = (3001, 50_001, 4093)  # float32 tensors back to back, none on a page boundary


def mapped_checkpoint(tmp_path, mode, sizes=SIZES, gap=0):
    """Three tensors in one file, mapped as transformers maps a checkpoint (mode 'c': private, copy on write);
    `gap` floats of zeros between them."""
    values = [np.random.default_rng(i).standard_normal(n).astype(np.float32) for i, n in enumerate(sizes)]
    file = tmp_path / "weights.bin"
    file.write_bytes(bytes(gap * 4).join(v.tobytes() for v in values))
    mapped = np.memmap(file, dtype=np.float32, mode=mode)
    starts = [sum(sizes[:i]) + i * gap for i in range(len(sizes))]
    tensors = [torch.from_numpy(mapped[a:a + n]) for a, n in zip(starts, sizes)]
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


def test_within_mappings_read_once_the_maps_are_read_once_and_again_only_for_a_mapping_made_since(tmp_path,
                                                                                              monkeypatch):
    reads = []
    read = memory._read_mappings
    monkeypatch.setattr(memory, "_read_mappings", lambda: reads.append(1) or read())
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _, _, (before, middle, after) = mapped_checkpoint(tmp_path / "a", "c")
    with memory.mappings_read_once():
        fresh_pages_for_overwrite(middle.data_ptr(), middle.numel() * 4)
        _, _, (_, later, _) = mapped_checkpoint(tmp_path / "b", "c")  # mapped after the first read
        fresh_pages_for_overwrite(later.data_ptr(), later.numel() * 4)
        fresh_pages_for_overwrite(after.data_ptr(), after.numel() * 4)
        fresh_pages_for_overwrite(torch.randn(100_000).data_ptr(), 400_000)  # the heap: its own pages, no lookup
    assert len(reads) == 2
    for tensor in (middle, later, after):  # each got fresh pages (zeros) inside its whole pages
        first = -(-tensor.data_ptr() // 4096) * 4096
        assert not tensor[(first - tensor.data_ptr()) // 4:][:1024].any()
    fresh_pages_for_overwrite(before.data_ptr(), before.numel() * 4)
    assert len(reads) == 3  # outside the block, every lookup reads the maps


def test_a_size_report_keeps_the_pages_of_the_weights_about_to_be_overwritten_and_hands_back_the_rest(tmp_path):
    # 4 MiB apart: reading a page of a mapped file maps the pages around it too (fault-around, large folios)
    _, values, tensors = mapped_checkpoint(tmp_path, "c", gap=1 << 20)
    model = torch.nn.Module()
    for name, tensor in zip(("before", "middle", "after"), tensors):
        model.register_parameter(name, torch.nn.Parameter(tensor, requires_grad=False))
    report = size_report(model, about_to_overwrite=[model.middle])
    assert report["nonzero_parameters"] == sum(int(np.count_nonzero(v)) for v in values)

    def file_pages_present(tensor):
        first = -(-tensor.data_ptr() // 4096) * 4096  # whole pages only: the edges are shared with neighbours
        end = (tensor.data_ptr() + tensor.numel() * 4) // 4096 * 4096
        return memory._present_pages(first, end - first, of_a_file=True)[1]

    assert file_pages_present(model.middle).all()
    assert not file_pages_present(model.before).any() and not file_pages_present(model.after).any()


def test_free_heap_goes_back_only_once_it_adds_up_to_what_was_asked(monkeypatch):
    assert memory.heap_free_bytes() > 0  # glibc's mallinfo2 (2.33 and later)
    trims = []

    class Libc:
        def malloc_trim(self, pad):
            trims.append(pad)

    monkeypatch.setattr(memory, "_glibc", lambda: Libc())
    monkeypatch.setattr(memory, "heap_free_bytes", lambda: 6 << 20)
    memory.return_free_memory(at_least=32 << 20)
    assert trims == []  # what a block of RTN frees: kept for the next block's allocations
    memory.return_free_memory()
    assert trims == [0]
    monkeypatch.setattr(memory, "heap_free_bytes", lambda: 40 << 20)
    memory.return_free_memory(at_least=32 << 20)
    assert trims == [0, 0]
