"""The serving endpoint's bearer token: where a replica finds it, and the one check every engine makes.

A replica needs only the token's SHA-256 to check a request, so that is all a backend has to hand it
where the hand-over is visible to others: on a Ray cluster the app's runtime_env is returned by
`/api/serve/applications/` (and a job's by `/api/jobs/`) to every holder of the cluster's token, i.e. to
every tenant of a shared cluster; the digest of a random token gives them nothing to send. A pod that
mounts the Secret (KubeRay) or a local `meddistill serve` may hand over the token itself.

In order: $MEDDISTILL_SERVE_TOKEN_SHA256 (hex digest), $MEDDISTILL_SERVE_TOKEN, the file named by
$MEDDISTILL_SERVE_TOKEN_FILE. Torch-free and Ray-free (the operator imports it).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

TOKEN_ENV = "MEDDISTILL_SERVE_TOKEN"  # the bearer token itself (a pod gets the Secret's key there)
TOKEN_FILE_ENV = "MEDDISTILL_SERVE_TOKEN_FILE"  # or a file holding it (a mounted Secret)
TOKEN_SHA256_ENV = "MEDDISTILL_SERVE_TOKEN_SHA256"  # or only its SHA-256, hex (what a Ray cluster gets)
MISSING = (f"serving.auth is set but none of ${TOKEN_SHA256_ENV}, ${TOKEN_ENV}, ${TOKEN_FILE_ENV} holds a token in this "
           f"replica; mount the Secret into the replica's environment")


def token_digest(token: str) -> str:
    return hashlib.sha256(token.strip().encode()).hexdigest()


def read_token() -> str | None:
    """The bearer token itself from $MEDDISTILL_SERVE_TOKEN or the file named by $MEDDISTILL_SERVE_TOKEN_FILE."""
    if os.environ.get(TOKEN_ENV, "").strip():
        return os.environ[TOKEN_ENV].strip()
    if os.environ.get(TOKEN_FILE_ENV):
        return Path(os.environ[TOKEN_FILE_ENV]).read_text().strip() or None
    return None


def expected_digest() -> str | None:
    """The SHA-256 (hex) a request's token must have in this process; None when no token is given."""
    if os.environ.get(TOKEN_SHA256_ENV, "").strip():
        return os.environ[TOKEN_SHA256_ENV].strip().lower()
    token = read_token()
    return token_digest(token) if token else None


def authorized(authorization_header: str, expected: str) -> bool:
    """`Authorization: Bearer <token>` whose token has the expected digest (constant-time compare)."""
    given = authorization_header[len("Bearer "):] if authorization_header.startswith("Bearer ") else ""
    return bool(given) and hmac.compare_digest(token_digest(given), expected)
