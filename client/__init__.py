"""Python clients for the loraquilt gRPC service (no torch imports here)."""

from loraquilt.client.client import AsyncLoraQuiltClient, LoraQuiltClient, build_request

__all__ = ["AsyncLoraQuiltClient", "LoraQuiltClient", "build_request"]
