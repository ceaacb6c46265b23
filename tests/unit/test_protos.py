"""The committed generated code in farm/v1 is what protos/ generates today."""

from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]

def test_generated_code_is_current(tmp_path):
    protos = sorted((ROOT / "protos/farm/v1").glob("*.proto"))
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'protos'}", f"--python_out={tmp_path}",
         f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", *map(str, protos)],
        check=True,
    )
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py*"))
    assert generated, "protoc generated nothing"
    for relative in generated:
        assert (ROOT / relative).read_text() == (tmp_path / relative).read_text(), f"run `make protos`: {relative} is stale"
