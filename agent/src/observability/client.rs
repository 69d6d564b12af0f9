//! The CLI's side of the admin API: one HTTP/1.1 request per call over a plain TCP socket
//! (the admin server is local and speaks HTTP/1.1; no need for a client stack).

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use super::ObservabilityError;

const TIMEOUT: Duration = Duration::from_secs(5);

/// Sends `method path` to the agent and returns the body of a 2xx answer.
pub fn request(addr: SocketAddr, method: &str, path: &str) -> Result<String, ObservabilityError> {
    let unreachable = |source| ObservabilityError::Unreachable { addr, source };
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT).map_err(unreachable)?;
    stream
        .set_read_timeout(Some(TIMEOUT))
        .map_err(unreachable)?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .map_err(unreachable)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).map_err(unreachable)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or(ObservabilityError::BadResponse { addr })?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or(ObservabilityError::BadResponse { addr })?;
    if !(200..300).contains(&status) {
        return Err(ObservabilityError::Status {
            path: path.to_owned(),
            status,
            body: body.trim().to_owned(),
        });
    }
    Ok(body.to_owned())
}

pub fn get(addr: SocketAddr, path: &str) -> Result<String, ObservabilityError> {
    request(addr, "GET", path)
}

pub fn get_json(addr: SocketAddr, path: &str) -> Result<serde_json::Value, ObservabilityError> {
    Ok(serde_json::from_str(&get(addr, path)?)?)
}
