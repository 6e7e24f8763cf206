//! `migproxy daemon` as a real process.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::process::{Child, Command};

use super::daemon::http;
use super::wait_until;

pub const BIN: &str = env!("CARGO_BIN_EXE_migproxy");

pub struct DaemonProcess {
    pub child: Child,
    pub api: PathBuf,
    pub runtime: PathBuf,
}

impl DaemonProcess {
    /// Starts `migproxy daemon` listening for peers on `listen` (port 0 is fine), inside
    /// network namespace `netns` when given.
    pub async fn start(
        dir: &Path,
        name: &str,
        listen: &str,
        netns: Option<&str>,
        extra: &[&str],
    ) -> DaemonProcess {
        let api = dir.join(format!("{name}-api.sock"));
        let runtime = dir.join(format!("{name}-run"));
        let mut command = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, BIN]);
                c
            }
            None => Command::new(BIN),
        };
        command
            .arg("daemon")
            .arg("--api")
            .arg(&api)
            .args(["--peer-listen", listen])
            .arg("--runtime-dir")
            .arg(&runtime)
            .args(if extra.contains(&"--tls-dir") {
                None
            } else {
                Some("--insecure-plaintext")
            })
            .args(extra)
            .env("MIGPROXY_LOG", super::daemon_log_level())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join(format!("{name}.log"))).unwrap())
            .kill_on_drop(true);
        let child = command.spawn().unwrap();
        let ready = api.clone();
        wait_until(Duration::from_secs(10), "the daemon's API socket", || {
            std::os::unix::net::UnixStream::connect(&ready).is_ok()
        })
        .await;
        DaemonProcess {
            child,
            api,
            runtime,
        }
    }

    pub async fn request(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        http(&self.api, method, path, body).await
    }

    pub async fn wait_final(&self, id: &str, limit: Duration) -> Value {
        self.wait_for(id, "ended", limit, super::is_final).await
    }

    /// Polls the migration's view until `ready` says so; returns that view. A migration not
    /// created yet (404) is not ready.
    pub async fn wait_for(
        &self,
        id: &str,
        what: &str,
        limit: Duration,
        ready: impl Fn(&Value) -> bool,
    ) -> Value {
        super::poll(what, limit, async || {
            let (_, view) = self
                .request("GET", &format!("/v1/migrations/{id}"), None)
                .await;
            if ready(&view) { Ok(view) } else { Err(view) }
        })
        .await
    }
}
