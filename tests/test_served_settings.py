"""Settings that depend on how aiqueue is served, read in a fresh interpreter."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.helpers import BASE_DIR


def setting_in(name: str, **env: str) -> str:
    environ = {k: v for k, v in os.environ.items() if k not in {"HOST", "PORT", name}}
    code = f"from aiqueue import settings; print(settings.{name})"
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=BASE_DIR,
        env={**environ, **env},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def test_links_in_emails_follow_the_port_the_site_is_served_on():
    assert setting_in("AIQUEUE_BASE_URL") == "http://127.0.0.1:8000"
    assert setting_in("AIQUEUE_BASE_URL", PORT="8123") == "http://127.0.0.1:8123"
    assert setting_in("AIQUEUE_BASE_URL", HOST="0.0.0.0", PORT="8123") == "http://127.0.0.1:8123"
    assert (
        setting_in("AIQUEUE_BASE_URL", AIQUEUE_BASE_URL="https://q.example") == "https://q.example"
    )


# Where settings are read: the Python code that runs aiqueue and the ./run script.
CODE = ["aiqueue", "jobs", "review", "batches"]
READ_IN_PYTHON = re.compile(
    r"(?:env_str|env_int|env_bool|env_list|os\.environ\.get|os\.getenv|os\.environ\.setdefault)"
    r"\(\s*[\"']([A-Z][A-Z0-9_]+)[\"']"
    r"|os\.environ\[\s*[\"']([A-Z][A-Z0-9_]+)[\"']\s*\]"
)
READ_IN_SHELL = re.compile(r"\$\{([A-Z][A-Z0-9_]+):-")
# Not settings: Django's own module variable, and what the test suite sets for its runs.
NOT_SETTINGS = {"DJANGO_SETTINGS_MODULE", "AIQUEUE_TEST_DB_NAME", "AIQUEUE_TEST_RUN_ID"}


def settings_read() -> set[str]:
    found = set()
    for directory in CODE:
        for path in (BASE_DIR / directory).rglob("*.py"):
            for match in READ_IN_PYTHON.finditer(path.read_text()):
                found.add(match.group(1) or match.group(2))
    found.update(READ_IN_SHELL.findall((BASE_DIR / "run").read_text()))
    return found - NOT_SETTINGS


def settings_documented() -> set[str]:
    """The names in the first column of the README's settings table (| variable | default |
    meaning |), several to a row where a row lists them."""
    lines = (BASE_DIR / "README.md").read_text().splitlines()
    start = lines.index("| variable | default | meaning |")
    names = set()
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        names.update(re.findall(r"`([A-Z][A-Z0-9_]+)`", line.split("|")[1]))
    return names


def test_the_readme_lists_every_setting_the_code_reads():
    assert len(settings_read()) > 40  # the search finds them (a broken pattern finds none)
    assert sorted(settings_read() - settings_documented()) == []


def test_the_settings_search_sees_reads_over_several_lines():
    assert "AIQUEUE_BASE_URL" in settings_read()
