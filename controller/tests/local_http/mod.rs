//! Loopback HTTP for the tests that run virtkube's processes: a free port for a process's
//! metrics server, and a plain `GET` of its `/metrics`, `/healthz` or `/readyz`. One copy,
//! included by the test support modules (and the scale bench) with `#[path]`.

#![allow(dead_code)]

/// A loopback port nobody listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// `GET path` on a local port: (status code, whole response); `None` when nothing answers.
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).await.ok()?;
    Some((text.get(9..12)?.parse().ok()?, text))
}
