"""The statistics: C = E[k kᵀ] of the keys entering an MLP down-projection, streamed from text, cached and
looked up by key; its convergence readout and its eigendecomposition (AlphaEdit's null space)."""
