"""KServe v2 REST beside gRPC: Triton's HTTP endpoints on aiohttp, answered by the gRPC servicer.

Each REST call becomes the protobuf request of its gRPC method and is answered by
the same :class:`~ctredge.serve.servicer.InferenceServicer` handler, on the same
event loop: checks, limits, counting (ModelStatistics and Prometheus, once per
request), drain and messages are the gRPC ones by construction (a REST request
has no deadline: KServe v2 defines none).  The gRPC status of an answer becomes
its HTTP status (:data:`HTTP_STATUS`, the mapping of ``google.rpc.Code`` to
HTTP), the message goes unchanged into Triton's ``{"error": "..."}`` body.

=======================================================  ======  =====================  ======
path                                                     method  gRPC method            role
=======================================================  ======  =====================  ======
``/v2/health/live``, ``/v2/health/ready``                GET     ServerLive/Ready       open
``/v2/models/{m}[/versions/{v}]/ready``                  GET     ModelReady             open
``/v2``                                                  GET     ServerMetadata         infer
``/v2/models/{m}[/versions/{v}]``                        GET     ModelMetadata          infer
``/v2/models/{m}[/versions/{v}]/config``                 GET     ModelConfig            infer
``/v2/models/{m}[/versions/{v}]/infer``                  POST    ModelInfer             infer
``/v2/models[/{m}[/versions/{v}]]/stats``                GET     ModelStatistics        admin
``/v2/repository/index``                                 POST    RepositoryIndex        admin
``/v2/repository/models/{m}/load``, ``.../unload``       POST    RepositoryModelLoad/…  admin
shared memory, trace and log settings                    both    (UNIMPLEMENTED: 501)   admin
=======================================================  ======  =====================  ======

Health answers 200 for true and 400 for false with an empty body (KServe v2).
Trust no client: the bearer token (``Authorization: Bearer <token>``) is checked
against :mod:`.security`'s roles before the body is read; a body larger than
``max_message_bytes`` is refused (413) before it is read, or as soon as it grows
past it; inference bodies are parsed by :mod:`.restcodec` and their header
checked with :func:`ctredge.serve.codec.check_request` before any JSON data is
converted.  TLS (and client certificates) use the gRPC port's files.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl
import time
from typing import Any, Awaitable, Callable

import grpc
from aiohttp import web
from tritonclient.grpc import service_pb2 as pb

from ctredge.serve import codec, security
from ctredge.serve.errors import InvalidInput, ServeError, grpc_status
from ctredge.serve.restcodec import HEADER_LENGTH, check_text, encode_infer, loads, message_json, parse_infer
from ctredge.serve.servicer import INLINE_ELEMENTS, PARSE_INLINE_BYTES, Undecodable

log = logging.getLogger("ctredge.serve")

HTTP_STATUS = {
    "OK": 200, "INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "OUT_OF_RANGE": 400, "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403, "NOT_FOUND": 404, "ABORTED": 409, "ALREADY_EXISTS": 409, "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499, "UNIMPLEMENTED": 501, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504,
}
PROVIDER_HEADER = "ctredge-execution-provider"
_SHM = {"systemsharedmemory": "SystemSharedMemory", "cudasharedmemory": "CudaSharedMemory"}


def http_status(code_name: str) -> int:
    """The HTTP status answering a gRPC status (by name); 500 for INTERNAL, UNKNOWN and the rest."""
    return HTTP_STATUS.get(code_name, 500)


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """Triton's error answer: ``{"error": message}``."""
    return web.Response(status=status, text=json.dumps({"error": message}), content_type="application/json",
                        headers=headers)


class _Aborted(Exception):
    def __init__(self, code: Any, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class _Context:
    """What the servicer's handlers use of a ``grpc.aio`` context (REST calls carry no deadline)."""

    def __init__(self) -> None:
        self.initial_metadata: tuple = ()

    def time_remaining(self) -> float | None:
        return None

    async def abort(self, code: Any, message: str) -> None:
        raise _Aborted(code, message)

    async def send_initial_metadata(self, metadata: Any) -> None:
        self.initial_metadata = tuple(metadata)


class Refused(Undecodable):
    """A REST body that is no inference request: the servicer answers and counts it as undecodable bytes."""

    def __init__(self, exc: InvalidInput):
        super().__init__("ModelInfer", 0)
        self.exc = exc

    def error(self) -> InvalidInput:
        return self.exc


def ssl_context(tls_cert: str | None, tls_key: str | None, tls_client_ca: str | None) -> ssl.SSLContext | None:
    """The REST port's TLS context from the gRPC port's PEM files (None: plaintext).

    Raises:
        ServeError: half a configuration, or files that cannot be used.
    """
    security.server_credentials(tls_cert, tls_key, tls_client_ca)  # the same checks and messages as gRPC
    if not tls_cert:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(tls_cert, tls_key)
        if tls_client_ca:
            ctx.load_verify_locations(tls_client_ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ServeError(f"cannot use the TLS certificate/key for REST: {exc}") from exc
    return ctx


class RestServer:
    """The REST port of an :class:`~ctredge.serve.server.InferenceServer`: aiohttp over its servicer.

    ``options``: the server's :class:`~ctredge.serve.server.ServerOptions`
    (``http_host``/``host``, ``http_port``, ``max_message_bytes``, TLS and token
    files); ``executor``: where large bodies are parsed and converted;
    ``on_refused(method, code)``: called for each token refusal (metrics).
    """

    def __init__(self, servicer: Any, repository: Any, options: Any, *, executor: Any = None,
                 on_refused: Callable[[str, Any], None] | None = None, reuse_port: bool = False):
        self.servicer, self.repository, self.options = servicer, repository, options
        self.reuse_port = reuse_port  # a worker of ``--workers N``: the supervisor holds the port
        self.executor = executor
        self.on_refused = on_refused
        self.max_body = options.max_message_bytes
        self.policy = security.TokenPolicy.from_files(options.infer_token_file, options.admin_token_file)
        self.active = 0  # REST requests being handled (a stop waits for them)
        self.port: int | None = None
        self._runner: web.AppRunner | None = None

    # ------------------------------------------------------------------ lifecycle
    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body, middlewares=[self._middleware])
        get, post = web.get, web.post
        m, mv = "/v2/models/{name}", "/v2/models/{name}/versions/{version}"
        routes = [get("/v2/health/live", self.live), get("/v2/health/ready", self.ready), get("/v2", self.server_meta),
                  get("/v2/models/stats", self.stats), post("/v2/repository/index", self.index),
                  post("/v2/repository/models/{name}/load", self.load),
                  post("/v2/repository/models/{name}/unload", self.unload)]
        for base in (mv, m):
            routes += [get(base, self.model_meta), get(base + "/ready", self.model_ready),
                       get(base + "/config", self.config), get(base + "/stats", self.stats),
                       post(base + "/infer", self.infer)]
        for prefix in ("/v2/systemsharedmemory", "/v2/cudasharedmemory", "/v2/trace", "/v2/logging",
                       "/v2/models/{name}/trace"):
            routes += [web.route("*", prefix + "{tail:(/.*)?}", self.unimplemented)]
        app.add_routes(routes)
        app.on_response_prepare.append(_no_server_header)
        return app

    async def start(self) -> int:
        """Bind and serve; returns the bound port.

        Raises:
            ServeError: the address cannot be bound, or the TLS files cannot be used.
        """
        o = self.options
        host = o.http_host or o.host
        ctx = ssl_context(o.tls_cert, o.tls_key, o.tls_client_ca)
        try:
            sock = socket.create_server((host, o.http_port), family=socket.AF_INET6 if ":" in host else socket.AF_INET,
                                        reuse_port=self.reuse_port)
        except OSError as exc:
            raise ServeError(f"cannot listen on {host}:{o.http_port} for REST: {exc.strerror or exc}") from exc
        # stop() waits for the requests in hand itself (within the server's grace); aiohttp's own wait is a backstop
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.SockSite(self._runner, sock, ssl_context=ctx).start()
        self.port = int(sock.getsockname()[1])
        log.info("KServe v2 REST on %s://%s:%d/v2", "https" if ctx else "http", host, self.port)
        return self.port

    async def stop(self, grace: float = 0.0) -> None:
        """Let the REST requests in hand finish for up to ``grace`` seconds, then close the port."""
        end = time.monotonic() + grace
        while self.active and time.monotonic() < end:
            await asyncio.sleep(0.005)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ------------------------------------------------------------------ plumbing
    @web.middleware
    async def _middleware(self, request: web.Request, handler: Callable[[web.Request], Awaitable[Any]]) -> Any:
        self.active += 1
        try:
            return await handler(request)
        except _Aborted as exc:
            return error_response(http_status(exc.code.name), exc.message)
        except _TooLarge as exc:
            return self._too_large(exc.size)
        except web.HTTPRequestEntityTooLarge:
            return self._too_large(None)
        except web.HTTPMethodNotAllowed as exc:
            return error_response(405, f"{request.method} is not allowed on {codec.shown(request.path)}; expected "
                                       f"{' or '.join(sorted(exc.allowed_methods))}",
                                  {"Allow": ",".join(sorted(exc.allowed_methods))})
        except web.HTTPNotFound:
            return error_response(404, f"no endpoint {request.method} {codec.shown(request.path)}; this server "
                                       f"speaks KServe v2 REST under /v2")
        except web.HTTPException:
            raise
        except Exception as exc:  # a client's mistake (its status), or a bug (logged, 500); the server serves on
            code, message = grpc_status(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.error("REST %s %s failed", request.method, request.path, exc_info=exc)
            return error_response(http_status(code.name), message)
        finally:
            self.active -= 1

    def _refusal(self, request: web.Request, method: str) -> web.Response | None:
        """The 401/403 answer when the request's bearer token may not call ``method`` (a gRPC method name)."""
        full = security.SERVICE + method
        auth = request.headers.get("Authorization")
        refusal = self.policy.check(full, (("authorization", auth),) if auth is not None else ())
        if refusal is None:
            return None
        code, message = refusal
        if self.on_refused is not None:
            self.on_refused(full, code)
        headers = {"WWW-Authenticate": "Bearer"} if code == grpc.StatusCode.UNAUTHENTICATED else None
        return error_response(http_status(code.name), message, headers)

    def _too_large(self, size: int | None) -> web.Response:
        got = f"{size} bytes" if size is not None else "more"
        return error_response(413, f"the request body has {got}, expected at most {self.max_body} bytes "
                                   f"(--max-message-mb)")

    async def _body(self, request: web.Request) -> bytes:
        """The body, refused (413) before reading when its declared length is over the limit."""
        if request.content_length is not None and request.content_length > self.max_body:
            raise _TooLarge(request.content_length)
        return await request.read()

    async def _json_body(self, request: web.Request, what: str) -> dict[str, Any]:
        body = await self._body(request)
        if not body.strip():
            return {}
        doc = loads(body, what)
        if not isinstance(doc, dict):
            raise InvalidInput(f"the {what} is a JSON object, got {type(doc).__name__}")
        return doc

    async def _call(self, method: str, req: Any) -> tuple[Any, _Context]:
        ctx = _Context()
        return await getattr(self.servicer, method)(req, ctx), ctx

    @staticmethod
    def _json(doc: Any, headers: dict[str, str] | None = None) -> web.Response:
        return web.Response(text=json.dumps(doc, separators=(",", ":")), content_type="application/json",
                            headers=headers)

    @staticmethod
    def _names(request: web.Request) -> tuple[str, str]:
        return request.match_info.get("name", ""), request.match_info.get("version", "")

    # ------------------------------------------------------------------ health and metadata
    async def live(self, request: web.Request) -> web.StreamResponse:
        resp, _ = await self._call("ServerLive", pb.ServerLiveRequest())
        return web.Response(status=200 if resp.live else 400)

    async def ready(self, request: web.Request) -> web.StreamResponse:
        resp, _ = await self._call("ServerReady", pb.ServerReadyRequest())
        return web.Response(status=200 if resp.ready else 400)

    async def model_ready(self, request: web.Request) -> web.StreamResponse:
        name, version = self._names(request)
        resp, _ = await self._call("ModelReady", pb.ModelReadyRequest(name=name, version=version))
        return web.Response(status=200 if resp.ready else 400)

    async def server_meta(self, request: web.Request) -> web.StreamResponse:
        refused = self._refusal(request, "ServerMetadata")
        if refused is not None:
            return refused
        resp, _ = await self._call("ServerMetadata", pb.ServerMetadataRequest())
        return self._json(message_json(resp))

    async def model_meta(self, request: web.Request) -> web.StreamResponse:
        refused = self._refusal(request, "ModelMetadata")
        if refused is not None:
            return refused
        name, version = self._names(request)
        resp, ctx = await self._call("ModelMetadata", pb.ModelMetadataRequest(name=name, version=version))
        return self._json(message_json(resp), {k: v for k, v in ctx.initial_metadata if k == PROVIDER_HEADER})

    async def config(self, request: web.Request) -> web.StreamResponse:
        refused = self._refusal(request, "ModelConfig")
        if refused is not None:
            return refused
        name, version = self._names(request)
        resp, _ = await self._call("ModelConfig", pb.ModelConfigRequest(name=name, version=version))
        return self._json(message_json(resp.config, defaults=False))

    async def stats(self, request: web.Request) -> web.StreamResponse:
        refused = self._refusal(request, "ModelStatistics")
        if refused is not None:
            return refused
        name, version = self._names(request)
        resp, _ = await self._call("ModelStatistics", pb.ModelStatisticsRequest(name=name, version=version))
        return self._json(message_json(resp))

    # ------------------------------------------------------------------ repository
    async def index(self, request: web.Request) -> web.StreamResponse:
        refused = self._refusal(request, "RepositoryIndex")
        if refused is not None:
            return refused
        doc = await self._json_body(request, "repository index request")
        ready = doc.get("ready", False)
        if not isinstance(ready, bool) or set(doc) - {"ready"}:
            raise InvalidInput(f"a repository index request is {{\"ready\": true|false}}, got "
                               f"{codec.shown(json.dumps(doc))}")
        resp, _ = await self._call("RepositoryIndex", pb.RepositoryIndexRequest(ready=ready))
        return self._json([{k: v for k, v in message_json(m).items() if v != "" or k != "reason"}
                           for m in resp.models])

    async def _control(self, request: web.Request, method: str, cls: Any) -> web.StreamResponse:
        refused = self._refusal(request, method)
        if refused is not None:
            return refused
        doc = await self._json_body(request, f"{method} request")
        if set(doc) - {"parameters"}:
            raise InvalidInput(f"a model load/unload request is {{\"parameters\": {{...}}}}, got keys "
                               f"[{', '.join(map(codec.shown, list(doc)[:8]))}]")
        params = doc.get("parameters")
        params = {} if params is None else params
        if not isinstance(params, dict):
            raise InvalidInput(f"{method} parameters: expected a JSON object, got {type(params).__name__}")
        req = cls(model_name=request.match_info["name"])
        for key, value in params.items():
            check_text(f"{method} parameter name", key)
            if method == "RepositoryModelUnload" and key == "unload_dependents" and isinstance(value, bool):
                continue  # tritonclient always sends it; a ctredge model has no dependents (no ensembles)
            req.parameters[key].string_param = value if isinstance(value, str) else json.dumps(value)[:64]
        await self._call(method, req)
        return web.Response(status=200)

    async def load(self, request: web.Request) -> web.StreamResponse:
        return await self._control(request, "RepositoryModelLoad", pb.RepositoryModelLoadRequest)

    async def unload(self, request: web.Request) -> web.StreamResponse:
        return await self._control(request, "RepositoryModelUnload", pb.RepositoryModelUnloadRequest)

    async def unimplemented(self, request: web.Request) -> web.StreamResponse:
        parts = request.path.strip("/").split("/")
        if parts[1] in _SHM:
            action = parts[-1] if parts[-1] in ("register", "unregister") else "status"
            method = _SHM[parts[1]] + action.capitalize()
        else:
            method = "LogSettings" if parts[1] == "logging" else "TraceSetting"
        refused = self._refusal(request, method)
        if refused is not None:
            return refused
        await self._call(method, getattr(pb, method + "Request")())
        return web.Response(status=200)  # not reached: these handlers answer UNIMPLEMENTED

    # ------------------------------------------------------------------ inference
    async def infer(self, request: web.Request) -> web.StreamResponse:
        """parse -> (model, header check) -> convert JSON data -> the servicer's ModelInfer -> REST answer."""
        refused = self._refusal(request, "ModelInfer")
        if refused is not None:
            return refused
        body = await self._body(request)
        t0 = time.perf_counter_ns()
        name, version = self._names(request)
        header_length = request.headers.get(HEADER_LENGTH)
        loop = asyncio.get_running_loop()
        try:
            if len(body) > PARSE_INLINE_BYTES:
                parsed = await loop.run_in_executor(self.executor, parse_infer, body, header_length, name, version)
            else:
                parsed = parse_infer(body, header_length, name, version)
        except InvalidInput as exc:
            return await self._model_infer(Refused(exc), None)
        req = parsed.header
        mv = None
        if self.servicer.accepting:
            try:
                mv = self.repository.get(name, version)
                codec.check_request(req, mv.signature, mv.signature.limits)
            except Exception:  # the servicer meets the same error on the header and answers and counts it
                mv = None
        if mv is not None:
            try:
                if parsed.elements() > INLINE_ELEMENTS:
                    req = await loop.run_in_executor(self.executor, parsed.request)
                else:
                    req = parsed.request()
            except InvalidInput as exc:  # JSON data that no protobuf request could carry: counted here, once
                self.servicer.arrivals += 1
                self.servicer._count(mv, "INVALID_ARGUMENT", time.perf_counter_ns() - t0, None)
                return error_response(400, str(exc))
        return await self._model_infer(req, parsed)

    async def _model_infer(self, req: Any, parsed: Any) -> web.StreamResponse:
        try:
            response, _ = await self._call("ModelInfer", req)
        except _Aborted as exc:
            return error_response(http_status(exc.code.name), exc.message)
        try:
            body, json_length = encode_infer(response, parsed)
        except InvalidInput as exc:
            return error_response(400, str(exc))
        if json_length is None:
            return web.Response(body=body, content_type="application/json")
        return web.Response(body=body, content_type="application/octet-stream",
                            headers={HEADER_LENGTH: str(json_length)})


async def _no_server_header(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.popall("Server", None)  # the library and Python versions are no client's business


class _TooLarge(Exception):
    def __init__(self, size: int):
        super().__init__(size)
        self.size = size
