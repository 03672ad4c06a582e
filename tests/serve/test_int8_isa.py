"""The server re-checks a variant's recorded int8 ISA assumption at load, with a log line (never a refusal)."""

from __future__ import annotations

import asyncio
import logging

from servekit import ctr_model, save, small_spec

from ctredge.artifacts import write_manifest
from ctredge.serve.repository import Repository

AVX2 = {"model_name": "Small EPYC", "flags": {"avx2": True, "avx512_vnni": False, "avx_vnni": False}, "vnni": False}
VNNI = {"model_name": "Big Xeon", "flags": {"avx2": True, "avx512_vnni": True, "avx_vnni": False}, "vnni": True}


def _repo(root, frac):
    spec = small_spec()
    save(ctr_model(spec, seed=1), root / "ctr-int8" / "1" / "model.onnx")
    write_manifest(root / "ctr-int8" / "1", stage="variant",
                   extra={"int8": {"overflow_fraction": frac, "may_saturate_without_vnni": frac > 0, "isa": VNNI,
                                   "fused_vs_simulated": {"max_abs_diff": 2e-4}}})
    save(ctr_model(spec, seed=2), root / "ctr-fp32" / "1" / "model.onnx")  # no manifest: no line, no error
    repo = Repository(root)
    asyncio.run(repo.load())
    return repo


def test_risky_int8_on_a_cpu_without_vnni_is_loaded_with_a_warning(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr("ctredge.cpuinfo.cpu_isa", lambda *a: AVX2)
    with caplog.at_level(logging.INFO, logger="ctredge.serve"):
        repo = _repo(tmp_path, 0.9)
    assert repo.is_ready("ctr-int8") and repo.is_ready("ctr-fp32")
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "saturate" in r.getMessage()]
    assert len(warned) == 1
    msg = warned[0].getMessage()
    assert "ctr-int8 v1" in msg and "Big Xeon" in msg and "Small EPYC" in msg and "0.9" in msg
    assert not any(r.getMessage().startswith("ctr-fp32 v1: int8") for r in caplog.records)


def test_safe_int8_or_a_vnni_cpu_gets_an_info_line(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr("ctredge.cpuinfo.cpu_isa", lambda *a: AVX2)
    with caplog.at_level(logging.INFO, logger="ctredge.serve"):
        assert _repo(tmp_path / "safe", 0.0).is_ready("ctr-int8")
    monkeypatch.setattr("ctredge.cpuinfo.cpu_isa", lambda *a: VNNI)
    with caplog.at_level(logging.INFO, logger="ctredge.serve"):
        assert _repo(tmp_path / "vnni", 0.9).is_ready("ctr-int8")
    lines = [r for r in caplog.records if "int8 ISA check ok" in r.getMessage()]
    assert len(lines) == 2 and all(r.levelno == logging.INFO and "ctr-int8 v1" in r.getMessage() for r in lines)
    assert not any(r.levelno >= logging.WARNING and "saturate" in r.getMessage() for r in caplog.records)
