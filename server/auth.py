"""Who may call the server. Admin RPCs (RegisterAdapter, UnregisterAdapter) require
`authorization: Bearer <token>` metadata when the server has an admin token
(`--admin-token-file`); inference RPCs (Generate, GenerateStream, ListAdapters) require
`authorization: Bearer <key>` when it has an API key (`--api-key-file`, which the HTTP
API checks too). Plus the TLS credentials of `--tls-cert/--tls-key`.

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
INFERENCE_METHODS = frozenset({"Generate", "GenerateStream", "ListAdapters"})
STREAMING_METHODS = frozenset({"GenerateStream"})
MIN_TOKEN_CHARS = 16
MAX_TOKEN_FILE_BYTES = 4096


class AuthConfigError(ValueError):
    """An admin token, API key or TLS file the server refuses to start with."""


def read_token_file(path: Path, what: str = "admin token") -> str:
    """The token (admin token, API key) in a file: its content without surrounding whitespace."""
    try:
        info = path.stat()
        if info.st_size > MAX_TOKEN_FILE_BYTES:
            raise AuthConfigError(f"{what} file {path} is larger than {MAX_TOKEN_FILE_BYTES} bytes")
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        raise AuthConfigError(f"cannot read {what} file {path}: {error}") from None
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise AuthConfigError(f"{what} in {path} must be at least {MIN_TOKEN_CHARS} characters "
                              "without whitespace")
    if os.name == "posix" and info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        print(f"warning: {what} file {path} is readable by other users (chmod 600 it)",
              file=sys.stderr, flush=True)
    return token


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


@dataclass(frozen=True)
class BearerCheck:
    """Decides a guarded call from its metadata (`authorization: Bearer <token>`); None
    means allowed. `kind` says which token it checks: "admin" or "api" (the API key)."""

    token_digest: bytes
    kind: str = "admin"

    @classmethod
    def for_token(cls, token: str, kind: str = "admin") -> BearerCheck:
        return cls(token_digest(token), kind)

    def refusal(self, metadata) -> tuple[grpc.StatusCode, str] | None:
        values = [value for key, value in (metadata or ()) if key.lower() == "authorization"]
        if not values:
            if self.kind == "api":
                return grpc.StatusCode.UNAUTHENTICATED, "call without an API key: send 'authorization: Bearer <key>'"
            return grpc.StatusCode.UNAUTHENTICATED, "admin call without credentials: send 'authorization: Bearer <token>'"
        scheme, _, presented = (values[0] if isinstance(values[0], str) else "").partition(" ")
        if len(values) > 1 or scheme.lower() != "bearer" or not presented.strip():
            return grpc.StatusCode.UNAUTHENTICATED, "malformed authorization metadata: expected 'Bearer <token>'"
        if not hmac.compare_digest(token_digest(presented.strip()), self.token_digest):
            what = "API key" if self.kind == "api" else "admin token"
            return grpc.StatusCode.PERMISSION_DENIED, f"{what} is not valid for this server"
        return None


class AuthInterceptor(grpc.ServerInterceptor):
    """Guards the admin methods with the admin token and the inference methods with the
    API key (either may be None: open); health and reflection pass untouched."""

    def __init__(self, service_name: str, admin: BearerCheck | None = None, api: BearerCheck | None = None):
        self.checks = {}
        for methods, check in ((ADMIN_METHODS, admin), (INFERENCE_METHODS, api)):
            if check is not None:
                self.checks.update({f"/{service_name}/{method}": (check, method in STREAMING_METHODS)
                                    for method in methods})

    def intercept_service(self, continuation, handler_call_details):
        guard = self.checks.get(handler_call_details.method)
        if guard is None:
            return continuation(handler_call_details)
        check, streaming = guard
        refusal = check.refusal(handler_call_details.invocation_metadata)
        if refusal is None:
            return continuation(handler_call_details)
        code, message = refusal

        def refuse(_request, context):
            context.abort(code, message)

        if streaming:
            return grpc.unary_stream_rpc_method_handler(refuse)
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
