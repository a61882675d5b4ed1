"""Settings for production (issue 20): no start without a real key, nothing written at import,
SMTP from the environment, and `manage.py check --deploy` clean with deploy/aiqueue.env.example."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
EXAMPLE_ENV = BASE_DIR / "deploy" / "aiqueue.env.example"


def bare_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """An environment without the suite's aiqueue settings, its var/ in an empty place."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("AIQUEUE_", "EMAIL_", "DJANGO_"))
    }
    env.pop("DATABASE_URL", None)
    return {**env, "AIQUEUE_VAR_DIR": str(tmp_path / "var"), **extra}


def run_python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=BASE_DIR, env=env, capture_output=True, text=True
    )


SETTINGS = "import os; os.environ['DJANGO_SETTINGS_MODULE'] = 'aiqueue.settings'; import django; django.setup(); from django.conf import settings as s; "  # noqa: E501


def test_without_a_key_and_debug_off_it_refuses_to_start(tmp_path):
    result = run_python(SETTINGS + "print(s.SECRET_KEY)", bare_env(tmp_path))
    assert result.returncode != 0
    assert "Set AIQUEUE_SECRET_KEY" in result.stderr


def test_debug_gets_a_development_key(tmp_path):
    result = run_python(SETTINGS + "print(s.SECRET_KEY)", bare_env(tmp_path, AIQUEUE_DEBUG="1"))
    assert result.stdout.strip() == "insecure-dev-key"


def test_a_key_written_by_run_is_used(tmp_path):
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "secret_key").write_text("k" * 60 + "\n")
    result = run_python(SETTINGS + "print(s.SECRET_KEY)", bare_env(tmp_path))
    assert result.stdout.strip() == "k" * 60


def test_importing_the_settings_writes_nothing(tmp_path):
    env = bare_env(tmp_path, AIQUEUE_SECRET_KEY=secrets.token_urlsafe(50))
    result = run_python(SETTINGS + "print(s.STATIC_ROOT)", env)
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "var").exists()


def test_smtp_comes_from_the_environment(tmp_path):
    env = bare_env(
        tmp_path,
        AIQUEUE_SECRET_KEY=secrets.token_urlsafe(50),
        EMAIL_HOST="smtp.example.com",
        EMAIL_PORT="2525",
        EMAIL_HOST_USER="u",
        EMAIL_HOST_PASSWORD="p",
        EMAIL_USE_TLS="false",
        EMAIL_USE_SSL="true",
        DEFAULT_FROM_EMAIL="ai@example.com",
    )
    code = SETTINGS + (
        "print(s.EMAIL_BACKEND, s.EMAIL_HOST, s.EMAIL_PORT, s.EMAIL_HOST_USER, "
        "s.EMAIL_HOST_PASSWORD, s.EMAIL_USE_TLS, s.EMAIL_USE_SSL, s.DEFAULT_FROM_EMAIL)"
    )
    assert run_python(code, env).stdout.split() == [
        "django.core.mail.backends.smtp.EmailBackend",
        "smtp.example.com",
        "2525",
        "u",
        "p",
        "False",
        "True",
        "ai@example.com",
    ]


def example_env() -> dict[str, str]:
    values = {}
    for line in EXAMPLE_ENV.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, value = line.split("=", 1)
            values[name] = value
    return values


def check_deploy(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=BASE_DIR,
        env=env,
        capture_output=True,
        text=True,
    )


def test_check_deploy_is_clean_with_the_documented_production_settings(tmp_path):
    env = bare_env(tmp_path, **example_env())
    env["AIQUEUE_SECRET_KEY"] = secrets.token_urlsafe(50)
    env["AIQUEUE_VAR_DIR"] = str(tmp_path / "var")
    env["AIQUEUE_STATIC_ROOT"] = str(tmp_path / "static")
    result = check_deploy(env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_check_deploy_warns_without_them(tmp_path):
    # The same check fails on the development defaults: it is not vacuous.
    result = check_deploy(bare_env(tmp_path, AIQUEUE_SECRET_KEY=secrets.token_urlsafe(50)))
    assert result.returncode != 0
    assert "security.W008" in result.stderr + result.stdout  # no SSL redirect
