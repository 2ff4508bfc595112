"""Context parallelism over ``torch.distributed``: selective attention and selection on a sharded cache.

Every rank of a process group holds a contiguous range of every sequence's kv positions (a
:class:`ShardLayout`, the same object on every rank). ``indices`` are *global* positions and are the
same tensor on every rank; each rank

1. keeps the candidates it owns and renumbers them to its local rows (-1 for the others, which are
   therefore never read), applying ``causal`` with the *global* query position;
2. runs the public op ``attention.selective_attention`` on its shard (no sink, ``return_lse=True``);
3. combines the partials with one collective pattern and ``merge_attention_states`` (docs/spec.md
   section 6), which applies the sink once.

Every rank returns the same full ``out``/``lse`` as a single-device call on the whole cache.
``select`` does the same for the lightning-indexer selection: each rank scores its shard, keeps its
local top-k as packed (score, global position) keys, and one all-gather + top-k gives indices
identical to ``attention.select`` on the whole cache. docs/distributed.md explains the choices
(communication pattern by bytes, blocks across shard boundaries, error agreement).

Only torch.distributed collectives are used (gloo on CPU, NCCL on CUDA, HCCL through torch_npu);
nothing here reads device data on the host except the opt-in cross-rank input check (``check_ranks``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor

import python_ref
from python_ref.selection import best_positions, pack_keys, reduce_blocks

from . import inputs as _inputs
from .api import selective_attention as _selective_attention
from .merge import merge_attention_states
from .selection import lightning_indexer as _lightning_indexer
from .selection import validate_selection

__all__ = ["ShardLayout", "selective_attention", "select", "combine_bytes", "choose_combine"]

COMBINES = ("auto", "all_gather", "reduce_scatter")

# Smaller than every packed key (python_ref.selection.pack_keys): an empty candidate slot.
_NO_KEY = -(1 << 63)


# ----------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class ShardLayout:
    """Which kv positions each rank holds: rank r holds positions ``[bounds[b][r], bounds[b][r+1])`` of
    sequence b, so ``bounds[b][0] == 0`` and ``bounds[b][-1]`` is the sequence's global length.

    Host-side integers, identical on every rank (like ``indices``): every size and offset derived
    from it is known without reading device data. A rank's shard of sequence b is stored as its own
    sequence b: back to back in a contiguous shard (local ``cu_seqlens_k`` follows from the layout),
    or through the rank's own ``block_table`` row b in a paged shard (local ``seqlens_k`` follows).
    """

    bounds: Tuple[Tuple[int, ...], ...]
    _cache: Dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        b = self.bounds
        if isinstance(b, Tensor):
            b = b.tolist()
        if not isinstance(b, (list, tuple)) or len(b) == 0:
            raise ValueError(f"shard bounds must be a non-empty sequence, got {b!r}")
        if not any(isinstance(x, (list, tuple)) for x in b):
            b = [b]  # one sequence: a flat list of bounds
        rows = []
        for i, row in enumerate(b):
            if not isinstance(row, (list, tuple)) or len(row) < 2:
                raise ValueError(f"shard bounds[{i}] must hold world_size + 1 >= 2 ints, got {row!r}")
            if any(isinstance(x, bool) or not isinstance(x, int) for x in row):
                raise TypeError(f"shard bounds[{i}] must hold ints, got {row!r}")
            if row[0] != 0 or any(row[j] > row[j + 1] for j in range(len(row) - 1)):
                raise ValueError(f"shard bounds[{i}] must start at 0 and be non-decreasing, got {list(row)}")
            if len(row) != len(b[0]):
                raise ValueError(f"shard bounds[{i}] must have {len(b[0])} entries like bounds[0], got {len(row)}")
            rows.append(tuple(row))
        object.__setattr__(self, "bounds", tuple(rows))

    # ---- construction ----
    @classmethod
    def from_lengths(cls, lengths) -> "ShardLayout":
        """Per-rank shard lengths: ``[world]`` (one sequence) or ``[B][world]``."""
        if lengths and all(isinstance(x, int) for x in lengths):
            lengths = [lengths]
        out = []
        for row in lengths:
            acc = [0]
            for n in row:
                acc.append(acc[-1] + int(n))
            out.append(tuple(acc))
        return cls(tuple(out))

    @classmethod
    def even(cls, seqlens, world_size: int) -> "ShardLayout":
        """Each sequence cut into ``world_size`` near-equal contiguous ranges (the first ranks get the
        remainder). ``seqlens``: an int (one sequence) or a list of ints."""
        if isinstance(seqlens, int):
            seqlens = [seqlens]
        return cls.from_lengths([[L // world_size + (r < L % world_size) for r in range(world_size)]
                                 for L in seqlens])

    # ---- queries ----
    @property
    def world_size(self) -> int:
        return len(self.bounds[0]) - 1

    @property
    def num_seqs(self) -> int:
        return len(self.bounds)

    @property
    def seqlens(self) -> Tuple[int, ...]:
        return tuple(row[-1] for row in self.bounds)

    def starts(self, rank: int) -> Tuple[int, ...]:
        return tuple(row[rank] for row in self.bounds)

    def lengths(self, rank: int) -> Tuple[int, ...]:
        return tuple(row[rank + 1] - row[rank] for row in self.bounds)

    def boundary_blocks(self, block_size: int) -> List[List[int]]:
        """Per sequence, the blocks of ``block_size`` positions that two or more ranks share."""
        out = []
        for row in self.bounds:
            L = row[-1]
            ids = sorted({p // block_size for p in row[1:-1] if p % block_size and p < L})
            out.append(ids)
        return out

    def boundary_table(self, block_size: int, device) -> Tensor:
        """:meth:`boundary_blocks` as a [B, n_max] int64 tensor padded with -1 (built once per device)."""
        key = ("boundary", block_size, str(device))
        t = self._cache.get(key)
        if t is None:
            ids = self.boundary_blocks(block_size)
            n = max((len(x) for x in ids), default=0)
            t = torch.tensor([x + [-1] * (n - len(x)) for x in ids], device=device, dtype=torch.int64).view(len(ids), n)
            self._cache[key] = t
        return t

    def tensors(self, rank: int, device) -> Dict[str, Tensor]:
        """Small per-rank metadata tensors on ``device`` (built once, cached): global ``starts``/``ends``/
        ``seqlens`` [B] int64, local ``cu_seqlens_k`` [B+1] and ``seqlens_k`` [B] int32."""
        key = (rank, str(device))
        t = self._cache.get(key)
        if t is None:
            lens = self.lengths(rank)
            cu = [0]
            for n in lens:
                cu.append(cu[-1] + n)
            i64 = dict(device=device, dtype=torch.int64)
            i32 = dict(device=device, dtype=torch.int32)
            t = dict(starts=torch.tensor(self.starts(rank), **i64),
                     ends=torch.tensor([row[rank + 1] for row in self.bounds], **i64),
                     seqlens=torch.tensor(self.seqlens, **i64),
                     cu_seqlens_k=torch.tensor(cu, **i32), seqlens_k=torch.tensor(lens, **i32))
            self._cache[key] = t
        return t

    def shard(self, x: Tensor, rank: int, cu_seqlens_k: Optional[Tensor] = None) -> Tensor:
        """Rank ``rank``'s contiguous shard of a whole contiguous cache ``x`` [S, ...] (sequences laid
        out by ``cu_seqlens_k``, default one sequence): what that rank would hold. Host reads of
        ``cu_seqlens_k``: for setting up tests, benchmarks and examples."""
        ck = [0, x.shape[0]] if cu_seqlens_k is None else [int(c) for c in cu_seqlens_k.tolist()]
        parts = [x[ck[b] + row[rank]: ck[b] + row[rank + 1]] for b, row in enumerate(self.bounds)]
        return torch.cat(parts) if parts else x[:0]


# ----------------------------------------------------------------------------- cross-rank agreement
def _group_info(group) -> Tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("attention.distributed needs an initialised torch.distributed process group "
                           "(torch.distributed.init_process_group)")
    return dist.get_rank(group), dist.get_world_size(group)


def _default_check_ranks(device: torch.device) -> bool:
    # On the CPU the flag exchange is a tiny collective with no device sync; on a GPU/NPU reading the
    # flag back is a host sync per call, so it is opt-in there (ATTENTION_DEBUG=1 or check_ranks=True).
    return device.type == "cpu" or _inputs.debug_checks_enabled()


def _agree(error: Optional[BaseException], signature: Sequence[int], names: Sequence[str], device,
           group, what: str) -> None:
    """Raise on every rank when any rank's inputs failed validation or the ranks disagree on the
    shapes that size the collectives; one small all-gather of (ok, signature...) per call.

    The rank whose inputs were bad raises its own error; the others raise a ValueError naming it.
    """
    rank, world = _group_info(group)
    mine = torch.tensor([0 if error is None else 1] + [int(s) for s in signature], dtype=torch.int64)
    allv = torch.empty(world * mine.numel(), dtype=torch.int64, device=device)
    _all_gather(allv, mine.to(device), group)
    table = allv.view(world, -1).cpu().tolist()
    if error is not None:
        raise error
    bad = [r for r in range(world) if table[r][0]]
    if bad:
        raise ValueError(f"{what}: rank(s) {bad} rejected their inputs (the error is raised there); "
                         f"every rank raises instead of waiting in a collective")
    for j, name in enumerate(names):
        vals = [table[r][j + 1] for r in range(world)]
        if len(set(vals)) > 1:
            raise ValueError(f"{what}: ranks disagree on {name}: {vals} (rank by rank); it must be the same "
                             f"on every rank")


def _all_gather(out: Tensor, inp: Tensor, group) -> None:
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, inp, group=group)


def _reduce_scatter(out: Tensor, inp: Tensor, group) -> None:
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    fn(out, inp, op=dist.ReduceOp.SUM, group=group)


def _check_shard(shard, world: int, q_arg: tuple, kv_arg: tuple, cu_seqlens_q) -> int:
    """The layout rules both distributed ops share; returns the number of sequences B."""
    if not isinstance(shard, ShardLayout):
        raise TypeError(f"shard must be an attention.distributed.ShardLayout, got {type(shard).__name__}")
    if shard.world_size != world:
        raise ValueError(f"shard must describe the group's {world} ranks, got a layout for {shard.world_size}")
    _inputs.need_tensor(*q_arg)
    _inputs.need_tensor(*kv_arg)
    _inputs.need_tensor("cu_seqlens_q", cu_seqlens_q, optional=True)
    B = 1 if cu_seqlens_q is None else (cu_seqlens_q.shape[0] - 1 if cu_seqlens_q.dim() == 1 else shard.num_seqs)
    if shard.num_seqs != B:  # (a cu_seqlens_q of the wrong rank is the validator's error, later)
        raise ValueError(f"shard must describe {B} sequence(s) (cu_seqlens_q), got {shard.num_seqs}")
    return B


def _shard_error(e: BaseException, shard, rank: int, old: str, new: str) -> BaseException:
    """A validator error on a rank's local view, in the distributed call's own terms: a length rule means
    the shard tensor does not hold what the layout assigns; anything else names the shard argument."""
    if "cu_seqlens_k" in str(e) or "seqlens_k" in str(e):
        return type(e)(f"{new} does not hold the rows shard assigns to rank {rank} "
                       f"(lengths {list(shard.lengths(rank))}): {e}")
    return _rename(e, old, new)


def _rename(e: BaseException, old: str, new: str) -> BaseException:
    """The op's validator names the cache ``kv`` / ``k_idx``; here the argument is the rank's shard."""
    msg = re.sub(rf"\b{old}\b(?!_)", new, str(e))
    return type(e)(msg)


# ----------------------------------------------------------------------------- communication patterns
def _row_bytes(d_v: int, elem: int) -> int:
    # One gathered row: the float32 lse, then d_v output elements, padded to 4 bytes so every row's
    # lse stays float32-aligned (bfloat16 with an odd d_v).
    return 4 + -(-d_v * elem // 4) * 4


def combine_bytes(num_tokens: int, num_heads: int, d_v: int, dtype: torch.dtype, world_size: int) -> Dict[str, int]:
    """Bytes each rank receives per call for each combine pattern (ring collectives, as NCCL/gloo run them).

    all_gather:      (W-1) * T*H*row                  one all-gather of (lse, out) rows
    reduce_scatter:  2(W-1)/W * T*H*4                 all-reduce(max) of lse
                   + (W-1)/W * T*Hp*(Dv+1)*4          reduce-scatter of exp-weighted float32 sums, by heads
                   + (W-1)/W * T*Hp*row               all-gather of the merged heads
    (Hp: heads padded to a multiple of W; row = _row_bytes.)
    """
    W, T, H = world_size, num_tokens, num_heads
    row = _row_bytes(d_v, torch.empty((), dtype=dtype).element_size())
    if W <= 1:
        return {"all_gather": 0, "reduce_scatter": 0}
    hp = -(-H // W) * W
    ag = (W - 1) * T * H * row
    rs = (2 * (W - 1) * T * H * 4) // W + ((W - 1) * T * hp * (d_v + 1) * 4) // W + ((W - 1) * T * hp * row) // W
    return {"all_gather": ag, "reduce_scatter": rs}


def choose_combine(num_tokens: int, num_heads: int, d_v: int, dtype: torch.dtype, world_size: int) -> str:
    """The pattern with fewer bytes per rank; ties go to all_gather (one collective instead of three)."""
    b = combine_bytes(num_tokens, num_heads, d_v, dtype, world_size)
    return "reduce_scatter" if b["reduce_scatter"] < b["all_gather"] else "all_gather"


def _pack_rows(out: Tensor, lse: Tensor, row: int) -> Tensor:
    """[..., Dv] out + [...] lse -> [..., row] bytes: lse (float32) first, then out's raw bytes."""
    lead = tuple(lse.shape)
    buf = torch.empty(lead + (row,), dtype=torch.uint8, device=out.device)
    buf[..., :4] = lse.to(torch.float32).contiguous().unsqueeze(-1).view(torch.uint8)
    nb = out.shape[-1] * out.element_size()
    buf[..., 4:4 + nb] = out.contiguous().view(torch.uint8)
    return buf


def _unpack_rows(buf: Tensor, d_v: int, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """Inverse of _pack_rows, as strided views of ``buf`` (no copy)."""
    nb = d_v * torch.empty((), dtype=dtype).element_size()
    lse = buf[..., :4].view(torch.float32).squeeze(-1)
    out = buf[..., 4:4 + nb].view(dtype)
    return out, lse


def _combine_all_gather(out: Tensor, lse: Tensor, attn_sink, group, world: int, backend) -> Tuple[Tensor, Tensor]:
    T, H, Dv = out.shape
    row = _row_bytes(Dv, out.element_size())
    mine = _pack_rows(out, lse, row)
    allb = torch.empty((world * T, H, row), dtype=torch.uint8, device=out.device)
    _all_gather(allb, mine, group)
    outs, lses = _unpack_rows(allb.view(world, T, H, row), Dv, out.dtype)
    return merge_attention_states(outs, lses, attn_sink=attn_sink, backend=backend)


def _combine_reduce_scatter(out: Tensor, lse: Tensor, attn_sink, group, world: int, backend):
    """max-all-reduce of lse, then a float32 sum of exp(lse_r - max) * (out_r, 1) reduce-scattered by heads;
    each rank finishes its heads (one-part merge: applies the sink) and an all-gather assembles them."""
    T, H, Dv = out.shape
    rank = dist.get_rank(group)
    hc = -(-H // world)
    m = lse.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    # Shift by the global max so no weight overflows; all-empty rows shift by 0 (exp(-inf) = 0, not NaN).
    m_sub = torch.where(m == float("-inf"), 0.0, m)
    w = torch.exp(lse - m_sub)  # [T, H]
    # where, not multiply: an empty partial (lse -inf) carries out = 0 by the op's contract, but stay
    # exact even if it did not.
    part = torch.where((lse > float("-inf"))[..., None], out.to(torch.float32), 0.0) * w[..., None]
    send = torch.zeros((hc * world, T, Dv + 1), dtype=torch.float32, device=out.device)  # heads first
    send[:H, :, :Dv] = part.transpose(0, 1)
    send[:H, :, Dv] = w.transpose(0, 1)
    recv = torch.empty((hc, T, Dv + 1), dtype=torch.float32, device=out.device)
    _reduce_scatter(recv, send, group)
    h0 = rank * hc
    acc, wsum = recv[..., :Dv], recv[..., Dv]  # [hc, T, Dv], [hc, T]
    # The sum over ranks as one part (normalised out, its lse); a one-part merge applies the sink once
    # with the same code as the all-gather path. Heads past H (padding) are empty.
    nonempty = wsum > 0
    o1 = torch.where(nonempty[..., None], acc / torch.where(nonempty, wsum, 1.0)[..., None], 0.0)
    msh = m_sub.transpose(0, 1)
    pad_rows = torch.zeros((hc * world - H, T), dtype=torch.float32, device=out.device)
    msh = torch.cat([msh, pad_rows]) if hc * world > H else msh
    l1 = torch.where(wsum == 0, float("-inf"), msh[h0:h0 + hc] + torch.log(torch.where(wsum == 0, 1.0, wsum)))
    sink = None
    if attn_sink is not None:
        sink = torch.zeros(hc * world, dtype=torch.float32, device=out.device)
        sink[:H] = attn_sink
        sink = sink[h0:h0 + hc]
    mo, ml = merge_attention_states(o1.transpose(0, 1).unsqueeze(0), l1.transpose(0, 1).unsqueeze(0),
                                    attn_sink=sink, backend=backend)  # [T, hc, Dv], [T, hc]
    mo, ml = mo.transpose(0, 1), ml.transpose(0, 1)  # heads first: the all-gather concatenates heads
    row = _row_bytes(Dv, out.element_size())
    mine = _pack_rows(mo.to(out.dtype), ml, row)  # [hc, T, row]
    allb = torch.empty((world * hc, T, row), dtype=torch.uint8, device=out.device)
    _all_gather(allb, mine, group)
    o_all, l_all = _unpack_rows(allb[:H], Dv, out.dtype)  # [H, T, Dv], [H, T]
    return o_all.transpose(0, 1).contiguous(), l_all.transpose(0, 1).contiguous()


# ----------------------------------------------------------------------------- attention
def _remap(indices: Tensor, layout: ShardLayout, rank: int, block_size: int, causal: bool,
           cu_seqlens_q: Optional[Tensor]) -> Tensor:
    """Global indices [T, G, K] -> this rank's local positions [T, G, K * block_size] int32, -1 for every
    candidate that is not kept here (negative, past the sequence, owned by another rank, or after the
    query with ``causal``). Blocks are expanded to positions, so a block straddling two ranks is split
    between them exactly. Device ops only."""
    T = indices.shape[0]
    meta = layout.tensors(rank, indices.device)
    seq, L, q_pos, _ = python_ref.token_metadata(T, None, indices.device, cu_seqlens_q, None, meta["seqlens"])
    idx = indices.to(torch.int64)
    b = block_size
    # Range-check the index before multiplying: a huge int64 index must not overflow into range.
    ok = (idx >= 0) & (idx < ((L + b - 1) // b)[:, None, None])
    if b > 1:
        r = torch.arange(b, device=idx.device, dtype=torch.int64)
        pos = (torch.where(ok, idx, 0)[..., None] * b + r).flatten(2)
        ok = ok[..., None].expand(-1, -1, -1, b).flatten(2)
    else:
        pos = torch.where(ok, idx, 0)
    start = meta["starts"][seq][:, None, None]
    end = meta["ends"][seq][:, None, None]
    keep = ok & (pos >= start) & (pos < end) & (pos < L[:, None, None])
    if causal:
        keep = keep & (pos <= q_pos[:, None, None])
    return torch.where(keep, pos - start, -1).to(torch.int32)


def selective_attention(
    q: Tensor,
    kv_shard: Tensor,
    indices: Tensor,
    *,
    shard: ShardLayout,
    group=None,
    v: Optional[Tensor] = None,
    d_v: Optional[int] = None,
    q_rope: Optional[Tensor] = None,
    kv_rope: Optional[Tensor] = None,
    sm_scale: Optional[float] = None,
    block_size: int = 1,
    cu_seqlens_q: Optional[Tensor] = None,
    block_table: Optional[Tensor] = None,
    causal: bool = False,
    attn_sink: Optional[Tensor] = None,
    return_lse: bool = False,
    backend: Optional[str] = None,
    combine: str = "auto",
    check_ranks: Optional[bool] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Context-parallel ``attention.selective_attention``: same result on every rank as one device on the
    whole cache (docs/spec.md sections 1 and 6).

    q [T, H, Dqk], indices [T, Hkv or 1, K] (global positions, or global blocks with ``block_size``),
    ``cu_seqlens_q``, ``q_rope``, ``attn_sink``: the same tensors on every rank. kv_shard (and ``v``,
    ``kv_rope``): this rank's shard, contiguous [S_r, Hkv, D] with its sequences back to back, or paged
    [P, page, Hkv, D] with this rank's ``block_table`` [B, max_pages]. ``shard``: the layout (global
    ranges per rank). ``combine``: "auto" (fewer bytes, see :func:`combine_bytes`), "all_gather" or
    "reduce_scatter". ``check_ranks``: exchange a validation flag so that bad input on one rank raises
    on every rank (default: on for CPU tensors, else only with ATTENTION_DEBUG=1: it reads a flag back
    to the host).
    """
    rank, world = _group_info(group)
    error = None
    try:
        _check_shard(shard, world, ("q", q), ("kv_shard", kv_shard), cu_seqlens_q)
        if combine not in COMBINES:
            raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")
        paged = kv_shard.dim() == 4
        meta = shard.tensors(rank, q.device)
        try:  # the op's own rules, on the rank's local view, before any collective
            inp = _inputs.validate(
                q, kv_shard, indices, v=v, d_v=d_v, q_rope=q_rope, kv_rope=kv_rope, sm_scale=sm_scale,
                block_size=block_size, cu_seqlens_q=cu_seqlens_q,
                cu_seqlens_k=None if paged else meta["cu_seqlens_k"], block_table=block_table,
                seqlens_k=meta["seqlens_k"] if paged else None, causal=causal, attn_sink=attn_sink, backend=backend)
        except (ValueError, TypeError) as e:
            raise _shard_error(e, shard, rank, "kv", "kv_shard") from None
    except (ValueError, TypeError) as e:
        error = e
    if check_ranks is None:
        check_ranks = _default_check_ranks(q.device if isinstance(q, Tensor) else torch.device("cpu"))
    if check_ranks and world > 1:
        sig = (0, 0, 0, 0) if error is not None else (q.shape[0], q.shape[1], inp.d_v,
                                                     _inputs.FLOAT_DTYPES.index(q.dtype))
        _agree(error, sig, ("T", "H", "Dv", "dtype"), q.device if isinstance(q, Tensor) else "cpu", group,
               "attention.distributed.selective_attention")
    elif error is not None:
        raise error

    local_idx = _remap(inp.indices, shard, rank, inp.block_size, inp.causal, cu_seqlens_q)
    paged = inp.paged
    out, lse = _selective_attention(
        q, kv_shard, local_idx, v=v, d_v=d_v, q_rope=q_rope, kv_rope=kv_rope, sm_scale=inp.sm_scale,
        block_size=1, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=None if paged else meta["cu_seqlens_k"],
        block_table=block_table, seqlens_k=meta["seqlens_k"] if paged else None, causal=False,
        return_lse=True, backend=backend)
    if world == 1:
        out, lse = merge_attention_states(out.unsqueeze(0), lse.unsqueeze(0), attn_sink=inp.attn_sink)
    else:
        pattern = combine if combine != "auto" else choose_combine(q.shape[0], q.shape[1], inp.d_v, q.dtype, world)
        run = _combine_all_gather if pattern == "all_gather" else _combine_reduce_scatter
        out, lse = run(out, lse, inp.attn_sink, group, world, None)
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------- selection
@torch.no_grad()
def select(
    q_idx: Tensor,
    k_idx_shard: Tensor,
    weights: Tensor,
    k: int,
    *,
    shard: ShardLayout,
    group=None,
    scale: Optional[float] = None,
    cu_seqlens_q: Optional[Tensor] = None,
    block_table: Optional[Tensor] = None,
    causal: bool = True,
    block_size: int = 1,
    block_reduce: str = "max",
    backend: Optional[str] = None,
    check_ranks: Optional[bool] = None,
) -> Tensor:
    """Context-parallel ``attention.select``: [T, 1, k] int32 *global* positions (or blocks), identical on
    every rank to ``attention.select`` on the whole cache.

    q_idx [T, Hi, Di], weights [T, Hi], ``cu_seqlens_q``: the same on every rank; k_idx_shard: this rank's
    shard, [S_r, Di] contiguous or [P, page, Di] paged with this rank's ``block_table``. Each rank scores
    its positions (``lightning_indexer``, causal on the global query position), keeps its local top-k
    as packed (score, global id) keys, and one all-gather + top-k picks the global k in the contract's
    order (descending score, ties to the lower position). A block that straddles ranks is scored from
    its positions' scores gathered from every rank holding one, with the same reduction as one device.
    """
    rank, world = _group_info(group)
    inp, meta, local_w = _checked_select_inputs(
        q_idx, k_idx_shard, weights, k, shard, group, rank, world, check_ranks, scale=scale,
        cu_seqlens_q=cu_seqlens_q, block_table=block_table, causal=causal, block_size=block_size,
        block_reduce=block_reduce, backend=backend)
    paged = k_idx_shard.dim() == 3
    # 1. This rank's position scores, [T, local_w], -inf past each local length.
    scores = _lightning_indexer(q_idx, k_idx_shard, weights, scale=scale, cu_seqlens_q=cu_seqlens_q,
                                cu_seqlens_k=None if paged else meta["cu_seqlens_k"], block_table=block_table,
                                seqlens_k=meta["seqlens_k"] if paged else None, max_seqlen_k=local_w,
                                causal=False, backend=backend)
    # 2. Block scores in a frame aligned on global blocks.
    seq, _, q_pos, _ = python_ref.token_metadata(q_idx.shape[0], None, q_idx.device, cu_seqlens_q, None,
                                                 meta["seqlens"])
    fs, blk, gid, base = _block_frame(scores, inp, shard, rank, meta["starts"][seq], q_pos, local_w)
    # 3. Blocks shared by several ranks travel as position scores, not as local candidates.
    blk, frag64, bid = _straddling_blocks(fs, blk, gid, base, seq, shard, inp.block_size)
    # 4. One all-gather of the local top-k (and the fragments), one global top-k.
    return _global_top_k(blk, gid, frag64, bid, inp, world, group)


def _checked_select_inputs(q_idx, k_idx_shard, weights, k, shard, group, rank, world, check_ranks, **kw):
    """(inputs, shard metadata, local score width) after the selection rules on the rank's local view;
    a bad input on one rank raises on every rank when ``check_ranks`` (see :func:`select`)."""
    error = inp = meta = None
    local_w = 0
    try:
        B = _check_shard(shard, world, ("q_idx", q_idx), ("k_idx_shard", k_idx_shard), kw["cu_seqlens_q"])
        paged = k_idx_shard.dim() == 3
        meta = shard.tensors(rank, q_idx.device)
        local_w = max(shard.lengths(rank)) if B else 0
        try:
            inp = validate_selection(
                "select", q_idx, k_idx_shard, weights, k, cu_seqlens_k=None if paged else meta["cu_seqlens_k"],
                seqlens_k=meta["seqlens_k"] if paged else None, max_seqlen_k=local_w, **kw)
        except (ValueError, TypeError) as e:
            raise _shard_error(e, shard, rank, "k_idx", "k_idx_shard") from None
    except (ValueError, TypeError) as e:
        error = e
    if check_ranks is None:
        check_ranks = _default_check_ranks(q_idx.device if isinstance(q_idx, Tensor) else torch.device("cpu"))
    if check_ranks and world > 1:
        sig = (0, 0, 0, 0) if error is not None else (q_idx.shape[0], inp.k, inp.block_size,
                                                     ("max", "mean").index(inp.block_reduce))
        _agree(error, sig, ("T", "k", "block_size", "block_reduce"),
               q_idx.device if isinstance(q_idx, Tensor) else "cpu", group, "attention.distributed.select")
    elif error is not None:
        raise error
    return inp, meta, local_w


def _block_frame(scores: Tensor, inp, shard: ShardLayout, rank: int, start: Tensor, q_pos: Tensor,
                 local_w: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """This rank's scores in a frame aligned on global blocks: frame column f of token t is global position
    base[t] + f, base = its sequence's shard start rounded down to a block. Returns (frame scores [T, frame]
    with the global causal rule applied, block scores [T, nblk], their global block ids, base)."""
    T, b, dev = scores.shape[0], inp.block_size, scores.device
    frame = max((s % b + n for s, n in zip(shard.starts(rank), shard.lengths(rank))), default=0)
    nblk = -(-frame // b)
    frame = nblk * b
    off = start % b
    f = torch.arange(frame, device=dev, dtype=torch.int64)
    if b > 1 or frame != local_w:
        lp = f[None, :] - off[:, None]
        inside = (lp >= 0) & (lp < local_w)
        src = lp.clamp(0, max(local_w - 1, 0))
        got = torch.gather(scores, 1, src) if local_w else scores.new_full((T, frame), float("-inf"))
        fs = torch.where(inside, got, float("-inf"))
    else:
        fs = scores
    base = start - off  # global position of frame column 0 (a block boundary)
    if inp.causal:  # on the *global* query position (the local call was not causal)
        fs = torch.where(base[:, None] + f[None, :] <= q_pos[:, None], fs, float("-inf"))
    blk = reduce_blocks(fs, b, inp.block_reduce) if b > 1 else fs  # [T, nblk]
    gid = base[:, None] // b + torch.arange(nblk, device=dev, dtype=torch.int64)[None, :]
    return fs, blk, gid, base


def _straddling_blocks(fs: Tensor, blk: Tensor, gid: Tensor, base: Tensor, seq: Tensor, shard: ShardLayout,
                       b: int) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Blocks shared by several ranks: left out of the local candidates (their score here is partial);
    their position scores are sent instead (every position is held by exactly one rank; the others send
    -inf). Returns (block scores, fragments packed as int64 [T, *] to ride with the keys, the shared
    block ids [T, nb_max] per token or None)."""
    T, frame, dev = fs.shape[0], fs.shape[1], fs.device
    # (Cached per device: a host-to-device copy per call would be a sync on CUDA.)
    table = shard.boundary_table(b, dev) if b > 1 else None
    if table is None or not table.shape[1]:
        return blk, torch.empty(T, 0, device=dev, dtype=torch.int64), None
    bid = table[seq]  # [T, nb_max]
    shared = (gid[:, :, None] == bid[:, None, :]).any(dim=2)
    blk = torch.where(shared, float("-inf"), blk)
    col = ((bid - base[:, None] // b) * b)[:, :, None] + torch.arange(b, device=dev)[None, None, :]
    held = (bid[:, :, None] >= 0) & (col >= 0) & (col < frame)
    frag = torch.where(held, torch.gather(fs, 1, col.clamp(0, max(frame - 1, 0)).flatten(1)).view(col.shape)
                       if frame else fs.new_full(col.shape, float("-inf")), float("-inf"))
    frag = frag.to(torch.float32).flatten(1)
    if frag.shape[1] % 2:
        frag = torch.nn.functional.pad(frag, (0, 1), value=float("-inf"))
    return blk, frag.contiguous().view(torch.int64), bid


def _global_top_k(blk: Tensor, gid: Tensor, frag64: Tensor, bid: Optional[Tensor], inp, world: int,
                  group) -> Tensor:
    """Local top-k as packed keys (exact order, no ties: pack_keys), padded to k, all-gathered with the
    straddling blocks' fragments; the global top-k of every rank's candidates and the whole blocks."""
    T, nblk, b = blk.shape[0], blk.shape[1], inp.block_size
    kk = min(inp.k, nblk)
    keys = pack_keys(blk, gid)
    keys = torch.topk(keys, kk, dim=1).values if kk else keys[:, :0]
    if kk < inp.k:
        keys = torch.cat([keys, keys.new_full((T, inp.k - kk), _NO_KEY)], dim=1)
    mine = torch.cat([keys, frag64], dim=1).contiguous()
    allk = torch.empty((world * T, mine.shape[1]), device=blk.device, dtype=torch.int64)
    _all_gather(allk, mine, group)
    allk = allk.view(world, T, -1)
    cand = allk[:, :, :inp.k].transpose(0, 1).reshape(T, world * inp.k)
    if bid is not None:
        nb_max = bid.shape[1]
        frags = allk[:, :, inp.k:].contiguous().view(torch.float32)[:, :, :nb_max * b]  # [W, T, nb_max*b]
        # amax over ranks: the holder's value (NaN included: amax propagates it, as one device sees it).
        whole = frags.amax(dim=0)
        bscore = reduce_blocks(whole, b, inp.block_reduce)  # same reduction as attention.select
        cand = torch.cat([cand, pack_keys(bscore, bid.clamp_min(0))], dim=1)
    return best_positions(cand, inp.k)
