//! Configuration read from this process's environment, for the callers that do not
//! pass a lookup yet.
//!
//! The library takes its configuration as arguments ([`StoreConfig::from_vars`],
//! [`Leases::from_vars`], given a lookup such as `|k| std::env::var(k).ok()`), so
//! that the controller can send its own to the agents and tests can pass a fake
//! environment. These wrappers exist only until the agent's and controller's call
//! sites pass the lookup themselves; then they are removed. This is the one module
//! of the library that reads the environment.

use crate::gc::Leases;
use crate::objstore::StoreConfig;

fn process_env(key: &str) -> Option<String> {
    std::env::var(key).ok()
}

impl StoreConfig {
    /// Deprecated: [`StoreConfig::from_vars`] over this process's environment.
    pub fn from_env() -> Self {
        StoreConfig::from_vars(process_env)
    }
}

impl Leases {
    /// Deprecated: [`Leases::from_vars`] over this process's environment.
    pub fn from_env() -> Self {
        Leases::from_vars(process_env)
    }
}
