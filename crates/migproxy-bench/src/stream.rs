//! The synthetic stream: a pseudo-random block repeated, written by the source and hashed by
//! the sink, so that a lost, reordered or duplicated byte fails the run.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};

use crate::measure::BenchError;

pub const BLOCK: usize = 16 << 20;

pub fn random_block() -> Vec<u8> {
    let mut block = vec![0u8; BLOCK];
    SmallRng::seed_from_u64(7).fill_bytes(&mut block);
    block
}

/// The digest of `size` bytes made of `block` repeated.
pub fn expected_digest(block: &[u8], size: u64) -> blake3::Hash {
    let mut hasher = blake3::Hasher::new();
    let mut left = size;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        hasher.update(&block[..n]);
        left -= n as u64;
    }
    hasher.finalize()
}

/// Hashes a stream to its end.
pub fn sink_digest(mut stream: impl Read) -> std::io::Result<(u64, blake3::Hash)> {
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok((total, hasher.finalize()));
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
}

/// Writes `size` bytes of `block` repeated.
pub fn source_write(stream: &mut impl Write, block: &[u8], size: u64) -> std::io::Result<()> {
    let mut left = size;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        stream.write_all(&block[..n])?;
        left -= n as u64;
    }
    Ok(())
}

/// Connects, retrying while the proxy starts.
pub fn connect(port: u16) -> Result<TcpStream, BenchError> {
    let start = Instant::now();
    loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(stream) => return Ok(stream),
            Err(_) if start.elapsed() < Duration::from_secs(5) => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(error) => return Err(format!("connect to 127.0.0.1:{port}: {error}").into()),
        }
    }
}
