//! Host bindings of the `sluice:policy` world (wit/policy.wit).

wasmtime::component::bindgen!({
    world: "policy",
    path: "wit",
});

pub use sluice::policy::host::{Level, LimitOutcome, Scope};
pub use sluice::policy::types::*;
