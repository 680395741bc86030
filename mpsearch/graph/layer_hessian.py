"""The layer Hessian ``H = 2·E[x xᵀ]`` of every weighted layer's input, in one calibration pass.

For a layer ``y = W x + b`` (a convolution seen through im2col: every output position is a
matrix product with the ``K = C_in/groups · k_h · k_w`` inputs under the kernel), the expected
squared output error of a weight change is ``E‖δW x‖² = tr(δW E[x xᵀ] δWᵀ)``, so the second
moment ``E[x xᵀ]`` per group of input channels is the whole statistic (OBS, GPTQ, docs/design.md
§3). This module keeps ``E[x xᵀ]`` (shape ``(G, K, K)``, per output position) and the column
means ``E[x]`` (for the bias terms), averaged over samples and positions. Grouped and depthwise
convolutions get one ``K×K`` block per group (a depthwise 5×5 conv: ``C`` blocks of 25×25).

Memory stays bounded: a layer whose ``K`` exceeds :data:`MAX_DENSE_K` (4096, i.e. 128 MB of
float64 for one dense block) keeps only the diagonal ``E[x_k²]``; the estimators then use the
diagonal and rounding falls back to round-to-nearest. Layers that read the same tensor with
the same geometry share one statistic. Of a large feature map only a grid of output
positions (every r-th row and column) enters the sums: about ``2·K`` per sample for a block of
``K`` columns (:data:`POSITIONS_PER_INPUT`; at least :data:`MIN_POSITIONS` = 64, at most
:data:`MAX_POSITIONS` = 1024). Over 64 samples a depthwise 3×3 block (45 unknowns) sees 4,096
rows, a 1×1 conv with 96 inputs 12,288 (4·K per sample gave the same single-group rank
correlation, 0.989, on EfficientNet-Lite0 and cost about 1 s more). Without the cap, the
depthwise products cost more than the rest of the calibration pass. The im2col columns of
those positions are a strided view of the padded input (positions left out are never
unfolded), copied a sample at a time into the products (at most 32 MB of padded input at
once); a 1×1 conv reads its input as it is. numpy (OpenBLAS) does the products in float32 per
batch, accumulated in float64: as fast as torch's here (1.5 s either way, one thread, for
EfficientNet-Lite0's 50 layers over 32 samples), faster when the cores are shared, and without
torch's 2 s import.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from onnx import NodeProto

from mpsearch.core.ops import OpRole
from mpsearch.graph.layer_graph import Layer, LayerGraph

__all__ = ["MAX_DENSE_K", "HessianCollector", "LayerHessian", "hessian_specs"]

log = logging.getLogger(__name__)

MAX_DENSE_K = 4096
MAX_POSITIONS = 1024  # output positions per sample that enter the statistic, evenly strided
POSITIONS_PER_INPUT = 2  # ... and no more than this many per column of the block (K)
MIN_POSITIONS = 64
UNFOLD_FLOATS = 1 << 23  # samples unfolded at once: at most 32 MB of im2col columns


@dataclass(frozen=True, kw_only=True, eq=False)
class LayerHessian:
    """``E[x xᵀ]`` and ``E[x]`` of a layer's im2col input, per output position.

    ``second``: ``(G, K, K)`` dense, or ``(G, K)`` (its diagonal) when ``dense`` is False.
    ``mean``: ``(G, K)``. ``positions``: output positions per sample (1 for a Gemm)."""

    second: np.ndarray
    mean: np.ndarray
    positions: float
    rows_seen: int
    dense: bool

    def diagonal(self) -> np.ndarray:
        return np.diagonal(self.second, axis1=1, axis2=2) if self.dense else self.second

    def centered(self) -> np.ndarray:
        """The covariance ``E[x xᵀ] - E[x]E[x]ᵀ`` (what remains after bias correction)."""
        if self.dense:
            return self.second - self.mean[:, :, None] * self.mean[:, None, :]
        return self.second - self.mean**2


@dataclass(frozen=True, kw_only=True)
class _Spec:
    """How to unfold one layer's input: a key shared by layers with equal geometry."""

    tensor: str
    kind: str  # "conv" or "linear"
    groups: int
    k: int  # columns per group
    kernel: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()  # begin..., end...
    dilations: tuple[int, ...] = ()
    auto_pad: str = "NOTSET"


def _ints(node: NodeProto, name: str) -> tuple[int, ...] | None:
    for a in node.attribute:
        if a.name == name:
            return tuple(int(v) for v in a.ints)
    return None


def _conv_spec(layer: Layer, node: NodeProto) -> _Spec | None:
    shape = layer.weight_shape
    if shape is None or len(shape) not in (3, 4):
        return None
    kernel = tuple(shape[2:])
    nd = len(kernel)
    auto = next((a.s.decode() for a in node.attribute if a.name == "auto_pad"), "NOTSET")
    return _Spec(tensor=layer.inputs[0], kind="conv", groups=layer.conv_groups,
                 k=int(np.prod(shape[1:])), kernel=kernel,
                 strides=_ints(node, "strides") or (1,) * nd,
                 pads=_ints(node, "pads") or (0,) * (2 * nd),
                 dilations=_ints(node, "dilations") or (1,) * nd, auto_pad=auto)


def grid_step(ho: int, wo: int, cap: int) -> int:
    """The least r whose grid of every r-th output row and column has at most ``cap``
    positions."""
    r = max(1, math.ceil(math.sqrt(ho * wo / cap)))
    while -(-ho // r) * -(-wo // r) > cap:
        r += 1
    return r


def hessian_specs(lg: LayerGraph) -> dict[str, _Spec]:
    """Layer name -> how its Hessian is collected, for every layer whose layout is known."""
    out: dict[str, _Spec] = {}
    for name, layer in lg.layers.items():
        if layer.role is not OpRole.LAYER or layer.weight_shape is None:
            continue
        if layer.op_type == "Conv":
            spec = _conv_spec(layer, lg.nodes[name])
        elif layer.op_type in ("Gemm", "MatMul") and len(layer.weight_shape) == 2:
            k_axis = 1 if layer.channel_axis == 0 else 0
            spec = _Spec(tensor=layer.inputs[0], kind="linear", groups=1,
                         k=layer.weight_shape[k_axis])
        else:
            spec = None
        if spec is not None:
            out[name] = spec
    return out


def _same_pads(size: tuple[int, ...], spec: _Spec) -> tuple[int, ...]:
    begin, end = [], []
    for n, k, s, d in zip(size, spec.kernel, spec.strides, spec.dilations, strict=True):
        out = -(-n // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - n)
        small, big = total // 2, total - total // 2
        b, e = (small, big) if spec.auto_pad == "SAME_UPPER" else (big, small)
        begin.append(b)
        end.append(e)
    return (*begin, *end)


class _Accumulator:
    def __init__(self, spec: _Spec) -> None:
        self.spec = spec
        self.dense = spec.k <= MAX_DENSE_K
        g, k = spec.groups, spec.k
        self.second = np.zeros((g, k, k) if self.dense else (g, k), np.float64)
        self.sum = np.zeros((g, k), np.float64)
        self.rows = 0
        self.samples = 0
        self.positions = min(MAX_POSITIONS, max(MIN_POSITIONS, POSITIONS_PER_INPUT * spec.k))
        # what the last update took (before the first: the dense products' size), for the
        # order in which parallel updates start; the statistic does not depend on it
        self.seconds = float(spec.groups * spec.k * spec.k) * 1e-9

    def timed_update(self, x: np.ndarray) -> None:
        t0 = time.perf_counter()
        self.update(x)
        self.seconds = time.perf_counter() - t0

    def update(self, x: np.ndarray) -> None:
        spec = self.spec
        t = np.ascontiguousarray(x, dtype=np.float32)
        if spec.kind == "linear":
            self._add_t(t.reshape(-1, spec.k).T[None])  # (1, K, rows)
            self.samples += x.shape[0] if x.ndim > 1 else 1
            return
        if t.ndim == 3:  # Conv1d as a 2-D conv of height 1
            t = t[:, :, None, :]
        n, g = t.shape[0], spec.groups
        self.samples += n
        if (spec.groups == 1 and all(k == 1 for k in spec.kernel) and not any(spec.pads)
                and all(s == 1 for s in spec.strides) and spec.auto_pad == "NOTSET"):
            cols = self._positions(t.reshape(n, spec.k, -1))  # a 1x1 conv reads x as is
            self._add_t(cols.transpose(1, 0, 2).reshape(1, spec.k, -1))
            return
        kernel = spec.kernel if len(spec.kernel) == 2 else (1, *spec.kernel)
        strides = spec.strides if len(spec.strides) == 2 else (1, *spec.strides)
        dil = spec.dilations if len(spec.dilations) == 2 else (1, *spec.dilations)
        if spec.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            pads = _same_pads(tuple(x.shape[2:]), spec)
        elif spec.auto_pad == "VALID":
            pads = (0,) * len(spec.pads)
        else:
            pads = spec.pads
        if len(pads) == 2:
            pads = (0, pads[0], 0, pads[1])
        top, left, bottom, right = pads
        kh, kw = kernel
        (sh, sw), (dh, dw) = strides, dil
        hp, wp = t.shape[2] + top + bottom, t.shape[3] + left + right
        ho, wo = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1
        # A grid of output positions, every r-th row and column: the same count as
        # MAX_POSITIONS evenly spread, gathered by slicing instead of unfolding the whole map.
        r = grid_step(ho, wo, self.positions)
        rows, cols_n = -(-ho // r), -(-wo // r)
        per_sample = spec.k * g * rows * cols_n
        step = max(1, UNFOLD_FLOATS // max(per_sample, 1))
        for i in range(0, n, step):
            xi = np.pad(t[i:i + step], ((0, 0), (0, 0), (top, bottom), (left, right)))
            b, c = xi.shape[:2]
            sb, sc, sy, sx = xi.strides
            # A view (b, C, kh, kw, rows, cols) of the sampled im2col columns, channel-major
            # then kernel offsets as the weight's (C_in/groups, kh, kw) layout in each group.
            taps = np.lib.stride_tricks.as_strided(
                xi, (b, c, kh, kw, rows, cols_n),
                (sb, sc, sy * dh, sx * dw, sy * sh * r, sx * sw * r), writeable=False)
            self._add_samples(taps, g)

    def _positions(self, cols: np.ndarray) -> np.ndarray:
        """At most ``self.positions`` output positions per sample, evenly strided."""
        length = cols.shape[-1]
        if length <= self.positions:
            return cols
        return cols[..., ::-(-length // self.positions)]

    def _add_samples(self, taps: np.ndarray, g: int) -> None:  # (b, C, kh, kw, rows, cols)
        b, k = taps.shape[0], self.spec.k
        if g == 1:  # one large product over all the samples' positions
            self._add_t(taps.reshape(b, k, -1).transpose(1, 0, 2).reshape(1, k, -1))
            return
        # Many small blocks (depthwise): a batched product per sample, its columns copied
        # while they are in cache.
        acc = None
        for i in range(b):
            x = taps[i].reshape(g, k, -1)
            self.rows += x.shape[2]
            self.sum += x.sum(axis=2, dtype=np.float64)
            if not self.dense:
                self.second += np.einsum("gkr,gkr->gk", x, x, dtype=np.float64)
            elif acc is None:
                acc = np.matmul(x, x.transpose(0, 2, 1))
            else:
                acc += np.matmul(x, x.transpose(0, 2, 1))
        if acc is not None:
            self.second += acc

    def _add_t(self, cols: np.ndarray) -> None:  # (G, K, rows) float32
        cols = np.ascontiguousarray(cols)
        self.rows += cols.shape[2]
        self.sum += cols.sum(axis=2, dtype=np.float64)
        if self.dense:
            self.second += np.matmul(cols, cols.transpose(0, 2, 1))
        else:
            self.second += np.einsum("gkr,gkr->gk", cols, cols, dtype=np.float64)

    def result(self) -> LayerHessian:
        n = max(self.rows, 1)
        return LayerHessian(second=self.second / n, mean=self.sum / n,
                            positions=self.rows / max(self.samples, 1), rows_seen=self.rows,
                            dense=self.dense)


class HessianCollector:
    """A calibration collector (:class:`mpsearch.graph.calibrate.Collector`) of layer Hessians."""

    def __init__(self, lg: LayerGraph, layers: Iterable[str] | None = None) -> None:
        specs = hessian_specs(lg)
        wanted = set(specs) if layers is None else set(layers) & set(specs)
        self._layer_spec = {n: specs[n] for n in sorted(wanted)}
        self._acc: dict[_Spec, _Accumulator] = {}
        for spec in self._layer_spec.values():
            if spec not in self._acc:
                self._acc[spec] = _Accumulator(spec)
        big = [n for n, s in self._layer_spec.items() if s.k > MAX_DENSE_K]
        if big:
            log.info("%d layer(s) wider than %d inputs keep a diagonal Hessian: %s", len(big),
                     MAX_DENSE_K, ", ".join(big[:5]))

    def tensors(self) -> Iterable[str]:
        return {s.tensor for s in self._layer_spec.values()}

    def update(self, values: Mapping[str, np.ndarray]) -> None:
        for part in self.parts(values):
            part()

    def parts(self, values: Mapping[str, np.ndarray]) -> list[Callable[[], None]]:
        """One batch's update, one independent part per statistic, the slowest first (by the
        last batch's times: a pool of threads that takes them in turn then ends together)."""
        accs = [a for spec, a in self._acc.items() if spec.tensor in values]
        accs.sort(key=lambda a: -a.seconds)
        return [functools.partial(a.timed_update, values[a.spec.tensor]) for a in accs]

    def result(self) -> dict[str, LayerHessian]:
        done = {spec: acc.result() for spec, acc in self._acc.items()}
        return {name: done[spec] for name, spec in self._layer_spec.items()}
