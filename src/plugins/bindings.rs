//! Host bindings of the `sluice:policy` world (wit/policy.wit).

wasmtime::component::bindgen!({
    world: "policy",
    path: "wit",
});

pub use self::sluice::policy::host::{Level, LimitOutcome, Scope};
pub use self::sluice::policy::types::*;
