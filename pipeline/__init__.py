"""Model-agnostic ROME math and model plumbing; free of Lightning."""
