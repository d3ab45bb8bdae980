//! `[control]`: where the control socket listens, if anywhere.
//!
//! Owns the path / `"off"` syntax, the default and the rule that a relative
//! path is taken from the config file's directory. It must not create,
//! remove or connect to anything; the node binds what this returns.

use std::path::{Path, PathBuf};

use super::Ctx;
use crate::config::defaults::default_control_socket;
use crate::config::raw::RawControl;
use crate::config::Control;

/// `sun_path` holds 108 bytes on Linux, the terminating NUL included.
const MAX_SOCKET_PATH: usize = 107;

/// The validated `[control]` section; a bad path turns the socket off (the
/// config is refused anyway).
pub(super) fn check(cx: &mut Ctx, config_path: &Path, raw: &RawControl) -> Control {
    let Some(s) = &raw.socket else { return Control { socket: default_control_socket() } };
    let text = s.get_ref().trim();
    if text == "off" {
        return Control { socket: None };
    }
    let problem = if text.is_empty() {
        Some(
            "control.socket is empty: expected a path like \"/run/portgate/control.sock\", or \"off\""
                .to_owned(),
        )
    } else if text.contains('\0') {
        Some("control.socket contains a NUL byte".to_owned())
    } else if text.ends_with('/') {
        Some(format!("control.socket {text:?} names a directory: add a file name, like \"control.sock\""))
    } else {
        None
    };
    if let Some(message) = problem {
        cx.err(0, s.span(), message);
        return Control { socket: None };
    }
    let resolved = resolve(config_path, Path::new(text));
    if resolved.as_os_str().len() > MAX_SOCKET_PATH {
        cx.err(
            0,
            s.span(),
            format!(
                "control.socket {} is {} bytes long; a Unix socket path holds at most {MAX_SOCKET_PATH}: use a shorter path",
                resolved.display(),
                resolved.as_os_str().len()
            ),
        );
        return Control { socket: None };
    }
    Control { socket: Some(resolved) }
}

/// `path` taken from the directory of `config_path` when relative, made
/// absolute so the node's working directory does not matter later.
fn resolve(config_path: &Path, path: &Path) -> PathBuf {
    let dir = config_path.parent().unwrap_or(Path::new(""));
    let joined = dir.join(path);
    std::path::absolute(&joined).unwrap_or(joined)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_start_at_the_config_directory() {
        assert_eq!(
            resolve(Path::new("/etc/pg/p.toml"), Path::new("c.sock")),
            PathBuf::from("/etc/pg/c.sock")
        );
        assert_eq!(
            resolve(Path::new("/etc/pg/p.toml"), Path::new("/run/x.sock")),
            PathBuf::from("/run/x.sock")
        );
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(resolve(Path::new("p.toml"), Path::new("c.sock")), cwd.join("c.sock"));
    }
}
