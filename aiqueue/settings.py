"""aiqueue settings: one file, driven by environment variables.

Every knob has a default that runs locally with the embedded parts (SQLite, the Redis that
./run starts, the built-in simulator). Bad values fail loudly at start-up through the small
strict helpers below instead of being silently coerced.
"""

from __future__ import annotations

import os
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("AIQUEUE_VAR_DIR", BASE_DIR / "var"))


def env_str(name: str, default: str) -> str:
    return os.environ.get(name, default)


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ImproperlyConfigured(f"{name} must be a boolean (true/false), got {raw!r}")


def env_int(name: str, default: int, *, minimum: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be an integer, got {raw!r}")
    if minimum is not None and value < minimum:
        raise ImproperlyConfigured(f"{name} must be >= {minimum}, got {value}")
    return value


def env_list(name: str, default: list[str]) -> list[str]:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    return [item.strip() for item in raw.split(",") if item.strip()]


DEBUG = env_bool("AIQUEUE_DEBUG", False)
SECRET_KEY = os.environ.get("AIQUEUE_SECRET_KEY", "")
if not SECRET_KEY:
    # ./run writes a random key to var/secret_key on first start; a bare import (tests,
    # management commands) falls back to it, and only then to an insecure development key.
    key_file = VAR_DIR / "secret_key"
    SECRET_KEY = key_file.read_text().strip() if key_file.exists() else "insecure-dev-key"
ALLOWED_HOSTS = env_list("AIQUEUE_ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]"])
CSRF_TRUSTED_ORIGINS = env_list("AIQUEUE_CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "channels",
    "django_rq",
    "django_htmx",
    "template_partials",
    "jobs",
    "review",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "aiqueue.middleware.ContentSecurityPolicyMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    "django.contrib.auth.middleware.LoginRequiredMiddleware",
]

ROOT_URLCONF = "aiqueue.urls"
ASGI_APPLICATION = "aiqueue.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database -------------------------------------------------------------------------------
DATABASE_URL = env_str("DATABASE_URL", f"sqlite:///{VAR_DIR / 'aiqueue.sqlite3'}")
_db = dj_database_url.parse(DATABASE_URL)
if _db["ENGINE"] == "django.db.backends.sqlite3":
    # WAL + IMMEDIATE transactions: concurrent workers otherwise hit "database is locked"
    # when a read-then-write atomic() block tries to upgrade its lock (see FIELD-NOTES).
    _db["OPTIONS"] = {
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        "timeout": 20,
        "transaction_mode": "IMMEDIATE",
    }
    # A file (not :memory:) so the ASGI server and worker processes the suite starts share it.
    # The test plugin names one per run, so concurrent runs do not share a test database.
    _db["TEST"] = {"NAME": os.environ.get("AIQUEUE_TEST_DB_NAME", str(VAR_DIR / "test.sqlite3"))}
elif _db["ENGINE"] == "django.db.backends.postgresql":
    if os.environ.get("AIQUEUE_TEST_RUN_ID"):
        _db["TEST"] = {"NAME": f"test_aiqueue_{os.environ['AIQUEUE_TEST_RUN_ID']}"}
    # Threaded workers share a small psycopg pool instead of one connection per thread.
    if env_bool("AIQUEUE_DB_POOL", False):
        _db["OPTIONS"] = {"pool": {"min_size": 1, "max_size": env_int("AIQUEUE_DB_POOL_SIZE", 10)}}
    else:
        _db["CONN_MAX_AGE"] = env_int("AIQUEUE_DB_CONN_MAX_AGE", 0)
DATABASES = {"default": _db}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Redis, queues, channels -----------------------------------------------------------------
REDIS_URL = env_str("REDIS_URL", "redis://127.0.0.1:6390/0")
RQ_QUEUE_NAMES = ["high", "default", "low"]
RQ_QUEUES = {
    name: {"URL": REDIS_URL, "DEFAULT_TIMEOUT": 600, "DEFAULT_RESULT_TTL": 0}
    for name in RQ_QUEUE_NAMES
}
RQ = {"COMMIT_MODE": "on_db_commit"}
CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {"hosts": [REDIS_URL], "prefix": "aiqueue:ch:", "capacity": 1000},
    }
}

# --- aiqueue behaviour ------------------------------------------------------------------------
# How often the reconciler runs inside each worker's maintenance pass, and how stale a running
# job's heartbeat may get before the reconciler decides its worker is gone.
AIQUEUE_RECONCILE_INTERVAL = env_int("AIQUEUE_RECONCILE_INTERVAL", 10, minimum=1)
AIQUEUE_HEARTBEAT_INTERVAL = env_int("AIQUEUE_HEARTBEAT_INTERVAL", 5, minimum=1)
AIQUEUE_STALE_RUNNING_AFTER = env_int("AIQUEUE_STALE_RUNNING_AFTER", 30, minimum=2)
# A queued row younger than this is left alone by the reconciler: its on-commit enqueue may
# still be on its way.
AIQUEUE_ENQUEUE_GRACE = env_int("AIQUEUE_ENQUEUE_GRACE", 5, minimum=0)
AIQUEUE_JOBS_PER_PAGE = env_int("AIQUEUE_JOBS_PER_PAGE", 25, minimum=1)
AIQUEUE_SIMULATOR_URL = env_str("AIQUEUE_SIMULATOR_URL", "http://127.0.0.1:8100")

# --- Auth, security --------------------------------------------------------------------------
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "login"
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]
SESSION_COOKIE_HTTPONLY = True
CSRF_COOKIE_HTTPONLY = False
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
SESSION_COOKIE_SECURE = env_bool("AIQUEUE_SECURE_COOKIES", False)
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE

# --- Static files ----------------------------------------------------------------------------
STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = VAR_DIR / "staticfiles"
# WhiteNoise warns at start-up when STATIC_ROOT is missing; collectstatic fills it in production.
STATIC_ROOT.mkdir(parents=True, exist_ok=True)
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}
WHITENOISE_USE_FINDERS = True
WHITENOISE_AUTOREFRESH = DEBUG

LANGUAGE_CODE = "en-us"
TIME_ZONE = env_str("AIQUEUE_TIME_ZONE", "UTC")
USE_I18N = False
USE_TZ = True

EMAIL_BACKEND = env_str("AIQUEUE_EMAIL_BACKEND", "django.core.mail.backends.console.EmailBackend")
DEFAULT_FROM_EMAIL = env_str("AIQUEUE_FROM_EMAIL", "aiqueue@localhost")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("AIQUEUE_LOG_LEVEL", "INFO")},
    "loggers": {
        "rq.worker": {"level": env_str("AIQUEUE_RQ_LOG_LEVEL", "WARNING")},
        "httpx": {"level": "WARNING"},
        "httpcore": {"level": "WARNING"},
    },
}
