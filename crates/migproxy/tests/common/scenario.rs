//! A whole migration set-up: source and destination QEMU, two `migproxy daemon` processes
//! (in two network namespaces when asked), and the QMP steps in between.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};

use super::netns::TwoHosts;
use super::process::DaemonProcess;
use super::qemu::{Qemu, Ram, random_ram_file};
use super::short_tempdir;

pub struct Scenario {
    pub src_vm: Qemu,
    pub dst_vm: Qemu,
    pub source: DaemonProcess,
    pub destination: DaemonProcess,
    /// Where the destination QEMU listens (`unix:…`).
    pub target: String,
    pub mib: u64,
    pub hosts: Option<TwoHosts>,
    pub dir: tempfile::TempDir,
}

#[derive(Default)]
pub struct Options {
    /// Guest RAM in MiB (default 256).
    pub mib: Option<u64>,
    /// Put the daemons in two network namespaces joined by veth even when not root (which
    /// then fails loudly). As root — CI — they always are; otherwise they share loopback.
    pub netns: bool,
    /// Extra flags for both daemons.
    pub daemon_args: Vec<String>,
}

impl Scenario {
    pub async fn start(options: Options) -> Scenario {
        let mib = options.mib.unwrap_or(256);
        let dir = short_tempdir();
        let ram = dir.path().join("source.img");
        random_ram_file(&ram, mib, 5);
        let src_vm = Qemu::start(dir.path(), "src", Ram::File(&ram), mib, false).await;
        let dst_vm = Qemu::start(dir.path(), "dst", Ram::Anonymous, mib, true).await;
        let root = nix::unistd::Uid::effective().is_root();
        let hosts = (options.netns || root).then(|| TwoHosts::new("sc"));
        let args: Vec<&str> = options.daemon_args.iter().map(String::as_str).collect();
        let (src_listen, dst_listen, src_ns, dst_ns) = match &hosts {
            Some(h) => (
                format!("{}:0", h.a_addr),
                format!("{}:0", h.b_addr),
                Some(h.a.clone()),
                Some(h.b.clone()),
            ),
            None => ("127.0.0.1:0".into(), "127.0.0.1:0".into(), None, None),
        };
        let source =
            DaemonProcess::start(dir.path(), "srcd", &src_listen, src_ns.as_deref(), &args).await;
        let destination =
            DaemonProcess::start(dir.path(), "dstd", &dst_listen, dst_ns.as_deref(), &args).await;
        let target = format!("unix:{}", dir.path().join("incoming.sock").display());
        Scenario {
            src_vm,
            dst_vm,
            source,
            destination,
            target,
            mib,
            hosts,
            dir,
        }
    }

    /// Sets migration capabilities on both QEMUs.
    pub async fn capabilities(&mut self, names: &[&str]) {
        let caps: Vec<Value> = names
            .iter()
            .map(|name| json!({"capability": name, "state": true}))
            .collect();
        let args = json!({ "capabilities": caps });
        self.src_vm
            .execute("migrate-set-capabilities", args.clone())
            .await;
        self.dst_vm.execute("migrate-set-capabilities", args).await;
    }

    /// Sets migration parameters on both QEMUs.
    pub async fn parameters(&mut self, parameters: Value) {
        self.src_vm
            .execute("migrate-set-parameters", parameters.clone())
            .await;
        self.dst_vm
            .execute("migrate-set-parameters", parameters)
            .await;
    }

    /// The destination QEMU listens on the target; both daemons get the migration. Returns
    /// the URI for the source QEMU's `migrate`.
    pub async fn create(&mut self, id: &str, recoverable: bool) -> String {
        self.dst_vm
            .execute("migrate-incoming", json!({"uri": self.target}))
            .await;
        let body = json!({"direction": "incoming", "id": id, "target": self.target,
                          "recoverable": recoverable});
        let (status, incoming) = self
            .destination
            .request("POST", "/v1/migrations", Some(body))
            .await;
        assert_eq!(status, 201, "{incoming}");
        let body = json!({"direction": "outgoing", "id": id, "token": incoming["token"],
                          "peer": incoming["peer"], "recoverable": recoverable});
        let (status, outgoing) = self
            .source
            .request("POST", "/v1/migrations", Some(body))
            .await;
        assert_eq!(status, 201, "{outgoing}");
        outgoing["qemu_uri"].as_str().unwrap().to_owned()
    }

    /// Starts the source's migration at `bandwidth` bytes per second.
    pub async fn migrate(&mut self, uri: &str, bandwidth: u64) {
        self.src_vm
            .execute(
                "migrate-set-parameters",
                json!({"max-bandwidth": bandwidth}),
            )
            .await;
        self.src_vm.execute("migrate", json!({"uri": uri})).await;
    }

    /// Waits until the source QEMU has sent `bytes` of RAM.
    pub async fn sent_at_least(&mut self, bytes: u64) {
        let vm = &mut self.src_vm;
        super::poll("RAM sent", Duration::from_secs(60), async || {
            let info = vm.execute("query-migrate", Value::Null).await;
            let sent = info["ram"]["transferred"].as_u64().unwrap_or(0);
            if sent >= bytes { Ok(()) } else { Err(info) }
        })
        .await
    }

    /// Both VMs' guest RAM must be equal (and the source's must be the random file's).
    pub async fn assert_ram_equal(&mut self) {
        let path = self.dir.path().to_owned();
        let (src, _) = self.src_vm.ram_digest(&path, "src", self.mib).await;
        let (dst, _) = self.dst_vm.ram_digest(&path, "dst", self.mib).await;
        assert_eq!(src, dst, "destination RAM differs from the source's");
    }

    /// The source QEMU says `completed` and both daemons ended migration `id` in `verdict`:
    /// `completed` where QEMU's return path carried the destination's `SHUT` (postcopy),
    /// `transferred` where nothing told QEMU's verdict (precopy without QMP); returns the
    /// daemons' views (source, destination).
    pub async fn completes(&mut self, id: &str, verdict: &str) -> [Value; 2] {
        qemu_completed(&mut self.src_vm).await;
        let mut views = Vec::new();
        for daemon in [&self.source, &self.destination] {
            let view = daemon.wait_final(id, Duration::from_secs(10)).await;
            assert_eq!(view["state"], verdict, "{view}");
            views.push(view);
        }
        [views.remove(0), views.remove(0)]
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// Waits (up to 2 minutes) for `vm`'s migration to end, and asserts it `completed`.
pub async fn qemu_completed(vm: &mut Qemu) -> Value {
    let info = qemu_status(vm, &["completed", "failed"], Duration::from_secs(120)).await;
    assert_eq!(info["status"], "completed", "{info}\n{}", vm.log_text());
    info
}

/// Polls a QEMU's `query-migrate` until its status is one of `wanted`.
pub async fn qemu_status(vm: &mut Qemu, wanted: &[&str], limit: Duration) -> Value {
    let what = format!("QEMU status {wanted:?}");
    super::poll(&what, limit, async || {
        let info = vm.execute("query-migrate", Value::Null).await;
        if wanted.contains(&info["status"].as_str().unwrap_or("")) {
            Ok(info)
        } else {
            Err(format!("{info}\n{}", vm.log_text()))
        }
    })
    .await
}
