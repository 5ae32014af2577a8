"""The filter as a chunked parallel scan in torch (the "scan" backend; CUDA and CPU).

Every layout and mask mode reduces to the first-order linear recurrence

    x_t = a_t x_{t-1} + b_t,   x_{-1} = 0,

with ``a_t = 1 - K_{n(t)}`` and ``b_t = K_{n(t)} z_t`` at steps, ``a_t = 1, b_t = 0`` where the
state is held, the prior folded into the first position (``b_0 += a_0 m0``) and, for packed rows,
the carry cut at each segment start (``a = 0`` there).

:func:`linear_scan` solves it in chunks of ``C`` positions: inside a chunk the map is the
lower-triangular matrix ``L[i, j] = prod_{j<u<=i} a_u``, formed by a cumulative product (never by
exponentiating differences of log-sums, so gains of exactly 1, ``a = 0``, and products that
underflow are exact); one matmul per chunk applies it to the whole batch. The states entering the
chunks obey the same recurrence one level up (coefficient: the chunk's product of ``a``), which
is solved by the same function, so the depth is ``log_C(T)`` and nothing is sequential in ``T``.
Each level rounds a product of at most ``C`` factors, so the error stays within a small multiple of
``C eps`` relative to the magnitudes involved, at any length.

Rows share gains when there is no mask or under ``masked="zero"``: then ``a`` is one row,
``[1, T]``, and each chunk's matrix is built once for the batch. Masks with holes under
``masked="hold"`` gather per-row gains by the valid-token count ``n(t)``.

The adjoint is the same recurrence in reverse, ``lam_t = g_t + a_{t+1} lam_{t+1}``, solved by the
same scan on flipped tensors; then ``dz_t = K_{n(t)} lam_t`` and ``dm0 = a_0 lam_0``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Chunk length. Products inside a chunk have at most this many factors (error ~ C eps per level);
#: the work per token is about C multiply-adds per level, and the depth is log_C(T) levels. 64
#: keeps float32 errors near 1e-6 relative and the matmuls large enough to use the hardware well.
CHUNK = 64


def _exact_matmul_allowed(t: torch.Tensor) -> bool:
    """False where float32 matmuls may run in reduced precision (TF32/bf16 passes)."""
    if t.dtype == torch.float64:
        return True
    if torch.get_float32_matmul_precision() != "highest":
        return False
    return not (t.is_cuda and torch.backends.cuda.matmul.allow_tf32)


def _apply(lower: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``lower @ b`` over the last dims (``[..., C, C]`` by ``[..., C]``), in full precision."""
    if _exact_matmul_allowed(b):
        return torch.matmul(lower, b.unsqueeze(-1)).squeeze(-1)
    return (lower * b.unsqueeze(-2)).sum(-1)


def transfer_matrix(a: torch.Tensor) -> torch.Tensor:
    """``L[..., i, j] = prod_{j<u<=i} a[..., u]`` for ``i >= j``, 0 above the diagonal."""
    c = a.shape[-1]
    strictly_below = torch.ones(c, c, dtype=torch.bool, device=a.device).tril(-1)
    factors = torch.where(
        strictly_below, a.unsqueeze(-1), torch.ones((), dtype=a.dtype, device=a.device)
    )
    return torch.cumprod(factors, dim=-2).tril()


def linear_scan(a: torch.Tensor, b: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """Solves ``x_t = a_t x_{t-1} + b_t`` (``x_{-1} = 0``) along the last dimension.

    ``a`` broadcasts against ``b`` (``[1, T]`` for gains shared by the rows, or ``[B, T]``);
    returns ``x`` of ``b``'s shape.
    """
    length = b.shape[-1]
    if length <= chunk:
        return _apply(transfer_matrix(a), b)
    pad = (-length) % chunk
    if pad:
        a = F.pad(a, (0, pad), value=1.0)
        b = F.pad(b, (0, pad))
    n_chunks = (length + pad) // chunk
    a_chunks = a.reshape(*a.shape[:-1], n_chunks, chunk)
    b_chunks = b.reshape(*b.shape[:-1], n_chunks, chunk)
    local = _apply(transfer_matrix(a_chunks), b_chunks)  # each chunk from a zero state
    decay = torch.cumprod(a_chunks, dim=-1)  # product of a from the chunk start to i
    ends = linear_scan(decay[..., -1], local[..., -1], chunk)  # state at each chunk's end
    entering = F.pad(ends[..., :-1], (1, 0))  # state entering each chunk
    x = local + decay * entering.unsqueeze(-1)
    return x.reshape(*x.shape[:-2], n_chunks * chunk)[..., :length]


def reverse_scan(a: torch.Tensor, g: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """Solves ``lam_t = g_t + a_{t+1} lam_{t+1}`` (``lam_T = 0``) along the last dimension."""
    a_next = F.pad(a[..., 1:], (0, 1), value=0.0)
    return linear_scan(a_next.flip(-1), g.flip(-1), chunk).flip(-1)


def _gain_tables(k64: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``K`` and ``1 - K`` formed in float64, each rounded once to ``dtype``."""
    return k64.to(dtype), (1.0 - k64).to(dtype)


def padded_coefficients(
    mask: torch.Tensor | None, k64: torch.Tensor, length: int, masked: str, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, k)`` for a padded batch: the recurrence coefficient and the gain at each position
    (``k = 0`` where nothing is observed). ``[1, T]`` when rows share gains, else ``[B, T]``."""
    gain, keep = _gain_tables(k64[:length], dtype)
    if mask is None:
        return keep.unsqueeze(0), gain.unsqueeze(0)
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    if masked == "zero":
        return keep.unsqueeze(0), torch.where(mask, gain, zero)
    n = (torch.cumsum(mask, dim=-1) - 1).clamp_(min=0)
    one = torch.ones((), dtype=dtype, device=mask.device)
    return torch.where(mask, keep[n], one), torch.where(mask, gain[n], zero)


def _observations(z: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``z`` with masked positions replaced by 0 (masked values are never read)."""
    return (
        z if mask is None else torch.where(mask, z, torch.zeros((), dtype=z.dtype, device=z.device))
    )


def _fold_prior(a: torch.Tensor, b: torch.Tensor, m0: torch.Tensor) -> torch.Tensor:
    """``b`` with ``a_0 m0`` added at the first position (the prior's contribution to ``x_0``)."""
    first = b[..., :1] + a[..., :1] * m0
    return torch.cat([first, b[..., 1:]], dim=-1)


def filter_padded(
    z: torch.Tensor,
    mask: torch.Tensor | None,
    m0: torch.Tensor,
    k64: torch.Tensor,
    masked: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward filter of ``z`` ``[B, T]``; returns ``(output, state)``, both ``[B, T]`` (they differ
    only at masked positions under ``masked="zero"``, where the output is 0)."""
    batch, length = z.shape
    if batch * length == 0:
        return z.new_zeros(z.shape), z.new_zeros(z.shape)
    a, k = padded_coefficients(mask, k64, length, masked, z.dtype)
    b = _fold_prior(a, k * _observations(z, mask), m0.to(z.dtype))
    state = linear_scan(a, b)
    out = state if mask is None or masked == "hold" else torch.where(mask, state, 0.0)
    return out, state


def adjoint_padded(
    g: torch.Tensor, mask: torch.Tensor | None, k64: torch.Tensor, masked: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adjoint of :func:`filter_padded` for upstream gradient ``g`` ``[B, T]``; returns
    ``(dz [B, T], dm0 [B])``."""
    batch, length = g.shape
    if batch * length == 0:
        return g.new_zeros(g.shape), g.new_zeros(batch)
    a, k = padded_coefficients(mask, k64, length, masked, g.dtype)
    read = g if mask is None or masked == "hold" else _observations(g, mask)
    lam = reverse_scan(a, read)
    return k * lam, a[..., 0] * lam[..., 0]


def packed_coefficients(
    cu_seqlens: torch.Tensor,
    mask: torch.Tensor | None,
    k64: torch.Tensor,
    total: int,
    masked: str,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(a, k, starts, segment)`` for packed rows, each ``[total]`` but ``starts`` ``[batch]``:
    ``a`` without the cuts at segment starts, and each position's segment index."""
    device = k64.device
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    starts, lengths = cu[:-1], cu[1:] - cu[:-1]
    segment = torch.repeat_interleave(
        torch.arange(lengths.numel(), device=device), lengths, output_size=total
    )
    position = torch.arange(total, device=device)
    if mask is not None and masked == "hold":
        valid_before = F.pad(torch.cumsum(mask, 0), (1, 0))  # valid tokens before each position
        n = (valid_before[1:] - valid_before[starts][segment] - 1).clamp_(min=0)
    else:
        n = position - starts[segment]
    gain, keep = _gain_tables(k64, dtype)
    a, k = keep[n], gain[n]
    if mask is not None:
        zero = torch.zeros((), dtype=dtype, device=device)
        if masked == "hold":
            a = torch.where(mask, a, torch.ones((), dtype=dtype, device=device))
        k = torch.where(mask, k, zero)
    return a, k, starts, segment


def _cut_at_starts(
    a: torch.Tensor, starts: torch.Tensor, total: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``a`` with 0 at every segment's first position (no carry between segments), and that mask."""
    # One slot past the end takes the starts of empty segments at the end; any other empty
    # segment starts where the next segment does, which is cut anyway.
    is_start = torch.zeros(total + 1, dtype=torch.bool, device=a.device)
    is_start[starts] = True
    is_start = is_start[:total]
    return torch.where(is_start, torch.zeros((), dtype=a.dtype, device=a.device), a), is_start


def filter_packed(
    values: torch.Tensor,
    cu_seqlens: torch.Tensor,
    mask: torch.Tensor | None,
    m0: torch.Tensor,
    k64: torch.Tensor,
    masked: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward filter of packed ``values`` ``[total]``; returns ``(output, state)`` ``[total]``."""
    total = values.shape[0]
    if total == 0:
        return values.new_zeros(0), values.new_zeros(0)
    a, k, starts, _ = packed_coefficients(cu_seqlens, mask, k64, total, masked, values.dtype)
    b = k * _observations(values, mask)
    cut, is_start = _cut_at_starts(a, starts, total)
    b = torch.where(is_start, b + a * m0.to(values.dtype), b)
    state = linear_scan(cut.unsqueeze(0), b.unsqueeze(0)).squeeze(0)
    out = state if mask is None or masked == "hold" else torch.where(mask, state, 0.0)
    return out, state


def adjoint_packed(
    g: torch.Tensor,
    cu_seqlens: torch.Tensor,
    mask: torch.Tensor | None,
    k64: torch.Tensor,
    masked: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adjoint of :func:`filter_packed`; returns ``(dvalues [total], dm0 [batch])``."""
    total = g.shape[0]
    batch = cu_seqlens.shape[0] - 1
    if total == 0:
        return g.new_zeros(0), g.new_zeros(batch)
    a, k, starts, _ = packed_coefficients(cu_seqlens, mask, k64, total, masked, g.dtype)
    cut, _ = _cut_at_starts(a, starts, total)
    read = g if mask is None or masked == "hold" else _observations(g, mask)
    lam = reverse_scan(cut.unsqueeze(0), read.unsqueeze(0)).squeeze(0)
    cu = cu_seqlens.to(device=g.device, dtype=torch.int64)
    first = starts.clamp(max=total - 1)
    dm0 = torch.where(
        cu[1:] > cu[:-1], a[first] * lam[first], torch.zeros((), dtype=g.dtype, device=g.device)
    )
    return k * lam, dm0
