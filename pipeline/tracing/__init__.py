"""Causal tracing (Meng et al. 2022, section 2): corrupt the subject, restore states, map indirect effects."""
