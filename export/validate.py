"""Validation of an ONNX graph against its Keras model: the gate before any write.

ONNX Runtime (CPU) and Keras score the same seeded inputs at several batch
sizes; any output further apart than ``atol`` raises
:class:`~ctredge.errors.ValidationError` naming each output's max difference.
The ONNX graph must also have exactly the FeatureSpec's inputs and the output
``ctr``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from ctredge.errors import ValidationError
from ctredge.features import INPUT_CAT, INPUT_DENSE, INPUT_HIST, OUTPUT_CTR, FeatureSpec

DEFAULT_BATCHES = (1, 7, 512)
DEFAULT_ATOL = 1e-5


def random_feeds(spec: FeatureSpec, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs that exercise the contract: NaN and negative counts, id 0, padding.

    Returns a feed dict keyed by input name.
    """
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    if spec.n_dense:
        dense = rng.lognormal(1.0, 1.5, size=(batch, spec.n_dense)).astype(np.float32)
        dense[rng.random(dense.shape) < 0.1] = np.nan
        dense[rng.random(dense.shape) < 0.05] *= -1
        feeds[INPUT_DENSE] = dense
    if spec.n_cat:
        cat = (rng.random((batch, spec.n_cat)) * spec.buckets[None, :]).astype(np.int64)
        cat[rng.random(cat.shape) < 0.05] = 0
        feeds[INPUT_CAT] = cat
    if spec.history is not None:
        item = spec.cat[spec.item_feature_index]  # type: ignore[index]
        L = spec.history.max_len
        hist = rng.integers(1, item.buckets, size=(batch, L)).astype(np.int64)
        lengths = rng.integers(0, L + 1, size=batch)
        hist[np.arange(L)[None, :] >= lengths[:, None]] = 0
        feeds[INPUT_HIST] = hist
    for t in spec.request_text:   # unit vectors (as the encoder gives), a fifth of the rows without text
        v = rng.normal(0, 1, size=(batch, t.dim)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        v[rng.random(batch) < 0.2] = 0.0
        feeds[t.input_name] = v
    return feeds


def check_signature(session: Any, spec: FeatureSpec) -> None:
    """Raise unless an ORT session has exactly the spec's inputs and the output ``ctr``."""
    expected = spec.onnx_input_types()
    got = {i.name: (i.type, len(i.shape)) for i in session.get_inputs()}
    if got != expected:
        raise ValidationError(f"ONNX inputs differ from the FeatureSpec: expected {expected}, got {got}")
    outs = [o.name for o in session.get_outputs()]
    if outs != [OUTPUT_CTR]:
        raise ValidationError(f"ONNX outputs must be [{OUTPUT_CTR!r}], got {outs}")


def compare(
    reference: Callable[[dict[str, np.ndarray]], np.ndarray],
    candidate: Callable[[dict[str, np.ndarray]], np.ndarray],
    spec: FeatureSpec,
    *,
    batches: Sequence[int] = DEFAULT_BATCHES,
    atol: float = DEFAULT_ATOL,
    seed: int = 0,
) -> dict[str, float]:
    """Max |reference - candidate| per batch size on seeded inputs.

    Returns ``{"batch_1": diff, ...}``.

    Raises:
        ValidationError: a shape differs, an output is not finite, or a difference exceeds ``atol``.
    """
    diffs: dict[str, float] = {}
    failures = []
    for i, b in enumerate(batches):
        feeds = random_feeds(spec, b, seed=seed + i)
        ref = np.asarray(reference(feeds), dtype=np.float64)
        got = np.asarray(candidate(feeds), dtype=np.float64)
        if ref.shape != got.shape:
            raise ValidationError(f"batch {b}: output {OUTPUT_CTR!r} has shape {list(got.shape)}, "
                                  f"expected {list(ref.shape)}")
        if not np.isfinite(got).all():
            raise ValidationError(f"batch {b}: output {OUTPUT_CTR!r} has non-finite values")
        d = float(np.max(np.abs(ref - got))) if ref.size else 0.0
        diffs[f"batch_{b}"] = d
        if d > atol:
            failures.append(f"batch {b}: max |diff| of {OUTPUT_CTR!r} = {d:.3g}")
    if failures:
        raise ValidationError(f"ONNX Runtime disagrees with the reference beyond atol={atol:g}: "
                              + "; ".join(failures))
    return diffs


def ort_predictor(session: Any) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    """A feed-dict -> ``ctr`` function over an ONNX Runtime session."""
    def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
        return session.run([OUTPUT_CTR], feeds)[0]

    return run


def cpu_session(model: Any, *, threads: int = 1) -> Any:
    """An ONNX Runtime CPU session (``model``: path, bytes or ModelProto); 1 thread, no spinning.

    Raises:
        ValidationError: ONNX Runtime refuses the model (the message says why).
    """
    import onnxruntime as ort

    from ctredge.onnxrt import ort_session_options

    if hasattr(model, "SerializeToString"):
        model = model.SerializeToString()
    opts = ort_session_options(intra_op_threads=threads)
    try:
        return ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ValidationError(f"ONNX Runtime cannot load the model: {exc}") from exc
