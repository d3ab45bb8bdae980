//! The control socket's file: claimed at startup, removed at exit.
//!
//! Rules (SPEC "Control socket"): the socket is created with mode 0600; a
//! stale socket file (no node answers on it) is replaced; a live node on it
//! is an error, so two nodes never share one socket; a path that exists but
//! is not a socket is an error (an ordinary file is never deleted); a
//! missing directory is an error (it is not created).
//!
//! The socket is bound under a temporary name in the same directory,
//! restricted to 0600, then renamed into place, so it is never reachable
//! with looser permissions and a stale file is replaced in one step. This
//! module binds and removes the file only; it serves nothing.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// Why the control socket could not be claimed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SocketError {
    #[error("control socket {0}: a portgate node already answers there; stop it first, or set another [control] socket")]
    InUse(PathBuf),
    #[error("control socket {0}: the path exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("control socket {path}: the directory {dir} does not exist")]
    NoDirectory { path: PathBuf, dir: PathBuf },
    #[error("control socket {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// A bound control socket and the identity of its file, so that exit removes
/// only the file this node created.
pub(crate) struct Claimed {
    pub(crate) listener: UnixListener,
    pub(crate) path: PathBuf,
    id: (u64, u64),
}

/// Bind the control socket at `path` under the rules above.
pub(crate) fn claim(path: &Path) -> Result<Claimed, SocketError> {
    let io_err = |source: io::Error| SocketError::Io { path: path.to_path_buf(), source };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        return Err(SocketError::NoDirectory { path: path.to_path_buf(), dir });
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => return Err(SocketError::InUse(path.to_path_buf())),
            // Nobody listens: a stale file left by a node that died.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
            Err(e) => return Err(io_err(e)),
        },
        Ok(_) => return Err(SocketError::NotASocket(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(e)),
    }
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}", std::process::id()));
    // Our own leftover from an earlier attempt with this pid: only a socket.
    if std::fs::symlink_metadata(&tmp).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(&tmp);
    }
    let listener = UnixListener::bind(&tmp).map_err(io_err)?;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_err(e));
    }
    let m = std::fs::symlink_metadata(path).map_err(io_err)?;
    listener.set_nonblocking(true).map_err(io_err)?;
    Ok(Claimed { listener, path: path.to_path_buf(), id: (m.dev(), m.ino()) })
}

impl Claimed {
    /// The part that removes the file at exit.
    pub(crate) fn split(self) -> (UnixListener, SocketFile) {
        (self.listener, SocketFile { path: self.path, id: self.id })
    }
}

/// The socket file this node created.
pub(crate) struct SocketFile {
    path: PathBuf,
    id: (u64, u64),
}

impl SocketFile {
    /// The file a predecessor created at `path` (upgrade in place): this
    /// node removes it at exit from now on.
    pub(crate) fn adopt(path: &Path) -> io::Result<SocketFile> {
        let m = std::fs::symlink_metadata(path)?;
        Ok(SocketFile { path: path.to_path_buf(), id: (m.dev(), m.ino()) })
    }

    /// Remove the file, unless it is no longer the one this node created
    /// (someone replaced it meanwhile).
    pub(crate) fn remove(&self) {
        if let Ok(m) = std::fs::symlink_metadata(&self.path) {
            if (m.dev(), m.ino()) == self.id {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rules_of_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        let first = claim(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(claim(&path), Err(SocketError::InUse(_))));
        // Stale: the listener is gone, the file stays.
        drop(first);
        let second = claim(&path).unwrap();
        let (_l, file) = second.split();
        file.remove();
        assert!(!path.exists());

        let regular = dir.path().join("regular");
        std::fs::write(&regular, "keep me").unwrap();
        assert!(matches!(claim(&regular), Err(SocketError::NotASocket(_))));
        assert_eq!(std::fs::read_to_string(&regular).unwrap(), "keep me");
        assert!(matches!(claim(&dir.path().join("no/c.sock")), Err(SocketError::NoDirectory { .. })));
    }
}
