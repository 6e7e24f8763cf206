//! Postcopy recovery without QMP, on the destination: QEMU connected the moment it listens
//! again.
//!
//! Without QMP a person, or libvirt, recovers: `migrate-recover URI` on the destination QEMU,
//! then `migrate URI resume=true` on the source QEMU. libvirt 9.0 checks its destination
//! right after the source resumed and fails the job unless the destination QEMU has left
//! `postcopy-paused` by then. Connected directly, the two QEMUs get there together; through
//! two daemons the resumed main channel reached the destination QEMU a few milliseconds
//! later (one data connection, its TLS handshake), and lost that race on a loaded machine.
//!
//! So while a pause is open, the destination daemon watches QEMU's socket (woken by inotify
//! on its directory, [`POLL`] at the latest) and, once `migrate-recover` has bound it anew,
//! connects and keeps the connection for the resumed epoch's main channel: QEMU enters
//! `postcopy-recover` as soon as it is told to recover, before the source has even
//! resumed, and waits there for the bytes (QEMU has no deadline on them).
//!
//! Only a socket bound anew counts. QEMU (6.1 on) keeps its first listener open until the
//! migration ends and takes a connection on it while paused as a recovery: connecting there
//! would put QEMU in `postcopy-recover` before anyone asked, and libvirt's resume, which
//! first checks that QEMU is `postcopy-paused`, would refuse. `migrate-recover` unlinks the
//! path and binds it again: a new inode. A TCP target has no such mark; it is not watched,
//! and its resumed main channel connects when it arrives, as before.
//!
//! ```text
//!  pause n ──► round n: watcher ── stat: the socket QEMU listened on before
//!                 (looks again when inotify wakes it, or after 10 ms; bound but not yet
//!                  listening: tried every 0.1 ms for 50 ms, then once at each look)
//!                 migrate-recover ─► a new socket at the path ─► connected, held ─┐
//!  resumed epoch's main channel ─► claim: ends round n, takes the held connection ◄┘
//!                                  (none held: connects itself, under the same lock)
//! ```
//!
//! One lock serves the watcher and the channel, and the channel ends the round before it
//! takes the lock: QEMU never gets two connections for one main channel. A held connection
//! nobody claimed is closed when the next pause begins or the migration ends; QEMU sees it
//! close and pauses again, as it would after any broken recovery.

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::{Mutex, MutexGuard, watch};

use crate::transport::Stream;

/// How often a watcher looks at QEMU's socket when no change of its directory woke it
/// (inotify wakes it at once; this bounds a missed or refused watch).
pub const POLL: Duration = Duration::from_millis(10);

/// How often a socket bound anew that refuses connections is tried again: QEMU binds,
/// then listens, and a connect between the two is refused. A thread's sleep, not tokio's
/// timer, whose millisecond ticks came late by several on a loaded 2-core machine.
pub const LISTEN_RETRY: Duration = Duration::from_micros(100);

/// How long a connection made early waits for the resumed main channel before it is
/// closed: QEMU, connected, is in `postcopy-recover` and refuses another `migrate-recover`,
/// so a resume that never comes (the source's failed on its side alone) must not hold it
/// there for good. Closed, QEMU pauses again and a new recovery can start.
pub const EARLY_HOLD: Duration = Duration::from_secs(30);

/// How long a socket bound anew is tried every [`LISTEN_RETRY`] before it counts as one
/// that listens late (a loaded QEMU between bind and listen) or never (a stale file): then
/// it is tried once at each look, woken or after [`POLL`].
pub const LISTEN_GRACE: Duration = Duration::from_millis(50);

/// Connects to the unix socket at `path` — the one `expected` names, when given — trying
/// again while it refuses, up to `grace` (on a blocking thread: the retries are finer than
/// tokio's timer). Each try is a non-blocking connect: a full listen queue answers at once
/// too (as not yet).
pub async fn connect_listening(
    path: &Path,
    expected: Option<SocketId>,
    grace: Duration,
) -> Option<Stream> {
    let path = path.to_path_buf();
    let connected = tokio::task::spawn_blocking(move || {
        let start = Instant::now();
        loop {
            match connect_now(&path, expected) {
                Err(Errno::ECONNREFUSED) if start.elapsed() < grace => {
                    std::thread::sleep(LISTEN_RETRY);
                }
                other => return other.ok(),
            }
        }
    });
    let stream = std::os::unix::net::UnixStream::from(connected.await.ok()??);
    tokio::net::UnixStream::from_std(stream)
        .ok()
        .map(Stream::Unix)
}

/// One non-blocking connect to the unix socket at `path`. The file is opened first without
/// following a symbolic link (`O_PATH | O_NOFOLLOW`), checked (a socket, the one `expected`
/// names), and connected through that very open file (`/proc/self/fd/N`): whoever can write
/// the directory cannot swap a link or another socket in between the look and the connect.
fn connect_now(path: &Path, expected: Option<SocketId>) -> nix::Result<OwnedFd> {
    use nix::fcntl::{OFlag, open};
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket};
    use nix::sys::stat::{Mode, SFlag, fstat};
    let flags = OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let file = open(path, flags, Mode::empty())?;
    // Owned: closed on every return.
    #[allow(unsafe_code)]
    // SAFETY: `open` just returned this descriptor, and nothing else owns it.
    let file = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(file) };
    let stat = fstat(file.as_raw_fd())?;
    if SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT != SFlag::S_IFSOCK {
        return Err(Errno::ENOTSOCK);
    }
    let found = SocketId {
        dev: stat.st_dev,
        ino: stat.st_ino,
        ctime: (stat.st_ctime, stat.st_ctime_nsec),
    };
    if expected.is_some_and(|expected| expected != found) {
        return Err(Errno::ESTALE);
    }
    let flags = SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC;
    let fd = socket(AddressFamily::Unix, SockType::Stream, flags, None)?;
    let pinned = format!("/proc/self/fd/{}", file.as_raw_fd());
    connect(fd.as_raw_fd(), &UnixAddr::new(pinned.as_str())?)?;
    Ok(fd)
}

/// Wakes a watcher when an entry is created or moved into the directory of QEMU's socket:
/// libvirt's source resumes a few milliseconds after `migrate-recover`, and its destination
/// checks QEMU right after, so even a 10 ms poll lost the race now and then.
#[derive(Debug)]
pub struct DirChanges {
    inotify: Option<AsyncFd<Watch>>,
}

/// The inotify instance, owned by the [`AsyncFd`] that polls it: its fd lives exactly as
/// long as the registration.
#[derive(Debug)]
struct Watch(Inotify);

impl AsRawFd for Watch {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

impl DirChanges {
    /// Watches the directory holding `path`; without inotify (no directory, limits) only
    /// the [`POLL`] wakes.
    pub fn new(path: &Path) -> DirChanges {
        let watch = || -> nix::Result<AsyncFd<Watch>> {
            let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
            let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
            let flags = AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO;
            inotify.add_watch(dir.unwrap_or(Path::new(".")), flags)?;
            #[allow(unsafe_code)]
            // SAFETY: the AsyncFd owns the Watch, so the fd stays open, and is not
            // reused, for as long as it is registered.
            let fd = unsafe { AsyncFd::register_with_interest(Watch(inotify), Interest::READABLE) };
            fd.map_err(|_| nix::Error::EINVAL)
        };
        DirChanges {
            inotify: watch().ok(),
        }
    }

    /// Resolves at the next change of the directory (true), or after [`POLL`] (false).
    pub async fn next(&mut self) -> bool {
        let Some(fd) = &self.inotify else {
            tokio::time::sleep(POLL).await;
            return false;
        };
        tokio::select! {
            ready = fd.readable() => {
                let Ok(mut ready) = ready else { return false };
                // Drained: which entry changed does not matter, the caller looks.
                let changed = fd.get_ref().0.read_events().is_ok_and(|events| !events.is_empty());
                ready.clear_ready();
                changed
            }
            () = tokio::time::sleep(POLL) => false,
        }
    }
}

/// Which socket is bound at `path`, if one is: device, inode and change time, since a
/// file system may give a freed inode number to the next file at once.
pub fn socket_at(path: &Path) -> Option<SocketId> {
    let meta = std::fs::symlink_metadata(path).ok()?;
    let id = SocketId {
        dev: meta.dev(),
        ino: meta.ino(),
        ctime: (meta.ctime(), meta.ctime_nsec()),
    };
    meta.file_type().is_socket().then_some(id)
}

/// One socket file: another bind at the same path is another id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketId {
    dev: u64,
    ino: u64,
    ctime: (i64, i64),
}

/// The connection made early, and which pause it serves.
#[derive(Debug)]
pub struct EarlyLeg {
    /// The current round: one per pause, ended by the channel that claims the slot.
    round: watch::Sender<u64>,
    /// The connection, with the round it was made for.
    held: Mutex<Option<(u64, Stream)>>,
}

impl Default for EarlyLeg {
    fn default() -> EarlyLeg {
        EarlyLeg {
            round: watch::channel(0).0,
            held: Mutex::new(None),
        }
    }
}

/// What a watcher's try came to.
#[derive(Debug, PartialEq, Eq)]
pub enum Tried {
    /// Connected: the connection waits for the main channel.
    Held,
    /// QEMU does not listen yet.
    NotYet,
    /// The round is over (claimed, or a newer pause): the watcher stops.
    Over,
}

impl EarlyLeg {
    /// A new pause: returns its round, for the watcher to serve.
    pub fn begin(&self) -> u64 {
        let mut round = 0;
        self.round.send_modify(|r| {
            *r += 1;
            round = *r;
        });
        round
    }

    /// The watcher's try for `round`: runs `connect` under the lock unless the round is
    /// over or its connection is made already. A connection of an earlier round nobody
    /// claimed is closed first.
    pub async fn try_connect<F>(&self, round: u64, connect: F) -> Tried
    where
        F: AsyncFnOnce() -> Option<Stream>,
    {
        let mut held = self.held.lock().await;
        if *self.round.borrow() != round {
            return Tried::Over;
        }
        match held.as_ref() {
            Some((of, _)) if *of == round => return Tried::Held,
            Some(_) => *held = None,
            None => {}
        }
        match connect().await {
            Some(stream) => {
                *held = Some((round, stream));
                Tried::Held
            }
            None => Tried::NotYet,
        }
    }

    /// Resolves once `round` is over.
    pub async fn round_over(&self, round: u64) {
        let mut watch = self.round.subscribe();
        let _ = watch.wait_for(|r| *r != round).await;
    }

    /// Closes the connection made for `round`, if nobody took it.
    pub async fn close(&self, round: u64) {
        let mut held = self.held.lock().await;
        if held.as_ref().is_some_and(|(of, _)| *of == round) {
            *held = None;
        }
    }

    /// The resumed epoch's main channel: ends the current round (its watcher stops trying),
    /// then returns that round's connection, if one was made, with the lock to hold while
    /// connecting itself.
    pub async fn claim(&self) -> Claim<'_> {
        let mut ended = 0;
        self.round.send_modify(|r| {
            ended = *r;
            *r += 1;
        });
        let mut guard = self.held.lock().await;
        let held = match guard.take() {
            Some((of, stream)) if of == ended => Some(stream),
            // An older round's connection: QEMU listens anew since; it is closed.
            _ => None,
        };
        Claim {
            held,
            _guard: guard,
        }
    }
}

/// A claim on the slot: while it lives, no watcher connects.
#[derive(Debug)]
pub struct Claim<'a> {
    pub held: Option<Stream>,
    _guard: MutexGuard<'a, Option<(u64, Stream)>>,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio::net::{UnixListener, UnixStream};

    async fn connect(path: &Path) -> Option<Stream> {
        UnixStream::connect(path).await.ok().map(Stream::Unix)
    }

    #[tokio::test]
    async fn a_watcher_connects_once_qemu_listens_and_the_channel_takes_that_connection() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.sock");
        let early = EarlyLeg::default();
        let round = early.begin();
        assert_eq!(
            early.try_connect(round, || connect(&path)).await,
            Tried::NotYet
        );
        let listener = UnixListener::bind(&path).unwrap();
        assert_eq!(
            early.try_connect(round, || connect(&path)).await,
            Tried::Held
        );
        // Held: no second connection.
        assert_eq!(
            early.try_connect(round, || connect(&path)).await,
            Tried::Held
        );
        let (_accepted, _) = listener.accept().await.unwrap();
        let claim = early.claim().await;
        assert!(claim.held.is_some());
        drop(claim);
        assert_eq!(
            early.try_connect(round, || connect(&path)).await,
            Tried::Over
        );
        let pending = tokio::time::timeout(Duration::from_millis(50), listener.accept()).await;
        assert!(pending.is_err(), "QEMU got a second connection");
    }

    #[tokio::test]
    async fn a_socket_that_refuses_is_tried_until_it_listens_or_the_grace_ends() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.sock");
        let socket = bound_unlistening(&path);
        let start = Instant::now();
        assert!(
            connect_listening(&path, None, Duration::from_millis(20))
                .await
                .is_none()
        );
        assert!(
            start.elapsed() >= Duration::from_millis(20),
            "tried for the grace"
        );
        let listen = async {
            tokio::time::sleep(Duration::from_millis(5)).await;
            nix::sys::socket::listen(&socket, nix::sys::socket::Backlog::new(1).unwrap())
        };
        let (connected, listened) =
            tokio::join!(connect_listening(&path, None, LISTEN_GRACE), listen);
        listened.unwrap();
        assert!(connected.is_some(), "connected once QEMU listened");
        assert!(
            connect_listening(&dir.path().join("none"), None, LISTEN_GRACE)
                .await
                .is_none()
        );
    }

    #[tokio::test]
    async fn only_the_socket_looked_at_is_connected_not_a_link_or_another_swapped_in() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.sock");
        let qemu = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let looked = socket_at(&path).unwrap();
        // Someone who can write the directory swaps a link to their own socket in.
        let theirs = dir.path().join("theirs.sock");
        let intruder = std::os::unix::net::UnixListener::bind(&theirs).unwrap();
        intruder.set_nonblocking(true).unwrap();
        std::fs::rename(&path, dir.path().join("moved.sock")).unwrap();
        std::os::unix::fs::symlink(&theirs, &path).unwrap();
        assert_eq!(
            connect_now(&path, Some(looked)).unwrap_err(),
            Errno::ENOTSOCK
        );
        assert_eq!(
            connect_now(&path, None).unwrap_err(),
            Errno::ENOTSOCK,
            "a link"
        );
        // Or another socket, bound at the path itself.
        std::fs::remove_file(&path).unwrap();
        let _other = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert_eq!(connect_now(&path, Some(looked)).unwrap_err(), Errno::ESTALE);
        assert!(intruder.accept().is_err(), "the intruder got nothing");
        // QEMU's socket back at the path (moved: its change time moved too, so it is looked
        // at again): connected, through the file opened.
        std::fs::remove_file(&path).unwrap();
        std::fs::rename(dir.path().join("moved.sock"), &path).unwrap();
        assert!(connect_now(&path, socket_at(&path)).is_ok());
        qemu.set_nonblocking(true).unwrap();
        assert!(qemu.accept().is_ok(), "QEMU got the connection");
    }

    /// A socket bound at `path` that does not listen yet: QEMU between bind and listen.
    fn bound_unlistening(path: &Path) -> OwnedFd {
        use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, bind, socket};
        let fd = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        );
        let fd = fd.unwrap();
        bind(fd.as_raw_fd(), &UnixAddr::new(path).unwrap()).unwrap();
        fd
    }

    #[tokio::test]
    async fn a_socket_bound_before_it_listens_is_refused_then_connected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.sock");
        let socket = bound_unlistening(&path);
        let early = EarlyLeg::default();
        let round = early.begin();
        // Bound, not listening: what a watcher meets between QEMU's bind and listen.
        assert_eq!(
            early.try_connect(round, || connect(&path)).await,
            Tried::NotYet
        );
        nix::sys::socket::listen(&socket, nix::sys::socket::Backlog::new(1).unwrap()).unwrap();
        assert_eq!(
            early.try_connect(round, || connect(&path)).await,
            Tried::Held
        );
    }

    #[test]
    fn a_socket_bound_anew_is_another_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.sock");
        assert_eq!(socket_at(&path), None);
        let first = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let before = socket_at(&path);
        assert!(before.is_some());
        std::fs::remove_file(&path).unwrap();
        // Bound again while the first is still open, as `migrate-recover` does.
        let _again = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert_ne!(socket_at(&path), before);
        drop(first);
        // Closed, unlinked, bound again: another socket even where the file system hands
        // out the freed inode number again.
        for _ in 0..20 {
            let before = socket_at(&path);
            std::fs::remove_file(&path).unwrap();
            let _again = std::os::unix::net::UnixListener::bind(&path).unwrap();
            assert_ne!(socket_at(&path), before);
        }
        std::fs::write(dir.path().join("file"), b"x").unwrap();
        assert_eq!(socket_at(&dir.path().join("file")), None, "not a socket");
    }

    #[tokio::test]
    async fn a_socket_bound_in_the_directory_wakes_the_watcher() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.sock");
        let mut changes = DirChanges::new(&path);
        assert!(changes.inotify.is_some(), "inotify works here");
        assert!(!changes.next().await, "nothing changed: the poll woke it");
        std::fs::write(dir.path().join("other"), b"").unwrap();
        assert!(changes.next().await, "any new entry wakes it");
        let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert!(changes.next().await, "the socket bound wakes it");
        assert!(socket_at(&path).is_some());
    }

    #[tokio::test]
    async fn a_claim_ends_the_round_before_the_watcher_connects() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.sock");
        let _listener = UnixListener::bind(&path).unwrap();
        let early = EarlyLeg::default();
        let round = early.begin();
        let claim = early.claim().await;
        assert!(
            claim.held.is_none(),
            "nothing was held: the channel connects itself"
        );
        drop(claim);
        assert_eq!(
            early.try_connect(round, || connect(&path)).await,
            Tried::Over
        );
        tokio::time::timeout(Duration::from_secs(1), early.round_over(round))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_connection_nobody_claimed_is_closed_and_qemu_sees_it_close() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let early = EarlyLeg::default();
        let round = early.begin();
        assert_eq!(
            early.try_connect(round, || connect(&path)).await,
            Tried::Held
        );
        let (mut accepted, _) = listener.accept().await.unwrap();
        early.close(round).await;
        let mut buf = [0u8; 1];
        let read = tokio::io::AsyncReadExt::read(&mut accepted, &mut buf).await;
        assert_eq!(
            read.unwrap(),
            0,
            "QEMU reads the end of the early connection"
        );
        assert!(early.claim().await.held.is_none());
    }
}
