"""The wheel holds every module of the source tree; the hub imports no stage or heavy library."""

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"ctredge": "ctredge", "train": "ctredge/train", "compress": "ctredge/compress",
                "export": "ctredge/export", "serve": "ctredge/serve", "benchmarks": "ctredge/benchmarks"}


def source_modules() -> set[str]:
    found = set()
    for folder, target in PACKAGE_DIRS.items():
        for path in (ROOT / folder).rglob("*.py"):
            found.add(f"{target}/{path.relative_to(ROOT / folder).as_posix()}")
    return found


@pytest.mark.slow
def test_wheel_contains_every_module(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True, cwd=tmp_path)
    wheel = next(tmp_path.glob("ctredge-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(source_modules() - names)
    assert not missing, f"modules missing from the wheel (list their package in pyproject.toml): {missing}"
    assert "ctredge/hash_vectors.json" in names
    assert any(n.endswith("entry_points.txt") for n in names)


def test_hub_imports_only_stdlib_and_numpy():
    code = (
        "import sys, json; import ctredge.features, ctredge.reader, ctredge.metrics, ctredge.artifacts, "
        "ctredge.config, ctredge.errors, ctredge.datagen, ctredge.cli; "
        "print(json.dumps(sorted(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    modules = set(json.loads(out.stdout))
    tops = {m.split(".")[0] for m in modules}
    heavy = {"tensorflow", "keras", "tf2onnx", "onnx", "onnxruntime", "grpc", "tritonclient", "google"}
    assert not (tops & heavy), f"the hub pulled in {sorted(tops & heavy)}"
    stages = sorted(m for m in modules if m.split(".")[:2] in ([ "ctredge", s] for s in PACKAGE_DIRS if s != "ctredge"))
    assert not stages, f"the hub imported stage modules {stages}"
