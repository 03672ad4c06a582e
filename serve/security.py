"""Transport security and bearer tokens for ``ctredge serve``.

TLS.  ``tls_cert`` + ``tls_key`` (PEM files) serve gRPC over TLS; with
``tls_client_ca`` the server also demands a client certificate signed by that
CA (mutual TLS).  Without them the port is plaintext, as Triton's default.

Tokens.  ``infer_token_file`` and ``admin_token_file`` each hold one token per
line (blank lines and ``#`` comments ignored).  A client sends
``authorization: Bearer <token>`` metadata (tritonclient:
``headers={"authorization": "Bearer ..."}``).  Every method of the server has
one role (:data:`OPEN_METHODS`, :data:`ADMIN_METHODS`, everything else is
``infer``), after Triton's restricted-protocol groups:

* ``open``: gRPC health, reflection, ServerLive, ServerReady and ModelReady
  (Triton's health group): Kubernetes probes and grpcurl work without
  credentials.
* ``infer``: inference and model metadata; needs an inference token when
  ``infer_token_file`` is set.
* ``admin``: model control (load/unload), repository index, statistics, shared
  memory, trace and log settings; needs an admin token when
  ``admin_token_file`` is set.

No token: UNAUTHENTICATED.  A token of the other role: PERMISSION_DENIED.  An
unknown token: UNAUTHENTICATED.  Tokens are compared in constant time, and a
refused request is answered before its message is parsed.
"""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from ctredge.serve.errors import ServeError

log = logging.getLogger("ctredge.serve")

SERVICE = "/inference.GRPCInferenceService/"
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                 "/grpc.reflection.v1.ServerReflection/")
OPEN_METHODS = frozenset({SERVICE + "ServerLive", SERVICE + "ServerReady", SERVICE + "ModelReady"})
ADMIN_METHODS = frozenset(SERVICE + m for m in (
    "RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload", "ModelStatistics",
    "SystemSharedMemoryStatus", "SystemSharedMemoryRegister", "SystemSharedMemoryUnregister",
    "CudaSharedMemoryStatus", "CudaSharedMemoryRegister", "CudaSharedMemoryUnregister",
    "TraceSetting", "LogSettings"))
MIN_TOKEN_CHARS = 16


def role_of(method: str) -> str:
    """``"open"``, ``"admin"`` or ``"infer"`` for a full gRPC method name such as ``/inference.GRPCInferenceService/ModelInfer``."""
    if method in OPEN_METHODS or method.startswith(OPEN_PREFIXES):
        return "open"
    if method in ADMIN_METHODS:
        return "admin"
    return "infer"


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ServeError(f"cannot read the {what} {path}: {exc.strerror or exc}") from exc


def load_tokens(path: str) -> tuple[bytes, ...]:
    """The tokens of a token file (one per line; blank lines and ``#`` comments skipped).

    Raises:
        ServeError: the file cannot be read, holds no token, or a token shorter
            than :data:`MIN_TOKEN_CHARS` characters or with spaces.
    """
    tokens = []
    for n, line in enumerate(_read(path, "token file").decode("utf-8", "replace").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if len(line) < MIN_TOKEN_CHARS or any(c.isspace() for c in line):
            raise ServeError(f"{path}:{n}: a token must be at least {MIN_TOKEN_CHARS} characters without spaces, "
                             f"got {len(line)} characters")
        tokens.append(line.encode("utf-8"))
    if not tokens:
        raise ServeError(f"{path}: no token in the file (expected one token per line)")
    return tuple(tokens)


def server_credentials(tls_cert: str | None, tls_key: str | None,
                       tls_client_ca: str | None) -> grpc.ServerCredentials | None:
    """TLS credentials for the gRPC port, or None for plaintext (no ``tls_cert``).

    Raises:
        ServeError: a certificate without its key (or the reverse), a client CA
            without a server certificate, or a file that cannot be read.
    """
    if not tls_cert and not tls_key:
        if tls_client_ca:
            raise ServeError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)")
        return None
    if not (tls_cert and tls_key):
        raise ServeError("TLS needs both --tls-cert and --tls-key")
    cert, key = _read(tls_cert, "TLS certificate"), _read(tls_key, "TLS key")
    ca = _read(tls_client_ca, "client CA") if tls_client_ca else None
    try:
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)
    except Exception as exc:  # grpc raises plain RuntimeError/ValueError on bad PEM
        raise ServeError(f"cannot use the TLS certificate/key: {exc}") from exc


@dataclass(frozen=True)
class TokenPolicy:
    """The tokens each role accepts; an empty tuple leaves that role open."""

    infer: tuple[bytes, ...] = ()
    admin: tuple[bytes, ...] = ()

    @classmethod
    def from_files(cls, infer_token_file: str | None, admin_token_file: str | None) -> "TokenPolicy":
        return cls(load_tokens(infer_token_file) if infer_token_file else (),
                   load_tokens(admin_token_file) if admin_token_file else ())

    @property
    def enabled(self) -> bool:
        return bool(self.infer or self.admin)

    def check(self, method: str, metadata: Any) -> tuple[grpc.StatusCode, str] | None:
        """None when ``metadata`` may call ``method``, else the refusal ``(code, message)``."""
        role = role_of(method)
        wanted = self.infer if role == "infer" else self.admin if role == "admin" else ()
        if not wanted:
            return None
        token = _bearer(metadata)
        if token is None:
            return (grpc.StatusCode.UNAUTHENTICATED,
                    f"this server needs an {role} token: send metadata 'authorization: Bearer <token>'")
        if _matches(token, wanted):
            return None
        other = self.admin if role == "infer" else self.infer
        if _matches(token, other):
            return grpc.StatusCode.PERMISSION_DENIED, f"this token may not call {method.rsplit('/', 1)[-1]} " \
                                                      f"(it needs an {role} token)"
        return grpc.StatusCode.UNAUTHENTICATED, "the bearer token is not valid"


def _bearer(metadata: Any) -> bytes | None:
    for key, value in metadata or ():
        if key.lower() != "authorization":
            continue
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip().encode("utf-8", "replace")
        return None
    return None


def _matches(token: bytes, accepted: tuple[bytes, ...]) -> bool:
    ok = False
    for t in accepted:  # no early exit: the time does not tell which token matched
        ok |= hmac.compare_digest(token, t)
    return ok


def _refusal(handler: Any, code: grpc.StatusCode, message: str) -> Any:
    """A handler of the same kind as ``handler`` that answers ``code`` without parsing the request."""

    async def unary(request: Any, context: Any) -> Any:
        await context.abort(code, message)

    async def streaming(request_iterator: Any, context: Any) -> Any:
        await context.abort(code, message)

    ser = handler.response_serializer if handler is not None else None
    if handler is None or handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary, response_serializer=ser)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(unary, response_serializer=ser)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(streaming, response_serializer=ser)
    return grpc.stream_stream_rpc_method_handler(streaming, response_serializer=ser)


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Checks each call's bearer token against a :class:`TokenPolicy` before its handler runs.

    ``on_refused(method, code)`` is called for every refusal (metrics).
    """

    def __init__(self, policy: TokenPolicy, on_refused: Any = None):
        self.policy = policy
        self.on_refused = on_refused

    async def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        refusal = self.policy.check(handler_call_details.method, handler_call_details.invocation_metadata)
        handler = await continuation(handler_call_details)
        if refusal is None:
            return handler
        if self.on_refused is not None:
            self.on_refused(handler_call_details.method, refusal[0])
        return _refusal(handler, *refusal)


def interceptors(infer_token_file: str | None, admin_token_file: str | None, *, tls: bool,
                 on_refused: Any = None) -> list[grpc.aio.ServerInterceptor]:
    """The server interceptors for these token files (none when neither is given).

    Raises:
        ServeError: a token file cannot be used (:func:`load_tokens`).
    """
    policy = TokenPolicy.from_files(infer_token_file, admin_token_file)
    if not policy.enabled:
        return []
    if not tls:
        log.warning("bearer tokens are checked, but without --tls-cert they travel in clear text")
    log.info("tokens required: inference %s, model control/statistics %s",
             "yes" if policy.infer else "no (open)", "yes" if policy.admin else "no (open)")
    if policy.infer and not policy.admin:
        log.warning("inference needs a token but the repository index, statistics and (in explicit mode) model "
                    "control do not: give --admin-token-file to close them")
    return [TokenInterceptor(policy, on_refused)]
