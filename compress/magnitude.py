"""Gradual magnitude pruning of Keras kernels (Zhu & Gupta, "To prune, or not to prune", 2017).

Step 3 of :mod:`ctredge.compress.prune`: the kernels of Dense, Conv1D, cross and
attention layers follow the polynomial sparsity schedule during fine-tuning;
each layer's mask zeroes its smallest ``|w|`` and is applied after every
optimizer step through the variable's constraint, so pruned weights stay
exactly 0.  Pure Keras 3, no wrapper layers: at the end the masks are applied
once more and dropped, leaving plain layers with exact zeros.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from ctredge.train import layers as L

MIN_PRUNABLE = 100  # kernels with fewer weights are left dense: the target is reachable within 0.5/n


def polynomial_sparsity(step: int, target: float, begin: int, end: int, initial: float = 0.0) -> float:
    """Zhu & Gupta's sparsity at optimizer step ``step``.

    ``initial`` before ``begin``, ``target`` from ``end`` on, and in between
    ``target + (initial - target) * (1 - (step - begin) / (end - begin))**3``.
    """
    if step <= begin:
        return float(initial)
    if step >= end:
        return float(target)
    frac = (step - begin) / (end - begin)
    return float(target + (initial - target) * (1.0 - frac) ** 3)


def magnitude_mask(weights: np.ndarray, sparsity: float) -> np.ndarray:
    """Keep-mask (same shape, bool) zeroing exactly ``round(sparsity * n)`` smallest ``|w|``.

    Equivalent to ``|w| >= threshold`` with the threshold at that order
    statistic, but exact under ties (many exact zeros after earlier masks).
    """
    flat = np.abs(np.asarray(weights)).reshape(-1)
    k = int(round(sparsity * flat.size))
    keep = np.ones(flat.size, dtype=bool)
    if k > 0:
        keep[np.argpartition(flat, k - 1, kind="introselect")[:k]] = False
    return keep.reshape(np.shape(weights))


# ---------------------------------------------------------------------- unstructured
def prunable_weights(model: Any, min_size: int = MIN_PRUNABLE) -> list[Any]:
    """The kernels unstructured pruning acts on.

    Dense and Conv1D ``kernel``, CrossLayer ``kernel``/``v``/``u`` and
    TargetAttention / RecencyAttention ``kernel_i`` with at least ``min_size``
    weights; never embeddings (the recency embedding included), biases or the dense transform.
    """
    kinds = (keras.layers.Dense, keras.layers.Conv1D, L.CrossLayer, L.TargetAttention, L.RecencyAttention)
    out = []
    for layer in model.layers:
        if not isinstance(layer, kinds):
            continue
        for w in layer.trainable_weights:
            name = w.name
            if (name in ("kernel", "v", "u") or name.startswith("kernel_")) and int(np.prod(w.shape)) >= min_size:
                out.append(w)
    return out


def sparsity_of(weights: list[Any]) -> dict[str, float]:
    """Fraction of exact zeros of each weight, keyed by its path (``layer/name``)."""
    return {w.path: float(np.mean(w.numpy() == 0)) for w in weights}


class _Mask:
    """A variable constraint multiplying by a (mutable) mask after each optimizer step."""

    def __init__(self, mask: Any) -> None:
        self.mask = mask

    def __call__(self, w: Any) -> Any:
        return keras.ops.multiply(w, self.mask)


class MagnitudePruning(keras.callbacks.Callback):
    """Gradual magnitude pruning of ``weights`` to ``target`` sparsity (Zhu & Gupta 2017).

    Takes the variables, the final sparsity and the schedule (``begin``, ``end``,
    ``frequency`` in optimizer steps).  Call :meth:`attach` before ``fit`` (masks
    become variable constraints, applied after every step), :meth:`finalize` after
    it (target masks applied, if the ramp did not finish) and :meth:`detach`.
    ``done`` is True once the final sparsity is in force.
    """

    def __init__(self, weights: list[Any], target: float, begin: int, end: int, frequency: int) -> None:
        super().__init__()
        self.targets = list(weights)
        self.target, self.begin, self.end, self.frequency = float(target), int(begin), int(end), int(frequency)
        self.masks = [keras.Variable(np.ones(w.shape, dtype="float32"), trainable=False, dtype=w.dtype)
                      for w in self.targets]
        self.step = 0
        self.current = 0.0
        self.done = self.target == 0.0 or not self.targets

    def attach(self) -> None:
        for w, m in zip(self.targets, self.masks):
            w.constraint = _Mask(m)

    def detach(self) -> None:
        for w in self.targets:
            w.constraint = None

    def update(self, sparsity: float) -> None:
        """Recompute every mask at ``sparsity`` and zero the pruned weights."""
        for w, m in zip(self.targets, self.masks):
            value = w.numpy()
            keep = magnitude_mask(value, sparsity).astype(value.dtype)
            m.assign(keep)
            w.assign(value * keep)
        self.current = sparsity

    def apply(self) -> None:
        """Multiply every weight by its current mask (after restoring weights)."""
        for w, m in zip(self.targets, self.masks):
            w.assign(w.numpy() * m.numpy())

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.step += 1
        if self.done or self.step < self.begin:
            return
        if self.step >= self.end:
            self.update(self.target)
            self.done = True
        elif (self.step - self.begin) % self.frequency == 0:
            self.update(polynomial_sparsity(self.step, self.target, self.begin, self.end))

    def finalize(self) -> None:
        if not self.done:
            self.update(self.target)
            self.done = True
        self.apply()


__all__ = ["MIN_PRUNABLE", "polynomial_sparsity", "magnitude_mask", "prunable_weights", "sparsity_of",
           "MagnitudePruning"]
