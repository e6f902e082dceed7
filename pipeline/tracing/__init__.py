"""Causal tracing (Meng et al. 2022, section 2): corrupt the subject, restore states, map indirect effects.

One job per module: ``facts`` (fact files), ``prompt`` (one fact tokenised), ``noise`` (the noise level and
the per-fact noise), ``engine`` (the batched corrupt/restore passes: trace one fact), ``reference`` (ROME's
one-pass-per-cell method, the engine's check for tests and benchmarks), ``aie`` (the average indirect
effect over facts and the layer it recommends), ``recommendation`` (that layer, saved for
``edit.layer=auto``), ``cache_dir`` (tracing's per-model cache directory), ``plots`` (the figures)."""
