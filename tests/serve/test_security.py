"""TLS (server-only and mutual), bearer tokens per role, open health/reflection, refusals in /metrics.

Every client here is unmodified ``tritonclient.grpc`` (``ssl=True``,
``root_certificates=``, ``private_key=``, ``certificate_chain=``, ``headers=``)
or a raw grpc channel for health and reflection.  Certificates are made per
test session with the ``cryptography`` package (a throwaway CA, a server cert
for ``127.0.0.1``/``localhost``, client certs from that CA and from a rogue one).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import secrets
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from servekit import contract_feeds, ctr_model, save, small_spec
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import InferenceServerException

from ctredge.serve import security
from ctredge.serve.codec import build_request
from ctredge.serve.errors import ServeError
from ctredge.serve.server import ServerOptions, ServerThread

pytestmark = pytest.mark.slow

TIMEOUT = 10.0  # seconds per client call: a hung handshake fails the test instead of hanging it


# ----------------------------------------------------------------------------- certificates
def _name(common_name: str):
    from cryptography.x509.oid import NameOID
    from cryptography import x509

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _cert(subject: str, key, issuer: str, issuer_key, *, ca: bool, server: bool = False):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID

    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                      content_commitment=False, key_encipherment=False,
                                                      data_encipherment=False, key_agreement=False,
                                                      encipher_only=False, decipher_only=False), critical=True)
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(folder: Path, stem: str, cert, key=None) -> dict[str, str]:
    from cryptography.hazmat.primitives import serialization

    out = {"cert": str(folder / f"{stem}.crt")}
    Path(out["cert"]).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        out["key"] = str(folder / f"{stem}.key")
        Path(out["key"]).write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                       serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    return out


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, dict[str, str]]:
    """PEM files: ``ca``, ``server`` (127.0.0.1 + localhost), ``client`` (signed by ca), ``rogue`` (another CA)."""
    pytest.importorskip("cryptography")
    from cryptography.hazmat.primitives.asymmetric import ec

    folder = tmp_path_factory.mktemp("pki")
    keys = {k: ec.generate_private_key(ec.SECP256R1()) for k in ("ca", "server", "client", "rogue_ca", "rogue")}
    ca = _cert("ctredge test CA", keys["ca"], "ctredge test CA", keys["ca"], ca=True)
    rogue_ca = _cert("rogue CA", keys["rogue_ca"], "rogue CA", keys["rogue_ca"], ca=True)
    return {
        "ca": _write(folder, "ca", ca),
        "server": _write(folder, "server", _cert("127.0.0.1", keys["server"], "ctredge test CA", keys["ca"],
                                                 ca=False, server=True), keys["server"]),
        "client": _write(folder, "client", _cert("client", keys["client"], "ctredge test CA", keys["ca"], ca=False),
                         keys["client"]),
        "rogue": _write(folder, "rogue", _cert("rogue", keys["rogue"], "rogue CA", keys["rogue_ca"], ca=False),
                        keys["rogue"]),
    }


# ----------------------------------------------------------------------------- servers
@pytest.fixture(scope="module")
def spec():
    return small_spec()


@pytest.fixture(scope="module")
def sec_repo(tmp_path_factory, spec) -> Path:
    root = tmp_path_factory.mktemp("secrepo")
    save(ctr_model(spec, seed=3), root / "ctr" / "1" / "model.onnx")
    (root / "ctr" / "config.json").write_text(json.dumps({"max_batch_size": 64}))
    return root


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> dict[str, str]:
    """Token files (with a comment and blank lines) and the tokens they hold."""
    folder = tmp_path_factory.mktemp("tokens")
    out = {"infer": "inf-" + secrets.token_hex(16), "infer2": "inf2-" + secrets.token_hex(16),
           "admin": "adm-" + secrets.token_hex(16)}
    (folder / "infer").write_text(f"# inference tokens\n\n{out['infer']}\n  {out['infer2']}  \n")
    (folder / "admin").write_text(f"{out['admin']}\n")
    out["infer_file"], out["admin_file"] = str(folder / "infer"), str(folder / "admin")
    return out


def _serve(repo: Path, **kwargs):
    return ServerThread(repo, options=ServerOptions(port=0, **kwargs))


@pytest.fixture(scope="module")
def plain_server(sec_repo):
    with _serve(sec_repo) as s:
        yield s


@pytest.fixture(scope="module")
def tls_server(sec_repo, pki):
    with _serve(sec_repo, tls_cert=pki["server"]["cert"], tls_key=pki["server"]["key"]) as s:
        yield s


@pytest.fixture(scope="module")
def mtls_server(sec_repo, pki):
    with _serve(sec_repo, tls_cert=pki["server"]["cert"], tls_key=pki["server"]["key"],
                tls_client_ca=pki["ca"]["cert"]) as s:
        yield s


@pytest.fixture(scope="module")
def token_server(sec_repo, tokens):
    with _serve(sec_repo, infer_token_file=tokens["infer_file"], admin_token_file=tokens["admin_file"],
                metrics_port=0, metrics_host="127.0.0.1") as s:
        yield s


# ----------------------------------------------------------------------------- helpers
def _inputs(spec, rows: int = 3) -> list:
    feeds = contract_feeds(spec, rows, seed=7)
    out = []
    for name, dt in (("dense", "FP32"), ("cat", "INT64"), ("hist", "INT64")):
        t = tc.InferInput(name, list(feeds[name].shape), dt)
        t.set_data_from_numpy(feeds[name])
        out.append(t)
    return out


def _infer(client, spec, **kwargs) -> np.ndarray:
    return client.infer("ctr", _inputs(spec), client_timeout=TIMEOUT, **kwargs).as_numpy("ctr")


def _code(exc: InferenceServerException) -> str:
    return str(exc.status()).rsplit(".", 1)[-1]


def _bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def _refused(call, *args, **kwargs) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as info:
        call(*args, client_timeout=TIMEOUT, **kwargs)
    return _code(info.value), str(info.value.message())


# ----------------------------------------------------------------------------- TLS
def test_tls_infer_equals_plaintext(plain_server, tls_server, pki, spec):
    with tc.InferenceServerClient(plain_server.url) as plain:
        expected = _infer(plain, spec)
    with tc.InferenceServerClient(tls_server.url, ssl=True, root_certificates=pki["ca"]["cert"]) as client:
        assert client.is_server_ready(client_timeout=TIMEOUT)
        got = _infer(client, spec)
    assert got.shape == (3, 1)
    np.testing.assert_array_equal(got, expected)


def test_plaintext_client_fails_on_tls_port(tls_server):
    with tc.InferenceServerClient(tls_server.url) as client:
        with pytest.raises(InferenceServerException) as info:
            client.is_server_live(client_timeout=TIMEOUT)
    assert _code(info.value) in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "INTERNAL")


def test_tls_client_must_trust_the_server_ca(tls_server, pki):
    with tc.InferenceServerClient(tls_server.url, ssl=True, root_certificates=pki["rogue"]["cert"]) as client:
        with pytest.raises(InferenceServerException) as info:
            client.is_server_live(client_timeout=TIMEOUT)
    assert _code(info.value) in ("UNAVAILABLE", "DEADLINE_EXCEEDED")


def test_mutual_tls_with_a_client_cert_works(mtls_server, plain_server, pki, spec):
    with tc.InferenceServerClient(plain_server.url) as plain:
        expected = _infer(plain, spec)
    with tc.InferenceServerClient(mtls_server.url, ssl=True, root_certificates=pki["ca"]["cert"],
                                  private_key=pki["client"]["key"],
                                  certificate_chain=pki["client"]["cert"]) as client:
        np.testing.assert_array_equal(_infer(client, spec), expected)


@pytest.mark.parametrize("who", ["none", "rogue"])
def test_mutual_tls_refuses_clients_without_a_trusted_cert(mtls_server, pki, who):
    extra = {} if who == "none" else {"private_key": pki["rogue"]["key"], "certificate_chain": pki["rogue"]["cert"]}
    with tc.InferenceServerClient(mtls_server.url, ssl=True, root_certificates=pki["ca"]["cert"], **extra) as client:
        with pytest.raises(InferenceServerException) as info:
            client.is_server_live(client_timeout=TIMEOUT)
    assert _code(info.value) in ("UNAVAILABLE", "DEADLINE_EXCEEDED")


@pytest.mark.parametrize("kwargs, needle", [
    ({"tls_cert": "CERT"}, "both"),
    ({"tls_key": "KEY"}, "both"),
    ({"tls_client_ca": "CA"}, "--tls-cert"),
])
def test_server_credentials_refuses_half_configurations(pki, kwargs, needle):
    args = {"tls_cert": None, "tls_key": None, "tls_client_ca": None}
    names = {"CERT": pki["server"]["cert"], "KEY": pki["server"]["key"], "CA": pki["ca"]["cert"]}
    args.update({k: names[v] for k, v in kwargs.items()})
    with pytest.raises(ServeError, match=needle):
        security.server_credentials(**args)


def test_server_credentials_names_a_missing_file(tmp_path, pki):
    missing = tmp_path / "nope.crt"
    with pytest.raises(ServeError, match="nope.crt"):
        security.server_credentials(str(missing), pki["server"]["key"], None)


# ----------------------------------------------------------------------------- tokens over the wire
@pytest.fixture(scope="module")
def tclient(token_server):
    with tc.InferenceServerClient(token_server.url) as client:
        yield client


@pytest.mark.parametrize("which", ["infer", "infer2"])
def test_infer_token_may_infer_and_read_metadata(tclient, tokens, spec, which):
    headers = _bearer(tokens[which])
    assert _infer(tclient, spec, headers=headers).shape == (3, 1)
    meta = tclient.get_model_metadata("ctr", headers=headers, client_timeout=TIMEOUT)
    assert meta.name == "ctr"


def test_no_token_is_unauthenticated(tclient, spec):
    code, message = _refused(tclient.infer, "ctr", _inputs(spec))
    assert code == "UNAUTHENTICATED" and "authorization: Bearer" in message
    assert _refused(tclient.get_model_metadata, "ctr")[0] == "UNAUTHENTICATED"
    assert _refused(tclient.get_inference_statistics, "ctr")[0] == "UNAUTHENTICATED"


@pytest.mark.parametrize("headers", [
    {"authorization": "Bearer wrong-token-of-enough-length"},
    {"authorization": "Basic dXNlcjpwYXNz"},
    {"authorization": "Bearer"},
    {"x-api-key": "whatever"},
])
def test_wrong_or_malformed_token_is_unauthenticated(tclient, spec, headers):
    assert _refused(tclient.infer, "ctr", _inputs(spec), headers=headers)[0] == "UNAUTHENTICATED"
    assert _refused(tclient.get_model_repository_index, headers=headers)[0] == "UNAUTHENTICATED"


def test_admin_token_may_not_infer(tclient, tokens, spec):
    code, message = _refused(tclient.infer, "ctr", _inputs(spec), headers=_bearer(tokens["admin"]))
    assert code == "PERMISSION_DENIED" and "ModelInfer" in message
    assert tokens["admin"] not in message


def test_infer_token_may_not_read_statistics_or_the_index(tclient, tokens):
    headers = _bearer(tokens["infer"])
    assert _refused(tclient.get_inference_statistics, "ctr", headers=headers)[0] == "PERMISSION_DENIED"
    assert _refused(tclient.get_model_repository_index, headers=headers)[0] == "PERMISSION_DENIED"
    assert _refused(tclient.unload_model, "ctr", headers=headers)[0] == "PERMISSION_DENIED"


def test_admin_token_reads_statistics_and_the_index(tclient, tokens, spec):
    _infer(tclient, spec, headers=_bearer(tokens["infer"]))
    headers = _bearer(tokens["admin"])
    stats = tclient.get_inference_statistics("ctr", headers=headers, client_timeout=TIMEOUT)
    assert [m.name for m in stats.model_stats] == ["ctr"]
    assert stats.model_stats[0].inference_stats.success.count >= 1
    index = tclient.get_model_repository_index(headers=headers, client_timeout=TIMEOUT)
    assert [m.name for m in index.models] == ["ctr"]


def test_live_ready_health_and_reflection_need_no_token(token_server, tclient):
    assert tclient.is_server_live(client_timeout=TIMEOUT)
    assert tclient.is_server_ready(client_timeout=TIMEOUT)
    assert tclient.is_model_ready("ctr", client_timeout=TIMEOUT)  # per-model readiness probes too
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(token_server.url) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        answers = list(reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=TIMEOUT))
    services = {s.name for s in answers[0].list_services_response.service}
    assert "inference.GRPCInferenceService" in services and "grpc.health.v1.Health" in services


def test_refused_request_is_answered_before_parsing(token_server):
    """Garbage bytes without a token: UNAUTHENTICATED (not INVALID_ARGUMENT): the message is never decoded."""
    with grpc.insecure_channel(token_server.url) as ch:
        call = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer", request_serializer=None,
                              response_deserializer=None)
        with pytest.raises(grpc.RpcError) as info:
            call(b"\xff\xfe not a protobuf \x00\x01", timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("token, expected", [(None, grpc.StatusCode.UNAUTHENTICATED),
                                               ("admin", grpc.StatusCode.PERMISSION_DENIED),
                                               ("infer", grpc.StatusCode.UNIMPLEMENTED)])
def test_streaming_call_is_checked_too(token_server, tokens, token, expected):
    """ModelStreamInfer (stream-stream) gets the same refusal; with the right token, the server's UNIMPLEMENTED."""
    metadata = () if token is None else (("authorization", f"Bearer {tokens[token]}"),)
    with grpc.insecure_channel(token_server.url) as ch:
        call = ch.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer", request_serializer=None,
                                response_deserializer=None)
        with pytest.raises(grpc.RpcError) as info:
            list(call(iter([pb.ModelInferRequest(model_name="ctr").SerializeToString()]), timeout=TIMEOUT,
                      metadata=metadata))
    assert info.value.code() == expected


def test_unknown_method_needs_a_token_then_is_unimplemented(token_server, tokens):
    with grpc.insecure_channel(token_server.url) as ch:
        call = ch.unary_unary("/inference.GRPCInferenceService/NoSuchMethod", request_serializer=None,
                              response_deserializer=None)
        codes = []
        for metadata in ((), (("authorization", f"Bearer {tokens['infer']}"),)):
            with pytest.raises(grpc.RpcError) as info:
                call(b"", timeout=TIMEOUT, metadata=metadata)
            codes.append(info.value.code())
    assert codes == [grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNIMPLEMENTED]


def test_tls_and_tokens_together(sec_repo, pki, tokens, spec):
    """The exposed setup: TLS and both token files; tritonclient with ssl=True and headers."""
    with _serve(sec_repo, tls_cert=pki["server"]["cert"], tls_key=pki["server"]["key"],
                infer_token_file=tokens["infer_file"], admin_token_file=tokens["admin_file"]) as s, \
            tc.InferenceServerClient(s.url, ssl=True, root_certificates=pki["ca"]["cert"]) as client:
        assert _infer(client, spec, headers=_bearer(tokens["infer"])).shape == (3, 1)
        assert _refused(client.infer, "ctr", _inputs(spec))[0] == "UNAUTHENTICATED"
        assert client.is_server_ready(client_timeout=TIMEOUT)


def test_tokens_without_tls_log_a_warning(tokens, caplog):
    with caplog.at_level("WARNING", logger="ctredge.serve"):
        assert len(security.interceptors(tokens["infer_file"], None, tls=False)) == 1
    assert "clear text" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="ctredge.serve"):
        security.interceptors(tokens["infer_file"], None, tls=True)
    assert "clear text" not in caplog.text


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=TIMEOUT) as resp:
        return resp.read().decode()


def _counter(text: str, metric: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(metric + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_refused_calls_are_counted_in_metrics(token_server, tclient, tokens, spec):
    port = token_server.server.metrics_port
    assert port
    before = _scrape(port)
    _refused(tclient.infer, "ctr", _inputs(spec))
    _refused(tclient.infer, "ctr", _inputs(spec), headers=_bearer(tokens["admin"]))
    after = _scrape(port)
    for code in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
        delta = _counter(after, "ctredge_refused_calls_total", method="ModelInfer", code=code) - \
            _counter(before, "ctredge_refused_calls_total", method="ModelInfer", code=code)
        assert delta == 1, code
    assert tokens["admin"] not in after and tokens["infer"] not in after


# ----------------------------------------------------------------------------- token files
def test_load_tokens_skips_comments_and_blank_lines(tokens):
    assert security.load_tokens(tokens["infer_file"]) == (tokens["infer"].encode(), tokens["infer2"].encode())


@pytest.mark.parametrize("text, needle", [
    ("short\n", "at least"),
    ("", "no token"),
    ("# only a comment\n\n   \n", "no token"),
    ("two words-that-are-long-enough\n", "without spaces"),
])
def test_load_tokens_refuses_bad_files(tmp_path, text, needle):
    path = tmp_path / "tokens.txt"
    path.write_text(text)
    with pytest.raises(ServeError, match=needle) as info:
        security.load_tokens(str(path))
    assert str(path) in str(info.value)


def test_load_tokens_names_a_missing_file(tmp_path):
    path = tmp_path / "missing-tokens"
    with pytest.raises(ServeError) as info:
        security.load_tokens(str(path))
    assert str(path) in str(info.value)


def test_server_start_fails_on_a_bad_token_file(sec_repo, tmp_path):
    bad = tmp_path / "bad"
    bad.write_text("short\n")
    with pytest.raises(ServeError, match="bad"):
        ServerThread(sec_repo, options=ServerOptions(port=0, infer_token_file=str(bad))).start()


# ----------------------------------------------------------------------------- TokenPolicy and roles
INFER, ADMIN = b"i" * 20, b"a" * 20
METHOD = "/inference.GRPCInferenceService/"


def _md(token: bytes | str | None, key: str = "authorization", scheme: str = "Bearer "):
    if token is None:
        return ()
    value = token.decode() if isinstance(token, bytes) else token
    return ((key, scheme + value),)


@pytest.mark.parametrize("method, metadata, expected", [
    ("ModelInfer", _md(INFER), None),
    ("ModelInfer", _md(None), grpc.StatusCode.UNAUTHENTICATED),
    ("ModelInfer", _md(ADMIN), grpc.StatusCode.PERMISSION_DENIED),
    ("ModelInfer", _md(b"x" * 20), grpc.StatusCode.UNAUTHENTICATED),
    ("ModelInfer", _md(INFER, scheme="bearer  "), None),
    ("ModelInfer", _md(INFER, scheme="Basic "), grpc.StatusCode.UNAUTHENTICATED),
    ("ModelInfer", (("authorization", ("Bearer " + INFER.decode()).encode()),), None),  # bytes value
    ("ModelInfer", (("x-other", "1"), ("authorization", "Bearer " + INFER.decode())), None),
    ("ModelMetadata", _md(INFER), None),
    ("ModelStatistics", _md(ADMIN), None),
    ("ModelStatistics", _md(INFER), grpc.StatusCode.PERMISSION_DENIED),
    ("ModelStatistics", _md(None), grpc.StatusCode.UNAUTHENTICATED),
    ("RepositoryModelLoad", _md(INFER), grpc.StatusCode.PERMISSION_DENIED),
    ("ServerLive", _md(None), None),
    ("ServerReady", _md(b"x" * 20), None),
])
def test_token_policy_check(method, metadata, expected):
    refusal = security.TokenPolicy(infer=(INFER,), admin=(ADMIN,)).check(METHOD + method, metadata)
    assert (refusal[0] if refusal else None) == expected
    if refusal:
        assert INFER.decode() not in refusal[1] and ADMIN.decode() not in refusal[1]


def test_token_policy_open_health_and_reflection():
    policy = security.TokenPolicy(infer=(INFER,), admin=(ADMIN,))
    for method in ("/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch",
                   "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                   "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"):
        assert policy.check(method, ()) is None, method


def test_token_policy_one_role_only():
    """An empty tuple leaves that role open: only inference tokens -> admin calls open, and the reverse."""
    infer_only = security.TokenPolicy(infer=(INFER,))
    assert infer_only.enabled
    assert infer_only.check(METHOD + "ModelStatistics", ()) is None
    assert infer_only.check(METHOD + "ModelInfer", ())[0] == grpc.StatusCode.UNAUTHENTICATED
    admin_only = security.TokenPolicy(admin=(ADMIN,))
    assert admin_only.check(METHOD + "ModelInfer", ()) is None
    assert admin_only.check(METHOD + "RepositoryModelUnload", _md(INFER))[0] == grpc.StatusCode.UNAUTHENTICATED
    assert not security.TokenPolicy().enabled
    assert security.interceptors(None, None, tls=False) == []


ADMIN_NAMES = {"RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload", "ModelStatistics",
               "SystemSharedMemoryStatus", "SystemSharedMemoryRegister", "SystemSharedMemoryUnregister",
               "CudaSharedMemoryStatus", "CudaSharedMemoryRegister", "CudaSharedMemoryUnregister",
               "TraceSetting", "LogSettings"}
OPEN_NAMES = {"ServerLive", "ServerReady", "ModelReady"}  # Triton's "health" group


def test_role_of_every_inference_service_method():
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    roles = {m.name: security.role_of(f"/{service.full_name}/{m.name}") for m in service.methods}
    assert set(roles.values()) <= {"open", "infer", "admin"}
    assert {n for n, r in roles.items() if r == "admin"} == ADMIN_NAMES
    assert {n for n, r in roles.items() if r == "open"} == OPEN_NAMES
    assert {"ModelInfer", "ModelStreamInfer", "ModelMetadata", "ModelConfig", "ServerMetadata"} <= \
        {n for n, r in roles.items() if r == "infer"}
    # the servicer implements exactly the methods the table covers
    assert set(roles) == {n for n in dir(service_pb2_grpc.GRPCInferenceServiceServicer) if not n.startswith("_")}


@pytest.mark.parametrize("method, role", [
    ("/grpc.health.v1.Health/Check", "open"),
    ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", "open"),
    ("/inference.GRPCInferenceService/NoSuchMethod", "infer"),  # unknown: the stricter default, not open
    ("/other.Service/ServerLive", "infer"),
    ("/inference.GRPCInferenceService/modelstatistics", "infer"),
])
def test_role_of_other_names(method, role):
    assert security.role_of(method) == role


# ----------------------------------------------------------------------------- model control default
def test_default_model_control_mode_refuses_load_and_unload(sec_repo):
    with _serve(sec_repo) as s, tc.InferenceServerClient(s.url) as client:
        assert s.options.model_control_mode == "none"
        codes = []
        for call in (client.load_model, client.unload_model):
            try:
                call("ctr", client_timeout=TIMEOUT)
                codes.append("OK")
            except InferenceServerException as exc:
                codes.append(_code(exc))
        ready = client.is_model_ready("ctr", client_timeout=TIMEOUT)
    assert codes == ["FAILED_PRECONDITION"] * 2 and ready, codes


# ----------------------------------------------------------------------------- concurrency cap
def test_max_concurrent_rpcs_overflow_is_resource_exhausted(tmp_path, spec):
    """Beyond ``max_concurrent_rpcs`` calls held at once, the server answers RESOURCE_EXHAUSTED; then it recovers."""
    save(ctr_model(spec, seed=4), tmp_path / "slow" / "1" / "model.onnx")
    # every request waits 300 ms in the batching queue, so all 8 are held at once
    (tmp_path / "slow" / "config.json").write_text(json.dumps(
        {"instances": 1, "dynamic_batching": {"max_queue_delay_us": 300_000}}))
    payload = build_request("slow", contract_feeds(spec, 2)).SerializeToString()
    with _serve(tmp_path, max_concurrent_rpcs=2) as s, grpc.insecure_channel(s.url) as ch:
        call = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer", request_serializer=None,
                              response_deserializer=None)
        futures = [call.future(payload, timeout=TIMEOUT) for _ in range(8)]
        codes = []
        for f in futures:
            try:
                f.result()
                codes.append("OK")
            except grpc.RpcError as exc:
                codes.append(exc.code().name)
        call(payload, timeout=TIMEOUT)  # answered once the burst is over
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
    assert 1 <= codes.count("OK") <= 7 and "RESOURCE_EXHAUSTED" in codes, codes
