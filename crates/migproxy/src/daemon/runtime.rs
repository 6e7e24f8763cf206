//! The runtime directory, where the sockets QEMU connects to (and, with QMP, the socket the
//! destination QEMU listens on) are created. Whoever can write there can put a socket of
//! theirs where a migration stream is expected, so the directory must be the daemon's own.
//!
//! It is opened once at start, without following a symbolic link, and checked: owned by the
//! daemon's user, and writable by no one else — unless the operator names QEMU's group
//! (`--runtime-dir-group`), which may then create sockets there (mode 1770: the sticky bit
//! keeps it from removing or replacing the daemon's). Before every use it is checked again,
//! and must still be the directory opened at start: one removed and recreated, or a path
//! that now leads elsewhere, is refused.

use std::fs::File;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::unistd::{Gid, Group};

/// Why the runtime directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeDirError {
    #[error("runtime dir {}: cannot create it", .path.display())]
    Create {
        path: PathBuf,
        #[source]
        error: io::Error,
    },
    #[error("runtime dir {}: cannot open it", .path.display())]
    Open {
        path: PathBuf,
        #[source]
        error: io::Error,
    },
    #[error(
        "runtime dir {} is a symbolic link: give the directory itself (a link can be \
         repointed)", .0.display()
    )]
    Symlink(PathBuf),
    #[error("runtime dir {}: cannot check it", .path.display())]
    Stat {
        path: PathBuf,
        #[source]
        error: io::Error,
    },
    #[error(
        "runtime dir {} belongs to uid {owner}, not to the daemon's user (uid {me})",
        .path.display()
    )]
    Owner { path: PathBuf, owner: u32, me: u32 },
    #[error(
        "runtime dir {} is writable by its group or by others (mode {mode:o}): make it 0700, \
         or name the group that may create sockets there with --runtime-dir-group (mode 1770)",
        .path.display()
    )]
    Writable { path: PathBuf, mode: u32 },
    #[error(
        "runtime dir {} must have group {group} (gid {gid}) and mode 1770 for \
         --runtime-dir-group {group}; it has gid {actual} and mode {mode:o}", .path.display()
    )]
    Shared {
        path: PathBuf,
        group: String,
        gid: u32,
        actual: u32,
        mode: u32,
    },
    #[error("--runtime-dir-group {0}: no such group")]
    NoGroup(String),
    #[error(
        "runtime dir {} is no longer the directory the daemon opened at start (removed, \
         replaced or reached through a changed path): restart the daemon", .0.display()
    )]
    Replaced(PathBuf),
}

/// The group allowed to create sockets in the runtime directory.
#[derive(Debug, Clone)]
struct SharedWith {
    name: String,
    gid: Gid,
}

/// The runtime directory, opened and checked.
#[derive(Debug)]
pub struct RuntimeDir {
    path: PathBuf,
    /// Held open so that the directory's inode cannot be reused by another while the daemon
    /// runs: (device, inode) then identify it for good.
    handle: File,
    identity: (u64, u64),
    group: Option<SharedWith>,
}

impl RuntimeDir {
    /// Opens `path` (creating it when missing: 0700, or 1770 with `group`'s ownership) and
    /// checks it.
    pub fn open(path: &Path, group: Option<&str>) -> Result<RuntimeDir, RuntimeDirError> {
        let group = group.map(shared_with).transpose()?;
        let created = create(path)?;
        let handle = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
            .open(path)
            .map_err(|error| {
                // A link fails with ELOOP or, with O_DIRECTORY, ENOTDIR: say which it was.
                if std::fs::symlink_metadata(path).is_ok_and(|m| m.is_symlink()) {
                    RuntimeDirError::Symlink(path.to_owned())
                } else {
                    RuntimeDirError::Open {
                        path: path.to_owned(),
                        error,
                    }
                }
            })?;
        let stat = |handle: &File| {
            handle.metadata().map_err(|error| RuntimeDirError::Stat {
                path: path.to_owned(),
                error,
            })
        };
        // Shared with the group when this daemon made it, or when it is this daemon's and
        // private (as systemd's RuntimeDirectory= makes it, 0700): nobody else could have put
        // anything there. A directory already writable by others is refused below.
        let private_and_mine = |meta: &std::fs::Metadata| {
            meta.uid() == nix::unistd::geteuid().as_raw() && meta.mode() & 0o022 == 0
        };
        if let Some(group) = &group
            && (created || private_and_mine(&stat(&handle)?))
        {
            share(&handle, group.gid).map_err(|error| RuntimeDirError::Create {
                path: path.to_owned(),
                error,
            })?;
        }
        let meta = stat(&handle)?;
        let dir = RuntimeDir {
            path: path.to_owned(),
            handle,
            identity: (meta.dev(), meta.ino()),
            group,
        };
        dir.check_mode(&meta)?;
        Ok(dir)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Checks again, before a socket is created or handed out there: still the directory
    /// opened at start, reached by its path without a symbolic link, and still private.
    pub fn check(&self) -> Result<(), RuntimeDirError> {
        let stat = |error| RuntimeDirError::Stat {
            path: self.path.clone(),
            error,
        };
        let here = std::fs::symlink_metadata(&self.path)
            .map_err(|_| RuntimeDirError::Replaced(self.path.clone()))?;
        if !here.is_dir() || (here.dev(), here.ino()) != self.identity {
            return Err(RuntimeDirError::Replaced(self.path.clone()));
        }
        self.check_mode(&self.handle.metadata().map_err(stat)?)
    }

    fn check_mode(&self, meta: &std::fs::Metadata) -> Result<(), RuntimeDirError> {
        let me = nix::unistd::geteuid().as_raw();
        if meta.uid() != me {
            return Err(RuntimeDirError::Owner {
                path: self.path.clone(),
                owner: meta.uid(),
                me,
            });
        }
        let mode = meta.mode() & 0o7777;
        match &self.group {
            None if mode & 0o022 != 0 => Err(RuntimeDirError::Writable {
                path: self.path.clone(),
                mode,
            }),
            Some(group) if meta.gid() != group.gid.as_raw() || mode & 0o1777 != 0o1770 => {
                Err(RuntimeDirError::Shared {
                    path: self.path.clone(),
                    group: group.name.clone(),
                    gid: group.gid.as_raw(),
                    actual: meta.gid(),
                    mode,
                })
            }
            _ => Ok(()),
        }
    }

    /// Removes the sockets a daemon killed without cleaning up left here: only sockets
    /// (`*.sock`, not followed through a link) that belong to the daemon's user and on which
    /// nobody listens any more — another daemon's live API socket answers and is kept.
    /// Returns the paths removed.
    pub async fn remove_stale_sockets(&self) -> Result<Vec<PathBuf>, RuntimeDirError> {
        self.check()?;
        let entries = std::fs::read_dir(&self.path).map_err(|error| RuntimeDirError::Stat {
            path: self.path.clone(),
            error,
        })?;
        let me = nix::unistd::geteuid().as_raw();
        let mut removed = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            let ours = std::fs::symlink_metadata(&path)
                .is_ok_and(|m| m.file_type().is_socket() && m.uid() == me);
            let named = path.extension().is_some_and(|e| e == "sock");
            if ours && named && nobody_listens(&path).await && std::fs::remove_file(&path).is_ok() {
                removed.push(path);
            }
        }
        Ok(removed)
    }
}

/// Creates `path` 0700 (and its missing parents) if it does not exist; true if it did not.
fn create(path: &Path) -> Result<bool, RuntimeDirError> {
    if std::fs::symlink_metadata(path).is_ok() {
        return Ok(false);
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|error| RuntimeDirError::Create {
            path: path.to_owned(),
            error,
        })?;
    Ok(true)
}

fn shared_with(name: &str) -> Result<SharedWith, RuntimeDirError> {
    match Group::from_name(name) {
        Ok(Some(group)) => Ok(SharedWith {
            name: name.to_owned(),
            gid: group.gid,
        }),
        _ => Err(RuntimeDirError::NoGroup(name.to_owned())),
    }
}

/// Gives a directory the daemon just created to `gid`, mode 1770 (on the handle: the path
/// is not trusted).
fn share(dir: &File, gid: Gid) -> io::Result<()> {
    std::os::unix::fs::fchown(dir, None, Some(gid.as_raw()))?;
    dir.set_permissions(std::fs::Permissions::from_mode(0o1770))
}

/// A socket nobody listens on refuses a connection; one that answers, or does not answer in
/// time (its backlog full), is alive.
async fn nobody_listens(path: &Path) -> bool {
    let attempt = tokio::time::timeout(
        Duration::from_secs(1),
        tokio::net::UnixStream::connect(path),
    )
    .await;
    matches!(attempt, Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn private_directories_pass_and_others_are_refused_naming_why() {
        let top = tempfile::tempdir().unwrap();
        let dir = top.path().join("run");
        let opened = RuntimeDir::open(&dir, None).unwrap();
        assert_eq!(
            std::fs::metadata(&dir).unwrap().mode() & 0o7777,
            0o700,
            "created 0700"
        );
        opened.check().unwrap();

        for bad in [0o770, 0o777, 0o1770] {
            mode(&dir, bad);
            let error = RuntimeDir::open(&dir, None).unwrap_err().to_string();
            assert!(
                error.contains("is writable by its group or by others")
                    && error.contains("--runtime-dir-group"),
                "{bad:o}: {error}"
            );
            assert!(matches!(
                opened.check(),
                Err(RuntimeDirError::Writable { .. })
            ));
        }
        mode(&dir, 0o700);

        let link = top.path().join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        let error = RuntimeDir::open(&link, None).unwrap_err();
        assert!(matches!(error, RuntimeDirError::Symlink(_)), "{error}");
    }

    #[test]
    fn a_directory_replaced_or_reached_through_a_link_is_refused() {
        let top = tempfile::tempdir().unwrap();
        let dir = top.path().join("run");
        let opened = RuntimeDir::open(&dir, None).unwrap();
        std::fs::rename(&dir, top.path().join("moved")).unwrap();
        std::fs::create_dir(&dir).unwrap();
        assert!(matches!(opened.check(), Err(RuntimeDirError::Replaced(_))));
        std::fs::remove_dir(&dir).unwrap();
        std::os::unix::fs::symlink(top.path().join("moved"), &dir).unwrap();
        assert!(matches!(opened.check(), Err(RuntimeDirError::Replaced(_))));
    }

    #[test]
    fn a_named_group_gets_a_sticky_1770_directory() {
        let top = tempfile::tempdir().unwrap();
        let dir = top.path().join("shared");
        let gid = nix::unistd::getegid();
        let name = Group::from_gid(gid).unwrap().unwrap().name;
        let opened = RuntimeDir::open(&dir, Some(&name)).unwrap();
        let meta = std::fs::metadata(&dir).unwrap();
        assert_eq!((meta.mode() & 0o7777, meta.gid()), (0o1770, gid.as_raw()));
        opened.check().unwrap();
        // A private directory of its own (systemd's RuntimeDirectory=, 0700) is shared too.
        mode(&dir, 0o700);
        RuntimeDir::open(&dir, Some(&name)).unwrap();
        let meta = std::fs::metadata(&dir).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o1770, "shared at start");
        // Without the sticky bit, QEMU's group could replace the daemon's sockets.
        mode(&dir, 0o770);
        let error = RuntimeDir::open(&dir, Some(&name)).unwrap_err().to_string();
        assert!(
            error.contains("mode 1770 for --runtime-dir-group"),
            "{error}"
        );
        let error = RuntimeDir::open(&dir, Some("no-such-group-here"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            error,
            "--runtime-dir-group no-such-group-here: no such group"
        );
    }
}
