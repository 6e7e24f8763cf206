//! The source side: a unix socket for the source QEMU, the control link dialled at creation,
//! and one data connection to the destination daemon per connection QEMU opens.

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use migproxy_proto::{Attribution, Control, FLAG_KERNEL_PATH, Hello, Host, Kind, Leg, Op, Totals};
use tokio::io::AsyncWriteExt;
use tracing::Instrument;

use super::attribution::os_message;
use super::data_path::{self, Choice, DataPath, Unfit};
use super::migration::Preamble;
use super::migration::{Arrived, Migration, Role, Spec, State};
use super::peer::{self, PeerError};
use super::token::Token;
use super::{Daemon, RegisterError, channel, kernel, qemu};
use crate::endpoint::Endpoint;
use crate::human::{Chain, errno_name};
use crate::relay;
use crate::transport::{Listener, Stream, TransportError};

mod dial;
mod redial;
mod resumable;

use self::dial::{dial, hello};
use self::redial::{Dialer, NotResumed};
use super::migration::resumable as resumable_mark;

/// The source daemon's dial for a paused migration's control link.
struct Redialer {
    daemon: Arc<Daemon>,
    migration: Arc<Migration>,
}

impl Dialer for Redialer {
    async fn resume(&self, first: u32) -> Result<bool, NotResumed> {
        let resumed = resume(&self.daemon, &self.migration, first).await?;
        if resumed && self.migration.on_kernel_path() {
            // QEMU recovers on a new connection of the daemons' own, handed over as before:
            // the task driving QEMU takes it from here. A failure is the channel's.
            if let Ok(arrived) = dial_kernel(&self.daemon, &self.migration, first).await
                && let Some(older) = self.migration.handoff.put(arrived)
            {
                let _ = older.socket.shutdown(std::net::Shutdown::Both);
                self.migration.channel_abandoned(older.index);
            }
        }
        Ok(resumed)
    }

    async fn tell_cancel(&self, first: u32) -> bool {
        let mut hello = hello(&self.migration, Kind::Control, first);
        // A version 2 destination takes the cancel from the hello and attaches nothing;
        // after a version 1 link (no credential) a link that attaches carries it.
        if self.migration.resumable.credential().is_some() {
            hello.flags |= migproxy_proto::FLAG_CANCEL;
        }
        match dial::reach(&self.daemon, &self.migration, &hello).await {
            Ok(dialled) => {
                match ControlLink::from(dialled, &self.migration.spec.peer, offered(&hello)) {
                    Ok(link) => {
                        tell_cancelled(link).await;
                        true
                    }
                    Err(_) => false,
                }
            }
            // Refused: the destination has ended it too (or forgotten it); nobody to tell.
            Err(PeerError::Refused { .. }) => true,
            Err(_) => false,
        }
    }
}

/// What the API asks for.
#[derive(Debug)]
pub struct Request {
    pub id: String,
    pub token: Token,
    /// The destination daemon's peer address, HOST:PORT.
    pub peer: String,
    /// Pause instead of failing, for postcopy recovery.
    pub recoverable: bool,
    /// How long a pause may last before the migration fails for good.
    pub recover_timeout: Option<std::time::Duration>,
    /// How long a resumable channel may go without a working peer connection; `None`: not
    /// resumable.
    pub resume_timeout: Option<std::time::Duration>,
    /// The name the destination's certificate must carry; default the host of `peer`.
    pub tls_hostname: Option<String>,
    /// Drive the source QEMU over QMP: capabilities, parameters, `migrate`, its verdict.
    pub qemu: Option<qemu::Settings>,
    /// The group whose migrations share one stall watch.
    pub group: Option<String>,
    /// The data path asked for.
    pub data_path: DataPath,
}

/// Why an outgoing migration could not be created.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error(transparent)]
    Register(#[from] RegisterError),
    #[error("cannot create the socket for QEMU")]
    Listen(#[from] TransportError),
    #[error(transparent)]
    Peer(#[from] PeerError),
    #[error("the migration ended ({0:?}) while it was being created")]
    Ended(State),
    #[error(transparent)]
    Qemu(#[from] qemu::QemuError),
    #[error("data_path: kernel cannot serve this migration")]
    DataPath(#[source] Unfit),
    #[error("data_path: kernel asked, but the destination takes the relay: {0}")]
    Declined(String),
    #[error("the kernel path's data connection")]
    KernelSocket(#[source] std::io::Error),
}

/// Creates the migration: binds the socket QEMU will connect to, opens the control link
/// (so that a wrong token or an unreachable peer is reported now, not when QEMU starts), and
/// starts accepting QEMU's channels.
pub async fn create(daemon: &Arc<Daemon>, request: Request) -> Result<Arc<Migration>, CreateError> {
    let data_path_here = data_path::for_request(
        request.data_path,
        request.qemu.as_ref(),
        daemon.config.link(),
    )
    .map_err(CreateError::DataPath)?;
    // QEMU is checked and configured before anything else: a wrong QMP path or a QEMU in
    // the wrong state is reported before any connection is made.
    let qmp = match &request.qemu {
        Some(settings) => Some(qemu::prepare_outgoing(settings).await?),
        None => None,
    };
    let migration = Migration::new(spec(daemon, &request, data_path_here), daemon.context());
    if let Err(error) = daemon.register(Arc::clone(&migration)) {
        migration.withdraw();
        return Err(error.into());
    }
    let local = migration.spec.local.clone();
    match connect(daemon, &migration, &local).await {
        Ok((listener, control_link)) => {
            link_up(daemon, &migration, qmp, listener, control_link).await?;
            Ok(migration)
        }
        Err(error) => {
            migration.withdraw(); // ends its timers
            daemon.unregister(&request.id);
            Err(error)
        }
    }
}

/// The migration as the request describes it: QEMU's socket in the runtime directory, the
/// destination's certificate name, and as many channels as QEMU will open.
fn spec(daemon: &Daemon, request: &Request, data_path_here: Choice) -> Spec {
    let path = daemon
        .config
        .runtime_dir
        .join(format!("{}.sock", request.id));
    Spec {
        id: request.id.clone(),
        role: Role::Outgoing,
        token: request.token.clone(),
        peer: request.peer.clone(),
        local: Endpoint::Unix(path),
        // With QEMU driven here its settings say how many connections it opens.
        max_channels: request
            .qemu
            .as_ref()
            .map_or(daemon.config.max_channels, |q| q.channels())
            .min(daemon.config.max_channels),
        recoverable: request.recoverable,
        recover_timeout: request.recover_timeout,
        resume_timeout: request.resume_timeout,
        server_name: request
            .tls_hostname
            .clone()
            .unwrap_or_else(|| host_of(&request.peer).to_owned()),
        tls: daemon.config.tls.is_some(),
        qemu: request.qemu.clone(),
        group: request.group.clone(),
        data_path_asked: request.data_path,
        data_path_here,
    }
}

/// The control link is up: settle the data path, attach the link, and start taking QEMU's
/// connections (relay) or hand QEMU the data connection (kernel path).
async fn link_up(
    daemon: &Arc<Daemon>,
    migration: &Arc<Migration>,
    qmp: Option<crate::qmp::Qmp>,
    listener: Listener,
    control_link: ControlLink,
) -> Result<(), CreateError> {
    if let Err(declined) = settle_data_path(migration, &control_link) {
        // The destination has attached the link: it must hear that nothing comes.
        tell_cancelled(control_link).await;
        migration.withdraw();
        daemon.unregister(&migration.spec.id);
        return Err(declined);
    }
    if let Err(link) = start_control(daemon, migration, control_link, 0) {
        // Cancelled while the link was being dialled: the destination, which has
        // already attached it, must hear the cancel rather than a broken link.
        tell_cancelled(link).await;
        return Err(CreateError::Ended(migration.state()));
    }
    match qmp {
        // No socket for QEMU: it gets the data connection itself.
        Some(qmp) if migration.on_kernel_path() => {
            drop(listener);
            spawn_redial(daemon, migration);
            start_kernel(daemon, migration, qmp).await
        }
        qmp => {
            let span = tracing::info_span!("migration", migration = %migration.spec.id);
            daemon.tasks.spawn(
                accept_channels(Arc::clone(daemon), Arc::clone(migration), listener)
                    .instrument(span.clone()),
            );
            spawn_redial(daemon, migration);
            match qmp {
                Some(qmp) => start_qemu(daemon, migration, qmp).await,
                None => Ok(()),
            }
        }
    }
}

/// A recoverable migration: this host brings the control link back after a break, at once,
/// so that QEMU's recovery (driven here over QMP, or by a person or libvirt) finds it up and
/// costs only its data connections.
fn spawn_redial(daemon: &Arc<Daemon>, migration: &Arc<Migration>) {
    if !migration.spec.recoverable {
        return;
    }
    let dialer = Redialer {
        daemon: Arc::clone(daemon),
        migration: Arc::clone(migration),
    };
    let span = tracing::info_span!("redial", migration = %migration.spec.id);
    let redial = redial::run(Arc::clone(migration), dialer);
    daemon.tasks.spawn(redial.instrument(span));
}

/// Settles the data path from the destination's acceptance: the kernel path when this host
/// offered it and the destination took it. A kernel path asked for and declined is an error.
fn settle_data_path(migration: &Migration, link: &ControlLink) -> Result<(), CreateError> {
    let here = &migration.spec.data_path_here;
    let choice = match &link.choice {
        Some(theirs) if theirs.is_kernel() => here.clone(),
        Some(theirs) if migration.spec.data_path_asked == DataPath::Kernel => {
            return Err(CreateError::Declined(theirs.reason.clone()));
        }
        Some(theirs) => theirs.clone(),
        None => here.clone(),
    };
    migration.settle_data_path(choice);
    Ok(())
}

/// Kernel path: dials the one data connection (in clear), is admitted on it, hands it to
/// QEMU with `migrate fd:NAME`, then watches it and follows QEMU. If QEMU refuses, the
/// migration fails on both hosts, blamed on the source QEMU.
async fn start_kernel(
    daemon: &Daemon,
    migration: &Arc<Migration>,
    mut qmp: crate::qmp::Qmp,
) -> Result<(), CreateError> {
    let Arrived {
        admitted,
        socket,
        preamble,
        ..
    } = dial_kernel(daemon, migration, 0).await?;
    let name = data_path::fd_name(&migration.spec.id);
    if let Err(error) = qemu::hand_over(&mut qmp, &socket, (Role::Outgoing, false), &name).await {
        let _ = socket.shutdown(std::net::Shutdown::Both);
        migration.channel_abandoned(0);
        let blame = migration.qemu_failure(format!("migrate fd:{name} refused: {}", Chain(&error)));
        migration.fail(migration.epoch(), blame);
        return Err(error.into());
    }
    let channel = kernel::Channel {
        index: 0,
        admitted,
        socket,
        preamble,
        qemu: format!("fd:{name}"),
        peer: format!("tcp:{}", migration.spec.peer),
    };
    daemon
        .tasks
        .spawn(kernel::watch(Arc::clone(migration), channel));
    follow_qemu(daemon, migration, qmp);
    Ok(())
}

/// Kernel path: dials the data connection for channel `index` (in clear) and is admitted on
/// it. A failure is reported on the channel, and returned.
async fn dial_kernel(
    daemon: &Daemon,
    migration: &Arc<Migration>,
    index: u32,
) -> Result<Arrived, CreateError> {
    let admitted = migration
        .open_channel(index)
        .map_err(|_| CreateError::Ended(migration.state()))?;
    let hello = hello(migration, Kind::Data, index);
    let to = peer::Dial {
        peer: &migration.spec.peer,
        tls: None,
    };
    let dialled = match peer::dial(to, &hello, &daemon.config.timing).await {
        Ok(dialled) => dialled,
        Err(error) => {
            let blame = dial_failure(migration, index, &error);
            migration.channel_failed(admitted.epoch, index, blame);
            return Err(error.into());
        }
    };
    let (socket, preamble) = match kernel_socket(dialled.stream) {
        Ok(taken) => taken,
        Err(error) => {
            // The connection was admitted on both hosts: its failure is the channel's.
            let mut blame = migration.peer_link_failure(
                Op::Connect,
                errno_name(&error),
                format!("kernel path data connection: {}", os_message(&error)),
            );
            blame.channel = Some(index);
            migration.channel_failed(admitted.epoch, index, blame);
            return Err(CreateError::KernelSocket(error));
        }
    };
    Ok(Arrived {
        index,
        admitted,
        socket,
        from: format!("tcp:{}", migration.spec.peer),
        preamble,
    })
}

/// The plain TCP socket of a kernel-path data connection, out of tokio's hands (QEMU does
/// the I/O; this daemon only watches), and what came first on it. The reply has been read,
/// and with it the acknowledgement of the hello: what was acknowledged so far (the hello,
/// and the SYN, which Linux counts for the side that connects) and what came (the reply)
/// are not QEMU's.
fn kernel_socket(stream: Stream) -> Result<(std::net::TcpStream, Preamble), std::io::Error> {
    let socket = match stream {
        Stream::Tcp(tcp) => tcp.into_std()?,
        _ => {
            return Err(std::io::Error::other(
                "the kernel path's data connection is not plain TCP",
            ));
        }
    };
    let before = kernel::sample(&socket)?;
    let preamble = Preamble {
        to_destination: before.bytes_acked,
        to_source: before.bytes_received,
    };
    Ok((socket, preamble))
}

/// Runs `migrate` to the migration's socket and follows QEMU; if QEMU refuses, the
/// migration fails on both hosts, blamed on the source QEMU.
async fn start_qemu(
    daemon: &Daemon,
    migration: &Arc<Migration>,
    mut qmp: crate::qmp::Qmp,
) -> Result<(), CreateError> {
    if let Err(error) = qemu::start(&mut qmp, &migration.spec.local).await {
        // The destination may already listen: both hosts must hear whose fault it was.
        let blame = migration.qemu_failure(format!("migrate refused: {}", Chain(&error)));
        migration.fail(migration.epoch(), blame);
        return Err(error.into());
    }
    follow_qemu(daemon, migration, qmp);
    Ok(())
}

/// Follows the source QEMU, which a cancel reaches first.
fn follow_qemu(daemon: &Daemon, migration: &Arc<Migration>, qmp: crate::qmp::Qmp) {
    let (canceller, cancels) = tokio::sync::mpsc::channel(1);
    migration.set_qemu_canceller(canceller);
    let span = tracing::info_span!("qemu", migration = %migration.spec.id);
    daemon
        .tasks
        .spawn(qemu::follow(Arc::clone(migration), qmp, cancels, None).instrument(span));
}

/// A control link as dialled: the stream, the protocol version it speaks, and the
/// credential its data connections must carry (from version 2 on).
struct ControlLink {
    stream: Stream,
    version: u16,
    credential: Option<Token>,
    /// The destination's choice of data path, when this host offered the kernel path.
    choice: Option<Choice>,
    /// The destination agreed to resumable channels.
    resumable: bool,
}

impl ControlLink {
    /// A dialled control link; from version 2 on its acceptance must carry a credential.
    fn from(dialled: peer::Dialled, peer: &str, offered: bool) -> Result<ControlLink, PeerError> {
        let malformed = |message: &str| PeerError::Refused {
            peer: peer.to_owned(),
            status: migproxy_proto::Status::Malformed,
            message: message.to_owned(),
        };
        let (message, resumable) = resumable_mark::unmark(&dialled.message);
        let (credential, choice) = match dialled.version {
            1 => (None, None),
            _ => {
                let (hex, choice) = data_path::parse_acceptance(&message, offered)
                    .ok_or_else(|| malformed("the destination's acceptance of the control link is not a credential and a data path"))?;
                let credential = Token::from_hex(hex).ok_or_else(|| {
                    malformed("the destination accepted the control link without a data credential")
                })?;
                (Some(credential), choice)
            }
        };
        Ok(ControlLink {
            stream: dialled.stream,
            version: dialled.version,
            credential,
            choice,
            resumable: resumable && dialled.version >= 2,
        })
    }
}

async fn connect(
    daemon: &Daemon,
    migration: &Migration,
    local: &Endpoint,
) -> Result<(Listener, ControlLink), CreateError> {
    let listener = Listener::bind(local).await?;
    if let Some(path) = local.unix_path() {
        // Only the daemon's user (and QEMU running as it) may connect.
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    }
    let hello = hello(migration, Kind::Control, 0);
    let dialled = dial(daemon, migration, &hello).await?;
    let offered = hello.flags & FLAG_KERNEL_PATH != 0 && dialled.version >= 2;
    let control = ControlLink::from(dialled, &migration.spec.peer, offered)?;
    Ok((listener, control))
}

/// Attaches a dialled control link (whose hello named `first_channel`) and runs it.
fn start_control(
    daemon: &Arc<Daemon>,
    migration: &Arc<Migration>,
    link: ControlLink,
    first_channel: u32,
) -> Result<(), ControlLink> {
    // Settled before the link attaches: the epoch's first channel may come at once.
    migration.resumable.settle(link.resumable);
    migration.resumable.remember(link.credential.clone());
    let Some(attached) = migration.attach_control(first_channel, link.credential.clone()) else {
        return Err(link);
    };
    // A link kept at a pause that this one replaces (dialled meanwhile) closes; one that
    // finishes parking later closes itself (`resumable::control_link` looks again).
    drop(migration.parked.try_take());
    let (daemon_, migration_) = (Arc::clone(daemon), Arc::clone(migration));
    let runs = resumable::control_link(daemon_, migration_, link.stream, attached, link.version);
    daemon.tasks.spawn(runs);
    Ok(())
}

/// Sends a cancel on a control link the migration could not take, and closes it.
async fn tell_cancelled(link: ControlLink) {
    let cancel = Control::Cancel { by: Host::Source };
    let ControlLink {
        mut stream,
        version,
        ..
    } = link;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
        peer::write_control(&mut stream, version, &cancel, &mut Vec::new()).await?;
        stream.shutdown().await
    })
    .await;
}

/// A paused migration: dial a new control link for the epoch that starts at channel
/// `first_channel`. True when resumed; false when there was nothing to resume any more
/// (the migration ended, or another link attached).
async fn resume(
    daemon: &Arc<Daemon>,
    migration: &Arc<Migration>,
    first_channel: u32,
) -> Result<bool, NotResumed> {
    let hello = hello(migration, Kind::Control, first_channel);
    let link = tokio::select! {
        () = migration.stopped() => return Ok(false),
        link = dial::reach(daemon, migration, &hello) => dial::heed(migration, link),
    };
    // The control link failed, not a channel, after all that moved before the pause.
    let link = link
        .and_then(|dialled| ControlLink::from(dialled, &migration.spec.peer, offered(&hello)))
        .map_err(|error| {
            let blame = migration.peer_link_failure(
                error.op(),
                error.os_error().and_then(errno_name),
                format!("resume: control link: {}", dial_detail(&error)),
            );
            // Only "no such migration" (restarted) and "ended there" are final: a busy gate
            // or a link the destination still holds is tried again.
            match &error {
                PeerError::Refused {
                    status:
                        status @ (migproxy_proto::Status::UnknownMigration
                        | migproxy_proto::Status::Expired
                        | migproxy_proto::Status::Cancelled),
                    message,
                    ..
                } => NotResumed::Refused {
                    blame: Attribution {
                        message: format!(
                            "the destination daemon refused to resume: {message} ({}); {}",
                            match status {
                                migproxy_proto::Status::UnknownMigration => {
                                    "a daemon restarted since no longer knows the migration"
                                }
                                _ => "it has ended there",
                            },
                            super::attribution::BY_HAND
                        ),
                        ..blame
                    },
                },
                _ => NotResumed::Failed(blame),
            }
        })?;
    match start_control(daemon, migration, link, first_channel) {
        Ok(()) => Ok(true),
        Err(link) => {
            tracing::debug!(migration = %migration.spec.id, state = ?migration.state(),
                "nothing to resume");
            link.stream.abort();
            Ok(false)
        }
    }
}

/// Whether a control hello offered the kernel path (its acceptance then says which path).
fn offered(hello: &Hello) -> bool {
    hello.flags & FLAG_KERNEL_PATH != 0
}

/// `host` of `host:port`, without the brackets of an IPv6 address.
fn host_of(peer: &str) -> &str {
    let host = peer.rsplit_once(':').map_or(peer, |(host, _)| host);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// Accepts QEMU's connections in order; each becomes channel 0, 1, … to the peer. While the
/// migration is paused, a connection from QEMU (its recovery) resumes it first.
async fn accept_channels(daemon: Arc<Daemon>, migration: Arc<Migration>, listener: Listener) {
    loop {
        let accepted = tokio::select! {
            () = migration.stopped() => break,
            accepted = listener.accept() => accepted,
        };
        let (qemu, qemu_name) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of descriptors (EMFILE) fails every accept at once: do not spin.
                tracing::warn!(migration = %migration.spec.id, error = %Chain(&error), "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        if migration.state() == State::Paused && !link_back(&migration).await {
            qemu.abort();
            continue;
        }
        // The core's count: a connection refused when its epoch paused took no index.
        let index = migration.channels_seen();
        carry(&daemon, &migration, index, qemu, qemu_name).await;
    }
    // Dropping the listener removes QEMU's socket file.
}

/// A paused migration whose QEMU reconnected (its recovery): the redial task brings the
/// control link back, one dial at a time; QEMU's connection waits for it a moment. When it
/// is not back, QEMU's connection goes unanswered (QEMU may try again).
async fn link_back(migration: &Migration) -> bool {
    let mut state = migration.watch_state();
    let back = state.wait_for(|s| *s != State::Paused);
    // Meanwhile the redial task dials now, and again every 50 ms, rather than at its next
    // try (a destination that has not paused yet refuses the first).
    let hurry = async {
        loop {
            migration.recovery_came.notify_one();
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    };
    let back = async {
        tokio::select! {
            back = back => back.map(|state| *state == State::Active).unwrap_or(false),
            () = hurry => false,
        }
    };
    tokio::time::timeout(LINK_BACK_WAIT, back)
        .await
        .unwrap_or(false)
}

/// How long QEMU's recovery connection waits for the control link.
const LINK_BACK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Carries QEMU's connection `index` as a channel: admitted, a data connection dialled to
/// the destination daemon, then relayed. Whatever fails is reported on that channel.
async fn carry(
    daemon: &Arc<Daemon>,
    migration: &Arc<Migration>,
    index: u32,
    qemu: Stream,
    qemu_name: String,
) {
    let admitted = match migration.open_channel(index) {
        Ok(admitted) => admitted,
        Err(refused) => {
            // QEMU opened a connection this migration cannot take (one too many, or
            // after its end): the report says so, on the channel it would have been.
            tracing::warn!(migration = %migration.spec.id, "QEMU connection refused: {refused}");
            qemu.abort();
            let blame = refused_channel(migration, index, &refused);
            migration.fail(migration.epoch(), blame);
            return;
        }
    };
    let hello = hello(migration, Kind::Data, index);
    let dialled = tokio::select! {
        // An ended epoch first: a failure racing it is only its echo.
        biased;
        () = admitted.stop.cancelled() => None,
        dialled = dial(daemon, migration, &hello) => Some(dialled),
    };
    match dialled {
        Some(Ok(dialled)) if migration.resumable.on() => {
            let at = (index, admitted);
            let (daemon, migration) = (Arc::clone(daemon), Arc::clone(migration));
            let qemu = (qemu, qemu_name);
            let carried =
                resumable::carry(daemon.clone(), migration, at, hello, qemu, dialled.stream);
            daemon.tasks.spawn(carried);
        }
        Some(Ok(dialled)) => {
            let source = relay::Leg::new(qemu_name.clone(), qemu);
            let peer = format!("tcp:{}", migration.spec.peer);
            let destination = relay::Leg::new(peer, dialled.stream);
            daemon.tasks.spawn(channel::run(
                Arc::clone(migration),
                index,
                admitted,
                source,
                destination,
                qemu_name,
            ));
        }
        Some(Err(error)) => {
            qemu.abort();
            let blame = dial_failure(migration, index, &error);
            migration.channel_failed(admitted.epoch, index, blame);
        }
        None => {
            qemu.abort();
            migration.channel_abandoned(index);
        }
    }
}

/// A connection from the source QEMU that the migration refused.
fn refused_channel(
    migration: &Migration,
    index: u32,
    refused: &super::migration::ChannelRefused,
) -> Attribution {
    Attribution {
        host: migration.host(),
        leg: Leg::Qemu,
        channel: Some(index),
        direction: None,
        op: Op::Protocol,
        errno: None,
        message: format!("QEMU opened a connection the migration refused: {refused}"),
        // Like every attribution naming a channel, that channel's bytes: none moved.
        bytes: Totals::default(),
        elapsed_ms: migration.elapsed().as_millis() as u64,
    }
}

/// What went wrong dialling, without the errno (which travels apart): the OS's text when
/// there is one.
fn dial_detail(error: &PeerError) -> String {
    error
        .os_error()
        .map_or_else(|| Chain(error).to_string(), os_message)
}

/// A data connection to the peer could not be opened.
fn dial_failure(migration: &Migration, index: u32, error: &PeerError) -> Attribution {
    Attribution {
        host: migration.host(),
        leg: Leg::Peer,
        channel: Some(index),
        direction: None,
        op: error.op(),
        errno: error.os_error().and_then(errno_name),
        message: dial_detail(error),
        bytes: Totals::default(),
        elapsed_ms: migration.elapsed().as_millis() as u64,
    }
}
