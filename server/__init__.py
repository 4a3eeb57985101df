"""The inference server: request -> scheduler -> runner -> model -> sampler -> response."""
