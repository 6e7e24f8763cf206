//! A client of the daemon's REST API over its unix socket, for the CLI and for scripts that
//! link the library.

use std::io;
use std::path::{Path, PathBuf};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::UnixStream;

use crate::human::OsError;

/// Why a request got no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The daemon could not be reached at all.
    #[error("cannot reach the migproxy daemon at {}: {}", .socket.display(), OsError(.error))]
    Unreachable { socket: PathBuf, error: io::Error },
    /// The connection broke or the answer was not HTTP/JSON.
    #[error("the migproxy daemon at {} gave no usable answer: {detail}", .socket.display())]
    Protocol { socket: PathBuf, detail: String },
    /// The daemon refused the request.
    #[error("{error}")]
    Api {
        status: StatusCode,
        error: String,
        causes: Vec<String>,
    },
}

impl ClientError {
    /// The numbered causes under the error, for the CLI.
    pub fn causes(&self) -> &[String] {
        match self {
            ClientError::Api { causes, .. } => causes,
            _ => &[],
        }
    }
}

/// The API of one daemon.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    pub fn new(socket: impl Into<PathBuf>) -> Client {
        Client {
            socket: socket.into(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
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
        let (status, value) = self.exchange(method, path, body).await?;
        if status.is_success() {
            return Ok(value);
        }
        let error = value["error"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| format!("the daemon answered {status}"));
        let causes = value["causes"]
            .as_array()
            .map(|c| {
                c.iter()
                    .filter_map(|c| c.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        Err(ClientError::Api {
            status,
            error,
            causes,
        })
    }

    async fn exchange(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(StatusCode, Value), ClientError> {
        let protocol = |detail: String| ClientError::Protocol {
            socket: self.socket.clone(),
            detail,
        };
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|error| ClientError::Unreachable {
                    socket: self.socket.clone(),
                    error,
                })?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| protocol(e.to_string()))?;
        tokio::spawn(connection);
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "migproxy")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| protocol(e.to_string()))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| protocol(e.to_string()))?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| protocol(e.to_string()))?
            .to_bytes();
        let value = if bytes.is_empty() {
            Value::Null
        } else if bytes.first() == Some(&b'{') {
            serde_json::from_slice(&bytes).map_err(|e| protocol(format!("invalid JSON: {e}")))?
        } else {
            Value::String(String::from_utf8_lossy(&bytes).into_owned())
        };
        Ok((status, value))
    }
}
