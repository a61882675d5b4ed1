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
PACKAGE_DIR = Path(__file__).resolve().parent
# Run from the repository (manage.py beside aiqueue/), the site's templates/, static/ and var/
# are there; installed from the wheel, templates and static are inside the package
# (setup.py) and var/ is the working directory's unless AIQUEUE_VAR_DIR says where.
IN_CHECKOUT = (BASE_DIR / "manage.py").exists()
SITE_DIR = BASE_DIR if IN_CHECKOUT else PACKAGE_DIR
VAR_DIR = Path(
    os.environ.get("AIQUEUE_VAR_DIR") or (BASE_DIR if IN_CHECKOUT else Path.cwd()) / "var"
)


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


def env_int_list(name: str, default: list[int], *, minimum: int | None = None) -> list[int]:
    values = []
    for item in env_list(name, [str(value) for value in default]):
        try:
            value = int(item)
        except ValueError:
            raise ImproperlyConfigured(f"{name} must be integers separated by commas, got {item!r}")
        if minimum is not None and value < minimum:
            raise ImproperlyConfigured(f"{name}: each must be >= {minimum}, got {value}")
        values.append(value)
    return values


DEBUG = env_bool("AIQUEUE_DEBUG", False)
SECRET_KEY = os.environ.get("AIQUEUE_SECRET_KEY", "")
if not SECRET_KEY:
    # ./run writes a random key to var/secret_key on first start (the suite sets one for itself).
    key_file = VAR_DIR / "secret_key"
    SECRET_KEY = key_file.read_text().strip() if key_file.exists() else ""
if not SECRET_KEY:
    if not DEBUG:
        # A guessable key signs sessions, CSRF tokens and password resets: refuse to start.
        raise ImproperlyConfigured(
            "Set AIQUEUE_SECRET_KEY (50 random characters: python3 -c 'import secrets; "
            "print(secrets.token_urlsafe(50))'), or write one to var/secret_key, or set "
            "AIQUEUE_DEBUG=true for a development key."
        )
    SECRET_KEY = "insecure-dev-key"  # noqa: S105 - debug only
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
    "batches",
    "runs",
    "ops",
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
        "BACKEND": "aiqueue.templating.DjangoTemplates",  # pages always encode
        "NAME": "django",  # the name django-template-partials adds its loader to
        "DIRS": [SITE_DIR / "templates"],
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
    # Keep connections across jobs and requests: opening one (file + PRAGMAs) and closing it
    # (a WAL checkpoint when it is the last) cost ~3 ms, a tenth of a whole job's work.
    _db["CONN_MAX_AGE"] = env_int("AIQUEUE_DB_CONN_MAX_AGE", 600)
    # A file (not :memory:) so the ASGI server and worker processes the suite starts share it.
    # The test plugin names one per run, so concurrent runs do not share a test database.
    _db["TEST"] = {"NAME": os.environ.get("AIQUEUE_TEST_DB_NAME", str(VAR_DIR / "test.sqlite3"))}
elif _db["ENGINE"] == "django.db.backends.postgresql":
    if os.environ.get("AIQUEUE_TEST_RUN_ID"):
        _db["TEST"] = {"NAME": f"test_aiqueue_{os.environ['AIQUEUE_TEST_RUN_ID']}"}
    # Threaded workers share a psycopg pool instead of one connection per thread. max_size is a
    # cap, not a reservation: threads give their connection back while they wait on a provider
    # (runs.dbconn), so the pool only opens what is used at once. The cap defaults above the
    # thread count so the heartbeat never waits behind job threads for a connection.
    if env_bool("AIQUEUE_DB_POOL", False):
        _pool_max = env_int("AIQUEUE_DB_POOL_SIZE", env_int("AIQUEUE_WORKER_THREADS", 20) + 4)
        _db["OPTIONS"] = {"pool": {"min_size": 1, "max_size": _pool_max}}
    else:
        _db["CONN_MAX_AGE"] = env_int("AIQUEUE_DB_CONN_MAX_AGE", 0)
DATABASES = {"default": _db}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Redis, queues, channels -----------------------------------------------------------------
REDIS_URL = env_str("REDIS_URL", "redis://127.0.0.1:6390/0")
RQ_QUEUE_NAMES = ["high", "default", "low"]
# The priorities' queues place each job round-robin across lanes (jobs/fairshare.py).
RQ_QUEUES = {
    name: {
        "URL": REDIS_URL,
        "DEFAULT_TIMEOUT": 600,
        "DEFAULT_RESULT_TTL": 0,
        "QUEUE_CLASS": "jobs.fairshare.FairQueue",
    }
    for name in RQ_QUEUE_NAMES
}
RQ = {"COMMIT_MODE": "on_db_commit"}
CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {
            # redis-py 8 reads with a 5 s socket timeout by default, and channels-redis waits
            # for a websocket's next message with a 5 s BZPOPMIN: an idle socket's read timed
            # out, its consumer died and the browser reconnected (1006) every ~5 s. No read
            # timeout, as with redis-py 7 (redis/redis-py#4091): a finite one (15 s) fixed
            # that but, on Python 3.11, a consumer cancelled during its timed read kept
            # reading, so a closed socket's receive loop never ended and the server could not
            # stop. A Redis that goes away closes the connection (ConnectionError: the page
            # reconnects and re-fetches); TCP keepalive covers a silent network.
            "hosts": [{"address": REDIS_URL, "socket_timeout": None, "socket_keepalive": True}],
            "prefix": "aiqueue:ch:",
            "capacity": 1000,
        },
    }
}

# --- aiqueue behaviour ------------------------------------------------------------------------
# How often the reconciler runs inside each worker's maintenance pass, and how stale a running
# job's heartbeat may get before the reconciler decides its worker is gone.
AIQUEUE_RECONCILE_INTERVAL = env_int("AIQUEUE_RECONCILE_INTERVAL", 10, minimum=1)
AIQUEUE_HEARTBEAT_INTERVAL = env_int("AIQUEUE_HEARTBEAT_INTERVAL", 5, minimum=1)
# 20 s = four missed beats; with the 10 s reconcile interval a dead worker's runs are back in
# the queue within 30 s.
AIQUEUE_STALE_RUNNING_AFTER = env_int("AIQUEUE_STALE_RUNNING_AFTER", 20, minimum=2)
# Workers (runs.worker.Worker): jobs in flight per worker process (runs wait on the call loop,
# jobs.providers.loop, without a thread each; AIQUEUE_WORKER_THREADS is the earlier name), and
# how long a stopping worker lets them finish before handing them back to the queue (8 s:
# within the 10 s ./run waits before it kills what is left).
AIQUEUE_WORKER_CONCURRENCY = env_int(
    "AIQUEUE_WORKER_CONCURRENCY", env_int("AIQUEUE_WORKER_THREADS", 200, minimum=1), minimum=1
)
# CPU priority of `manage.py worker` below the web process (os.nice increment; 0: same).
AIQUEUE_WORKER_NICE = env_int("AIQUEUE_WORKER_NICE", 10, minimum=0)
AIQUEUE_WORKER_SHUTDOWN_GRACE = env_int("AIQUEUE_WORKER_SHUTDOWN_GRACE", 8, minimum=0)
# httpx clients per provider per process, used round-robin (jobs.providers.base.client_for).
AIQUEUE_HTTP_CLIENTS = env_int("AIQUEUE_HTTP_CLIENTS", 8, minimum=1)
# A queued row younger than this is left alone by the reconciler: its on-commit enqueue may
# still be on its way.
AIQUEUE_ENQUEUE_GRACE = env_int("AIQUEUE_ENQUEUE_GRACE", 5, minimum=0)
AIQUEUE_JOBS_PER_PAGE = env_int("AIQUEUE_JOBS_PER_PAGE", 25, minimum=1)
AIQUEUE_SIMULATOR_URL = env_str("AIQUEUE_SIMULATOR_URL", "http://127.0.0.1:8100")
# /metrics answers staff sessions, and `Authorization: Bearer <token>` when this is set.
# Submissions processed at once per web process; the rest wait their turn without using CPU,
# so a burst cannot starve other pages (aiqueue.bulkhead). 0: no limit.
AIQUEUE_SUBMIT_CONCURRENCY = env_int("AIQUEUE_SUBMIT_CONCURRENCY", 2, minimum=0)
# Threads that run Django's request handling in a web process (aiqueue/asgi.py); each keeps
# its database connection. Submissions take at most AIQUEUE_SUBMIT_CONCURRENCY of them.
AIQUEUE_WEB_THREADS = env_int("AIQUEUE_WEB_THREADS", 8, minimum=1)
# The dashboard's health figures are shared by every operator's page for this long (seconds,
# per web process; 0: computed for each request). They cost a few dozen aggregate queries.
AIQUEUE_DASHBOARD_CACHE_SECONDS = env_int("AIQUEUE_DASHBOARD_CACHE_SECONDS", 2, minimum=0)
# The job lists' live updates are coalesced: one websocket frame per list per this many ms,
# carrying every row that changed (jobs.live_batch).
AIQUEUE_LIVE_LIST_INTERVAL_MS = env_int("AIQUEUE_LIVE_LIST_INTERVAL_MS", 250, minimum=0)
# A live group found empty (nobody watching) counts as empty for this many ms without asking
# Redis again (jobs.live.members). At most 1000: a page re-fetches its regions 1.5 s after its
# socket opens to catch what changed meanwhile (static/js/live.js).
AIQUEUE_LIVE_UNWATCHED_CACHE_MS = env_int("AIQUEUE_LIVE_UNWATCHED_CACHE_MS", 1000, minimum=0)
if AIQUEUE_LIVE_UNWATCHED_CACHE_MS > 1000:
    raise ImproperlyConfigured(
        "AIQUEUE_LIVE_UNWATCHED_CACHE_MS must be <= 1000 (a page re-fetches 1.5 s after "
        f"joining), got {AIQUEUE_LIVE_UNWATCHED_CACHE_MS}"
    )
AIQUEUE_METRICS_TOKEN = env_str("AIQUEUE_METRICS_TOKEN", "")
# The environment variables a provider may name as its API key (jobs.provider_keys). Empty:
# any name ending in _API_KEY. aiqueue's own settings are refused either way.
AIQUEUE_PROVIDER_KEY_VARS = env_list("AIQUEUE_PROVIDER_KEY_VARS", [])
# Retries (runs/retries.py): a wait longer than AIQUEUE_MAX_INLINE_RETRY_WAIT seconds parks the
# job instead of sleeping in the worker. Backoff is full jitter: uniform(0, base * 2^(n-1)),
# capped. "naive" (3 retries per call, no budget, no breaker) exists only for bench/outage.py.
AIQUEUE_MAX_INLINE_RETRY_WAIT = env_int("AIQUEUE_MAX_INLINE_RETRY_WAIT", 5, minimum=0)
AIQUEUE_RETRY_BACKOFF_BASE_MS = env_int("AIQUEUE_RETRY_BACKOFF_BASE_MS", 500, minimum=1)
AIQUEUE_RETRY_BACKOFF_MAX = env_int("AIQUEUE_RETRY_BACKOFF_MAX", 60, minimum=1)
# "standard", or the dotted path of another policy to compare against (bench/naive_retries.py).
AIQUEUE_RETRY_POLICY = env_str("AIQUEUE_RETRY_POLICY", "standard")
if AIQUEUE_RETRY_POLICY != "standard" and "." not in AIQUEUE_RETRY_POLICY:
    raise ImproperlyConfigured(
        "AIQUEUE_RETRY_POLICY must be 'standard' or the dotted path of a retry policy"
    )
# The longest a job waits for a provider whose calls keep failing without cost (5xx, 429, a
# refused connection), counted from its first failed call after its last answer: then it goes to
# review. A job's deadline, when earlier, ends the wait first (it expires).
AIQUEUE_RETRY_MAX_WAIT = env_int("AIQUEUE_RETRY_MAX_WAIT", 3600, minimum=1)
# Retry budget (jobs/flow/retry_budget.py): sliding window, and retries always allowed per window.
AIQUEUE_RETRY_BUDGET_WINDOW = env_int("AIQUEUE_RETRY_BUDGET_WINDOW", 60, minimum=1)
AIQUEUE_RETRY_BUDGET_FLOOR = env_int("AIQUEUE_RETRY_BUDGET_FLOOR", 3, minimum=0)
# A job whose retry did not fit the budget waits on its wait list, woken when a retry succeeds;
# this is its fallback wake-up (seconds, ±50 % jitter).
AIQUEUE_RETRY_BUDGET_WAIT = env_int("AIQUEUE_RETRY_BUDGET_WAIT", 10, minimum=1)
# Review inbox: how long a reviewer's claim on an item lasts, how long escalations are
# collected into one email to reviewers, and the site address used in those emails.
AIQUEUE_REVIEW_CLAIM_MINUTES = env_int("AIQUEUE_REVIEW_CLAIM_MINUTES", 15, minimum=1)
AIQUEUE_REVIEW_DIGEST_SECONDS = env_int("AIQUEUE_REVIEW_DIGEST_SECONDS", 60, minimum=1)
AIQUEUE_REVIEW_PER_PAGE = env_int("AIQUEUE_REVIEW_PER_PAGE", 25, minimum=1)
# Unset: where ./run serves (HOST, PORT), so the e-mails' links lead to this site.
_served_host = env_str("HOST", "127.0.0.1")
if _served_host in {"", "0.0.0.0", "::"}:  # listening everywhere: this machine answers locally
    _served_host = "127.0.0.1"
AIQUEUE_BASE_URL = env_str(
    "AIQUEUE_BASE_URL", f"http://{_served_host}:{env_int('PORT', 8000, minimum=1)}"
)
# Uploads (issue #9): documents and batch files larger than these are refused with a clear
# error; a batch file may hold at most AIQUEUE_BATCH_MAX_ROWS rows; a document's extracted
# text at most AIQUEUE_DOCUMENT_MAX_CHARS characters.
AIQUEUE_DOCUMENT_MAX_BYTES = env_int("AIQUEUE_DOCUMENT_MAX_BYTES", 5 * 1024 * 1024, minimum=1)
AIQUEUE_DOCUMENT_MAX_CHARS = env_int("AIQUEUE_DOCUMENT_MAX_CHARS", 1_000_000, minimum=1)
AIQUEUE_BATCH_MAX_BYTES = env_int("AIQUEUE_BATCH_MAX_BYTES", 20 * 1024 * 1024, minimum=1)
AIQUEUE_BATCH_MAX_ROWS = env_int("AIQUEUE_BATCH_MAX_ROWS", 50_000, minimum=1)
# Flow control (issue #4, jobs/flow/ and runs/admission.py). Backpressure: submissions are
# refused (429 + Retry-After) while this many jobs have not started (0 = no global limit).
AIQUEUE_MAX_QUEUED = env_int("AIQUEUE_MAX_QUEUED", 0, minimum=0)
AIQUEUE_BACKPRESSURE_RETRY_AFTER = env_int("AIQUEUE_BACKPRESSURE_RETRY_AFTER", 30, minimum=1)
# A concurrency lease not renewed by its run's heartbeat for this long frees itself (s).
AIQUEUE_LEASE_TTL = env_int("AIQUEUE_LEASE_TTL", 30, minimum=1)
# A job parked on a full concurrency cap is woken when a slot frees; this is the fallback
# wake-up (s, ±20 %) in case the waker died.
AIQUEUE_CAPACITY_RECHECK = env_int("AIQUEUE_CAPACITY_RECHECK", 120, minimum=1)
# Deferrable workloads run inside the off-peak window [START, END) (local hours; START == END
# means always) or while fewer than AIQUEUE_DEFER_QUEUE_BELOW jobs are queued or
# parked waiting (0 = never).
AIQUEUE_OFFPEAK_START = env_int("AIQUEUE_OFFPEAK_START", 22, minimum=0)
AIQUEUE_OFFPEAK_END = env_int("AIQUEUE_OFFPEAK_END", 6, minimum=0)
AIQUEUE_DEFER_QUEUE_BELOW = env_int("AIQUEUE_DEFER_QUEUE_BELOW", 5, minimum=0)
# Webhooks (jobs/webhooks.py): seconds before each retry of a failed delivery (±20 % jitter);
# after the last, the delivery is left failed (the admin can send it again).
AIQUEUE_WEBHOOK_RETRY_DELAYS = env_int_list(
    "AIQUEUE_WEBHOOK_RETRY_DELAYS", [10, 60, 300, 1800, 7200], minimum=0
)
# Starvation guard: after this many dequeues from higher queues, a worker looks at `low` first.
AIQUEUE_STARVATION_GUARD_EVERY = env_int("AIQUEUE_STARVATION_GUARD_EVERY", 10, minimum=1)
# Fair share: jobs of one priority are served round-robin across (workload, API token or user);
# off, each priority is first in, first out (jobs/fairshare.py).
AIQUEUE_FAIR_SHARE = env_bool("AIQUEUE_FAIR_SHARE", True)

# --- Auth, security --------------------------------------------------------------------------
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "login"
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]
CSRF_FAILURE_VIEW = "jobs.errors.csrf_failure"
SESSION_COOKIE_HTTPONLY = True
CSRF_COOKIE_HTTPONLY = False
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
# Behind TLS (docs/deploy.md): cookies only over HTTPS, HTTP redirected to HTTPS, HSTS, and the
# proxy's header that says a request came over HTTPS (AIQUEUE_PROXY_SSL_HEADER, e.g.
# X-Forwarded-Proto: only set it when the proxy always sets or strips that header).
SESSION_COOKIE_SECURE = env_bool("AIQUEUE_SECURE_COOKIES", False)
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
SECURE_SSL_REDIRECT = env_bool("AIQUEUE_SSL_REDIRECT", False)
# Probes from the machine itself (systemd, a load balancer's health check) speak plain HTTP.
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$"]
SECURE_HSTS_SECONDS = env_int("AIQUEUE_HSTS_SECONDS", 0, minimum=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("AIQUEUE_HSTS_INCLUDE_SUBDOMAINS", False)
SECURE_HSTS_PRELOAD = env_bool("AIQUEUE_HSTS_PRELOAD", False)
_proxy_header = env_str("AIQUEUE_PROXY_SSL_HEADER", "")
if _proxy_header:
    SECURE_PROXY_SSL_HEADER = ("HTTP_" + _proxy_header.upper().replace("-", "_"), "https")

# --- Static files ----------------------------------------------------------------------------
STATIC_URL = "static/"
STATICFILES_DIRS = [SITE_DIR / "static"]
# ./run creates it (WhiteNoise warns when it is missing); nothing is written at import.
STATIC_ROOT = Path(env_str("AIQUEUE_STATIC_ROOT", str(VAR_DIR / "staticfiles")))
# Production (docs/deploy.md): `collectstatic` writes hashed, compressed copies (WhiteNoise's
# manifest storage) that WhiteNoise serves with far-future caching. Off, files are served
# from the source directories as they are, so ./run and the suite need no collectstatic.
AIQUEUE_STATIC_MANIFEST = env_bool("AIQUEUE_STATIC_MANIFEST", False)
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": (
            "whitenoise.storage.CompressedManifestStaticFilesStorage"
            if AIQUEUE_STATIC_MANIFEST
            else "django.contrib.staticfiles.storage.StaticFilesStorage"
        )
    },
}
WHITENOISE_USE_FINDERS = not AIQUEUE_STATIC_MANIFEST
# Files browsers ask for at the site's root (/favicon.ico), served without a login.
WHITENOISE_ROOT = BASE_DIR / "static" / "root"
WHITENOISE_AUTOREFRESH = DEBUG

LANGUAGE_CODE = "en-us"
TIME_ZONE = env_str("AIQUEUE_TIME_ZONE", "UTC")
USE_I18N = False
USE_TZ = True

# Mail (the review digests): an SMTP server from the environment, Django's own names. Without
# EMAIL_HOST, mail is printed to the console.
EMAIL_HOST = env_str("EMAIL_HOST", "")
EMAIL_PORT = env_int("EMAIL_PORT", 587, minimum=1)
EMAIL_HOST_USER = env_str("EMAIL_HOST_USER", "")
EMAIL_HOST_PASSWORD = env_str("EMAIL_HOST_PASSWORD", "")
EMAIL_USE_TLS = env_bool("EMAIL_USE_TLS", True)
EMAIL_USE_SSL = env_bool("EMAIL_USE_SSL", False)
if EMAIL_USE_TLS and EMAIL_USE_SSL:
    if "EMAIL_USE_TLS" in os.environ:
        raise ImproperlyConfigured("Set one of EMAIL_USE_TLS (STARTTLS) and EMAIL_USE_SSL.")
    EMAIL_USE_TLS = False  # EMAIL_USE_SSL asked for implicit TLS; STARTTLS was only the default
EMAIL_TIMEOUT = env_int("EMAIL_TIMEOUT", 10, minimum=1)
EMAIL_BACKEND = env_str(
    "AIQUEUE_EMAIL_BACKEND",
    "django.core.mail.backends.smtp.EmailBackend"
    if EMAIL_HOST
    else "django.core.mail.backends.console.EmailBackend",
)
DEFAULT_FROM_EMAIL = env_str(
    "DEFAULT_FROM_EMAIL", env_str("AIQUEUE_FROM_EMAIL", "aiqueue@localhost")
)
SERVER_EMAIL = DEFAULT_FROM_EMAIL

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    # job=<code> on every line a job produces (runs.joblog: set by the runner per run).
    "filters": {"job": {"()": "runs.joblog.JobContextFilter"}},
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s job=%(job)s %(message)s"},
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "plain", "filters": ["job"]}
    },
    "root": {"handlers": ["console"], "level": env_str("AIQUEUE_LOG_LEVEL", "INFO")},
    "loggers": {
        "rq.worker": {"level": env_str("AIQUEUE_RQ_LOG_LEVEL", "WARNING")},
        "httpx": {"level": "WARNING"},
        "httpcore": {"level": "WARNING"},
    },
}
