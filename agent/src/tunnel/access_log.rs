//! The access log: one line per proxied connection when it closes, in the same format for
//! both directions (docs/HBONE.md "Access log"). Outbound lines are written by the app (which
//! knows the route), inbound ones by `inbound.rs`; both go through [`AccessLog::emit`].

use std::borrow::Cow;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use crate::identity::SpiffeId;

/// Written for a value the reporter does not have (no identity on plaintext, an unknown
/// workload).
pub const ABSENT: &str = "-";

/// Which line this is; also the log message, which tools match on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccessKind {
    /// Reported by the client's agent.
    Outbound,
    /// Reported by the server's agent, the connection came over HBONE.
    Inbound,
    /// Reported by the server's agent, the connection came in plaintext (:15006).
    InboundPlaintext,
}

/// An access log's `result`: "ok" without allocating, else the error's text.
pub fn outcome<E: fmt::Display>(result: &Result<(), E>) -> Cow<'static, str> {
    match result {
        Ok(()) => Cow::Borrowed("ok"),
        Err(e) => Cow::Owned(e.to_string()),
    }
}

impl AccessKind {
    pub fn message(self) -> &'static str {
        match self {
            Self::Outbound => "outbound connection closed",
            Self::Inbound => "inbound connection closed",
            Self::InboundPlaintext => "inbound plaintext connection closed",
        }
    }
}

/// A workload as the log names it: `namespace/name`.
#[derive(Clone, Copy, Debug)]
pub struct WorkloadName<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
}

/// Everything one access-log line says. Bytes are counted from the client's point of view
/// in both directions, so the two agents' lines for one connection agree.
#[derive(Clone, Debug)]
pub struct AccessLog<'a> {
    pub kind: AccessKind,
    /// Verified identity of the client; `None` for plaintext.
    pub source: Option<&'a SpiffeId>,
    pub source_workload: Option<WorkloadName<'a>>,
    pub source_addr: SocketAddr,
    /// Identity of the server workload.
    pub destination: Option<&'a SpiffeId>,
    pub destination_workload: Option<WorkloadName<'a>>,
    /// What the client dialled (a service VIP outbound; the CONNECT authority inbound).
    pub original_destination: SocketAddr,
    /// The workload address actually connected to.
    pub target: SocketAddr,
    /// `mutual_tls` or `none`.
    pub security: &'static str,
    /// The authorization decision; outbound says `remote` (the destination's agent decides).
    pub authz: &'a str,
    /// Bytes the client sent (the request direction).
    pub bytes_from_client: u64,
    /// Bytes the client received (the response direction).
    pub bytes_to_client: u64,
    pub duration: Duration,
    /// `ok` or the error that ended the connection.
    pub result: &'a str,
}

/// One value of a line, written straight into the log output: formatting it into a
/// `String` first would cost one allocation per field and line.
#[derive(Clone, Copy, Debug)]
pub enum Field<'a> {
    Identity(Option<&'a SpiffeId>),
    Workload(Option<WorkloadName<'a>>),
    Addr(SocketAddr),
    Text(&'a str),
    Number(u128),
}

impl fmt::Display for Field<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Identity(Some(id)) => id.fmt(f),
            Self::Workload(Some(w)) => write!(f, "{}/{}", w.namespace, w.name),
            Self::Identity(None) | Self::Workload(None) => f.write_str(ABSENT),
            Self::Addr(addr) => AddrText(*addr).fmt(f),
            Self::Text(text) => f.write_str(text),
            Self::Number(n) => n.fmt(f),
        }
    }
}

/// A socket address as `SocketAddr`'s `Display` writes it, IPv4 written directly: core's
/// `Ipv4Addr` formats each octet through the general integer formatting (about 1.5 K
/// instructions per address), and every connection's log line and CONNECT request carry
/// several. IPv6, or a width or precision asked for, goes to core's formatting.
#[derive(Clone, Copy, Debug)]
pub struct AddrText(pub SocketAddr);

impl fmt::Display for AddrText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let SocketAddr::V4(v4) = self.0 else {
            return self.0.fmt(f);
        };
        if f.width().is_some() || f.precision().is_some() {
            return self.0.fmt(f);
        }
        // "255.255.255.255:65535" is 21 bytes.
        let mut text = [0u8; 21];
        let mut len = 0;
        let mut push = |byte: u8| {
            text[len] = byte;
            len += 1;
        };
        for (i, octet) in v4.ip().octets().into_iter().enumerate() {
            if i > 0 {
                push(b'.');
            }
            push_decimal(&mut push, octet.into());
        }
        push(b':');
        push_decimal(&mut push, v4.port());
        // Only ASCII digits, dots and a colon were written.
        f.write_str(std::str::from_utf8(&text[..len]).map_err(|_| fmt::Error)?)
    }
}

/// `n` in decimal, no leading zeros.
fn push_decimal(push: &mut impl FnMut(u8), n: u16) {
    let mut started = false;
    for divisor in [10_000u16, 1_000, 100, 10, 1] {
        let digit = (n / divisor % 10) as u8;
        if started || digit != 0 || divisor == 1 {
            started = true;
            push(b'0' + digit);
        }
    }
}

impl AccessLog<'_> {
    /// The line's fields, in order, as `(name, value)`; both [`Self::emit`] and the text
    /// form use this, so the two directions cannot drift apart.
    pub fn fields(&self) -> [(&'static str, Field<'_>); 13] {
        [
            ("source", Field::Identity(self.source)),
            ("source_workload", Field::Workload(self.source_workload)),
            ("source_addr", Field::Addr(self.source_addr)),
            ("destination", Field::Identity(self.destination)),
            (
                "destination_workload",
                Field::Workload(self.destination_workload),
            ),
            (
                "original_destination",
                Field::Addr(self.original_destination),
            ),
            ("target", Field::Addr(self.target)),
            ("security", Field::Text(self.security)),
            ("authz", Field::Text(self.authz)),
            (
                "bytes_from_client",
                Field::Number(self.bytes_from_client.into()),
            ),
            (
                "bytes_to_client",
                Field::Number(self.bytes_to_client.into()),
            ),
            ("duration_ms", Field::Number(self.duration.as_millis())),
            ("result", Field::Text(self.result)),
        ]
    }

    /// Writes the line (INFO), structured, so the JSON log format keeps the fields. tracing
    /// needs the names as literals: they repeat [`Self::fields`], in the same order.
    pub fn emit(&self) {
        let [
            (_, source),
            (_, source_workload),
            (_, source_addr),
            (_, destination),
            (_, destination_workload),
            (_, original_destination),
            (_, target),
            (_, security),
            (_, authz),
            _,
            _,
            _,
            (_, result),
        ] = self.fields();
        // Numbers stay numbers in the JSON format.
        let bytes_from_client = self.bytes_from_client;
        let bytes_to_client = self.bytes_to_client;
        let duration_ms = u64::try_from(self.duration.as_millis()).unwrap_or(u64::MAX);
        macro_rules! line {
            ($msg:expr) => {
                tracing::info!(
                    %source, %source_workload, %source_addr, %destination,
                    %destination_workload, %original_destination, %target, %security, %authz,
                    bytes_from_client, bytes_to_client, duration_ms, %result, $msg
                )
            };
        }
        // tracing wants a literal message; one arm per kind keeps it one.
        match self.kind {
            AccessKind::Outbound => line!("outbound connection closed"),
            AccessKind::Inbound => line!("inbound connection closed"),
            AccessKind::InboundPlaintext => line!("inbound plaintext connection closed"),
        }
    }
}

/// The text form, as the default log format prints it: `message key=value ...`.
impl fmt::Display for AccessLog<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind.message())?;
        for (name, value) in self.fields() {
            write!(f, " {name}={value}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", "shop", sa).expect("valid id")
    }

    fn line<'a>(
        kind: AccessKind,
        source: Option<&'a SpiffeId>,
        server: &'a SpiffeId,
    ) -> AccessLog<'a> {
        AccessLog {
            kind,
            source,
            source_workload: Some(WorkloadName {
                namespace: "shop",
                name: "client",
            }),
            source_addr: "10.0.0.1:40000".parse().expect("addr"),
            destination: Some(server),
            destination_workload: Some(WorkloadName {
                namespace: "shop",
                name: "server",
            }),
            original_destination: "10.96.0.10:80".parse().expect("addr"),
            target: "10.0.0.2:8080".parse().expect("addr"),
            security: "mutual_tls",
            authz: "remote",
            bytes_from_client: 1000,
            bytes_to_client: 7,
            duration: Duration::from_millis(12),
            result: "ok",
        }
    }

    #[test]
    fn both_directions_share_one_format_with_plain_values() {
        let client = id("client");
        let server = id("server");
        let outbound = line(AccessKind::Outbound, Some(&client), &server).to_string();
        let inbound = line(AccessKind::Inbound, Some(&client), &server).to_string();
        let expected_fields = "source=spiffe://cluster.local/ns/shop/sa/client \
            source_workload=shop/client source_addr=10.0.0.1:40000 \
            destination=spiffe://cluster.local/ns/shop/sa/server \
            destination_workload=shop/server original_destination=10.96.0.10:80 \
            target=10.0.0.2:8080 security=mutual_tls authz=remote bytes_from_client=1000 \
            bytes_to_client=7 duration_ms=12 result=ok";
        assert_eq!(
            outbound,
            format!("outbound connection closed {expected_fields}")
        );
        assert_eq!(
            inbound,
            format!("inbound connection closed {expected_fields}")
        );
        // Nothing prints as a Rust debug value.
        assert!(!inbound.contains("Some("), "{inbound}");
    }

    #[test]
    fn addresses_print_as_core_prints_them() {
        let ips = [
            "0.0.0.0",
            "1.2.3.4",
            "9.10.99.100",
            "10.244.1.17",
            "255.255.255.255",
        ];
        let ports = [
            0u16, 1, 9, 10, 99, 100, 999, 1000, 8080, 9999, 10000, 15008, 65535,
        ];
        for ip in ips {
            for port in ports {
                let addr: SocketAddr = format!("{ip}:{port}").parse().expect("addr");
                assert_eq!(AddrText(addr).to_string(), addr.to_string());
                assert_eq!(Field::Addr(addr).to_string(), addr.to_string());
            }
        }
        for v6 in ["[::1]:80", "[fd00::1]:15008", "[2001:db8::7]:65535"] {
            let addr: SocketAddr = v6.parse().expect("addr");
            assert_eq!(AddrText(addr).to_string(), addr.to_string());
        }
        let addr: SocketAddr = "10.0.0.1:80".parse().expect("addr");
        assert_eq!(format!("{:>14}", AddrText(addr)), format!("{addr:>14}"));
    }

    #[test]
    fn absent_values_are_a_dash() {
        let server = id("server");
        let mut entry = line(AccessKind::InboundPlaintext, None, &server);
        entry.source_workload = None;
        entry.security = "none";
        let text = entry.to_string();
        assert!(
            text.starts_with("inbound plaintext connection closed source=- source_workload=- "),
            "{text}"
        );
        assert!(text.contains(" security=none "), "{text}");
    }
}
