//! A workload's certificate and key, and reading a SPIFFE ID back out of a
//! certificate.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use super::{IdentityError, Result, SpiffeId};

/// A leaf certificate for one workload identity, with its chain and key.
pub struct WorkloadCertificate {
    pub identity: SpiffeId,
    /// Leaf first, then any intermediates; never the root.
    pub chain: Vec<CertificateDer<'static>>,
    /// PKCS#8 private key of the leaf.
    pub key: PrivateKeyDer<'static>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// Serial number as lowercase hex, for logs and the admin endpoint.
    pub serial: String,
    /// When this agent obtained the certificate (local clock). Renewal is
    /// timed from here rather than from `not_before`, because CAs backdate
    /// `not_before` for clock skew, which would otherwise pull the renewal
    /// point earlier — or, for short lifetimes, into the past.
    pub issued_at: SystemTime,
}

impl WorkloadCertificate {
    /// Assembles a certificate from a chain (leaf first) and the leaf's key,
    /// reading identity, validity and serial from the leaf itself so they
    /// cannot disagree with what peers will see. `issued_at` is now.
    pub fn from_parts(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self> {
        let leaf = chain.first().ok_or(IdentityError::EmptyChain)?;
        let parsed = parse(leaf)?;
        let identity = spiffe_id_of(&parsed)?;
        let validity = parsed.validity();
        let not_before = system_time(validity.not_before.timestamp());
        let not_after = system_time(validity.not_after.timestamp());
        let serial = hex(parsed.raw_serial());
        Ok(Self {
            identity,
            chain,
            key,
            not_before,
            not_after,
            serial,
            issued_at: SystemTime::now(),
        })
    }

    /// The certificate and key in the form rustls serves, checked to match.
    /// Loaded with aws-lc-rs explicitly so it does not depend on which
    /// provider (if any) is installed as the process default.
    pub fn certified_key(&self) -> Result<Arc<CertifiedKey>> {
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        let key = CertifiedKey::from_der(self.chain.clone(), self.key.clone_key(), &provider)?;
        Ok(Arc::new(key))
    }

    /// When to start renewing: half way through the usable lifetime.
    /// Renewing at half life leaves the other half to ride out CA outages.
    pub fn refresh_at(&self) -> SystemTime {
        let start = self.issued_at.max(self.not_before);
        let lifetime = self
            .not_after
            .duration_since(start)
            .unwrap_or(Duration::ZERO);
        start + lifetime / 2
    }

    /// True when `now` lies inside the validity window.
    pub fn is_valid_at(&self, now: SystemTime) -> bool {
        self.not_before <= now && now < self.not_after
    }

    /// The leaf certificate.
    pub fn leaf(&self) -> &CertificateDer<'static> {
        // `from_parts` and every issuer in this module build non-empty chains;
        // the public field could still be emptied, so don't index blindly.
        static EMPTY: CertificateDer<'static> = CertificateDer::from_slice(&[]);
        self.chain.first().unwrap_or(&EMPTY)
    }
}

impl fmt::Debug for WorkloadCertificate {
    /// Never prints key material; the chain is summarised by length.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadCertificate")
            .field("identity", &self.identity.to_string())
            .field("serial", &self.serial)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .field("issued_at", &self.issued_at)
            .field("chain_len", &self.chain.len())
            .field("key", &"<redacted>")
            .finish()
    }
}

/// The SPIFFE ID carried by a certificate: its single URI SAN.
///
/// X.509-SVIDs carry exactly one URI SAN; a certificate with none or several
/// is refused rather than guessing which one names the peer.
pub fn identity_from_cert(der: &CertificateDer<'_>) -> Result<SpiffeId> {
    spiffe_id_of(&parse(der)?)
}

fn parse<'a>(der: &'a CertificateDer<'_>) -> Result<X509Certificate<'a>> {
    let (rest, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| IdentityError::ParseCertificate(e.to_string()))?;
    if !rest.is_empty() {
        return Err(IdentityError::ParseCertificate(format!(
            "{} trailing bytes after the certificate",
            rest.len()
        )));
    }
    Ok(cert)
}

fn spiffe_id_of(cert: &X509Certificate<'_>) -> Result<SpiffeId> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| IdentityError::ParseCertificate(format!("subjectAltName: {e}")))?
        .ok_or(IdentityError::NoUriSan)?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [] => Err(IdentityError::NoUriSan),
        [uri] => uri.parse(),
        many => Err(IdentityError::MultipleUriSans(many.len())),
    }
}

/// Converts an X.509 time (seconds since the epoch) to `SystemTime`.
fn system_time(unix_seconds: i64) -> SystemTime {
    match u64::try_from(unix_seconds) {
        Ok(secs) => UNIX_EPOCH + Duration::from_secs(secs),
        // Pre-1970 dates only occur in odd test certificates.
        Err(_) => UNIX_EPOCH - Duration::from_secs(unix_seconds.unsigned_abs()),
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            // Writing to a String cannot fail.
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::LocalCa;

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", "default", sa).unwrap()
    }

    #[test]
    fn identity_round_trips_through_a_certificate() {
        let ca = LocalCa::generate().unwrap();
        let now = SystemTime::now();
        let cert = ca
            .issue_with_validity(&id("web"), now, now + Duration::from_secs(3600))
            .unwrap();
        assert_eq!(identity_from_cert(cert.leaf()).unwrap(), id("web"));
        assert_eq!(cert.identity, id("web"));
        assert_eq!(cert.serial.len() % 2, 0);
        assert!(cert.serial.chars().all(|c| c.is_ascii_hexdigit()));
        cert.certified_key().unwrap();
    }

    #[test]
    fn refresh_at_is_half_the_lifetime() {
        let ca = LocalCa::generate().unwrap();
        let now = SystemTime::now();
        let mut cert = ca
            .issue_with_validity(&id("a"), now, now + Duration::from_secs(100))
            .unwrap();
        // X.509 times have second resolution; compare against the parsed values.
        cert.issued_at = cert.not_before;
        let half = cert.not_after.duration_since(cert.not_before).unwrap() / 2;
        assert_eq!(cert.refresh_at(), cert.not_before + half);
        // A backdated not_before does not pull renewal earlier.
        cert.not_before -= Duration::from_secs(300);
        assert_eq!(cert.refresh_at(), cert.issued_at + half);
    }

    #[test]
    fn debug_redacts_the_key() {
        let ca = LocalCa::generate().unwrap();
        let now = SystemTime::now();
        let cert = ca
            .issue_with_validity(&id("a"), now, now + Duration::from_secs(60))
            .unwrap();
        let dbg = format!("{cert:?}");
        assert!(dbg.contains("<redacted>"), "{dbg}");
        assert!(
            dbg.contains("spiffe://cluster.local/ns/default/sa/a"),
            "{dbg}"
        );
        let key_bytes = format!("{:?}", cert.key.secret_der());
        assert!(!dbg.contains(&key_bytes[1..20]), "{dbg}");
    }

    #[test]
    fn certificate_without_or_with_many_uri_sans_is_rejected() {
        let key = rcgen::KeyPair::generate().unwrap();
        let no_uri = rcgen::CertificateParams::new(vec!["example.com".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        assert!(matches!(
            identity_from_cert(no_uri.der()),
            Err(IdentityError::NoUriSan)
        ));

        let mut params = rcgen::CertificateParams::default();
        for sa in ["a", "b"] {
            let uri = id(sa).to_string().try_into().unwrap();
            params.subject_alt_names.push(rcgen::SanType::URI(uri));
        }
        let two = params.self_signed(&key).unwrap();
        assert!(matches!(
            identity_from_cert(two.der()),
            Err(IdentityError::MultipleUriSans(2))
        ));

        let garbage = CertificateDer::from(vec![0x30, 0x03, 0x01, 0x02]);
        assert!(matches!(
            identity_from_cert(&garbage),
            Err(IdentityError::ParseCertificate(_))
        ));
    }

    #[test]
    fn certified_key_rejects_a_mismatched_key() {
        let ca = LocalCa::generate().unwrap();
        let now = SystemTime::now();
        let validity = now + Duration::from_secs(60);
        let a = ca.issue_with_validity(&id("a"), now, validity).unwrap();
        let mut b = ca.issue_with_validity(&id("b"), now, validity).unwrap();
        b.key = a.key.clone_key();
        assert!(b.certified_key().is_err());
    }
}
