//! Checks on paths that come from API requests: an incoming migration's unix target must be
//! an absolute, plain path inside the configured directories, and is never reached through a
//! symbolic link.

use std::io;
use std::path::{Path, PathBuf};

use crate::endpoint::Endpoint;

/// Why a target path is refused.
#[derive(Debug, thiserror::Error)]
pub enum PathError {
    #[error("\"{0}\" must be an absolute path without . or .. components")]
    NotPlain(PathBuf),
    #[error("\"{path}\" is outside the allowed directories ({allowed}; see --target-dir)")]
    Outside { path: PathBuf, allowed: String },
    #[error("\"{0}\": its directory cannot be resolved")]
    Unresolvable(PathBuf, #[source] io::Error),
    /// A TCP target escapes `--target-dir` entirely: it could be any listener on the network.
    #[error(
        "\"{0}\": only unix sockets inside the allowed directories ({allowed}; see \
         --target-dir) may be targets, not TCP addresses", allowed = .1
    )]
    NotUnix(Endpoint, String),
}

/// Checks an incoming migration's target: with `allowed` directories, only a unix socket
/// inside them; without, any TCP address or plain absolute unix path.
pub fn check_endpoint(target: &Endpoint, allowed: &[PathBuf]) -> Result<(), PathError> {
    match target.unix_path() {
        Some(path) => check_target(path, allowed),
        None if allowed.is_empty() => Ok(()),
        None => Err(PathError::NotUnix(target.clone(), listed(allowed))),
    }
}

fn listed(dirs: &[PathBuf]) -> String {
    dirs.iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Checks a unix target given through the API against `allowed` (empty: any directory).
pub fn check_target(path: &Path, allowed: &[PathBuf]) -> Result<(), PathError> {
    // Checked on the bytes: `Path::components` quietly drops inner `.` segments.
    use std::os::unix::ffi::OsStrExt;
    let plain = path.is_absolute()
        && path
            .as_os_str()
            .as_bytes()
            .split(|b| *b == b'/')
            .all(|segment| segment != b"." && segment != b"..");
    if !plain {
        return Err(PathError::NotPlain(path.to_owned()));
    }
    if allowed.is_empty() {
        return Ok(());
    }
    // The directory, with every symbolic link resolved, must be inside an allowed one (also
    // resolved): a link inside an allowed directory cannot lead out of it.
    let parent = path.parent().unwrap_or(Path::new("/"));
    let real = parent
        .canonicalize()
        .map_err(|e| PathError::Unresolvable(path.to_owned(), e))?;
    let inside = allowed.iter().any(|dir| {
        dir.canonicalize()
            .map(|dir| real.starts_with(dir))
            .unwrap_or(false)
    });
    if inside {
        Ok(())
    } else {
        Err(PathError::Outside {
            path: path.to_owned(),
            allowed: listed(allowed),
        })
    }
}

/// Refuses to connect through a symbolic link placed where the target socket should be.
pub fn refuse_symlink(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "the target is a symbolic link, which migproxy does not follow",
        )),
        _ => Ok(()),
    }
}

/// Whether some process in this network namespace listens on the unix socket at `path`
/// (`/proc/net/unix`: bound path, state 01 = listening). Asked without connecting, so that a
/// live QEMU's incoming migration is never disturbed.
pub fn listening(path: &Path) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return true; // Cannot tell: assume alive and leave it.
    };
    let wanted = path.as_os_str().to_string_lossy();
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // Num RefCount Protocol Flags Type St Inode Path
        fields.len() >= 8 && fields[5] == "01" && fields[7] == wanted
    })
}

/// Removes a socket file nobody listens on: the leftover of a destination QEMU that failed
/// or was killed after it created its incoming socket (QEMU removes it only on success).
/// Never through a symbolic link, never anything but a socket. True when removed.
pub fn remove_if_stale(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    let is_socket = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket());
    is_socket && !listening(path) && std::fs::remove_file(path).is_ok()
}

/// A socket file someone made, as it was then (device, inode and change time, so that an
/// inode number reused for a new file does not pass for the old one): removed later only
/// if the file at its path is still that one. A migration's id may be reused once it is forgotten,
/// and the new migration's QEMU may by then listen on a new socket at the same path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnSocket {
    path: PathBuf,
    dev: u64,
    ino: u64,
    ctime: (i64, i64),
}

impl OwnSocket {
    /// The socket at `path` now; `None` when there is none (nothing to remove later).
    pub fn at(path: &Path) -> Option<OwnSocket> {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let meta = std::fs::symlink_metadata(path).ok()?;
        meta.file_type().is_socket().then(|| OwnSocket {
            path: path.to_owned(),
            dev: meta.dev(),
            ino: meta.ino(),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the socket if the file at its path is still the one seen by [`OwnSocket::at`]
    /// (never another's, never through a symbolic link). True when removed. Between the
    /// check and the unlink a new socket could in principle take the path; only a new
    /// migration with the same id, created after this one ended, could do so, and that
    /// window is far smaller than the one it replaces (the whole wait for the end).
    pub fn remove(&self) -> bool {
        let still = OwnSocket::at(&self.path).is_some_and(|now| now == *self);
        still && std::fs::remove_file(&self.path).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_own_socket_is_removed_but_not_a_new_one_at_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.incoming.sock");
        assert_eq!(OwnSocket::at(&path), None, "nothing there yet");
        let first = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let own = OwnSocket::at(&path).unwrap();
        assert!(own.remove(), "its own socket");
        assert!(!path.exists());
        drop(first);

        // Another migration's socket at the same path since: left alone.
        let first = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let own = OwnSocket::at(&path).unwrap();
        // Kept linked elsewhere, so that the new socket cannot get the same inode number:
        // the test checks the path's identity, not the file system's allocator.
        std::fs::hard_link(&path, dir.path().join("kept")).unwrap();
        std::fs::remove_file(&path).unwrap();
        drop(first);
        let _second = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert!(!own.remove(), "a new socket at the same path");
        assert!(path.exists());

        // Neither a regular file nor a symbolic link is taken for a socket.
        let file = dir.path().join("file");
        std::fs::write(&file, b"").unwrap();
        assert_eq!(OwnSocket::at(&file), None);
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert_eq!(OwnSocket::at(&link), None);
    }

    #[test]
    fn targets_must_be_plain_and_inside() {
        let dir = tempfile::tempdir().unwrap();
        let allowed = vec![dir.path().to_owned()];
        let inside = dir.path().join("vm.sock");
        check_target(&inside, &allowed).unwrap();
        check_target(&inside, &[]).unwrap();
        for bad in ["relative.sock", "/a/../b.sock", "/a/./b.sock"] {
            assert!(
                matches!(
                    check_target(Path::new(bad), &[]),
                    Err(PathError::NotPlain(_))
                ),
                "{bad}"
            );
        }
        let outside = Path::new("/tmp/elsewhere.sock");
        let error = check_target(outside, &allowed).unwrap_err().to_string();
        assert!(error.contains("outside the allowed directories"), "{error}");
        // A symlinked directory inside the allowed one that points out of it.
        let link = dir.path().join("escape");
        std::os::unix::fs::symlink("/tmp", &link).unwrap();
        assert!(matches!(
            check_target(&link.join("x.sock"), &allowed),
            Err(PathError::Outside { .. })
        ));
        // A symlink in place of the socket is refused at connect time.
        let sock_link = dir.path().join("sock-link");
        std::os::unix::fs::symlink("/tmp/whatever.sock", &sock_link).unwrap();
        assert!(refuse_symlink(&sock_link).is_err());
        assert!(refuse_symlink(&inside).is_ok());
    }

    #[test]
    fn only_a_socket_nobody_listens_on_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("live.sock");
        let listener = std::os::unix::net::UnixListener::bind(&live).unwrap();
        assert!(listening(&live));
        assert!(!remove_if_stale(&live), "a socket someone listens on stays");
        let stale = dir.path().join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        assert!(!listening(&stale));
        assert!(remove_if_stale(&stale));
        assert!(!stale.exists());
        let plain = dir.path().join("plain.sock");
        std::fs::write(&plain, b"not a socket").unwrap();
        assert!(!remove_if_stale(&plain), "only sockets");
        let link = dir.path().join("link.sock");
        std::os::unix::fs::symlink(&stale, &link).unwrap();
        assert!(!remove_if_stale(&link), "never through a link");
        drop(listener);
    }

    #[test]
    fn tcp_targets_only_without_target_dirs() {
        let dir = tempfile::tempdir().unwrap();
        let tcp: Endpoint = "tcp:127.0.0.1:4444".parse().unwrap();
        check_endpoint(&tcp, &[]).unwrap();
        let error = check_endpoint(&tcp, &[dir.path().to_owned()])
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("tcp:127.0.0.1:4444") && error.contains("--target-dir"),
            "{error}"
        );
        let unix = Endpoint::Unix(dir.path().join("vm.sock"));
        check_endpoint(&unix, &[dir.path().to_owned()]).unwrap();
    }
}
