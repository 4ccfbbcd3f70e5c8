//! The simulated engine (vLLM-compatible). Written on branch `sim`.
