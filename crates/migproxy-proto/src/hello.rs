//! The first message of every peer connection, and its answer.
//!
//! ```text
//! Hello       "MGPX" │ version u16 │ body length u16 │ body
//!   body      kind u8 │ flags u8 │ channel u32 │ token [32] │ id length u8 │ id
//!   flags     bit 0: the migration is recoverable (postcopy); bit 1: the kernel data
//!             path is offered (control links); bit 2: resumable channels are asked for
//!             (control links, version 2 on); bit 3: this connection resumes a channel
//!             (data connections, version 2 on), or takes over a broken control link
//!             (control links); bit 4: it only tells a cancel (control links); bit 5:
//!             the dialler's migration has ended, the link takes over only to carry its
//!             last frames (control links, with bit 3); other bits must be 0
//! HelloReply  "MGPX" │ version u16 │ status u8 │ message length u8 │ message (UTF-8)
//!   status    0 ok │ 1 unknown migration │ 2 bad token │ 3 expired │ 4 unsupported version │
//!             5 malformed │ 6 refused │ 7 busy │ 8 cancelled (to version 2 hellos)
//! ```
//! All integers are big-endian.

use std::fmt;

use crate::codec::{DecodeError, Reader, Writer};

pub const MAGIC: [u8; 4] = *b"MGPX";
/// The highest protocol version this code speaks.
pub const VERSION: u16 = 2;
/// The oldest version accepted: the current one and the one before.
pub const MIN_VERSION: u16 = if VERSION > 1 { VERSION - 1 } else { 1 };
/// Magic, version and body length.
pub const HELLO_HEADER: usize = 8;
pub const TOKEN_LEN: usize = 32;
/// Longest migration id.
pub const MAX_ID: usize = 64;
/// Largest hello body: kind, flags, channel, token, id length, id.
pub const MAX_HELLO_BODY: usize = 1 + 1 + 4 + TOKEN_LEN + 1 + MAX_ID;
/// Hello flag: the dialler created the migration recoverable (postcopy recovery).
pub const FLAG_RECOVERABLE: u8 = 1;
/// Hello flag (control links): the dialler offers the kernel data path — it can hand its
/// QEMU the data connection's socket, and the data may go in clear. The acceptance's message
/// then says what the destination chose after the credential: ` kernel` or ` relay: WHY`.
pub const FLAG_KERNEL_PATH: u8 = 2;
/// Hello flag (control links, version 2 on): the dialler asks for resumable channels on this
/// epoch — it keeps what it sent until the peer acknowledges it ([`Control::Progress`]), and
/// carries a channel across new data connections when one breaks ([`FLAG_RESUME`]). The
/// destination agrees by ending its acceptance's message with ` resumable`; without it the
/// epoch's channels are not resumable. A destination built before the flag refuses it as
/// malformed. It needs the credential: the resumed connections present it.
///
/// [`Control::Progress`]: crate::Control::Progress
pub const FLAG_RESUMABLE: u8 = 4;
/// Hello flag (version 2 on, only on an epoch whose acceptance said ` resumable`; the token
/// is then the epoch's credential). On a data connection: it carries on the epoch's
/// existing channel `channel`, not a new one; right after the `HelloReply{Ok}` both sides
/// write their 16-byte [`Progress`], and each side's direction goes on from the peer's
/// `delivered`. On a control link: it takes over from the epoch's control link, which
/// broke; the frames queued meanwhile follow, and the epoch goes on (no new epoch, no
/// channel ends).
///
/// [`Progress`]: crate::Progress
pub const FLAG_RESUME: u8 = 8;
/// Hello flag (control links, version 2 on): the dialler only tells that the migration was
/// cancelled on the source while no control link was up (it was paused). The destination
/// cancels it once the hello is admitted (the credential, the certificate) and refuses the
/// link with [`Status::Cancelled`](crate::Status::Cancelled): nothing attaches, no epoch
/// begins, nobody recovers.
pub const FLAG_CANCEL: u8 = 16;
/// Hello flag (control links that take over, with [`FLAG_RESUME`], version 2 on): the
/// dialler's migration ended while no control link was up, and this link only carries the
/// last frames each side queued for the other (`Received` counts first, then the frames
/// the other has not had: a cancel, a failure). A destination whose migration is still
/// running takes the link over as any other; one whose migration has ended too, with its
/// own link down, accepts it (rather than refusing it `expired` or `cancelled`) once, with
/// ` ended` as the acceptance's message, and both record what the other said of its end,
/// heard late. Nothing attaches either way. A destination built before the flag refuses it
/// as malformed: the source dials again without it.
pub const FLAG_ENDED: u8 = 32;
/// Every flag a hello may carry.
const FLAGS: u8 =
    FLAG_RECOVERABLE | FLAG_KERNEL_PATH | FLAG_RESUMABLE | FLAG_RESUME | FLAG_CANCEL | FLAG_ENDED;
/// The first version with the credential, which resumable channels need.
const CREDENTIAL_VERSION: u16 = 2;
/// Magic, version, status and message length.
const REPLY_HEADER: usize = 8;

/// What a connection between daemons is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The migration's control link.
    Control,
    /// One migration channel's data.
    Data,
}

/// The dialler's introduction.
#[derive(Clone, PartialEq, Eq)]
pub struct Hello {
    pub version: u16,
    pub kind: Kind,
    pub migration: String,
    /// Channel index for data connections; for control, the first channel of the epoch it
    /// starts (0, or the next channel when resuming a paused migration).
    pub channel: u32,
    pub token: [u8; TOKEN_LEN],
    /// [`FLAG_RECOVERABLE`], [`FLAG_KERNEL_PATH`], [`FLAG_RESUMABLE`] (control),
    /// [`FLAG_CANCEL`], [`FLAG_ENDED`] (control), [`FLAG_RESUME`], or 0.
    pub flags: u8,
}

/// Tokens never appear in logs, not even in Debug output.
impl fmt::Debug for Hello {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hello")
            .field("version", &self.version)
            .field("kind", &self.kind)
            .field("migration", &self.migration)
            .field("channel", &self.channel)
            .field("flags", &self.flags)
            .field("token", &"MASKED")
            .finish()
    }
}

/// A migration id: 1 to 64 characters from `[A-Za-z0-9._-]`, so it is safe in file names,
/// URLs and log lines.
pub fn valid_id(id: &str) -> bool {
    (1..=MAX_ID).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && id != "."
        && id != ".."
}

/// Checks a hello's header (magic, version, length) and returns the body length to read next.
pub fn hello_body_len(header: &[u8]) -> Result<usize, DecodeError> {
    let mut r = Reader::new(header);
    check_magic(r.array()?)?;
    check_dialler(r.u16()?)?;
    let len = r.u16()? as usize;
    if len > MAX_HELLO_BODY {
        return Err(DecodeError::Oversized {
            what: "hello",
            len,
            max: MAX_HELLO_BODY,
        });
    }
    Ok(len)
}

fn check_magic(magic: [u8; 4]) -> Result<(), DecodeError> {
    if magic == MAGIC {
        Ok(())
    } else {
        Err(DecodeError::BadMagic(magic))
    }
}

/// A dialler may speak newer versions than this one: the reply settles on one both speak.
fn check_dialler(version: u16) -> Result<u16, DecodeError> {
    if version >= MIN_VERSION {
        Ok(version)
    } else {
        Err(DecodeError::UnsupportedVersion(version))
    }
}

/// The version a connection speaks when the dialler's hello says `dialler`.
pub fn negotiate(dialler: u16) -> u16 {
    dialler.min(VERSION)
}

fn check_version(version: u16) -> Result<u16, DecodeError> {
    if (MIN_VERSION..=VERSION).contains(&version) {
        Ok(version)
    } else {
        Err(DecodeError::UnsupportedVersion(version))
    }
}

impl Hello {
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut w = Writer { buf: out };
        w.bytes(&MAGIC);
        w.u16(self.version);
        let id = &self.migration.as_bytes()[..self.migration.len().min(MAX_ID)];
        w.u16((1 + 1 + 4 + TOKEN_LEN + 1 + id.len()) as u16);
        w.u8(match self.kind {
            Kind::Control => 1,
            Kind::Data => 2,
        });
        w.u8(self.flags);
        w.u32(self.channel);
        w.bytes(&self.token);
        w.u8(id.len() as u8);
        w.bytes(id);
    }

    /// Decodes a whole hello: header and body, nothing after it.
    pub fn decode(buf: &[u8]) -> Result<Hello, DecodeError> {
        let header = buf
            .get(..HELLO_HEADER)
            .ok_or_else(|| DecodeError::Truncated {
                needed: HELLO_HEADER - buf.len(),
            })?;
        let len = hello_body_len(header)?;
        let version = u16::from_be_bytes([header[4], header[5]]);
        let mut r = Reader::new(&buf[HELLO_HEADER..]);
        let body = r.bytes(len)?;
        r.finish()?;
        Self::decode_body(version, body)
    }

    /// Decodes the body that follows a header accepted by [`hello_body_len`].
    pub fn decode_body(version: u16, body: &[u8]) -> Result<Hello, DecodeError> {
        let mut r = Reader::new(body);
        let kind = match r.u8()? {
            1 => Kind::Control,
            2 => Kind::Data,
            other => return Err(DecodeError::UnknownKind(other)),
        };
        let flags = r.u8()?;
        if flags & !FLAGS != 0 {
            return Err(DecodeError::InvalidValue {
                field: "flags",
                value: flags.into(),
            });
        }
        check_flags(kind, flags, version)?;
        let channel = r.u32()?;
        let token = r.array()?;
        let id_len = r.u8()? as usize;
        let id = r.bytes(id_len)?;
        r.finish()?;
        let migration = std::str::from_utf8(id)
            .ok()
            .filter(|id| valid_id(id))
            .ok_or(DecodeError::InvalidId)?;
        Ok(Hello {
            version: check_dialler(version)?,
            kind,
            migration: migration.to_owned(),
            channel,
            token,
            flags,
        })
    }
}

/// Refuses the resumable-channel flags where they cannot mean anything: each on the other
/// kind of connection, and either without the credential. A resume taken for a new channel,
/// or resumes that no credential can admit, would leave the two daemons disagreeing on
/// what the connection is. (The older flags are not checked per kind: their receivers
/// ignore them where they do not apply, and always have.)
fn check_flags(kind: Kind, flags: u8, version: u16) -> Result<(), DecodeError> {
    // A hello that only tells a cancel attaches nothing: it cannot take a link over (whose
    // admission differs) too.
    if flags & FLAG_CANCEL != 0 && flags & FLAG_RESUME != 0 {
        return Err(DecodeError::FlagsExclusive("cancel", "resume"));
    }
    // Last frames go on a link that takes over: without the credential's admission a
    // destination that has ended could not tell its source from anyone.
    if flags & FLAG_ENDED != 0 && flags & FLAG_RESUME == 0 {
        return Err(DecodeError::FlagNeedsFlag("ended", "resume"));
    }
    for (flag, name, only_on) in [
        (FLAG_RESUMABLE, "resumable", Some(Kind::Control)),
        (FLAG_RESUME, "resume", None),
        (FLAG_CANCEL, "cancel", Some(Kind::Control)),
        (FLAG_ENDED, "ended", Some(Kind::Control)),
    ] {
        if flags & flag == 0 {
            continue;
        }
        if only_on.is_some_and(|only_on| kind != only_on) {
            return Err(DecodeError::FlagNotForKind {
                flag: name,
                kind: kind_name(kind),
            });
        }
        if version < CREDENTIAL_VERSION {
            return Err(DecodeError::FlagNeedsVersion {
                flag: name,
                needs: CREDENTIAL_VERSION,
                version,
            });
        }
    }
    Ok(())
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Control => "control",
        Kind::Data => "data",
    }
}

/// The answer to a hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    UnknownMigration,
    BadToken,
    /// The migration was never started in time, or has ended.
    Expired,
    UnsupportedVersion,
    Malformed,
    /// The migration cannot take this connection (channel limit, control already attached).
    Refused,
    /// The daemon is at a limit (too many connections or migrations).
    Busy,
    /// The migration has ended cancelled (by either host; the message says which). Only to
    /// a version 2 hello, in place of [`Expired`](Status::Expired): a source that comes
    /// back after an outage ends cancelled too, rather than failed.
    Cancelled,
}

impl Status {
    fn code(self) -> u8 {
        match self {
            Status::Ok => 0,
            Status::UnknownMigration => 1,
            Status::BadToken => 2,
            Status::Expired => 3,
            Status::UnsupportedVersion => 4,
            Status::Malformed => 5,
            Status::Refused => 6,
            Status::Busy => 7,
            Status::Cancelled => 8,
        }
    }

    fn from_code(code: u8) -> Result<Status, DecodeError> {
        Ok(match code {
            0 => Status::Ok,
            1 => Status::UnknownMigration,
            2 => Status::BadToken,
            3 => Status::Expired,
            4 => Status::UnsupportedVersion,
            5 => Status::Malformed,
            6 => Status::Refused,
            7 => Status::Busy,
            8 => Status::Cancelled,
            other => {
                return Err(DecodeError::InvalidValue {
                    field: "status",
                    value: other.into(),
                });
            }
        })
    }

    /// Stable snake_case name, for metrics and logs.
    pub fn name(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::UnknownMigration => "unknown_migration",
            Status::BadToken => "bad_token",
            Status::Expired => "expired",
            Status::UnsupportedVersion => "unsupported_version",
            Status::Malformed => "malformed",
            Status::Refused => "refused",
            Status::Busy => "busy",
            Status::Cancelled => "cancelled",
        }
    }
}

/// The destination's answer: the version both will speak, a status, and a short reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloReply {
    pub version: u16,
    pub status: Status,
    pub message: String,
}

/// Checks a reply's header and returns the length of the message that follows.
pub fn reply_len(header: &[u8]) -> Result<usize, DecodeError> {
    let mut r = Reader::new(header);
    check_magic(r.array()?)?;
    check_version(r.u16()?)?;
    Status::from_code(r.u8()?)?;
    Ok(r.u8()? as usize)
}

impl HelloReply {
    /// Bytes in a reply's fixed header.
    pub const HEADER: usize = REPLY_HEADER;

    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut w = Writer { buf: out };
        w.bytes(&MAGIC);
        w.u16(self.version);
        w.u8(self.status.code());
        w.short_str(&self.message);
    }

    pub fn decode(buf: &[u8]) -> Result<HelloReply, DecodeError> {
        let mut r = Reader::new(buf);
        check_magic(r.array()?)?;
        let version = check_version(r.u16()?)?;
        let status = Status::from_code(r.u8()?)?;
        let message = r.short_str("reply message")?;
        r.finish()?;
        Ok(HelloReply {
            version,
            status,
            message,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(kind: Kind) -> Hello {
        Hello {
            version: VERSION,
            kind,
            migration: "vm-42.migration_1".into(),
            channel: 3,
            token: [0xab; TOKEN_LEN],
            flags: FLAG_RECOVERABLE,
        }
    }

    fn encoded(h: &Hello) -> Vec<u8> {
        let mut buf = Vec::new();
        h.encode(&mut buf);
        buf
    }

    #[test]
    fn hello_round_trips() {
        for kind in [Kind::Control, Kind::Data] {
            let h = hello(kind);
            let buf = encoded(&h);
            assert_eq!(
                hello_body_len(&buf[..HELLO_HEADER]),
                Ok(buf.len() - HELLO_HEADER)
            );
            assert_eq!(Hello::decode(&buf), Ok(h));
        }
    }

    #[test]
    fn resumable_flags_round_trip_on_their_kind() {
        for (kind, flags) in [
            (Kind::Control, FLAG_RESUMABLE),
            (
                Kind::Control,
                FLAG_RESUMABLE | FLAG_RECOVERABLE | FLAG_KERNEL_PATH,
            ),
            (Kind::Data, FLAG_RESUME),
            (Kind::Data, FLAG_RESUME | FLAG_RECOVERABLE),
            (Kind::Control, FLAG_RESUME | FLAG_RESUMABLE),
            (Kind::Control, FLAG_RESUME | FLAG_ENDED | FLAG_RESUMABLE),
        ] {
            let h = Hello {
                flags,
                ..hello(kind)
            };
            let buf = encoded(&h);
            assert_eq!(buf[HELLO_HEADER + 1], flags);
            for cut in 0..buf.len() {
                assert!(
                    matches!(
                        Hello::decode(&buf[..cut]),
                        Err(DecodeError::Truncated { .. })
                    ),
                    "{h:?} cut at {cut}"
                );
            }
            assert_eq!(Hello::decode(&buf), Ok(h));
        }
    }

    #[test]
    fn resumable_flags_are_refused_off_their_kind_and_without_the_credential() {
        let refused = |kind, flags, version| {
            let mut buf = encoded(&Hello {
                flags,
                version,
                ..hello(kind)
            });
            let body = buf.split_off(HELLO_HEADER);
            // Through the whole hello, and through the body alone as the daemon reads it.
            let whole = Hello::decode(&[buf, body.clone()].concat());
            assert_eq!(whole, Hello::decode_body(version, &body));
            whole
        };
        // A control link that takes over from a broken one.
        assert!(refused(Kind::Control, FLAG_RESUME | FLAG_RECOVERABLE, VERSION).is_ok());
        assert_eq!(
            refused(Kind::Data, FLAG_RESUMABLE | FLAG_RECOVERABLE, VERSION),
            Err(DecodeError::FlagNotForKind {
                flag: "resumable",
                kind: "data"
            })
        );
        assert_eq!(
            refused(Kind::Data, FLAG_RESUMABLE | FLAG_RESUME, VERSION),
            Err(DecodeError::FlagNotForKind {
                flag: "resumable",
                kind: "data"
            })
        );
        // A hello that only tells a cancel: on a control link, never taking one over.
        assert!(refused(Kind::Control, FLAG_CANCEL | FLAG_RECOVERABLE, VERSION).is_ok());
        assert_eq!(
            refused(Kind::Control, FLAG_CANCEL | FLAG_RESUME, VERSION),
            Err(DecodeError::FlagsExclusive("cancel", "resume"))
        );
        assert_eq!(
            refused(Kind::Data, FLAG_CANCEL, VERSION),
            Err(DecodeError::FlagNotForKind {
                flag: "cancel",
                kind: "data"
            })
        );
        // Last frames: only on a control link that takes over.
        assert_eq!(
            refused(Kind::Control, FLAG_ENDED | FLAG_RESUMABLE, VERSION),
            Err(DecodeError::FlagNeedsFlag("ended", "resume"))
        );
        assert_eq!(
            refused(Kind::Data, FLAG_ENDED | FLAG_RESUME, VERSION),
            Err(DecodeError::FlagNotForKind {
                flag: "ended",
                kind: "data"
            })
        );
        for (kind, flag, name) in [
            (Kind::Control, FLAG_RESUME | FLAG_ENDED, "resume"),
            (Kind::Data, FLAG_RESUME, "resume"),
            (Kind::Control, FLAG_RESUME, "resume"),
            (Kind::Control, FLAG_RESUMABLE, "resumable"),
            (Kind::Control, FLAG_CANCEL, "cancel"),
        ] {
            assert_eq!(
                refused(kind, flag, 1),
                Err(DecodeError::FlagNeedsVersion {
                    flag: name,
                    needs: 2,
                    version: 1
                })
            );
        }
        let error = refused(Kind::Data, FLAG_RESUMABLE, VERSION).unwrap_err();
        assert_eq!(
            error.to_string(),
            "hello flag `resumable` is not valid on a data connection"
        );
        // Without the new flags, a version 1 hello is as it was.
        assert!(refused(Kind::Data, FLAG_RECOVERABLE, 1).is_ok());
    }

    #[test]
    fn hello_debug_masks_the_token() {
        let text = format!("{:?}", hello(Kind::Data));
        assert!(text.contains("MASKED") && !text.contains("171"), "{text}");
    }

    #[test]
    fn hello_rejects_each_defect_distinctly() {
        let good = encoded(&hello(Kind::Data));
        for cut in 0..good.len() {
            assert!(
                matches!(
                    Hello::decode(&good[..cut]),
                    Err(DecodeError::Truncated { .. })
                ),
                "cut at {cut}"
            );
        }
        let mut bad = good.clone();
        bad[0] = b'X';
        assert!(matches!(Hello::decode(&bad), Err(DecodeError::BadMagic(_))));
        let mut bad = good.clone();
        // A newer dialler is answered in the version both speak; an older one is refused.
        bad[4..6].copy_from_slice(&(VERSION + 1).to_be_bytes());
        let newer = Hello::decode(&bad).expect("a newer dialler's hello");
        assert_eq!(newer.version, VERSION + 1);
        assert_eq!(negotiate(newer.version), VERSION);
        assert_eq!(negotiate(MIN_VERSION), MIN_VERSION);
        bad[4..6].copy_from_slice(&(MIN_VERSION - 1).to_be_bytes());
        assert_eq!(
            Hello::decode(&bad),
            Err(DecodeError::UnsupportedVersion(MIN_VERSION - 1))
        );
        bad[4..6].copy_from_slice(&0u16.to_be_bytes());
        assert_eq!(Hello::decode(&bad), Err(DecodeError::UnsupportedVersion(0)));
        let mut bad = good.clone();
        bad[6..8].copy_from_slice(&1000u16.to_be_bytes());
        assert!(matches!(
            Hello::decode(&bad),
            Err(DecodeError::Oversized { len: 1000, .. })
        ));
        let mut bad = good.clone();
        bad[HELLO_HEADER] = 9;
        assert_eq!(Hello::decode(&bad), Err(DecodeError::UnknownKind(9)));
        let mut bad = good.clone();
        bad[HELLO_HEADER + 1] = 0x80;
        assert!(matches!(
            Hello::decode(&bad),
            Err(DecodeError::InvalidValue { field: "flags", .. })
        ));
        let mut bad = good.clone();
        *bad.last_mut().unwrap() = b'/';
        assert_eq!(Hello::decode(&bad), Err(DecodeError::InvalidId));
        let mut bad = good.clone();
        bad.push(0);
        assert_eq!(Hello::decode(&bad), Err(DecodeError::TrailingBytes(1)));
    }

    #[test]
    fn ids_are_safe_names() {
        assert!(valid_id("vm-1.mig_2"));
        assert!(valid_id(&"a".repeat(MAX_ID)));
        for bad in ["", ".", "..", "a/b", "a b", "ü", &"a".repeat(MAX_ID + 1)] {
            assert!(!valid_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn reply_round_trips_and_rejects_defects() {
        for status in [
            Status::Ok,
            Status::BadToken,
            Status::Busy,
            Status::Refused,
            Status::Cancelled,
        ] {
            let reply = HelloReply {
                version: VERSION,
                status,
                message: "token does not match migration vm-1".into(),
            };
            let mut buf = Vec::new();
            reply.encode(&mut buf);
            assert_eq!(
                reply_len(&buf[..HelloReply::HEADER]),
                Ok(buf.len() - HelloReply::HEADER)
            );
            assert_eq!(HelloReply::decode(&buf), Ok(reply));
        }
        let mut buf = Vec::new();
        HelloReply {
            version: VERSION,
            status: Status::Ok,
            message: String::new(),
        }
        .encode(&mut buf);
        buf[6] = 99;
        assert!(matches!(
            HelloReply::decode(&buf),
            Err(DecodeError::InvalidValue {
                field: "status",
                value: 99
            })
        ));
    }
}
