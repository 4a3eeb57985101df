"""Adapters: PEFT folders -> validated LoRA weights -> per-layer slot buffers."""
