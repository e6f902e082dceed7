"""Evaluation: CounterFact / zsRE cases, the paper's metrics, scoring a case, retention checks and reports."""
