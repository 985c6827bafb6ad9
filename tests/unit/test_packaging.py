"""What ships: the wheel and the Docker image hold the product, not its test support.

The synthetic-series generators (``tests/support``) are test code, and one of
them shells out to DCMTK's ``dcmcjpeg``; they must not reach a deployment. The
wheel is really built (setuptools, as ``pip install .`` builds it, without
network) from a copy of the source tree, and its file list is read.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import unavailable

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    if importlib.util.find_spec("setuptools") is None:
        unavailable("setuptools is not installed in this environment")
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", ".hypothesis")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("lungnode", "tests", "scripts"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    out = work / "dist"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-index", "-q", "-w", str(out), str(src)],
        check=True, capture_output=True, env=env, timeout=300,
    )  # fmt: skip
    (wheel,) = out.glob("lungnode-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        return archive.namelist()


def test_wheel_ships_the_product(wheel_names: list[str]) -> None:
    assert "lungnode/dicom/decode.py" in wheel_names
    assert "lungnode/ml/phantoms.py" in wheel_names  # training uses it: it stays
    # The web console's shell, modules and vendored chart library.
    for asset in ("index.html", "app.js", "pages/overview.js", "vendor/chart-4.6.2.umd.min.js"):
        assert f"lungnode/api/console/static/{asset}" in wheel_names


def test_wheel_ships_no_test_support(wheel_names: list[str]) -> None:
    assert [name for name in wheel_names if "synthetic" in name] == []
    top_level = {name.split("/")[0] for name in wheel_names}
    packages = {name for name in top_level if not name.endswith(".dist-info")}
    assert packages == {"lungnode"}, packages


def test_docker_image_copies_no_tests() -> None:
    """Every COPY in the Dockerfile names a source that is not the tests (nor ``.``)."""
    sources: list[str] = []
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.split(maxsplit=1)[:1] in (["COPY"], ["ADD"]):
            words = shlex.split(line)
            sources += [w for w in words[1:-1] if not w.startswith("--")]
    assert sources, "the Dockerfile copies nothing?"
    for source in sources:
        first = Path(source).parts[0] if Path(source).parts else source
        assert first not in (".", "tests", "scripts"), source


def _in_build_context(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule, enough for ours: the last pattern that matches the
    path or one of its parent folders decides; ``!`` lets back in."""
    included = True
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negated = pattern.startswith("!")
        body = pattern.removeprefix("!").strip("/")
        candidates = [body, body.removeprefix("**/")] if body.startswith("**/") else [body]
        names = (
            prefixes + [p.split("/")[-1] for p in prefixes] if body.startswith("**/") else prefixes
        )
        if any(fnmatch.fnmatchcase(name, c) for name in names for c in candidates):
            included = negated
    return included


def test_docker_build_context_leaves_out_tests_and_local_data() -> None:
    """Beside the COPY lines: what the build context sends at all (.dockerignore)."""
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    for path in (
        "tests/conftest.py",
        "tests/support/synthetic.py",
        "scripts/run_scaled.sh",
        "storage/lungnode.db",
        ".venv/bin/python",
        "lungnode/__pycache__/cli.pyc",
    ):
        assert not _in_build_context(path, patterns), path
    for path in (
        "pyproject.toml",
        "README.md",
        "lungnode/cli.py",
        "config/lungnode.toml",
        "models/lung-ct-demo/manifest.json",
    ):
        assert _in_build_context(path, patterns), path
