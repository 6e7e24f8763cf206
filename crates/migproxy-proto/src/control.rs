//! Control frames, exchanged both ways on a migration's control connection.
//!
//! ```text
//! frame     length u32 (of what follows) │ type u8 │ payload
//! 1 Heartbeat
//! 2 ChannelOpened   channel u32
//! 3 ChannelClosed   channel u32 │ end u8 │ totals
//! 4 Failed          attribution
//! 5 Cancel          by host u8
//! 6 Done            channels u32 │ totals                  (version 1)
//! 7 Done            channels u32 │ totals │ verdict u8      (version 2 on)
//! 8 Progress        channel u32 │ delivered u64 │ end u64    (resumable links only)
//! 9 Broken          channel u32 │ connection u32              (resumable links only)
//! 10 Received       frames u64                                (first on a link that takes
//!                                                              over a resumable one)
//! 11 Hurry          channel u32                               (resumable links only)
//! 12 GaveUp         attribution                               (version 2 on; version 1
//!                                                              gets 4 Failed)
//! 13 Parked                                                    (version 2 on, recoverable
//!                                                              migrations: see below)
//! verdict           0 unknown │ 1 QEMU said completed (QMP) │ 2 the destination QEMU's SHUT
//!                   was seen on the return path
//! totals            to_destination u64 │ to_source u64
//! attribution       host u8 │ leg u8 │ has channel u8 │ channel u32 │ direction u8 │ op u8 │
//!                   errno (u8 length + text) │ message (u16 length + text) │ totals │
//!                   elapsed ms u64
//! ```
//! `Progress` carries the 16 bytes of a resumable channel's [`Progress`](crate::Progress)
//! hello, as they are on the data connection: `end` all ones is no end.

use crate::codec::{DecodeError, Reader, Writer};

/// Largest control frame (length field included).
pub const MAX_CONTROL_FRAME: usize = 16 * 1024;
/// Longest failure message carried; longer ones are cut.
const MAX_MESSAGE: usize = 4096;

/// Which host a fact is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Host {
    Source,
    Destination,
}

/// Which side of a daemon a failure was on: its local QEMU or the link to the other daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Leg {
    Qemu,
    Peer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    ToDestination,
    ToSource,
}

/// The operation that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Connect,
    Read,
    Write,
    Splice,
    Shutdown,
    /// The hello exchange on a peer connection.
    Handshake,
    /// Nothing moved or nothing was heard for too long.
    Timeout,
    /// The peer broke the protocol.
    Protocol,
    /// QEMU's own migration failed, by QEMU's verdict over QMP (its `error-desc` is the
    /// message).
    Migrate,
}

/// Bytes per direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub to_destination: u64,
    pub to_source: u64,
}

/// How one channel ended on one host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelEnd {
    Completed,
    Cancelled,
    Failed,
}

/// Who and what failed, so that both hosts can report the same cause.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attribution {
    pub host: Host,
    pub leg: Leg,
    pub channel: Option<u32>,
    pub direction: Option<Direction>,
    pub op: Op,
    /// Symbolic errno (`ECONNRESET`), when there was one.
    pub errno: Option<String>,
    /// The OS or protocol error text.
    pub message: String,
    /// Bytes moved on the failing channel (or the whole migration when no channel).
    pub bytes: Totals,
    pub elapsed_ms: u64,
}

/// A control frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// Sent every heartbeat interval, both ways; silence means the link is dead.
    Heartbeat,
    /// The sender has established its local leg of this channel.
    ChannelOpened { channel: u32 },
    /// The sender's relay for this channel has ended.
    ChannelClosed {
        channel: u32,
        end: ChannelEnd,
        bytes: Totals,
    },
    /// The migration failed on the sender's host, for this reason, and paused there (it is
    /// recoverable): a recoverable receiver pauses too, any other fails.
    Failed(Attribution),
    /// The migration failed on the sender's host for good, for this reason: the receiver
    /// fails too. Version 1 gets it as [`Failed`](Control::Failed).
    GaveUp(Attribution),
    /// The migration was cancelled on the sender's host.
    Cancel { by: Host },
    /// Every channel has ended cleanly on the sender's host, with these totals, and this
    /// evidence that QEMU finished.
    Done {
        channels: u32,
        bytes: Totals,
        verdict: Verdict,
    },
    /// The sender's acknowledgement for one resumable channel: `delivered`, the bytes of the
    /// peer's direction it has written into its local QEMU's socket (the peer may forget
    /// them), and `end`, its own direction's length once its QEMU ended it (the peer's QEMU
    /// gets nothing past it). Sent periodically: cumulative, so a lost or late one is
    /// harmless and the newest wins. `end: Some(u64::MAX)` is not a length a direction can
    /// have, and goes as no end.
    Progress {
        channel: u32,
        delivered: u64,
        end: Option<u64>,
    },
    /// The sender found this resumable channel's data connection number `connection` (the
    /// first is 1; each one that came again since counts) broken, and waits for a new one.
    /// The receiver drops its own end of that connection too, unless it has moved on to a
    /// newer one already: it may never see the reset itself (once it has read the peer's
    /// end of stream it no longer reads), and a break it saw first must not cost a second
    /// new connection.
    Broken { channel: u32, connection: u32 },
    /// The first frame each side sends on a control link that takes over a broken one:
    /// how many of the epoch's sequenced frames (every frame but `Heartbeat`, `Progress`,
    /// `Hurry` and this one) it has received. The other sends again those past it, which the broken
    /// link may have taken down with it, before anything new: each arrives once, in order.
    Received { frames: u64 },
    /// The sender's retention for this resumable channel is full: it reads no more from its
    /// QEMU until acknowledged. The receiver tells its [`Progress`](Control::Progress) for
    /// the channel at once rather than at its next period. Lost, it costs only that wait.
    Hurry { channel: u32 },
    /// The sender's epoch ended in a pause, and it keeps this link for the next one: nothing
    /// more of the epoch follows. Once each side has sent and received it, the link is
    /// quiet both ways and the source starts the next epoch on it with a control hello, as
    /// on a new connection (see the crate's "Postcopy recovery"). Sequenced it is not:
    /// it is the link's, not the epoch's.
    Parked,
}

impl Control {
    /// Whether the frame counts in the epoch's sequence ([`Control::Received`]): those whose
    /// loss a link that takes over must make good. Heartbeats do not matter once lost, and
    /// progress is cumulative (the newest says all).
    pub fn is_sequenced(&self) -> bool {
        !matches!(
            self,
            Control::Heartbeat
                | Control::Progress { .. }
                | Control::Received { .. }
                | Control::Hurry { .. }
                | Control::Parked
        )
    }
}

/// What a host knows of QEMU's own verdict when its channels have ended cleanly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing: no QMP, and no acknowledgement on the return path (or a version 1 peer).
    Unknown,
    /// QEMU said `completed` over QMP on this host.
    Qemu,
    /// The destination QEMU's `SHUT(0)` crossed the return path: it loaded everything.
    ReturnPath,
}

/// Checks a frame's 4-byte length prefix; returns the number of bytes that follow it.
pub fn frame_len(prefix: [u8; 4]) -> Result<usize, DecodeError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len == 0 {
        return Err(DecodeError::Truncated { needed: 1 });
    }
    if len > MAX_CONTROL_FRAME - 4 {
        return Err(DecodeError::Oversized {
            what: "control frame",
            len,
            max: MAX_CONTROL_FRAME - 4,
        });
    }
    Ok(len)
}

impl Control {
    /// Appends the whole frame, length prefix included, as this version speaks it.
    pub fn encode(&self, out: &mut Vec<u8>) {
        self.encode_for(crate::VERSION, out);
    }

    /// Appends the whole frame as protocol `version` has it: a version 1 peer gets `Done`
    /// without its verdict. `Progress`, `Broken`, `Received` and `Hurry` are the same in every
    /// version: they are only ever sent on a link whose acceptance said ` resumable`
    /// (version 2 on, see [`FLAG_RESUMABLE`](crate::FLAG_RESUMABLE)), so a version 1 peer
    /// never gets one (a version 2 build from before `Received` or `Hurry` does not read
    /// those: see the crate's "Versions").
    pub fn encode_for(&self, version: u16, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0; 4]);
        let mut w = Writer { buf: out };
        match self {
            Control::Heartbeat => w.u8(1),
            Control::ChannelOpened { channel } => {
                w.u8(2);
                w.u32(*channel);
            }
            Control::ChannelClosed {
                channel,
                end,
                bytes,
            } => {
                w.u8(3);
                w.u32(*channel);
                w.u8(end_code(*end));
                totals(&mut w, bytes);
            }
            Control::Failed(attribution) => {
                w.u8(4);
                encode_attribution(&mut w, attribution);
            }
            Control::GaveUp(attribution) => {
                w.u8(if version < 2 { 4 } else { 12 });
                encode_attribution(&mut w, attribution);
            }
            Control::Cancel { by } => {
                w.u8(5);
                w.u8(host_code(*by));
            }
            Control::Done {
                channels,
                bytes,
                verdict,
            } => {
                w.u8(if version < 2 { 6 } else { 7 });
                w.u32(*channels);
                totals(&mut w, bytes);
                if version >= 2 {
                    w.u8(match verdict {
                        Verdict::Unknown => 0,
                        Verdict::Qemu => 1,
                        Verdict::ReturnPath => 2,
                    });
                }
            }
            Control::Progress {
                channel,
                delivered,
                end,
            } => {
                w.u8(8);
                w.u32(*channel);
                w.bytes(
                    &crate::Progress {
                        delivered: *delivered,
                        end: *end,
                    }
                    .encode(),
                );
            }
            Control::Broken {
                channel,
                connection,
            } => {
                w.u8(9);
                w.u32(*channel);
                w.u32(*connection);
            }
            Control::Received { frames } => {
                w.u8(10);
                w.u64(*frames);
            }
            Control::Hurry { channel } => {
                w.u8(11);
                w.u32(*channel);
            }
            Control::Parked => w.u8(13),
        }
        let len = (out.len() - start - 4) as u32;
        out[start..start + 4].copy_from_slice(&len.to_be_bytes());
    }

    /// Decodes one whole frame (length prefix included) and returns it with its size, or
    /// `Truncated` when `buf` does not hold all of it yet.
    pub fn decode_frame(buf: &[u8]) -> Result<(Control, usize), DecodeError> {
        let mut r = Reader::new(buf);
        let len = frame_len(r.array()?)?;
        let body = r.bytes(len)?;
        Ok((Control::decode(body)?, 4 + len))
    }

    /// Decodes a frame's body (what follows the length prefix).
    pub fn decode(body: &[u8]) -> Result<Control, DecodeError> {
        let mut r = Reader::new(body);
        let message = match r.u8()? {
            1 => Control::Heartbeat,
            2 => Control::ChannelOpened { channel: r.u32()? },
            3 => Control::ChannelClosed {
                channel: r.u32()?,
                end: end_from(r.u8()?)?,
                bytes: read_totals(&mut r)?,
            },
            4 => Control::Failed(decode_attribution(&mut r)?),
            5 => Control::Cancel {
                by: host_from(r.u8()?)?,
            },
            6 => Control::Done {
                channels: r.u32()?,
                bytes: read_totals(&mut r)?,
                verdict: Verdict::Unknown,
            },
            7 => Control::Done {
                channels: r.u32()?,
                bytes: read_totals(&mut r)?,
                verdict: match r.u8()? {
                    0 => Verdict::Unknown,
                    1 => Verdict::Qemu,
                    2 => Verdict::ReturnPath,
                    other => return Err(invalid("verdict", other)),
                },
            },
            8 => {
                let channel = r.u32()?;
                let progress = crate::Progress::decode(r.array()?);
                Control::Progress {
                    channel,
                    delivered: progress.delivered,
                    end: progress.end,
                }
            }
            9 => Control::Broken {
                channel: r.u32()?,
                connection: r.u32()?,
            },
            10 => Control::Received { frames: r.u64()? },
            11 => Control::Hurry { channel: r.u32()? },
            12 => Control::GaveUp(decode_attribution(&mut r)?),
            13 => Control::Parked,
            other => return Err(DecodeError::UnknownMessage(other)),
        };
        r.finish()?;
        Ok(message)
    }
}

fn totals(w: &mut Writer<'_>, t: &Totals) {
    w.u64(t.to_destination);
    w.u64(t.to_source);
}

fn read_totals(r: &mut Reader<'_>) -> Result<Totals, DecodeError> {
    Ok(Totals {
        to_destination: r.u64()?,
        to_source: r.u64()?,
    })
}

fn encode_attribution(w: &mut Writer<'_>, a: &Attribution) {
    w.u8(host_code(a.host));
    w.u8(match a.leg {
        Leg::Qemu => 0,
        Leg::Peer => 1,
    });
    w.u8(a.channel.is_some().into());
    w.u32(a.channel.unwrap_or(0));
    w.u8(match a.direction {
        None => 0,
        Some(Direction::ToDestination) => 1,
        Some(Direction::ToSource) => 2,
    });
    w.u8(OPS.iter().position(|op| *op == a.op).unwrap_or(0) as u8);
    w.short_str(a.errno.as_deref().unwrap_or(""));
    w.str16(&a.message, MAX_MESSAGE);
    totals(w, &a.bytes);
    w.u64(a.elapsed_ms);
}

fn decode_attribution(r: &mut Reader<'_>) -> Result<Attribution, DecodeError> {
    let host = host_from(r.u8()?)?;
    let leg = match r.u8()? {
        0 => Leg::Qemu,
        1 => Leg::Peer,
        other => return Err(invalid("leg", other)),
    };
    let channel = match (r.u8()?, r.u32()?) {
        (0, _) => None,
        (1, channel) => Some(channel),
        (other, _) => return Err(invalid("channel flag", other)),
    };
    let direction = match r.u8()? {
        0 => None,
        1 => Some(Direction::ToDestination),
        2 => Some(Direction::ToSource),
        other => return Err(invalid("direction", other)),
    };
    let op = r.u8()?;
    let op = *OPS.get(op as usize).ok_or(invalid("op", op))?;
    let errno = Some(r.short_str("errno")?).filter(|e| !e.is_empty());
    let message = r.str16("message")?;
    if message.len() > MAX_MESSAGE {
        return Err(DecodeError::Oversized {
            what: "message",
            len: message.len(),
            max: MAX_MESSAGE,
        });
    }
    Ok(Attribution {
        host,
        leg,
        channel,
        direction,
        op,
        errno,
        message,
        bytes: read_totals(r)?,
        elapsed_ms: r.u64()?,
    })
}

const OPS: [Op; 9] = [
    Op::Connect,
    Op::Read,
    Op::Write,
    Op::Splice,
    Op::Shutdown,
    Op::Handshake,
    Op::Timeout,
    Op::Protocol,
    Op::Migrate,
];

fn invalid(field: &'static str, value: u8) -> DecodeError {
    DecodeError::InvalidValue {
        field,
        value: value.into(),
    }
}

fn host_code(host: Host) -> u8 {
    match host {
        Host::Source => 0,
        Host::Destination => 1,
    }
}

fn host_from(code: u8) -> Result<Host, DecodeError> {
    match code {
        0 => Ok(Host::Source),
        1 => Ok(Host::Destination),
        other => Err(invalid("host", other)),
    }
}

fn end_code(end: ChannelEnd) -> u8 {
    match end {
        ChannelEnd::Completed => 0,
        ChannelEnd::Cancelled => 1,
        ChannelEnd::Failed => 2,
    }
}

fn end_from(code: u8) -> Result<ChannelEnd, DecodeError> {
    match code {
        0 => Ok(ChannelEnd::Completed),
        1 => Ok(ChannelEnd::Cancelled),
        2 => Ok(ChannelEnd::Failed),
        other => Err(invalid("channel end", other)),
    }
}

#[cfg(test)]
mod tests;
