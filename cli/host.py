"""What this machine is (CPU flags, CPU model, the cache folder): defined with the kernels,
which read it before they build (`loraquilt.kernels.host`); named here for the CLI."""

from loraquilt.kernels.host import CACHE_ENV, cache_root, cpu_flags, cpu_model

__all__ = ["CACHE_ENV", "cache_root", "cpu_flags", "cpu_model"]
