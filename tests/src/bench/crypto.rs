//! The public-key work of one full HBONE handshake (mutual TLS 1.3, P-256 certificates,
//! X25519 key shares), timed alone: each end makes a key share and derives the shared
//! secret, signs its CertificateVerify and verifies the peer's. The agents also check the
//! peer's chain (a known chain skips the CA signature), hash the transcript and run the
//! TCP and HTTP/2 handshakes; this is the part no implementation of the protocol avoids,
//! and the bench sets it beside the full-handshake aim.

use std::time::{Duration, Instant, SystemTime};

use ambit_agent::identity::{LocalCa, SpiffeId};
use anyhow::Context as _;
use rustls::crypto::aws_lc_rs;
use rustls::pki_types::SignatureVerificationAlgorithm;
use rustls::sign::Signer;
use rustls::{NamedGroup, SignatureScheme};

/// Batches timed; the fastest is reported (the least disturbed by the rest of the machine).
const BATCHES: usize = 5;

/// One end's certificate key: its CertificateVerify signer and the raw public key its peer
/// verifies with.
struct End {
    signer: Box<dyn Signer>,
    public_key: Vec<u8>,
}

impl End {
    fn issue(ca: &LocalCa, service_account: &str) -> anyhow::Result<Self> {
        let id = SpiffeId::new("cluster.local", "bench", service_account)?;
        let now = SystemTime::now();
        let cert = ca.issue_with_validity(&id, now, now + Duration::from_secs(3600))?;
        let signer = cert
            .certified_key()?
            .key
            .choose_scheme(&[SignatureScheme::ECDSA_NISTP256_SHA256])
            .context("the workload key cannot sign ECDSA P-256 SHA-256")?;
        let public_key = rcgen::KeyPair::try_from(&cert.key)?
            .public_key_raw()
            .to_vec();
        Ok(Self { signer, public_key })
    }
}

/// Microseconds of one full handshake's key exchanges, signatures and verifications, both
/// ends together on one thread: the fastest of [`BATCHES`] batches of `per_batch`.
pub fn handshake_us(per_batch: usize) -> anyhow::Result<f64> {
    let provider = aws_lc_rs::default_provider();
    let x25519 = *provider
        .kx_groups
        .iter()
        .find(|g| g.name() == NamedGroup::X25519)
        .context("no X25519 in the provider")?;
    let verifier: &dyn SignatureVerificationAlgorithm = *provider
        .signature_verification_algorithms
        .mapping
        .iter()
        .find(|(scheme, _)| *scheme == SignatureScheme::ECDSA_NISTP256_SHA256)
        .and_then(|(_, algs)| algs.first())
        .context("no ECDSA P-256 verifier in the provider")?;
    let ca = LocalCa::generate()?;
    let (client, server) = (End::issue(&ca, "client")?, End::issue(&ca, "server")?);

    // What a TLS 1.3 CertificateVerify signs: 64 spaces, the context string, a zero byte and
    // the transcript hash (varied per handshake here).
    let mut message = vec![0x20u8; 64];
    message.extend_from_slice(b"TLS 1.3, server CertificateVerify\0");
    let hash_at = message.len();
    message.resize(hash_at + 32, 0);

    let mut best = f64::INFINITY;
    let mut handshakes: u32 = 0;
    for _ in 0..BATCHES {
        let started = Instant::now();
        for _ in 0..per_batch {
            handshakes = handshakes.wrapping_add(1);
            message[hash_at..hash_at + 4].copy_from_slice(&handshakes.to_le_bytes());
            let client_share = x25519.start()?;
            let server_share = x25519.start()?;
            let server_public = server_share.pub_key().to_vec();
            let at_server = server_share.complete(client_share.pub_key())?;
            let at_client = client_share.complete(&server_public)?;
            anyhow::ensure!(
                at_server.secret_bytes() == at_client.secret_bytes(),
                "the two ends derived different secrets"
            );
            // Each end signs; its peer verifies with the signer's public key.
            for signing in [&server, &client] {
                let signature = signing.signer.sign(&message)?;
                verifier
                    .verify_signature(&signing.public_key, &message, &signature)
                    .map_err(|_| anyhow::anyhow!("a CertificateVerify signature did not verify"))?;
            }
        }
        let per_handshake = started.elapsed().as_secs_f64() * 1e6 / per_batch.max(1) as f64;
        best = best.min(per_handshake);
    }
    Ok(best)
}
