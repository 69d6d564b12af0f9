//! The inbound HBONE request check with arbitrary method, authority and header bytes: it
//! never panics, accepts only a CONNECT to an `ip:port` within the header budget, and
//! refuses everything else with the status its reason calls for.
#![no_main]

use std::net::SocketAddr;

use ambit_agent::tunnel::{RefusalReason, check_connect_request};
use http::header::{HeaderName, HeaderValue};
use http::{Method, Request, StatusCode, Uri};
use libfuzzer_sys::fuzz_target;

/// Small enough that the fuzzer reaches the 431 branch with short inputs.
const MAX_HEADER_LIST_SIZE: u32 = 512;

/// Method, authority, an optional path (with it the request gets `:scheme` too) and header
/// fields, all as raw bytes.
type RawRequest = (Vec<u8>, Vec<u8>, Option<Vec<u8>>, Vec<(Vec<u8>, Vec<u8>)>);

fuzz_target!(|input: RawRequest| {
    let (method, authority, path, headers) = input;
    // What h2 itself would reject never reaches the check: skip it.
    let Ok(method) = Method::from_bytes(&method) else {
        return;
    };
    let mut parts = http::uri::Parts::default();
    if !authority.is_empty() {
        let Ok(authority) = http::uri::Authority::try_from(authority.as_slice()) else {
            return;
        };
        parts.authority = Some(authority);
    }
    if let Some(path) = path {
        // A non-CONNECT request carries :scheme and :path as well.
        let Ok(path) = http::uri::PathAndQuery::try_from(path.as_slice()) else {
            return;
        };
        parts.scheme = Some(http::uri::Scheme::HTTPS);
        parts.path_and_query = Some(path);
    }
    let Ok(uri) = Uri::from_parts(parts) else {
        return;
    };
    let mut builder = Request::builder().method(method.clone()).uri(uri);
    for (name, value) in &headers {
        let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        else {
            return;
        };
        builder = builder.header(name, value);
    }
    let Ok(request) = builder.body(()) else {
        return;
    };

    match check_connect_request(&request, MAX_HEADER_LIST_SIZE) {
        Ok(checked) => {
            assert_eq!(request.method(), Method::CONNECT);
            let authority = request
                .uri()
                .authority()
                .expect("accepted without authority");
            assert_eq!(
                authority.as_str().parse::<SocketAddr>().ok(),
                Some(checked.target)
            );
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
});
