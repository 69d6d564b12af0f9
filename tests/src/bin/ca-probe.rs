//! `ambit-ca-probe`: asks a CA service (`ambit ca`, istiod) for one identity, exactly as the
//! agent's `RemoteCa` does, and prints the outcome. `cargo xtask kind` uses it with a node
//! agent's pod-bound token to check that the CA refuses identities of another node.
//!
//!   ambit-ca-probe --address https://127.0.0.1:15012 --tls-server-name ambit-ca.ambit-system.svc \
//!     --token-file TOKEN --trust-file ROOT.pem --identity spiffe://cluster.local/ns/a/sa/b
//!
//! Exit status: 0 = issued (prints the identity and serial), 1 = refused or failed (prints
//! the gRPC code and the CA's reason), 2 = usage.

use std::process::ExitCode;
use std::time::Duration;

use ambit_agent::identity::{
    CertificateAuthority as _, IdentityError, RemoteCa, RemoteCaConfig, SpiffeId,
    install_crypto_provider,
};

struct Args {
    address: String,
    tls_server_name: Option<String>,
    token_file: String,
    trust_file: String,
    identity: SpiffeId,
}

fn parse_args() -> Result<Args, String> {
    let mut address = None;
    let mut tls_server_name = None;
    let mut token_file = None;
    let mut trust_file = None;
    let mut identity = None;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--address" => address = Some(value),
            "--tls-server-name" => tls_server_name = Some(value),
            "--token-file" => token_file = Some(value),
            "--trust-file" => trust_file = Some(value),
            "--identity" => {
                identity = Some(
                    value
                        .parse::<SpiffeId>()
                        .map_err(|e| format!("--identity {value:?}: {e}"))?,
                )
            }
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(Args {
        address: address.ok_or("--address is required")?,
        tls_server_name,
        token_file: token_file.ok_or("--token-file is required")?,
        trust_file: trust_file.ok_or("--trust-file is required")?,
        identity: identity.ok_or("--identity is required")?,
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("ambit-ca-probe: {e}");
            return ExitCode::from(2);
        }
    };
    install_crypto_provider();
    let mut config = RemoteCaConfig::new(args.address, args.token_file, args.trust_file);
    config.tls_server_name = args.tls_server_name;
    let ca = match RemoteCa::new(config) {
        Ok(ca) => ca,
        Err(e) => {
            eprintln!("ambit-ca-probe: {e}");
            return ExitCode::from(2);
        }
    };
    match ca.issue(&args.identity, Duration::from_secs(3600)).await {
        Ok(cert) => {
            println!("issued {} serial {}", cert.identity, cert.serial);
            ExitCode::SUCCESS
        }
        Err(IdentityError::CaRefused {
            code,
            reason,
            message,
        }) => {
            println!(
                "refused code={code:?} reason={} message={message}",
                reason.as_deref().unwrap_or("-")
            );
            ExitCode::from(1)
        }
        Err(e) => {
            println!("failed {e}");
            ExitCode::from(1)
        }
    }
}
