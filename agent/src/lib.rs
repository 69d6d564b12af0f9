//! ambit-agent: the node-level mesh agent. One module per concern; see
//! docs/ARCHITECTURE.md for the path of one connection through them.
#![deny(unsafe_code)]

pub mod app;
pub mod ca;
pub mod capture;
pub mod cni;
pub mod config;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod identity;
pub mod k8s;
pub mod netns;
pub mod observability;
pub mod policy;
pub mod procscan;
pub mod sys;
pub mod tunnel;
