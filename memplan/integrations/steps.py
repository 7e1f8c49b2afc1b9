"""The per-step shapes a trainer builds from a dataset's token lengths (memplan/integrations/dataset.py), each
step's memory, the peak step, and the longest cutoff that fits.

Steps (what transformers' Trainer and its collators build, transformers 5.24 / TRL 1.16 / axolotl 0.19):
- truncation at the maximum length (the config's sequence_len / max_length / cutoff_len, or --seq-len); axolotl drops
  rows longer than sequence_len by default (excess_length_strategy: drop);
- batches of batch_size rows in the sampler's order: shuffled (RandomSampler; a seeded permutation stands in for
  torch's generator), grouped by length (trainer_pt_utils.get_length_grouped_indices: megabatches of 50 batches sorted
  by length, the longest batch moved first), or file order; the last batch may be short (dataloader_drop_last off);
- each batch padded to its longest row (DataCollatorWithPadding / DataCollatorForLanguageModeling), rounded up to
  pad_to_multiple_of; or to the maximum length (axolotl pad_to_sequence_len);
- packing: rows (truncated) packed into sequences of the maximum length (best-fit decreasing, as TRL's BFD; axolotl's
  multipack bin packing is a first-fit variant), batch_size sequences per step: every step but the last is full.
A step's memory is memplan's estimate at its (rows, padded length). With padding to the longest row the peak step is
the batch holding the longest row whatever the order; the order decides when it comes and how many steps exceed a
budget.
"""
from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from memplan.errors import MemplanError

if TYPE_CHECKING:
    from memplan.integrations.dataset import Lengths

ORDERS = ("shuffled", "group_by_length", "sequential")
PERCENTILES = (50, 90, 95, 99)


@dataclass
class Steps:
    """The per-step shapes of one epoch: rows and padded tokens per row, in training order."""

    rows: list  # numpy int arrays
    seq: object
    order: str
    packing: bool
    truncated_rows: int
    truncated_tokens: int
    dropped_rows: int
    total_tokens: int
    padded_tokens: int


def steps(lengths: array, batch_size: int, max_length: int | None, *, packing: bool = False,
          order: str = "shuffled", too_long: str = "truncate", pad_to_max: bool = False,
          pad_to_multiple_of: int | None = None, seed: int = 42) -> Steps:
    import numpy as np

    if order not in ORDERS:
        raise MemplanError(f"--order {order!r}: choose one of {', '.join(ORDERS)}")
    n = np.frombuffer(lengths, dtype=np.uint32).astype(np.int64)
    truncated_rows = truncated_tokens = dropped = 0
    if max_length:
        over = n > max_length
        if too_long == "drop":
            dropped = int(over.sum())
            n = n[~over]
        else:
            truncated_rows = int(over.sum())
            truncated_tokens = int((n[over] - max_length).sum())
            n = np.minimum(n, max_length)
    if not len(n):
        raise MemplanError(f"every row is longer than the maximum length {max_length} and is dropped")
    total = int(n.sum())
    if packing:
        if not max_length:
            raise MemplanError("packing needs a maximum length (--seq-len or the config's)")
        bins = _pack(np.sort(n)[::-1], max_length)
        per_step = np.full((bins + batch_size - 1) // batch_size, batch_size, dtype=np.int64)
        per_step[-1] = bins - batch_size * (len(per_step) - 1)
        seq = np.full(len(per_step), max_length, dtype=np.int64)
        return Steps(per_step, seq, "packed", True, truncated_rows, truncated_tokens, dropped, total,
                     int((per_step * seq).sum()))
    rng = np.random.default_rng(seed)
    if order == "shuffled":
        idx = rng.permutation(len(n))
    elif order == "group_by_length":
        idx = _length_grouped(n, batch_size, rng)
    else:
        idx = np.arange(len(n))
    ordered = n[idx]
    count = (len(ordered) + batch_size - 1) // batch_size
    padded = np.zeros(count * batch_size, dtype=np.int64)
    padded[:len(ordered)] = ordered
    seq = padded.reshape(count, batch_size).max(axis=1)
    rows = np.full(count, batch_size, dtype=np.int64)
    rows[-1] = len(ordered) - batch_size * (count - 1)
    if pad_to_max and max_length:
        seq = np.full(count, max_length, dtype=np.int64)
    elif pad_to_multiple_of:
        seq = -(-seq // pad_to_multiple_of) * pad_to_multiple_of
    return Steps(rows, seq, order, False, truncated_rows, truncated_tokens, dropped, total, int((rows * seq).sum()))


def _length_grouped(n, batch_size: int, rng):
    """transformers.trainer_pt_utils.get_length_grouped_indices (v5.24), with numpy's generator for torch's."""
    import numpy as np

    mult = min(len(n) // (batch_size * 4), 50) or 1
    idx = rng.permutation(len(n))
    size = mult * batch_size
    megas = [idx[i:i + size] for i in range(0, len(n), size)]
    megas = [m[np.argsort(-n[m], kind="stable")] for m in megas]
    maxima = [n[m[0]] for m in megas]
    k = int(np.argmax(maxima))
    megas[0][0], megas[k][0] = megas[k][0], megas[0][0]
    return np.concatenate(megas)


def _pack(desc, capacity: int) -> int:
    """Best-fit decreasing bin packing (TRL's "bfd" strategy; axolotl's multipack is a first-fit variant of the
    same): lengths sorted longest first, each into the open bin with the least room that holds it. Returns the
    number of bins. Open bins are kept as counts per free capacity (at most capacity + 1 distinct values), so
    each row costs a bisect over those values."""
    import bisect

    count = [0] * (capacity + 1)  # open bins by free capacity
    keys: list[int] = []  # free capacities with count > 0, sorted
    bins = 0
    for length in desc.tolist():
        i = bisect.bisect_left(keys, length)
        if i < len(keys):
            room = keys[i]
            count[room] -= 1
            if not count[room]:
                keys.pop(i)
        else:
            room = capacity
            bins += 1
        left = room - length
        if left > 0:
            if not count[left]:
                bisect.insort(keys, left)
            count[left] += 1
    return bins


# ------------------------------------------------------------------------------------------------ the plan

@dataclass
class DatasetPlan:
    path: str
    tokenizer: str
    format: str
    rows: int
    percentiles: dict  # "p50".."max" -> tokens (before truncation)
    mean: float
    read_seconds: float
    order: str
    packing: bool
    max_length: int | None
    batch_size: int
    steps: int
    truncated_rows: int
    truncated_tokens: int
    dropped_rows: int
    total_tokens: int
    padded_tokens: int
    peak_step: int  # 1-based, in training order
    peak_rows: int
    peak_seq_len: int
    peak_bytes: int
    peak_device_total_bytes: int
    budget_bytes: int | None = None
    steps_over_budget: int | None = None
    first_step_over_budget: int | None = None
    seq_len_histogram: list = field(default_factory=list)  # (padded length, steps) for the 10 longest shapes
    counted_by: str = ""  # how the token lengths were counted (tokencount.py)
    notes: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}


def plan(model, spec, lengths: Lengths, *, path: str, tokenizer: str, packing: bool = False,
         order: str = "shuffled", too_long: str = "truncate", pad_to_max: bool = False,
         pad_to_multiple_of: int | None = None, budget_bytes: int | None = None, overheads=None,
         seed: int = 42) -> tuple[DatasetPlan, object]:
    """The dataset's steps under `spec` (its seq_len is the maximum length), each step's estimate, the peak step
    and the steps over `budget_bytes` (judged on the device total). Returns (plan, the TrainSpec of the peak step)."""
    import numpy as np

    from memplan.estimate import estimate

    st = steps(lengths.lengths, spec.batch_size, spec.seq_len, packing=packing, order=order, too_long=too_long,
               pad_to_max=pad_to_max, pad_to_multiple_of=pad_to_multiple_of, seed=seed)
    memo: dict = {}

    def est(rows: int, seq: int):
        key = (rows, seq)
        if key not in memo:
            memo[key] = estimate(model, spec.with_(batch_size=rows, seq_len=seq), overheads)
        return memo[key]

    pairs = np.stack([st.rows, st.seq], axis=1)
    uniq, inverse = np.unique(pairs, axis=0, return_inverse=True)
    device = np.array([est(int(r), int(s)).device_total_bytes for r, s in uniq], dtype=np.int64)[inverse.ravel()]
    peak_i = int(np.argmax(device))
    peak = est(int(st.rows[peak_i]), int(st.seq[peak_i]))
    raw = np.frombuffer(lengths.lengths, dtype=np.uint32)
    pct = {f"p{p}": int(np.percentile(raw, p, method="higher")) for p in PERCENTILES}
    pct["max"] = int(raw.max())
    seqs, counts = np.unique(st.seq, return_counts=True)
    hist = [(int(s), int(c)) for s, c in zip(seqs[::-1][:10], counts[::-1][:10])]
    p = DatasetPlan(
        path=path, tokenizer=tokenizer, format=lengths.format, rows=len(raw), percentiles=pct,
        mean=round(float(raw.mean()), 1), read_seconds=round(lengths.seconds, 3), order=st.order, packing=packing,
        max_length=spec.seq_len, batch_size=spec.batch_size, steps=len(st.seq), truncated_rows=st.truncated_rows,
        truncated_tokens=st.truncated_tokens, dropped_rows=st.dropped_rows, total_tokens=st.total_tokens,
        padded_tokens=st.padded_tokens, peak_step=peak_i + 1, peak_rows=int(st.rows[peak_i]),
        peak_seq_len=int(st.seq[peak_i]), peak_bytes=peak.peak_bytes, peak_device_total_bytes=peak.device_total_bytes,
        seq_len_histogram=hist, counted_by=getattr(lengths, "counted_by", ""))
    p._lengths = lengths
    p._steps_seq = st.seq
    if lengths.rows_skipped:
        p.notes.append(f"{lengths.rows_skipped} rows without text were skipped")
    if budget_bytes is not None:
        over = device > budget_bytes
        p.budget_bytes = budget_bytes
        p.steps_over_budget = int(over.sum())
        p.first_step_over_budget = int(np.argmax(over)) + 1 if over.any() else None
    return p, spec.with_(batch_size=p.peak_rows, seq_len=p.peak_seq_len)


def lengths_of(p: DatasetPlan | None) -> Lengths | None:
    return getattr(p, "_lengths", None) if p is not None else None


def largest_cutoff(model, spec, lengths: Lengths, usable_bytes: int, overheads=None, step: int = 64):
    """The longest maximum length (a multiple of `step`) whose longest step fits `usable_bytes` at the batch size,
    with the rows and tokens that cutoff truncates. None when not even `step` tokens fit."""
    import numpy as np

    from memplan.plan import Searcher, max_seq_len

    s = Searcher(model, usable_bytes, overheads)
    raw = np.frombuffer(lengths.lengths, dtype=np.uint32)
    cut = max_seq_len(s, spec.with_(seq_len=step))
    if cut is None:
        return None
    longest = int(raw.max())
    if cut >= longest:
        return {"max_length": longest, "truncated_rows": 0, "truncated_share": 0.0, "tokens_lost_share": 0.0,
                "note": "the longest row fits untruncated"}
    over = raw > cut
    lost = int((raw[over].astype(np.int64) - cut).sum())
    return {"max_length": int(cut), "truncated_rows": int(over.sum()), "truncated_share": float(over.mean()),
            "tokens_lost_share": lost / float(raw.sum())}


