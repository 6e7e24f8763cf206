//! The destination side: migrations created for a destination QEMU, the peer port where
//! source daemons connect, the hello check, and channels delivered to QEMU in order.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use migproxy_proto::{Hello, Kind, Op, Status};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::attribution::os_message;
use super::data_path::{DataPath, Unfit};
use super::gate::{self, FirstByte, Gate, Spare};
use super::migration::resumable;
use super::migration::{Admitted, Link, Migration, Role, Spec, State};
use super::peer;
use super::token::Token;
use super::{Daemon, RegisterError, control, data_path, kernel, last_frames, paths, qemu};
use crate::endpoint::Endpoint;
use crate::human::errno_name;
use crate::tls::Identity;

mod deliver;
mod open;

use self::deliver::deliver;
use self::open::{Opened, open_until, reject};

/// What the API asks for.
#[derive(Debug)]
pub struct Request {
    pub id: String,
    /// Where the destination QEMU listens (`-incoming` / `migrate-incoming`). With `qemu` and
    /// no target, a socket of the daemon's choosing.
    pub target: Option<Endpoint>,
    pub max_channels: Option<u32>,
    /// Pause instead of failing, for postcopy recovery.
    pub recoverable: bool,
    /// How long a pause may last before the migration fails for good.
    pub recover_timeout: Option<Duration>,
    /// How long a resumable channel may go without a working peer connection; `None`: not
    /// resumable.
    pub resume_timeout: Option<Duration>,
    /// Drive the destination QEMU over QMP: capabilities, `migrate-incoming`, its verdict.
    pub qemu: Option<qemu::Settings>,
    /// The group whose migrations share one stall watch.
    pub group: Option<String>,
    /// The data path asked for.
    pub data_path: DataPath,
}

/// Why an incoming migration could not be created.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error(transparent)]
    Register(#[from] RegisterError),
    #[error(transparent)]
    Qemu(#[from] qemu::QemuError),
    #[error("target: needed unless qmp is given (then the daemon chooses where QEMU listens)")]
    NoTarget,
    #[error(
        "id: too long for the socket QEMU would listen on, {} (at most {MAX_SOCKET_PATH} \
         bytes): choose a shorter id, or give a target", .0.display()
    )]
    PathTooLong(std::path::PathBuf),
    #[error("data_path: kernel cannot serve this migration")]
    DataPath(#[source] Unfit),
}

/// The longest unix socket path (`sun_path` holds 108 bytes with the terminating zero).
const MAX_SOCKET_PATH: usize = 107;

/// Registers an incoming migration, prepares the destination QEMU when it is driven here,
/// and starts the expiry clock. Returns the migration and its token.
pub async fn create(
    daemon: &Arc<Daemon>,
    request: Request,
) -> Result<(Arc<Migration>, Token), CreateError> {
    let (target, own_socket) = target(daemon, &request)?;
    let data_path_here = data_path::for_request(
        request.data_path,
        request.qemu.as_ref(),
        daemon.config.link(),
    )
    .map_err(CreateError::DataPath)?;
    let token = Token::generate();
    let spec = spec(daemon, &request, target, token.clone(), data_path_here);
    let migration = Migration::new(spec, daemon.context());
    if let Err(error) = daemon.register(Arc::clone(&migration)) {
        migration.withdraw();
        return Err(error.into());
    }
    if let Some(settings) = &request.qemu {
        if let Err(error) = drive_qemu(daemon, &migration, settings, own_socket).await {
            migration.withdraw();
            daemon.unregister(&migration.spec.id);
            return Err(error.into());
        }
    }
    if let Some(path) = migration
        .spec
        .local
        .unix_path()
        .filter(|p| p.starts_with(&daemon.config.runtime_dir))
    {
        daemon
            .tasks
            .spawn(sweep(Arc::clone(&migration), path.to_owned()));
    }
    Ok((migration, token))
}

/// Where the destination QEMU listens: the request's target, or with QMP and none a socket
/// of the daemon's own (returned twice: it is also the file to remove at the end).
fn target(
    daemon: &Daemon,
    request: &Request,
) -> Result<(Endpoint, Option<std::path::PathBuf>), CreateError> {
    match (&request.target, &request.qemu) {
        (Some(target), _) => Ok((target.clone(), None)),
        (None, Some(_)) => {
            let path = qemu::incoming_socket(&daemon.config.runtime_dir, &request.id);
            if path.as_os_str().len() > MAX_SOCKET_PATH {
                return Err(CreateError::PathTooLong(path));
            }
            Ok((Endpoint::Unix(path.clone()), Some(path)))
        }
        (None, None) => Err(CreateError::NoTarget),
    }
}

/// The migration as the request describes it. With QEMU driven here its settings say how
/// many connections it opens: no more are admitted.
fn spec(
    daemon: &Daemon,
    request: &Request,
    target: Endpoint,
    token: Token,
    data_path_here: data_path::Choice,
) -> Spec {
    let max_channels = request
        .max_channels
        .unwrap_or(daemon.config.max_channels)
        .min(daemon.config.max_channels)
        .min(request.qemu.as_ref().map_or(u32::MAX, |q| q.channels()));
    Spec {
        id: request.id.clone(),
        role: Role::Incoming,
        token,
        peer: daemon.config.advertise.clone(),
        local: target,
        max_channels,
        recoverable: request.recoverable,
        recover_timeout: request.recover_timeout,
        resume_timeout: request.resume_timeout,
        server_name: String::new(),
        tls: daemon.config.tls.is_some(),
        qemu: request.qemu.clone(),
        group: request.group.clone(),
        data_path_asked: request.data_path,
        data_path_here,
    }
}

/// Checks and configures the destination QEMU, then follows it (it is told to listen once
/// the source daemon has come).
async fn drive_qemu(
    daemon: &Daemon,
    migration: &Arc<Migration>,
    settings: &qemu::Settings,
    own_socket: Option<std::path::PathBuf>,
) -> Result<(), qemu::QemuError> {
    let qmp = qemu::prepare_incoming(settings).await?;
    let follow = qemu::follow_incoming(Arc::clone(migration), qmp, own_socket);
    let span = tracing::info_span!("qemu", migration = %migration.spec.id);
    daemon.tasks.spawn(follow.instrument(span));
    Ok(())
}

/// Once the migration has ended, removes the destination QEMU's socket if it was left in the
/// daemon's runtime directory with nobody listening (QEMU creates it; libvirt's QEMU leaves
/// it when the migration fails). Watched for a while: the QEMU may take a moment to go.
async fn sweep(migration: Arc<Migration>, path: std::path::PathBuf) {
    migration.stopped().await;
    for _ in 0..SWEEP_TRIES {
        if !path.exists() || paths::remove_if_stale(&path) {
            return;
        }
        tokio::time::sleep(SWEEP_EVERY).await;
    }
}

/// How long a destination socket left behind is watched for: long enough for libvirt to
/// stop the destination QEMU of a failed migration.
const SWEEP_TRIES: u32 = 40;
const SWEEP_EVERY: Duration = Duration::from_millis(250);

/// Accepts connections from source daemons until `shutdown`, admitting them through the
/// [`gate`](super::gate): silent ones never take a handshake slot, one address cannot take
/// them all, and the channels of attached migrations have a reserve.
pub async fn serve_peers(daemon: Arc<Daemon>, listener: TcpListener, shutdown: CancellationToken) {
    let gate = Gate::new(daemon.config.gate_limits());
    let mut spare = Spare::new();
    loop {
        let (stream, from) = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    gate::accept_failed(&daemon.rejections, "peer port", &error);
                    // Out of fds: one pending connection is told so rather than left hanging.
                    // (Inline: nothing else can be accepted meanwhile anyway.)
                    if let Some(stream) = spare.answer_one(&listener, &error).await {
                        let answer = refusal(&daemon, "the destination daemon is out of file descriptors (EMFILE), try again");
                        gate.refuse(stream, &answer).await;
                        spare.restore();
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        spare.restore();
        let (waiting, evicted) = gate.wait(from.ip());
        if let Some(address) = evicted
            && let Some(suppressed) = daemon.rejections.record("evicted")
        {
            tracing::warn!(%address, suppressed, "{} connections wait for their first byte: the oldest from {address} was dropped", daemon.config.max_silent_connections);
        }
        let span = tracing::info_span!("peer", %from);
        let task = handshake(
            Arc::clone(&daemon),
            Arc::clone(&gate),
            stream,
            from,
            waiting,
        );
        daemon.tasks.spawn(task.instrument(span));
    }
}

/// The refusal a connection turned away before its handshake can read: a typed `Busy`
/// reply, or under TLS a `user_canceled` alert (no handshake has happened to carry more).
fn refusal(daemon: &Daemon, message: &str) -> Vec<u8> {
    match daemon.config.tls {
        Some(_) => gate::TLS_BUSY_ALERT.to_vec(),
        None => busy_reply(message),
    }
}

/// Waits for the connection's first byte and a handshake slot, then runs [`handshake`].
async fn handshake(
    daemon: Arc<Daemon>,
    gate: Arc<Gate>,
    tcp: TcpStream,
    from: SocketAddr,
    waiting: gate::Waiting,
) {
    let deadline = tokio::time::Instant::now() + daemon.config.timing.handshake_timeout;
    let reason = match waiting.first_byte(&tcp).await {
        FirstByte::Heard => None,
        FirstByte::Gone => return,
        FirstByte::Silent => Some("first_byte_timeout"),
        FirstByte::Evicted => Some("evicted"),
    };
    drop(waiting);
    if let Some(reason) = reason {
        if reason == "first_byte_timeout"
            && let Some(suppressed) = daemon.rejections.record(reason)
        {
            tracing::warn!(%from, suppressed, "peer sent nothing within {:?}, dropped", daemon.config.first_byte_timeout);
        }
        return;
    }
    let slot = match gate.enter(from.ip()) {
        Ok(slot) => slot,
        Err(refused) => {
            if let Some(suppressed) = daemon.rejections.record(Status::Busy.name()) {
                tracing::warn!(%from, suppressed, "peer connection refused: {refused}");
            }
            gate.refuse(tcp, &refusal(&daemon, &refused.to_string()))
                .await;
            return;
        }
    };
    authenticate(daemon, gate, tcp, from, slot, deadline).await;
}

/// Secures the connection (TLS), reads and checks the hello, answers it, and hands the
/// connection to its migration.
async fn authenticate(
    daemon: Arc<Daemon>,
    gate: Arc<Gate>,
    tcp: TcpStream,
    address: SocketAddr,
    permit: gate::Slot,
    deadline: tokio::time::Instant,
) {
    let from = address.to_string();
    let timing = daemon.config.timing.clone();
    if let Err(error) = peer::tune(&tcp, &timing) {
        tracing::debug!(%from, %error, "peer socket options");
    }
    let Some(mut opened) = open_until(&daemon, tcp, &from, deadline).await else {
        return;
    };
    let mut permit = Some(permit);
    // A control link parked at a pause carries the next epoch's hello ([`open::reopen`]).
    while let Some(kept) = answer(&daemon, &gate, opened, (address, &mut permit)).await {
        match open::reopen(&daemon, kept, &from).await {
            Some(next) => opened = next,
            None => return,
        }
    }
}

/// Vets the hello, answers it, and runs what it joined; `Some` when it was a control link
/// that its pause parked, for [`open::reopen`]. `permit`, the connection's handshake slot, is
/// given up once it is admitted.
async fn answer(
    daemon: &Arc<Daemon>,
    gate: &Arc<Gate>,
    opened: Opened,
    (address, permit): (SocketAddr, &mut Option<gate::Slot>),
) -> Option<open::Kept> {
    let from = address.to_string();
    let Opened {
        mut stream,
        hello,
        identity,
        clear,
    } = opened;
    let version = migproxy_proto::negotiate(hello.version);
    let vetted = vet(daemon, &hello, (identity.as_ref(), clear), version);
    let Vetted {
        migration,
        joined,
        handed_out,
    } = match vetted {
        Ok(vetted) => vetted,
        Err((status, message)) => {
            reject(daemon, &mut stream, &from, status, &message).await;
            return None;
        }
    };
    // Authenticated and admitted: this connection no longer counts as a handshake, and while
    // a control link is up its address may use the reserve for its channels. Both before
    // the reply: the source dials its channels the moment it reads it, and a channel that
    // found this slot still taken and the reserve still closed was refused busy, failing the
    // migration (seen under load in daemon_carry's three-channel test).
    drop(permit.take());
    let _trusted = matches!(joined, Joined::Control(_)).then(|| gate.trust(address.ip()));
    if let Err(error) = peer::reply(&mut stream, version, Status::Ok, &handed_out).await {
        tracing::debug!(%from, %error, "peer vanished during the handshake");
        unjoin(&migration, joined, hello.channel, &error);
        return None;
    }
    let timing = daemon.config.timing.clone();
    match joined {
        Joined::Control(link) => {
            let over = control::run(Arc::clone(&migration), stream, link, timing, version).await;
            if let control::Over::Parked(stream) = over {
                return Some(open::Kept {
                    stream,
                    identity,
                    clear,
                    migration,
                });
            }
        }
        // The kernel path: the connection goes to QEMU as it is.
        Joined::Data(admitted) if migration.on_kernel_path() => {
            let preamble = kernel::preamble(&hello, version);
            kernel::hand_off(migration, hello.channel, admitted, stream, from, preamble);
        }
        Joined::Data(admitted) => {
            let daemon = Arc::clone(daemon);
            deliver(daemon, migration, hello.channel, admitted, stream, from).await;
        }
        Joined::Resume => {
            if let Err(stream) = migration.resumable.arrived(hello.channel, stream) {
                // The channel ended since: nothing to carry on.
                stream.abort();
            }
        }
        Joined::LastFrames => last_frames::exchange(&migration, stream, version, true).await,
    }
    None
}

/// What an accepted hello joined: its migration's control link, one of its channels, or a
/// resumable channel it carries on.
enum Joined {
    Control(Link),
    Data(Admitted),
    Resume,
    /// Both hosts have ended: the link only carries the last frames, both ways.
    LastFrames,
}

/// Every check a hello must pass, in order: the TLS identity, the migration and its token,
/// what the data path allows (`clear`: it came in clear on a TLS port), the recoverable
/// setting, then the data path chosen and the join. Only these last two change the
/// migration: a hello refused before them leaves it untouched. Returns what the acceptance
/// carries.
fn vet(
    daemon: &Daemon,
    hello: &Hello,
    (identity, clear): (Option<&Identity>, bool),
    version: u16,
) -> Result<Vetted, (Status, String)> {
    let refused = |message| (Status::Refused, message);
    if let Some(identity) = identity {
        allowed(daemon, identity).map_err(refused)?;
    }
    let (migration, last) = admit(daemon, hello, identity)?;
    if last {
        // Admitted only to carry the source's last frames, both having ended.
        return Ok(Vetted {
            migration,
            joined: Joined::LastFrames,
            handed_out: last_frames::ENDED.to_owned(),
        });
    }
    if hello.kind == Kind::Control && hello.flags & migproxy_proto::FLAG_CANCEL != 0 {
        return Err(cancel_told(&migration));
    }
    if hello.kind == Kind::Control && hello.flags & migproxy_proto::FLAG_RESUME != 0 {
        // (One that ended since `admit` has no link to take over: refused.)
        return take_over(migration);
    }
    kernel::fit(&migration, hello, clear, daemon.config.tls.is_some()).map_err(refused)?;
    same_recoverable(&migration, hello).map_err(refused)?;
    // From version 2 on, the epoch's data connections carry a secret handed out here, on the
    // control link, rather than the token: holding the token is not enough to add a channel.
    let credential = (hello.kind == Kind::Control && version >= 2).then(Token::generate);
    // The kernel path needs the credential's link (version 2 on) to say what was chosen.
    let offered = version >= 2 && hello.flags & migproxy_proto::FLAG_KERNEL_PATH != 0;
    let choice = choose_data_path(&migration, hello, offered).map_err(refused)?;
    if let Some(choice) = &choice {
        // Settled before the link attaches: whoever wakes on `active` finds it.
        migration.settle_data_path(choice.clone());
    }
    let resumable = agrees_resumable(&migration, hello, version);
    let joined = join(&migration, hello, credential.clone()).map_err(refused)?;
    if let Joined::Control(_) = joined {
        // Only a link that attached settles them (a refused one must not touch the epoch);
        // before its acceptance is sent, so before any channel can come.
        migration.resumable.settle(resumable);
        migration.resumable.bind(identity);
        // The credential this link presented (not the token) stays good for the next
        // one: the source holds it until this acceptance reaches it.
        let presented = migration.resumable.recovers(&hello.token) == Some(true);
        let presented = presented.then_some(&hello.token);
        migration
            .resumable
            .remember_after(credential.clone(), presented);
    }
    let handed_out = match (&credential, &choice) {
        (Some(credential), Some(choice)) => {
            let acceptance = data_path::acceptance(&credential.to_hex(), offered, choice);
            match resumable {
                true => resumable::mark(&acceptance),
                false => acceptance,
            }
        }
        _ => String::new(),
    };
    Ok(Vetted {
        migration,
        joined,
        handed_out,
    })
}

/// A control link that takes over from the epoch's broken one (its credential and
/// certificate checked by [`admit`]): on a resumable migration whose link is down. One still
/// up is told to give up, and this one answered Busy (the source tries again at once).
fn take_over(migration: Arc<Migration>) -> Result<Vetted, (Status, String)> {
    let id = &migration.spec.id;
    match migration.rejoin() {
        Ok(link) => Ok(Vetted {
            migration,
            joined: Joined::Control(link),
            handed_out: String::new(),
        }),
        Err(resumable::Rejoin::Busy) => Err((
            Status::Busy,
            format!("migration {id}: its control link is still up; it is told to give up"),
        )),
        Err(resumable::Rejoin::Refused) => Err((
            Status::Refused,
            format!("migration {id} has no control link to take over (not resumable, or ended)"),
        )),
    }
}

/// Whether a control hello gets resumable channels: asked for (version 2 on), this side has
/// a resume timeout too, and the data goes through the relay (on the kernel path QEMU holds
/// the socket).
fn agrees_resumable(migration: &Migration, hello: &Hello, version: u16) -> bool {
    hello.kind == Kind::Control
        && version >= 2
        && hello.flags & migproxy_proto::FLAG_RESUMABLE != 0
        && migration.spec.resume_timeout.is_some()
        && !migration.on_kernel_path()
}

/// A hello that passed [`vet`].
struct Vetted {
    migration: Arc<Migration>,
    joined: Joined,
    /// The acceptance's message: on a control link (version 2 on), the credential for the
    /// epoch's data connections and the data path chosen.
    handed_out: String,
}

/// A control link settles the data path: the destination's choice given what the source
/// offered. Data connections follow what their control link settled (`None`).
fn choose_data_path(
    migration: &Migration,
    hello: &Hello,
    offered: bool,
) -> Result<Option<data_path::Choice>, String> {
    if hello.kind != Kind::Control {
        return Ok(None);
    }
    let spec = &migration.spec;
    data_path::decide(spec.data_path_asked, &spec.data_path_here, offered)
        .map(Some)
        .map_err(|message| format!("migration {}: {message}", hello.migration))
}

/// Whether `--tls-allow` lets this peer identity in.
fn allowed(daemon: &Daemon, identity: &Identity) -> Result<(), String> {
    let allowed = daemon
        .config
        .tls
        .as_ref()
        .is_some_and(|tls| tls.current().allows(identity));
    if allowed {
        return Ok(());
    }
    Err(format!(
        "peer identity {identity} is not allowed here (--tls-allow)"
    ))
}

/// A control link must agree on `recoverable`: a pair that disagrees would pause on one host
/// and fail on the other.
fn same_recoverable(migration: &Migration, hello: &Hello) -> Result<(), String> {
    let recoverable = hello.flags & migproxy_proto::FLAG_RECOVERABLE != 0;
    if hello.kind != Kind::Control || recoverable == migration.spec.recoverable {
        return Ok(());
    }
    let not = |recoverable: bool| if recoverable { "" } else { "not " };
    Err(format!(
        "migration {} is {}recoverable here but {}recoverable on the source: create both \
         with the same \"recoverable\"",
        hello.migration,
        not(migration.spec.recoverable),
        not(recoverable),
    ))
}

/// A control link that only tells of the source's cancel (`FLAG_CANCEL`), admitted: the
/// migration is cancelled here and the link refused with that word, attaching nothing (no
/// `recovering`). A cancel this host cannot take is refused as such.
fn cancel_told(migration: &Arc<Migration>) -> (Status, String) {
    let id = &migration.spec.id;
    if migration.cancel_told(migproxy_proto::Host::Source) {
        tracing::info!(migration = %id, "the source says it cancelled the migration: cancelled");
        let message = format!("migration \"{id}\" is cancelled (cancelled by the source)");
        return (Status::Cancelled, message);
    }
    let state = migration.state().name();
    let message = format!("migration \"{id}\" cannot be cancelled here: it is {state}");
    (Status::Refused, message)
}

/// Attaches the control link, or admits the data connection, that the hello announces.
fn join(
    migration: &Arc<Migration>,
    hello: &Hello,
    credential: Option<Token>,
) -> Result<Joined, String> {
    match hello.kind {
        Kind::Control => migration
            .attach_control(hello.channel, credential)
            .map(Joined::Control)
            .ok_or_else(|| {
                format!(
                    "migration {} cannot take a control link now (it is {})",
                    hello.migration,
                    migration.phase().name()
                )
            }),
        // A connection that comes again for a resumable channel running here.
        Kind::Data if hello.flags & migproxy_proto::FLAG_RESUME != 0 => {
            match migration.resumable.has(hello.channel) {
                true => Ok(Joined::Resume),
                false => Err(format!(
                    "migration {}: channel {} is not a resumable channel running here",
                    hello.migration, hello.channel
                )),
            }
        }
        Kind::Data => migration
            .open_data(hello.channel, &hello.token)
            .map(Joined::Data)
            .map_err(|refused| refused.to_string()),
    }
}

/// The peer vanished before it read its acceptance: undoes the join.
fn unjoin(migration: &Arc<Migration>, joined: Joined, channel: u32, error: &std::io::Error) {
    match joined {
        // The source will not see this link: without it the migration cannot go on.
        Joined::Control(link) => {
            let blame = migration.peer_link_failure(
                Op::Handshake,
                errno_name(error),
                format!("control link: {}", os_message(error)),
            );
            migration.fail(link.epoch, blame);
        }
        Joined::Data(_) => migration.channel_abandoned(channel),
        // The channel waits on for its next connection.
        Joined::Resume => {}
        // The source may come again with its last frames.
        Joined::LastFrames => migration.last_frames_undone(),
    }
}

/// The refusal sent to connections turned away before their hello.
fn busy_reply(message: &str) -> Vec<u8> {
    let mut buf = Vec::new();
    migproxy_proto::HelloReply {
        // Before the hello: the oldest version, which every dialler reads.
        version: migproxy_proto::MIN_VERSION,
        status: Status::Busy,
        message: message.to_owned(),
    }
    .encode(&mut buf);
    buf
}

/// Finds the migration a hello names and checks its token; a resume's certificate too,
/// before anything of the migration's state is told. True beside it: admitted, once the
/// migration has ended, only to carry the source's last frames.
fn admit(
    daemon: &Daemon,
    hello: &Hello,
    identity: Option<&Identity>,
) -> Result<(Arc<Migration>, bool), (Status, String)> {
    let unknown = || {
        (
            Status::UnknownMigration,
            format!("no incoming migration \"{}\"", hello.migration),
        )
    };
    let migration = daemon.get(&hello.migration).ok_or_else(unknown)?;
    if migration.spec.role != Role::Incoming {
        return Err(unknown());
    }
    // A control link presents the one-time token; a data connection what its control link
    // was handed (the token itself on a version 1 link).
    // A control link that takes over from a broken one presents the epoch's credential:
    // the one-time token is spent.
    let takes_over = hello.flags & migproxy_proto::FLAG_RESUME != 0;
    // A resume (either kind) may come after the migration ended here: the credential its
    // epoch had still tells the source daemon, and only it, how it ended (below).
    let resumes =
        takes_over || hello.kind == Kind::Data && hello.flags & migproxy_proto::FLAG_RESUME != 0;
    // A control link after the first (a recovery after a pause, a source that resumed
    // before this host noticed, one that only tells a cancel) presents the credential the
    // source was handed, as a takeover does: the token alone, which the orchestration
    // holds too, must not pause a running migration.
    let recovery = match hello.kind == Kind::Control && !takes_over {
        true => migration.resumable.recovers(&hello.token),
        false => None,
    };
    let presented = match hello.kind {
        // (Once the migration has ended, the token still hears how: it was single-use.)
        Kind::Control if recovery.is_some() => {
            recovery == Some(true)
                || migration.state().is_final() && migration.spec.token.matches(&hello.token)
        }
        Kind::Control if !takes_over => migration.spec.token.matches(&hello.token),
        Kind::Control | Kind::Data => {
            migration.admits_data(&hello.token)
                || resumes && migration.state().is_final() && migration.resumable.was(&hello.token)
        }
    };
    if !presented {
        let what = match hello.kind {
            Kind::Control if recovery.is_some() => {
                "wrong credential (a control link after the first presents the one its source was handed, not the token)"
            }
            Kind::Control => "wrong token",
            Kind::Data => "wrong credential (not the one its control link was given)",
        };
        return Err((
            Status::BadToken,
            format!("{what} for migration \"{}\"", hello.migration),
        ));
    }
    // The credential proves what the source daemon was told, the certificate who dials: a
    // resume from another certificate (an allowed host holding a stolen credential) is
    // refused, and learns nothing, not even how the migration ended.
    if (resumes || recovery.is_some()) && !migration.resumable.same_identity(identity) {
        return Err((
            Status::Refused,
            format!(
                "migration \"{}\": a connection that resumes (a channel, or a control link after the first) must come from the control link's certificate (this one is {})",
                hello.migration,
                identity.map_or_else(|| "none".to_owned(), ToString::to_string)
            ),
        ));
    }
    match migration.state() {
        State::Pending | State::Active | State::Resuming | State::Paused => Ok((migration, false)),
        // The source ended too, and brings its last frames: heard once (`last_frames`).
        _ if takes_over
            && hello.flags & migproxy_proto::FLAG_ENDED != 0
            && migration.takes_last_frames() =>
        {
            Ok((migration, true))
        }
        state => Err((
            // Said outright to a source that can act on it (it ends cancelled too).
            match state {
                State::Cancelled if hello.version >= 2 => Status::Cancelled,
                _ => Status::Expired,
            },
            format!(
                "migration \"{}\" is {}{}",
                hello.migration,
                state.name(),
                migration
                    .snapshot()
                    .cancelled_by
                    .map_or_else(String::new, |by| format!(" (cancelled by the {by})"))
            ),
        )),
    }
}
