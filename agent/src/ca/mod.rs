//! The CA service (`ambit ca`).

/// Generated from `proto/istio/v1/auth/ca.proto` at build time.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod proto {
    tonic::include_proto!("istio.v1.auth");
}
