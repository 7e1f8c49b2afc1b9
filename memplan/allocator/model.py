"""A pure-Python model of PyTorch's CUDA caching allocator (DeviceCachingAllocator), one device.

It follows c10/cuda/CUDACachingAllocator.cpp as shipped with torch 2.13 (the rules are unchanged since 2.1; the
2.13 additions are a configurable large segment size and max_non_split_rounding_mb). Each method below names the
C++ function it mirrors. Addresses are virtual: a new segment gets a fresh range (cudaMalloc's own placement is
not modelled), so ties between equal-sized free blocks break by segment age, not by the driver's address.

What it models: size rounding (round_size, roundup_power2_divisions); the small (<= 1 MiB) and large pools, kept
per stream (BlockComparatorSize orders by stream, then size, then address); segment sizes (get_allocation_size:
2 MiB small segments, the 20 MiB large segment for 1-10 MiB requests, 2 MiB rounding from 10 MiB); best fit
(get_free_block, with the max_split_size / max_non_split_rounding rules for oversize blocks); splitting
(should_split, alloc_found_block); coalescing on free (free_block, try_merge_blocks); the retry path before an out of
memory (release_available_cached_blocks, then release_cached_blocks); expandable segments (one segment per stream
and pool that grows by mapping pages: 2 MiB in the small pool, large_segment_size in the large pool, Note
[Expandable Segments]); garbage_collection_threshold (garbage_collect_cached_blocks, active only with a memory
fraction); per_process_memory_fraction (alloc_block's allowed_memory_maximum).
What it does not: cross-stream uses (record_stream events delay a free until the other stream is done: a replay
frees at once), CUDA graph private pools, IPC, and cudaMalloc failing for a reason other than capacity.
"""
from __future__ import annotations

from bisect import bisect_left, insort

from memplan.allocator.config import (
    K_MIN_BLOCK_SIZE, K_MIN_LARGE_ALLOC, K_ROUND_LARGE, K_SMALL_BUFFER, K_SMALL_SIZE, UNLIMITED, AllocatorConfig,
)

_SEGMENT_ALIGN = 2 << 20  # new segments start on 2 MiB boundaries (cudaMalloc granularity for large allocations)


class AllocatorOutOfMemory(RuntimeError):
    """malloc found no block and could not reserve one after freeing the cache (torch.OutOfMemoryError)."""

    def __init__(self, requested: int, alloc_size: int, allocated: int, reserved: int, capacity):
        self.requested, self.alloc_size, self.allocated, self.reserved, self.capacity = (
            requested, alloc_size, allocated, reserved, capacity)
        super().__init__(f"CUDA out of memory: tried to allocate {alloc_size / 2**20:.2f} MiB with "
                         f"{allocated / 2**30:.3f} GiB allocated and {reserved / 2**30:.3f} GiB reserved")


class Block:
    """struct Block: a piece of a segment, free or allocated; prev/next link the pieces of one segment."""

    __slots__ = ("size", "addr", "stream", "small", "allocated", "prev", "next", "seg", "mapped", "requested",
                 "gc_base")

    def __init__(self, size, addr, stream, small, seg=None, mapped=True):
        self.size, self.addr, self.stream, self.small, self.seg, self.mapped = size, addr, stream, small, seg, mapped
        self.allocated = False
        self.prev = self.next = None
        self.requested = 0
        self.gc_base = 0

    def is_split(self) -> bool:
        return self.prev is not None or self.next is not None


class _Segment:
    """struct ExpandableSegment: a reserved virtual range mapped page by page."""

    __slots__ = ("base", "page", "size")

    def __init__(self, base, page, size):
        self.base, self.page, self.size = base, page, size


class _Pool:
    """struct BlockPool: free blocks sorted by (size, address) per stream, and unmapped ranges by address."""

    __slots__ = ("small", "free", "unmapped", "gc_calls")

    def __init__(self, small: bool):
        self.small = small
        self.free: dict = {}  # stream -> sorted [(size, addr)]
        self.unmapped: dict = {}  # stream -> sorted [addr]
        self.gc_calls = 0  # get_free_blocks_call_count


def round_size(size: int, config: AllocatorConfig) -> int:
    """DeviceCachingAllocator::round_size (with roundup_power2_next_division)."""
    if size < K_MIN_BLOCK_SIZE:
        return K_MIN_BLOCK_SIZE
    divisions = config.divisions_for(size)
    if divisions > 1 and size > K_MIN_BLOCK_SIZE * divisions:
        if size & (size - 1) == 0:
            return size
        floor = 1 << (size.bit_length() - 1)
        step = floor >> (divisions.bit_length() - 1)
        if step == 0:
            return floor << 1
        rounded = size & ~(step - 1)
        return size if rounded == size else rounded + step
    return K_MIN_BLOCK_SIZE * -(-size // K_MIN_BLOCK_SIZE)


def allocation_size(size: int, config: AllocatorConfig) -> int:
    """get_allocation_size: the segment cudaMalloc'd when no cached block fits a rounded request."""
    if size <= K_SMALL_SIZE:
        return K_SMALL_BUFFER
    if size < K_MIN_LARGE_ALLOC:
        return config.large_segment_size
    return K_ROUND_LARGE * -(-size // K_ROUND_LARGE)


class CachingAllocator:
    """One device's caching allocator.

    capacity: bytes the allocator can obtain from the driver (cudaMalloc / cuMemCreate fail beyond it); None is
    unlimited. device_total: the GPU's memory, for per_process_memory_fraction (allowed = fraction * total) and the
    expandable segments' address-space size.
    """

    def __init__(self, config: AllocatorConfig | None = None, capacity: int | None = None,
                 device_total: int | None = None):
        self.config = config = config or AllocatorConfig()
        self.capacity = capacity
        self.device_total = device_total
        self.allowed = None  # allowed_memory_maximum; set_fraction is `allowed is not None`
        if config.per_process_memory_fraction is not None:
            total = device_total if device_total is not None else capacity
            if total is None:
                raise ValueError("per_process_memory_fraction needs the device's total memory")
            self.allowed = int(config.per_process_memory_fraction * total)
        self.gc_active = self.allowed is not None and config.garbage_collection_threshold > 0.0
        self.small_pool, self.large_pool = _Pool(True), _Pool(False)
        self.blocks: dict[int, Block] = {}  # every block (free, allocated, unmapped) by address
        self.allocated = self.reserved = self.requested = 0
        self.peak_allocated = self.peak_reserved = 0
        self.segments = 0
        self.num_alloc_retries = self.num_ooms = self.num_device_alloc = self.num_device_free = 0
        self._next_addr = 1 << 40

    # ------------------------------------------------------------------------------------------ public API
    def malloc(self, orig_size: int, stream: int = 0) -> Block:
        """DeviceCachingAllocator::malloc."""
        cfg = self.config
        size = round_size(orig_size, cfg)
        pool = self.small_pool if size <= K_SMALL_SIZE else self.large_pool
        alloc_size = allocation_size(size, cfg)
        block = self._get_free_block(pool, size, stream)
        if block is None:
            if self.gc_active:
                self._garbage_collect()
            block = self._alloc_block(pool, size, alloc_size, stream)
            if block is None and self._release_available_cached_blocks(pool, size, stream):
                block = self._alloc_block(pool, size, alloc_size, stream)
            if block is None:
                self._release_cached_blocks()
                self.num_alloc_retries += 1
                block = self._alloc_block(pool, size, alloc_size, stream)
            if block is None:
                self.num_ooms += 1
                raise AllocatorOutOfMemory(orig_size, alloc_size, self.allocated, self.reserved, self.capacity)
        return self._alloc_found_block(block, size, orig_size, self._should_split(block, size))

    def free(self, block: Block) -> None:
        """DeviceCachingAllocator::free (no cross-stream uses: free_block at once)."""
        block.allocated = False
        self.allocated -= block.size
        self.requested -= block.requested
        self._free_block(block)

    def empty_cache(self) -> None:
        """emptyCache -> release_cached_blocks."""
        self._release_cached_blocks()

    def largest_free_block(self) -> int:
        """cacheInfo: the largest cached (free, mapped) block."""
        best = 0
        for pool in (self.small_pool, self.large_pool):
            for lst in pool.free.values():
                if lst and lst[-1][0] > best:
                    best = lst[-1][0]
        return best

    # ----------------------------------------------------------------------------------------- free lists
    def _pool_of(self, block: Block) -> _Pool:
        return self.small_pool if block.small else self.large_pool

    def _insert_free(self, pool: _Pool, block: Block) -> None:
        """BlockPool::insert_into_blocks (stamps the gc age base)."""
        block.gc_base = pool.gc_calls
        lst = pool.free.get(block.stream)
        if lst is None:
            pool.free[block.stream] = [(block.size, block.addr)]
        else:
            insort(lst, (block.size, block.addr))

    def _remove_free(self, pool: _Pool, block: Block) -> None:
        lst = pool.free[block.stream]
        del lst[bisect_left(lst, (block.size, block.addr))]

    def _insert_unmapped(self, pool: _Pool, block: Block) -> None:
        insort(pool.unmapped.setdefault(block.stream, []), block.addr)

    def _remove_unmapped(self, pool: _Pool, block: Block) -> None:
        lst = pool.unmapped[block.stream]
        del lst[bisect_left(lst, block.addr)]

    def _new_address(self, size: int) -> int:
        addr = self._next_addr
        self._next_addr += -(-size // _SEGMENT_ALIGN) * _SEGMENT_ALIGN + _SEGMENT_ALIGN
        return addr

    # ----------------------------------------------------------------------------------- allocation path
    def _get_free_block(self, pool: _Pool, size: int, stream: int) -> Block | None:
        """get_free_block: the smallest cached block of this stream that fits (best fit), with the oversize rules."""
        cfg = self.config
        if self.gc_active:
            pool.gc_calls += 1
        lst = pool.free.get(stream)
        if not lst:
            return None
        i = bisect_left(lst, (size, -1))
        if i == len(lst):
            return None
        block = self.blocks[lst[i][1]]
        if block.seg is not None:
            if cfg.expandable_segments:
                # a block at the growing end of an expandable segment counts as the size it can grow to
                def grow(b):
                    return b.size + (b.next.size if b.next is not None and not b.next.mapped else 0)
                j = i + 1
                while block.seg is not None and j < len(lst):
                    nxt = self.blocks[lst[j][1]]
                    if grow(nxt) >= grow(block):
                        break
                    i, block, j = j, nxt, j + 1
            else:  # expandable segments switched off after some were made: only non-expandable blocks
                j = i + 1
                while j < len(lst) and self.blocks[lst[j][1]].seg is not None:
                    j += 1
                if j == len(lst):
                    return None
                i, block = j, self.blocks[lst[j][1]]
        if size < cfg.max_split_size and block.size >= cfg.max_split_size:
            return None  # do not return an oversized block for a smaller request
        if size >= cfg.max_split_size and block.size >= size + cfg.max_non_split_rounding_size:
            return None  # an oversized block may be rounded up, but only by max_non_split_rounding_size
        del lst[i]
        return block

    def _should_split(self, block: Block, size: int) -> bool:
        """should_split: small pool or expandable: keep any remainder >= 512 B; large pool: > 1 MiB, and only
        when the request is below max_split_size."""
        remaining = block.size - size
        if block.small or self.config.expandable_segments:
            return remaining >= K_MIN_BLOCK_SIZE
        return size < self.config.max_split_size and remaining > K_SMALL_SIZE

    def _alloc_found_block(self, block: Block, size: int, orig_size: int, split: bool) -> Block:
        """alloc_found_block: split off the front `size` bytes; the remainder goes back to the pool."""
        if split:
            rest = block
            block = Block(size, rest.addr, rest.stream, rest.small, rest.seg)
            block.prev = rest.prev
            if block.prev is not None:
                block.prev.next = block
            block.next = rest
            rest.prev = block
            rest.addr += size
            rest.size -= size
            self.blocks[block.addr] = block
            self.blocks[rest.addr] = rest
            self._insert_free(self._pool_of(rest), rest)
        block.allocated = True
        block.requested = orig_size
        self.allocated += block.size
        self.requested += orig_size
        if self.allocated > self.peak_allocated:
            self.peak_allocated = self.allocated
        return block

    def _alloc_block(self, pool: _Pool, size: int, alloc_size: int, stream: int) -> Block | None:
        """alloc_block: a new segment from cudaMalloc, or pages mapped into an expandable segment."""
        if self.allowed is not None and self.reserved + alloc_size > self.allowed:
            return None  # set_fraction: total_allocated_memory + size > allowed_memory_maximum
        if self.config.expandable_segments:
            return self._try_allocate_expandable_block(pool, size, stream)
        if self.capacity is not None and self.reserved + alloc_size > self.capacity:
            return None  # cudaMalloc: cudaErrorMemoryAllocation
        block = Block(alloc_size, self._new_address(alloc_size), stream, pool.small)
        self.blocks[block.addr] = block
        self._reserve(alloc_size)
        self.segments += 1
        return block

    def _reserve(self, nbytes: int) -> None:
        self.reserved += nbytes
        self.num_device_alloc += 1
        if self.reserved > self.peak_reserved:
            self.peak_reserved = self.reserved

    # ------------------------------------------------------------------------------------------- freeing
    def _free_block(self, block: Block) -> None:
        """free_block: merge with free neighbours of the same segment, then cache."""
        pool = self._pool_of(block)
        self._try_merge(block, block.prev, pool)
        self._try_merge(block, block.next, pool)
        self._insert_free(pool, block)

    def _try_merge(self, dst: Block, src: Block | None, pool: _Pool) -> int:
        """try_merge_blocks: absorb a free neighbour (both mapped or both unmapped)."""
        if src is None or src.allocated or dst.mapped != src.mapped:
            return 0
        if src.mapped:
            self._remove_free(pool, src)
        else:
            self._remove_unmapped(pool, src)
        del self.blocks[src.addr]
        if dst.prev is src:  # [src dst]
            del self.blocks[dst.addr]
            dst.addr = src.addr
            dst.prev = src.prev
            if dst.prev is not None:
                dst.prev.next = dst
            self.blocks[dst.addr] = dst
        else:  # [dst src]
            dst.next = src.next
            if dst.next is not None:
                dst.next.prev = dst
        dst.size += src.size
        return src.size

    def _release_block(self, block: Block) -> None:
        """release_block: cudaFree a whole cached segment."""
        self._remove_free(self._pool_of(block), block)
        del self.blocks[block.addr]
        self.reserved -= block.size
        self.segments -= 1
        self.num_device_free += 1

    def _release_available_cached_blocks(self, pool: _Pool, size: int, stream: int) -> bool:
        """release_available_cached_blocks: only with max_split_size set; free one oversize cached block at least
        as large as the request, or else the largest oversize ones until their sum covers it."""
        cfg = self.config
        if cfg.max_split_size == UNLIMITED:
            return False
        key = max(size, cfg.max_split_size)
        lst = pool.free.get(stream) or []
        i = bisect_left(lst, (key, -1))
        if i < len(lst):
            block = self.blocks[lst[i][1]]
            if block.is_split() or block.seg is not None:
                return False
            self._release_block(block)
            return True
        released = 0
        while released < key and lst:
            block = self.blocks[lst[-1][1]]
            if block.size < cfg.max_split_size or block.is_split() or block.seg is not None:
                break
            released += block.size
            self._release_block(block)
        return released >= key

    def _release_cached_blocks(self) -> None:
        """release_cached_blocks -> release_blocks on both pools: cudaFree every unsplit cached segment, unmap the
        whole free pages of expandable segments."""
        for pool in (self.large_pool, self.small_pool):
            to_unmap = []
            for lst in list(pool.free.values()):
                for _, addr in list(lst):
                    block = self.blocks[addr]
                    if block.seg is not None:
                        to_unmap.append(block)
                    elif not block.is_split():
                        self._release_block(block)
            for block in to_unmap:
                self._unmap_block(block)
                if not block.mapped and not block.is_split():  # release_expandable_segment
                    self._remove_unmapped(pool, block)
                    del self.blocks[block.addr]

    def _garbage_collect(self) -> None:
        """garbage_collect_cached_blocks: above threshold * allowed, free unsplit large cached blocks older than
        the average age (age = get_free_block calls since the block was cached) until enough is reclaimed."""
        threshold = int(self.config.garbage_collection_threshold * self.allowed)
        if self.reserved <= threshold:
            return
        target = self.reserved - threshold
        pool = self.large_pool

        def freeable():
            return [self.blocks[a] for s in sorted(pool.free) for _, a in pool.free[s]
                    if not self.blocks[a].is_split() and self.blocks[a].seg is None]
        blocks = freeable()
        if not blocks:
            return
        total_age = sum(pool.gc_calls - b.gc_base for b in blocks)
        count = len(blocks)
        reclaimed, freed = 0, True
        while reclaimed < target and freed and count > 0:
            age_threshold = total_age / count
            freed = False
            for block in freeable():
                age = pool.gc_calls - block.gc_base
                if age >= age_threshold:
                    freed = True
                    reclaimed += block.size
                    total_age -= age
                    count -= 1
                    self._release_block(block)

    # ------------------------------------------------------------------------------- expandable segments
    def _try_allocate_expandable_block(self, pool: _Pool, size: int, stream: int) -> Block | None:
        """try_allocate_expandable_block: map pages at the lowest address with room, growing a free block."""
        candidate = self._find_expandable_block(pool, size, stream)
        if not candidate.mapped and not self._map_block(candidate, min(candidate.size, size)):
            return None
        while candidate.size < size:
            nxt = candidate.next
            if not self._map_block(nxt, min(size - candidate.size, nxt.size)):
                return None
            candidate = nxt  # map_block merged the free block before it into nxt
        self._remove_free(pool, candidate)
        return candidate

    def _find_expandable_block(self, pool: _Pool, size: int, stream: int) -> Block:
        """find_expandable_block: the lowest unmapped range (with the free block before it) that has room;
        otherwise a new segment whose address space covers 1 1/8 of the GPU's memory."""
        def free(b):
            return b is not None and not b.allocated

        for addr in pool.unmapped.get(stream, ()):
            c = self.blocks[addr]
            if free(c.prev):
                c = c.prev
            room, b = 0, c
            while room < size and free(b):
                room += b.size
                b = b.next
            if room >= size:
                return c
        page = K_SMALL_BUFFER if pool.small else self.config.large_segment_size
        total = self.device_total or self.capacity or (1 << 40)
        va = -(-(total + total // 8) // page) * page
        va = max(va, -(-size // page) * page)
        base = self._new_address(va)
        block = Block(va, base, stream, pool.small, _Segment(base, page, va), mapped=False)
        self.blocks[base] = block
        self._insert_unmapped(pool, block)
        return block

    def _map_block(self, block: Block, size: int) -> bool:
        """map_block: back [addr, addr + size) with whole pages; the rest of the range stays unmapped."""
        seg = block.seg
        off = block.addr - seg.base
        begin, end = off // seg.page, -(-(off + size) // seg.page)
        mapped = (end - begin) * seg.page
        if mapped == 0 or (self.capacity is not None and self.reserved + mapped > self.capacity):
            return False  # cuMemCreate: CUDA_ERROR_OUT_OF_MEMORY
        pool = self._pool_of(block)
        self._remove_unmapped(pool, block)
        block.mapped = True
        if mapped < block.size:
            rest = Block(block.size - mapped, block.addr + mapped, block.stream, block.small, seg, mapped=False)
            rest.prev, rest.next = block, block.next
            if block.next is not None:
                block.next.prev = rest
            block.next = rest
            block.size = mapped
            self.blocks[rest.addr] = rest
            self._insert_unmapped(pool, rest)
        self._try_merge(block, block.prev, pool)
        self._try_merge(block, block.next, pool)
        self._insert_free(pool, block)
        self._reserve(mapped)
        return True

    def _unmap_block(self, block: Block) -> None:
        """unmap_block: give back the whole pages inside a free block of an expandable segment."""
        seg = block.seg
        off = block.addr - seg.base
        begin, end = -(-off // seg.page), (off + block.size) // seg.page
        if begin >= end:
            return
        pool = self._pool_of(block)
        self._remove_free(pool, block)
        start, length = seg.base + begin * seg.page, (end - begin) * seg.page
        before, after = start - block.addr, block.size - (start - block.addr) - length
        del self.blocks[block.addr]
        if before > 0:
            b = Block(before, block.addr, block.stream, block.small, seg)
            b.prev, b.next = block.prev, block
            if block.prev is not None:
                block.prev.next = b
            block.prev = b
            self.blocks[b.addr] = b
            self._insert_free(pool, b)
        if after > 0:
            a = Block(after, start + length, block.stream, block.small, seg)
            a.prev, a.next = block, block.next
            if block.next is not None:
                block.next.prev = a
            block.next = a
            self.blocks[a.addr] = a
            self._insert_free(pool, a)
        block.addr, block.size, block.mapped = start, length, False
        self.blocks[start] = block
        self._try_merge(block, block.prev, pool)
        self._try_merge(block, block.next, pool)
        self._insert_unmapped(pool, block)
        self.reserved -= length
        self.num_device_free += 1
