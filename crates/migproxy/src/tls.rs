//! Mutual TLS 1.3 between daemons, from QEMU's and libvirt's x509 directory layout.
//!
//! ```text
//! DIR/ca-cert.pem       CA(s) both sides trust
//! DIR/server-cert.pem   this daemon's certificate when others connect to it
//! DIR/server-key.pem
//! DIR/client-cert.pem   this daemon's certificate when it connects to others
//! DIR/client-key.pem
//! DIR/ca-crl.pem        optional revocation list(s), PEM or DER
//! ```
//!
//! An existing `/etc/pki/qemu` works unchanged. The source verifies the destination's
//! certificate against the host it dialled (or an explicit TLS hostname); the destination
//! verifies the client certificate against the CA and the CRL, then against an optional
//! allow-list of identities, like QEMU's `tls-authz`.
//!
//! One crypto provider, chosen here only: `ring`, with AES-128-GCM preferred — on these
//! machines it is the fastest AEAD (about 1.7× aws-lc-rs), and the data path is bound by it.

mod allow;
mod crl;
#[doc(hidden)]
pub mod fuzzing;
mod handshake;
mod identity;
mod peer;
mod record;
mod stream;
mod validity;

pub use allow::PatternError;
pub use crl::CrlError;
pub use identity::Identity;
pub use peer::{PeerStream, Records};
pub use stream::RecordStream;
pub use validity::CertificateRefused;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::client::{VerifierBuilderError, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector, TlsStream};

use allow::AllowList;
use validity::OwnCertificate;

/// Failures to load or use TLS material, naming the file or the peer.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS file {}", .path.display())]
    Load {
        path: PathBuf,
        #[source]
        error: LoadError,
    },
    #[error("TLS configuration from {}", .dir.display())]
    Config {
        dir: PathBuf,
        #[source]
        error: rustls::Error,
    },
    #[error("TLS revocation list {}", .path.display())]
    Crl {
        path: PathBuf,
        #[source]
        source: CrlError,
    },
    #[error("invalid --tls-allow pattern \"{pattern}\"")]
    Pattern {
        pattern: String,
        #[source]
        source: PatternError,
    },
    #[error("\"{0}\" is not a valid TLS server name")]
    ServerName(String),
    #[error("TLS handshake with {peer} failed")]
    Handshake {
        peer: String,
        #[source]
        error: io::Error,
    },
}

/// What is wrong with a TLS file.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Pem(#[from] rustls_pki_types::pem::Error),
    #[error(transparent)]
    Rustls(#[from] rustls::Error),
    #[error(transparent)]
    Verifier(#[from] VerifierBuilderError),
    #[error("no certificate in the file")]
    NoCertificate,
}

/// Loaded TLS configuration for both roles.
#[derive(Debug)]
pub struct Tls {
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
    allow: AllowList,
    /// The client certificate, to explain a peer's refusal of it.
    client_cert: Option<Arc<OwnCertificate>>,
    /// The server certificate, likewise.
    server_cert: Option<Arc<OwnCertificate>>,
    /// The record layer of peer connections.
    records: Records,
}

/// The crypto provider: `ring`, TLS 1.3 suites, AES-128-GCM first.
fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::{cipher_suite, default_provider};
    let mut provider = default_provider();
    provider.cipher_suites = vec![
        cipher_suite::TLS13_AES_128_GCM_SHA256,
        cipher_suite::TLS13_AES_256_GCM_SHA384,
        cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(provider)
}

fn load_error(path: &Path, error: impl Into<LoadError>) -> TlsError {
    TlsError::Load {
        path: path.to_owned(),
        error: error.into(),
    }
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| load_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| load_error(path, e))?;
    if certs.is_empty() {
        return Err(load_error(path, LoadError::NoCertificate));
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| load_error(path, e))
}

fn crl_error(path: &Path, source: CrlError) -> TlsError {
    TlsError::Crl {
        path: path.to_owned(),
        source,
    }
}

/// A verifier that cannot be built has a CRL that does not parse, or no CA: blame that file.
fn verifier_error(ca_path: &Path, crl_path: &Path, error: VerifierBuilderError) -> TlsError {
    match error {
        VerifierBuilderError::InvalidCrl(_) => crl_error(crl_path, CrlError::Invalid(error)),
        error => load_error(ca_path, error),
    }
}

/// A certificate chain and the description of its leaf.
fn own_certificates(
    path: &Path,
) -> Result<(Vec<CertificateDer<'static>>, Option<Arc<OwnCertificate>>), TlsError> {
    let chain = certificates(path)?;
    let own = chain
        .first()
        .and_then(|leaf| OwnCertificate::new(path, leaf))
        .map(Arc::new);
    Ok((chain, own))
}

impl Tls {
    /// Loads `dir` in QEMU's layout; `allow` lists the client identities accepted (empty:
    /// any certificate the CA signed).
    pub fn load(dir: &Path, allow: Vec<String>) -> Result<Tls, TlsError> {
        let allow = AllowList::parse(&allow)
            .map_err(|(pattern, source)| TlsError::Pattern { pattern, source })?;
        let config_error = |error| TlsError::Config {
            dir: dir.to_owned(),
            error,
        };
        let ca_path = dir.join("ca-cert.pem");
        let mut roots = RootCertStore::empty();
        for cert in certificates(&ca_path)? {
            roots.add(cert).map_err(|e| load_error(&ca_path, e))?;
        }
        let roots = Arc::new(roots);
        let crl_path = dir.join("ca-crl.pem");
        let crls = crl::load(&crl_path).map_err(|e| crl_error(&crl_path, e))?;
        let provider = provider();
        let (client_chain, client_cert) = own_certificates(&dir.join("client-cert.pem"))?;
        let (server_chain, server_cert) = own_certificates(&dir.join("server-cert.pem"))?;

        let server_verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::clone(&roots), Arc::clone(&provider))
                .with_crls(crls.clone())
                .build()
                .map_err(|e| verifier_error(&ca_path, &crl_path, e))?;
        let mut client = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(config_error)?
            .with_webpki_verifier(server_verifier)
            .with_client_auth_cert(client_chain, key(&dir.join("client-key.pem"))?)
            .map_err(config_error)?;

        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots, Arc::clone(&provider))
                .with_crls(crls)
                .build()
                .map_err(|e| verifier_error(&ca_path, &crl_path, e))?;
        let mut server = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(config_error)?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(server_chain, key(&dir.join("server-key.pem"))?)
            .map_err(config_error)?;
        // Peer connections hand the record layer over to migproxy after the handshake
        // (`RecordStream`); session tickets would only be records it has to skip.
        client.enable_secret_extraction = true;
        server.enable_secret_extraction = true;
        server.send_tls13_tickets = 0;
        Ok(Tls {
            client: Arc::new(client),
            server: Arc::new(server),
            allow,
            client_cert,
            server_cert,
            records: Records::default(),
        })
    }

    /// The same material, peer connections carried by the record layer `records`.
    pub fn with_records(mut self, records: Records) -> Tls {
        self.records = records;
        self
    }

    /// The record layer of peer connections.
    pub fn records(&self) -> Records {
        self.records
    }

    /// A peer connection as the client, verifying the server as `server_name`: rustls's
    /// handshake, then the record layer chosen by [`Records`].
    pub async fn connect_peer(
        &self,
        tcp: TcpStream,
        server_name: &str,
    ) -> Result<PeerStream, TlsError> {
        if self.records == Records::Stock {
            let stream = self.connect(tcp, server_name).await?;
            return Ok(PeerStream::Stock(peer::Stock::new(
                stream,
                self.client_cert.clone(),
            )));
        }
        let name = ServerName::try_from(server_name.to_owned())
            .map_err(|_| TlsError::ServerName(server_name.to_owned()))?;
        let mut stream = handshake::client(tcp, Arc::clone(&self.client), name)
            .await
            .map_err(|error| TlsError::Handshake {
                peer: server_name.to_owned(),
                error,
            })?;
        stream.explain_refusals_with(self.client_cert.clone());
        Ok(PeerStream::Migproxy(stream))
    }

    /// A peer connection as the server; returns the verified client's identity.
    pub async fn accept_peer(
        &self,
        tcp: TcpStream,
        peer: &str,
    ) -> Result<(PeerStream, Identity), TlsError> {
        // The client judges the server's certificate during the handshake: its refusal
        // arrives here.
        let explain = |error| match &self.server_cert {
            Some(own) => own.explain(error),
            None => error,
        };
        if self.records == Records::Stock {
            let (stream, identity) = self.accept(tcp, peer).await.map_err(|e| match e {
                TlsError::Handshake { peer, error } => TlsError::Handshake {
                    peer,
                    error: explain(error),
                },
                other => other,
            })?;
            return Ok((PeerStream::Stock(peer::Stock::new(stream, None)), identity));
        }
        let (stream, leaf) = handshake::server(tcp, Arc::clone(&self.server))
            .await
            .map_err(|error| TlsError::Handshake {
                peer: peer.to_owned(),
                error: explain(error),
            })?;
        let identity = leaf
            .as_ref()
            .map(identity::of_certificate)
            .unwrap_or_default();
        Ok((PeerStream::Migproxy(stream), identity))
    }

    /// Wraps a connected socket as the client (rustls's own record layer: the API over
    /// TLS), verifying the server as `server_name`.
    pub async fn connect(
        &self,
        tcp: TcpStream,
        server_name: &str,
    ) -> Result<TlsStream<TcpStream>, TlsError> {
        let name = ServerName::try_from(server_name.to_owned())
            .map_err(|_| TlsError::ServerName(server_name.to_owned()))?;
        TlsConnector::from(Arc::clone(&self.client))
            .connect(name, tcp)
            .await
            .map(TlsStream::Client)
            .map_err(|error| TlsError::Handshake {
                peer: server_name.to_owned(),
                error,
            })
    }

    /// Wraps an accepted socket as the server; returns the verified client's identity.
    pub async fn accept(
        &self,
        tcp: TcpStream,
        peer: &str,
    ) -> Result<(TlsStream<TcpStream>, Identity), TlsError> {
        let stream = TlsAcceptor::from(Arc::clone(&self.server))
            .accept(tcp)
            .await
            .map_err(|error| TlsError::Handshake {
                peer: peer.to_owned(),
                error,
            })?;
        let identity = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .map(identity::of_certificate)
            .unwrap_or_default();
        Ok((TlsStream::Server(stream), identity))
    }

    /// Whether the allow-list admits `identity` (an empty list admits every certificate the
    /// CA signed); the patterns are described in [`allow`].
    pub fn allows(&self, identity: &Identity) -> bool {
        self.allow.allows(identity)
    }
}

/// TLS material that can be reloaded (SIGHUP) while connections made with the old one go on.
#[derive(Debug)]
pub struct TlsHandle {
    dir: PathBuf,
    allow: Vec<String>,
    records: Records,
    current: RwLock<Arc<Tls>>,
}

impl TlsHandle {
    pub fn load(dir: &Path, allow: Vec<String>) -> Result<TlsHandle, TlsError> {
        TlsHandle::load_with(dir, allow, Records::default())
    }

    /// As [`TlsHandle::load`], peer connections carried by the record layer `records`
    /// (after every reload too).
    pub fn load_with(
        dir: &Path,
        allow: Vec<String>,
        records: Records,
    ) -> Result<TlsHandle, TlsError> {
        let tls = Tls::load(dir, allow.clone())?.with_records(records);
        Ok(TlsHandle {
            dir: dir.to_owned(),
            allow,
            records,
            current: RwLock::new(Arc::new(tls)),
        })
    }

    /// The configuration for new connections.
    pub fn current(&self) -> Arc<Tls> {
        Arc::clone(&self.current.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Reads the directory again; on error the old configuration stays in force.
    pub fn reload(&self) -> Result<(), TlsError> {
        let tls = Tls::load(&self.dir, self.allow.clone())?.with_records(self.records);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(tls);
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}
