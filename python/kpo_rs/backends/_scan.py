"""The filter as a chunked parallel scan in torch (the "scan" backend; CUDA and CPU).

Every layout and mask mode reduces to the first-order linear recurrence

    x_t = a_t x_{t-1} + b_t,   x_{-1} = 0,

with ``a_t = 1 - K_{n(t)}`` and ``b_t = K_{n(t)} z_t`` at steps, ``a_t = 1, b_t = 0`` where the
state is held, the prior folded into the first position (``b_0 += a_0 m0``) and, for packed rows,
the carry cut at each segment start (``a = 0`` there).

:func:`linear_scan` solves it in chunks of ``C`` positions, each chunk from a zero entering state,
then fixes the chunks up with the states entering them. Those obey the same recurrence one level
up (coefficient: the chunk's product of ``a``) and are solved by the same function, so the depth
is ``log_C(T)`` and nothing is sequential in ``T``. Inside a chunk, one of two methods:

- the matrix method (:class:`SharedScan`), for coefficients shared by the rows: the chunk's map is
  the lower-triangular matrix ``L[i, j] = prod_{j<u<=i} a_u``, formed by a cumulative product once
  per gain table and dtype (cached with the table) and applied to every row by one batched matmul;
  the adjoint applies the same matrices transposed;
- recursive doubling (:func:`linear_scan`), for per-row coefficients, or where float32 matmuls may
  run in TF32 (``torch.backends.cuda.matmul.allow_tf32``, or a float32 matmul precision other
  than ``"highest"``): ``log2(C)`` elementwise steps that compose each position with the one ``s``
  before it, ``s = 1, 2, 4, ...``, carrying the product of ``a`` alongside.

Neither exponentiates differences of log-sums, so gains of exactly 1 (``a = 0``), held states
(``a = 1``) and products that underflow are exact. Each level rounds a product of at most ``C``
factors and a sum of at most ``C`` terms, so the error stays within a small multiple of ``C eps``
relative to the magnitudes involved, at any length.

Which rows share gains: with no mask or under ``masked="zero"`` the gains are positional, shared
by every row (the matrix method). Under ``masked="hold"`` a row's gain index is its count of valid
tokens ``n(t)``; the forward pass moves each row's valid values to its front, filters them with
the shared gains and gathers the states back (a masked position takes the state of the last valid
one), and the adjoint gathers per-row coefficients by ``n(t)`` (recursive doubling). Packed rows
are gathered into a padded ``[rows, longest]`` batch unless that would take more than
``PADDED_MAX_EXPANSION`` times the packed size; then they are one flat row with the carry cut at
each row's start (``a = 0`` there).

``doubling=True`` (the ``"scan_doubling"`` backend) uses recursive doubling everywhere and filters
packed rows as one flat row: nothing is cached, and the tests run both methods on the same inputs.

The adjoint is the same recurrence in reverse, ``lam_t = g_t + a_{t+1} lam_{t+1}``, then
``dz_t = K_{n(t)} lam_t`` and ``dm0 = a_0 lam_0``: by recursive doubling on flipped tensors, or
by the transposed matrices (:meth:`SharedScan.adjoint`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._rows import Rows

#: Chunk length. Products inside a chunk have at most this many factors (error ~ C eps per level);
#: the work per token is about C multiply-adds per level, and the depth is log_C(T) levels. 64
#: keeps float32 errors near 1e-6 relative and the matmuls large enough to use the hardware well.
CHUNK = 64


def error_steps(length: int, chunk: int = CHUNK) -> int:
    """The row length to give ``kpo_rs.testing.tolerance`` for the scan's results on rows of
    ``length``: the recurrence's ``L`` steps plus ``4 C`` per level of recursion (each level rounds
    a product of at most ``C`` factors, a sum of at most ``C`` terms and one fix-up)."""
    depth = max(1, math.ceil(math.log(max(length, 1)) / math.log(chunk)))
    return length + 4 * chunk * depth


def _exact_matmul_allowed(dtype: torch.dtype, device: torch.device) -> bool:
    """False where float32 matmuls may run in reduced precision (TF32/bf16 passes)."""
    if dtype == torch.float64:
        return True
    if torch.get_float32_matmul_precision() != "highest":
        return False
    return not (device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32)


def transfer_matrix(a: torch.Tensor) -> torch.Tensor:
    """``L[..., i, j] = prod_{j<u<=i} a[..., u]`` for ``i >= j``, 0 above the diagonal."""
    c = a.shape[-1]
    strictly_below = torch.ones(c, c, dtype=torch.bool, device=a.device).tril(-1)
    factors = torch.where(
        strictly_below, a.unsqueeze(-1), torch.ones((), dtype=a.dtype, device=a.device)
    )
    return torch.cumprod(factors, dim=-2).tril()


def _chunks_by_doubling(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunk-local states and decays by recursive doubling: ``a`` broadcasts against ``b``
    ``[..., n, C]``. After the step of stride ``s`` position ``i`` holds the composition of the
    last ``2 s`` steps (fewer near the chunk start): ``x_i += A_i x_{i-s}``, ``A_i *= A_{i-s}``."""
    x, decay = b, a
    step = 1
    while step < b.shape[-1]:
        x = x + decay * F.pad(x[..., :-step], (step, 0))
        decay = decay * F.pad(decay[..., :-step], (step, 0), value=1.0)
        step *= 2
    return x, decay


def linear_scan(a: torch.Tensor, b: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """Solves ``x_t = a_t x_{t-1} + b_t`` (``x_{-1} = 0``) along the last dimension by recursive
    doubling inside chunks.

    ``a`` ``[1, T]`` (shared by the rows) or ``[B, T]``; ``b`` ``[B, T]``. Returns ``x``
    ``[B, T]``, contiguous.
    """
    length = b.shape[-1]
    if length == 0:
        return b.clone()
    chunk = min(chunk, 1 << (length - 1).bit_length())  # short rows: fewer doubling steps
    pad = (-length) % chunk
    if pad:
        a = F.pad(a, (0, pad), value=1.0)
        b = F.pad(b, (0, pad))
    n_chunks = (length + pad) // chunk
    a_chunks = a.reshape(a.shape[0], n_chunks, chunk)
    b_chunks = b.reshape(b.shape[0], n_chunks, chunk)
    local, decay = _chunks_by_doubling(a_chunks, b_chunks)
    if n_chunks > 1:
        # States entering each chunk: the same recurrence over the chunks' end states.
        ends = linear_scan(decay[..., -1], local[..., -1], chunk)
        entering = F.pad(ends[..., :-1], (1, 0)).unsqueeze(-1)
        local = torch.addcmul(local, decay, entering)
    x = local.reshape(b.shape[0], n_chunks * chunk)
    return x[..., :length].contiguous()


class SharedScan:
    """The filter's recurrence ``x_t = a_t x_{t-1} + k_t z_t`` (``x_{-1} = m0``) for rows sharing
    ``a`` and ``k`` ``[capacity]``, by the matrix method, with everything that depends on them
    alone built once (then read-only): per level of the recursion, each chunk's map
    ``L diag(k)`` ``[n, C, C]`` (``L[i, j] = prod_{j<u<=i} a_u``), its decay (the running product
    of ``a`` from the chunk start) and, for the adjoint, ``diag(k) L^T`` with the decay appended
    as one more column, and ``k`` times ``L``'s last row.

    Solves rows of any length ``T <= capacity``: a prefix of ``a`` has the prefix of the chunks.
    The levels above the first have ``k = 1`` (``k=None``) and the chunks' products of ``a`` as
    coefficients. Each level costs one batched matmul over the data and one fix-up pass.
    """

    def __init__(self, a: torch.Tensor, k: torch.Tensor | None = None, chunk: int = CHUNK):
        pad = (-a.shape[0]) % chunk
        chunks = F.pad(a, (0, pad), value=1.0).reshape(-1, chunk)
        lower = transfer_matrix(chunks)  # [n, C, C]
        self.chunk = chunk
        self.decay = torch.cumprod(chunks, dim=-1)  # [n, C]
        last_row = lower[:, -1, :]  # prod_{j<u<=end} a_u
        if k is not None:
            k_chunks = F.pad(k, (0, pad)).reshape(-1, chunk)
            lower = lower * k_chunks.unsqueeze(-2)
            last_row = last_row * k_chunks
        self.forward_maps = lower.transpose(-1, -2).contiguous()  # x = z_chunk @ this
        # g_chunk @ this = (k * L^T g, sum_i decay_i g_i)
        self.adjoint_maps = torch.cat([lower, self.decay.unsqueeze(-1)], dim=-1).contiguous()
        self.last_row = last_row.contiguous()
        n = chunks.shape[0]
        self.next = SharedScan(self.decay[:, -1].contiguous(), None, chunk) if n > 1 else None
        self._prefixes: dict[int, tuple[torch.Tensor, ...]] = {}

    def _prefix(self, n: int) -> tuple[torch.Tensor, ...]:
        """The first ``n`` chunks' tables (views, memoised: slicing costs more than a lookup)."""
        views = self._prefixes.get(n)
        if views is None:
            views = (
                self.forward_maps[:n],
                self.adjoint_maps[:n],
                self.decay[:n],
                self.last_row[:n],
            )
            self._prefixes[n] = views
        return views

    def _split(self, values: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """``[B, T]`` padded to whole chunks, as ``[n, B, C]`` (a view of ``[B, n, C]``)."""
        length = values.shape[-1]
        n = -(-length // self.chunk)
        if n * self.chunk != length:
            values = F.pad(values, (0, n * self.chunk - length))
        return values.reshape(values.shape[0], n, self.chunk).transpose(0, 1), n, length

    def _join(self, parts: torch.Tensor, length: int) -> torch.Tensor:
        """``[B, n, C]`` back to ``[B, T]``, contiguous."""
        flat = parts.reshape(parts.shape[0], -1)
        return flat[:, :length].contiguous() if flat.shape[1] != length else flat

    def forward(self, z: torch.Tensor, m0: float | torch.Tensor) -> torch.Tensor:
        """``x`` ``[B, T]`` for inputs ``z`` ``[B, T]`` and the state ``m0`` before the first
        position (a float or a 0-d tensor)."""
        if z.shape[-1] == 0:
            return z.new_zeros(z.shape)
        parts, n, length = self._split(z)
        maps, _, decay, _ = self._prefix(n)
        local = torch.bmm(parts, maps).transpose(0, 1)  # [B, n, C], each chunk from state 0
        if n == 1:
            entering = m0
        else:
            assert self.next is not None  # an input of n > 1 chunks: so was the table
            ends = self.next.forward(local[:, :, -1], m0)  # state at each chunk's end, [B, n]
            if isinstance(m0, torch.Tensor):
                first = m0.expand(z.shape[0], 1)
                entering = torch.cat([first, ends[:, :-1]], dim=1).unsqueeze(-1)
            else:
                entering = F.pad(ends[:, :-1], (1, 0), value=m0).unsqueeze(-1)
        x = z.new_empty(z.shape[0], n, self.chunk)
        if isinstance(entering, torch.Tensor):
            torch.addcmul(local, decay, entering, out=x)
        else:
            torch.add(local, decay, alpha=entering, out=x)
        return self._join(x, length)

    def adjoint(self, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For ``g`` ``[B, T]``: ``(k * lam [B, T], dm0 [B])``, where ``lam_t = g_t + a_{t+1}
        lam_{t+1}`` (``lam_T = 0``) is the adjoint of the state and ``dm0 = a_0 lam_0``."""
        if g.shape[-1] == 0:
            return g.new_zeros(g.shape), g.new_zeros(g.shape[0])
        parts, n, length = self._split(g)
        _, maps, decay, last_row = self._prefix(n)
        out = torch.bmm(parts, maps)  # [n, B, C + 1]
        local = out[:, :, : self.chunk].transpose(0, 1)  # [B, n, C]
        heads = out[:, :, self.chunk].t()  # h_c = sum_i decay_i g_i: what chunk c sends back
        dz = g.new_empty(g.shape[0], n, self.chunk)
        if n == 1:
            dz.copy_(local)
            return self._join(dz, length), heads[:, 0]
        # mu_c, what reaches chunk c's end from later chunks, obeys mu_c = h_{c+1} + P_{c+1}
        # mu_{c+1} (P_c: the chunk's product of a): the next level's adjoint of h shifted by one.
        assert self.next is not None  # an input of n > 1 chunks: so was the table
        arriving, _ = self.next.adjoint(F.pad(heads[:, 1:], (0, 1)))
        torch.addcmul(local, last_row, arriving.unsqueeze(-1), out=dz)
        dm0 = torch.addcmul(heads[:, 0], decay[0, -1], arriving[:, 0])
        return self._join(dz, length), dm0


class GainTable:
    """The gains ``K_n`` for ``n < capacity`` (float64, on one device) and what the scan derives
    from them, built once per dtype: ``K`` and ``1 - K`` (each formed in float64 and rounded
    once), and the :class:`SharedScan` of ``1 - K``. Read-only once built."""

    def __init__(self, k64: torch.Tensor):
        self.k64 = k64
        self._tables: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}
        self._plans: dict[torch.dtype, SharedScan] = {}

    def tables(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(K, 1 - K)`` in ``dtype``, ``[capacity]`` each."""
        if dtype not in self._tables:
            self._tables[dtype] = (self.k64.to(dtype), (1.0 - self.k64).to(dtype))
        return self._tables[dtype]

    def plan(self, dtype: torch.dtype) -> SharedScan:
        if dtype not in self._plans:
            gain, keep = self.tables(dtype)
            self._plans[dtype] = SharedScan(keep, gain)
        return self._plans[dtype]


#: Longest rows for the matrix method. Its cached tables hold about ``2 C`` values per position
#: of the gain table's capacity (135 MB in float32 at this length), so longer rows use recursive
#: doubling, which keeps nothing.
MATRIX_MAX_LENGTH = 1 << 18


def _use_matrix(length: int, dtype: torch.dtype, device: torch.device, doubling: bool) -> bool:
    """The matrix method for shared coefficients: unless ``doubling`` asks for recursive doubling
    everywhere, rows up to ``MATRIX_MAX_LENGTH``, where float32 matmuls run in full precision."""
    return not doubling and length <= MATRIX_MAX_LENGTH and _exact_matmul_allowed(dtype, device)


def reverse_scan(a: torch.Tensor, g: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """Solves ``lam_t = g_t + a_{t+1} lam_{t+1}`` (``lam_T = 0``) along the last dimension."""
    a_next = F.pad(a[..., 1:], (0, 1), value=0.0)
    return linear_scan(a_next.flip(-1), g.flip(-1), chunk).flip(-1)


def padded_coefficients(
    mask: torch.Tensor | None, table: GainTable, length: int, masked: str, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, k)`` for a padded batch: the recurrence coefficient and the gain at each position
    (``k = 0`` where nothing is observed). ``[1, T]`` when rows share gains, else ``[B, T]``."""
    gain, keep = (t[:length] for t in table.tables(dtype))
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


def _fold_prior(a: torch.Tensor, b: torch.Tensor, m0: float | torch.Tensor) -> torch.Tensor:
    """Adds ``a_0 m0`` (the prior's contribution to ``x_0``) to ``b``'s first position, in place
    (``b`` is a fresh tensor), and returns ``b``."""
    b[..., 0] += a[..., 0] * m0
    return b


def _shared_forward(
    table: GainTable, obs: torch.Tensor, m0: float | torch.Tensor, doubling: bool
) -> torch.Tensor:
    """The filter of observations ``obs`` ``[B, T]`` (0 where nothing is observed) with the
    shared gains: the matrix method where it applies, else recursive doubling."""
    if _use_matrix(obs.shape[-1], obs.dtype, obs.device, doubling):
        return table.plan(obs.dtype).forward(obs, m0)
    gain, keep = (t[: obs.shape[-1]] for t in table.tables(obs.dtype))
    a = keep.unsqueeze(0)
    return linear_scan(a, _fold_prior(a, gain * obs, m0))


def _filter_hold(
    z: torch.Tensor, mask: torch.Tensor, m0: float | torch.Tensor, table: GainTable, doubling: bool
) -> torch.Tensor:
    """Forward filter under ``masked="hold"`` with a mask: the state at a valid position is the
    shared-gain filter of the row's valid values so far, so each row's valid values are moved to
    its front (in order), filtered with shared gains, and the states are gathered back; a masked
    position takes the state of the last valid one (``m0`` before the first)."""
    batch, length = z.shape
    count = torch.cumsum(mask, dim=-1)  # valid values up to and including t
    slot = torch.where(mask, count - 1, length)  # masked values go to a discarded last column
    front = z.new_zeros(batch, length + 1).scatter_(1, slot, z)[:, :length]
    filtered = _shared_forward(table, front, m0, doubling)
    state = torch.gather(filtered, 1, (count - 1).clamp_(min=0))
    return torch.where(count > 0, state, m0)


def _forward_padded(
    z: torch.Tensor,
    mask: torch.Tensor | None,
    m0: float | torch.Tensor,
    table: GainTable,
    masked: str,
    doubling: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`forward` of a padded batch ``z`` ``[B, T]``; the witness: each row's last state."""
    batch, length = z.shape
    if batch * length == 0:
        return z.new_zeros(z.shape), z.new_zeros(batch, 0)
    if mask is not None and masked == "hold":
        state = _filter_hold(z, mask, m0, table, doubling)
        return state, state[:, -1:]
    state = _shared_forward(table, _observations(z, mask), m0, doubling)
    out = state if mask is None else torch.where(mask, state, 0.0)
    return out, state[:, -1:]


def _adjoint_padded(
    g: torch.Tensor,
    mask: torch.Tensor | None,
    table: GainTable,
    masked: str,
    doubling: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`adjoint` of a padded batch ``g`` ``[B, T]``; the witness: each row's first ``dz``."""
    batch, length = g.shape
    if batch * length == 0:
        return g.new_zeros(g.shape), g.new_zeros(batch), g.new_zeros(batch, 0)
    shared = mask is None or masked == "zero"  # else a is per row (held where masked)
    if shared and _use_matrix(length, g.dtype, g.device, doubling):
        dz, dm0 = table.plan(g.dtype).adjoint(_observations(g, mask))
        if mask is not None:
            dz = torch.where(mask, dz, 0.0)
        return dz, dm0, dz[:, :1]
    a, k = padded_coefficients(mask, table, length, masked, g.dtype)
    read = g if mask is None or masked == "hold" else _observations(g, mask)
    lam = reverse_scan(a, read)
    dz = k * lam
    return dz, a[..., 0] * lam[..., 0], dz[:, :1]


def packed_coefficients(
    cu_seqlens: torch.Tensor,
    mask: torch.Tensor | None,
    table: GainTable,
    total: int,
    masked: str,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(a, k, starts)`` for packed rows: ``a`` (without the cuts at segment starts) and ``k``
    ``[total]``, and each segment's first position ``starts`` ``[batch]``."""
    device = table.k64.device
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
    gain, keep = table.tables(dtype)
    a, k = keep[n], gain[n]
    if mask is not None:
        zero = torch.zeros((), dtype=dtype, device=device)
        if masked == "hold":
            a = torch.where(mask, a, torch.ones((), dtype=dtype, device=device))
        k = torch.where(mask, k, zero)
    return a, k, starts


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


#: Packed rows are filtered as a padded batch (gathered into ``[rows, longest]``) unless that
#: would take more than this many times the packed size; then as one flat row with the carry cut
#: at each row's start (per-position coefficients, recursive doubling).
PADDED_MAX_EXPANSION = 4


class _Padding:
    """Packed rows gathered into a padded ``[rows, longest]`` batch (:meth:`pad`) and back
    (:meth:`unpad`): ``slots`` is each packed position's index in the flattened batch."""

    def __init__(self, slots: torch.Tensor, shape: tuple[int, int]) -> None:
        self.slots, self.shape = slots, shape

    @classmethod
    def plan(cls, packed: Rows, doubling: bool) -> _Padding | None:
        """The padding of ``packed`` rows, or None where the padded batch would be too large (or
        ``doubling`` asks for one flat row)."""
        rows, longest = packed.n_rows, packed.longest or 0
        total, device = packed.values.shape[0], packed.values.device
        if doubling or rows * longest > PADDED_MAX_EXPANSION * total + 4096:
            return None
        assert packed.cu_seqlens is not None  # plan() is for packed rows
        cu = packed.cu_seqlens.to(device=device, dtype=torch.int64)
        starts, lengths = cu[:-1], cu[1:] - cu[:-1]
        row = torch.repeat_interleave(torch.arange(rows, device=device), lengths, output_size=total)
        slots = torch.arange(total, device=device) - starts[row] + row * longest
        return cls(slots, (rows, longest))

    def pad(self, flat: torch.Tensor) -> torch.Tensor:
        padded = flat.new_zeros(self.shape[0] * self.shape[1])
        return padded.scatter_(0, self.slots, flat).view(self.shape)

    def unpad(self, padded: torch.Tensor) -> torch.Tensor:
        return padded.reshape(-1)[self.slots]


def forward(
    rows: Rows, m0: float | torch.Tensor, table: GainTable, *, doubling: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward filter of ``rows`` (either layout; packed rows of at most ``rows.longest``
    values) from the prior mean ``m0`` (a float or a 0-d tensor),
    gains from ``table``. Returns ``(output, witness)``: the output shaped like the values, 0 at
    masked positions under ``masked="zero"``; the witness is non-finite if and only if some
    value read is (see ``kpo_rs.backends.scan``)."""
    values, mask, masked = rows.values, rows.mask, rows.params.masked
    if isinstance(m0, torch.Tensor):
        m0 = m0.to(values.dtype)
    if not rows.packed:
        return _forward_padded(values, mask, m0, table, masked, doubling)
    padding = _Padding.plan(rows, doubling)
    cu = rows.cu_seqlens
    assert cu is not None  # rows.packed
    if padding is None:
        return _forward_flat(values, cu, mask, m0, table, masked)
    padded_mask = None if mask is None else padding.pad(mask)
    out, witness = _forward_padded(padding.pad(values), padded_mask, m0, table, masked, doubling)
    return padding.unpad(out), witness


def adjoint(
    rows: Rows, table: GainTable, *, doubling: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Adjoint of :func:`forward` for the upstream gradient ``rows.values`` (either layout);
    returns ``(dz`` shaped like it, ``dm0 [B]``, witness)``."""
    grad, mask, masked = rows.values, rows.mask, rows.params.masked
    if not rows.packed:
        return _adjoint_padded(grad, mask, table, masked, doubling)
    padding = _Padding.plan(rows, doubling)
    cu = rows.cu_seqlens
    assert cu is not None  # rows.packed
    if padding is None:
        return _adjoint_flat(grad, cu, mask, table, masked)
    padded_mask = None if mask is None else padding.pad(mask)
    dz, dm0, witness = _adjoint_padded(padding.pad(grad), padded_mask, table, masked, doubling)
    return padding.unpad(dz), dm0, witness


def _forward_flat(
    values: torch.Tensor,
    cu_seqlens: torch.Tensor,
    mask: torch.Tensor | None,
    m0: float | torch.Tensor,
    table: GainTable,
    masked: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed rows as one flat row with the carry cut at each row's start."""
    total = values.shape[0]
    if total == 0:
        return values.new_zeros(0), values.new_zeros(0)
    a, k, starts = packed_coefficients(cu_seqlens, mask, table, total, masked, values.dtype)
    b = k * _observations(values, mask)
    cut, is_start = _cut_at_starts(a, starts, total)
    b = torch.where(is_start, b + a * m0, b)
    state = linear_scan(cut.unsqueeze(0), b.unsqueeze(0)).squeeze(0)
    out = state if mask is None or masked == "hold" else torch.where(mask, state, 0.0)
    # A non-finite value propagates past the cuts (0 * nan = nan), so the last state witnesses all.
    return out, state[-1:]


def _adjoint_flat(
    g: torch.Tensor,
    cu_seqlens: torch.Tensor,
    mask: torch.Tensor | None,
    table: GainTable,
    masked: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The adjoint of :func:`_forward_flat`."""
    total = g.shape[0]
    batch = cu_seqlens.shape[0] - 1
    if total == 0:
        return g.new_zeros(0), g.new_zeros(batch), g.new_zeros(0)
    a, k, starts = packed_coefficients(cu_seqlens, mask, table, total, masked, g.dtype)
    cut, _ = _cut_at_starts(a, starts, total)
    read = g if mask is None or masked == "hold" else _observations(g, mask)
    lam = reverse_scan(cut.unsqueeze(0), read.unsqueeze(0)).squeeze(0)
    cu = cu_seqlens.to(device=g.device, dtype=torch.int64)
    first = starts.clamp(max=total - 1)
    dm0 = torch.where(
        cu[1:] > cu[:-1], a[first] * lam[first], torch.zeros((), dtype=g.dtype, device=g.device)
    )
    dz = k * lam
    return dz, dm0, dz[:1]
