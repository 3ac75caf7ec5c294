"""Random projections of per-sample gradients, regenerated from a seed and never stored.

* ``none`` — the exact gradient in the layout of ``grads.py`` (p̃ = p).
* ``dense`` — ``P g`` with ``P`` [k, p] i.i.d. N(0, 1/k). Columns are generated in fixed
  blocks of :data:`DENSE_BLOCK` from ``(seed, block)``, so ``P`` depends on the seed only;
  ``chunk_size`` (speed/memory only) groups whole blocks per matmul and the whole matrix
  never exists in memory. ``E[PᵀP] = I`` keeps inner products in expectation.
* ``kronecker`` — per linear layer (LoGra-style), ``P_out G P_inᵀ`` with ``P_out`` [k_out, d_out]
  and ``P_in`` [k_in, d_in + 1], each N(0, 1/k) from ``(seed, layer)``. For the factorised
  gradient ``G = Σ_s b_s a_sᵀ`` this is ``Σ_s (P_out b_s)(P_in a_s)ᵀ``: k_out·k_in numbers per
  layer computed from the factors alone. It equals dense projection with the matrix
  ``P_out ⊗ P_in``. A factor whose size is ≤ k is kept exactly (identity).
* ``kfac`` — the same Kronecker form with data-aware factors: the rows of ``P_out`` / ``P_in``
  are the top eigenvectors of the layer's output-gradient and input second moments
  ``E[b bᵀ]``, ``E[a aᵀ]`` (the K-FAC factors; LoGra's PCA initialisation), optionally mixed
  with random orthonormal directions. They are fitted from the recorded run
  (``projection_fit.py``), so they cannot be regenerated from the seed: they are stored as a
  small artifact and passed in as ``basis``; :meth:`Projector.describe` records its checksum.
  The rows are orthonormal and every factor is rotated even when all its directions are kept
  (then ``P_out ⊗ P_in`` is an orthogonal matrix and inner products are exact).

The same projector serves training and query gradients; :meth:`Projector.describe` is saved
with every embedding so that a query projected differently is refused.
"""

from __future__ import annotations

import math

import torch

from dve_repro.config import FITTED_PROJECTIONS, ProjectionConfig
from dve_repro.errors import DveError
from dve_repro.grads import FACTOR_KINDS, Block, layout_dim, one_hot_factor

# Columns of the dense matrix generated per seed: fixed, so that P never depends on chunk_size.
DENSE_CACHE_BYTES = 1 << 30  # keep the dense matrix in memory up to 1 GiB
DENSE_BLOCK = 4096


def _gaussian(rows: int, cols: int, seed: int, dtype: torch.dtype, device) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    m = torch.randn(rows, cols, generator=gen, dtype=torch.float64) / math.sqrt(rows)
    return m.to(dtype=dtype, device=device)


def _seed(base: int, *parts: int) -> int:
    # A stable mix of integers into one 63-bit seed (no Python hash randomisation).
    s = base & 0x7FFFFFFFFFFFFFFF
    for p in parts:
        s = (s * 6364136223846793005 + p + 1442695040888963407) & 0x7FFFFFFFFFFFFFFF
    return s


class Projector:
    """Maps per-sample gradients (materialised blocks or linear-layer factors) to [B, p̃]."""

    def __init__(self, cfg: ProjectionConfig, blocks: list[Block], basis: FittedBasis | None = None):
        self.cfg = cfg
        self.blocks = blocks
        self.p = layout_dim(blocks)
        self._cache: dict = {}
        self.basis = basis
        if cfg.kind == "dense" and cfg.dim > self.p:
            raise DveError(f"projection.dim={cfg.dim} is larger than the gradient (p={self.p})")
        if cfg.kind in FITTED_PROJECTIONS and basis is None:
            raise DveError(f"projection.kind={cfg.kind} is fitted from a finished training run: only dve embed, "
                           "score and compare-tsloo use it (not capture during training, online selection or "
                           "benchmarks); use projection.kind=kronecker here")
        if basis is not None:
            basis.check(blocks, self._kept)
        if self.kronecker:
            other = [b.name for b in blocks if b.kind not in FACTOR_KINDS]
            if other:
                raise DveError(
                    f"kronecker projection needs linear or embedding layers only, but {other[:3]} are not; "
                    "use projection.kind=dense or none"
                )
        self.block_dims = [self._out_dim(b) for b in blocks]
        self.dim = sum(self.block_dims)

    @property
    def kronecker(self) -> bool:
        """True for the per-layer factor projections (random ``kronecker`` or fitted ``kfac``)."""
        return self.cfg.kind == "kronecker" or self.cfg.kind in FITTED_PROJECTIONS

    def _kept(self, b: Block) -> tuple[int, int]:
        """(k_out, k_in) of a layer: the configured sizes capped at the layer's."""
        d_out, d_in = b.shape
        return min(self.cfg.k_out, d_out), min(self.cfg.k_in, d_in)

    def _out_dim(self, b: Block) -> int:
        if self.cfg.kind == "none":
            return b.size
        if self.cfg.kind == "dense":
            return 0  # dense projects the whole vector, not blocks
        k_out, k_in = self._kept(b)
        return k_out * k_in

    @property
    def out_dim(self) -> int:
        return self.cfg.dim if self.cfg.kind == "dense" else self.dim

    def block_slices(self) -> list[slice]:
        """Column ranges of each layer in the projected vector (for one M per layer)."""
        if self.cfg.kind == "dense":
            return [slice(0, self.cfg.dim)]  # dense mixes layers: one block only
        out, start = [], 0
        for d in self.block_dims:
            out.append(slice(start, start + d))
            start += d
        return out

    def describe(self) -> dict:
        out = {
            "kind": self.cfg.kind,
            "dim": self.out_dim,
            "k_in": self.cfg.k_in,
            "k_out": self.cfg.k_out,
            "seed": self.cfg.seed,
            "layout": [[b.name, list(b.shape)] for b in self.blocks],
        }
        if self.basis is not None:
            # Not regenerable from the seed: the stored basis is named by its checksum.
            out.update(fit_steps=self.cfg.fit_steps, random_fraction=self.cfg.random_fraction,
                       basis_blake2b=self.basis.checksum)
        if self.cfg.kind == "dense":
            # Names the column-block scheme: gradients projected by the earlier per-chunk_size
            # scheme carry no such key and are refused instead of mixed with these.
            out["dense_block"] = DENSE_BLOCK
        return out

    # -- the matrices (regenerated on demand, cached per dtype/device for speed) --

    def kron_factors(self, i: int, dtype, device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        key = ("kron", i, dtype, str(device))
        if key not in self._cache and self.basis is not None:
            p_out, p_in = self.basis.factors(self.blocks[i].name)
            self._cache[key] = (p_out.to(dtype=dtype, device=device), p_in.to(dtype=dtype, device=device))
        if key not in self._cache:
            d_out, d_in = self.blocks[i].shape
            k_out, k_in = self._kept(self.blocks[i])
            p_out = None if k_out == d_out else _gaussian(k_out, d_out, _seed(self.cfg.seed, i, 0), dtype, device)
            p_in = None if k_in == d_in else _gaussian(k_in, d_in, _seed(self.cfg.seed, i, 1), dtype, device)
            self._cache[key] = (p_out, p_in)
        return self._cache[key]

    def dense_columns(self, start: int, stop: int, dtype, device) -> torch.Tensor:
        """Columns [start, stop) of the dense matrix P [k, p], assembled from its fixed
        :data:`DENSE_BLOCK`-column blocks (block j drawn from ``(seed, j)``)."""
        parts = []
        for j in range(start // DENSE_BLOCK, (stop - 1) // DENSE_BLOCK + 1):
            b0 = j * DENSE_BLOCK
            cols = min(DENSE_BLOCK, self.p - b0)
            m = self._dense_block(j, cols, dtype, device)
            parts.append(m[:, max(start, b0) - b0 : min(stop, b0 + cols) - b0])
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def _dense_block(self, j: int, cols: int, dtype, device) -> torch.Tensor:
        """Block j of P, kept in memory while the whole matrix fits in DENSE_CACHE_BYTES
        (regenerating it for every batch would dominate the cost of dense projection)."""
        key = ("dense", j, dtype, str(device))
        if key in self._cache:
            return self._cache[key]
        m = _gaussian(self.cfg.dim, cols, _seed(self.cfg.seed, j, 7), dtype, device)
        if self.cfg.dim * self.p * m.element_size() <= DENSE_CACHE_BYTES:
            self._cache[key] = m
        return m

    def dense_step(self) -> int:
        """Columns multiplied at a time: ``chunk_size`` rounded down to whole blocks (≥ 1 block)."""
        return max(1, self.cfg.chunk_size // DENSE_BLOCK) * DENSE_BLOCK

    # -- projecting --

    def project_flat(self, g: torch.Tensor) -> torch.Tensor:
        """[B, p] gradients in layout order → [B, p̃]."""
        if self.cfg.kind == "none":
            return g
        if self.cfg.kind == "dense":
            out = torch.zeros(g.shape[0], self.cfg.dim, dtype=g.dtype, device=g.device)
            step = self.dense_step()
            for start in range(0, self.p, step):
                stop = min(start + step, self.p)
                out += g[:, start:stop] @ self.dense_columns(start, stop, g.dtype, g.device).T
            return out
        parts, start = [], 0
        for i, b in enumerate(self.blocks):
            gb = g[:, start : start + b.size].reshape(-1, *b.shape)
            start += b.size
            p_out, p_in = self.kron_factors(i, g.dtype, g.device)
            if p_out is not None:
                gb = p_out @ gb
            if p_in is not None:
                gb = gb @ p_in.T
            parts.append(gb.flatten(1))
        return torch.cat(parts, dim=1)

    def project_blocks(self, block_grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """{block: [B, size]} → [B, p̃]."""
        return self.project_flat(torch.cat([block_grads[b.name] for b in self.blocks], dim=1))

    def project_factors(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Hook factors {block: (a [B,S,d_in+1], b [B,S,d_out])} → [B, p̃] without forming
        the per-sample gradient when the projection is Kronecker."""
        if not self.kronecker:
            from dve_repro.grads import factors_to_grads

            return self.project_blocks(factors_to_grads(factors, self.blocks))
        parts = []
        for i, blk in enumerate(self.blocks):
            a, b = factors[blk.name]
            p_out, p_in = self.kron_factors(i, b.dtype, b.device)
            if not a.is_floating_point():  # an embedding's token ids: P_in onehot(tok) = column tok of P_in
                a = p_in.T[a] if p_in is not None else one_hot_factor(a, b, blk.shape[1])
            elif p_in is not None:
                a = a @ p_in.T  # [B, S, k_in]
            if p_out is not None:
                b = b @ p_out.T  # [B, S, k_out]
            parts.append(torch.einsum("bso,bsi->boi", b, a).flatten(1))
        return torch.cat(parts, dim=1)

    def _fused_factors(self, i: int, dtype, device) -> tuple[torch.Tensor | None, torch.Tensor | None,
                                                             torch.Tensor | None]:
        """Layer i's matrices as the fused path multiplies them, contiguous and in ``dtype``:
        ``(P_outᵀ [d_out, k_out], P_inᵀ without the bias column [d_in, k_in], the bias column
        of P_in [k_in])``; None where the factor is kept exactly (or the layer has no bias).
        For an embedding ``P_inᵀ`` is [V, k_in] (a token's row is P_in onehot(tok))."""
        key = ("fused", i, dtype, str(device))
        if key not in self._cache:
            blk = self.blocks[i]
            p_out, p_in = self.kron_factors(i, dtype, device)
            out_t = None if p_out is None else p_out.T.contiguous()
            in_t = bias = None
            if p_in is not None:
                d = blk.shape[1] - int(blk.has_bias)
                in_t = p_in[:, :d].T.contiguous()
                bias = p_in[:, d].contiguous() if blk.has_bias else None
            self._cache[key] = (out_t, in_t, bias)
        return self._cache[key]

    def project_captured(self, captured: dict[str, tuple[torch.Tensor, torch.Tensor]], scale: torch.Tensor,
                         dtype: torch.dtype | None = None) -> torch.Tensor:
        """Fused Kronecker projection of what the training step's hooks saw: [B, p̃] in ``dtype``.

        ``captured`` = {block: (x, g)} with x the layer input [B, d_in] or [B, S, d_in] (token
        ids [B, S] for an embedding) and g the output gradient of the step's weighted loss
        Σ_i w_i ℓ_i, same leading shape; ``scale`` [B] = 1/w_i. Entries are popped as each layer
        is projected, so one layer's factors at a time are cast to ``dtype`` (default: the
        factors' dtype, bf16/fp16 → float32).

        Equals ``project_factors(LinearFactorHooks.factors(w))`` (the reference, held equal in
        tests) with less work per layer: the bias's column of ones is never appended (P_in's
        last column is added to P_in x instead), 1/w multiplies the smaller projected factor
        rather than the whole [B, S, d_out] output gradient (an LM head's is B·S·V numbers),
        and every layer's rows land in one preallocated [B, p̃] (no concatenation).
        """
        if not self.kronecker:
            raise ValueError("project_captured is the Kronecker path; materialise the factors instead")
        first = captured[self.blocks[0].name][1]
        if dtype is None:
            dtype = first.dtype if first.dtype in (torch.float32, torch.float64) else torch.float32
        n, device = first.shape[0], first.device
        out = torch.empty(n, self.dim, dtype=dtype, device=device)
        scale = scale.to(dtype=dtype, device=device)
        start = 0
        for i, blk in enumerate(self.blocks):
            x, g = captured.pop(blk.name)
            out_t, in_t, bias = self._fused_factors(i, dtype, device)
            g = g.reshape(n, -1, g.shape[-1]).to(dtype)  # [B, S, d_out]
            if not x.is_floating_point():  # an embedding's token ids: P_in onehot(tok) = row tok of P_inᵀ
                x = x.reshape(n, -1)
                pa = in_t[x] if in_t is not None else torch.nn.functional.one_hot(x, blk.shape[1]).to(dtype)
            else:
                x = x.reshape(n, -1, x.shape[-1]).to(dtype)  # [B, S, d_in]
                if in_t is None:
                    pa = torch.cat([x, torch.ones_like(x[..., :1])], dim=-1) if blk.has_bias else x
                elif bias is not None:
                    pa = torch.addmm(bias, x.reshape(-1, x.shape[-1]), in_t).view(n, -1, in_t.shape[1])
                else:
                    pa = x @ in_t  # [B, S, k_in]
            pb = g if out_t is None else g @ out_t  # [B, S, k_out]
            if pb.shape[-1] <= pa.shape[-1]:  # the per-sample 1/w on the smaller factor
                pb = pb * scale.view(n, 1, 1)
            else:
                pa = pa * scale.view(n, 1, 1)
            k_out, k_in = pb.shape[-1], pa.shape[-1]
            view = out[:, start : start + k_out * k_in].view(n, k_out, k_in)
            start += k_out * k_in
            if pb.shape[1] == 1:  # one token: the sum over S is a plain outer product
                torch.mul(pb.view(n, k_out, 1), pa.view(n, 1, k_in), out=view)
            else:
                torch.bmm(pb.transpose(1, 2), pa, out=view)
            del x, g, pa, pb
        return out


class FittedBasis:
    """Stored per-layer factor matrices of a fitted projection: ``{block: (P_out [k_out, d_out],
    P_in [k_in, d_in])}`` with orthonormal rows, and the checksum of the file they came from."""

    def __init__(self, mats: dict[str, tuple[torch.Tensor, torch.Tensor]], checksum: str):
        self.mats, self.checksum = mats, checksum

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], checksum: str) -> FittedBasis:
        """From the artifact's flat names ``<block>.out`` / ``<block>.in`` (other keys ignored)."""
        names = {k.rsplit(".", 1)[0] for k in tensors if k.endswith((".out", ".in"))}
        return cls({n: (tensors[f"{n}.out"], tensors[f"{n}.in"]) for n in names}, checksum)

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mats[name]

    def check(self, blocks: list[Block], kept) -> None:
        """Refuse a basis that does not fit the layers (another model or other k)."""
        for b in blocks:
            if b.name not in self.mats:
                raise DveError(f"the fitted projection basis has no matrices for layer {b.name}")
            p_out, p_in = self.mats[b.name]
            want = kept(b)
            if (tuple(p_out.shape), tuple(p_in.shape)) != ((want[0], b.shape[0]), (want[1], b.shape[1])):
                raise DveError(f"the fitted projection basis of layer {b.name} has shapes {tuple(p_out.shape)}, "
                               f"{tuple(p_in.shape)} but the layer needs {(want[0], b.shape[0])}, {(want[1], b.shape[1])}")


def check_compatible(saved: dict, current: dict, what: str) -> None:
    """Refuse to mix gradients projected in different ways."""
    if saved != current:
        keys = [k for k in set(saved) | set(current) if saved.get(k) != current.get(k)]
        shown = ", ".join(f"{k}: saved={saved.get(k)!r} now={current.get(k)!r}" for k in sorted(keys)[:3])
        raise DveError(f"{what} was made with another projection ({shown})")
