"""Python clients for the loraquilt gRPC service (no torch imports here)."""
