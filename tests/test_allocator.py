"""The caching-allocator model against outcomes that c10/cuda/CUDACachingAllocator.cpp (torch 2.13) determines.

One hand-built allocation sequence per rule: the expected figures follow from the C++ functions named in each test
(memplan/allocator/model.py mirrors them), not from running the model.
"""
from __future__ import annotations

import json
import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memplan.allocator import ALLOC, FREE, AllocatorOutOfMemory, CachingAllocator, parse_alloc_conf, replay
from memplan.allocator.model import allocation_size, round_size
from memplan.errors import MemplanError

KiB, MiB, GiB = 2**10, 2**20, 2**30


def alloc(conf: str = "", **kw) -> CachingAllocator:
    return CachingAllocator(parse_alloc_conf(conf), **kw)


# ------------------------------------------------------------------------------------------- round_size


def test_round_size_512_byte_granule():
    c = parse_alloc_conf("")
    assert round_size(1, c) == 512  # size < kMinBlockSize -> kMinBlockSize
    assert round_size(512, c) == 512
    assert round_size(513, c) == 1024
    assert round_size(3 * MiB + 1, c) == 3 * MiB + 512


def test_round_size_power2_divisions():
    # roundup_power2_next_division: 1 MiB..2 MiB in 4 steps of 256 KiB; powers of two stay as they are
    c = parse_alloc_conf("roundup_power2_divisions:4")
    assert round_size(1 * MiB + 1, c) == 1 * MiB + 256 * KiB
    assert round_size(1 * MiB + 300 * KiB, c) == 1 * MiB + 512 * KiB
    assert round_size(2 * MiB, c) == 2 * MiB
    assert round_size(2100, c) == 2560  # 2048 + one 512 B division
    # only sizes above kMinBlockSize * divisions are rounded this way: 1200 <= 2048 keeps the 512 B rule
    assert round_size(1200, c) == 1536
    # per-interval list: [256:1, >:8] means 8 divisions from 512 MiB up, none below (1 = plain 512 B rounding)
    c = parse_alloc_conf("roundup_power2_divisions:[256:1,>:8]")
    assert round_size(300 * MiB + 1, c) == 300 * MiB + 512
    assert round_size(600 * MiB, c) == 640 * MiB  # 512 MiB + 2 * 64 MiB


# ------------------------------------------------------------------------------------- pools and segments


def test_small_pool_packs_2mib_segments():
    a = alloc()
    blocks = [a.malloc(512 * KiB) for _ in range(4)]
    assert a.reserved == 2 * MiB and a.segments == 1  # four 512 KiB blocks share one kSmallBuffer
    a.malloc(1)
    assert a.reserved == 4 * MiB and a.segments == 2
    assert all(b.small for b in blocks)


def test_small_large_boundary_is_1mib():
    a = alloc()
    assert a.malloc(1 * MiB).small  # <= kSmallSize
    b = a.malloc(1 * MiB + 1)
    assert not b.small and a.reserved == 2 * MiB + 20 * MiB  # > 1 MiB: a 20 MiB kLargeBuffer segment


def test_segment_sizes():
    c = parse_alloc_conf("")
    assert allocation_size(1 * MiB, c) == 2 * MiB
    assert allocation_size(5 * MiB, c) == 20 * MiB  # 1-10 MiB: kLargeBuffer
    assert allocation_size(10 * MiB - 512, c) == 20 * MiB
    assert allocation_size(10 * MiB, c) == 10 * MiB  # >= kMinLargeAlloc: rounded to kRoundLarge (2 MiB)
    assert allocation_size(11 * MiB + 1, c) == 12 * MiB
    assert allocation_size(5 * MiB, parse_alloc_conf("large_segment_size_mb:64")) == 64 * MiB


def test_mid_size_requests_share_a_20mib_segment():
    a = alloc()
    a.malloc(5 * MiB)
    a.malloc(6 * MiB)  # fits the 15 MiB left of the first 20 MiB segment
    assert a.reserved == 20 * MiB and a.segments == 1


# ------------------------------------------------------------------------------------------ best fit


def test_best_fit_takes_smallest_block_that_fits():
    a = alloc()
    x, y = a.malloc(16 * MiB), a.malloc(12 * MiB)  # two exact segments
    a.free(x)
    a.free(y)
    z = a.malloc(11 * MiB)  # the 12 MiB block, not the 16 MiB one; remainder 1 MiB is not > kSmallSize: no split
    assert z.size == 12 * MiB and a.reserved == 28 * MiB and a.allocated == 12 * MiB


def test_best_fit_ties_break_by_address():
    a = alloc()
    x, y = a.malloc(12 * MiB), a.malloc(12 * MiB)
    a.free(y)
    a.free(x)
    assert a.malloc(12 * MiB).addr == x.addr  # BlockComparatorSize: (stream, size, address)


# --------------------------------------------------------------------------------------------- splitting


def test_large_pool_splits_only_remainders_over_1mib():
    a = alloc()
    big = a.malloc(20 * MiB)
    a.free(big)
    b = a.malloc(18 * MiB + 512)  # remainder 2 MiB - 512 > kSmallSize: split
    assert b.size == 18 * MiB + 512 and a.allocated == b.size
    a.free(b)
    c = a.malloc(19 * MiB)  # remainder exactly 1 MiB is not > kSmallSize: the whole 20 MiB block
    assert c.size == 20 * MiB


def test_small_pool_splits_any_remainder_of_512():
    a = alloc()
    b = a.malloc(2 * MiB - 512)  # small pool? no: > 1 MiB goes large
    assert not b.small
    s = a.malloc(1 * MiB)
    t = a.malloc(1 * MiB - 512)
    assert s.small and t.small and a.reserved == 20 * MiB + 2 * MiB  # 512 B left in the small segment
    a.malloc(512)
    assert a.reserved == 22 * MiB  # the last 512 B of the 2 MiB segment


def test_max_split_size_oversize_blocks():
    a = alloc("max_split_size_mb:40")
    o = a.malloc(50 * MiB)
    a.free(o)
    small = a.malloc(30 * MiB)  # below max_split_size: never served by an oversize (>= 40 MiB) block
    assert small.addr != o.addr and a.reserved == 80 * MiB
    a.free(small)
    big = a.malloc(45 * MiB)  # oversize request: the 50 MiB block, whole (within max_non_split_rounding 20 MiB)
    assert big.addr == o.addr and big.size == 50 * MiB
    a.free(big)
    b = alloc("max_split_size_mb:40")
    o2 = b.malloc(70 * MiB)
    b.free(o2)
    assert b.malloc(45 * MiB).addr != o2.addr  # 70 >= 45 + 20: too wasteful, a new 46 MiB segment
    assert b.reserved == 70 * MiB + 46 * MiB


def test_max_non_split_rounding():
    a = alloc("max_split_size_mb:40,max_non_split_rounding_mb:60")
    o = a.malloc(70 * MiB)
    a.free(o)
    assert a.malloc(45 * MiB).addr == o.addr  # 70 < 45 + 60


# ------------------------------------------------------------------------------------------ coalescing


def test_free_coalesces_neighbours():
    a = alloc()
    x, y, z = a.malloc(5 * MiB), a.malloc(5 * MiB), a.malloc(5 * MiB)  # one 20 MiB segment, 5 MiB left
    a.free(y)
    a.free(x)  # merges with y: one 10 MiB free block at the segment's start
    w = a.malloc(9 * MiB)
    assert w.addr == x.addr and a.reserved == 20 * MiB
    a.free(w)
    a.free(z)  # everything free again: one unsplit 20 MiB block, which empty_cache returns
    a.empty_cache()
    assert a.reserved == 0


def test_split_segment_cannot_be_released():
    a = alloc()
    x, y = a.malloc(5 * MiB), a.malloc(5 * MiB)
    a.free(x)
    a.empty_cache()  # release_blocks frees only unsplit blocks
    assert a.reserved == 20 * MiB
    a.free(y)
    a.empty_cache()
    assert a.reserved == 0


# -------------------------------------------------------------------------------- free-and-retry, OOM


def test_release_cached_blocks_and_retry():
    a = alloc(capacity=40 * MiB)
    c = a.malloc(30 * MiB)
    a.free(c)
    b = a.malloc(32 * MiB)  # 30 cached + 32 > 40: release_cached_blocks frees the 30, then cudaMalloc succeeds
    assert a.reserved == 32 * MiB and a.num_alloc_retries == 1 and b.size == 32 * MiB
    with pytest.raises(AllocatorOutOfMemory):
        a.malloc(10 * MiB)  # 32 live + 10 > 40 even with an empty cache
    assert a.num_ooms == 1


def test_release_available_cached_blocks_frees_one_oversize_block():
    a = alloc("max_split_size_mb:40", capacity=120 * MiB)
    x, y = a.malloc(50 * MiB), a.malloc(60 * MiB)
    a.free(x)
    a.free(y)
    a.malloc(12 * MiB)  # oversize blocks do not serve it; 110 + 12 > 120; free the smallest oversize >= 40 MiB
    assert a.reserved == 60 * MiB + 12 * MiB and a.num_alloc_retries == 0
    assert a.largest_free_block() == 60 * MiB


def test_release_available_cached_blocks_frees_several_when_none_is_large_enough():
    a = alloc("max_split_size_mb:40", capacity=130 * MiB)
    x, y = a.malloc(42 * MiB), a.malloc(44 * MiB)
    a.free(x)
    a.free(y)
    a.malloc(80 * MiB)  # no cached block >= 80: free the largest oversize ones until their sum >= 80
    assert a.reserved == 80 * MiB and a.num_alloc_retries == 0


# ------------------------------------------------------------------------------------------- streams


def test_free_blocks_are_per_stream():
    a = alloc()
    x = a.malloc(12 * MiB, stream=1)
    a.free(x)
    y = a.malloc(12 * MiB, stream=0)  # the cached block belongs to stream 1
    assert y.addr != x.addr and a.reserved == 24 * MiB
    z = a.malloc(12 * MiB, stream=1)
    assert z.addr == x.addr


# -------------------------------------------------------------------------------- expandable segments


def test_expandable_segments_grow_by_20mib_pages():
    a = alloc("expandable_segments:True")
    a.malloc(5 * MiB)
    a.malloc(30 * MiB)  # one segment grows: 35 MiB needs two 20 MiB pages
    assert a.reserved == 40 * MiB
    b = alloc()
    b.malloc(5 * MiB)
    b.malloc(30 * MiB)
    assert b.reserved == 50 * MiB  # without: a 20 MiB segment and a 30 MiB one


def test_expandable_small_pool_uses_2mib_pages():
    a = alloc("expandable_segments:True")
    a.malloc(100 * KiB)
    assert a.reserved == 2 * MiB
    a.malloc(1 * MiB)
    assert a.reserved == 2 * MiB  # 100 KiB + 1 MiB share the first page
    a.malloc(1 * MiB)
    assert a.reserved == 4 * MiB  # the segment grows by one 2 MiB page, contiguous with the free tail


def test_expandable_segments_unmap_free_pages():
    a = alloc("expandable_segments:True")
    x, y = a.malloc(30 * MiB), a.malloc(30 * MiB)  # 60 MiB: three pages
    assert a.reserved == 60 * MiB
    a.free(y)
    a.empty_cache()  # the pages wholly inside the free block [30, 60) MiB: [40, 60) is unmapped
    assert a.reserved == 40 * MiB
    a.free(x)
    a.empty_cache()
    assert a.reserved == 0


def test_expandable_segments_reuse_unmapped_gap_at_lowest_address():
    a = alloc("expandable_segments:True", capacity=100 * MiB)
    x = a.malloc(40 * MiB)
    y = a.malloc(40 * MiB)
    a.free(x)
    a.empty_cache()  # unmaps [0, 40) MiB
    assert a.reserved == 40 * MiB
    z = a.malloc(40 * MiB)
    assert z.addr == x.addr and a.reserved == 80 * MiB  # the gap is mapped again, not a new range
    assert y.allocated


# ---------------------------------------------------------------------------------- garbage collection


def test_garbage_collection_threshold_frees_old_cached_blocks():
    conf = "garbage_collection_threshold:0.5,per_process_memory_fraction:1.0"
    a = alloc(conf, device_total=100 * MiB)
    x, y = a.malloc(30 * MiB), a.malloc(30 * MiB)
    a.free(x)
    a.free(y)
    a.malloc(40 * MiB)  # no block fits; 60 MiB reserved > 0.5 * 100: gc frees both (equal age >= the average)
    assert a.reserved == 40 * MiB
    b = alloc("per_process_memory_fraction:1.0", device_total=100 * MiB)
    x, y = b.malloc(30 * MiB), b.malloc(30 * MiB)
    b.free(x)
    b.free(y)
    b.malloc(40 * MiB)
    assert b.reserved == 100 * MiB  # without gc the cache stays


def test_gc_needs_a_memory_fraction():
    a = alloc("garbage_collection_threshold:0.5", device_total=100 * MiB)
    assert not a.gc_active  # garbage_collect_cached_blocks runs only when set_fraction


def test_memory_fraction_limits_reserved():
    a = alloc("per_process_memory_fraction:0.5", device_total=100 * MiB)
    a.malloc(40 * MiB)
    with pytest.raises(AllocatorOutOfMemory):
        a.malloc(12 * MiB)  # 40 + 12 > 50 allowed


# ------------------------------------------------------------------------------------------ conf parsing


def test_conf_parsing():
    c = parse_alloc_conf(" expandable_segments:True, max_split_size_mb:128,garbage_collection_threshold:0.6 ")
    assert c.expandable_segments and c.max_split_size == 128 * MiB and c.garbage_collection_threshold == 0.6
    assert c.max_non_split_rounding_size == 20 * MiB
    c = parse_alloc_conf("roundup_power2_divisions:[64:8,128:2,256:4,512:2,1024:4,>:1]")
    # the torch test (c10/test/core/AllocatorConfig_test.cpp): slot of 32 MiB and 64 MiB -> 8, 128 -> 2, ...
    assert [c.divisions_for(s * MiB) for s in (32, 64, 128, 256, 512, 1024, 2048, 8192)] == [8, 8, 2, 4, 2, 4, 1, 1]
    c = parse_alloc_conf("large_segment_size_mb:64")
    assert c.large_segment_size == 64 * MiB and c.max_non_split_rounding_size == 64 * MiB
    assert parse_alloc_conf("backend:native,release_lock_on_cudamalloc:True").expandable_segments is False


@pytest.mark.parametrize("bad", [
    "expandable_segments:true",  # ConfigTokenizer::toBool is case-sensitive
    "max_split_size_mb:10",  # must be >= 20 (large segment size)
    "garbage_collection_threshold:1.5",
    "roundup_power2_divisions:3",
    "roundup_power2_divisions:[100:2]",
    "no_such_key:1",
    "max_split_size_mb",
    "max_split_size_mb:abc",
    "expandable_segments:True,",
    "backend:cudaMallocAsync",
    "large_segment_size_mb:10",
])
def test_conf_rejects_what_torch_rejects(bad):
    with pytest.raises(MemplanError) as e:
        parse_alloc_conf(bad)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------- replay, property


def _stream(ops):
    return [(op, h, n, s, "forward", "") for op, h, n, s in ops]


def test_replay_reports_peak_fragmentation_and_oom():
    ops = [(ALLOC, 1, 5 * MiB, 0), (ALLOC, 2, 5 * MiB, 0), (FREE, 1, 0, 0), (ALLOC, 3, 12 * MiB, 0)]
    r = replay(_stream(ops))
    assert r.peak_reserved_bytes == 32 * MiB and r.peak_allocated_bytes == 17 * MiB
    assert r.fragmentation_bytes == 32 * MiB - 17 * MiB and r.largest_free_at_allocated_peak == 10 * MiB
    r = replay(_stream(ops), capacity=30 * MiB)
    assert r.oom is not None and r.oom.event == 3 and r.oom.requested_bytes == 12 * MiB


def test_replay_json_survives():
    r = replay(_stream([(ALLOC, 1, 3 * MiB, 0)]))
    assert json.loads(json.dumps(r.to_dict()))["peak_reserved_bytes"] == 20 * MiB


_CONFS = ["", "expandable_segments:True", "max_split_size_mb:64", "roundup_power2_divisions:4",
          "max_split_size_mb:32,roundup_power2_divisions:[16:2,>:4]",
          "garbage_collection_threshold:0.3,per_process_memory_fraction:1.0"]


@settings(max_examples=150, deadline=None)
@given(conf=st.sampled_from(_CONFS), seq=st.lists(
    st.tuples(st.booleans(), st.integers(0, 40), st.integers(1, 80 * MiB), st.integers(0, 1)), max_size=80))
def test_reserved_never_below_live_bytes(conf, seq):
    a = CachingAllocator(parse_alloc_conf(conf), device_total=64 * GiB)
    live = {}
    for is_alloc, h, n, s in seq:
        if is_alloc and h not in live:
            live[h] = a.malloc(n, s)
        elif not is_alloc and h in live:
            a.free(live.pop(h))
        requested = sum(b.requested for b in live.values())
        assert a.reserved >= a.allocated >= requested == a.requested
        assert a.allocated == sum(b.size for b in live.values())
        mapped = sum(b.size for b in a.blocks.values() if b.mapped)
        assert mapped == a.reserved  # every reserved byte is in exactly one block
    for b in list(live.values()):
        a.free(b)
    a.empty_cache()
    assert a.reserved == 0 and a.allocated == 0


# ---------------------------------------------------------------------------------------------- snapshots


def _snapshot():
    """A hand-made torch.cuda.memory._snapshot(): 5 MiB and 3 MiB allocated in one 20 MiB segment, then freed."""
    trace = [
        {"action": "segment_alloc", "addr": 1 << 30, "size": 20 * MiB, "stream": 0},
        {"action": "alloc", "addr": 1 << 30, "size": 5 * MiB, "stream": 0},
        {"action": "alloc", "addr": (1 << 30) + 5 * MiB, "size": 3 * MiB, "stream": 0},
        {"action": "free_requested", "addr": 1 << 30, "size": 5 * MiB, "stream": 0},
        {"action": "free_completed", "addr": 1 << 30, "size": 5 * MiB, "stream": 0},
        {"action": "alloc", "addr": 1 << 31, "size": 30 * MiB, "stream": 0},
        {"action": "segment_alloc", "addr": 1 << 31, "size": 30 * MiB, "stream": 0},
    ]
    segments = [
        {"device": 0, "address": 1 << 30, "total_size": 20 * MiB, "stream": 0, "segment_type": "large",
         "blocks": [{"size": 5 * MiB, "state": "inactive"}, {"size": 3 * MiB, "state": "active_allocated",
                                                              "requested_size": 3 * MiB},
                    {"size": 12 * MiB, "state": "inactive"}]},
        {"device": 0, "address": 1 << 31, "total_size": 30 * MiB, "stream": 0, "segment_type": "large",
         "blocks": [{"size": 30 * MiB, "state": "active_allocated", "requested_size": 30 * MiB}]},
    ]
    return {"segments": segments, "device_traces": [trace],
            "allocator_settings": {"PYTORCH_CUDA_ALLOC_CONF": "", "expandable_segments": False}}


def test_snapshot_json_replay(tmp_path):
    from memplan.allocator.snapshot import read_snapshot, stream_of

    path = tmp_path / "snap.json"
    path.write_text(json.dumps(_snapshot()))
    s = stream_of(read_snapshot(str(path)))
    assert s.measured_peak_reserved == 50 * MiB and s.preexisting == 0
    r = replay(s.stream)
    assert r.peak_reserved_bytes == 50 * MiB  # the model reserves what the real allocator did


def test_snapshot_pickle_replay_and_cli(tmp_path, capsys):
    from memplan.cli import main

    path = tmp_path / "snap.pickle"
    path.write_bytes(pickle.dumps(_snapshot()))  # what torch.cuda.memory._dump_snapshot writes: a plain dict
    assert main(["replay", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["peak_reserved_bytes"] == 50 * MiB and out["measured_peak_reserved_bytes"] == 50 * MiB
    assert out["reserved_error"] == 0


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.parametrize("payload", [_Evil(), {"segments": [], "x": _Evil()}])
def test_malicious_pickle_refused(tmp_path, capsys, payload):
    from memplan.cli import main

    path = tmp_path / "evil.pickle"
    path.write_bytes(pickle.dumps(payload))
    assert main(["replay", str(path)]) == 2
    err = capsys.readouterr().err
    assert "refused to load posix.system" in err and len(err.strip().splitlines()) == 1


def test_snapshot_without_trace_is_one_line(tmp_path, capsys):
    from memplan.cli import main

    path = tmp_path / "snap.json"
    path.write_text(json.dumps({"segments": [], "device_traces": [[]]}))
    assert main(["replay", str(path)]) == 2
    assert "_record_memory_history" in capsys.readouterr().err
