//! TLS 1.3 records (RFC 8446 §5.2), sealed and opened in place with the traffic secrets
//! rustls negotiated: the data path between daemons never allocates per record and moves
//! each byte once in user space.
//!
//! ```text
//!  record  = 23 | 03 03 | length (2) | AEAD(content ‖ content type ‖ zero padding) ‖ tag (16)
//!  nonce   = iv XOR sequence number (big-endian, right-aligned)
//!  aad     = the 5-byte header
//! ```
//!
//! After opening, the content is read here too ([`Opener::open_next`]): application data,
//! alerts (close_notify ends the peer's direction, any other is an error) and the handshake
//! messages TLS 1.3 allows after the handshake (KeyUpdate, last in its record; session
//! tickets, skipped).
//!
//! Pure: no I/O. [`super::stream::RecordStream`] moves the bytes. The fuzz target
//! `fuzz/fuzz_targets/records.rs` and `super::fuzzing`'s test drive [`Opener::open_next`].

use std::ops::Range;

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use rustls::ConnectionTrafficSecrets;

/// The record header: outer type, legacy version, length.
pub const HEADER: usize = 5;
/// The AEAD tag of every cipher TLS 1.3 has.
pub const TAG: usize = 16;
/// The most content one record carries.
pub const MAX_CONTENT: usize = 1 << 14;
/// The longest record a peer may send (content, type, padding and tag: 2^14 + 256).
pub const MAX_RECORD: usize = HEADER + MAX_CONTENT + 256;
/// The longest record this side sends (no padding).
pub const MAX_SEALED: usize = HEADER + MAX_CONTENT + 1 + TAG;

/// The outer type of every protected record.
const APPLICATION_DATA: u8 = 23;

/// The true content type, inside the protection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Content {
    Alert = 21,
    Handshake = 22,
    ApplicationData = 23,
}

/// Why a record could not be sealed or opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("the negotiated cipher has no record layer here")]
    Cipher,
    #[error("a record of outer type {0} where only protected records (23) may come")]
    OuterType(u8),
    #[error("a record of {0} bytes, longer than TLS allows")]
    TooLong(usize),
    #[error("a record failed authentication: corrupted or forged on the way")]
    Forged,
    #[error("a record with no content type")]
    NoType,
    #[error("a record of unknown content type {0}")]
    UnknownType(u8),
    #[error("a record with {0} bytes of content, more than TLS allows (record overflow)")]
    Overflow(usize),
    #[error("the AEAD refused to seal a record")]
    Seal,
    #[error("a TLS KeyUpdate of {0} bytes, or not last in its record")]
    KeyUpdateFraming(usize),
    #[error("a TLS KeyUpdate with request value {0}")]
    KeyUpdateRequest(u8),
    #[error("unexpected TLS handshake message {0} after the handshake")]
    LateHandshake(u8),
    #[error("a TLS handshake message of {0} bytes that its record does not hold")]
    HandshakeLength(usize),
    #[error("a TLS alert of {0} bytes (alerts are 2)")]
    AlertLength(usize),
    /// The peer's alert other than close_notify: its description.
    #[error("received fatal alert {0}")]
    Alert(u8),
}

/// What one opened record says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opened {
    /// Application data: where its content lies within the record.
    Data(Range<usize>),
    /// close_notify: the peer's direction has ended cleanly.
    CloseNotify,
    /// A KeyUpdate: records after this one come under the peer's next key; `requested`
    /// asks this side to update its own too.
    KeyUpdate { requested: bool },
    /// Nothing to act on (session tickets).
    Nothing,
}

/// Handshake message types TLS 1.3 allows after the handshake.
const NEW_SESSION_TICKET: u8 = 4;
pub const KEY_UPDATE: u8 = 24;

/// An alert's content: close_notify, or the error naming the peer's alert.
fn alert(content: &[u8]) -> Result<Opened, RecordError> {
    match *content {
        [_, 0] => Ok(Opened::CloseNotify),
        [_, description] => Err(RecordError::Alert(description)),
        _ => Err(RecordError::AlertLength(content.len())),
    }
}

/// Post-handshake messages, back to back: session tickets are skipped; a KeyUpdate must be
/// the last message of its record (keys change at a record boundary).
fn handshake(content: &[u8]) -> Result<Opened, RecordError> {
    let mut rest = content;
    let mut opened = Opened::Nothing;
    while !rest.is_empty() {
        let Some(&[typ, a, b, c]) = rest.get(..4) else {
            return Err(RecordError::HandshakeLength(rest.len()));
        };
        let len = u32::from_be_bytes([0, a, b, c]) as usize;
        let Some(body) = rest.get(4..4 + len) else {
            return Err(RecordError::HandshakeLength(len));
        };
        rest = &rest[4 + len..];
        opened = match typ {
            KEY_UPDATE if len != 1 || !rest.is_empty() => {
                return Err(RecordError::KeyUpdateFraming(len));
            }
            KEY_UPDATE => match body[0] {
                0 => Opened::KeyUpdate { requested: false },
                1 => Opened::KeyUpdate { requested: true },
                other => return Err(RecordError::KeyUpdateRequest(other)),
            },
            NEW_SESSION_TICKET => Opened::Nothing,
            other => return Err(RecordError::LateHandshake(other)),
        };
    }
    Ok(opened)
}

/// One direction's key, static IV and sequence number.
struct Keys {
    key: LessSafeKey,
    iv: [u8; aead::NONCE_LEN],
    seq: u64,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key or the IV.
        f.debug_struct("Keys").field("seq", &self.seq).finish()
    }
}

impl Keys {
    fn new(secrets: &ConnectionTrafficSecrets, seq: u64) -> Result<Keys, RecordError> {
        let (algorithm, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv)
            }
            _ => return Err(RecordError::Cipher),
        };
        let key = UnboundKey::new(algorithm, key.as_ref()).map_err(|_| RecordError::Cipher)?;
        let iv = iv.as_ref().try_into().map_err(|_| RecordError::Cipher)?;
        Ok(Keys {
            key: LessSafeKey::new(key),
            iv,
            seq,
        })
    }

    /// The nonce for the next record; the sequence number moves on.
    fn next_nonce(&mut self) -> Nonce {
        let mut nonce = self.iv;
        for (n, byte) in nonce[aead::NONCE_LEN - 8..]
            .iter_mut()
            .zip(self.seq.to_be_bytes())
        {
            *n ^= byte;
        }
        self.seq += 1;
        Nonce::assume_unique_for_key(nonce)
    }
}

/// Seals outgoing records.
#[derive(Debug)]
pub struct Sealer(Keys);

impl Sealer {
    pub fn new(secrets: &ConnectionTrafficSecrets, seq: u64) -> Result<Sealer, RecordError> {
        Keys::new(secrets, seq).map(Sealer)
    }

    /// Records sealed with this key so far (and its starting sequence number).
    pub fn sequence(&self) -> u64 {
        self.0.seq
    }

    /// Seals the `len` content bytes at `record[HEADER..]` in place as one record of type
    /// `content`: writes the header before them and the type and tag after them. `record`
    /// must hold `len + HEADER + 1 + TAG` bytes and `len` be at most [`MAX_CONTENT`].
    /// Returns the record's length.
    pub fn seal(
        &mut self,
        record: &mut [u8],
        len: usize,
        content: Content,
    ) -> Result<usize, RecordError> {
        debug_assert!(len <= MAX_CONTENT && record.len() >= len + HEADER + 1 + TAG);
        let inner = len + 1;
        let protected = inner + TAG;
        let header = [
            APPLICATION_DATA,
            3,
            3,
            (protected >> 8) as u8,
            protected as u8,
        ];
        record[..HEADER].copy_from_slice(&header);
        record[HEADER + len] = content as u8;
        let nonce = self.0.next_nonce();
        let (body, rest) = record[HEADER..].split_at_mut(inner);
        // ring refuses only inputs longer than any record; should it ever, nothing half-sealed
        // may leave: the caller gets an error, not a record.
        let tag = self
            .0
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(header), body)
            .map_err(|_| RecordError::Seal)?;
        rest[..TAG].copy_from_slice(tag.as_ref());
        Ok(HEADER + protected)
    }
}

/// Opens incoming records.
#[derive(Debug)]
pub struct Opener(Keys);

impl Opener {
    pub fn new(secrets: &ConnectionTrafficSecrets, seq: u64) -> Result<Opener, RecordError> {
        Keys::new(secrets, seq).map(Opener)
    }

    /// The length of the record that starts `buf`, once its header has arrived.
    pub fn record_len(buf: &[u8]) -> Result<Option<usize>, RecordError> {
        let Some(header) = buf.get(..HEADER) else {
            return Ok(None);
        };
        if header[0] != APPLICATION_DATA {
            return Err(RecordError::OuterType(header[0]));
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if !(TAG + 1..=MAX_RECORD - HEADER).contains(&len) {
            return Err(RecordError::TooLong(len));
        }
        Ok(Some(HEADER + len))
    }

    /// Opens `record` (exactly one whole record) in place. Returns its content type and
    /// where its content lies within `record`.
    pub fn open(&mut self, record: &mut [u8]) -> Result<(Content, Range<usize>), RecordError> {
        let mut header = [0u8; HEADER];
        header.copy_from_slice(&record[..HEADER]);
        let nonce = self.0.next_nonce();
        let plain = self
            .0
            .key
            .open_in_place(nonce, Aad::from(header), &mut record[HEADER..])
            .map_err(|_| RecordError::Forged)?;
        // Zero padding after the content type.
        let end = plain
            .iter()
            .rposition(|&b| b != 0)
            .ok_or(RecordError::NoType)?;
        if end > MAX_CONTENT {
            return Err(RecordError::Overflow(end));
        }
        let content = match plain[end] {
            21 => Content::Alert,
            22 => Content::Handshake,
            23 => Content::ApplicationData,
            other => return Err(RecordError::UnknownType(other)),
        };
        Ok((content, HEADER..HEADER + end))
    }

    /// Opens the record at the start of `buf` in place, once all of it has arrived, and
    /// reads its content: the record's length and what it says. After an error the
    /// connection is beyond use.
    pub fn open_next(&mut self, buf: &mut [u8]) -> Result<Option<(usize, Opened)>, RecordError> {
        let Some(len) = Opener::record_len(buf)? else {
            return Ok(None);
        };
        let Some(record) = buf.get_mut(..len) else {
            return Ok(None);
        };
        let (content, range) = self.open(record)?;
        let opened = match content {
            Content::ApplicationData => Opened::Data(range),
            Content::Alert => alert(&record[range])?,
            Content::Handshake => handshake(&record[range])?,
        };
        Ok(Some((len, opened)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::crypto::cipher::{AeadKey, Iv};

    fn secrets(byte: u8) -> ConnectionTrafficSecrets {
        ConnectionTrafficSecrets::Aes256Gcm {
            key: AeadKey::from([byte; 32]),
            iv: Iv::from([byte; 12]),
        }
    }

    fn sealed(sealer: &mut Sealer, content: &[u8], typ: Content) -> Vec<u8> {
        let mut record = vec![0u8; content.len() + HEADER + 1 + TAG];
        record[HEADER..HEADER + content.len()].copy_from_slice(content);
        let n = sealer.seal(&mut record, content.len(), typ).unwrap();
        record.truncate(n);
        record
    }

    #[test]
    fn records_round_trip_in_order_and_refuse_tampering_and_replay() {
        let mut sealer = Sealer::new(&secrets(7), 0).unwrap();
        let mut opener = Opener::new(&secrets(7), 0).unwrap();
        let first = sealed(&mut sealer, b"hello", Content::ApplicationData);
        assert_eq!(Opener::record_len(&first).unwrap(), Some(first.len()));
        assert_eq!(Opener::record_len(&first[..4]).unwrap(), None);
        let mut copy = first.clone();
        let (typ, range) = opener.open(&mut copy).unwrap();
        assert_eq!(
            (typ, &copy[range]),
            (Content::ApplicationData, &b"hello"[..])
        );

        // The same record again (a replay) is opened with the next nonce: refused.
        let mut replay = first.clone();
        assert_eq!(opener.open(&mut replay), Err(RecordError::Forged));

        let mut sealer = Sealer::new(&secrets(7), 5).unwrap();
        let mut opener = Opener::new(&secrets(7), 5).unwrap();
        let full = vec![0xa5; MAX_CONTENT];
        let mut record = sealed(&mut sealer, &full, Content::ApplicationData);
        assert_eq!(record.len(), MAX_SEALED);
        let mut flipped = record.clone();
        flipped[HEADER + 100] ^= 1;
        assert_eq!(
            Opener::new(&secrets(7), 5).unwrap().open(&mut flipped),
            Err(RecordError::Forged)
        );
        let (_, range) = opener.open(&mut record).unwrap();
        assert_eq!(&record[range], &full[..]);
        let mut alert = sealed(&mut sealer, &[1, 0], Content::Alert);
        assert_eq!(opener.open(&mut alert).unwrap().0, Content::Alert);
    }

    #[test]
    fn random_bytes_are_refused_without_panicking() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::SmallRng::seed_from_u64(3);
        let mut opener = Opener::new(&secrets(9), 0).unwrap();
        for _ in 0..2000 {
            let len = rng.gen_range(0..2 * MAX_RECORD);
            let mut buf: Vec<u8> = (0..len).map(|_| rng.r#gen()).collect();
            if rng.gen_bool(0.5) && buf.len() >= HEADER {
                buf[0] = APPLICATION_DATA;
            }
            if let Ok(Some(n)) = Opener::record_len(&buf)
                && n <= buf.len()
            {
                assert_eq!(opener.open(&mut buf[..n]), Err(RecordError::Forged));
            }
        }
    }

    #[test]
    fn bad_headers_are_named() {
        assert_eq!(
            Opener::record_len(&[22, 3, 3, 0, 40]),
            Err(RecordError::OuterType(22))
        );
        assert_eq!(
            Opener::record_len(&[23, 3, 3, 0xff, 0xff]),
            Err(RecordError::TooLong(0xffff))
        );
    }
}
