"""Is a static int8 (QDQ) model safe to serve? Fused vs float-simulated, and int16 saturation risk.

Two checks, ONNX Runtime + numpy only (no TensorFlow):

* :func:`fused_vs_simulated` scores the QDQ model twice: with ORT's graph
  optimizations on (QDQ pairs fused into int8 kernels: what the server runs) and
  with ``ORT_DISABLE_ALL`` (QuantizeLinear / DequantizeLinear run as float ops:
  the float simulation of the same quantization).  Their difference is the
  error the *kernels* add on this CPU; on x86 without VNNI a U8S8 model that
  saturates differs by tenths of a probability (0.33 in issue 11).
* :func:`saturation_risk` measures, in numpy, what breaks on x86 without VNNI:
  the U8S8 kernels there (``VPMADDUBSW``) sum two adjacent uint8 x int8 products
  into a *saturating* int16.  For every quantized MatMul/Gemm it takes the
  uint8 activations the calibration rows produce and the int8 weights, and
  counts the pair sums outside [-32768, 32767] (:func:`pair_overflow`).  The
  figure does not depend on the CPU it is computed on, so a VNNI machine can
  tell whether the model would saturate on one without.

U8U8 weights run on a kernel that widens both operands to int16 and sums
with ``VPMADDWD`` into int32 (no int16 sum), so their risk is 0 by
construction; S8 activations are not modelled (``None``).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from ctredge import metrics as M
from ctredge.errors import ConfigError, ValidationError

INT16_MIN, INT16_MAX = -32768, 32767
#: the default max |fused - simulated| in probability: 15x the worst difference measured with VNNI on
#: the demo data (6.7e-4 over 20k test rows, every int8 config, ctr-edge included), 33x below the
#: 0.33 a saturating CPU gave (issue 11)
DEFAULT_TOLERANCE = 0.01


def simulated_session(model: Any) -> Any:
    """An ORT CPU session with every graph optimization off: QDQ runs as float ops (the float simulation).

    Takes a ModelProto, serialized bytes or a path.  Raises :class:`ValidationError`
    when ONNX Runtime refuses the model.
    """
    import onnxruntime as ort

    from ctredge.onnxrt import ort_session_options

    if hasattr(model, "SerializeToString"):
        model = model.SerializeToString()
    opts = ort_session_options()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        return ort.InferenceSession(model if isinstance(model, bytes) else str(model), sess_options=opts,
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ValidationError(f"ONNX Runtime cannot load the model without optimizations: {exc}") from exc


def fused_vs_simulated(model: Any, feeds: Mapping[str, np.ndarray], labels: np.ndarray | None = None, *,
                       p_fused: np.ndarray | None = None) -> dict[str, Any]:
    """Score ``model`` with fused int8 kernels and with the float simulation; compare.

    Takes the quantized model (ModelProto, bytes or path), feed dicts, the rows'
    labels (optional: AUCs are ``None`` without them) and the fused predictions
    when the caller already has them (``compress all`` scored them with
    :func:`ctredge.compress.scoring.ort_predict`).  Returns ``{"rows",
    "max_abs_diff", "mean_abs_diff", "auc_fused", "auc_simulated"}`` (probabilities).

    Raises:
        ConfigError: feeds that do not fit the model, or ``p_fused`` of another length.
        ValidationError: ONNX Runtime refuses the model.
    """
    from ctredge.compress.scoring import ort_predict

    if p_fused is None:
        p_fused = ort_predict(model, feeds)
    p_sim = ort_predict(simulated_session(model), feeds)
    if p_fused.shape != p_sim.shape:
        raise ConfigError(f"fused_vs_simulated: {p_fused.shape[0]} fused predictions for {p_sim.shape[0]} rows")
    diff = np.abs(p_fused.astype(np.float64) - p_sim.astype(np.float64))
    have_auc = labels is not None and len(np.unique(labels)) == 2
    return {"rows": int(p_sim.shape[0]), "max_abs_diff": float(diff.max()) if diff.size else 0.0,
            "mean_abs_diff": float(diff.mean()) if diff.size else 0.0,
            "auc_fused": M.auc(labels, p_fused) if have_auc else None,
            "auc_simulated": M.auc(labels, p_sim) if have_auc else None}


def pair_overflow(x: np.ndarray, w: np.ndarray) -> dict[str, float]:
    """How often ``x @ w`` overflows int16 when adjacent products are summed pairwise (``VPMADDUBSW``).

    Takes ``x`` uint8 ``[N, K]`` (raw quantized activations, zero point not
    subtracted: the kernel corrects for it afterwards) and ``w`` int8 ``[K, M]``
    (raw quantized weights).  For every row n, output m and pair j the sum
    ``x[n,2j] w[2j,m] + x[n,2j+1] w[2j+1,m]`` is checked against
    [-32768, 32767]; an odd K's last product stands alone (|255 x 128| fits).
    Returns ``{"pairs": fraction of pair sums that overflow, "outputs": fraction
    of (n, m) dot products with at least one overflowing pair}``.

    Raises:
        ConfigError: wrong dtypes, ranks or inner sizes.
    """
    x, w = np.asarray(x), np.asarray(w)
    if x.dtype != np.uint8 or w.dtype != np.int8 or x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
        raise ConfigError(f"pair_overflow: expected uint8 [N, K] and int8 [K, M], got {x.dtype} {list(x.shape)} "
                          f"and {w.dtype} {list(w.shape)}")
    n, k = x.shape
    m = w.shape[1]
    if n == 0 or m == 0 or k < 2:
        return {"pairs": 0.0, "outputs": 0.0}
    xi, wi = x.astype(np.int32), w.astype(np.int32)
    pairs = k // 2
    over = 0
    touched = np.zeros((n, m), bool)
    for j in range(pairs):
        s = np.outer(xi[:, 2 * j], wi[2 * j]) + np.outer(xi[:, 2 * j + 1], wi[2 * j + 1])
        bad = (s > INT16_MAX) | (s < INT16_MIN)
        over += int(bad.sum())
        touched |= bad
    return {"pairs": over / (n * m * pairs), "outputs": float(touched.mean())}


def _quantized_matmuls(graph: Any) -> list[tuple[Any, str, np.ndarray, bool]]:
    """``(node, quantized activation tensor, raw weight array, transB)`` of each QDQ MatMul/Gemm."""
    from onnx import numpy_helper

    producer = {o: n for n in graph.node for o in n.output}
    inits = {i.name: i for i in graph.initializer}
    found = []
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        attrs = {a.name: a.i for a in node.attribute}
        if attrs.get("transA", 0):
            continue
        da, dw = producer.get(node.input[0]), producer.get(node.input[1])
        if da is None or dw is None or da.op_type != "DequantizeLinear" or dw.op_type != "DequantizeLinear":
            continue
        qa = producer.get(da.input[0])
        if qa is None or qa.op_type != "QuantizeLinear" or dw.input[0] not in inits:
            continue
        found.append((node, da.input[0], numpy_helper.to_array(inits[dw.input[0]]), bool(attrs.get("transB", 0))))
    return found


def saturation_risk(model: Any, feeds: Mapping[str, np.ndarray], *, max_rows: int = 1024) -> dict[str, Any]:
    """The int16 pair-sum overflow of every quantized MatMul/Gemm, on the activations ``feeds`` produce.

    Takes a QDQ ModelProto (not modified), feed dicts (calibration rows; the
    first ``max_rows`` are used).  Returns ``{"kernel", "overflow_fraction" (the
    worst node's fraction of outputs with an overflowing pair; 0.0 for U8U8,
    ``None`` when not modelled), "layers": [{"node", "k", "m", "pairs", "outputs"}]}``
    in graph order.

    Raises:
        ConfigError: feeds that do not fit the model.
        ValidationError: ONNX Runtime refuses the model.
    """
    import onnx
    from onnx import TensorProto, helper

    found = _quantized_matmuls(model.graph)
    if not found:
        return {"kernel": "none (no quantized MatMul/Gemm)", "overflow_fraction": 0.0, "layers": []}
    w_types = {w.dtype for _, _, w, _ in found}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    outputs = {o.name for o in probe.graph.output}
    elem = {}
    for node in probe.graph.node:
        if node.op_type == "QuantizeLinear":
            zp_type = TensorProto.UINT8
            for init in probe.graph.initializer:
                if len(node.input) > 2 and init.name == node.input[2]:
                    zp_type = init.data_type
            elem[node.output[0]] = zp_type
    act_types = {elem.get(a, TensorProto.UINT8) for _, a, _, _ in found}
    if act_types != {TensorProto.UINT8}:
        return {"kernel": "s8 activations (not modelled)", "overflow_fraction": None, "layers": []}
    if w_types == {np.dtype(np.uint8)}:
        return {"kernel": "u8u8 (operands widened to int16, VPMADDWD into int32: no int16 sums)",
                "overflow_fraction": 0.0, "layers": []}
    for _, a, _, _ in found:
        if a not in outputs:
            probe.graph.output.append(helper.make_tensor_value_info(a, TensorProto.UINT8, None))
            outputs.add(a)
    session = simulated_session(probe)
    names = [i.name for i in session.get_inputs()]
    missing = [nm for nm in names if nm not in feeds]
    if missing:
        raise ConfigError(f"saturation_risk: feeds lack input(s) {missing}; the model takes {names}")
    wanted = [a for _, a, _, _ in found]
    values = session.run(wanted, {nm: np.asarray(feeds[nm])[:max_rows] for nm in names})
    acts = dict(zip(wanted, values))
    layers = []
    for node, a, w, trans_b in found:
        if w.dtype != np.int8:
            continue
        w2 = w.T if trans_b else w
        x = acts[a].reshape(-1, acts[a].shape[-1])
        if w2.ndim != 2 or x.shape[1] != w2.shape[0]:
            continue
        frac = pair_overflow(x, w2)
        layers.append({"node": node.name, "k": int(w2.shape[0]), "m": int(w2.shape[1]), **frac})
    worst = max((lay["outputs"] for lay in layers), default=0.0)
    return {"kernel": "u8s8 (VPMADDUBSW pair sums in int16 without VNNI)", "overflow_fraction": worst,
            "layers": layers}


__all__ = ["DEFAULT_TOLERANCE", "INT16_MIN", "INT16_MAX", "simulated_session", "fused_vs_simulated",
           "pair_overflow", "saturation_risk"]
