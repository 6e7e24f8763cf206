//! Endpoints in QEMU's migration URI syntax: `unix:PATH`, `tcp:HOST:PORT`, `tcp:[IPV6]:PORT`.
//!
//! Operators already write these for `-incoming` and `migrate`, so migproxy takes the same
//! spelling everywhere an address is asked for. Parsing is strict and every error names the
//! input and what is wrong with it, because a typo in an address is the most common mistake
//! and the least helpful one to report as "invalid argument".

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Where a stream is accepted or connected.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// A unix stream socket at a filesystem path.
    Unix(PathBuf),
    /// A TCP address. `host` is a name, an IPv4 address or a bare IPv6 address (no brackets);
    /// empty means "every address" when listening, as in QEMU's `tcp::4444`.
    Tcp { host: String, port: u16 },
}

/// Why an endpoint could not be parsed. Rendered as `invalid endpoint "INPUT": REASON`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid endpoint \"{input}\": {reason}")]
pub struct EndpointError {
    /// The text as given.
    pub input: String,
    /// What is wrong with it.
    pub reason: EndpointErrorReason,
}

/// The specific defect of an endpoint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointErrorReason {
    #[error("missing scheme, expected unix:PATH or tcp:HOST:PORT")]
    MissingScheme,
    #[error("unknown scheme \"{0}\", expected unix:PATH or tcp:HOST:PORT")]
    UnknownScheme(String),
    #[error("missing path")]
    MissingPath,
    #[error("path contains a NUL byte")]
    NulInPath,
    #[error("path is {0} bytes long; a unix socket path holds at most 107")]
    PathTooLong(usize),
    #[error("missing port")]
    MissingPort,
    #[error("invalid port \"{0}\": expected a number from 0 to 65535")]
    InvalidPort(String),
    #[error("an IPv6 address must be written in brackets, as tcp:[{0}]:PORT")]
    UnbracketedIpv6(String),
    #[error("unclosed '[' in IPv6 address")]
    UnclosedBracket,
    #[error("\"{0}\" is not an IPv6 address")]
    InvalidIpv6(String),
}

/// Longest path that fits `sun_path` (108 bytes with the terminating NUL) on Linux.
const MAX_UNIX_PATH: usize = 107;

impl FromStr for Endpoint {
    type Err = EndpointError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        parse(input).map_err(|reason| EndpointError {
            input: input.to_owned(),
            reason,
        })
    }
}

fn parse(input: &str) -> Result<Endpoint, EndpointErrorReason> {
    let (scheme, rest) = input
        .split_once(':')
        .ok_or(EndpointErrorReason::MissingScheme)?;
    match scheme {
        "unix" => parse_unix(rest),
        "tcp" => parse_tcp(rest),
        "" => Err(EndpointErrorReason::MissingScheme),
        other => Err(EndpointErrorReason::UnknownScheme(other.to_owned())),
    }
}

fn parse_unix(path: &str) -> Result<Endpoint, EndpointErrorReason> {
    if path.is_empty() {
        return Err(EndpointErrorReason::MissingPath);
    }
    if path.contains('\0') {
        return Err(EndpointErrorReason::NulInPath);
    }
    if path.len() > MAX_UNIX_PATH {
        return Err(EndpointErrorReason::PathTooLong(path.len()));
    }
    Ok(Endpoint::Unix(PathBuf::from(path)))
}

fn parse_tcp(rest: &str) -> Result<Endpoint, EndpointErrorReason> {
    let (host, port) = if let Some(bracketed) = rest.strip_prefix('[') {
        let (host, after) = bracketed
            .split_once(']')
            .ok_or(EndpointErrorReason::UnclosedBracket)?;
        if host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(EndpointErrorReason::InvalidIpv6(host.to_owned()));
        }
        let port = after
            .strip_prefix(':')
            .ok_or(EndpointErrorReason::MissingPort)?;
        (host, port)
    } else {
        let (host, port) = rest
            .rsplit_once(':')
            .ok_or(EndpointErrorReason::MissingPort)?;
        if host.contains(':') {
            return Err(EndpointErrorReason::UnbracketedIpv6(host.to_owned()));
        }
        (host, port)
    };
    if port.is_empty() {
        return Err(EndpointErrorReason::MissingPort);
    }
    // u16::from_str accepts a leading '+'; a port is digits only.
    if !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(EndpointErrorReason::InvalidPort(port.to_owned()));
    }
    let port = port
        .parse()
        .map_err(|_| EndpointErrorReason::InvalidPort(port.to_owned()))?;
    Ok(Endpoint::Tcp {
        host: host.to_owned(),
        port,
    })
}

impl Endpoint {
    /// The socket path of a unix endpoint.
    pub fn unix_path(&self) -> Option<&Path> {
        match self {
            Endpoint::Unix(path) => Some(path),
            Endpoint::Tcp { .. } => None,
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(path) => write!(f, "unix:{}", path.display()),
            Endpoint::Tcp { host, port } if host.contains(':') => write!(f, "tcp:[{host}]:{port}"),
            Endpoint::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(input: &str) -> String {
        input.parse::<Endpoint>().unwrap_err().to_string()
    }

    #[test]
    fn parses_and_renders_the_qemu_forms() {
        for text in [
            "unix:/run/migproxy/a.sock",
            "unix:relative.sock",
            "tcp:10.0.0.2:49152",
            "tcp:dest.example:4444",
            "tcp:[::1]:4444",
            "tcp:[fe80::1%eth0]:1",
            "tcp::4444",
        ] {
            let ep: Endpoint = match text.parse() {
                Ok(ep) => ep,
                Err(e) if text.contains('%') => {
                    // Zone ids are not part of Ipv6Addr's syntax; rejecting them clearly is fine.
                    assert!(e.to_string().contains("is not an IPv6 address"), "{e}");
                    continue;
                }
                Err(e) => panic!("{text}: {e}"),
            };
            assert_eq!(ep.to_string(), text);
        }
        assert_eq!(
            "tcp:[::1]:7".parse::<Endpoint>(),
            Ok(Endpoint::Tcp {
                host: "::1".into(),
                port: 7
            })
        );
    }

    #[test]
    fn errors_name_the_input_and_the_defect() {
        assert_eq!(
            err("tcp:foo"),
            r#"invalid endpoint "tcp:foo": missing port"#
        );
        assert_eq!(
            err("tcp:foo:"),
            r#"invalid endpoint "tcp:foo:": missing port"#
        );
        assert_eq!(
            err("tcp:foo:99999"),
            r#"invalid endpoint "tcp:foo:99999": invalid port "99999": expected a number from 0 to 65535"#
        );
        assert!(err("tcp:foo:+1").contains(r#"invalid port "+1""#));
        assert!(err("tcp:::1:80").contains("must be written in brackets"));
        assert!(err("tcp:[::1:80").contains("unclosed '['"));
        assert!(err("tcp:[::1]80").contains("missing port"));
        assert!(err("tcp:[nope]:80").contains(r#""nope" is not an IPv6 address"#));
        assert!(err("unix:").contains("missing path"));
        assert!(err("/tmp/x.sock").contains("missing scheme"));
        assert!(err(":x").contains("missing scheme"));
        assert!(err("udp:1.2.3.4:5").contains(r#"unknown scheme "udp""#));
        assert!(err(&format!("unix:/{}", "a".repeat(200))).contains("at most 107"));
        assert!(err("unix:/a\0b").contains("NUL"));
    }
}
