//! A client for QEMU's machine protocol (QMP) on a unix socket.
//!
//! ```text
//!  migproxy                                QEMU
//!     │ ◄──────── {"QMP": {"version": …}}     │  greeting
//!     │ {"execute":"qmp_capabilities"} ─────► │
//!     │ ◄──────────────────── {"return": {}}  │
//!     │ {"execute":"migrate","id":7,…} ─────► │
//!     │ ◄── {"event":"MIGRATION",…}           │  events may arrive at any time;
//!     │ ◄── {"return":{},"id":7}              │  they are queued, not lost
//! ```
//!
//! Every message is one JSON object on one line. Lines are capped (16 MiB) so that a broken
//! peer cannot make us buffer without bound.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};

use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};

use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

/// Longest line accepted from QEMU.
const MAX_LINE: u64 = 16 << 20;

/// How long QEMU may take to greet a new client. A monitor already serving another client
/// accepts the connection but stays silent.
const GREETING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Failures talking to QEMU, each naming the socket or the command.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("connect to QMP socket {} failed", .path.display())]
    Connect {
        path: PathBuf,
        #[source]
        error: io::Error,
    },
    #[error("QMP socket {}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        error: io::Error,
    },
    #[error("QMP socket {} closed by QEMU", .path.display())]
    Closed { path: PathBuf },
    #[error("QMP socket {} sent something that is not QMP: {detail}", .path.display())]
    Protocol { path: PathBuf, detail: String },
    #[error("QMP socket {} sent something that is not QMP: invalid JSON", .path.display())]
    Json {
        path: PathBuf,
        #[source]
        error: serde_json::Error,
    },
    #[error(
        "QMP socket {} sent no greeting within {} s: another client may hold it (QEMU serves \
         one client per monitor: give migproxy a -qmp socket of its own)",
        .path.display(), GREETING_TIMEOUT.as_secs()
    )]
    NoGreeting { path: PathBuf },
    #[error("QMP command {command} failed: {desc} ({class})")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
}

/// An asynchronous event from QEMU (`MIGRATION`, `STOP`, …).
#[derive(Debug, Clone, Deserialize)]
pub struct Event {
    pub event: String,
    #[serde(default)]
    pub data: Value,
}

/// A negotiated QMP session.
#[derive(Debug)]
pub struct Qmp {
    path: PathBuf,
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    events: VecDeque<Event>,
    next_id: u64,
}

impl Qmp {
    /// Connects, reads the greeting and leaves capabilities negotiation mode.
    pub async fn connect(path: &Path) -> Result<Qmp, QmpError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|error| QmpError::Connect {
                path: path.to_owned(),
                error,
            })?;
        let (reader, writer) = stream.into_split();
        let mut qmp = Qmp {
            path: path.to_owned(),
            reader: BufReader::new(reader),
            writer,
            events: VecDeque::new(),
            next_id: 1,
        };
        let greeting = tokio::time::timeout(GREETING_TIMEOUT, qmp.read_message())
            .await
            .map_err(|_| QmpError::NoGreeting {
                path: path.to_owned(),
            })??;
        if greeting.get("QMP").is_none() {
            return Err(qmp.protocol(format!("expected a greeting, got {greeting}")));
        }
        qmp.execute("qmp_capabilities", Value::Null)
            .await
            .map_err(|error| match error {
                QmpError::Command { desc, .. } => QmpError::Protocol {
                    path: path.to_owned(),
                    detail: format!("qmp_capabilities refused: {desc}"),
                },
                other => other,
            })?;
        Ok(qmp)
    }

    /// Runs `command` with `arguments` (`Value::Null` for none) and returns its `return` value.
    /// Events that arrive meanwhile are queued for [`take_events`](Self::take_events).
    pub async fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        let (id, line) = self.request(command, arguments);
        self.writer
            .write_all(line.as_bytes())
            .await
            .map_err(|error| self.io(error))?;
        self.reply(command, id).await
    }

    /// Runs `command` with `fd` passed along (SCM_RIGHTS, as `getfd` and `add-fd` expect):
    /// QEMU takes the descriptor that arrives with the command's first byte.
    pub async fn execute_with_fd(
        &mut self,
        command: &str,
        arguments: Value,
        fd: BorrowedFd<'_>,
    ) -> Result<Value, QmpError> {
        let (id, line) = self.request(command, arguments);
        let socket: &UnixStream = self.writer.as_ref();
        let sent = loop {
            socket.writable().await.map_err(|error| self.io(error))?;
            let attempt = socket.try_io(tokio::io::Interest::WRITABLE, || {
                let fds = [fd.as_raw_fd()];
                let control = [ControlMessage::ScmRights(&fds)];
                let data = [io::IoSlice::new(line.as_bytes())];
                sendmsg::<()>(socket.as_raw_fd(), &data, &control, MsgFlags::empty(), None)
                    .map_err(io::Error::from)
            });
            match attempt {
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
                other => break other.map_err(|error| self.io(error))?,
            }
        };
        // The descriptor went with the first byte; the rest of a cut-short line follows.
        self.writer
            .write_all(&line.as_bytes()[sent..])
            .await
            .map_err(|error| self.io(error))?;
        self.reply(command, id).await
    }

    /// A command's id and its line.
    fn request(&mut self, command: &str, arguments: Value) -> (u64, String) {
        let id = self.next_id;
        self.next_id += 1;
        let mut request = json!({ "execute": command, "id": id });
        if !arguments.is_null() {
            request["arguments"] = arguments;
        }
        let mut line = request.to_string();
        line.push('\n');
        (id, line)
    }

    /// Reads until the reply to command `id`, queueing the events that come first.
    async fn reply(&mut self, command: &str, id: u64) -> Result<Value, QmpError> {
        loop {
            let message = self.read_message().await?;
            if message.get("id").and_then(Value::as_u64) != Some(id) {
                self.queue_event(message)?;
                continue;
            }
            return self.response(command, message);
        }
    }

    /// The socket this session is on.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Events received so far, oldest first.
    pub fn take_events(&mut self) -> Vec<Event> {
        self.events.drain(..).collect()
    }

    fn queue_event(&mut self, message: Value) -> Result<(), QmpError> {
        match Event::deserialize(&message) {
            Ok(event) => {
                self.events.push_back(event);
                Ok(())
            }
            Err(_) => Err(self.protocol(format!("unexpected message {message}"))),
        }
    }

    async fn read_message(&mut self) -> Result<Value, QmpError> {
        let mut line = Vec::new();
        let n = (&mut self.reader)
            .take(MAX_LINE)
            .read_until(b'\n', &mut line)
            .await
            .map_err(|error| self.io(error))?;
        if n == 0 {
            return Err(QmpError::Closed {
                path: self.path.clone(),
            });
        }
        if line.last() != Some(&b'\n') {
            return Err(self.protocol(format!("line longer than {MAX_LINE} bytes or cut short")));
        }
        serde_json::from_slice(&line).map_err(|error| QmpError::Json {
            path: self.path.clone(),
            error,
        })
    }

    /// The `return` of a response, or its error.
    fn response(&self, command: &str, mut message: Value) -> Result<Value, QmpError> {
        if let Some(value) = message.get_mut("return") {
            return Ok(value.take());
        }
        match message.get("error") {
            Some(error) => Err(QmpError::Command {
                command: command.to_owned(),
                class: text(error, "class"),
                desc: text(error, "desc"),
            }),
            None => Err(self.protocol(format!("response without return or error: {message}"))),
        }
    }

    fn io(&self, error: io::Error) -> QmpError {
        QmpError::Io {
            path: self.path.clone(),
            error,
        }
    }

    fn protocol(&self, detail: String) -> QmpError {
        QmpError::Protocol {
            path: self.path.clone(),
            detail,
        }
    }
}

fn text(value: &Value, key: &str) -> String {
    value
        .get(key)
        .and_then(Value::as_str)
        .unwrap_or("?")
        .to_owned()
}
