"""`python -m aiqueue <command>` (or the `aiqueue` script): manage.py for an installed package."""

from __future__ import annotations

import os
import sys


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "aiqueue.settings")
    from django.conf import settings
    from django.core.management import execute_from_command_line

    # The settings write nothing; the first command makes var/ (the SQLite file, the key).
    settings.VAR_DIR.mkdir(parents=True, exist_ok=True)
    execute_from_command_line([sys.argv[0], *sys.argv[1:]])


if __name__ == "__main__":
    main()
