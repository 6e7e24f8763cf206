//! The property the fuzz target `fuzz/fuzz_targets/records.rs` checks, with known keys: the
//! opener and what reads the opened content (alerts, handshake messages, KeyUpdate) never
//! panic on any byte stream, open exactly the records sealed with the key and sequence
//! number in force and nothing else, hand out exactly the content that was sealed, and
//! follow the peer's key updates. A deterministic version runs in `cargo test` (below),
//! over the committed corpus `fuzz/seeds/records/` too.
//!
//! The input is a script for the sending side:
//!
//! ```text
//!  0 LEN_HI LEN_LO INNER…  seal INNER (content ‖ type ‖ padding, as chosen) as one record
//!  1 N BYTES…              N raw bytes on the wire (garbage, headers, half records)
//!  2 AT_HI AT_LO           flip one byte of the last sealed record (it must not open)
//!  3                       the sender moves to its next key (as after a KeyUpdate)
//! ```
//!
//! The sender seals with `ring` directly, apart from [`Sealer`](super::record::Sealer), so
//! that the opener is checked against a second implementation of RFC 8446 §5.2.

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

/// One record on the wire, as the sender wrote it.
#[derive(Debug)]
struct Sealed {
    at: usize,
    len: usize,
    generation: u8,
    seq: u64,
    /// Content type, content and padding, before sealing.
    inner: Vec<u8>,
    /// The record as sealed, to tell whether flips left it changed (two flips of one byte
    /// restore it).
    original: Vec<u8>,
    tampered: bool,
}

/// Seals `inner` with key `generation` and sequence number `seq`.
fn seal(inner: &[u8], generation: u8, seq: u64) -> Vec<u8> {
    let (key, iv) = material(generation);
    let key = match UnboundKey::new(&AES_256_GCM, &key) {
        Ok(key) => LessSafeKey::new(key),
        Err(_) => panic!("ring refuses a 32-byte AES-256-GCM key"),
    };
    let mut nonce = iv;
    for (n, s) in nonce[NONCE_LEN - 8..].iter_mut().zip(seq.to_be_bytes()) {
        *n ^= s;
    }
    let length = (inner.len() + 16) as u16;
    let header = [23, 3, 3, (length >> 8) as u8, length as u8];
    let mut record = header.to_vec();
    let mut body = inner.to_vec();
    let sealed = key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(header),
        &mut body,
    );
    if sealed.is_err() {
        panic!("ring refuses to seal {} bytes", inner.len());
    }
    record.extend_from_slice(&body);
    record
}

/// The sender's script: the wire and what is on it.
fn wire(data: &[u8]) -> (Vec<u8>, Vec<Sealed>) {
    let (mut wire, mut sealed) = (Vec::new(), Vec::<Sealed>::new());
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
                let inner = rest[..take].to_vec();
                rest = &rest[take..];
                let record = seal(&inner, generation, seq);
                sealed.push(Sealed {
                    at: wire.len(),
                    len: record.len(),
                    generation,
                    seq,
                    inner,
                    original: record.clone(),
                    tampered: false,
                });
                wire.extend_from_slice(&record);
                seq += 1;
            }
            1 => {
                let n = rest.first().map_or(0, |&n| usize::from(n));
                let bytes = rest.get(1..).unwrap_or_default();
                let take = n.min(bytes.len());
                wire.extend_from_slice(&bytes[..take]);
                rest = &bytes[take..];
            }
            2 => {
                let at = match rest {
                    [hi, lo, ..] => usize::from(u16::from_be_bytes([*hi, *lo])),
                    _ => 0,
                };
                rest = rest.get(2..).unwrap_or_default();
                if let Some(last) = sealed.last_mut()
                    && last.at + last.len == wire.len()
                {
                    wire[last.at + at % last.len] ^= 0x80;
                    last.tampered = wire[last.at..] != last.original[..];
                }
            }
            _ => {
                generation = generation.wrapping_add(1);
                seq = 0;
            }
        }
    }
    (wire, sealed)
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
    let (mut wire, sealed) = wire(data);
    let (mut generation, mut seq) = (0u8, 0u64);
    let mut receiver = opener(generation);
    let mut at = 0;
    let mut outcome = Outcome::default();
    loop {
        let here = sealed.iter().find(|s| s.at == at);
        // A record sealed with the key and sequence number in force, intact, of a length
        // TLS allows (1 byte of type to 2^14 + 256 with the tag).
        let genuine = here.filter(|s| {
            !s.tampered
                && (s.generation, s.seq) == (generation, seq)
                && (1..=MAX_RECORD - HEADER - 16).contains(&s.inner.len())
        });
        match receiver.open_next(&mut wire[at..]) {
            Ok(None) => {
                assert!(genuine.is_none_or(|s| s.at + s.len > wire.len()));
                return outcome;
            }
            Err(error) => {
                // A genuine record always authenticates; only its content may be refused.
                if genuine.is_some() {
                    assert!(
                        !matches!(
                            error,
                            RecordError::Forged
                                | RecordError::OuterType(_)
                                | RecordError::TooLong(_)
                        ),
                        "a genuine record refused: {error}"
                    );
                }
                outcome.end = End::Refused(error);
                return outcome;
            }
            Ok(Some((len, opened))) => {
                let Some(record) = genuine.filter(|s| s.len == len) else {
                    panic!("opened {len} bytes at {at} that were not sealed there: {opened:?}");
                };
                let expected = content(&record.inner);
                outcome.opened += 1;
                match opened {
                    Opened::Data(range) => {
                        assert!(range.end <= len && range.len() <= MAX_CONTENT);
                        assert_eq!(&wire[at + range.start..at + range.end], expected);
                        assert_eq!(record.inner[expected.len()], 23);
                    }
                    Opened::CloseNotify => {
                        assert_eq!((record.inner[expected.len()], expected.len()), (21, 2));
                        outcome.end = End::CloseNotify;
                        return outcome;
                    }
                    Opened::KeyUpdate { .. } => {
                        assert_eq!(record.inner[expected.len()], 22);
                        assert_eq!(expected.get(expected.len().saturating_sub(5)), Some(&24));
                        outcome.key_updates += 1;
                        generation = generation.wrapping_add(1);
                        receiver = opener(generation);
                        seq = 0;
                        at += len;
                        continue;
                    }
                    Opened::Nothing => assert_eq!(record.inner[expected.len()], 22),
                }
                seq += 1;
                at += len;
            }
        }
    }
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
