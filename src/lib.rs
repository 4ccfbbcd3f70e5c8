//! Sluice: an edge gateway for LLM inference. See ARCHITECTURE.md for the map.
#![forbid(unsafe_code)]

pub mod admin;
pub mod auth;
pub mod body;
pub mod config;
pub mod errors;
pub mod pipeline;
pub mod plugins;
pub mod registry;
pub mod server;
pub mod sim;
pub mod telemetry;
pub mod tokens;
pub mod upstream;
