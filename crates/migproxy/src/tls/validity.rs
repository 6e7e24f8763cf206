//! Why a peer refused this daemon's certificate as `CertificateExpired`.
//!
//! TLS has one alert for "expired" and "not valid yet" (RFC 8446: "a certificate has expired
//! or is not currently valid"), so the peer cannot say which. This daemon knows its own
//! certificate, and tells the two apart, or says that by its own clock the certificate is
//! valid (then the clocks disagree).

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use rustls::AlertDescription;
use rustls_pki_types::CertificateDer;
use x509_parser::time::ASN1Time;

/// This daemon's certificate, as sent to peers: where it came from and when it is valid.
#[derive(Debug, Clone)]
pub(crate) struct OwnCertificate {
    path: PathBuf,
    not_before: ASN1Time,
    not_after: ASN1Time,
}

/// A peer's refusal of this daemon's certificate, with what this host knows of it.
#[derive(Debug, thiserror::Error)]
#[error(
    "the peer refused this daemon's certificate {} as expired or not yet valid (alert \
     CertificateExpired): {state}",
    path.display()
)]
pub struct CertificateRefused {
    path: PathBuf,
    state: State,
}

/// The certificate's validity by this host's clock.
#[derive(Debug)]
enum State {
    NotYet(ASN1Time),
    Expired(ASN1Time),
    Valid(ASN1Time, ASN1Time),
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            State::NotYet(from) => write!(f, "it is not valid yet, only from {from}"),
            State::Expired(until) => write!(f, "it expired on {until}"),
            State::Valid(from, until) => write!(
                f,
                "by this host's clock it is valid from {from} to {until}: the peer's clock \
                 may be wrong"
            ),
        }
    }
}

impl OwnCertificate {
    /// `None` when the leaf cannot be parsed: rustls judges it then, and a refusal is
    /// reported as the alert alone.
    pub(crate) fn new(path: &Path, leaf: &CertificateDer<'_>) -> Option<OwnCertificate> {
        let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
        let validity = cert.validity();
        Some(OwnCertificate {
            path: path.to_owned(),
            not_before: validity.not_before,
            not_after: validity.not_after,
        })
    }

    /// `error`, explained when it is the peer's `CertificateExpired` alert.
    pub(crate) fn explain(&self, error: io::Error) -> io::Error {
        if !is_expired_alert(&error) {
            return error;
        }
        let now = ASN1Time::now();
        let state = if now < self.not_before {
            State::NotYet(self.not_before)
        } else if now > self.not_after {
            State::Expired(self.not_after)
        } else {
            State::Valid(self.not_before, self.not_after)
        };
        io::Error::new(
            io::ErrorKind::InvalidData,
            CertificateRefused {
                path: self.path.clone(),
                state,
            },
        )
    }
}

fn is_expired_alert(error: &io::Error) -> bool {
    matches!(
        error
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>()),
        Some(rustls::Error::AlertReceived(
            AlertDescription::CertificateExpired
        ))
    )
}
