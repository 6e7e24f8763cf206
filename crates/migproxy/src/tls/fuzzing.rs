//! The property the fuzz target `fuzz/fuzz_targets/records.rs` checks, with known keys: the
//! opener and what reads the opened content (alerts, handshake messages, KeyUpdate) never
//! panic on any byte stream, and agree with a reference: a record opens exactly when `ring`,
//! called directly with the key and sequence number in force, opens it, and what it says
//! (data and its content, close_notify, a KeyUpdate, a ticket) is what that plaintext says;
//! key updates are followed. A deterministic version runs in `cargo test` (below), over the
//! committed corpus `fuzz/seeds/records/` too.
//!
//! The input is a script for the sending side:
//!
//! ```text
//!  0 LEN_HI LEN_LO INNER…  seal INNER (content ‖ type ‖ padding, as chosen) as one record
//!  1 N BYTES…              N raw bytes on the wire (garbage, headers, half records, or a
//!                          record copied whole: it opens only where its sequence number is)
//!  2 AT_HI AT_LO           flip one byte of the last sealed record
//!  3                       the sender moves to its next key (as after a KeyUpdate)
//! ```
//!
//! The reference seals and opens with `ring` directly, apart from
//! [`Sealer`](super::record::Sealer) and [`Opener`], so that the opener is checked against a
//! second implementation of RFC 8446 §5.2.

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use rustls::ConnectionTrafficSecrets;
use rustls::crypto::cipher::{AeadKey, Iv};

use super::record::{HEADER, MAX_CONTENT, MAX_RECORD, Opened, Opener, RecordError};

/// Key generation `generation`'s key and IV: known to both sides.
fn material(generation: u8) -> ([u8; 32], [u8; NONCE_LEN]) {
    ([generation; 32], [generation ^ 0x5a; NONCE_LEN])
}

fn opener(generation: u8) -> Opener {
    let (key, iv) = material(generation);
    let secrets = ConnectionTrafficSecrets::Aes256Gcm {
        key: AeadKey::from(key),
        iv: Iv::from(iv),
    };
    match Opener::new(&secrets, 0) {
        Ok(opener) => opener,
        Err(error) => panic!("a known AES-256-GCM key is refused: {error}"),
    }
}

/// The reference's key and nonce for record `seq` under key `generation`.
fn key_and_nonce(generation: u8, seq: u64) -> (LessSafeKey, Nonce) {
    let (key, iv) = material(generation);
    let key = match UnboundKey::new(&AES_256_GCM, &key) {
        Ok(key) => LessSafeKey::new(key),
        Err(_) => panic!("ring refuses a 32-byte AES-256-GCM key"),
    };
    let mut nonce = iv;
    for (n, s) in nonce[NONCE_LEN - 8..].iter_mut().zip(seq.to_be_bytes()) {
        *n ^= s;
    }
    (key, Nonce::assume_unique_for_key(nonce))
}

/// Seals `inner` with key `generation` and sequence number `seq`.
fn seal(inner: &[u8], generation: u8, seq: u64) -> Vec<u8> {
    let (key, nonce) = key_and_nonce(generation, seq);
    let length = (inner.len() + 16) as u16;
    let header = [23, 3, 3, (length >> 8) as u8, length as u8];
    let mut body = inner.to_vec();
    if key
        .seal_in_place_append_tag(nonce, Aad::from(header), &mut body)
        .is_err()
    {
        panic!("ring refuses to seal {} bytes", inner.len());
    }
    [&header[..], &body].concat()
}

/// The reference's opening of the whole record at the start of `wire` (as the peer sent
/// it): its length and inner plaintext, or none when it is not a record TLS allows, not all
/// there, or does not authenticate.
fn reference_open(wire: &[u8], generation: u8, seq: u64) -> Option<(usize, Vec<u8>)> {
    let header: [u8; HEADER] = wire.get(..HEADER)?.try_into().ok()?;
    let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
    if header[0] != 23 || !(17..=MAX_RECORD - HEADER).contains(&len) {
        return None;
    }
    let mut body = wire.get(HEADER..HEADER + len)?.to_vec();
    let (key, nonce) = key_and_nonce(generation, seq);
    let inner = key
        .open_in_place(nonce, Aad::from(header), &mut body)
        .ok()?;
    Some((HEADER + len, inner.to_vec()))
}

/// The sender's script: the bytes on the wire.
fn wire(data: &[u8]) -> Vec<u8> {
    let mut wire = Vec::new();
    // Where the last sealed record starts, while it is the last thing on the wire.
    let mut last: Option<usize> = None;
    let (mut generation, mut seq) = (0u8, 0u64);
    let mut rest = data;
    while let Some((&op, tail)) = rest.split_first() {
        rest = tail;
        match op % 4 {
            0 => {
                let len = match rest {
                    [hi, lo, ..] => usize::from(u16::from_be_bytes([*hi, *lo])),
                    _ => 0,
                };
                rest = rest.get(2..).unwrap_or_default();
                // Up to a little more than a record may hold, to reach the length checks.
                let take = len.min(rest.len()).min(MAX_RECORD);
                last = Some(wire.len());
                wire.extend_from_slice(&seal(&rest[..take], generation, seq));
                rest = &rest[take..];
                seq += 1;
            }
            1 => {
                let n = rest.first().map_or(0, |&n| usize::from(n));
                let bytes = rest.get(1..).unwrap_or_default();
                let take = n.min(bytes.len());
                wire.extend_from_slice(&bytes[..take]);
                rest = &bytes[take..];
                last = None;
            }
            2 => {
                let at = match rest {
                    [hi, lo, ..] => usize::from(u16::from_be_bytes([*hi, *lo])),
                    _ => 0,
                };
                rest = rest.get(2..).unwrap_or_default();
                if let Some(start) = last {
                    let len = wire.len() - start;
                    wire[start + at % len] ^= 0x80;
                }
            }
            _ => {
                generation = generation.wrapping_add(1);
                seq = 0;
            }
        }
    }
    wire
}

/// The content a sealed inner plaintext carries: padding and type removed.
fn content(inner: &[u8]) -> &[u8] {
    let end = inner.iter().rposition(|&b| b != 0).unwrap_or(0);
    &inner[..end]
}

/// How far the receiving side got.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Records opened, key updates included.
    pub opened: usize,
    pub key_updates: usize,
    /// How the stream ended: close_notify, an error, or more bytes needed.
    pub end: End,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub enum End {
    #[default]
    Incomplete,
    CloseNotify,
    Refused(RecordError),
}

/// Runs the script `data` and checks the receiving side's every step (panics on a violation).
pub fn records(data: &[u8]) -> Outcome {
    let sent = wire(data);
    let mut wire = sent.clone();
    let (mut generation, mut seq) = (0u8, 0u64);
    let mut receiver = opener(generation);
    let mut at = 0;
    let mut outcome = Outcome::default();
    loop {
        let reference = reference_open(&sent[at..], generation, seq);
        let (len, opened) = match receiver.open_next(&mut wire[at..]) {
            Ok(None) => {
                check_partial(&sent[at..], at);
                return outcome;
            }
            Err(error) => {
                check_refusal(reference.is_some(), &error, at);
                outcome.end = End::Refused(error);
                return outcome;
            }
            Ok(Some(opened)) => opened,
        };
        let Some((reference_len, inner)) = reference else {
            panic!("opened {len} bytes at {at} that the reference refuses: {opened:?}");
        };
        assert_eq!(len, reference_len);
        let expected = content(&inner);
        let typ = inner[expected.len()];
        outcome.opened += 1;
        match opened {
            Opened::Data(range) => {
                assert!(range.end <= len && range.len() <= MAX_CONTENT);
                assert_eq!(&wire[at + range.start..at + range.end], expected);
                assert_eq!(typ, 23);
            }
            Opened::CloseNotify => {
                assert_eq!((typ, expected.len(), expected.get(1)), (21, 2, Some(&0)));
                outcome.end = End::CloseNotify;
                return outcome;
            }
            Opened::KeyUpdate { requested } => {
                assert_eq!(typ, 22);
                let message = &expected[expected.len().saturating_sub(5)..];
                assert_eq!(message, [24, 0, 0, 1, u8::from(requested)]);
                outcome.key_updates += 1;
                generation = generation.wrapping_add(1);
                receiver = opener(generation);
                seq = 0;
                at += len;
                continue;
            }
            Opened::Nothing => assert_eq!(typ, 22),
        }
        seq += 1;
        at += len;
    }
}

/// The opener waits for more at `at`: what is left there must not hold a whole record.
fn check_partial(left: &[u8], at: usize) {
    let whole = left.get(3..HEADER).map(|l| {
        let len = HEADER + usize::from(u16::from_be_bytes([l[0], l[1]]));
        len <= left.len()
    });
    assert_ne!(whole, Some(true), "a whole record at {at} taken as partial");
}

/// The opener refused the record at `at`. A record the reference opens always
/// authenticates: only its content may be refused, never the record itself.
fn check_refusal(reference_opens: bool, error: &RecordError, at: usize) {
    let unopened = matches!(
        error,
        RecordError::Forged | RecordError::OuterType(_) | RecordError::TooLong(_)
    );
    assert!(
        !reference_opens || !unopened,
        "a record the reference opens refused at {at}: {error}"
    );
}

#[cfg(test)]
mod tests {
    use super::{End, Outcome, RecordError, records};

    /// Scripts worth mutating: data, a KeyUpdate followed by data under the next key, a
    /// session ticket, close_notify, a fatal alert, a tampered record, garbage.
    fn seeds() -> Vec<Vec<u8>> {
        fn sealed(inner: &[u8]) -> Vec<u8> {
            let mut op = vec![0, (inner.len() >> 8) as u8, inner.len() as u8];
            op.extend_from_slice(inner);
            op
        }
        let data = sealed(b"migration bytes\x17");
        let key_update = sealed(&[24, 0, 0, 1, 1, 22]);
        let ticket = sealed(&[4, 0, 0, 2, 9, 9, 22, 0, 0]);
        let close = sealed(&[1, 0, 21]);
        let fatal = sealed(&[2, 45, 21]);
        vec![
            [
                data.clone(),
                key_update.clone(),
                vec![3],
                data.clone(),
                close.clone(),
            ]
            .concat(),
            [ticket, data.clone(), fatal].concat(),
            [data.clone(), vec![2, 0, 7], data.clone()].concat(),
            [key_update, data.clone()].concat(),
            [vec![1, 5, 23, 3, 3, 0xff, 0xff], data].concat(),
        ]
    }

    #[test]
    fn mutated_record_streams_keep_the_property() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::SmallRng::seed_from_u64(11);
        let seeds = seeds();
        let outcomes: Vec<Outcome> = seeds.iter().map(|seed| records(seed)).collect();
        let outcome = |opened, key_updates, end| Outcome {
            opened,
            key_updates,
            end,
        };
        assert_eq!(
            outcomes,
            [
                outcome(4, 1, End::CloseNotify),
                outcome(2, 0, End::Refused(RecordError::Alert(45))),
                // The flip hits the first record: nothing opens.
                outcome(0, 0, End::Refused(RecordError::Forged)),
                // The sender did not move to its next key: the record after is refused.
                outcome(1, 1, End::Refused(RecordError::Forged)),
                outcome(0, 0, End::Refused(RecordError::TooLong(0xffff))),
            ]
        );
        for seed in seeds {
            for _ in 0..3_000 {
                let mut data = seed.clone();
                for _ in 0..rng.gen_range(1..4) {
                    let at = rng.gen_range(0..data.len());
                    data[at] = rng.r#gen();
                }
                data.truncate(rng.gen_range(0..=data.len()));
                let _ = records(&data);
            }
        }
    }

    #[test]
    fn the_fuzz_corpus_replays_cleanly() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fuzz/seeds/records");
        let entries = std::fs::read_dir(dir).expect("the committed fuzz corpus");
        let mut replayed = 0;
        for entry in entries {
            let _ =
                records(&std::fs::read(entry.expect("corpus entry").path()).expect("corpus file"));
            replayed += 1;
        }
        assert!(replayed >= 5, "only {replayed} corpus inputs");
    }
}
