"""Python distributions for tests: real wheels and sdists built by `python -m build`, and plain
wheels written directly (for the bench's hundreds of files, where a build per file would take
minutes).

`build_distributions` writes a setuptools project (one module, the given dependencies) and builds
it offline with `--no-isolation`, exactly as a developer would; `write_wheel` writes a minimal but
valid wheel (METADATA, WHEEL, RECORD) that pip and uv install.
"""

from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path

from packaging.utils import canonicalize_name


def module_name(name: str) -> str:
    return canonicalize_name(name).replace("-", "_")


def build_distributions(
    name: str, version: str, out: Path, *, dependencies: Sequence[str] = (), scratch: Path
) -> list[Path]:
    """Build the wheel and the sdist of a one-module project; returns their paths."""
    module = module_name(name)
    src = scratch / f"src-{module}-{version}"
    (src / module).mkdir(parents=True, exist_ok=True)
    deps = ", ".join(f'"{d}"' for d in dependencies)
    (src / "pyproject.toml").write_text(
        f"""[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "{name}"
version = "{version}"
description = "A test package of BatleHub's PyPI format"
requires-python = ">=3.8"
dependencies = [{deps}]

[tool.setuptools]
packages = ["{module}"]
"""
    )
    (src / module / "__init__.py").write_text(f'VERSION = "{version}"\n')
    out.mkdir(parents=True, exist_ok=True)
    before = set(out.iterdir())
    result = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--wheel", "--sdist", "-o", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if result.returncode != 0:
        raise RuntimeError(f"building {name} {version} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return sorted(set(out.iterdir()) - before)


WHEEL = b"Wheel-Version: 1.0\nGenerator: batlehub-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def write_wheel(
    name: str,
    version: str,
    out: Path,
    *,
    dependencies: Sequence[str] = (),
    payload: bytes = b"",
    summary: str = "a bench package",
    headers: Sequence[str] = (),
    description: str = "",
) -> Path:
    """A pure-Python wheel of a one-module project, written directly (no build backend).
    `headers` are more METADATA lines (`Requires-Python: >=3.9`); `description` its body (the long
    description, the README a project page shows)."""
    module = module_name(name)
    dist_info = f"{module}-{version}.dist-info"
    metadata = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}", f"Summary: {summary}", *headers]
    metadata += [f"Requires-Dist: {d}" for d in dependencies]
    files = {
        f"{module}/__init__.py": f'VERSION = "{version}"\n'.encode() + payload,
        f"{dist_info}/METADATA": ("\n".join(metadata) + "\n\n" + description).encode(),
        f"{dist_info}/WHEEL": WHEEL,
    }
    record = "".join(f"{path},{_record_hash(data)},{len(data)}\n" for path, data in files.items())
    record += f"{dist_info}/RECORD,,\n"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for item, data in files.items():
            archive.writestr(item, data)
        archive.writestr(f"{dist_info}/RECORD", record)
    return path
