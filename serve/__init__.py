"""ctredge.serve: gRPC serving on ONNX Runtime (Open Inference Protocol v2, the KServe/Triton API).

Modules (imported on demand; importing this package loads nothing else):

``server``      ``InferenceServer`` (grpc.aio): options, start, drain, ``ServerThread``, ``run`` (``ctredge serve``)
``servicer``    the ``inference.GRPCInferenceService`` handlers; request parsers that never raise
``security``    TLS credentials, bearer tokens per role (inference vs model control/statistics)
``repository``  ``Repository``: model folders, versions, model control, reload, manifest checks
``batcher``     ``Scheduler``: dynamic batching, bounded queue, deadlines, row alignment, run statistics
``runtime``     providers (CUDA -> CPU, ``require_gpu``), sessions, ``Runner.run``
``signature``   what a model accepts; ranking broadcast, server-side hashing (bounded memo), range checks
``codec``       protocol tensors <-> ``dict[str, np.ndarray]``; request checks before any decoding
``metadata``    ServerMetadata, ModelMetadata, ModelConfig, RepositoryIndex answers
``stats``       ModelStatistics counters and Prometheus metrics
``errors``      typed errors and the one mapping to gRPC status codes
``client``      ``Client`` / ``AsyncClient``, ``raw_inputs``, ``ranking_inputs``, ``predict_file``

``config.json`` is :class:`ctredge.serving_config.ServingConfig` (in the hub, so other stages write it
without importing this package).
"""
