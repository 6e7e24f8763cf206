//! One-time migration tokens: 256 random bits, compared in constant time, never printed.

use std::fmt;

use migproxy_proto::TOKEN_LEN;
use rand::RngCore;

#[derive(Clone, PartialEq, Eq)]
pub struct Token([u8; TOKEN_LEN]);

impl Token {
    /// A fresh token from the operating system's random source.
    pub fn generate() -> Token {
        let mut bytes = [0u8; TOKEN_LEN];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        Token(bytes)
    }

    pub fn from_bytes(bytes: [u8; TOKEN_LEN]) -> Token {
        Token(bytes)
    }

    /// Parses the 64 hex digits the API hands out.
    pub fn from_hex(text: &str) -> Option<Token> {
        // Exactly 64 hex digits (from_str_radix alone would take a "+" too).
        if text.len() != TOKEN_LEN * 2 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let mut bytes = [0u8; TOKEN_LEN];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Token(bytes))
    }

    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn bytes(&self) -> &[u8; TOKEN_LEN] {
        &self.0
    }

    /// Equality that takes the same time wherever the first difference is.
    pub fn matches(&self, other: &[u8; TOKEN_LEN]) -> bool {
        let diff = self
            .0
            .iter()
            .zip(other)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        std::hint::black_box(diff) == 0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(MASKED)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_masking() {
        let token = Token::generate();
        assert_eq!(Token::from_hex(&token.to_hex()), Some(token.clone()));
        assert_ne!(Token::generate(), token);
        assert_eq!(format!("{token:?}"), "Token(MASKED)");
        assert!(token.matches(token.bytes()));
        let mut other = *token.bytes();
        other[31] ^= 1;
        assert!(!token.matches(&other));
        assert_eq!(Token::from_hex("zz"), None);
        assert_eq!(Token::from_hex(&"g".repeat(64)), None);
        assert_eq!(Token::from_hex(&"é".repeat(32)), None);
        assert_eq!(Token::from_hex(&"+f".repeat(32)), None);
    }
}
