//! The plugin registry: tenants' uploaded plugins, their versions and chains,
//! kept in a [`store::Store`] and put live by swapping a tenant's chain.

pub mod fs;
pub mod model;
pub mod redis;
pub mod store;
