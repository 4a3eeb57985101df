"""Who may change the server: admin RPCs (RegisterAdapter, UnregisterAdapter) require
`authorization: Bearer <token>` metadata when the server has an admin token; generation
and listing stay open. Plus the TLS credentials of `--tls-cert/--tls-key`.

Missing or malformed credentials -> UNAUTHENTICATED; a wrong token -> PERMISSION_DENIED.
Tokens are compared in constant time (hmac.compare_digest over their SHA-256 digests,
so neither the content nor the length of the expected token leaks through timing).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc

ADMIN_METHODS = frozenset({"RegisterAdapter", "UnregisterAdapter"})
MIN_TOKEN_CHARS = 16
MAX_TOKEN_FILE_BYTES = 4096


class AuthConfigError(ValueError):
    """An admin token or TLS file the server refuses to start with."""


def read_token_file(path: Path) -> str:
    """The admin token: the file's content without surrounding whitespace."""
    try:
        info = path.stat()
        if info.st_size > MAX_TOKEN_FILE_BYTES:
            raise AuthConfigError(f"admin token file {path} is larger than {MAX_TOKEN_FILE_BYTES} bytes")
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        raise AuthConfigError(f"cannot read admin token file {path}: {error}") from None
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise AuthConfigError(f"admin token in {path} must be at least {MIN_TOKEN_CHARS} characters "
                              "without whitespace")
    if os.name == "posix" and info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        print(f"warning: admin token file {path} is readable by other users (chmod 600 it)",
              file=sys.stderr, flush=True)
    return token


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


@dataclass(frozen=True)
class AdminCheck:
    """Decides an admin call from its metadata; None means allowed."""

    token_digest: bytes

    @classmethod
    def for_token(cls, token: str) -> AdminCheck:
        return cls(_digest(token))

    def refusal(self, metadata) -> tuple[grpc.StatusCode, str] | None:
        values = [value for key, value in (metadata or ()) if key == "authorization"]
        if not values:
            return grpc.StatusCode.UNAUTHENTICATED, "admin call without credentials: send 'authorization: Bearer <token>'"
        scheme, _, presented = (values[0] if isinstance(values[0], str) else "").partition(" ")
        if len(values) > 1 or scheme.lower() != "bearer" or not presented.strip():
            return grpc.StatusCode.UNAUTHENTICATED, "malformed authorization metadata: expected 'Bearer <token>'"
        if not hmac.compare_digest(_digest(presented.strip()), self.token_digest):
            return grpc.StatusCode.PERMISSION_DENIED, "admin token is not valid for this server"
        return None


class AdminAuthInterceptor(grpc.ServerInterceptor):
    """Guards the admin methods of the service; every other call passes untouched."""

    def __init__(self, check: AdminCheck, service_name: str):
        self.check = check
        self.guarded = {f"/{service_name}/{method}" for method in ADMIN_METHODS}

    def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method not in self.guarded:
            return continuation(handler_call_details)
        refusal = self.check.refusal(handler_call_details.invocation_metadata)
        if refusal is None:
            return continuation(handler_call_details)
        code, message = refusal

        def refuse(_request, context):
            context.abort(code, message)

        return grpc.unary_unary_rpc_method_handler(refuse)


@dataclass(frozen=True)
class TLSFiles:
    cert: Path  # PEM certificate chain
    key: Path  # PEM private key

    def server_credentials(self) -> grpc.ServerCredentials:
        try:
            cert, key = self.cert.read_bytes(), self.key.read_bytes()
        except OSError as error:
            raise AuthConfigError(f"cannot read TLS files: {error}") from None
        if b"-----BEGIN" not in cert or b"-----BEGIN" not in key:
            raise AuthConfigError("--tls-cert and --tls-key must be PEM files")
        return grpc.ssl_server_credentials([(key, cert)])
