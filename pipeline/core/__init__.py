"""The shared core: loading a model and its architecture adapter, hooks, requests and records, probabilities,
atomic files, digests and signals. Every other package of ``pipeline/`` builds on these; they import none of it."""
