//! Talking HTTP to a node's control socket by hand, as `curl --unix-socket`
//! would, and running the control commands (`portgate reload`, `sessions`,
//! `close`) as an operator does.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use super::{BIN, SOON};

/// Send raw bytes on the control socket and read the answer until the node
/// closes (or `SOON` passes).
pub fn raw(socket: &Path, request: &[u8]) -> String {
    let mut s = UnixStream::connect(socket).expect("connect the control socket");
    s.set_read_timeout(Some(SOON)).unwrap();
    let _ = s.write_all(request);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// `curl --unix-socket SOCKET -X METHOD http://portgate/PATH`: (status, body).
pub fn request(socket: &Path, method: &str, path: &str) -> (u16, String) {
    let out = raw(
        socket,
        format!(
            "{method} {path} HTTP/1.1\r\nHost: portgate\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    );
    let code = out.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (code, body)
}

/// [`request`], answered 200 with JSON: the parsed body.
pub fn request_json(socket: &Path, method: &str, path: &str) -> serde_json::Value {
    let (code, body) = request(socket, method, path);
    assert_eq!(code, 200, "{method} {path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {body}"))
}

/// `portgate ARGS…`, without this shell's `RUNTIME_DIRECTORY`.
pub fn portgate_cmd(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("RUNTIME_DIRECTORY")
        .stdin(Stdio::null())
        .output()
        .expect("run portgate")
}
