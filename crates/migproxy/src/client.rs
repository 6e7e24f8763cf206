//! A client of the daemon's REST API, over its unix socket or, from another host, over the
//! API's mutual-TLS listener (`--api-listen`); for the CLI and for programs that link the
//! library. Each call is one request on a fresh connection, except [`Client::events`],
//! which holds its connection open and yields the server-sent events typed ([`Events`]).

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};

use crate::api::types::{
    CreateRequest, CreatedIncoming, CreatedOutgoing, ErrorBody, IncomingRequest, Info, Lagged,
    MigrationList, OutgoingRequest,
};
use crate::daemon::migration::State;
use crate::daemon::migration::view::{Event, Snapshot};
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

    /// `GET /v1/migrations[?state=S]`: every migration, or those in state `state`.
    pub async fn list(&self, state: Option<State>) -> Result<Vec<Snapshot>, ClientError> {
        let path = match state {
            // The query names a state as the API's views do (`completed`, `paused`…).
            Some(state) => format!("/v1/migrations?state={}", state.name()),
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
        Err(api_error(status, Some(value)))
    }

    /// One request on a fresh connection; the status and the answer as JSON (a string when
    /// not JSON, null when empty), whatever the status.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(StatusCode, Value), ClientError> {
        let request = self.build(method, path, body)?;
        let stream = self.connect().await?;
        if self.is_local() {
            return self.send(stream, request).await;
        }
        // Across the network an answer may never come: bounded.
        tokio::time::timeout(REQUEST_TIMEOUT, self.send(stream, request))
            .await
            .unwrap_or_else(|_| {
                let late = io::Error::new(io::ErrorKind::TimedOut, "no answer within 30 s");
                Err(self.protocol(late))
            })
    }

    /// `GET /v1/events[?migration=ID]`: the daemon's events from now on, as they happen,
    /// until it stops (or the returned [`Events`] is dropped). Those of one migration when
    /// `migration` names it.
    pub async fn events(&self, migration: Option<&str>) -> Result<Events, ClientError> {
        let path = match migration {
            Some(id) => format!("/v1/events?migration={id}"),
            None => "/v1/events".to_owned(),
        };
        let request = self.build(Method::GET, &path, None)?;
        let stream = self.connect().await?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.protocol(e))?;
        let connection = tokio::spawn(connection);
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| self.protocol(e))?;
        let status = response.status();
        if !status.is_success() {
            // A refusal is an ordinary answer: read and reported like any other.
            let bytes = response
                .into_body()
                .collect()
                .await
                .map_err(|e| self.protocol(e))?
                .to_bytes();
            connection.abort();
            return Err(api_error(status, serde_json::from_slice(&bytes).ok()));
        }
        Ok(Events {
            target: self.target(),
            body: response.into_body(),
            connection,
            _sender: sender,
            buffer: Vec::new(),
            name: None,
            data: None,
        })
    }

    /// The HTTP request for `method path` with `body`.
    fn build(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Request<Full<Bytes>>, ClientError> {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        Request::builder()
            .method(method)
            .uri(path)
            .header("host", "migproxy")
            // One request per connection: the daemon closes it once it has answered.
            .header("connection", "close")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| self.protocol(e))
    }

    /// A fresh connection to the API: its unix socket, or its TLS listener (connecting and
    /// the handshake bounded, since across the network they may never end).
    async fn connect(&self) -> Result<Box<dyn Io>, ClientError> {
        let unreachable = |error| ClientError::Unreachable {
            target: self.target(),
            error,
        };
        let (address, server_name, tls) = match &self.target {
            Target::Unix(socket) => {
                let stream = UnixStream::connect(socket).await.map_err(unreachable)?;
                return Ok(Box::new(stream));
            }
            Target::Tls {
                address,
                server_name,
                tls,
            } => (address, server_name, tls),
        };
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(address))
            .await
            .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
            .map_err(unreachable)?;
        match tokio::time::timeout(REQUEST_TIMEOUT, tls.connect(tcp, server_name)).await {
            Ok(Ok(stream)) => Ok(Box::new(stream)),
            Ok(Err(error)) => Err(ClientError::Tls {
                target: self.target(),
                error,
            }),
            Err(_) => Err(unreachable(io::ErrorKind::TimedOut.into())),
        }
    }

    /// One request on a fresh connection; the answer as JSON (or as a string when not JSON).
    async fn send(
        &self,
        stream: Box<dyn Io>,
        request: Request<Full<Bytes>>,
    ) -> Result<(StatusCode, Value), ClientError> {
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

/// What a connection to the API is: a unix socket or a TLS stream.
trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// A refusal as [`ClientError::Api`]: the daemon's error body, or the bare status when the
/// body is not one.
fn api_error(status: StatusCode, body: Option<Value>) -> ClientError {
    let ErrorBody { error, causes } = body
        .and_then(|body| serde_json::from_value(body).ok())
        .unwrap_or_else(|| ErrorBody {
            error: format!("the daemon answered {status}"),
            causes: Vec::new(),
        });
    ClientError::Api {
        status,
        error,
        causes,
    }
}

/// The longest event the stream takes: far more than any event the daemon sends, so that a
/// daemon gone wrong cannot make the client buffer without bound.
const MAX_EVENT: usize = 1 << 20;

/// What [`Events::next`] yields.
#[derive(Debug, Clone, PartialEq)]
pub enum Received {
    /// Something that happened to a migration.
    Event(Event),
    /// The reader was too slow: the daemon dropped this many events for it.
    Lagged(Lagged),
}

/// The daemon's event stream ([`Client::events`]): server-sent events, read as typed
/// [`Received`] items. Dropping it closes the connection.
pub struct Events {
    target: String,
    body: Incoming,
    /// Drives the HTTP connection; stopped when the stream is dropped.
    connection: tokio::task::JoinHandle<Result<(), hyper::Error>>,
    /// Kept so that hyper keeps the connection open while the body is read.
    _sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    /// Bytes received and not yet split into lines.
    buffer: Vec<u8>,
    /// The event being read: its `event:` name and its `data:` lines so far.
    name: Option<String>,
    data: Option<String>,
}

impl Events {
    /// The next event; `Ok(None)` once the daemon has ended the stream (it stops).
    pub async fn next(&mut self) -> Result<Option<Received>, ClientError> {
        loop {
            while let Some(line) = self.take_line()? {
                if let Some(received) = self.read_line(&line)? {
                    return Ok(Some(received));
                }
            }
            match self.body.frame().await {
                None => return Ok(None),
                Some(Err(error)) => return Err(self.protocol(error)),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buffer.extend_from_slice(&data);
                    }
                }
            }
        }
    }

    /// The next whole line of the buffer, without its end (`\n` or `\r\n`).
    fn take_line(&mut self) -> Result<Option<String>, ClientError> {
        let Some(end) = self.buffer.iter().position(|b| *b == b'\n') else {
            if self.buffer.len() > MAX_EVENT {
                return Err(self.protocol("an event line longer than 1 MiB"));
            }
            return Ok(None);
        };
        let mut line: Vec<u8> = self.buffer.drain(..=end).collect();
        line.pop();
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        String::from_utf8(line)
            .map(Some)
            .map_err(|e| self.protocol(e))
    }

    /// One SSE line: a field of the event being read, or the empty line that ends it.
    /// Comments (the daemon's keep-alives) and fields other than `event` and `data` are
    /// skipped, as the SSE standard says.
    fn read_line(&mut self, line: &str) -> Result<Option<Received>, ClientError> {
        if line.is_empty() {
            return self.dispatch();
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => self.name = Some(value.to_owned()),
            "data" => {
                let data = self.data.get_or_insert_with(String::new);
                if !data.is_empty() {
                    data.push('\n');
                }
                data.push_str(value);
                if data.len() > MAX_EVENT {
                    return Err(self.protocol("an event longer than 1 MiB"));
                }
            }
            _ => {}
        }
        Ok(None)
    }

    /// The event whose lines have been read, typed by its name.
    fn dispatch(&mut self) -> Result<Option<Received>, ClientError> {
        let name = self.name.take();
        let Some(data) = self.data.take() else {
            // No data (a keep-alive): nothing to deliver.
            return Ok(None);
        };
        let received = match name.as_deref() {
            Some("lagged") => serde_json::from_str(&data).map(Received::Lagged),
            _ => serde_json::from_str(&data).map(Received::Event),
        };
        received.map(Some).map_err(|e| self.protocol(e))
    }

    fn protocol(&self, error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> ClientError {
        ClientError::Protocol {
            target: self.target.clone(),
            error: error.into(),
        }
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}
