//! Sluice: an edge gateway for LLM inference.
#![forbid(unsafe_code)]

pub mod sim;
