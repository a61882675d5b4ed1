"""The wheel (issue 20): it holds every app, template, static file and migration, and installed
into a fresh virtualenv, away from the checkout, it migrates, collects its static files and
serves pages. Skipped only when the dependencies cannot be had (no index, no cache)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import pytest

from aiqueue.redis_server import free_port

pytestmark = pytest.mark.own_database

BASE_DIR = Path(__file__).resolve().parent.parent
NOT_PACKAGED = {"tests", "bench", "build"}
SCRATCH = (".git", ".venv", "var", "build", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # From a copy: setuptools writes build/ beside the sources, and two suites run at once.
    source = out / "source"
    shutil.copytree(BASE_DIR, source, ignore=shutil.ignore_patterns(*SCRATCH))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", str(source), "-w", str(out)],
        check=True, capture_output=True,
    )  # fmt: skip
    return next(out.glob("aiqueue-*.whl"))


def source_files() -> set[str]:
    """What the wheel must hold, as paths inside it."""
    wanted = set()
    for init in BASE_DIR.glob("*/**/__init__.py"):
        package = init.parent.relative_to(BASE_DIR)
        # var/ is the runtime data directory (and holds the peer benchmark's virtualenvs).
        if package.parts[0] in NOT_PACKAGED | {"var"} or ".venv" in package.parts:
            continue
        wanted |= {str(package / f.name) for f in init.parent.glob("*.py")}
    for folder in ("templates", "static"):
        for path in (BASE_DIR / folder).rglob("*"):
            if path.is_file():
                wanted.add(f"aiqueue/{path.relative_to(BASE_DIR)}")
    return wanted


def test_the_wheel_holds_every_app_template_static_file_and_migration(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = source_files() - names
    assert not missing, sorted(missing)
    assert "jobs/migrations/0013_i20_webhooks.py" in names  # not vacuous: migrations are in
    assert "aiqueue/templates/base.html" in names
    assert not [name for name in names if name.startswith(("tests/", "bench/"))]
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    assert "Requires-Python: >=3.11\n" in zipfile.ZipFile(wheel).read(metadata).decode()


def test_the_installed_wheel_serves_the_app(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    deps = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "--require-hashes", "-r", str(BASE_DIR / "requirements.lock")],
        capture_output=True, text=True,
    )  # fmt: skip
    if deps.returncode != 0:
        if re.search(r"No matching distribution|connection|Could not fetch|resolve", deps.stderr):
            pytest.skip(f"the dependencies cannot be installed here: {deps.stderr[-300:]}")
        raise AssertionError(deps.stderr)
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "--no-deps", "--no-index", str(wheel)],
        check=True,
    )  # fmt: skip

    site = tmp_path / "site"  # its working directory: nothing of the checkout around
    site.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIQUEUE_", "DJANGO_"))}
    env.pop("PYTHONPATH", None)
    env.pop("DATABASE_URL", None)
    env.update(
        AIQUEUE_SECRET_KEY="k" * 50,
        AIQUEUE_STATIC_MANIFEST="true",
        REDIS_URL=os.environ["REDIS_URL"],
    )
    aiqueue = str(venv / "bin" / "aiqueue")
    for command in (["migrate", "--noinput"], ["collectstatic", "--noinput"]):
        subprocess.run([aiqueue, *command], cwd=site, env=env, check=True, capture_output=True)
    assert (site / "var" / "aiqueue.sqlite3").exists()  # var/ is the working directory's
    where = subprocess.run(
        [str(python), "-c", "import aiqueue; print(aiqueue.__file__)"],
        cwd=site, env=env, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert where.startswith(str(venv))

    port = free_port()
    server = subprocess.Popen(
        [str(python), "-m", "uvicorn", "aiqueue.asgi:application", "--port", str(port)],
        cwd=site, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                page = httpx.get(f"{base}/accounts/login/", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        assert page.status_code == 200
        assert "Log in" in page.text
        stylesheet = re.search(r'href="(/static/css/app\.[0-9a-f]{12}\.css)"', page.text)
        assert stylesheet, "a hashed static file name"
        css = httpx.get(base + stylesheet.group(1), headers={"Accept-Encoding": "gzip"})
        assert css.status_code == 200
        assert "max-age=315360000" in css.headers["Cache-Control"]
        assert httpx.get(f"{base}/api/openapi.json").status_code == 401
    finally:
        server.terminate()
        server.wait(timeout=10)
