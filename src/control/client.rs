//! The command-line side of the control socket: `portgate reload`.
//!
//! Finds the socket (`--socket`, else the config's `[control] socket`, read
//! alone so that the rest of the file may be invalid, else
//! `$RUNTIME_DIRECTORY/control.sock`, else `/run/portgate/control.sock`),
//! sends one request with hyper's HTTP/1.1 client and turns the answer into
//! a line for stdout or the lines for stderr. The node decides everything
//! else.

use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::UnixStream;

use crate::config::defaults::{default_control_socket, FALLBACK_CONTROL_SOCKET};

/// Longer than the node's own bound on one exchange.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(70);

/// The socket `portgate reload` talks to. `Err` when the config turns the
/// control socket off and nothing else names one.
pub fn find_socket(explicit: Option<&Path>, config: &Path) -> Result<PathBuf, String> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    match socket_in_config(config) {
        Some(s) if s.trim() == "off" => Err(format!(
            "{} sets [control] socket = \"off\": that node serves no control socket (pass --socket PATH, or send SIGHUP)",
            config.display()
        )),
        Some(s) => {
            let dir = config.parent().unwrap_or(Path::new(""));
            Ok(dir.join(s.trim()))
        }
        None => Ok(default_control_socket().unwrap_or_else(|| PathBuf::from(FALLBACK_CONTROL_SOCKET))),
    }
}

#[derive(Deserialize)]
struct OnlyControl {
    control: Option<OnlySocket>,
}

#[derive(Deserialize)]
struct OnlySocket {
    socket: Option<String>,
}

/// `[control] socket` as written, if the file sets it. Every other key is
/// ignored; a file that is not even valid TOML is scanned line by line for
/// the key, so a broken config still reaches the node that reports it.
fn socket_in_config(config: &Path) -> Option<String> {
    let text = std::fs::read_to_string(config).ok()?;
    if let Ok(c) = toml::from_str::<OnlyControl>(&text) {
        return c.control?.socket;
    }
    let mut in_control = false;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_control = line.trim_start_matches('[').trim_end_matches(']').trim() == "control";
        } else if in_control && line.starts_with("socket") {
            if let Ok(t) = toml::from_str::<OnlySocket>(line) {
                return t.socket;
            }
        }
    }
    None
}

/// `POST /reload` on `socket`: `Ok` is the one-line summary of an applied
/// reload, `Err` every line to print on stderr.
pub fn reload(socket: &Path) -> Result<String, Vec<String>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| vec![format!("portgate: cannot start the runtime: {e}")])?;
    let answer = rt.block_on(async {
        tokio::time::timeout(CLIENT_TIMEOUT, post(socket, "/reload"))
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {}s", CLIENT_TIMEOUT.as_secs())))
    });
    let (status, body) =
        answer.map_err(|e| vec![format!("portgate: control socket {}: {e}", socket.display())])?;
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    let names = |key: &str| -> String {
        let list: Vec<&str> =
            json[key].as_array().map(|a| a.iter().filter_map(|v| v.as_str()).collect()).unwrap_or_default();
        if list.is_empty() {
            "-".to_owned()
        } else {
            list.join(",")
        }
    };
    match (status, json["result"].as_str()) {
        (200, Some("success")) => Ok(format!(
            "reloaded: added {}; removed {}; changed {}; revoking {}; hash {}",
            names("added"),
            names("removed"),
            names("changed"),
            json["revoking"].as_u64().unwrap_or(0),
            json["hash"].as_str().unwrap_or("?"),
        )),
        (_, Some("failure")) => {
            let mut errors: Vec<String> = json["errors"]
                .as_array()
                .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
                .unwrap_or_default();
            errors.push(format!(
                "portgate: reload failed; the node keeps serving its previous config ({status})"
            ));
            Err(errors)
        }
        _ => Err(vec![format!(
            "portgate: control socket {}: unexpected answer {status}: {}",
            socket.display(),
            String::from_utf8_lossy(&body).trim()
        )]),
    }
}

async fn post(socket: &Path, path: &str) -> Result<(u16, Bytes), String> {
    let stream = UnixStream::connect(socket).await.map_err(|e| format!("cannot reach the node: {e}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = Request::post(path)
        .header(hyper::header::HOST, "portgate")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_socket_is_read_from_a_broken_config_too() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("p.toml");
        std::fs::write(&cfg, "[listen]\naddress = 7\n[control]\nsocket = \"c.sock\"\n").unwrap();
        assert_eq!(find_socket(None, &cfg).unwrap(), dir.path().join("c.sock"));
        std::fs::write(&cfg, "[listen\nbroken\n[control]\nsocket = \"/x/c.sock\"\n").unwrap();
        assert_eq!(find_socket(None, &cfg).unwrap(), PathBuf::from("/x/c.sock"));
        assert_eq!(find_socket(Some(Path::new("/y.sock")), &cfg).unwrap(), PathBuf::from("/y.sock"));
        std::fs::write(&cfg, "[control]\nsocket = \"off\"\n").unwrap();
        assert!(find_socket(None, &cfg).is_err());
    }
}
