//! The sluice plugin kit: everything a Rust policy plugin needs.
//!
//! ```ignore
//! use sluice_plugin_kit::*;
//!
//! struct MyPolicy;
//! impl Guest for MyPolicy {
//!     fn describe() -> PluginInfo { info("my-policy").on_request() }
//!     fn on_request(req: RequestView) -> RequestDecision { RequestDecision::Continue }
//!     fn on_response_chunk(_: ChunkView) -> ChunkVerdict { ChunkVerdict::Accept }
//!     fn on_response(_: RequestView, _: ResponseView) -> ResponseVerdict { ResponseVerdict::Accept }
//! }
//! export_plugin!(MyPolicy);
//! ```
//!
//! Build with `cargo build --target wasm32-unknown-unknown --release`, then
//! make a component of the module (`wasm-tools component new`, or let
//! sluice's build do it for the plugins in this workspace).

// The export macro names paths through this crate's name, also from inside it.
extern crate self as sluice_plugin_kit;

#[doc(hidden)]
pub use wit_bindgen;

/// The generated `sluice:policy` bindings.
pub mod bindings {
    wit_bindgen::generate!({
        world: "policy",
        path: "../../wit",
        pub_export_macro: true,
        export_macro_name: "export_plugin",
        default_bindings_module: "sluice_plugin_kit::bindings",
        runtime_path: "sluice_plugin_kit::wit_bindgen::rt",
    });
}

pub use bindings::Guest;
pub use bindings::sluice::policy::host;
pub use bindings::sluice::policy::types::*;

use serde::Serialize;
use serde::de::DeserializeOwned;

/// A `plugin-info` with every hook off; switch on what the plugin uses.
pub fn info(name: &str) -> PluginInfo {
    PluginInfo {
        name: name.to_owned(),
        version: "0.1.0".to_owned(),
        wants_request: false,
        wants_chunks: false,
        wants_response: false,
        wants_raw_json: false,
    }
}

/// Builder-style switches for [`PluginInfo`].
pub trait InfoExt {
    fn version(self, v: &str) -> Self;
    fn on_request(self) -> Self;
    fn on_chunks(self) -> Self;
    fn on_response(self) -> Self;
    fn raw_json(self) -> Self;
}

impl InfoExt for PluginInfo {
    fn version(mut self, v: &str) -> Self {
        self.version = v.to_owned();
        self
    }
    fn on_request(mut self) -> Self {
        self.wants_request = true;
        self
    }
    fn on_chunks(mut self) -> Self {
        self.wants_chunks = true;
        self
    }
    fn on_response(mut self) -> Self {
        self.wants_response = true;
        self
    }
    fn raw_json(mut self) -> Self {
        self.wants_raw_json = true;
        self
    }
}

/// This plugin's config from the tenant's chain, parsed into `T`.
pub fn config<T: DeserializeOwned>() -> Result<T, String> {
    serde_json::from_str(&host::config()).map_err(|e| format!("invalid plugin config: {e}"))
}

/// A [`Rejection`] without `Retry-After`.
pub fn rejection(status: u16, code: &str, message: impl Into<String>) -> Rejection {
    Rejection {
        status,
        code: code.to_owned(),
        message: message.into(),
        retry_after_secs: None,
    }
}

/// `reject(...)` as a request decision.
pub fn reject(status: u16, code: &str, message: impl Into<String>) -> RequestDecision {
    RequestDecision::Reject(rejection(status, code, message))
}

/// Collects request changes; `finish` gives the decision.
#[derive(Default)]
pub struct Patch {
    ops: Vec<PatchOp>,
}

impl Patch {
    pub fn new() -> Self {
        Self::default()
    }

    /// Set the body field at `pointer` (RFC 6901, e.g. `/temperature`).
    pub fn set(&mut self, pointer: &str, value: &impl Serialize) -> &mut Self {
        if let Ok(json) = serde_json::to_string(value) {
            self.ops.push(PatchOp::SetField(FieldValue {
                pointer: pointer.to_owned(),
                json,
            }));
        }
        self
    }

    pub fn remove(&mut self, pointer: &str) -> &mut Self {
        self.ops.push(PatchOp::RemoveField(pointer.to_owned()));
        self
    }

    pub fn set_header(&mut self, name: &str, value: &str) -> &mut Self {
        self.ops.push(PatchOp::SetHeader(Header {
            name: name.to_owned(),
            value: value.to_owned(),
        }));
        self
    }

    pub fn set_model(&mut self, model: &str) -> &mut Self {
        self.ops.push(PatchOp::SetModel(model.to_owned()));
        self
    }

    pub fn set_pool(&mut self, pool: &str) -> &mut Self {
        self.ops.push(PatchOp::SetPool(pool.to_owned()));
        self
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// `continue` when nothing changed, else `modify`.
    pub fn finish(self) -> RequestDecision {
        if self.ops.is_empty() {
            RequestDecision::Continue
        } else {
            RequestDecision::Modify(self.ops)
        }
    }
}

/// Log through the host (tagged with tenant, plugin and trace id there).
pub fn log(level: host::Level, message: &str) {
    host::log(level, message);
}
