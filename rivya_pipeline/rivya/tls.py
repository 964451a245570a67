"""One TLS context per process, shared by every HTTP client of the package.

Building one loads certifi's CA bundle (tens of milliseconds), and the pipeline opens a client for the API and
another for the media host in every Dagster run: a hundred briefs paid for three hundred of them. An
`ssl.SSLContext` is safe to share between clients and threads.
"""

from __future__ import annotations

import functools
import ssl

import httpx


@functools.cache
def shared_ssl_context(*, trust_env: bool) -> ssl.SSLContext:
    """httpx's own default context; `trust_env` means what it means to httpx (SSL_CERT_FILE, SSL_CERT_DIR)."""
    return httpx.create_ssl_context(trust_env=trust_env)
