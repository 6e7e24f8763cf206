//! `migproxy migrate --libvirt DOMAIN`: one command migrates a libvirt guest through the
//! daemons of both hosts, as `migproxy migrate --qmp` does for bare QEMU.
//!
//! ```text
//!  migproxy migrate --libvirt      destination daemon      source daemon       libvirt (virsh)
//!     │ GET /v1/info on both: the same runtime directory (libvirt's same-path rule)
//!     │ POST incoming {id, target unix:RUN/ID.sock} ─►
//!     │ POST outgoing {id, token, peer} ──────────────────────► RUN/ID.sock
//!     │   (and ID-disks for --copy-storage-all)
//!     │ virsh migrate --live --p2p DOMAIN DEST --migrateuri unix://RUN/ID.sock ───────────►
//!     │ every interval: virsh domjobinfo + the source daemon's channels: one live line
//!     │ Ctrl-C ─► virsh domjobabort, POST cancel on both daemons
//!     │ virsh exits ─► domjobinfo --completed, domstate on the destination, one report
//! ```
//!
//! libvirt is driven through `virsh`, not by linking libvirt: the binary runs on hosts without
//! libvirt, virsh is libvirt's stable interface and what operators run by hand, and its errors
//! are the ones they know. `--p2p` lets the source libvirtd talk to the destination's itself,
//! so this command needs only the source host's libvirt connection.
//!
//! Exit codes: 0 libvirt says the domain runs on the destination; 1 the migration failed or was
//! cancelled (the guest stays on the source); 2 usage; 3 a daemon could not be reached. On any
//! failure, what was created on both daemons is cancelled and forgotten: no socket is left.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::api::types::{IncomingRequest, OutgoingRequest};
use crate::daemon::migration::view::Snapshot;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use super::failure::Failure;
use super::migration::{self, QemuFlags};
use super::process::EXIT_FAILED;
use crate::client::Client;
use crate::human::Bytes;

/// What `--libvirt` adds to `migproxy migrate`.
#[derive(Debug, Clone, clap::Args)]
pub struct LibvirtFlags {
    /// Migrate this libvirt domain (name or UUID) instead of a bare QEMU.
    #[arg(long, value_name = "DOMAIN", group = "driver", conflicts_with_all = ["qmp", "dest_qmp"])]
    pub libvirt: Option<String>,
    /// The destination libvirtd, as the source host's libvirtd reaches it
    /// (e.g. qemu+tls://dst.example.org/system).
    #[arg(long, value_name = "URI", requires = "libvirt")]
    pub dest_libvirt: Option<String>,
    /// The source host's libvirt connection (default qemu:///system).
    #[arg(long, value_name = "URI", requires = "libvirt")]
    pub connect: Option<String>,
    /// multifd with N channels (`virsh migrate --parallel --parallel-connections N`).
    #[arg(long, value_name = "N", requires = "libvirt")]
    pub parallel: Option<u32>,
    /// Copy non-shared disks too, through a second migproxy migration (`--disks-uri`).
    #[arg(long, requires = "libvirt")]
    pub copy_storage_all: bool,
    /// Make the domain persistent on the destination.
    #[arg(long, requires = "libvirt")]
    pub persistent: bool,
    /// Undefine the domain on the source once migrated.
    #[arg(long, requires = "libvirt")]
    pub undefinesource: bool,
}

/// Everything one libvirt migration needs.
pub struct Run<'a> {
    pub source: &'a Client,
    pub destination: &'a Client,
    pub id: &'a str,
    pub flags: &'a LibvirtFlags,
    pub qemu: &'a QemuFlags,
    pub interval: Duration,
    pub json: bool,
    pub shutdown: &'a CancellationToken,
}

/// The migrations created on both daemons: the RAM stream, and the disks' when copied.
struct Created {
    ids: Vec<String>,
    socket: String,
    disks_socket: Option<String>,
}

impl Run<'_> {
    pub async fn migrate(&self) -> Result<u8, Failure> {
        let domain = self.flags.libvirt.clone().unwrap_or_default();
        let dest_uri = self.flags.dest_libvirt.clone().ok_or_else(|| {
            Failure::usage("--dest-libvirt: the destination libvirtd's URI is needed".into())
        })?;
        check_virsh().await?;
        let runtime = self.same_runtime_dir().await?;
        let created = self.create(&runtime).await?;
        let outcome = self.drive(&domain, &dest_uri, &created).await;
        match outcome {
            Ok(0) => Ok(0),
            other => {
                self.take_back(&created).await;
                other
            }
        }
    }

    /// libvirt uses the socket path of the migration URI on both hosts: both daemons must
    /// hand out sockets in the same directory.
    async fn same_runtime_dir(&self) -> Result<String, Failure> {
        let here = self
            .source
            .info()
            .await
            .map_err(|e| Failure::from_client("source daemon", e))?;
        let there = self
            .destination
            .info()
            .await
            .map_err(|e| Failure::from_client("destination daemon", e))?;
        let (a, b) = (here.runtime_dir, there.runtime_dir);
        if a != b {
            return Err(Failure::usage(format!(
                "libvirt uses the migration socket's path on both hosts, but the daemons' \
                 runtime directories differ (source {a:?}, destination {b:?}): start both with \
                 the same --runtime-dir"
            )));
        }
        Ok(a)
    }

    /// Creates the migration (and the disks' with --copy-storage-all) on both daemons,
    /// recoverable when postcopy is asked for.
    async fn create(&self, runtime: &str) -> Result<Created, Failure> {
        let mut created = Created {
            ids: Vec::new(),
            socket: String::new(),
            disks_socket: None,
        };
        let mut ids = vec![self.id.to_owned()];
        if self.flags.copy_storage_all {
            ids.push(format!("{}-disks", self.id));
        }
        for id in ids {
            let socket = format!("{runtime}/{id}.sock");
            let result = self.create_pair(&id, &socket).await;
            created.ids.push(id.clone());
            if let Err(failure) = result {
                self.take_back(&created).await;
                return Err(failure);
            }
            match created.socket.is_empty() {
                true => created.socket = socket,
                false => created.disks_socket = Some(socket),
            }
        }
        Ok(created)
    }

    async fn create_pair(&self, id: &str, socket: &str) -> Result<(), Failure> {
        if self.shutdown.is_cancelled() {
            return Err(Failure::interrupted());
        }
        let recoverable = self.qemu.postcopy_after.is_some();
        let incoming = IncomingRequest {
            id: Some(id.to_owned()),
            target: Some(format!("unix:{socket}")),
            recoverable: Some(recoverable),
            // The RAM migration and its disks' share one stall watch: the disk connection
            // idles once the disks are in sync while RAM still moves.
            group: Some(self.id.to_owned()),
            ..IncomingRequest::default()
        };
        let incoming = self
            .destination
            .create_incoming(&incoming)
            .await
            .map_err(|e| Failure::from_client("destination daemon", e))?;
        let outgoing = OutgoingRequest {
            id: id.to_owned(),
            token: incoming.token,
            peer: incoming.peer,
            recoverable: Some(recoverable),
            group: Some(self.id.to_owned()),
            ..OutgoingRequest::default()
        };
        let outgoing = self
            .source
            .create_outgoing(&outgoing)
            .await
            .map_err(|e| Failure::from_client("source daemon", e))?;
        let handed = outgoing.qemu_uri;
        if handed != format!("unix:{socket}") {
            return Err(Failure::failed(format!(
                "the source daemon handed out {handed}, not unix:{socket}: libvirt would use \
                 a path the destination does not listen on"
            )));
        }
        Ok(())
    }

    /// Cancels and forgets what this command created, on both daemons.
    async fn take_back(&self, created: &Created) {
        for id in &created.ids {
            for daemon in [self.source, self.destination] {
                let _ = daemon.cancel(id).await;
            }
            for daemon in [self.source, self.destination] {
                // A cancel takes a moment to end the migration on both hosts.
                for _ in 0..50 {
                    if daemon.forget(id).await.is_ok() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// Runs `virsh migrate`, shows progress, answers Ctrl-C, and reports.
    async fn drive(&self, domain: &str, dest_uri: &str, created: &Created) -> Result<u8, Failure> {
        let mut virsh = self
            .virsh_migrate(domain, dest_uri, created)
            .spawn()
            .map_err(|e| Failure::failed(format!("cannot run virsh: {e}")))?;
        if !self.json {
            eprintln!(
                "migrating {domain} ({}): {} → {dest_uri} through migproxy (Ctrl-C cancels)",
                self.id,
                self.connect()
            );
        }
        let virsh_said = self.follow(domain, &mut virsh).await;
        let (virsh_ok, virsh_text) = virsh_said?;
        let stats = self.job_stats(domain, true).await;
        let ends = self.migproxy_ends(created).await;
        let on_destination = domain_state(dest_uri, domain).await;
        let runs_there =
            virsh_ok && matches!(on_destination.as_deref(), Some("running" | "paused"));
        self.report(&ends, &stats, &virsh_text, on_destination.as_deref());
        Ok(if runs_there { 0 } else { EXIT_FAILED })
    }

    fn connect(&self) -> String {
        self.flags
            .connect
            .clone()
            .unwrap_or_else(|| "qemu:///system".to_owned())
    }

    fn virsh(&self) -> Command {
        let mut command = Command::new("virsh");
        command.args(["-c", &self.connect()]);
        command
    }

    fn virsh_migrate(&self, domain: &str, dest_uri: &str, created: &Created) -> Command {
        let mut command = self.virsh();
        command
            .args(["migrate", "--live", "--p2p", domain, dest_uri])
            .args(["--migrateuri", &format!("unix://{}", created.socket)]);
        if let Some(n) = self.flags.parallel {
            command.args(["--parallel", "--parallel-connections", &n.to_string()]);
        }
        if let Some(disks) = &created.disks_socket {
            command
                .arg("--copy-storage-all")
                .args(["--disks-uri", &format!("unix://{disks}")]);
        }
        if let Some(after) = self.qemu.postcopy_after {
            let secs = after.as_secs().max(1).to_string();
            command
                .args(["--postcopy", "--timeout", &secs])
                .arg("--timeout-postcopy");
        }
        if let Some(rate) = self.qemu.max_bandwidth {
            // virsh takes MiB/s.
            let mib = rate.div_ceil(1 << 20).max(1).to_string();
            command.args(["--bandwidth", &mib]);
        }
        for (on, flag) in [
            (self.flags.persistent, "--persistent"),
            (self.flags.undefinesource, "--undefinesource"),
        ] {
            if on {
                command.arg(flag);
            }
        }
        command
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            // Its own process group: a terminal's Ctrl-C is this command's to handle (abort
            // the job, cancel both daemons), not virsh's alone.
            .process_group(0)
            .kill_on_drop(true);
        command
    }

    /// Until virsh exits: the live line, the downtime limit once the job runs, and Ctrl-C.
    async fn follow(&self, domain: &str, virsh: &mut Child) -> Result<(bool, String), Failure> {
        let line = ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{spinner} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        // Read as it comes, so that virsh never blocks on a full pipe.
        let out = virsh.stdout.take().map(|pipe| tokio::spawn(read_all(pipe)));
        let err = virsh.stderr.take().map(|pipe| tokio::spawn(read_all(pipe)));
        let (mut aborted, mut downtime_set) = (false, self.qemu.downtime_limit.is_none());
        let status = loop {
            if self.shutdown.is_cancelled() && !aborted {
                aborted = true;
                self.cancel(domain, &line).await;
            }
            let job = self.job_stats(domain, false).await;
            if !downtime_set && job.contains_key("Time elapsed") {
                downtime_set = self.set_downtime(domain).await;
            }
            let m = self.source.migration(self.id).await;
            line.set_message(progress(&job, m.as_ref().ok()));
            line.tick();
            tokio::select! {
                status = virsh.wait() => break status,
                () = tokio::time::sleep(self.interval) => {}
                () = self.shutdown.cancelled(), if !aborted => {}
            }
        };
        line.finish_and_clear();
        let status = status.map_err(|e| Failure::failed(format!("virsh: {e}")))?;
        let mut text = String::new();
        for read in [out, err].into_iter().flatten() {
            text += &read.await.unwrap_or_default();
        }
        Ok((status.success(), text.trim().to_owned()))
    }

    /// Ctrl-C: migproxy cancels on both hosts at once (even when QEMU is stuck writing), then
    /// libvirt's job is aborted, so that both tell a cancel, not a failure. Not once libvirt
    /// has switched to postcopy: the guest already runs on the destination, and breaking the
    /// stream would leave it paused on both hosts.
    async fn cancel(&self, domain: &str, line: &ProgressBar) {
        let state = self
            .virsh()
            .args(["domstate", domain, "--reason"])
            .output()
            .await;
        let switched =
            state.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("post-copy"));
        if switched {
            line.suspend(|| {
                eprintln!(
                    "not cancelling: the migration has switched to postcopy, the guest runs on \
                     the destination and a cancel would lose it; waiting for it to finish"
                )
            });
            return;
        }
        line.suspend(|| eprintln!("cancelling on both hosts, then libvirt's job"));
        let path = format!("/v1/migrations/{}/cancel", self.id);
        if let Err(error) = self.source.post(&path, None).await {
            line.suspend(|| eprintln!("source daemon: cancel refused: {error}"));
        }
        let _ = self.virsh().args(["domjobabort", domain]).output().await;
    }

    async fn set_downtime(&self, domain: &str) -> bool {
        let ms = self.qemu.downtime_limit.unwrap_or_default().to_string();
        let out = self
            .virsh()
            .args(["migrate-setmaxdowntime", domain, &ms])
            .output()
            .await;
        out.is_ok_and(|o| o.status.success())
    }

    /// `virsh domjobinfo` (of the completed job with `completed`) as key → value.
    async fn job_stats(&self, domain: &str, completed: bool) -> BTreeMap<String, String> {
        let mut command = self.virsh();
        command.args(["domjobinfo", domain]);
        if completed {
            command.arg("--completed");
        }
        match command.output().await {
            Ok(out) if out.status.success() => parse_job(&String::from_utf8_lossy(&out.stdout)),
            _ => BTreeMap::new(),
        }
    }

    /// Both daemons' last word on each migration created, once it has ended (or after a
    /// bound: the report says what it saw).
    async fn migproxy_ends(&self, created: &Created) -> Vec<End> {
        let mut ends = Vec::new();
        for id in &created.ids {
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut last = None;
            while Instant::now() < deadline {
                match self.source.migration(id).await {
                    Ok(m) => {
                        let done = m.state.is_final();
                        last = Some(m);
                        if done {
                            break;
                        }
                    }
                    Err(_) => break,
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let far = self.destination.migration(id).await.ok();
            ends.push(End {
                id: id.clone(),
                source: last,
                destination: far,
            });
        }
        ends
    }

    fn report(
        &self,
        ends: &[End],
        stats: &BTreeMap<String, String>,
        virsh: &str,
        on_destination: Option<&str>,
    ) {
        if self.json {
            say!(
                "{}",
                json!({"libvirt": {"job": stats, "virsh": virsh,
                        "destination_state": on_destination},
                       "migrations": ends})
            );
            return;
        }
        let domain = self.flags.libvirt.as_deref().unwrap_or("?");
        say!(
            "libvirt: {domain} is {} on the destination",
            on_destination.unwrap_or("unknown (not defined there?)")
        );
        if !virsh.is_empty() {
            say!("  virsh: {virsh}");
        }
        for key in [
            "Time elapsed",
            "Total downtime",
            "Memory processed",
            "Memory bandwidth",
            "Data processed",
        ] {
            if let Some(value) = stats.get(key) {
                say!("  {key}: {value}");
            }
        }
        for end in ends {
            print_end(end);
        }
    }
}

/// Both daemons' last word on one migration (none when a daemon could not tell).
#[derive(Debug, serde::Serialize)]
struct End {
    id: String,
    source: Option<Snapshot>,
    destination: Option<Snapshot>,
}

/// migproxy's lines of the report for one migration, from the source's view.
fn print_end(end: &End) {
    let Some(source) = &end.source else {
        say!(
            "migproxy {}: unknown · {} to destination, {} to source",
            end.id,
            Bytes(0),
            Bytes(0)
        );
        return;
    };
    say!(
        "migproxy {}: {} · {} to destination, {} to source",
        end.id,
        source.state,
        Bytes(source.bytes.to_destination),
        Bytes(source.bytes.to_source),
    );
    for c in &source.channels {
        migration::print_channel(c, "    ");
    }
    // Pauses, recoveries and resumptions: what the network cost this migration.
    migration::print_recoveries(source);
    if let Some(error) = &source.error {
        say!("  error: {}", error.message);
    }
}

async fn read_all(mut pipe: impl tokio::io::AsyncRead + Unpin) -> String {
    use tokio::io::AsyncReadExt;
    let mut text = String::new();
    let _ = pipe.read_to_string(&mut text).await;
    text
}

/// virsh must be here: this command drives libvirt through it.
async fn check_virsh() -> Result<(), Failure> {
    match Command::new("virsh").arg("--version").output().await {
        Ok(out) if out.status.success() => Ok(()),
        _ => Err(Failure::usage(
            "--libvirt: virsh is not installed (libvirt-clients); this command drives libvirt \
             through it"
                .into(),
        )),
    }
}

/// `virsh -c URI domstate DOMAIN` (`running`, `paused`, …), or `None` when libvirt there does
/// not know the domain.
async fn domain_state(uri: &str, domain: &str) -> Option<String> {
    let out = Command::new("virsh")
        .args(["-c", uri, "domstate", domain])
        .output()
        .await
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// `Key:   value` lines, as virsh prints job statistics.
fn parse_job(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|line| line.split_once(':'))
        .map(|(key, value)| (key.trim().to_owned(), value.trim().to_owned()))
        .filter(|(key, value)| !key.is_empty() && !value.is_empty())
        .collect()
}

/// One line: libvirt's job (data remaining, rate, dirty rate) and migproxy's channels.
fn progress(job: &BTreeMap<String, String>, m: Option<&Snapshot>) -> String {
    let field = |key: &str| job.get(key).map_or("-", String::as_str);
    let mut text = format!(
        "libvirt: {} left · {} · dirty {}",
        field("Data remaining"),
        field("Memory bandwidth"),
        field("Dirty rate")
    );
    if let Some(m) = m {
        let channels = m.channels.len();
        text += &format!(
            " · migproxy {}: {} moved, {}/s, {channels} channel{}",
            m.state,
            Bytes(m.bytes.to_destination),
            Bytes(m.throughput.current_bytes_per_second),
            if channels == 1 { "" } else { "s" }
        );
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_statistics_are_read_as_virsh_prints_them() {
        let text = "Job type:         Completed\nOperation:        Outgoing migration\n\
                    Time elapsed:     1627         ms\nTotal downtime:   24           ms\n\
                    Memory bandwidth: 104.567 MiB/s\n\n";
        let job = parse_job(text);
        assert_eq!(job["Job type"], "Completed");
        assert_eq!(job["Time elapsed"], "1627         ms");
        assert_eq!(job["Total downtime"], "24           ms");
        assert_eq!(job.len(), 5);
        let line = progress(&job, None);
        assert!(line.contains("104.567 MiB/s"), "{line}");
        assert!(line.contains("- left"), "{line}");
    }
}
