"""Compare a quantized model with its FP32 original on evaluation data.

Per output, over the whole set: ``SQNR = 10·log10(Σ y² / Σ (y - ŷ)²)`` (dB), the mean over
samples of the cosine similarity of the flattened outputs, and, for classifier outputs,
top-1 agreement with FP32 and top-5 containment (FP32's top-1 class among the quantized
model's five best); with labels, the accuracy of both models. Each SQNR comes with a 90%
bootstrap interval over samples (:func:`sqnr_interval`: 1,000 resamples, seeded, so the same
data gives the same interval), and two plans measured on the same samples compare by the
paired interval of their difference (:func:`paired_difference`): 16 samples rarely tell
0.1 dB apart. Plain numpy: a percentile bootstrap of a ratio of sums is a few lines, and
scipy's ``bootstrap`` resamples one statistic of one sample at a time, 20x slower here.
An output is taken for a
classifier when it is ``[N, C]`` with ``C ≥ 2`` and its FP32 rows are not unit vectors
(L2-normalised rows are embeddings, where "top-1" means nothing); ``classifier=`` overrides.
Both models run batch by batch on ONNX Runtime's CPU execution provider (a quantized model
in memory in the form it runs fastest there, :mod:`mpsearch.graph.folding`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
import onnxruntime as ort

from mpsearch.graph.calibrate import make_session
from mpsearch.graph.folding import measuring_session

__all__ = ["EvalResult", "OutputAccumulator", "OutputMetrics", "evaluate", "paired_difference",
           "reference_run", "sqnr_db", "sqnr_interval"]

CONFIDENCE = 0.90  # of every interval given
RESAMPLES = 1000


def sqnr_db(signal_power: float, noise_power: float) -> float:
    if noise_power <= 0:
        return math.inf
    if signal_power <= 0:
        return -math.inf
    return 10.0 * math.log10(signal_power / noise_power)


def _resampled(n: int, seed: int) -> np.ndarray:
    """``RESAMPLES`` bootstrap draws of ``n`` sample indices, the same for the same ``n``."""
    return np.random.default_rng(seed).integers(0, n, size=(RESAMPLES, n))


def _bounds(values: np.ndarray) -> tuple[float, float] | None:
    """The central :data:`CONFIDENCE` interval of ``values`` (None where it is not finite: a
    resample without noise)."""
    a = (1 - CONFIDENCE) / 2
    with np.errstate(invalid="ignore"):
        lo, hi = np.quantile(values, [a, 1 - a])
    return (float(lo), float(hi)) if np.isfinite(lo) and np.isfinite(hi) else None


def _db(signal: np.ndarray, noise: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return 10.0 * np.log10(signal / noise)


def sqnr_interval(signal: np.ndarray, noise: np.ndarray, *, seed: int = 0
                  ) -> tuple[float, float] | None:
    """The :data:`CONFIDENCE` bootstrap interval of ``10·log10(Σ signal / Σ noise)`` over
    samples (``signal``, ``noise``: each sample's summed powers); None for fewer than 2
    samples or no noise at all."""
    signal, noise = np.asarray(signal, np.float64), np.asarray(noise, np.float64)
    if signal.size < 2 or not noise.any():
        return None
    idx = _resampled(signal.size, seed)
    return _bounds(_db(signal[idx].sum(axis=1), noise[idx].sum(axis=1)))


def paired_difference(signal: np.ndarray, noise_a: np.ndarray, noise_b: np.ndarray, *,
                      seed: int = 0) -> tuple[float, tuple[float, float] | None]:
    """SQNR of plan a minus SQNR of plan b (dB), both measured on the same samples, and the
    bootstrap interval of that difference, resampling samples jointly (None for fewer than 2
    samples or a plan without noise)."""
    s, a, b = (np.asarray(v, np.float64) for v in (signal, noise_a, noise_b))
    d = float(_db(s.sum(), a.sum()) - _db(s.sum(), b.sum()))
    if s.size < 2 or not a.any() or not b.any():
        return d, None
    idx = _resampled(s.size, seed)
    ss = s[idx].sum(axis=1)
    return d, _bounds(_db(ss, a[idx].sum(axis=1)) - _db(ss, b[idx].sum(axis=1)))


@dataclass(frozen=True, kw_only=True)
class OutputMetrics:
    name: str
    sqnr_db: float
    cosine: float
    sqnr_ci: tuple[float, float] | None = None  # CONFIDENCE interval over samples
    top1_agreement: float | None = None
    top5_containment: float | None = None
    accuracy: float | None = None
    accuracy_fp32: float | None = None


@dataclass(frozen=True, kw_only=True)
class EvalResult:
    outputs: tuple[OutputMetrics, ...]
    samples: int
    # output -> each sample's (signal power, noise power), for paired comparisons
    powers: Mapping[str, tuple[np.ndarray, np.ndarray]] = field(
        default_factory=dict, repr=False, compare=False)

    def to_dict(self) -> dict:
        return {"samples": self.samples, "outputs": [asdict(o) for o in self.outputs]}

    def versus(self, other: EvalResult, output: str | None = None
               ) -> tuple[float, tuple[float, float] | None]:
        """This SQNR minus ``other``'s on ``output`` (default: the primary), measured on the
        same samples, with its paired interval (:func:`paired_difference`)."""
        name = output or self.primary.name
        (s, a), (s2, b) = self.powers[name], other.powers[name]
        if s.shape != s2.shape or not np.allclose(s, s2):
            raise ValueError("the two results were not measured on the same samples")
        return paired_difference(s, a, b)

    @property
    def primary(self) -> OutputMetrics:
        return self.outputs[0]


class OutputAccumulator:
    """SQNR, cosine and (for classifiers) top-1/top-5 agreement of one output, batch by
    batch (shared by :func:`evaluate` and :func:`mpsearch.device.verify.verify`)."""

    def __init__(self, classifier: bool | None) -> None:
        self.sig = self.noise = self.cos = 0.0
        self.n = self.top1 = self.top5 = self.correct = self.correct_ref = 0
        self.classifier = classifier
        self.sig_rows: list[np.ndarray] = []
        self.noise_rows: list[np.ndarray] = []

    def update(self, ref: np.ndarray, q: np.ndarray, labels: np.ndarray | None) -> None:
        r = ref.astype(np.float64).reshape(len(ref), -1)
        y = q.astype(np.float64).reshape(len(q), -1)
        self.sig_rows.append((r**2).sum(axis=1))
        self.noise_rows.append(((r - y) ** 2).sum(axis=1))
        self.sig += float(self.sig_rows[-1].sum())
        self.noise += float(self.noise_rows[-1].sum())
        nr, ny = np.linalg.norm(r, axis=1), np.linalg.norm(y, axis=1)
        denom = np.where(nr * ny > 0, nr * ny, 1.0)
        cos = np.where(nr * ny > 0, (r * y).sum(axis=1) / denom, (nr == ny).astype(float))
        self.cos += float(cos.sum())
        self.n += len(r)
        if self.classifier is None:
            unit = bool(np.all(np.abs(nr - 1.0) < 1e-3))
            self.classifier = ref.ndim == 2 and ref.shape[1] >= 2 and not unit
        if self.classifier and ref.ndim == 2:
            ref_top = ref.argmax(axis=1)
            self.top1 += int((q.argmax(axis=1) == ref_top).sum())
            k = min(5, q.shape[1])
            top5 = np.argpartition(-q, k - 1, axis=1)[:, :k]
            self.top5 += int((top5 == ref_top[:, None]).any(axis=1).sum())
            if labels is not None:
                self.correct += int((q.argmax(axis=1) == labels).sum())
                self.correct_ref += int((ref_top == labels).sum())

    def powers(self) -> tuple[np.ndarray, np.ndarray]:
        """Each sample's signal and noise power."""
        if not self.sig_rows:
            return np.zeros(0), np.zeros(0)
        return np.concatenate(self.sig_rows), np.concatenate(self.noise_rows)

    def result(self, name: str, with_labels: bool) -> OutputMetrics:
        n = max(self.n, 1)
        cls = bool(self.classifier) and self.n > 0
        return OutputMetrics(
            name=name, sqnr_db=sqnr_db(self.sig, self.noise), cosine=self.cos / n,
            sqnr_ci=sqnr_interval(*self.powers()),
            top1_agreement=self.top1 / n if cls else None,
            top5_containment=self.top5 / n if cls else None,
            accuracy=self.correct / n if cls and with_labels else None,
            accuracy_fp32=self.correct_ref / n if cls and with_labels else None)


def reference_run(reference: onnx.ModelProto | str,
                  batches: Iterable[Mapping[str, np.ndarray]], *, threads: int = 0
                  ) -> list[tuple[Mapping[str, np.ndarray], dict[str, np.ndarray]]]:
    """The FP32 model's outputs per batch, with the batch: run it once, compare several
    quantized models against it (``evaluate(..., reference_outputs=...)``)."""
    sess = make_session(reference, threads=threads)
    names = [o.name for o in sess.get_outputs()]
    return [(batch, dict(zip(names, sess.run(names, dict(batch)), strict=True)))
            for batch in batches]


def evaluate(reference: onnx.ModelProto | str,
             quantized: onnx.ModelProto | str | ort.InferenceSession,
             batches: Iterable[Mapping[str, np.ndarray]] | None = None, *,
             labels: np.ndarray | None = None, classifier: bool | None = None,
             progress: Callable[[int], None] | None = None,
             reference_outputs: Sequence[tuple[Mapping[str, np.ndarray],
                                               Mapping[str, np.ndarray]]] | None = None,
             threads: int = 0) -> EvalResult:
    """Run both models over ``batches`` and compare every output of the reference
    (``reference_outputs``: batches with the reference's outputs from :func:`reference_run`,
    instead of ``batches``). ``quantized``: a model, or a session of one (run on several
    parts of the data). ``threads``: the quantized session's ORT threads (0: ORT's default),
    for runs side by side (:func:`mpsearch.core.threads.fan_out`)."""
    if isinstance(quantized, ort.InferenceSession):
        q_s = quantized
    elif isinstance(quantized, onnx.ModelProto):
        q_s = measuring_session(quantized, threads=threads)
    else:
        q_s = make_session(quantized, threads=threads)
    q_names = {o.name for o in q_s.get_outputs()}
    if reference_outputs is None:
        if batches is None:
            raise ValueError("evaluate needs batches or reference_outputs")
        reference_outputs = reference_run(reference, batches)
    names = [n for n in (reference_outputs[0][1] if reference_outputs else ()) if n in q_names]
    acc = {n: OutputAccumulator(classifier) for n in names}
    seen = 0
    for batch, ref in reference_outputs:
        q_out = q_s.run(names, dict(batch))
        n = len(ref[names[0]])
        lab = labels[seen:seen + n] if labels is not None else None
        for name, q in zip(names, q_out, strict=True):
            acc[name].update(ref[name], q, lab)
        seen += n
        if progress:
            progress(n)
    return EvalResult(outputs=tuple(acc[n].result(n, labels is not None) for n in names),
                      samples=seen, powers={n: acc[n].powers() for n in names})
