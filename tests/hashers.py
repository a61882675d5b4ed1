"""A password hasher for the suite: Django's PBKDF2 at one iteration.

Each hash at Django's 1,000,000 iterations costs ~0.3 s of CPU here, and the suite makes a user
(or logs one in) in most of its tests. The algorithm name stays `pbkdf2_sha256` and the hash
records its iteration count, so the servers and workers the suite starts with the stock
settings verify these hashes as they would any other (and re-hash on a login, as Django does
for an old work factor).
"""

from __future__ import annotations

from django.contrib.auth.hashers import PBKDF2PasswordHasher


class OneIterationPBKDF2PasswordHasher(PBKDF2PasswordHasher):
    iterations = 1
