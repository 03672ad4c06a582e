"""Row-wise symmetric int8/int4 quantization of embedding tables: the numpy reference.

Row ``r`` of a table ``E [rows, dim]`` is stored as integers ``q[r]`` and a
scale ``s[r] = max|E[r]| / qmax`` (``qmax`` 127 or 7), so ``E[r] ~= q[r] * s[r]``.
The int4 layout (:func:`pack_int4`): byte ``k`` of a row holds column ``k`` in
its low nibble and column ``k + ceil(dim/2)`` in its high nibble, each stored
as ``q + 8``.  The ONNX graphs that :mod:`ctredge.compress.graph` writes compute
exactly :func:`dequantize_rows_int8` / :func:`dequantize_rows_int4` for a
gathered row; the tests hold them to it.
"""

from __future__ import annotations

import numpy as np

from ctredge.errors import ConfigError


def pack_int4(q: np.ndarray) -> np.ndarray:
    """Pack int4 values ``[rows, dim]`` (integers in ``[-8, 7]``) two per byte.

    Returns uint8 ``[rows, ceil(dim/2)]``: byte ``k`` holds ``q[:, k] + 8`` in
    its low nibble and ``q[:, k + ceil(dim/2)] + 8`` in its high nibble (an odd
    ``dim`` is padded with a 0 value).

    Raises:
        ConfigError: ``q`` is not 2-D or holds values outside ``[-8, 7]``.
    """
    q = np.asarray(q)
    if q.ndim != 2:
        raise ConfigError(f"pack_int4: expected a 2-D array [rows, dim], got shape {list(q.shape)}")
    if q.size and (q.min() < -8 or q.max() > 7):
        raise ConfigError(f"pack_int4: values must lie in [-8, 7], got [{q.min()}, {q.max()}]")
    rows, dim = q.shape
    half = (dim + 1) // 2
    nib = np.full((rows, 2 * half), 8, dtype=np.uint8)
    nib[:, :dim] = (q.astype(np.int16) + 8).astype(np.uint8)
    return nib[:, :half] | (nib[:, half:] << 4)


def unpack_int4(packed: np.ndarray, dim: int) -> np.ndarray:
    """Inverse of :func:`pack_int4`: uint8 ``[rows, ceil(dim/2)]`` -> int8 ``[rows, dim]``.

    Raises:
        ConfigError: ``packed`` is not 2-D uint8 of ``ceil(dim/2)`` columns.
    """
    packed = np.asarray(packed)
    if packed.ndim != 2 or packed.dtype != np.uint8 or packed.shape[1] != (dim + 1) // 2:
        raise ConfigError(f"unpack_int4: expected uint8 [rows, {(dim + 1) // 2}] for dim {dim}, "
                          f"got {packed.dtype} {list(packed.shape)}")
    nib = np.concatenate([packed & 0x0F, packed >> 4], axis=1)[:, :dim]
    return (nib.astype(np.int16) - 8).astype(np.int8)


def _row_scales(table: np.ndarray, qmax: int, method: str) -> np.ndarray:
    """Per-row fp32 scales: ``max|row| / qmax`` or the least-squared-error clipping of it."""
    amax = np.abs(table).max(axis=1).astype(np.float32)
    if method == "absmax":
        scale = amax / np.float32(qmax)
    else:
        ratios = np.linspace(0.5, 1.0, 26, dtype=np.float32)
        scale = np.empty_like(amax)
        for lo in range(0, table.shape[0], 32768):
            t = table[lo:lo + 32768]
            cand = amax[lo:lo + 32768, None] * ratios[None, :] / np.float32(qmax)  # [r, k]
            safe = np.where(cand > 0, cand, np.float32(1))
            q = np.clip(np.rint(t[:, None, :] / safe[:, :, None]), -qmax, qmax)
            err = ((q * safe[:, :, None] - t[:, None, :]) ** 2).sum(axis=2)
            scale[lo:lo + 32768] = cand[np.arange(len(t)), err.argmin(axis=1)]
    return np.where(scale > 0, scale, np.float32(1)).astype(np.float32)  # an all-zero row: q = 0


def quantize_rows_int8(table: np.ndarray, method: str = "absmax") -> tuple[np.ndarray, np.ndarray]:
    """Row-wise symmetric int8: returns ``(q int8 [rows, dim] in [-127, 127], scale fp32 [rows])``."""
    table = _as_table(table)
    scale = _row_scales(table, 127, method)
    q = np.clip(np.rint(table / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


def quantize_rows_int4(table: np.ndarray, method: str = "absmax") -> tuple[np.ndarray, np.ndarray]:
    """Row-wise symmetric int4: returns ``(packed uint8 [rows, ceil(dim/2)], scale fp32 [rows])``.

    Values lie in ``[-7, 7]`` before packing (:func:`pack_int4`).
    """
    table = _as_table(table)
    scale = _row_scales(table, 7, method)
    q = np.clip(np.rint(table / scale[:, None]), -7, 7).astype(np.int8)
    return pack_int4(q), scale


def dequantize_rows_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``q * scale[:, None]`` in fp32: what the int8 graph computes for a gathered row."""
    return q.astype(np.float32) * np.asarray(scale, np.float32).reshape(-1, 1)


def dequantize_rows_int4(packed: np.ndarray, scale: np.ndarray, dim: int) -> np.ndarray:
    """``unpack_int4(packed) * scale[:, None]`` in fp32: what the int4 graph computes."""
    return unpack_int4(packed, dim).astype(np.float32) * np.asarray(scale, np.float32).reshape(-1, 1)


def _as_table(table: np.ndarray) -> np.ndarray:
    table = np.asarray(table, dtype=np.float32)
    if table.ndim != 2:
        raise ConfigError(f"an embedding table must be 2-D [rows, dim], got shape {list(table.shape)}")
    if not np.isfinite(table).all():
        raise ConfigError("the embedding table holds NaN or infinite values")
    return table


__all__ = ["pack_int4", "unpack_int4", "quantize_rows_int8", "quantize_rows_int4", "dequantize_rows_int8",
           "dequantize_rows_int4"]
