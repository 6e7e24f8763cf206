//! Resumable channels in the daemon (issue #18): what joins each channel's engine
//! ([`relay::resume`](crate::relay::resume)) to the control link, which carries both sides'
//! progress, and to the data connections that come again after a break.
//!
//! ```text
//!  source daemon                                            destination daemon
//!   engine n ── Progress{n, delivered, end} ── control link ──► peer progress of n
//!   engine n ◄─ Progress{n, delivered, end} ── (every 20 ms, when it changed) ── engine n
//!      ╳ data connection k of channel n breaks (seen by the source, or Broken{n, k})
//!   redial: Hello{data, n, credential, FLAG_RESUME} ──► admitted to channel n: its engine
//!      ◄── HelloReply{Ok} ── Progress hellos both ways ──► replay from the peer's offset
//! ```
//!
//! Both daemons agree on it per epoch: the source asks ([`FLAG_RESUMABLE`] on its control
//! hello) where it has a resume timeout, and the destination, where it has one too and the
//! data goes through the relay, says ` resumable` after the credential in its acceptance.
//!
//! Only the destination tells of a break it saw itself ([`Control::Broken`]): the source
//! redials at once when it sees one, and a new connection replaces the old one on the
//! destination; a source that saw nothing (it had read the whole stream, and waits only for
//! acknowledgements) learns of it from the destination and redials. Both sides number a
//! channel's connections alike (the first is 1; each one dialled again, and admitted,
//! counts), and `Broken` names the one that broke: a source already on a newer one ignores
//! it, and a break the replacement itself caused is not told, so one break costs one new
//! connection. An acceptance lost to a reset is counted by the destination only: a number
//! ahead of the source's names the one in use, and the source takes that count.
//!
//! [`FLAG_RESUMABLE`]: migproxy_proto::FLAG_RESUMABLE

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use migproxy_proto::Control;
use tokio::sync::{mpsc, watch};

use super::sequence::Sequence;
use crate::daemon::token::Token;
use crate::relay::resume::{PeerLink, Progress, Sides};
use crate::tls::Identity;
use crate::transport::Stream;

/// Why a control link could not take over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejoin {
    /// The link it replaces has not given up yet: it is told to; try again at once.
    Busy,
    /// Nothing to take over: the migration ended, or is not resumable.
    Refused,
}

/// The resumable channels of one migration.
#[derive(Debug, Default)]
pub struct Resumable {
    /// Both daemons agreed on the current epoch's control link.
    on: AtomicBool,
    channels: Mutex<HashMap<u32, Entry>>,
    outages: Mutex<Outages>,
    /// Destination, over TLS: the certificate of the control link that agreed on them; a
    /// connection that comes again must present the same.
    identity: Mutex<Option<Identity>>,
    /// The control link, while it is down.
    link_down: Mutex<Option<LinkDown>>,
    /// The last progress of each channel that ended: a control link that takes over tells
    /// it again (the one that broke may have taken it down with it).
    finals: Mutex<BTreeMap<u32, Control>>,
    /// Source: tries to bring the control link back in the current outage.
    pub link_attempts: AtomicU32,
    /// Whether the last state event said `resuming` (taken under the migration's lock).
    shown: Mutex<bool>,
    /// The epoch's sequenced control frames, both ways: what a link that takes over sends
    /// again.
    pub sequence: Mutex<Sequence>,
    /// The current epoch's data credential, kept after the epoch ends (when the migration
    /// forgets it): the source presents it on a link that takes over to deliver its last
    /// frames; the destination tells whoever holds it how the migration ended.
    credential: Mutex<Option<Token>>,
    /// Destination: the credential the latest control link presented, which its source
    /// provably holds. A control link after a pause presents the last credential its
    /// source was handed: this one when the acceptance of the latest link was lost on the
    /// way (however many times in a row).
    previous: Mutex<Option<Token>>,
    /// Wakes the control link's writer: the peer hurried a channel (its progress is due
    /// at once, and the busy period after it).
    hurry: tokio::sync::Notify,
}

/// A control link outage: since when, why, and which one (a later outage is another).
#[derive(Debug, Clone)]
pub struct LinkDown {
    pub since: Instant,
    pub cause: migproxy_proto::Attribution,
    pub number: u64,
}

/// Every outage of the migration's channels, as this host saw them.
#[derive(Debug, Default, Clone)]
pub struct Outages {
    /// Outages ended by a new connection.
    pub resumptions: u32,
    /// Their time, from the break to the new connection.
    pub lost: Duration,
    /// Bytes sent again after them.
    pub replayed: u64,
    /// The channels without a connection now, since when.
    pub open: BTreeMap<u32, Instant>,
    /// Control link outages, ended or not.
    pub link_outages: u64,
    /// The time of those that ended.
    pub link_lost: Duration,
}

impl Outages {
    /// The time lost, the open outages counted until now.
    pub fn lost_until_now(&self) -> Duration {
        let open: Duration = self.open.values().map(Instant::elapsed).sum();
        self.lost + open
    }
}

/// One channel's wiring, held while its engine runs.
#[derive(Debug)]
struct Entry {
    mine: watch::Receiver<Progress>,
    /// What the control link last told the peer of `mine`.
    told: Option<Progress>,
    peer: watch::Sender<Progress>,
    breaks: watch::Sender<u64>,
    /// Destination: where the connections that come again for it go.
    again: Option<mpsc::Sender<Stream>>,
    /// The number of the connection its engine uses (the first is 1): each connection
    /// dialled again (source), or come again and taken (destination), counts.
    connection: Arc<AtomicU32>,
    /// When the peer last asked for its progress at once (`Hurry`) with nothing new to
    /// tell: the next is told at the busy period, not the idle one, for [`HURRY_HEEDED`]
    /// (tokio's clock, which the tests pause).
    hurried: Option<tokio::time::Instant>,
}

impl Entry {
    /// The channel's progress if it changed since it was last told, now told.
    fn untold(&mut self, index: u32) -> Option<Control> {
        let now = *self.mine.borrow();
        if self.told == Some(now) {
            return None;
        }
        self.told = Some(now);
        self.hurried = None;
        Some(Control::Progress {
            channel: index,
            delivered: now.delivered,
            end: now.end,
        })
    }
}

/// How long a hurry keeps the control link at its busy period with nothing new to tell: a
/// peer whose retention stays full because nothing is delivered here (this host's QEMU does
/// not read) hurries once and then waits; the link goes back to its idle period, which
/// still tells the next news within 20 ms, instead of waking every 2 ms until the stall
/// timeout, or for ever where there is none.
const HURRY_HEEDED: Duration = Duration::from_secs(1);

/// What a channel's engine and its peer link get when it is registered.
#[derive(Debug)]
pub struct Registration {
    pub sides: Sides,
    /// Destination: the connections that come again for it.
    pub again: Option<mpsc::Receiver<Stream>>,
    /// The number of the connection in use, shared with the registry.
    pub connection: Arc<AtomicU32>,
}

impl Resumable {
    /// Channel `index` lost its connection (nothing, if it has ended since: its outage
    /// ended with it).
    pub fn interrupted(&self, index: u32) {
        let channels = self.channels();
        if !channels.contains_key(&index) {
            return;
        }
        let mut outages = self.outages.lock().unwrap_or_else(|p| p.into_inner());
        outages.open.entry(index).or_insert_with(Instant::now);
    }

    /// Channel `index` goes on, on a new connection, after `lost`, `replayed` bytes sent
    /// again.
    pub fn resumed(&self, index: u32, lost: Duration, replayed: u64) {
        let mut outages = self.outages.lock().unwrap_or_else(|p| p.into_inner());
        outages.open.remove(&index);
        outages.resumptions += 1;
        outages.lost += lost;
        outages.replayed += replayed;
    }

    /// Whether a channel, or the control link, has no connection now.
    pub fn any_down(&self) -> bool {
        // One lock at a time: `link_broke` takes them the other way round.
        let channel_down = {
            let outages = self.outages.lock().unwrap_or_else(|p| p.into_inner());
            !outages.open.is_empty()
        };
        channel_down || self.link_down().is_some()
    }

    /// Whether the last state event said `resuming`.
    pub fn shown(&self) -> std::sync::MutexGuard<'_, bool> {
        self.shown.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The epoch ended: its outages end with it, their time lost and none resumed (a view
    /// of a migration that ended, or paused, shows nothing down).
    pub fn close_outages(&self) {
        // As `link_broke` takes them: the link's first.
        let down = self
            .link_down
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let mut outages = self.outages.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(down) = down {
            outages.link_lost += down.since.elapsed();
        }
        let open = std::mem::take(&mut outages.open);
        outages.lost += open.values().map(Instant::elapsed).sum::<Duration>();
    }

    /// The control link's outage, if it is down.
    pub fn link_down(&self) -> Option<LinkDown> {
        self.link_down
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The control link broke with `cause`: returns the outage's number (the first break
    /// of an outage counts; a second one while down keeps it).
    pub fn link_broke(&self, cause: migproxy_proto::Attribution) -> u64 {
        let mut down = self.link_down.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(down) = down.as_ref() {
            return down.number;
        }
        let mut outages = self.outages.lock().unwrap_or_else(|p| p.into_inner());
        outages.link_outages += 1;
        let number = outages.link_outages;
        self.link_attempts.store(0, Ordering::Relaxed);
        *down = Some(LinkDown {
            since: Instant::now(),
            cause,
            number,
        });
        number
    }

    /// The control link is back: how long it was down.
    pub fn link_back(&self) -> Option<Duration> {
        let down = self
            .link_down
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()?;
        let lost = down.since.elapsed();
        let mut outages = self.outages.lock().unwrap_or_else(|p| p.into_inner());
        outages.link_lost += lost;
        Some(lost)
    }

    /// The outages so far.
    pub fn outages(&self) -> Outages {
        self.outages
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether the current epoch's channels are resumable.
    pub fn on(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    /// What the current epoch's control link settled.
    pub fn settle(&self, on: bool) {
        self.on.store(on, Ordering::Relaxed);
    }

    /// Whether `presented` is the current (or, once it ended, the last) epoch's credential.
    pub fn was(&self, presented: &[u8; migproxy_proto::TOKEN_LEN]) -> bool {
        self.credential().is_some_and(|c| c.matches(presented))
    }

    /// The data credential the epoch's control link was handed (the destination's: handed
    /// out).
    pub fn remember(&self, credential: Option<Token>) {
        self.remember_after(credential, None);
    }

    /// Destination: as [`remember`](Self::remember), for a link that presented
    /// `presented` (a credential [`recovers`](Self::recovers) took, or nothing: the token),
    /// which stays good for the next link in case this acceptance is lost.
    pub fn remember_after(
        &self,
        credential: Option<Token>,
        presented: Option<&[u8; migproxy_proto::TOKEN_LEN]>,
    ) {
        let mut current = self.credential.lock().unwrap_or_else(|p| p.into_inner());
        let mut previous = self.previous.lock().unwrap_or_else(|p| p.into_inner());
        let held = presented.and_then(|presented| {
            [current.take(), previous.take()]
                .into_iter()
                .flatten()
                .find(|c| c.matches(presented))
        });
        (*current, *previous) = (credential, held);
    }

    /// Destination: whether a control link after the first presents a credential its
    /// source was handed (the latest epoch's, or the one before when the latest
    /// acceptance was lost on the way); `None` while no link was ever handed one (the
    /// first link, or a version 1 source: the one-time token is what it presents).
    pub fn recovers(&self, presented: &[u8; migproxy_proto::TOKEN_LEN]) -> Option<bool> {
        let current = self.credential();
        let previous = self
            .previous
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if current.is_none() && previous.is_none() {
            return None;
        }
        let matches = |c: &Option<Token>| c.as_ref().is_some_and(|c| c.matches(presented));
        Some(matches(&current) || matches(&previous))
    }

    /// The epoch's data credential, even after it ended.
    pub fn credential(&self) -> Option<Token> {
        self.credential
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The epoch's sequenced control frames.
    pub fn sequence(&self) -> std::sync::MutexGuard<'_, Sequence> {
        self.sequence.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Destination: the epoch's control link agreed with this certificate (`None`: clear).
    pub fn bind(&self, identity: Option<&Identity>) {
        *self.identity.lock().unwrap_or_else(|p| p.into_inner()) = identity.cloned();
    }

    /// Whether a connection that comes again presents the control link's certificate (the
    /// same subject and names). The credential alone does not do: it proves what the
    /// source daemon was told, the certificate who is dialling.
    pub fn same_identity(&self, identity: Option<&Identity>) -> bool {
        let bound = self.identity.lock().unwrap_or_else(|p| p.into_inner());
        bound.as_ref() == identity
    }

    fn channels(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Entry>> {
        self.channels.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Channel `index` starts: the sides its engine gets, and, on the destination (`again`),
    /// where the connections that come again for it arrive.
    pub fn register(&self, index: u32, again: bool) -> Registration {
        let (mine_tx, mine) = watch::channel(Progress::default());
        let (peer, peer_rx) = watch::channel(Progress::default());
        let (breaks, breaks_rx) = watch::channel(0);
        let (again, arrivals) = match again {
            true => {
                let (tx, rx) = mpsc::channel(4);
                (Some(tx), Some(rx))
            }
            false => (None, None),
        };
        let connection = Arc::new(AtomicU32::new(1));
        let entry = Entry {
            mine,
            told: None,
            peer,
            breaks,
            again,
            connection: Arc::clone(&connection),
            hurried: None,
        };
        self.channels().insert(index, entry);
        let sides = Sides {
            mine: mine_tx,
            peer: peer_rx,
            breaks: breaks_rx,
            // Set by the channel, which can reach the control link.
            hurry: None,
        };
        Registration {
            sides,
            again: arrivals,
            connection,
        }
    }

    /// Channel `index` ended: nothing more is told of it, and nothing comes again for it.
    /// Returns its last progress if the peer was not told it yet: the peer waits for it (its
    /// last acknowledgement, or this side's end), so it must go out now.
    pub fn forget(&self, index: u32) -> Option<Control> {
        let entry = self.channels().remove(&index)?;
        let mut outages = self.outages.lock().unwrap_or_else(|p| p.into_inner());
        // An outage the channel ended in (it needed no new connection): its time is lost.
        if let Some(since) = outages.open.remove(&index) {
            outages.lost += since.elapsed();
        }
        drop(outages);
        let last = *entry.mine.borrow();
        let frame = Control::Progress {
            channel: index,
            delivered: last.delivered,
            end: last.end,
        };
        let mut finals = self.finals.lock().unwrap_or_else(|p| p.into_inner());
        finals.insert(index, frame.clone());
        (entry.told != Some(last)).then_some(frame)
    }

    /// A new control link (the first, or one that takes over): every channel's progress is
    /// told again, and the last of those that ended, since the link that broke may have
    /// lost them. Returns those last ones, to send first.
    pub fn relink(&self) -> Vec<Control> {
        for entry in self.channels().values_mut() {
            entry.told = None;
        }
        let finals = self.finals.lock().unwrap_or_else(|p| p.into_inner());
        finals.values().cloned().collect()
    }

    /// Whether channel `index` runs resumable here (a connection may come again for it).
    pub fn has(&self, index: u32) -> bool {
        self.channels().contains_key(&index)
    }

    /// The peer's progress on channel `index`, from the control link (newest wins: it only
    /// grows).
    pub fn peer_progress(&self, index: u32, progress: Progress) {
        if let Some(entry) = self.channels().get(&index) {
            entry.peer.send_if_modified(|seen| {
                // An end once told stays: a late frame from before it does not take it back.
                let progress = Progress {
                    end: progress.end.or(seen.end),
                    ..progress
                };
                let newer = progress.delivered >= seen.delivered && progress != *seen;
                if newer {
                    *seen = progress;
                }
                newer
            });
        }
    }

    /// The peer (the destination) found channel `index`'s connection number `connection`
    /// broken: this side drops it too, unless it has moved on to a newer one. A number
    /// ahead of this side's is the one in use too: the destination counts every connection
    /// it admitted, this side only those whose acceptance it read, so an acceptance lost to
    /// a reset leaves it behind. It takes the destination's count from then on: otherwise
    /// each later break the destination alone saw would be ignored, and the channel would
    /// wait for its resume timeout.
    pub fn broken(&self, index: u32, connection: u32) {
        if let Some(entry) = self.channels().get(&index)
            && entry.connection.fetch_max(connection, Ordering::Relaxed) <= connection
        {
            entry.breaks.send_modify(|n| *n += 1);
        }
    }

    /// Destination: a connection came again for channel `index`; the one in use, if any, is
    /// replaced. Given back when the channel takes none (ended, or not resumable).
    pub fn arrived(&self, index: u32, stream: Stream) -> Result<(), Stream> {
        let channels = self.channels();
        let Some(entry) = channels.get(&index) else {
            return Err(stream);
        };
        let Some(again) = &entry.again else {
            return Err(stream);
        };
        again.try_send(stream).map_err(|error| error.into_inner())?;
        entry.breaks.send_modify(|n| *n += 1);
        Ok(())
    }

    /// The progress frames due on the control link: each channel whose progress changed
    /// since it was last told.
    pub fn due(&self) -> Vec<Control> {
        let mut channels = self.channels();
        channels
            .iter_mut()
            .filter_map(|(index, entry)| entry.untold(*index))
            .collect()
    }

    /// Whether a peer waits for a channel's progress (it hurried, and nothing new was
    /// delivered since): the control link looks again at its busy period.
    pub fn awaited(&self) -> bool {
        self.channels()
            .values()
            .filter_map(|entry| entry.hurried)
            .any(|at| at.elapsed() < HURRY_HEEDED)
    }

    /// The peer's retention for channel `index` is full (`Hurry`): the control link's
    /// writer is woken to tell its progress at once if there is news, and the next news at
    /// the busy period otherwise. Nothing is queued: a peer that hurries a thousand times
    /// gets each change told once.
    pub fn hurried(&self, index: u32) {
        if let Some(entry) = self.channels().get_mut(&index) {
            entry.hurried = Some(tokio::time::Instant::now());
            self.hurry.notify_one();
        }
    }

    /// Resolves when the peer hurried a channel ([`hurried`](Self::hurried)).
    pub async fn hurry_asked(&self) {
        self.hurry.notified().await;
    }
}

/// Destination: the connections of one channel, the first as admitted, the next as they
/// come again (the newest, when several waited).
#[derive(Debug)]
pub struct Arrivals {
    pub first: Option<Stream>,
    pub again: mpsc::Receiver<Stream>,
    /// Counts each one that came again, the skipped ones too (as the source counts its
    /// dials).
    pub connection: Arc<AtomicU32>,
}

impl PeerLink for Arrivals {
    async fn connect(&mut self) -> io::Result<Stream> {
        if let Some(first) = self.first.take() {
            return Ok(first);
        }
        let mut newest = self.again.recv().await.ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotConnected, "the channel was forgotten")
        })?;
        self.connection.fetch_add(1, Ordering::Relaxed);
        while let Ok(newer) = self.again.try_recv() {
            newest = newer;
            self.connection.fetch_add(1, Ordering::Relaxed);
        }
        Ok(newest)
    }

    fn connection(&self) -> u32 {
        self.connection.load(Ordering::Relaxed)
    }
}

/// The acceptance of a control link, marked as agreeing to resumable channels: ` resumable`
/// right after the credential (at most 255 bytes, as every reply message).
pub fn mark(acceptance: &str) -> String {
    let mut marked = match acceptance.split_once(' ') {
        Some((credential, rest)) => format!("{credential} {RESUMABLE} {rest}"),
        None => format!("{acceptance} {RESUMABLE}"),
    };
    while marked.len() > 255 {
        marked.pop();
    }
    marked
}

/// An acceptance without its mark, and whether it had one.
pub fn unmark(acceptance: &str) -> (String, bool) {
    let mut words = acceptance.splitn(3, ' ');
    let credential = words.next().unwrap_or_default();
    match (words.next(), words.next()) {
        (Some(RESUMABLE), None) => (credential.to_owned(), true),
        (Some(RESUMABLE), Some(rest)) => (format!("{credential} {rest}"), true),
        _ => (acceptance.to_owned(), false),
    }
}

const RESUMABLE: &str = "resumable";

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_credential_a_link_presented_stays_good_however_many_acceptances_are_lost() {
        let resumable = Resumable::default();
        let [a, b, c, d] = std::array::from_fn(|_| Token::generate());
        assert_eq!(
            resumable.recovers(a.bytes()),
            None,
            "no credential yet: the token"
        );
        resumable.remember_after(Some(a.clone()), None);
        assert_eq!(resumable.recovers(a.bytes()), Some(true));
        assert_eq!(resumable.recovers(b.bytes()), Some(false));
        // A link presents A; its acceptance (B), then the next one's (C), are lost.
        resumable.remember_after(Some(b.clone()), Some(a.bytes()));
        resumable.remember_after(Some(c.clone()), Some(a.bytes()));
        assert_eq!(resumable.recovers(a.bytes()), Some(true), "A still held");
        assert_eq!(
            resumable.recovers(b.bytes()),
            Some(false),
            "B never arrived"
        );
        // C arrives and the next link presents it: A is done with.
        resumable.remember_after(Some(d), Some(c.bytes()));
        assert_eq!(resumable.recovers(c.bytes()), Some(true));
        assert_eq!(resumable.recovers(a.bytes()), Some(false));
    }

    #[test]
    fn the_mark_rides_after_the_credential_and_comes_off_whole() {
        for acceptance in ["abc", "abc kernel", "abc relay: the peer is far"] {
            let marked = mark(acceptance);
            assert!(marked.starts_with("abc resumable"), "{marked}");
            assert_eq!(unmark(&marked), (acceptance.to_owned(), true));
            assert_eq!(unmark(acceptance), (acceptance.to_owned(), false));
        }
        let long = format!("abc relay: {}", "x".repeat(300));
        assert_eq!(mark(&long).len(), 255);
        // A reason that says the word is not a mark.
        assert!(!unmark("abc relay: resumable").1);
    }

    #[test]
    fn progress_is_told_when_it_changed_and_the_newest_peer_progress_wins() {
        let resumable = Resumable::default();
        let sides = resumable.register(3, false).sides;
        assert_eq!(resumable.due().len(), 1, "the first progress is told");
        assert!(resumable.due().is_empty(), "unchanged: nothing told");
        sides.mine.send_modify(|p| p.delivered = 10);
        assert_eq!(
            resumable.due(),
            vec![Control::Progress {
                channel: 3,
                delivered: 10,
                end: None
            }]
        );
        let newer = Progress {
            delivered: 20,
            end: None,
        };
        resumable.peer_progress(3, newer);
        resumable.peer_progress(3, Progress::default());
        assert_eq!(
            *sides.peer.borrow(),
            newer,
            "a late, older progress is ignored"
        );
        sides.mine.send_modify(|p| p.end = Some(4));
        let last = resumable.forget(3);
        assert!(
            matches!(last, Some(Control::Progress { end: Some(4), .. })),
            "the last progress, untold, goes out with the end: {last:?}"
        );
        assert!(resumable.due().is_empty());
        assert_eq!(resumable.forget(3), None);
    }

    #[tokio::test]
    async fn a_hurry_wakes_the_writer_and_keeps_the_busy_period_until_news_is_told() {
        let resumable = Resumable::default();
        let sides = resumable.register(2, false).sides;
        let _ = resumable.due();
        resumable.hurried(9);
        assert!(!resumable.awaited(), "no such channel: nothing awaited");
        resumable.hurried(2);
        let woken = tokio::time::timeout(Duration::from_secs(1), resumable.hurry_asked());
        assert!(woken.await.is_ok(), "the writer is woken");
        // Nothing new: nothing told, but the peer waits for the next news.
        assert!(resumable.due().is_empty());
        assert!(resumable.awaited());
        sides.mine.send_modify(|p| p.delivered = 6);
        assert_eq!(
            resumable.due(),
            vec![Control::Progress {
                channel: 2,
                delivered: 6,
                end: None
            }]
        );
        assert!(!resumable.awaited(), "told: no longer awaited");
        // Hurried again and again: still one frame per change.
        for _ in 0..1000 {
            resumable.hurried(2);
        }
        assert!(resumable.due().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_hurry_with_no_news_for_a_second_no_longer_keeps_the_busy_period() {
        let resumable = Resumable::default();
        let _sides = resumable.register(2, false).sides;
        let _ = resumable.due();
        resumable.hurried(2);
        tokio::time::advance(HURRY_HEEDED - Duration::from_millis(1)).await;
        assert!(resumable.awaited(), "within the second: awaited");
        tokio::time::advance(Duration::from_millis(2)).await;
        assert!(!resumable.awaited(), "past it: the idle period");
        resumable.hurried(2);
        assert!(resumable.awaited(), "a new hurry is heeded again");
    }

    #[test]
    fn an_end_once_told_is_not_taken_back_by_a_late_progress() {
        let resumable = Resumable::default();
        let sides = resumable.register(1, false).sides;
        let end = Progress {
            delivered: 8,
            end: Some(8),
        };
        resumable.peer_progress(1, end);
        resumable.peer_progress(
            1,
            Progress {
                delivered: 8,
                end: None,
            },
        );
        assert_eq!(*sides.peer.borrow(), end);
    }

    #[test]
    fn an_outage_told_after_its_channel_ended_is_not_one() {
        let resumable = Resumable::default();
        let _registration = resumable.register(2, false);
        resumable.interrupted(2);
        assert!(resumable.any_down());
        let _ = resumable.forget(2);
        assert!(!resumable.any_down(), "its outage ended with it");
        // The engine's word, late: the channel is gone.
        resumable.interrupted(2);
        assert!(!resumable.any_down());
        assert!(resumable.outages().open.is_empty());
    }

    #[tokio::test]
    async fn a_connection_that_comes_again_replaces_the_one_in_use() {
        let resumable = Resumable::default();
        let registered = resumable.register(0, true);
        let mut sides = registered.sides;
        let mut link = Arrivals {
            first: None,
            again: registered.again.unwrap(),
            connection: Arc::clone(&registered.connection),
        };
        let (a, _a) = tokio::net::UnixStream::pair().unwrap();
        let (b, mut b_end) = tokio::net::UnixStream::pair().unwrap();
        sides.breaks.mark_unchanged();
        resumable.arrived(0, Stream::Unix(a)).unwrap();
        resumable.arrived(0, Stream::Unix(b)).unwrap();
        assert!(sides.breaks.has_changed().unwrap(), "the one in use is cut");
        let Stream::Unix(mut newest) = link.connect().await.unwrap() else {
            panic!("not the unix stream")
        };
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        b_end.write_all(b"b").await.unwrap();
        let mut got = [0];
        newest.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"b", "the newest connection is taken");
        assert_eq!(
            registered.connection.load(Ordering::Relaxed),
            3,
            "the skipped one counts"
        );
        sides.breaks.mark_unchanged();
        resumable.broken(0, 2);
        assert!(
            !sides.breaks.has_changed().unwrap(),
            "an older connection's break"
        );
        resumable.broken(0, 3);
        assert!(sides.breaks.has_changed().unwrap(), "the one in use broke");
        // Counted ahead of this side (an acceptance this side never read): the one in use
        // too, and the count taken from then on.
        sides.breaks.mark_unchanged();
        resumable.broken(0, 5);
        assert!(sides.breaks.has_changed().unwrap(), "ahead: the one in use");
        assert_eq!(registered.connection.load(Ordering::Relaxed), 5);
        sides.breaks.mark_unchanged();
        resumable.broken(0, 4);
        assert!(
            !sides.breaks.has_changed().unwrap(),
            "older than the count taken"
        );
        let (c, _c) = tokio::net::UnixStream::pair().unwrap();
        assert!(
            resumable.arrived(9, Stream::Unix(c)).is_err(),
            "no such channel"
        );
    }
}
