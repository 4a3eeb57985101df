"""Llama-family decoder with NF4 projections: config, weights, layers, KV cache."""
