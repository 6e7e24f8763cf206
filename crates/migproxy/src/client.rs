//! A client of the daemon's REST API, over its unix socket or, from another host, over the
//! API's mutual-TLS listener (`--api-listen`); for the CLI and for programs that link the
//! library.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};

use crate::api::types::{
    CreateRequest, CreatedIncoming, CreatedOutgoing, ErrorBody, IncomingRequest, Info,
    MigrationList, OutgoingRequest,
};
use crate::daemon::migration::view::Snapshot;
use crate::tls::{Tls, TlsError};

/// How long connecting to a remote API may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a TLS handshake, and then a request, with a remote API may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// How long closing a connection whose answer has been read may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a request got no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The daemon could not be reached at all.
    #[error("cannot reach the migproxy daemon at {target}")]
    Unreachable {
        target: String,
        #[source]
        error: io::Error,
    },
    /// The TLS handshake with a remote API failed (certificates, allow-list).
    #[error("cannot reach the migproxy daemon at {target}")]
    Tls {
        target: String,
        #[source]
        error: TlsError,
    },
    /// The connection broke or the answer was not HTTP/JSON.
    #[error("the migproxy daemon at {target} gave no usable answer")]
    Protocol {
        target: String,
        #[source]
        error: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The daemon refused the request.
    #[error("{error}")]
    Api {
        status: StatusCode,
        error: String,
        causes: Vec<String>,
    },
}

impl ClientError {
    /// A refusal of what a flag asked for as such, not of the state of things: the kernel
    /// data path where it cannot serve. The command line exits with its usage code.
    pub fn is_usage(&self) -> bool {
        matches!(self, ClientError::Api { status, error, .. }
            if *status == StatusCode::BAD_REQUEST && error.starts_with("data_path:"))
    }

    /// The numbered causes under the error, for the CLI: the daemon's when it refused, else
    /// this error's sources.
    pub fn causes(&self) -> Vec<String> {
        match self {
            ClientError::Api { causes, .. } => causes.clone(),
            _ => crate::human::causes(self),
        }
    }
}

/// The API of one daemon.
#[derive(Debug, Clone)]
pub struct Client {
    target: Target,
}

#[derive(Debug, Clone)]
enum Target {
    Unix(PathBuf),
    /// `HOST:PORT`, verified as `server_name`, with this host's client certificate.
    Tls {
        address: String,
        server_name: String,
        tls: Arc<Tls>,
    },
}

impl Client {
    /// The API on its unix socket (this host's daemon).
    pub fn new(socket: impl Into<PathBuf>) -> Client {
        Client {
            target: Target::Unix(socket.into()),
        }
    }

    /// The API of a daemon on another host, at `address` (`HOST:PORT`) behind mutual TLS;
    /// its certificate must carry `server_name`.
    pub fn tls(address: String, server_name: String, tls: Arc<Tls>) -> Client {
        Client {
            target: Target::Tls {
                address,
                server_name,
                tls,
            },
        }
    }

    /// Whether the daemon is on this host (its unix socket).
    pub fn is_local(&self) -> bool {
        matches!(self.target, Target::Unix(_))
    }

    /// Where requests go, for messages: the socket's path or `https://HOST:PORT`.
    pub fn target(&self) -> String {
        match &self.target {
            Target::Unix(path) => path.display().to_string(),
            Target::Tls { address, .. } => format!("https://{address}"),
        }
    }

    /// `GET /v1/info`.
    pub async fn info(&self) -> Result<Info, ClientError> {
        self.typed(Method::GET, "/v1/info", None).await
    }

    /// `GET /v1/migrations[?state=S]`: every migration, or those in state `state` (the
    /// daemon checks the name).
    pub async fn list(&self, state: Option<&str>) -> Result<Vec<Snapshot>, ClientError> {
        let path = match state {
            Some(state) => format!("/v1/migrations?state={state}"),
            None => "/v1/migrations".to_owned(),
        };
        let list: MigrationList = self.typed(Method::GET, &path, None).await?;
        Ok(list.migrations)
    }

    /// `GET /v1/migrations/ID`.
    pub async fn migration(&self, id: &str) -> Result<Snapshot, ClientError> {
        self.typed(Method::GET, &format!("/v1/migrations/{id}"), None)
            .await
    }

    /// `POST /v1/migrations` with `direction: incoming`, on the destination's daemon.
    pub async fn create_incoming(
        &self,
        request: &IncomingRequest,
    ) -> Result<CreatedIncoming, ClientError> {
        let body = self.body(&CreateRequest::Incoming(request.clone()))?;
        self.typed(Method::POST, "/v1/migrations", Some(body)).await
    }

    /// `POST /v1/migrations` with `direction: outgoing`, on the source's daemon.
    pub async fn create_outgoing(
        &self,
        request: &OutgoingRequest,
    ) -> Result<CreatedOutgoing, ClientError> {
        let body = self.body(&CreateRequest::Outgoing(request.clone()))?;
        self.typed(Method::POST, "/v1/migrations", Some(body)).await
    }

    /// `POST /v1/migrations/ID/cancel`: cancels on both hosts; the migration after.
    pub async fn cancel(&self, id: &str) -> Result<Snapshot, ClientError> {
        let path = format!("/v1/migrations/{id}/cancel");
        self.typed(Method::POST, &path, None).await
    }

    /// `DELETE /v1/migrations/ID`: forgets an ended migration.
    pub async fn forget(&self, id: &str) -> Result<(), ClientError> {
        self.delete(&format!("/v1/migrations/{id}")).await.map(drop)
    }

    /// One request whose answer is read as `T`.
    pub async fn typed<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<T, ClientError> {
        let value = self.call(method, path, body).await?;
        serde_json::from_value(value).map_err(|e| self.protocol(e))
    }

    fn body(&self, request: &impl Serialize) -> Result<Value, ClientError> {
        serde_json::to_value(request).map_err(|e| self.protocol(e))
    }

    pub async fn get(&self, path: &str) -> Result<Value, ClientError> {
        self.call(Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: Option<Value>) -> Result<Value, ClientError> {
        self.call(Method::POST, path, body).await
    }

    pub async fn delete(&self, path: &str) -> Result<Value, ClientError> {
        self.call(Method::DELETE, path, None).await
    }

    /// One request on a fresh connection; a non-2xx answer becomes [`ClientError::Api`].
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, ClientError> {
        let (status, value) = self.request(method, path, body).await?;
        if status.is_success() {
            return Ok(value);
        }
        let ErrorBody { error, causes } =
            serde_json::from_value(value).unwrap_or_else(|_| ErrorBody {
                error: format!("the daemon answered {status}"),
                causes: Vec::new(),
            });
        Err(ClientError::Api {
            status,
            error,
            causes,
        })
    }

    /// One request on a fresh connection; the status and the answer as JSON (a string when
    /// not JSON, null when empty), whatever the status.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(StatusCode, Value), ClientError> {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "migproxy")
            // One request per connection: the daemon closes it once it has answered.
            .header("connection", "close")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| self.protocol(e))?;
        let unreachable = |error| ClientError::Unreachable {
            target: self.target(),
            error,
        };
        match &self.target {
            Target::Unix(socket) => {
                let stream = UnixStream::connect(socket).await.map_err(unreachable)?;
                self.send(stream, request).await
            }
            Target::Tls {
                address,
                server_name,
                tls,
            } => {
                let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(address))
                    .await
                    .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
                    .map_err(unreachable)?;
                let handshake =
                    tokio::time::timeout(REQUEST_TIMEOUT, tls.connect(tcp, server_name));
                let stream = match handshake.await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(error)) => {
                        return Err(ClientError::Tls {
                            target: self.target(),
                            error,
                        });
                    }
                    Err(_) => return Err(unreachable(io::ErrorKind::TimedOut.into())),
                };
                // Across the network an answer may never come: bounded.
                tokio::time::timeout(REQUEST_TIMEOUT, self.send(stream, request))
                    .await
                    .unwrap_or_else(|_| {
                        let late = io::Error::new(io::ErrorKind::TimedOut, "no answer within 30 s");
                        Err(self.protocol(late))
                    })
            }
        }
    }

    /// One request on a fresh connection; the answer as JSON (or as a string when not JSON).
    async fn send<IO>(
        &self,
        stream: IO,
        request: Request<Full<Bytes>>,
    ) -> Result<(StatusCode, Value), ClientError>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.protocol(e))?;
        let connection = tokio::spawn(connection);
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| self.protocol(e))?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| self.protocol(e))?
            .to_bytes();
        // The connection is closed on both ends when the answer returns, not some time
        // after: a caller that counts descriptors (or makes many requests) sees none open.
        drop(sender);
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, connection).await;
        let value = if bytes.is_empty() {
            Value::Null
        } else if bytes.first() == Some(&b'{') {
            serde_json::from_slice(&bytes).map_err(|e| self.protocol(e))?
        } else {
            Value::String(String::from_utf8_lossy(&bytes).into_owned())
        };
        Ok((status, value))
    }

    fn protocol(&self, error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> ClientError {
        ClientError::Protocol {
            target: self.target(),
            error: error.into(),
        }
    }
}
