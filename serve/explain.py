"""Per-request explanations: the ``attributions`` output, leave-one-group-out on the served model.

A client asks for it with ``requested_outputs`` (gRPC ``outputs``, REST ``"outputs"``)
naming ``attributions``; a request that does not name it costs exactly what it did before.

Definition.  ``f`` is the served probability ``ctr``.  For row ``x`` and feature
group ``g`` (each dense value, each categorical field, the history when the spec
has one)::

    attributions[b, g] = f(x_b) - f(x_b with group g at its baseline)

Baselines are the values the contract already calls "missing": a dense value ->
NaN (the model fills it with its learned missing value), a categorical id -> 0
(the empty value, ``ctredge/features.py``), the history -> all 0 (padding, an
empty history).  A positive value: the group's actual value raised the score.

Group order (``FP32 [B, G]``): the spec's dense names, then its categorical
names, then ``"history"``; :func:`group_names`, shown in ``ModelConfig``'s
``parameters["ctredge.attribution_groups"]`` (a JSON list).

Cost.  The ``B`` prepared contract rows (after :mod:`.signature` hashed and
broadcast the inputs) and the ``B x G`` perturbed rows go through the version's
scheduler as ONE run of ``B x (G + 1)`` rows; ``ctr`` and ``attributions`` are
cut from it.  ``limits.max_explain_rows`` bounds ``B x (G + 1)``, checked on the
request's header before anything is decoded (:func:`check_request`).
"""

from __future__ import annotations

import json
from typing import Any, Mapping

import numpy as np

from ctredge.features import INPUT_CAT, INPUT_DENSE, INPUT_HIST, OUTPUT_CTR, FeatureSpec
from ctredge.serve.errors import InvalidInput

OUTPUT_ATTRIBUTIONS = "attributions"
GROUPS_PARAMETER = "ctredge.attribution_groups"
HISTORY_GROUP = "history"


def group_names(spec: FeatureSpec) -> list[str]:
    """The attribution groups in output order: dense names, categorical names, ``"history"``, then request texts.

    A request text (the query) is one group whose baseline is "no text" (its embedding all 0).
    """
    return [f.name for f in spec.dense] + [f.name for f in spec.cat] + \
        ([HISTORY_GROUP] if spec.history is not None else []) + [t.name for t in spec.request_text]


def groups_json(spec: FeatureSpec) -> str:
    """:func:`group_names` as the JSON list that ``ModelConfig`` carries."""
    return json.dumps(group_names(spec))


def optional_outputs(signature: Any) -> list[str]:
    """Outputs a request may name but does not get by default: ``attributions`` for a ctredge model."""
    return [OUTPUT_ATTRIBUTIONS] if getattr(signature, "spec", None) is not None else []


def check_request(request: Any, signature: Any) -> int:
    """The rows an explained request runs, ``B x (G + 1)``; 0 when it does not ask for ``attributions``.

    Reads only the request's header (input shapes), so an oversized request is
    refused before any decoding.  A model without a FeatureSpec returns 0 (its
    ``requested_outputs`` error names the outputs it has).

    Raises:
        InvalidInput: ``B x (G + 1)`` over ``limits.max_explain_rows``.
    """
    spec = getattr(signature, "spec", None)
    if spec is None or not any(o.name == OUTPUT_ATTRIBUTIONS for o in request.outputs):
        return 0
    batch = max((int(t.shape[0]) for t in request.inputs if len(t.shape)), default=0)
    groups = len(group_names(spec))
    rows = batch * (groups + 1)
    cap = signature.limits.max_explain_rows
    if rows > cap:
        raise InvalidInput(f"output {OUTPUT_ATTRIBUTIONS!r}: {batch} row(s) x ({groups} groups + 1) = {rows} rows "
                           f"to run, expected at most {cap} (limits.max_explain_rows); send at most "
                           f"{cap // (groups + 1)} row(s) per request that asks for attributions")
    return rows


def expand(feeds: Mapping[str, np.ndarray], spec: FeatureSpec) -> dict[str, np.ndarray]:
    """``(G + 1)`` blocks of the ``B`` contract rows: block 0 as sent, block ``1 + g`` with group ``g`` at baseline."""
    blocks = len(group_names(spec)) + 1
    out = {name: np.tile(arr, (blocks,) + (1,) * (arr.ndim - 1)) for name, arr in feeds.items()}
    batch = next(iter(feeds.values())).shape[0]
    g = 1
    for name, baseline, n in ((INPUT_DENSE, np.nan, spec.n_dense), (INPUT_CAT, 0, spec.n_cat)):
        for j in range(n):
            out[name][g * batch:(g + 1) * batch, j] = baseline
            g += 1
    if spec.history is not None:
        out[INPUT_HIST][g * batch:(g + 1) * batch] = 0
        g += 1
    for t in spec.request_text:
        out[t.input_name][g * batch:(g + 1) * batch] = 0.0
        g += 1
    return out


async def predict(scheduler: Any, feeds: Mapping[str, np.ndarray], spec: FeatureSpec,
                  deadline: float | None) -> tuple[dict[str, np.ndarray], Any]:
    """``scheduler.predict`` of :func:`expand`'s ``B x (G + 1)`` rows (one run), cut by :func:`split`."""
    batch = int(next(iter(feeds.values())).shape[0])
    outputs, timing = await scheduler.predict(expand(feeds, spec), deadline)
    return split(outputs, batch), timing


def split(outputs: Mapping[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    """``ctr`` of the rows as sent and ``attributions`` ``FP32 [B, G]`` from the outputs of :func:`expand`'s rows.

    Raises:
        InvalidInput: a perturbed row's answer is not finite.
    """
    ctr = np.asarray(outputs[OUTPUT_CTR], dtype=np.float32).reshape(-1)
    blocks = ctr.reshape(-1, batch)  # [G + 1, B]
    attributions = np.ascontiguousarray((blocks[0][None, :] - blocks[1:]).T, dtype=np.float32)
    if not np.isfinite(attributions).all():
        r = int(np.argmax(~np.isfinite(attributions).all(axis=1)))
        raise InvalidInput(f"row {r}: the model's answer with a feature group at its baseline is not finite; "
                           f"no attributions for this request")
    return {OUTPUT_CTR: outputs[OUTPUT_CTR][:batch], OUTPUT_ATTRIBUTIONS: attributions}
