//! The wire protocol between migproxy daemons. Bytes in, typed messages out: no sockets, no
//! async, no allocation beyond the decoded values, so it can be read, tested and fuzzed alone.
//!
//! # Connections
//!
//! The source daemon (where the source QEMU runs) dials the destination daemon's peer port.
//! Every connection starts with a [`Hello`] from the dialler, answered by one [`HelloReply`]:
//!
//! - one **control** connection per migration, opened first, carries [`Control`] frames both
//!   ways for the whole migration;
//! - one **data** connection per migration channel (QEMU's main stream, each multifd channel,
//!   the postcopy preempt channel), in the order the source QEMU opened them. After the reply
//!   it carries the raw QEMU stream both ways, untouched.
//!
//! # A migration with two channels, then a cancel, then a failure
//!
//! ```text
//!  source daemon                                          destination daemon
//!    │ ── Hello{control, id, token, flags} ────────────────────────► │ token checked
//!    │ ◄─────────────────────────────── HelloReply{Ok, credential} ── │ migration active
//!    │ ── Hello{data, id, channel 0, credential} ──────────────────► │
//!    │ ◄──────────────────────────────────────── HelloReply{Ok} ──── │ connects QEMU #0
//!    │ ◄────────────────────────────────── ChannelOpened{0} (ctl) ── │
//!    │ ── Hello{data, id, channel 1, credential} ──────────────────► │ waits for #0, then
//!    │ ◄──────────────────────────────────────── HelloReply{Ok} ──── │ connects QEMU #1
//!    │ ◄────────────────────────────────── ChannelOpened{1} (ctl) ── │
//!    │ ═══ QEMU stream, both ways, on each data connection ═════════ │
//!    │ ── Heartbeat ──────────────────────────────────────────────► │ every second, both
//!    │ ◄────────────────────────────────────────────── Heartbeat ─── │ ways
//!    │                                                               │
//!    │ (a) normal end: every channel closed cleanly on each side      │
//!    │ ── ChannelClosed{0,completed,bytes} ────────────────────────► │
//!    │ ◄──────────────────────────── ChannelClosed{0,completed,…} ── │
//!    │ ── Done{2 channels, bytes, verdict} ────────────────────────► │ equal counts:
//!    │ ◄─────────────────────────────────── Done{2 channels, …} ─── │ both `completed`
//!    │                                  (`transferred` when neither knows QEMU's verdict) │
//!    │                                                               │
//!    │ (b) cancel on either host                                     │
//!    │ ── Cancel{by source} ───────────────────────────────────────► │ both abort every
//!    │    (data connections aborted)                                 │ channel: `cancelled`
//!    │                                                               │
//!    │ (c) failure on either host, e.g. destination QEMU vanished    │
//!    │ ◄──── Failed{destination, QEMU leg, channel 0, write, EPIPE…} ─ │ both abort every
//!    │    `failed`, with the destination's attribution               │ channel: `failed`
//! ```
//!
//! A host that sees a data connection break waits briefly for the peer's [`Control::Failed`]
//! or [`Control::Cancel`] before blaming the network, so both hosts report the first cause.
//!
//! # Credentials
//!
//! The one-time token admits the control link only. From version 2 on, the destination's
//! acceptance of a control link carries a fresh 256-bit credential (64 hex digits in the
//! reply's message), and the data connections of that epoch present it in place of the
//! token: whoever else holds the token cannot add a channel. A version 1 link has none, and
//! its data connections present the token.
//!
//! The token admits the **first** control link only. A later one — after a pause (a
//! recoverable migration's new epoch), from a source that resumed before the destination
//! noticed, or one that only tells a cancel ([`FLAG_CANCEL`]: the destination cancels and
//! refuses the link with [`Status::Cancelled`], attaching nothing) — presents the last
//! credential its source was handed; the destination also takes the one the latest link
//! presented, in case that link's acceptance was lost. A failure ends an epoch as
//! [`Control::Failed`] where the sender paused (a recoverable peer pauses too) and as
//! [`Control::GaveUp`] where it failed for good (the peer fails too), so both hosts tell one
//! story whatever each has polled of its QEMU.
//!
//! # Postcopy recovery: a link kept across a pause
//!
//! A recoverable migration whose epoch ends in a pause while its control link is sound
//! keeps the link (version 2 on). Each side, once paused, sends [`Control::Parked`] after its
//! last frame of the epoch and reads until the other's; with both sent and received, the link
//! is quiet both ways, and the source starts the next epoch on it with a control hello (the
//! last credential), which the destination vets as on a new connection. The certificate is
//! the one the link was opened with. A side that ended for good, or never reads the other's
//! `Parked`, closes the link instead, and the source dials a new one.
//!
//! ```text
//!  source (paused)                                            destination (paused)
//!    │ ── Failed{…} ─────────────────────────────────────────────────► │ pauses too
//!    │ ── Parked ──────────────────► │ ◄───────────────────── Parked ── │
//!    │ ── Hello{control, id, credential, first channel} ──────────────► │ (same link)
//!    │ ◄───────────────────────────────────── HelloReply{Ok, credential} │ next epoch
//! ```
//!
//! # The kernel data path
//!
//! A source daemon that can hand its QEMU the data connection's socket sets
//! [`FLAG_KERNEL_PATH`] in its control hello. The destination's acceptance then says what it
//! chose after the credential: ` kernel` (the one data connection, admitted as any other, is
//! handed to each QEMU and carries QEMU's stream directly, in clear) or ` relay: WHY`. A
//! destination built before the flag refuses it as malformed.
//!
//! # Versions
//!
//! [`Hello`] carries the highest protocol version the dialler speaks; its layout is the same in
//! every version. The destination accepts any version from [`MIN_VERSION`] (its own and the
//! one before) and answers with the version both will speak, the lower of the two
//! ([`negotiate`]); an older one gets [`Status::UnsupportedVersion`]. The dialler accepts a
//! reply in [`MIN_VERSION`]..=[`VERSION`] and speaks that version on the connection.
//!
//! - Version 1: the first.
//! - Version 2: `Done` carries the host's evidence that QEMU finished ([`Verdict`]); resumable
//!   channels (the flags, `Progress`, `Broken`, `Received` and `Hurry` frames), the
//!   `cancelled` status, and `GaveUp` (a failure for good, which no pause follows; version 1
//!   gets it as `Failed`). Version 2 is not released yet and grew in place: `Received`,
//!   `Hurry`, `cancelled`, `GaveUp` and `Parked` came last, and a daemon built before them
//!   does not read them. Until version 2 is fixed by a release, both hosts run the same build.
//!
//! # Resumable channels
//!
//! A channel can go on, on a new data connection, from the exact byte where the old one
//! broke (issue #18; the engine is `migproxy::relay::resume`). The source asks for it with
//! [`FLAG_RESUMABLE`] in its control hello (version 2 on: resumed connections present the
//! credential); the destination agrees by ending its acceptance's message with
//! ` resumable`. Without both, the epoch speaks none of what follows. A destination built
//! before the flag refuses it as malformed.
//!
//! On a resumable epoch each side keeps what it read from its QEMU until the peer
//! acknowledges it in [`Control::Progress`], sent periodically (cumulative: the newest
//! wins), and a broken data connection (reset, or silent past its budget) is not a failure:
//! the source dials a new one for the channel.
//!
//! ```text
//!  source daemon                                          destination daemon
//!    │ ═══ channel n's stream ══════════════╳ broken                 │
//!    │ ◄──────────────────────────────── Broken{n, connection k} ── │ a break only it saw
//!    │ drops connection k too (not a newer one it already dialled)   │
//!    │ ── Hello{data, id, channel n, credential, FLAG_RESUME} ─────► │ channel n goes on,
//!    │ ◄──────────────────────────────────────── HelloReply{Ok} ──── │ not a new one
//!    │ ── Progress{delivered: s, end} (16 bytes) ──────────────────► │ replays its
//!    │ ◄────────────────────────── Progress{delivered: d, end} ───── │ direction from s
//!    │ replays its direction from d                                  │
//!    │ ═══ channel n's stream goes on, both ways ═══════════════════ │
//!    │ ── Progress{n, delivered, end} (ctl) ───────────────────────► │ periodically, both
//!    │ ◄───────────────────────────── Progress{n, delivered, end} ── │ ways
//!    │ ── Hurry{n} (ctl: its retention is full) ───────────────────► │ (either side, for
//!    │ ◄────── Progress{n, delivered, end} (at once, or at the next news) │  its direction)
//! ```
//!
//! `delivered` counts the bytes of the peer's direction written to this side's QEMU; `end`
//! is this side's own direction's length, once its QEMU ended it. Each side writes its
//! [`Progress`] hello before it reads the peer's, so neither waits on the other.
//!
//! The control link of a resumable epoch may break too: the source dials one that takes
//! over (a control hello with [`FLAG_RESUME`] and the credential). Its first frame, both
//! ways, is [`Control::Received`]: how many of the epoch's sequenced frames (all but
//! heartbeats, progress and hurries, [`Control::is_sequenced`]) that side has received. Each side then
//! sends again those past the other's count, before anything new.
//!
//! ```text
//!    │ ══ control link ═══════╳ broken (Cancel was in it)                   │
//!    │ ── Hello{control, id, credential, FLAG_RESUME} ────────────────────► │
//!    │ ◄───────────────────────────────────────────── HelloReply{Ok} ────── │
//!    │ ── Received{frames: 4} ──────► │ ◄────── Received{frames: 1} ─────── │
//!    │ ── Cancel (its 2nd frame, sent again) ─────────────────────────────► │
//! ```
//!
//! A source whose migration ended while no control link was up (a cancel, a failure) dials
//! such a link to deliver its last frames, with [`FLAG_ENDED`] beside `FLAG_RESUME`. A
//! destination still running takes it over as any other. One that has ended too (at its
//! own resume timeout, say) accepts it once, with ` ended` as the acceptance's message, if
//! it ended with its own link down: then both sides send their `Received`, then the frames
//! the other has not had (each its own end: a `Cancel`, a `GaveUp`), and close. Neither
//! changes its state; each records the other's end as heard late.
//!
//! # Limits
//!
//! A hello body is at most [`MAX_HELLO_BODY`] bytes and a control frame at most
//! [`MAX_CONTROL_FRAME`]; larger lengths are rejected before anything is read or allocated.
#![forbid(unsafe_code)]

mod codec;
mod control;
mod hello;
mod resume;

pub use codec::DecodeError;
pub use control::{
    Attribution, ChannelEnd, Control, Direction, Host, Leg, MAX_CONTROL_FRAME, Op, Totals, Verdict,
    frame_len as control_frame_len,
};
pub use hello::{
    FLAG_CANCEL, FLAG_ENDED, FLAG_KERNEL_PATH, FLAG_RECOVERABLE, FLAG_RESUMABLE, FLAG_RESUME,
    HELLO_HEADER, Hello, HelloReply, Kind, MAGIC, MAX_HELLO_BODY, MAX_ID, MIN_VERSION, Status,
    TOKEN_LEN, VERSION, hello_body_len, negotiate, reply_len, valid_id,
};
pub use resume::{PROGRESS_LEN, Progress};

/// The fuzz target's property on a deterministic stream of mutated inputs, on every test run
/// (`fuzz/` explores far more with cargo-fuzz).
#[cfg(test)]
mod smoke_fuzz {
    use super::*;

    /// xorshift64*: deterministic and dependency-free.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
    }

    fn seeds() -> Vec<Vec<u8>> {
        let mut seeds = Vec::new();
        let hello = Hello {
            version: VERSION,
            kind: Kind::Data,
            migration: "vm".into(),
            channel: 1,
            token: [7; TOKEN_LEN],
            flags: 0,
        };
        let mut buf = Vec::new();
        hello.encode(&mut buf);
        seeds.push(buf);
        let mut buf = Vec::new();
        Hello {
            flags: FLAG_RESUME,
            ..hello
        }
        .encode(&mut buf);
        seeds.push(buf);
        let mut buf = Vec::new();
        Control::Failed(Attribution {
            host: Host::Source,
            leg: Leg::Peer,
            channel: Some(1),
            direction: Some(Direction::ToSource),
            op: Op::Read,
            errno: Some("ECONNRESET".into()),
            message: "reset".into(),
            bytes: Totals::default(),
            elapsed_ms: 1,
        })
        .encode(&mut buf);
        Control::Done {
            channels: 1,
            bytes: Totals::default(),
            verdict: Verdict::ReturnPath,
        }
        .encode(&mut buf);
        Control::Progress {
            channel: 1,
            delivered: 1 << 20,
            end: Some(0),
        }
        .encode(&mut buf);
        Control::Broken {
            channel: 1,
            connection: 1,
        }
        .encode(&mut buf);
        seeds.push(buf);
        seeds
    }

    #[test]
    fn mutated_inputs_never_panic_and_round_trip() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for seed in seeds() {
            for _ in 0..20_000 {
                let mut data = seed.clone();
                for _ in 0..=rng.next() % 4 {
                    let at = (rng.next() as usize) % data.len();
                    data[at] = rng.next() as u8;
                }
                data.truncate((rng.next() as usize) % (data.len() + 1));
                if let Ok(hello) = Hello::decode(&data) {
                    let mut buf = Vec::new();
                    hello.encode(&mut buf);
                    assert_eq!(Hello::decode(&buf), Ok(hello));
                }
                let _ = HelloReply::decode(&data);
                if let Ok((message, _)) = Control::decode_frame(&data) {
                    let mut buf = Vec::new();
                    message.encode(&mut buf);
                    assert_eq!(Control::decode_frame(&buf), Ok((message, buf.len())));
                }
            }
        }
    }
}

/// Replays the fuzzer's corpus (`fuzz/seeds/decode`, committed) through the same property as
/// the fuzz target, on every test run.
#[cfg(test)]
mod corpus {
    use super::*;

    #[test]
    fn fuzz_corpus_replays_cleanly() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fuzz/seeds/decode");
        let entries = std::fs::read_dir(dir).expect("the committed fuzz corpus");
        let mut replayed = 0;
        for entry in entries {
            let data = std::fs::read(entry.expect("corpus entry").path()).expect("corpus file");
            if let Ok(hello) = Hello::decode(&data) {
                let mut buf = Vec::new();
                hello.encode(&mut buf);
                assert_eq!(Hello::decode(&buf), Ok(hello));
            }
            let _ = HelloReply::decode(&data);
            let mut at = 0;
            while let Ok((message, used)) = Control::decode_frame(&data[at..]) {
                let mut buf = Vec::new();
                message.encode(&mut buf);
                assert_eq!(Control::decode_frame(&buf), Ok((message, buf.len())));
                at += used;
            }
            replayed += 1;
        }
        assert!(replayed >= 100, "only {replayed} corpus inputs");
    }
}
