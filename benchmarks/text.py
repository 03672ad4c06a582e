"""Text semantics end to end: what the title and query add in AUC, and what the raw query costs in latency.

``python -m ctredge.benchmarks.text --out OUT [--rows 200000] [--epochs 2]`` (``make text``; needs the
``text`` extra for the encoder's export):

1. ``ctredge datagen --text --history`` rows into ``OUT/data/text.tsv`` (seed ``--seed``);
2. the encoder, all-MiniLM-L6-v2, exported and validated against sentence-transformers
   (:mod:`ctredge.export.text_encoder`) into ``OUT/repo/text-encoder/1`` (kept when its manifest verifies);
3. two DCN-v2 models trained by ``ctredge train`` on the same file, split and seed: ``plain``
   (``--no-text``: the text columns are read and dropped) and ``text`` (title table + query
   embedding), each exported (validated against Keras) into ``OUT/repo/ctr-plain/1`` and
   ``OUT/repo/ctr-text/1``; ``ctr-text``'s ``config.json`` names ``text-encoder``;
4. **AUC**: both models' test AUC and logloss on the same test rows (``ctredge train``'s),
   beside the file's Bayes AUC with and without the text term;
5. **latency**: an in-process server (:class:`~ctredge.serve.server.ServerThread`, gRPC on
   loopback) and ``tritonclient.grpc``, interleaved call by call after a warm-up, median of
   ``--calls``: at batch 1 and for a 1 x 256 ranking request (256 candidates, the history and the
   query sent once), ``ctr-plain`` without text against ``ctr-text`` with the raw query string
   (tokenized and encoded by the server) and with a precomputed ``query_emb`` (the encoder's
   share is the difference).  Every call sends another query of the test rows' searches, so
   nothing is cached between calls;
6. **reach**: :func:`encoder_reach`, how much of the planted relevance the encoder's cosine carries,
   and :func:`stacked`, what the cosine added to ``ctr-plain`` by a logistic regression gains.

Writes ``OUT/text.md`` (the tables and the commands) and ``OUT/text.json``.  The repository
then serves with ``ctredge serve --repository OUT/repo`` (README: Text semantics).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

ENCODER = "text-encoder"
PLAIN, TEXT = "ctr-plain", "ctr-text"
RANKING = 256


def _encoder(repo: Path) -> dict[str, Any]:
    """Export the encoder into ``repo/text-encoder/1`` unless a verified export is there; its manifest."""
    from ctredge.artifacts import read_manifest
    from ctredge.errors import ArtifactError
    from ctredge.export.text_encoder import export_encoder

    folder = repo / ENCODER / "1"
    try:
        return read_manifest(folder)
    except (ArtifactError, OSError):
        return export_encoder(folder)


def _reusable(trained: Path, exported: Path, cfg: Any, data_sha256: str) -> dict[str, Any] | None:
    """The trained manifest when both artifacts verify and were made from this config and these rows."""
    from ctredge.artifacts import read_manifest
    from ctredge.config import config_to_dict
    from ctredge.errors import ArtifactError

    try:
        manifest = read_manifest(trained)
        read_manifest(exported)
    except (ArtifactError, OSError):
        return None
    from ctredge.train.models import ModelConfig

    same_rows = [f.get("sha256") for f in manifest.get("data", {}).get("files", [])] == [data_sha256]
    made = ("text_rows", "vocab_rows", "wide_pairs")    # set by train from the rows
    model = {k: v for k, v in manifest["config"].get("model", {}).items() if k not in made}
    same_model = model == {k: v for k, v in config_to_dict(ModelConfig()).items() if k not in made}
    return manifest if same_rows and same_model and manifest["config"].get("train") == config_to_dict(cfg) else None


def _train_and_export(data: str, out: Path, repo: Path, *, text: bool, epochs: int, seed: int,
                      data_sha256: str) -> dict[str, Any]:
    """``ctredge train`` (with or without the text features) then export into ``repo/<name>/1``.

    Both are kept from an earlier run when their manifests verify, name the same rows and the same config.
    """
    from ctredge.export.onnx import ExportConfig, export_model
    from ctredge.serving_config import ServingConfig, write_serving_config
    from ctredge.train.train import TrainConfig, load_trained, train

    name = TEXT if text else PLAIN
    trained = out / f"trained-{name}"
    cfg = TrainConfig(data=(data,), out=str(trained), epochs=epochs, seed=seed, verbose=2, text=text,
                      text_encoder=str(repo / ENCODER / "1") if text else "")
    kept = _reusable(trained, repo / name / "1", cfg, data_sha256)
    if kept is not None:
        print(f"{name}: reusing {trained} and {repo / name / '1'} (same rows, same config)", file=sys.stderr)
        return kept
    manifest = train(cfg)
    model, spec, parent = load_trained(trained)
    export_model(model, spec, parent, trained, repo / name / "1", ExportConfig(name=name))
    write_serving_config(repo / name, ServingConfig(text_encoder=ENCODER if text else "",
                                                    notes="python -m ctredge.benchmarks.text"))
    return manifest


def _data(path: str, rows: int, seed: int) -> dict[str, Any]:
    """``datagen --text --history`` into ``path`` unless its truth file says it holds those rows; the truth."""
    from ctredge.datagen import generate
    from ctredge.reader import sidecar_path

    try:
        truth = json.loads(Path(sidecar_path(path, "truth")).read_text())
        if truth.get("rows") == rows and truth.get("seed") == seed and "text" in truth and Path(path).is_file():
            return truth
    except (OSError, ValueError):
        pass
    return generate(path, rows=rows, seed=seed, history=True, text=True)


def encoder_reach(rows: int, seed: int, encoder_dir: Path) -> dict[str, Any]:
    """How much of the planted relevance the encoder's cosine can carry, on ``rows`` rows of the same world.

    On the rows' true log-odds without the text term, adding ``w x cosine(query, title)`` (the best
    ``w`` of a few) gives an AUC between the Bayes AUC without the term and the Bayes AUC with it:
    what a model that learned the cosine perfectly, and nothing else of the text, would reach.
    Also the AUC of the cosine for "same concept" among search rows.
    """
    from ctredge import metrics
    from ctredge.datagen import generate_arrays
    from ctredge.textenc import SentenceEncoder

    a = generate_arrays(rows, seed=seed, text=True)
    p = a["probs"].astype(np.float64)
    logit = np.log(p) - np.log1p(-p)
    without = logit - a["terms"]["text"]
    enc = SentenceEncoder(encoder_dir, intra_op_threads=min(2, os.cpu_count() or 1))
    cos = np.sum(enc.encode(a["query"]) * enc.encode(a["title"]), axis=1)
    y = a["labels"]
    by_w = {w: metrics.auc(y, without + w * cos) for w in (1.0, 2.0, 3.0, 4.0, 6.0)}
    best = max(by_w, key=by_w.get)
    search = np.array([bool(q) for q in a["query"]])
    return {"rows": rows, "bayes_auc": metrics.auc(y, logit), "bayes_auc_without_text_term": metrics.auc(y, without),
            "with_cosine_auc": by_w[best], "cosine_weight": best,
            "cosine_auc_same_concept": metrics.auc((a["relevance"][search] > 0).astype(np.float64), cos[search])}


def stacked(repo: Path, data: str) -> dict[str, Any]:
    """``ctr-plain``'s test logit + the query-title cosine in a logistic regression, against ``ctr-text``.

    On ``ctredge train``'s default test part of ``data``, two folds (fit on the even rows, scored on
    the odd ones, and the other way), beside both models' AUC on the same scored rows: what a model
    that added the cosine, and nothing else of the text, to ``ctr-plain`` would gain.  The two folds
    also show how much a half of the test part moves the figures.
    """
    import onnxruntime as ort
    from sklearn.linear_model import LogisticRegression

    from ctredge import metrics
    from ctredge.features import FeatureSpec
    from ctredge.onnxrt import ort_session_options
    from ctredge.reader import SplitSpec, read_all
    from ctredge.textenc import SentenceEncoder

    spec = FeatureSpec.load(str(repo / TEXT / "1" / "feature_spec.json"))
    rows = read_all(data, spec)
    test = rows.take(SplitSpec(seed=0, valid=0.1, test=0.1).codes(rows.file_no, rows.line_no) == 2)
    enc = SentenceEncoder(repo / ENCODER / "1", intra_op_threads=min(2, os.cpu_count() or 1))
    q = enc.encode(test.text["query"].tolist())  # type: ignore[index]
    cos = np.sum(q * enc.encode(test.text["title"].tolist()), axis=1)  # type: ignore[index]

    def run(name: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        s = ort.InferenceSession(str(repo / name / "1" / "model.onnx"), ort_session_options(),
                                 providers=["CPUExecutionProvider"])
        return s.run(["ctr"], {i.name: feeds[i.name] for i in s.get_inputs()})[0].reshape(-1).astype(np.float64)

    p = np.clip(run(PLAIN, test.feeds), 1e-7, 1 - 1e-7)
    pt = run(TEXT, {**test.feeds, "query_emb": q})
    y = test.labels
    x = np.column_stack([np.log(p) - np.log1p(-p), cos])
    folds = []
    for scored_parity in (1, 0):
        score = np.arange(len(y)) % 2 == scored_parity
        lr = LogisticRegression(C=10.0).fit(x[~score], y[~score])
        folds.append({"scored": "odd" if scored_parity else "even", "rows": int(score.sum()),
                      "plain_auc": metrics.auc(y[score], p[score]),
                      "plain_plus_cosine_auc": metrics.auc(y[score], lr.decision_function(x[score])),
                      "text_auc": metrics.auc(y[score], pt[score]), "coef": lr.coef_.reshape(-1).tolist()})
    return {"folds": folds}


def _median_ms(times: list[int]) -> float:
    return statistics.median(times) / 1e6


def measure_latency(repo: Path, data: str, *, calls: int = 300, warmup: int = 30) -> list[dict[str, Any]]:
    """Median gRPC latency of plain vs text requests at batch 1 and 1 x 256 (module doc)."""
    import tritonclient.grpc as tg

    from ctredge.features import FeatureSpec
    from ctredge.reader import read_all
    from ctredge.serve.server import ServerThread

    spec = FeatureSpec.load(str(repo / TEXT / "1" / "feature_spec.json"))
    rows = read_all(data, spec, limit=20_000)
    queries = [q for q in rows.text["query"].tolist() if q]  # type: ignore[index]
    feeds = {k: np.ascontiguousarray(v[:RANKING]) for k, v in rows.feeds.items()}

    def inputs(x: dict[str, np.ndarray]) -> list[Any]:
        out = []
        for k, v in x.items():
            dt = "BYTES" if v.dtype == object else ("FP32" if v.dtype == np.float32 else "INT64")
            i = tg.InferInput(k, list(v.shape), dt)
            i.set_data_from_numpy(v)
            out.append(i)
        return out

    results = []
    with ServerThread(str(repo), port=0) as srv, tg.InferenceServerClient(srv.url) as client:
        enc_session = None
        for batch in (1, RANKING):
            base = {"dense": feeds["dense"][:batch], "cat": feeds["cat"][:batch], "hist": feeds["hist"][:1]}
            k = {"n": 0}

            def next_query() -> bytes:
                k["n"] += 1
                return queries[k["n"] % len(queries)]

            def plain() -> None:
                client.infer(PLAIN, inputs(base))

            def raw() -> None:
                client.infer(TEXT, inputs({**base, "query": np.array([[next_query()]], dtype=object)}))

            if enc_session is None:
                from ctredge.textenc import SentenceEncoder

                enc_session = SentenceEncoder(repo / ENCODER / "1")
            embs = enc_session.encode(queries[:64])

            def emb() -> None:
                client.infer(TEXT, inputs({**base, "query_emb": embs[k["n"] % 64][None, :]}))
                k["n"] += 1

            for _ in range(warmup):
                plain(), raw(), emb()
            tp, tr, te = [], [], []
            for _ in range(calls):   # interleaved, so load changes hit all three alike
                for fn, acc in ((plain, tp), (raw, tr), (emb, te)):
                    t0 = time.perf_counter_ns()
                    fn()
                    acc.append(time.perf_counter_ns() - t0)
            p, r, e = _median_ms(tp), _median_ms(tr), _median_ms(te)
            results.append({"batch": batch, "request": "batch 1" if batch == 1 else f"1 x {RANKING} ranking",
                            "plain_ms": p, "text_raw_query_ms": r, "text_query_emb_ms": e,
                            "added_raw_ms": r - p, "added_emb_ms": e - p, "calls": calls})
    return results


def table(res: dict[str, Any]) -> str:
    a = res["auc"]
    lines = [f"{res['rows']:,} rows (`ctredge datagen --text --history --seed {res['seed']}`), test part of "
             f"{a['test_rows']:,} rows; DCN-v2, {res['epochs']} epoch(s); {res['cpus']} CPUs",
             "",
             "| model | test AUC | test logloss |",
             "|---|---:|---:|",
             f"| {PLAIN} (ids, no text) | {a['plain_test_auc']:.4f} | {a['plain_test_logloss']:.5f} |",
             f"| {TEXT} (+ title table, query embedding) | {a['text_test_auc']:.4f} | {a['text_test_logloss']:.5f} |",
             f"| difference | {a['text_test_auc'] - a['plain_test_auc']:+.4f} | "
             f"{a['text_test_logloss'] - a['plain_test_logloss']:+.5f} |",
             f"| Bayes (true probabilities), all rows | {a['bayes_auc']:.4f} | |",
             f"| Bayes without the text term, all rows | {a['bayes_auc_without_text_term']:.4f} | |",
             "",
             f"what the encoder can carry ({res['reach']['rows']:,} rows of the same world): the true log-odds "
             f"without the text term, AUC {res['reach']['bayes_auc_without_text_term']:.4f}; plus "
             f"{res['reach']['cosine_weight']:g} x the query-title cosine, {res['reach']['with_cosine_auc']:.4f}; "
             f"with the text term (Bayes), {res['reach']['bayes_auc']:.4f}; the cosine tells the same concept from "
             f"another at AUC {res['reach']['cosine_auc_same_concept']:.3f} (search rows)",
             "",
             f"test AUC on half the test rows: {PLAIN}, a logistic regression on its logit + the cosine (fit on the "
             f"other half), {TEXT}",
             "",
             "| scored rows | ctr-plain | ctr-plain logit + cosine (LR) | ctr-text |",
             "|---|---:|---:|---:|"]
    for f in res["stacked"]["folds"]:
        lines.append(f"| {f['scored']} ({f['rows']:,}) | {f['plain_auc']:.4f} | {f['plain_plus_cosine_auc']:.4f} | "
                     f"{f['text_auc']:.4f} |")
    lines += ["",
             f"encoder validation (ORT vs sentence-transformers, {res['encoder']['sentences']} sentences): max |diff| "
             f"{res['encoder']['max_abs_diff']:.2g}, min cosine {res['encoder']['min_cosine']:.7f}",
             "",
             f"latency through the in-process gRPC server, median of {res['latency'][0]['calls']} interleaved calls "
             f"(ms)",
             "",
             "| request | ctr-plain, no text | ctr-text, raw query | added | ctr-text, query_emb sent | added |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in res["latency"]:
        lines.append(f"| {r['request']} | {r['plain_ms']:.3f} | {r['text_raw_query_ms']:.3f} | "
                     f"{r['added_raw_ms']:+.3f} | {r['text_query_emb_ms']:.3f} | {r['added_emb_ms']:+.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    import logging

    ap = argparse.ArgumentParser(prog="python -m ctredge.benchmarks.text", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--reach-rows", type=int, default=30_000,
                    help="rows of encoder_reach (the first rows of the world; no model is involved)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    t0 = time.perf_counter()
    out = Path(args.out)
    repo = out / "repo"
    data = str(out / "data" / "text.tsv")
    truth = _data(data, args.rows, args.seed)
    enc = _encoder(repo)
    plain = _train_and_export(data, out, repo, text=False, epochs=args.epochs, seed=0,
                              data_sha256=truth["data_sha256"])
    text = _train_and_export(data, out, repo, text=True, epochs=args.epochs, seed=0, data_sha256=truth["data_sha256"])
    pm, tm = plain["metrics"], text["metrics"]
    res: dict[str, Any] = {
        "rows": args.rows, "seed": args.seed, "epochs": args.epochs, "cpus": os.cpu_count(),
        "auc": {"plain_test_auc": pm["test_auc"], "plain_test_logloss": pm["test_logloss"],
                "text_test_auc": tm["test_auc"], "text_test_logloss": tm["test_logloss"],
                "test_rows": tm["test_rows"], "bayes_auc": truth["text"]["bayes_auc"],
                "bayes_auc_without_text_term": truth["text"]["bayes_auc_without_text_term"],
                "text_encode_seconds": tm.get("text", {}).get("encode_seconds")},
        "encoder": enc["metrics"]["validation"],
        "latency": measure_latency(repo, data, calls=args.calls),
        "reach": encoder_reach(args.reach_rows, args.seed, repo / ENCODER / "1"),
        "stacked": stacked(repo, data),
    }
    res["seconds"] = round(time.perf_counter() - t0, 1)
    res["command"] = "python -m ctredge.benchmarks.text " + " ".join(sys.argv[1:] if argv is None else argv)
    (out / "text.json").write_text(json.dumps(res, indent=1))
    md = table(res)
    (out / "text.md").write_text(md + f"\n`{res['command']}` ({res['seconds']} s)\n")
    print(md)
    print(f"serve it: ctredge serve --repository {repo} --port 8001 --http-port 8000", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
