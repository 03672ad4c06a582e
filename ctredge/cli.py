"""The ``ctredge`` command line: it parses the arguments and dispatches to the stages.

Each subcommand imports its stage inside its handler, so ``ctredge datagen``
and ``ctredge serve`` never load TensorFlow.  The main job (``ctredge
pipeline``) lives in :mod:`ctredge.pipeline`; the tables printed here in
:mod:`ctredge.tables`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from ctredge.errors import CtrEdgeError
from ctredge.tables import index_table, markdown_table

log = logging.getLogger("ctredge")


def _progress_bar(label: str) -> Callable[[int, int], None]:
    start = time.perf_counter()

    def show(done: int, total: int) -> None:
        if not sys.stderr.isatty() and done < total:
            return
        frac = done / total if total else 1.0
        bar = "#" * int(frac * 30)
        rate = done / max(time.perf_counter() - start, 1e-9)
        end = "\n" if done >= total else ""
        print(f"\r{label} [{bar:<30}] {done:,}/{total:,} rows  {rate:,.0f} rows/s", end=end,
              file=sys.stderr, flush=True)

    return show


# ---------------------------------------------------------------- datagen
def cmd_datagen(args: argparse.Namespace) -> int:
    from ctredge.datagen import generate

    t0 = time.perf_counter()
    truth = generate(args.out, rows=args.rows, seed=args.seed, history=args.history,
                     click_rate=args.click_rate, progress=_progress_bar("datagen"), sample_seed=args.sample_seed,
                     split_seed=args.split_seed, ceiling=args.ceiling, text=args.text)
    shown = {k: truth[k] for k in ("rows", "seed", "sample_seed", "click_rate", "bayes_auc", "bayes_logloss")
             if k in truth}
    if "test" in truth.get("scopes", {}):
        t = truth["scopes"]["test"]
        shown["test_part"] = {k: t[k] for k in ("rows", "bayes_auc", "bayes_logloss", "split")}
    if "ceiling" in truth:
        c = truth["ceiling"]
        shown["ceiling"] = {k: c[k] for k in ("status", "reason", "test_auc", "test_logloss", "C", "seconds") if k in c}
    if "text" in truth:
        shown["text"] = {k: truth["text"][k] for k in ("relevant_rows", "bayes_auc_without_text_term")}
    shown["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(shown, indent=2))
    return 0


# ---------------------------------------------------------------- train / evaluate
def _model_config(args: argparse.Namespace) -> Any:
    from ctredge.train.models import ModelConfig

    kwargs: dict[str, Any] = {"model": args.model}
    if args.embedding_dim is not None:
        kwargs["embedding_dim"] = args.embedding_dim
    return ModelConfig(**kwargs)


def cmd_train(args: argparse.Namespace) -> int:
    from ctredge.train.train import TrainConfig, train

    cfg = TrainConfig(
        data=tuple(args.data), out=args.out, valid=tuple(args.valid or ()), test=tuple(args.test or ()),
        spec=args.spec, criteo_buckets=args.buckets, epochs=args.epochs,
        patience=args.patience, seed=args.seed,
        split_valid=args.split_valid, split_test=args.split_test, skip_bad_rows=args.skip_bad_rows,
        verbose=1 if sys.stdout.isatty() else 2, text=not args.no_text, text_encoder=args.text_encoder or "",
        **{k: v for k, v in (("min_count", args.min_count), ("batch_size", args.batch_size),
                                          ("learning_rate", args.learning_rate),
                                          ("lr_decay_epochs", args.lr_decay_epochs)) if v is not None},
        **_dp_settings(args),
    )
    manifest = train(cfg, _model_config(args))
    m = manifest["metrics"]
    print(markdown_table(["model", "test AUC", "test logloss", "calibration", "valid AUC", "epochs", "s/epoch"],
                 [[args.model, f"{m['test_auc']:.5f}", f"{m['test_logloss']:.5f}", f"{m['test_calibration']:.3f}",
                   f"{m['valid_auc']:.5f}", str(m["epochs"]), f"{m['seconds_per_epoch']:.1f}"]]))
    if m.get("bad_rows_skipped"):
        print(f"skipped {m['bad_rows_skipped']} malformed row(s)")
    if m.get("dp"):
        d = m["dp"]
        print(f"DP-SGD: epsilon {d['epsilon']:.3f} (target {d['epsilon_target']:g}), delta {d['delta']:.3g}, "
              f"clip {d['clip']:g}, noise multiplier {d['noise_multiplier']:.4f}, {d['steps']} Poisson-sampled steps")
    print(f"artifact: {args.out}")
    return 0


def _epsilons(text: str) -> tuple[float, ...]:
    """``--dp-epsilons``: comma-separated numbers > 0, or ``none``/empty for none."""
    from ctredge.errors import ConfigError

    if text.strip().lower() in ("", "none"):
        return ()
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"--dp-epsilons: expected comma-separated numbers > 0 or 'none', got {text!r}") from None
    if not all(v > 0 and v < float("inf") for v in values):
        raise ConfigError(f"--dp-epsilons: expected comma-separated numbers > 0 or 'none', got {text!r}")
    return values


def _dp_settings(args: argparse.Namespace) -> dict[str, Any]:
    """TrainConfig's dp_* fields from --dp-epsilon/--dp-delta/--dp-clip (delta or clip alone are refused)."""
    from ctredge.errors import ConfigError

    if args.dp_epsilon is None:
        if args.dp_delta is not None or args.dp_clip is not None:
            raise ConfigError("--dp-delta and --dp-clip need --dp-epsilon (DP-SGD is off without it)")
        return {}
    out: dict[str, Any] = {"dp_epsilon": args.dp_epsilon, "dp_delta": args.dp_delta}
    if args.dp_clip is not None:
        out["dp_clip"] = args.dp_clip
    return out


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ctredge.train.train import evaluate

    m = evaluate(args.dir, args.data, skip_bad_rows=args.skip_bad_rows)
    print(markdown_table(["rows", "AUC", "logloss", "calibration", "normalized entropy", "click rate"],
                 [[f"{m['rows']:,}", f"{m['auc']:.5f}", f"{m['logloss']:.5f}", f"{m['calibration']:.3f}",
                   f"{m['normalized_entropy']:.4f}", f"{m['click_rate']:.4f}"]]))
    return 0


# ---------------------------------------------------------------- export
def cmd_export(args: argparse.Namespace) -> int:
    from ctredge.export.onnx import ExportConfig, export

    cfg = ExportConfig(opset=args.opset, atol=args.atol, name=args.name, version=args.version)
    manifest = export(args.dir, args.out, cfg)
    diffs = manifest["metrics"]["validation_max_abs_diff"]
    print(f"exported {args.dir} -> {args.out}/model.onnx  (opset {cfg.opset}, {manifest['extra']['nodes']} nodes, "
          f"{manifest['extra']['onnx_bytes']:,} bytes)")
    print("validated against Keras: " + ", ".join(f"{k} max|diff| {v:.2e}" for k, v in diffs.items()))
    return 0


# ---------------------------------------------------------------- compress
def cmd_compress_prune(args: argparse.Namespace) -> int:
    from ctredge.compress.prune import PruneConfig, prune

    cfg = PruneConfig(sparsity=args.sparsity, structured=args.structured, vocab_min_count=args.vocab_min_count,
                      wide_sparsity=args.wide_sparsity, epochs=args.epochs, learning_rate=args.learning_rate,
                      distill_alphas=_floats(args.distill_alphas) if args.distill_alphas else PruneConfig.distill_alphas,
                      verbose=1 if sys.stdout.isatty() else 2)
    m = prune(args.dir, args.out, cfg)["metrics"]
    print(json.dumps({k: v for k, v in m.items() if not isinstance(v, (dict, list))}, indent=2, default=str))
    print(f"artifact: {args.out}")
    return 0


def _floats(text: str) -> tuple[float, ...]:
    from ctredge.errors import ConfigError

    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError as exc:
        raise ConfigError(f"expected comma-separated numbers, got {text!r}") from exc


def cmd_compress_quantize(args: argparse.Namespace) -> int:
    from ctredge.compress.quantize import quantize_to_folder

    for kind, path, size in quantize_to_folder(args.onnx, args.variants.split(","), args.out,
                                               calibration_data=args.calibration,
                                               calibration_rows=args.calibration_rows,
                                               verify_manifest=not args.no_verify):
        print(f"{kind:24s} {path}  {size:,} bytes")
    return 0


def cmd_compress_all(args: argparse.Namespace) -> int:
    from ctredge.compress.variants import CompressConfig, compress_all

    kwargs: dict[str, Any] = {"budget": args.budget, "allow_over_budget": args.allow_over_budget,
                              "version": args.version, "vocab_min_count": args.vocab_min_count,
                              "wide_sparsity": args.wide_sparsity, "sparse_tables": args.sparse_tables,
                              "structured": args.structured,
                              "eval_data": args.eval_data, "prune_epochs": args.prune_epochs}
    if args.distill_alphas:
        kwargs["distill_alphas"] = _floats(args.distill_alphas)
    if args.bootstrap is not None:
        kwargs["bootstrap"] = args.bootstrap
    if args.int8_exclude is not None:
        kwargs["int8_exclude_nodes"] = tuple(x for x in args.int8_exclude.split(",") if x)
    if args.int8_tolerance is not None:
        kwargs["int8_tolerance"] = args.int8_tolerance
    if args.variants:
        kwargs["variants"] = tuple(args.variants.split(","))
    index = compress_all(args.dir, args.out, CompressConfig(**kwargs), force=args.force)
    print(index_table(index))
    print(f"repository: {args.out}  (index.json)")
    return 0


# ---------------------------------------------------------------- pipeline
def cmd_pipeline(args: argparse.Namespace) -> int:
    """datagen (with history) -> train each model -> compress all (first model) -> bench (servers in subprocesses)."""
    from ctredge.pipeline import PipelineConfig, run_pipeline

    run_pipeline(PipelineConfig(out=args.out, rows=args.rows, seed=args.seed, models=tuple(args.models.split(",")),
                                epochs=args.epochs, force=args.force, skip_compress=args.skip_compress,
                                skip_bench=args.skip_bench, full=args.full, bench_seconds=args.bench_seconds,
                                ceiling=not args.no_ceiling, eval_data=args.eval_data, eval_rows=args.eval_rows,
                                dp_epsilons=_epsilons(args.dp_epsilons)),
                 progress=_progress_bar("datagen"))
    return 0


# ---------------------------------------------------------------- serve / predict
def cmd_serve(args: argparse.Namespace) -> int:
    from ctredge.serve.server import ServerOptions, run

    options = ServerOptions(host=args.host, port=args.port, require_gpu=args.require_gpu,
                            intra_op_threads=args.threads, run_threads=args.run_threads,
                            max_message_bytes=args.max_message_mb * 1024 * 1024,
                            dynamic_batching={"on": True, "off": False, "config": None}[args.batching],
                            providers=tuple(args.providers.split(",")) if args.providers else None,
                            metrics_port=args.metrics_port, poll_seconds=args.poll_seconds,
                            grace_seconds=args.grace_seconds, model_control_mode=args.model_control_mode,
                            tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
                            infer_token_file=args.infer_token_file, admin_token_file=args.admin_token_file,
                            metrics_host=args.metrics_host, max_concurrent_rpcs=args.max_concurrent_rpcs,
                            max_inflight_bytes=args.max_inflight_mb * 1024 * 1024,
                            http_port=args.http_port, http_host=args.http_host)

    def ready(port: int, metrics_port: int | None = None) -> None:
        if metrics_port is not None:
            print(f"metrics on http://{args.metrics_host or args.host}:{metrics_port}/metrics", file=sys.stderr,
                  flush=True)
        print(f"serving {args.repository} on {args.host}:{port}", flush=True)

    # worker processes (ctredge.serve.workers): N servers on one port; 1 is the plain server in this process
    from ctredge.serve.workers import available_cores, run as run_workers

    if args.workers is not None and args.workers < 1:
        raise CtrEdgeError(f"--workers must be >= 1, got {args.workers}")
    workers = args.workers if args.workers is not None else available_cores()
    if workers > 1:
        run_workers(args.repository, options, workers, on_ready=ready)
        return 0
    run(args.repository, options, on_ready=ready)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from ctredge.reader import resolve_spec
    from ctredge.serve.client import Client, predict_file

    spec = resolve_spec(args.data, args.spec, buckets=args.buckets) if args.spec else None
    with Client(args.url, timeout=args.timeout) as client:
        for _, probs in predict_file(client, args.model, args.data, spec=spec, limit=args.limit,
                                     batch_size=args.batch_size, version=args.version,
                                     skip_bad_rows=args.skip_bad_rows):
            sys.stdout.write("".join(f"{p:.6f}\n" for p in probs.tolist()))
    sys.stdout.flush()
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from ctredge.benchmarks.bench import config_from_args, run_bench
    from ctredge.benchmarks.report import summary_table

    results = run_bench(config_from_args(args))
    print(summary_table(results))
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


# ---------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ctredge", description="CTR models from training to a production server.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("datagen", help="write synthetic e-commerce click logs (+ .spec.json, .truth.json)")
    d.add_argument("--rows", type=int, required=True)
    d.add_argument("--seed", type=int, default=0, help="the world (users, items, effects) and, by default, the sample")
    d.add_argument("--sample-seed", type=int, default=None,
                   help="draw the rows with this seed from the world of --seed (default: --seed); another sample "
                        "seed gives a held-out file of the same world, e.g. for compress all --eval-data")
    d.add_argument("--split-seed", type=int, default=0,
                   help="the train split seed whose default test part the truth file's test-part figures describe "
                        "(ctredge train --seed; default 0)")
    d.add_argument("--ceiling", action="store_true",
                   help="also fit the learnable ceiling (logistic regression on the planted structure, scikit-learn) "
                        "on the default train part and score it on the test part")
    d.add_argument("--out", required=True, help="FILE.tsv")
    d.add_argument("--history", action="store_true", help="add the behaviour-history column")
    d.add_argument("--text", action="store_true",
                   help="add the item title and search query columns; query-title relevance adds click signal "
                        "the ids do not carry (README: Text semantics)")
    d.add_argument("--click-rate", type=float, default=0.03)
    d.set_defaults(func=cmd_datagen)

    t = sub.add_parser("train", help="train a CTR model into an artifact folder")
    t.add_argument("--data", nargs="+", required=True, help="click-log file(s), .tsv or .tsv.gz")
    t.add_argument("--valid", nargs="+")
    t.add_argument("--test", nargs="+")
    t.add_argument("--spec", help="FeatureSpec JSON, or 'criteo' (default: <data>.spec.json)")
    t.add_argument("--buckets", type=int, default=100_000, help="hash buckets per feature with --spec criteo")
    t.add_argument("--model", default="dcnv2", choices=("dcnv2", "deepfm", "seed"))
    t.add_argument("--embedding-dim", type=int)
    t.add_argument("--out", required=True)
    t.add_argument("--batch-size", type=int, help="rows per training step (default: TrainConfig's, 256)")
    t.add_argument("--epochs", type=int, default=5)
    t.add_argument("--learning-rate", type=float, help="Adam's learning rate (default: TrainConfig's, 2e-3)")
    t.add_argument("--lr-decay-epochs", type=int,
                   help="cosine decay of the learning rate over this many epochs (default 1; 0 = constant)")
    t.add_argument("--patience", type=int, default=1, help="early-stopping patience (epochs) on valid AUC")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--split-valid", type=float, default=0.1)
    t.add_argument("--split-test", type=float, default=0.1)
    t.add_argument("--skip-bad-rows", action="store_true")
    t.add_argument("--text-encoder", help="encoder folder (model.onnx + tokenizer.json, python -m "
                   "ctredge.export.text_encoder) for a spec with text features (datagen --text)")
    t.add_argument("--no-text", action="store_true",
                   help="train without the spec's text features (same rows; the text columns are read and dropped)")
    t.add_argument("--min-count", type=int,
                   help="ids seen fewer times in the training rows share their feature's out-of-vocabulary row "
                        "(default: TrainConfig's, 5; 1 keeps every id)")
    t.add_argument("--dp-epsilon", type=float,
                   help="differentially private training (DP-SGD) to this epsilon, per training row; turns off "
                        "what is computed from the rows without DP (vocabulary, wide part, history attributes)")
    t.add_argument("--dp-delta", type=float, help="DP delta (default: 1/training rows, rounded down to a power of 10)")
    t.add_argument("--dp-clip", type=float, help="DP-SGD per-example gradient clipping norm (default 30); DP-SGD "
                        "trains with SGD + momentum on Poisson batches of 1024 (TrainConfig's dp_* fields)")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="AUC, logloss, calibration of a trained artifact")
    e.add_argument("dir")
    e.add_argument("--data", help="click log (default: the artifact's own test rows)")
    e.add_argument("--skip-bad-rows", action="store_true")
    e.set_defaults(func=cmd_evaluate)

    x = sub.add_parser("export", help="export a trained artifact to ONNX, validated against Keras")
    x.add_argument("dir")
    x.add_argument("--out", required=True)
    x.add_argument("--opset", type=int, default=17)
    x.add_argument("--atol", type=float, default=1e-5)
    x.add_argument("--name", default="ctr")
    x.add_argument("--version", type=int, default=1)
    x.set_defaults(func=cmd_export)

    c = sub.add_parser("compress", help="prune (Keras), quantize (ONNX), or build every variant").add_subparsers(
        dest="compress_command", required=True)
    cp = c.add_parser("prune", help="vocabulary + structured + magnitude pruning with fine-tuning")
    cp.add_argument("dir")
    cp.add_argument("--out", required=True)
    cp.add_argument("--sparsity", type=float, default=0.5)
    cp.add_argument("--structured", type=float, default=0.5)
    cp.add_argument("--vocab-min-count", type=int, default=0)
    cp.add_argument("--wide-sparsity", type=float, default=0.0,
                    help="fraction of the wide part's weights zeroed by magnitude (0 = none)")
    cp.add_argument("--epochs", type=int, default=3)
    cp.add_argument("--learning-rate", type=float, default=1e-3, help="fine-tuning learning rate")
    cp.add_argument("--distill-alphas", help="comma-separated hard-label weights alpha of the fine-tuning labels "
                                             "alpha*y + (1-alpha)*p_parent; each is a fine-tune, the best on valid "
                                             "is kept (default 0,0.5; 1 = no distillation)")
    cp.set_defaults(func=cmd_compress_prune)
    cq = c.add_parser("quantize", help="quantize an ONNX model (no TensorFlow)")
    cq.add_argument("onnx")
    cq.add_argument("--variants", required=True,
                    help="comma-separated: fp16, int8-dynamic, int8-static, emb-int8, emb-int4, "
                         "int8-static+emb-int8, int8-static+emb-int4")
    cq.add_argument("--calibration", help="click log for static int8 calibration")
    cq.add_argument("--calibration-rows", type=int, default=4096)
    cq.add_argument("--no-verify", action="store_true",
                    help="quantize an ONNX file that has no ctredge manifest.json beside it (not checked)")
    cq.add_argument("--out", required=True)
    cq.set_defaults(func=cmd_compress_quantize)
    ca = c.add_parser("all", help="every variant into a model repository, judged by the dAUC budget "
                                  "(published when met, or not resolved within budget on the point estimate)")
    ca.add_argument("dir")
    ca.add_argument("--out", required=True, help="model repository folder")
    ca.add_argument("--variants", help="comma-separated subset (default: all six)")
    ca.add_argument("--budget", type=float, default=0.0005, help="max AUC loss against the full Keras model")
    ca.add_argument("--allow-over-budget", action="store_true")
    ca.add_argument("--int8-tolerance", type=float, default=None,
                    help="max |fused int8 - float-simulated| probability (default 0.01); over it a static int8 "
                         "variant is refused, even with --allow-over-budget")
    ca.add_argument("--version", type=int, default=1)
    ca.add_argument("--vocab-min-count", type=int, default=40,
                    help="the pruned model's embedding rows: buckets seen fewer times share their feature's row 0")
    ca.add_argument("--wide-sparsity", type=float, default=0.95,
                    help="fraction of the pruned model's wide-part weights zeroed by magnitude")
    ca.add_argument("--structured", type=float, default=0.75,
                    help="fraction of the pruned model's hidden units (and cross-layer rank) removed")
    ca.add_argument("--sparse-tables", choices=("pruned", "all", "none"), default="pruned",
                    help="which variants store mostly-zero tables as their non-zero rows + a rank index (exact; "
                         "costs latency): the pruned model's (default), all, none")
    ca.add_argument("--eval-data", help="evaluate the variants on every row of this held-out file of the same world "
                                        "(ctredge datagen --sample-seed) instead of the test rows; e.g. 1M rows "
                                        "resolve a 0.0005 budget")
    ca.add_argument("--prune-epochs", type=int, default=2, help="fine-tuning epochs of the pruned model")
    ca.add_argument("--distill-alphas", help="comma-separated hard-label weights tried for the pruning "
                                             "fine-tune's distillation (default 0,0.25)")
    ca.add_argument("--bootstrap", type=int, help="paired bootstrap resamples (default 200)")
    ca.add_argument("--int8-exclude", help="comma-separated node-name fragments every static int8 variant keeps in "
                                           "float (default: ctr-int8 keeps cross_ and deep_dense_0, ctr-edge none; "
                                           "'' = none)")
    ca.add_argument("--force", action="store_true", help="redo the export and pruning even if reusable")
    ca.set_defaults(func=cmd_compress_all)

    pl = sub.add_parser("pipeline", help="the main job: datagen -> train -> compress all -> bench -> report")
    pl.add_argument("--out", default="runs/demo")
    pl.add_argument("--rows", type=int, default=200_000)
    pl.add_argument("--seed", type=int, default=0)
    pl.add_argument("--models", default="dcnv2,deepfm,seed")
    pl.add_argument("--epochs", type=int, default=3)
    pl.add_argument("--force", action="store_true", help="redo stages whose artifacts already exist")
    pl.add_argument("--skip-compress", action="store_true", help="stop after training")
    pl.add_argument("--skip-bench", action="store_true", help="stop after compress all")
    pl.add_argument("--full", action="store_true",
                    help="benchmark every variant, batching on and off, and the PyTriton peer")
    pl.add_argument("--bench-seconds", type=float, help="seconds per gRPC cell (default 2, --full 5)")
    pl.add_argument("--no-ceiling", action="store_true",
                    help="skip datagen's learnable ceiling (a logistic regression, about a minute on 200k rows)")
    pl.add_argument("--eval-data", help="judge the variants on this held-out file of the same world "
                                        "(ctredge datagen --seed S --sample-seed T), e.g. 1M rows")
    pl.add_argument("--eval-rows", type=int, default=200_000,
                    help="without --eval-data: rows of a held-out file of the same world that datagen draws to judge "
                         "the variants on (0 = the test rows)")
    pl.add_argument("--dp-epsilons", default="1,3,8",
                    help="DP-SGD models of the first architecture, one per epsilon, scored beside the full model "
                         "in the bench's accuracy table (comma-separated; 'none' for none)")
    pl.set_defaults(func=cmd_pipeline)

    sv = sub.add_parser("serve", help="serve a model repository over gRPC (Open Inference Protocol v2, ONNX Runtime)")
    sv.add_argument("--repository", required=True, help="REPO/<model>/<version>/model.onnx (+ config.json)")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8001, help="0 picks a free port (printed)")
    sv.add_argument("--require-gpu", action="store_true", help="fail unless models run on the CUDA provider")
    sv.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads per model (default: config.json, 1)")
    sv.add_argument("--workers", type=int,
                    help="server processes sharing the port (default: one per core this process may use, from its "
                         "CPU affinity and cgroup quota; 1: a single process, no supervisor)")
    sv.add_argument("--run-threads", type=int,
                    help="threads running inferences concurrently, per process (default: the cores, shared among "
                         "the workers)")
    sv.add_argument("--max-message-mb", type=int, default=16,
                    help="gRPC message size limit, after decompression (default 16)")
    sv.add_argument("--batching", choices=("config", "on", "off"), default="config",
                    help="dynamic batching: as each model's config.json says (default), or forced on/off")
    sv.add_argument("--providers", help="execution providers for every model, e.g. 'cpu' or 'cuda,cpu' "
                                        "(default: each config.json's, 'auto' = CUDA if available, then CPU)")
    sv.add_argument("--metrics-port", type=int, help="serve Prometheus metrics over HTTP on this port (0: any)")
    sv.add_argument("--http-port", type=int, help="also serve KServe v2 REST on this port (Triton's is 8000; "
                                                  "0: any; default: off)")
    sv.add_argument("--http-host", help="address of the REST port (default: --host)")
    sv.add_argument("--metrics-host", help="address of the metrics endpoint (default: --host)")
    sv.add_argument("--model-control-mode", choices=("none", "poll", "explicit"),
                    help="Triton's: none (default) refuses load/unload calls; poll re-reads the repository every "
                         "--poll-seconds and refuses them; explicit takes RepositoryModelLoad/Unload")
    sv.add_argument("--poll-seconds", type=float,
                    help="with --model-control-mode poll: re-read the repository this often (default 5; "
                         "given alone, it implies poll mode)")
    sv.add_argument("--tls-cert", help="PEM certificate (chain) of the server: serve gRPC over TLS")
    sv.add_argument("--tls-key", help="PEM private key of --tls-cert")
    sv.add_argument("--tls-client-ca", help="PEM CA that signs client certificates: mutual TLS")
    sv.add_argument("--infer-token-file", help="bearer tokens (one per line) that may infer and read metadata")
    sv.add_argument("--admin-token-file",
                    help="bearer tokens (one per line) for model control, repository index and statistics")
    sv.add_argument("--max-concurrent-rpcs", type=int, default=2048,
                    help="inference calls held at once; beyond, RESOURCE_EXHAUSTED (default 2048)")
    sv.add_argument("--max-inflight-mb", type=int, default=512,
                    help="tensor bytes of the inference calls held at once; beyond, RESOURCE_EXHAUSTED (default 512)")
    sv.add_argument("--grace-seconds", type=float, default=5.0,
                    help="on SIGTERM/SIGINT, how long in-flight requests may take to finish")
    sv.set_defaults(func=cmd_serve)

    from ctredge.benchmarks.bench import add_arguments as bench_arguments

    bn = sub.add_parser("bench", help="accuracy, latency, gRPC load, footprint (and peer, GPU) of a repository")
    bench_arguments(bn)
    bn.set_defaults(func=cmd_bench)

    pr = sub.add_parser("predict", help="score a click log through a running server (raw values, server-side hashing)")
    pr.add_argument("--url", default="127.0.0.1:8001", help="HOST:PORT")
    pr.add_argument("--model", required=True)
    pr.add_argument("--version", default="", help="model version (default: the latest ready)")
    pr.add_argument("--data", required=True, help="click log, .tsv or .tsv.gz")
    pr.add_argument("--spec", help="FeatureSpec JSON or 'criteo' (default: the model's, from the server)")
    pr.add_argument("--buckets", type=int, default=100_000, help="hash buckets per feature with --spec criteo")
    pr.add_argument("--limit", type=int, help="read at most this many lines")
    pr.add_argument("--batch-size", type=int, default=256, help="rows per request")
    pr.add_argument("--timeout", type=float, default=30.0, help="seconds per call")
    pr.add_argument("--skip-bad-rows", action="store_true")
    pr.set_defaults(func=cmd_predict)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ctredge`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # ctredge's own progress at INFO; other libraries (ORT's quantizer logs to the root logger) at WARNING
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("ctredge").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return int(args.func(args) or 0)
    except CtrEdgeError as exc:
        print(f"ctredge {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
