"""ctredge.serve: gRPC serving on ONNX Runtime (Open Inference Protocol v2, the KServe/Triton API).

Modules (imported on demand; importing this package loads nothing else):

``server``      ``InferenceServer`` (grpc.aio), ``ServerThread``, ``run`` (``ctredge serve``), health, reflection
``repository``  ``ServingConfig`` (``config.json``), ``Repository``, ``write_serving_config``
``runtime``     providers (CUDA -> CPU, ``require_gpu``), session options, ``Runner.predict`` (the batcher seam)
``signature``   what a model accepts; ranking broadcast, server-side hashing, id range checks
``codec``       protocol tensors <-> ``dict[str, np.ndarray]`` (raw, typed, Triton's BYTES encoding)
``metadata``    ServerMetadata, ModelMetadata, ModelConfig, RepositoryIndex answers
``errors``      typed errors and the one mapping to gRPC status codes
``client``      ``Client`` / ``AsyncClient``, ``raw_inputs``, ``ranking_inputs``, ``predict_file``
"""
