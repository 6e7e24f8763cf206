//! The revocation list file, `ca-crl.pem`: PEM or DER, and never silently empty.
//!
//! A revocation list that cannot be read must not read as "nothing is revoked": that would
//! admit exactly the peers the operator meant to shut out. So the file is optional, but a
//! file that is there must hold lists and nothing else, or the TLS material does not load.

use std::io;
use std::path::Path;

use rustls_pki_types::CertificateRevocationListDer;
use rustls_pki_types::pem::PemObject;

/// Why a present revocation list file is refused.
#[derive(Debug, thiserror::Error)]
pub enum CrlError {
    #[error("cannot read it")]
    Read(#[source] io::Error),
    #[error("it is a symbolic link to a file that does not exist")]
    Dangling,
    #[error("the file is empty")]
    Empty,
    #[error("it is neither PEM with an \"X509 CRL\" block nor a DER revocation list")]
    NotCrl,
    #[error("it holds {blocks} PEM blocks of which {crls} are \"X509 CRL\"")]
    OtherBlocks { blocks: usize, crls: usize },
    #[error("its PEM is malformed")]
    Pem(#[source] rustls_pki_types::pem::Error),
    #[error("it is not a valid revocation list")]
    Invalid(#[source] rustls::server::VerifierBuilderError),
}

/// The lists in `path`; none when there is no such file.
pub(super) fn load(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, CrlError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            // A link left pointing nowhere (a rotated file, a broken deploy) is a mistake,
            // not the absence of a list.
            return match path.symlink_metadata() {
                Ok(_) => Err(CrlError::Dangling),
                Err(_) => Ok(Vec::new()),
            };
        }
        Err(error) => return Err(CrlError::Read(error)),
    };
    parse(bytes)
}

/// DER is one list, as `openssl crl -outform DER` writes it; PEM may hold several.
fn parse(bytes: Vec<u8>) -> Result<Vec<CertificateRevocationListDer<'static>>, CrlError> {
    // A DER list is an ASN.1 SEQUENCE, whose tag no PEM file starts with.
    const SEQUENCE: u8 = 0x30;
    match bytes.first() {
        None => Err(CrlError::Empty),
        Some(&SEQUENCE) => Ok(vec![CertificateRevocationListDer::from(bytes)]),
        Some(_) => pem(&bytes),
    }
}

fn pem(bytes: &[u8]) -> Result<Vec<CertificateRevocationListDer<'static>>, CrlError> {
    let crls = CertificateRevocationListDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(CrlError::Pem)?;
    // The PEM reader skips blocks of other types without a word: a list whose header was
    // mistyped would vanish, so every block must be a list.
    let blocks = bytes
        .split(|&b| b == b'\n' || b == b'\r')
        .filter(|line| line.starts_with(b"-----BEGIN "))
        .count();
    match (blocks, crls.len()) {
        (0, _) => Err(CrlError::NotCrl),
        (blocks, crls) if blocks != crls => Err(CrlError::OtherBlocks { blocks, crls }),
        _ => Ok(crls),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_not_a_list_is_refused() {
        assert!(matches!(parse(Vec::new()), Err(CrlError::Empty)));
        assert!(matches!(
            parse(b"not a list at all\n".to_vec()),
            Err(CrlError::NotCrl)
        ));
        let mistyped = b"-----BEGIN X509 CRLL-----\nAAAA\n-----END X509 CRLL-----\n";
        assert!(matches!(
            parse(mistyped.to_vec()),
            Err(CrlError::OtherBlocks { blocks: 1, crls: 0 })
        ));
        let unterminated = b"-----BEGIN X509 CRL-----\nAAAA\n";
        assert!(matches!(
            parse(unterminated.to_vec()),
            Err(CrlError::Pem(_))
        ));
    }

    #[test]
    fn der_and_pem_lists_are_taken() {
        assert_eq!(parse(vec![0x30, 0x00]).unwrap().len(), 1);
        let two = b"-----BEGIN X509 CRL-----\nMAA=\n-----END X509 CRL-----\n\
                    -----BEGIN X509 CRL-----\nMAA=\n-----END X509 CRL-----\n";
        assert_eq!(parse(two.to_vec()).unwrap().len(), 2);
    }
}
