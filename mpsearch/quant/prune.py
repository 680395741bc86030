"""Pruning one layer's weights for the error it causes at the layer's output: Optimal Brain
Surgeon as SparseGPT does it (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can
Be Accurately Pruned in One-Shot"), optionally with the survivors quantized in the same pass.

For ``y = W x`` the output error of a weight change is ``E‖δW x‖² = tr(δW H δWᵀ)`` with
``H = E[x xᵀ]`` (:mod:`mpsearch.graph.layer_hessian`), a sum of one quadratic per row (output
channel). Setting weight ``w_j`` of a row to zero and moving the other weights ``F`` of the row to
cancel as much of it as ``H`` allows costs (Hassibi & Stork 1993, OBS)

    ``ε_j = w_j² / [H_F⁻¹]_jj``,  with the update  ``δw_F = -w_j / [H_F⁻¹]_jj · [H_F⁻¹]_{j,F}``.

SparseGPT processes the columns in input order, so the ``H_F⁻¹`` of the columns not yet done
are the rows of the upper Cholesky factor ``U`` of ``H⁻¹`` (``Uᵀ U = H⁻¹``,
:func:`mpsearch.quant.rounding.factor_hessian`, the same dampening ``λ = 0.01·mean(diag H)`` as
GPTQ): ``[H_F⁻¹]_jj = U_jj²`` and, with ``e_j = (w_j - ŵ_j) / U_jj``, the update is
``W[:, j+1:] -= e_j ⊗ U[j, j+1:]``, the GPTQ loop with ``ŵ_j = 0`` for pruned weights (and
``ŵ_j = Q(w_j)``, on the grid of the given scales, for the others when quantizing jointly).
The mask of each block of ``block`` columns is chosen when the loop reaches it, on the weights
as the earlier blocks' updates left them, by the saliency ``w² / U_jj²`` (SparseGPT's adaptive
mask selection); ``n:m`` masks are chosen at the start of each group of ``m`` columns.

The patterns are the candidates' (:class:`mpsearch.core.formats.Sparsity`: ``+2:4``,
``+unstructured@0.5``, ``+channel@0.75``, the density kept; ``p = 1 - density`` is zeroed).

* **Unstructured**: the ``p·R·b`` lowest saliencies of each block of ``b``
  columns, compared across all rows and groups of the layer (in absolute units: the dampened
  ``H`` is normalised by its mean diagonal per group, and the saliency scaled back), so a layer
  has exactly ``round(p·size)`` zeros.
* **2:4** (n:m): at most ``n`` non-zeros in every ``m`` consecutive *input
  channels* at each kernel offset, the layout NVIDIA's sparse tensor cores read (the reduction
  dimension; apex ASP masks a ``(C_out, C_in, kh, kw)`` weight as ``(kh·kw·C_out, C_in)`` rows).
  The im2col order of :func:`mpsearch.quant.layer.weight_rows` is ``(C_in, kh, kw)``, so for a
  ``k×k`` conv the columns are visited tap-major (every kernel offset, then its channels), which
  puts each group of four channels next to each other; ``H`` is permuted alike. A channel count
  that is not a multiple of ``m`` ends in a short group, taken as padded with zeros (as ASP's
  mask does). A layer with fewer than ``m`` input channels per group (a depthwise conv, whose
  ``K = k·k`` taps all read one channel, or an RGB stem) is refused, with the reason: padding
  would leave nothing to prune and no sparse kernel runs it.
* **Output channels**: a fraction ``p`` of whole rows, the lowest energy ``w H wᵀ`` (the output
  energy the channel carries, all of it lost; no other weight of this layer can compensate,
  the next layer would have to), or ``‖w‖²`` without a Hessian. A depthwise conv's channel is
  its input channel too, so it is never pruned alone: refused, with the reason.

Without a dense Hessian (a layer wider than :data:`mpsearch.graph.layer_hessian.MAX_DENSE_K`), or
with fewer than ``MIN_ROWS_PER_INPUT·K`` rows behind it (the fit would follow the calibration set's
noise, :mod:`mpsearch.quant.layer`), the mask comes from ``w²·E[x_j²]`` (the diagonal of ``H``;
Wanda's ``|w|·‖x_j‖``, Sun et al. 2023) without the update, and from ``w²`` (magnitude) when
there is not even a diagonal. The predicted error is ``tr(δW H δWᵀ)``
(:func:`mpsearch.quant.rounding.output_error`) on the undampened ``H``, exact for the
calibration inputs behind ``H``. Measured on EfficientNet-Lite0's 49 convs, on held-out
crops (benchmarks/pruning.py): OBS has the lower layer-output error than magnitude in every
layer at 50%, 75% and 2:4; median ratio 0.23, 0.33 and 0.35 (the diagonal mask alone: 0.49).
"""

from __future__ import annotations

import enum
import logging
import math
from dataclasses import dataclass

import numpy as np

from mpsearch.core.errors import UsageError
from mpsearch.core.formats import (
    SPARSITY_PATTERNS,
    Format,
    FormatKind,
    Sparsity,
    numpy_storage_dtype,
)
from mpsearch.graph.layer_graph import Layer
from mpsearch.graph.layer_hessian import LayerHessian
from mpsearch.graph.ranges import QParams
from mpsearch.quant.layout import MIN_ROWS_PER_INPUT, rows_to_weight, weight_rows
from mpsearch.quant.rounding import FactorCache, HessianFactor, factor_hessian, output_error

__all__ = ["PruneMethod", "PruneRefused", "PrunedLayer", "prune_layer",
           "semi_structured_columns", "sparsity_refusal"]

log = logging.getLogger(__name__)

@dataclass(frozen=True, kw_only=True)
class _Pattern:
    """A :class:`mpsearch.core.formats.Sparsity` as the loop reads it: ``kind`` "none", "n:m",
    "unstructured" or "channel"; ``ratio`` the fraction zeroed (of weights, or of rows)."""

    kind: str
    ratio: float = 0.0
    n: int = 0
    m: int = 0


def _pattern(sparsity: Sparsity | None) -> _Pattern:
    """Read (and check) a candidate's sparsity; None is dense."""
    if sparsity is None or sparsity.density == 1:
        return _Pattern(kind="none")
    if sparsity.pattern not in SPARSITY_PATTERNS or not 0 < sparsity.density < 1:
        raise UsageError(f"cannot prune to {sparsity.name}",
                         fix=f"use a pattern of {', '.join(SPARSITY_PATTERNS)} and a density "
                             "(fraction kept) in (0, 1]")
    if sparsity.pattern == "2:4":
        if sparsity.density != 0.5:
            raise UsageError(f"2:4 keeps half the weights, not {sparsity.density}")
        return _Pattern(kind="n:m", ratio=0.5, n=2, m=4)
    return _Pattern(kind=sparsity.pattern, ratio=1.0 - sparsity.density)


class PruneMethod(enum.Enum):
    OBS = "obs"  # SparseGPT: Hessian saliency and update (dense Hessian)
    DIAGONAL = "diagonal"  # w²·E[x_j²], no update (Wanda's criterion)
    MAGNITUDE = "magnitude"  # w², no update


@dataclass(frozen=True, kw_only=True)
class PruneRefused:
    """An expected "no": this layer cannot take this sparsity, and why."""

    layer: str
    sparsity: Sparsity | None
    reason: str

    def __bool__(self) -> bool:
        return False


@dataclass(frozen=True, kw_only=True, eq=False)
class PrunedLayer:
    """A layer's pruned weights. ``weight``: float, the original shape (the dequantized survivors
    when quantized jointly); ``values``: the integers then (pruned weights at the zero point),
    else None; ``mask``: True where a weight is kept; ``method``: what chose the mask (OBS, or
    the fallback named in ``fallback``); ``predicted_error``: ``tr(δW H δWᵀ)`` summed over the
    groups, exact on the calibration statistic when ``error_exact`` (dense ``H``), its
    diagonal ``Σ δW² E[x²]`` otherwise, None without any Hessian; ``mean_shift``: ``δW·E[x]``
    per output channel (what a bias correction subtracts), None without a Hessian;
    ``channels``: the pruned output channels (channel pruning)."""

    weight: np.ndarray
    values: np.ndarray | None
    mask: np.ndarray
    sparsity: Sparsity | None
    method: PruneMethod
    fallback: str | None
    predicted_error: float | None
    error_exact: bool
    mean_shift: np.ndarray | None
    channels: np.ndarray | None = None

    @property
    def zero_fraction(self) -> float:
        return float(1.0 - self.mask.mean())


def _taps_and_channels(layer: Layer, k: int) -> tuple[int, int]:
    """(kernel offsets T, input channels per group C) with ``K = C·T``."""
    shape = layer.weight_shape
    if layer.op_type == "Conv" and shape is not None and len(shape) >= 3:
        return int(np.prod(shape[2:])), int(shape[1])
    return 1, k


def semi_structured_columns(layer: Layer, k: int, m: int) -> tuple[np.ndarray, list[int]]:
    """The column order of an n:m pass over ``K = k`` im2col columns (input channel, then
    kernel offset) and the starts of its groups of up to ``m`` input channels in that order
    (each ending where the next starts, the last at ``K``): tap-major, so that the ``m``
    channels a sparse tensor core groups at one kernel offset are consecutive."""
    taps, c = _taps_and_channels(layer, k)
    order = np.arange(k).reshape(c, taps).T.ravel()
    starts = [t * c + s for t in range(taps) for s in range(0, c, m)]
    return order, starts


def _refusal(layer: Layer, rows: np.ndarray | None, pat: _Pattern) -> str | None:
    if rows is None:
        return (f"{layer.op_type} weight of shape {layer.weight_shape}: a layout the pruning "
                "does not know (ConvTranspose, batched MatMul)")
    if pat.kind == "channel" and layer.depthwise:
        return ("a depthwise conv's output channel is its input channel: pruned alone, the "
                "producer still computes it; prune the channel in the producer and here together")
    if pat.kind == "n:m":
        taps, c = _taps_and_channels(layer, rows.shape[2])
        if c < pat.m:
            what = "depthwise conv" if layer.depthwise else "layer"
            return (f"{pat.n}:{pat.m} groups {pat.m} input channels at each kernel offset; this "
                    f"{what} has {c} per group ({taps} taps), nothing a sparse kernel can use")
    return None


def sparsity_refusal(layer: Layer, sparsity: Sparsity | None) -> str | None:
    """Why ``layer`` cannot take ``sparsity`` (what :func:`prune_layer` would refuse), from its
    weight's shape alone; None when it can (and always for dense)."""
    pat = _pattern(sparsity)
    if pat.kind == "none":
        return None
    if layer.weight is None or layer.weight_shape is None:
        return "no weight to prune (a MatMul of two activations)"
    rows = weight_rows(layer, np.empty(layer.weight_shape, np.float32))
    return _refusal(layer, rows, pat)


def _scales(qparams: QParams, g: int, r: int) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point per row, (G, R): per channel, or one for the tensor."""
    out = []
    for v, dtype in ((qparams.scale, np.float32), (qparams.zero_point, np.float32)):
        a = np.asarray(v).astype(dtype).reshape(-1)
        if a.size not in (1, g * r):
            raise ValueError(f"{a.size} quantization parameters for {g * r} output channels")
        out.append(np.broadcast_to(a, (g * r,)).reshape(g, r).copy())
    if not np.all(np.isfinite(out[0]) & (out[0] > 0)):
        raise ValueError("scale must be finite and positive")
    return out[0], out[1]


def _count(p: float, done: int, upto: int) -> int:
    """Zeros among weights [done, upto) so that the first ``upto`` hold ``round(p·upto)``: the
    layer ends with exactly ``round(p·size)`` zeros, spread evenly over the blocks."""
    return math.floor(p * upto + 0.5) - math.floor(p * done + 0.5)


def _hessian_scale(h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per group the mean live diagonal (``factor_hessian`` divides ``H`` by it) and the dead
    columns (``H_jj = 0``, an input that is always zero)."""
    diag = np.einsum("gkk->gk", h)
    dead = diag <= 0
    live = np.where(dead, 0.0, diag)
    c = live.sum(axis=1) / np.maximum((~dead).sum(axis=1), 1)
    c[c == 0] = 1.0
    return c, dead


def _obs(rows: np.ndarray, factor: HessianFactor, c: np.ndarray, dead: np.ndarray,
         pat: _Pattern, starts: list[int] | None, keep_rows: np.ndarray | None, *,
         block: int, quant: tuple[np.ndarray, np.ndarray, float, float] | None
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The SparseGPT loop over columns in the given (already permuted) order. Returns the new
    rows (G, R, K), the kept mask and the integers (or None)."""
    g, r, k = rows.shape
    u = factor.u
    d2 = np.einsum("gkk->gk", u) ** 2  # [H_F⁻¹]_jj of the normalised, dampened H
    wt = np.array(rows.transpose(0, 2, 1), dtype=np.float64, order="C")  # a copy, updated
    keep = np.ones((g, k, r), dtype=bool)
    if keep_rows is not None:
        keep &= keep_rows[:, None, :]
    out = np.empty((g, k, r))
    qt = np.empty((g, k, r), np.float32) if quant is not None else None
    semi = pat.kind == "n:m"
    if semi:  # blocks end where a group of m channels ends
        ends = [*starts[1:], k]
        edges, last = [0], 0
        for e in ends:
            if e - last >= block or e == k:
                edges.append(e)
                last = e
        seg_end = dict(zip(starts, ends, strict=True))
    else:
        edges = [*range(0, k, block), k]
        seg_end = {}
    for i1, i2 in zip(edges[:-1], edges[1:], strict=True):
        w1 = wt[:, i1:i2]  # a view: updates land in wt
        u1 = u[:, i1:i2, i1:i2]
        if pat.kind == "unstructured":
            sal = c[:, None, None] * w1**2 / d2[:, i1:i2, None]
            sal[dead[:, i1:i2]] = 0.0
            n_zero = _count(pat.ratio, i1 * g * r, i2 * g * r)
            if n_zero > 0:
                idx = np.argpartition(sal.ravel(), n_zero - 1)[:n_zero]
                blk = keep[:, i1:i2].copy()
                blk.reshape(-1)[idx] = False
                keep[:, i1:i2] = blk
        err1 = np.empty((g, i2 - i1, r))
        for i in range(i2 - i1):
            j = i1 + i
            if semi and j in seg_end:
                e = seg_end[j]
                n_zero = e - j - pat.n
                if n_zero > 0:
                    sal = w1[:, i:e - i1] ** 2 / d2[:, j:e, None]
                    sal[dead[:, j:e]] = 0.0
                    order = np.argsort(sal, axis=1, kind="stable")[:, :n_zero]  # (G, z, R)
                    seg = keep[:, j:e].copy()
                    np.put_along_axis(seg, order, False, axis=1)
                    keep[:, j:e] = seg
            col = w1[:, i]
            kc = keep[:, j]
            if quant is not None:
                s, z, qmin, qmax = quant
                # as mpsearch.core.formats.quantize and hessian_round: float32, np.rint
                q = np.where(kc, np.clip(np.rint(col.astype(np.float32) / s) + z, qmin, qmax), z)
                qt[:, j] = q
                deq = (q - z) * s
            else:
                deq = np.where(kc, col, 0.0)
            out[:, j] = deq
            err = (col - deq) / u1[:, i, i, None]
            w1[:, i + 1:] -= u1[:, i, i + 1:, None] * err[:, None, :]
            err1[:, i] = err
        if i2 < k:
            wt[:, i2:] -= u[:, i1:i2, i2:].transpose(0, 2, 1) @ err1
    out, keep = out.transpose(0, 2, 1), keep.transpose(0, 2, 1)
    return out, keep, None if qt is None else qt.transpose(0, 2, 1)


def _cols(a: np.ndarray, order: np.ndarray | None) -> np.ndarray:
    """``a`` with its last axis (the K columns) in ``order`` (None: as it is)."""
    return a if order is None else a[..., order]


def _select(score: np.ndarray, pat: _Pattern, starts: list[int] | None,
            keep_rows: np.ndarray | None) -> np.ndarray:
    """The kept mask (G, R, K) of the highest ``score`` (no update): the fallbacks' mask."""
    g, r, k = score.shape
    keep = np.ones(score.shape, dtype=bool)
    if keep_rows is not None:
        keep &= keep_rows[:, :, None]
    if pat.kind == "unstructured":
        n_zero = _count(pat.ratio, 0, score.size)
        if n_zero > 0:
            idx = np.argpartition(score.ravel(), n_zero - 1)[:n_zero]
            keep.reshape(-1)[idx] = False
    elif pat.kind == "n:m" and starts is not None:
        for s, e in zip(starts, [*starts[1:], k], strict=True):
            n_zero = e - s - pat.n
            if n_zero > 0:
                order = np.argsort(score[:, :, s:e], axis=2, kind="stable")[:, :, :n_zero]
                np.put_along_axis(keep[:, :, s:e], order, False, axis=2)
    return keep


def _statistic(hessian: LayerHessian | None, g: int, k: int, *, centered: bool
               ) -> tuple[np.ndarray | None, np.ndarray | None, str | None]:
    """The dense ``H`` (G, K, K) and its diagonal (G, K) this layer can use, each or None, and
    why OBS cannot run on them (None when it can)."""
    if hessian is None:
        return None, None, "no Hessian"
    diag = hessian.diagonal()
    if centered:
        diag = diag - hessian.mean**2
    if diag.shape != (g, k):
        return None, None, f"Hessian of shape {hessian.second.shape} for weight rows ({g}, ., {k})"
    if not hessian.dense:
        return None, diag, f"diagonal-only Hessian (K = {k})"
    h = hessian.centered() if centered else hessian.second
    if hessian.rows_seen < MIN_ROWS_PER_INPUT * k:
        return h, diag, (f"{hessian.rows_seen} Hessian rows for {k} inputs: the update would "
                         "fit the calibration set's noise")
    return h, diag, None


def _factor(hessian: LayerHessian, h: np.ndarray, order: np.ndarray | None, *, centered: bool,
            damp: float, factors: FactorCache) -> HessianFactor:
    """SparseGPT's factor of ``h`` in ``order``; one per (centered, tap-major order, damp),
    serving every sparsity of the layer."""
    def make() -> HessianFactor:
        hp = h if order is None else h[:, order[:, None], order[None, :]]
        return factor_hessian(hp, damp=damp)

    return factors.get(hessian, ("sparsegpt", centered, order is not None, damp), make)


def prune_layer(layer: Layer, w: np.ndarray, sparsity: Sparsity | None, *,
                hessian: LayerHessian | None, method: PruneMethod = PruneMethod.OBS,
                fmt: Format | None = None, qparams: QParams | None = None,
                centered: bool = False, block: int = 128, damp: float = 0.01,
                factors: FactorCache | None = None) -> PrunedLayer | PruneRefused:
    """Prune ``w`` (the layer's weight, its ONNX shape) to ``sparsity`` (a candidate's,
    :class:`mpsearch.core.formats.Sparsity`; None: dense).

    ``hessian``: the layer's (:mod:`mpsearch.graph.layer_hessian`); OBS needs it dense and with
    enough rows, else the mask falls back to the diagonal or to magnitude (``PrunedLayer.fallback``
    says why). ``fmt``, ``qparams``: an integer format and its (per-channel or per-tensor) scales,
    to quantize the survivors in the same pass (SparseGPT's joint mode; GPTQ for
    ``sparsity=None``); to nearest when the mask is a fallback's. ``centered``: use the covariance
    ``E[x xᵀ] - E[x]E[x]ᵀ`` (when ``mean_shift`` is corrected in the bias afterwards).
    ``factors``: where the Hessian's factors are kept between calls (a fresh cache when None).
    Returns :class:`PruneRefused` (falsy, with the reason) where the layer cannot take
    ``sparsity``: a depthwise conv's channels, n:m with fewer than m input channels."""
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    w = np.asarray(w)
    rows0 = weight_rows(layer, w)
    pat = _pattern(sparsity)
    reason = _refusal(layer, rows0, pat)
    if reason is not None:
        log.debug("%s: no %s: %s", layer.name, sparsity, reason)
        return PruneRefused(layer=layer.name, sparsity=sparsity, reason=reason)
    rows = rows0.astype(np.float64)
    g, r, k = rows.shape
    quant = None
    if fmt is not None:
        if fmt.spec.kind is not FormatKind.INT or qparams is None:
            raise ValueError(f"joint pruning and quantization needs an integer format and its "
                             f"qparams, got {fmt} and {qparams}")
        s, z = _scales(qparams, g, r)
        quant = (s, z, float(fmt.spec.weight_qmin), float(fmt.spec.qmax))
    h, diag, why = _statistic(hessian, g, k, centered=centered)
    used, fallback = method, None
    if used is PruneMethod.OBS and why is not None:
        used, fallback = PruneMethod.DIAGONAL, why
    if used is PruneMethod.DIAGONAL and diag is None:
        used, fallback = PruneMethod.MAGNITUDE, fallback or "no Hessian"
    if fallback:
        log.debug("%s: %s by %s: %s", layer.name, sparsity, used.value, fallback)

    keep_rows = channels = None
    if pat.kind == "channel":
        if used is PruneMethod.OBS:
            energy = np.einsum("grk,grk->gr", rows @ h, rows)
        elif used is PruneMethod.DIAGONAL:
            energy = np.einsum("grk,gk->gr", rows**2, diag)
        else:
            energy = (rows**2).sum(axis=2)
        n_zero = _count(pat.ratio, 0, g * r)
        channels = np.sort(np.argsort(energy.ravel(), kind="stable")[:n_zero])
        keep_rows = np.ones(g * r, dtype=bool)
        keep_rows[channels] = False
        keep_rows = keep_rows.reshape(g, r)

    order = starts = None
    if pat.kind == "n:m":
        order, starts = semi_structured_columns(layer, k, pat.m)
        if np.array_equal(order, np.arange(k)):
            order = None
    inverse = None if order is None else np.argsort(order)
    values = None
    loop = pat.kind in ("unstructured", "n:m") or quant is not None
    if used is PruneMethod.OBS and loop:
        factor = _factor(hessian, h, order, centered=centered, damp=damp,
                         factors=factors if factors is not None else FactorCache())
        c, dead = _hessian_scale(h)
        new, keep, q = _obs(_cols(rows, order), factor, c, _cols(dead, order), pat,
                            starts, keep_rows, block=block, quant=quant)
        new, keep = _cols(new, inverse), _cols(keep, inverse)
        if q is not None:
            values = _cols(q, inverse)
    else:
        score = rows**2
        if used is PruneMethod.DIAGONAL:
            score = score * np.maximum(diag, 0.0)[:, None, :]
        keep = _cols(_select(_cols(score, order), pat, starts, keep_rows), inverse)
        if quant is not None:
            s, z, qmin, qmax = quant
            q = np.clip(np.rint(rows.astype(np.float32) / s[..., None]) + z[..., None], qmin,
                        qmax)
            values = np.where(keep, q, z[..., None])
            new = (values - z[..., None]) * s[..., None]
        else:
            new = np.where(keep, rows, 0.0)
    new = new.astype(np.float32)  # what the model will compute with
    delta = new.astype(np.float64) - rows
    if h is not None:
        err: float | None = float(output_error(delta, h).sum())
    elif diag is not None:
        err = float(np.einsum("grk,gk->", delta**2, diag))
    else:
        err = None
    shift = None
    if hessian is not None and hessian.mean.shape == (g, k):
        shift = np.einsum("grk,gk->gr", delta, hessian.mean).reshape(-1)
    shape = w.shape
    return PrunedLayer(
        weight=rows_to_weight(layer, new, shape),
        values=None if values is None else rows_to_weight(
            layer, values.astype(numpy_storage_dtype(fmt)), shape),
        mask=rows_to_weight(layer, keep, shape), sparsity=sparsity, method=used,
        fallback=fallback, predicted_error=err, error_exact=h is not None, mean_shift=shift,
        channels=channels)
