"""The editors: ROME, MEMIT, AlphaEdit and the FT+L baseline, the v* optimisation, the closed-form updates,
context templates and the ledger of applied edits."""
