//! The fuzz targets' bodies: plain functions over raw bytes, each asserting what must hold for
//! every input (a panic is a finding). Two runners call them:
//!
//! - the cargo-fuzz targets in `agent/fuzz` (coverage-guided libFuzzer on nightly,
//!   `cargo xtask fuzz`), one thin `fuzz_target!` per function;
//! - the smoke run in this module's tests (stable, part of `cargo test` and so of
//!   `cargo xtask test`): every seed, corpus and regression input, then a few seconds of
//!   random and mutated inputs per target ([`smoke`]).
//!
//! Compiled only for tests and with the `fuzzing` feature (which the fuzz crate enables),
//! never into the agent binary.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use arbitrary::{Arbitrary as _, Unstructured};
use http::header::{HeaderName, HeaderValue};
use http::{Method, Request, StatusCode, Uri};

use crate::identity::SpiffeId;
use crate::policy::{Connection, PolicySet, Workload};
use crate::procscan::pod_uid_from_cgroup;
use crate::tunnel::{RefusalReason, check_connect_request};

#[cfg(test)]
pub mod smoke;

/// A fuzz target: any bytes in, a panic when a property fails.
pub type Target = fn(&[u8]);

/// Every target by name, with the seed directories (under `agent/fuzz/seeds`) it starts from.
/// `xtask/src/fuzz.rs` lists the same names and seeds for libFuzzer.
pub const TARGETS: &[(&str, Target, &[&str])] = &[
    ("config_parse", config_parse, &["yaml"]),
    ("policy_compile", policy_compile, &["yaml"]),
    ("spiffe_id", spiffe_id, &["spiffe_id"]),
    ("hbone_connect", hbone_connect, &[]),
    ("cgroup_path", cgroup_path, &["cgroup_path"]),
];

/// The local-mode file parser: any text either parses into a state or is refused with an
/// error; it never panics.
pub fn config_parse(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for node in ["node1", "node2"] {
        if let Ok((state, _warnings)) = crate::config::parse(text, node) {
            // Rendering the accepted state must not panic either.
            let _ = format!("{state:?}");
        }
    }
}

/// Istio policy compile and evaluation: any YAML either compiles or is refused, and a
/// compiled set decides every connection without panicking.
pub fn policy_compile(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok((set, _warnings)) = PolicySet::from_yaml(text, "default", "istio-system") else {
        return;
    };
    let labels = BTreeMap::from([
        ("app".to_owned(), "checkout".to_owned()),
        ("version".to_owned(), "v1".to_owned()),
    ]);
    let no_labels = BTreeMap::new();
    let workloads = [
        Workload {
            namespace: "shop",
            labels: &labels,
        },
        Workload {
            namespace: "default",
            labels: &no_labels,
        },
    ];
    let connections = [
        Connection {
            source_principal: Some("spiffe://cluster.local/ns/shop/sa/frontend"),
            source_ip: IpAddr::V4(Ipv4Addr::new(10, 11, 1, 2)),
            destination_ip: IpAddr::V4(Ipv4Addr::new(10, 11, 2, 2)),
            destination_port: 8080,
        },
        Connection {
            source_principal: None,
            source_ip: IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 7)),
            destination_ip: IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 8)),
            destination_port: 443,
        },
    ];
    for workload in &workloads {
        let _ = set.mtls_mode(workload, 8080);
        for conn in &connections {
            let decision = set.evaluate(workload, conn);
            let _ = set.explain(workload, conn);
            let _ = format!("{decision:?}");
        }
    }
}

/// SPIFFE ID parsing: never panics, and an accepted ID prints back to exactly the text it
/// came from (one spelling per identity) and parses again to the same value.
pub fn spiffe_id(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(id) = text.parse::<SpiffeId>() else {
        return;
    };
    let shown = id.to_string();
    assert_eq!(shown, text, "an accepted ID must display as its input");
    let again: SpiffeId = shown.parse().expect("a displayed ID parses");
    assert_eq!(again, id);
}

/// Small enough that the fuzzer reaches the 431 branch with short inputs.
const MAX_HEADER_LIST_SIZE: u32 = 512;

/// Method, authority, an optional path (with it the request gets `:scheme` too) and header
/// fields, all as raw bytes.
type RawRequest = (Vec<u8>, Vec<u8>, Option<Vec<u8>>, Vec<(Vec<u8>, Vec<u8>)>);

/// The inbound HBONE request check with arbitrary method, authority and header bytes: it
/// never panics, accepts only a CONNECT to an `ip:port` (not the HBONE port) within the
/// header budget, and refuses everything else with the status its reason calls for. The
/// bytes become a [`RawRequest`] the way libFuzzer's typed `fuzz_target!` builds one
/// (`arbitrary`'s `arbitrary_take_rest`), so saved corpora keep their meaning.
pub fn hbone_connect(data: &[u8]) {
    let Ok(raw) = RawRequest::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    let Some(request) = build_request(raw) else {
        return;
    };
    let method = request.method().clone();
    match check_connect_request(&request, MAX_HEADER_LIST_SIZE) {
        Ok(checked) => {
            assert_eq!(method, Method::CONNECT);
            let authority = request
                .uri()
                .authority()
                .expect("accepted without authority");
            assert_eq!(
                authority.as_str().parse::<SocketAddr>().ok(),
                Some(checked.target)
            );
            assert_ne!(checked.target.port(), crate::tunnel::HBONE_PORT);
        }
        Err(refusal) => {
            let expected = match refusal.reason {
                RefusalReason::HeaderTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                RefusalReason::BadMethod => {
                    assert_ne!(method, Method::CONNECT);
                    StatusCode::BAD_REQUEST
                }
                RefusalReason::BadAuthority => StatusCode::BAD_REQUEST,
                other => panic!("the request check refused with {other:?}"),
            };
            assert_eq!(refusal.status, expected);
            assert!(!refusal.detail.is_empty());
        }
    }
}

/// The request h2 would hand the check; `None` for what h2 itself rejects (it never reaches
/// the check).
fn build_request((method, authority, path, headers): RawRequest) -> Option<Request<()>> {
    let method = Method::from_bytes(&method).ok()?;
    let mut parts = http::uri::Parts::default();
    if !authority.is_empty() {
        parts.authority = Some(http::uri::Authority::try_from(authority.as_slice()).ok()?);
    }
    if let Some(path) = path {
        // A non-CONNECT request carries :scheme and :path as well.
        parts.scheme = Some(http::uri::Scheme::HTTPS);
        parts.path_and_query = Some(http::uri::PathAndQuery::try_from(path.as_slice()).ok()?);
    }
    let uri = Uri::from_parts(parts).ok()?;
    let mut builder = Request::builder().method(method).uri(uri);
    for (name, value) in &headers {
        let name = HeaderName::from_bytes(name).ok()?;
        let value = HeaderValue::from_bytes(value).ok()?;
        builder = builder.header(name, value);
    }
    builder.body(()).ok()
}

/// The cgroup-path parser: never panics, and a UID it finds is always in the API server's
/// form (36 lowercase hex digits and dashes at 8, 13, 18, 23) and appears in the line.
pub fn cgroup_path(data: &[u8]) {
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    let Some(uid) = pod_uid_from_cgroup(line) else {
        return;
    };
    let uid = uid.as_str();
    assert_eq!(uid.len(), 36, "{uid:?}");
    for (i, b) in uid.bytes().enumerate() {
        match i {
            8 | 13 | 18 | 23 => assert_eq!(b, b'-', "{uid:?}"),
            _ => assert!(b.is_ascii_digit() || (b'a'..=b'f').contains(&b), "{uid:?}"),
        }
    }
    // systemd writes the UID's dashes as '_': compare ignoring that and case.
    let normalise = |s: &str| s.to_ascii_lowercase().replace('_', "-");
    assert!(normalise(line).contains(uid), "{uid:?} not in {line:?}");
}
