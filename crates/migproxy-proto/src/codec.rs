//! Big-endian primitives shared by the message codecs, and the one decode error type.

/// Why bytes could not be decoded. Each defect has its own variant so that a peer can be told
/// precisely what was wrong and tests can tell the cases apart.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("truncated: {needed} more bytes needed")]
    Truncated { needed: usize },
    #[error("{what} of {len} bytes exceeds the limit of {max}")]
    Oversized {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("bad magic {0:02x?}: not a migproxy peer")]
    BadMagic([u8; 4]),
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u16),
    #[error("unknown connection kind {0}")]
    UnknownKind(u8),
    #[error("unknown control message type {0}")]
    UnknownMessage(u8),
    #[error("invalid {field}: {value}")]
    InvalidValue { field: &'static str, value: u64 },
    /// A hello flag on the kind of connection it does not apply to.
    #[error("hello flag `{flag}` is not valid on a {kind} connection")]
    FlagNotForKind {
        flag: &'static str,
        kind: &'static str,
    },
    /// Two hello flags that cannot go together.
    #[error("hello flags `{0}` and `{1}` cannot go together")]
    FlagsExclusive(&'static str, &'static str),
    /// A hello flag that means something only beside another.
    #[error("hello flag `{0}` needs flag `{1}`")]
    FlagNeedsFlag(&'static str, &'static str),
    /// A hello flag that needs a later protocol version than the hello's.
    #[error("hello flag `{flag}` needs protocol version {needs} or later, not {version}")]
    FlagNeedsVersion {
        flag: &'static str,
        needs: u16,
        version: u16,
    },
    #[error("invalid migration id")]
    InvalidId,
    #[error("{field} is not UTF-8")]
    InvalidUtf8 { field: &'static str },
    #[error("{0} unexpected bytes after the message")]
    TrailingBytes(usize),
}

/// Reads primitives from a slice, failing with `Truncated` rather than panicking.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated {
                needed: n - self.buf.len(),
            });
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.bytes(N)?);
        Ok(out)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    pub(crate) fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// A string with a one-byte length.
    pub(crate) fn short_str(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let len = self.u8()? as usize;
        self.utf8(len, field)
    }

    /// A string with a two-byte length.
    pub(crate) fn str16(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let len = self.u16()? as usize;
        self.utf8(len, field)
    }

    fn utf8(&mut self, len: usize, field: &'static str) -> Result<String, DecodeError> {
        let bytes = self.bytes(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError::InvalidUtf8 { field })
    }

    /// Fails unless every byte was consumed.
    pub(crate) fn finish(self) -> Result<(), DecodeError> {
        match self.buf.len() {
            0 => Ok(()),
            n => Err(DecodeError::TrailingBytes(n)),
        }
    }
}

/// Appends primitives to a buffer.
pub(crate) struct Writer<'a> {
    pub(crate) buf: &'a mut Vec<u8>,
}

impl Writer<'_> {
    pub(crate) fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    pub(crate) fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }
    pub(crate) fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }
    pub(crate) fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }
    pub(crate) fn bytes(&mut self, v: &[u8]) {
        self.buf.extend_from_slice(v);
    }

    /// A string with a one-byte length, cut at a character boundary to fit.
    pub(crate) fn short_str(&mut self, s: &str) {
        let s = truncate(s, u8::MAX as usize);
        self.u8(s.len() as u8);
        self.bytes(s.as_bytes());
    }

    /// A string with a two-byte length, cut at a character boundary to fit `max`.
    pub(crate) fn str16(&mut self, s: &str, max: usize) {
        let s = truncate(s, max.min(u16::MAX as usize));
        self.u16(s.len() as u16);
        self.bytes(s.as_bytes());
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_cut_at_character_boundaries() {
        let mut buf = Vec::new();
        Writer { buf: &mut buf }.str16(&"é".repeat(10), 5);
        let mut reader = Reader::new(&buf);
        assert_eq!(reader.str16("s").unwrap(), "éé");
        reader.finish().unwrap();
    }

    #[test]
    fn reader_reports_how_much_is_missing() {
        let mut reader = Reader::new(&[1, 2]);
        assert_eq!(reader.u32(), Err(DecodeError::Truncated { needed: 2 }));
    }
}
