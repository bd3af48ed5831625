"""Where each item of a set of variable-length sequences sits in a flat list of fixed-size chunks.

The chunked scan (`varlen/chunk.py`) works on chunks of C slots. A *sequence* is a run of items (tokens, or
(token, memory) pairs) that share one recurrent state: a batch row, one memory of one row in Mixture-of-
Memories, one document in Memory Caching. Each sequence is padded up to a multiple of C, so no chunk holds two
sequences, and the chunks are laid out sequence after sequence:

    sequence 0: chunks 0 .. n_0 - 1,   sequence 1: chunks n_0 .. n_0 + n_1 - 1,   ...

Items carry a document index; a document boundary inside a sequence resets the state, exactly as `doc_ids`
do for the dense paths (`gated/naive.py`). Padding slots join their sequence's last document and are given
identity inputs by the scan (zero key, value and log-decay), so they change nothing.

`steps[j]` lists the j-th chunk of every sequence that has one: the scan carries all sequences' states
forward together, one chunk each per step, so it runs max_j n_j steps, not sum_j n_j.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class VarlenLayout(NamedTuple):
    """Nc chunks of C slots holding P items of n_seq sequences (all index tensors int64, on the items' device)."""

    chunk: int
    """C, the slots per chunk."""
    n_seq: int
    """Number of sequences (some may be empty: they have no chunk)."""
    slot: torch.Tensor
    """(P,) flat slot (in [0, Nc * C)) of each item."""
    slot_doc: torch.Tensor
    """(Nc, C) document index of every slot; padding slots carry their sequence's last document."""
    doc_in: torch.Tensor
    """(Nc,) document of the state entering each chunk (the sequence's first document index `doc0` for its
    first chunk, else the previous chunk's last slot's)."""
    chunk_seq: torch.Tensor
    """(Nc,) sequence of each chunk."""
    seq_first_chunk: torch.Tensor
    """(n_seq,) index of each sequence's first chunk (where it would be, for an empty sequence)."""
    seq_n_chunks: torch.Tensor
    """(n_seq,) chunks of each sequence."""
    state_doc: torch.Tensor
    """(n_seq,) document of each sequence's state after its last chunk (`doc0` for an empty sequence)."""
    steps: list[torch.Tensor]
    """steps[j] (n_j,): the j-th chunk of every sequence that has one, in sequence order."""

    @property
    def n_chunks(self) -> int:
        return self.slot_doc.shape[0]


def _steps(first: list[int], n_chunks: list[int], device: torch.device) -> list[torch.Tensor]:
    """steps[j] = [first[s] + j for every sequence s with n_chunks[s] > j], computed on the host."""
    if not n_chunks:
        return []
    first_t, n_t = torch.tensor(first, dtype=torch.long), torch.tensor(n_chunks, dtype=torch.long)
    return [(first_t[n_t > j] + j).to(device) for j in range(max(n_chunks))]


def build_layout(
    seq: torch.Tensor,
    doc: torch.Tensor,
    n_seq: int,
    chunk: int,
    doc0: torch.Tensor | None = None,
    align_documents: bool = False,
    align: torch.Tensor | None = None,
) -> VarlenLayout:
    """Layout of P items with sequence ids seq (P,) int64, nondecreasing in [0, n_seq), in time order within
    each sequence, and document indices doc (P,) int64 (nondecreasing within a sequence). doc0 (n_seq,): the
    document the initial state of each sequence belongs to (default 0: the first document of a row).
    align_documents: every document of a sequence starts on a chunk boundary (padding the previous one), so that a
    document's slots, hence its arithmetic, do not depend on how many items earlier documents had.
    align (P,) int64: a chunk run also starts wherever it changes within a sequence (padding the previous run),
    WITHOUT resetting the state (only documents reset it): the state entering such a chunk (`chunk_states`) is the
    state after the sequence's previous item (Memory Caching over Mixture-of-Memories reads its routed memories'
    cached states there).

    Reads the per-sequence chunk counts on the host once (one device synchronisation).
    """
    device = seq.device
    C, P = chunk, seq.numel()
    doc = doc.long()
    doc0 = torch.zeros(n_seq, dtype=torch.long, device=device) if doc0 is None else doc0.long()
    # Runs of items laid out from a chunk boundary: sequences, or (sequence, document) pairs.
    new_run = torch.ones(P, dtype=torch.bool, device=device)
    new_run[1:] = seq[1:] != seq[:-1]
    if align_documents:
        new_run[1:] |= doc[1:] != doc[:-1]
    if align is not None:
        new_run[1:] |= align[1:] != align[:-1]
    run = torch.cumsum(new_run.long(), 0) - 1
    run_start = new_run.nonzero(as_tuple=True)[0]  # (n_runs,) first item of each run
    run_count = torch.diff(torch.cat([run_start, torch.tensor([P], device=device)]))
    run_chunks = (run_count + C - 1) // C
    run_first = torch.cumsum(run_chunks, 0) - run_chunks  # runs are in sequence order: chunks follow one another
    slot = run_first[run] * C + torch.arange(P, device=device) - run_start[run]
    n_ch = torch.zeros(n_seq, dtype=torch.long, device=device).index_add_(0, seq[run_start], run_chunks)
    first = torch.cumsum(n_ch, 0) - n_ch
    n_ch_host = n_ch.tolist()
    Nc = int(sum(n_ch_host))
    chunk_seq = torch.repeat_interleave(torch.arange(n_seq, device=device), n_ch, output_size=Nc)
    run_last_doc = doc[run_start + run_count - 1]  # padding slots join the run's last document
    chunk_run_doc = torch.repeat_interleave(run_last_doc, run_chunks, output_size=Nc)
    slot_doc = chunk_run_doc.repeat_interleave(C).index_put((slot,), doc).view(Nc, C)
    counts = torch.bincount(seq, minlength=n_seq) if P else torch.zeros(n_seq, dtype=torch.long, device=device)
    last_item = (torch.cumsum(counts, 0) - 1).clamp(min=0)
    seq_last_doc = torch.where(counts > 0, doc[last_item] if P else doc0, doc0)
    step = torch.arange(Nc, device=device) - first[chunk_seq]
    prev_last = slot_doc.reshape(-1)[(torch.arange(Nc, device=device) * C - 1).clamp(min=0)]
    doc_in = torch.where(step == 0, doc0[chunk_seq], prev_last)
    return VarlenLayout(
        chunk=C, n_seq=n_seq, slot=slot, slot_doc=slot_doc, doc_in=doc_in, chunk_seq=chunk_seq,
        seq_first_chunk=first, seq_n_chunks=n_ch, state_doc=seq_last_doc,
        steps=_steps(first.tolist(), n_ch_host, device),
    )  # fmt: skip


def dense_layout(doc: torch.Tensor, chunk: int) -> VarlenLayout:
    """Layout of a (B, T) batch: each row one sequence of T items (row-major), doc (B, T) its document index
    (`gated.naive.document_index`). No device synchronisation."""
    B, T = doc.shape
    device = doc.device
    C = min(chunk, T)
    N = -(-T // C)
    pad = N * C - T
    slot_doc = torch.cat([doc, doc[:, -1:].expand(B, pad)], 1) if pad else doc
    slot_doc = slot_doc.long().reshape(B * N, C)
    slot = (torch.arange(B, device=device)[:, None] * (N * C) + torch.arange(T, device=device)).reshape(-1)
    chunk_seq = torch.arange(B, device=device).repeat_interleave(N)
    step = torch.arange(N, device=device).repeat(B)
    prev_last = slot_doc.reshape(-1)[(torch.arange(B * N, device=device) * C - 1).clamp(min=0)]
    doc_in = torch.where(step == 0, torch.zeros_like(prev_last), prev_last)
    first = torch.arange(B, device=device) * N
    return VarlenLayout(
        chunk=C, n_seq=B, slot=slot, slot_doc=slot_doc, doc_in=doc_in, chunk_seq=chunk_seq,
        seq_first_chunk=first, seq_n_chunks=torch.full((B,), N, device=device), state_doc=doc[:, -1].long(),
        steps=[first + j for j in range(N)],
    )  # fmt: skip


def to_chunks(x: torch.Tensor, layout: VarlenLayout) -> torch.Tensor:
    """Items x (P, H, *D) -> (Nc, H, C, *D), zero at padding slots."""
    P, H, *D = x.shape
    out = x.new_zeros(layout.n_chunks * layout.chunk, H, *D).index_copy(0, layout.slot, x)
    return out.view(layout.n_chunks, layout.chunk, H, *D).transpose(1, 2)


def from_chunks(y: torch.Tensor, layout: VarlenLayout) -> torch.Tensor:
    """(Nc, H, C, *D) -> the items' values (P, H, *D)."""
    Nc, H, C, *D = y.shape
    return y.transpose(1, 2).reshape(Nc * C, H, *D).index_select(0, layout.slot)


def segment_cumsum(x: torch.Tensor, layout: VarlenLayout) -> torch.Tensor:
    """Inclusive cumulative sum of items x (P, H, *D) within each sequence of the layout (documents inside a
    sequence are not reset). Each sequence's sums involve its own items only (no global cumsum then subtraction),
    so they do not change, not even in the last bit, when other sequences do."""
    xc = to_chunks(x, layout)  # (Nc, H, C, *D)
    inner = xc.cumsum(2)
    total = inner[:, :, -1]
    carry = total.new_zeros(layout.n_seq, *total.shape[1:])
    if not layout.steps:
        return x.new_zeros(x.shape)
    order = torch.cat(layout.steps)  # step order, sliced per step (see varlen_chunk_scan)
    sizes = [len(idx) for idx in layout.steps]
    parts = []
    for seqs, tot in zip(layout.chunk_seq[order].split(sizes), total[order].split(sizes)):
        parts.append(carry[seqs])
        carry = carry.index_copy(0, seqs, carry[seqs] + tot)
    before = torch.cat(parts)[torch.argsort(order)]  # (Nc, H, *D) sum of the earlier chunks
    return from_chunks(inner + before.unsqueeze(2), layout)
