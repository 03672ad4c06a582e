"""Typed serving errors and the one place that maps them to gRPC status codes.

Every error the server raises on purpose is a :class:`ServeError`; its class
fixes the gRPC status the client sees (:func:`grpc_status`).  Messages say what
was expected and what came, e.g. ``input 'cat': got shape [2, 3], expected
[-1, 11]``.  Anything else that escapes a handler is a bug: it is logged with its
traceback and answered ``INTERNAL``, and the server keeps serving.
"""

from __future__ import annotations

from typing import Any

from ctredge.errors import CtrEdgeError


class ServeError(CtrEdgeError):
    """Base class of the serving errors; answered ``INTERNAL`` unless a subclass says otherwise."""

    code_name = "INTERNAL"


class InvalidInput(ServeError, ValueError):
    """The request does not fit the model: name, dtype, shape, byte length, batch, id range."""

    code_name = "INVALID_ARGUMENT"


class ModelNotFound(ServeError, LookupError):
    """No model of that name, or no such version of it, in the repository."""

    code_name = "NOT_FOUND"


class ModelUnavailable(ServeError):
    """The model (version) exists but is not ready: it failed to load, or is still loading."""

    code_name = "UNAVAILABLE"


class ResourceExhausted(ServeError):
    """The request is too large for the server's limits or queues."""

    code_name = "RESOURCE_EXHAUSTED"


class DeadlineExceeded(ServeError):
    """The request's deadline passed before it ran (it is never run late)."""

    code_name = "DEADLINE_EXCEEDED"


class ShuttingDown(ServeError):
    """The server is draining after SIGTERM/SIGINT: in-flight requests finish, new ones are refused."""

    code_name = "UNAVAILABLE"


class Unimplemented(ServeError):
    """A protocol call this server does not implement (yet)."""

    code_name = "UNIMPLEMENTED"


class LoadError(ServeError):
    """A model could not be loaded (file, metadata, providers or warm-up); the reason says which.

    ``public``: what a client may be told (no paths, no file contents); the
    message itself goes to the server log.
    """

    def __init__(self, message: str, public: str = "it failed to load"):
        super().__init__(message)
        self.public = public


class LoadRefused(ServeError):
    """RepositoryModelLoad found a version it cannot serve; what already served keeps serving."""

    code_name = "INVALID_ARGUMENT"


class IntegrityError(LoadError):
    """A version's files do not match the sha256 recorded in its ``manifest.json``."""

    def __init__(self, message: str):
        super().__init__(message, "its files do not match its manifest.json")


class ControlDisabled(ServeError):
    """A model-control call (load/unload) that the server's ``--model-control-mode`` does not allow."""

    code_name = "FAILED_PRECONDITION"


class GpuRequired(LoadError):
    """``--require-gpu`` was given and a model would not run on the CUDA execution provider."""


def grpc_status(exc: BaseException) -> tuple[Any, str]:
    """The ``(grpc.StatusCode, message)`` answering ``exc``.

    Takes any exception; :class:`ServeError` subclasses pick their code, other
    ctredge errors (a malformed spec in a request's data...) are
    ``INVALID_ARGUMENT``, everything else ``INTERNAL``.
    """
    import grpc

    if isinstance(exc, ServeError):
        return getattr(grpc.StatusCode, exc.code_name), str(exc)
    if isinstance(exc, CtrEdgeError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"
