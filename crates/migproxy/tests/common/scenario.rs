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
    /// Mutual TLS between the daemons: a test CA, a certificate for each host (its address
    /// among the names), the destination admitting only `CN=source-*`.
    pub tls: bool,
}

/// Each daemon's flags: the options' own, and its TLS material when asked.
fn daemon_args(
    options: &Options,
    dir: &std::path::Path,
    hosts: Option<&TwoHosts>,
) -> [Vec<String>; 2] {
    let mut args = [options.daemon_args.clone(), options.daemon_args.clone()];
    if options.tls {
        let (src_addr, dst_addr) = hosts.map_or(("127.0.0.1", "127.0.0.1"), |h| {
            (h.a_addr.as_str(), h.b_addr.as_str())
        });
        let mut ca = super::certs::Ca::new("migproxy test CA");
        let (src_pki, dst_pki) = (dir.join("pki-src"), dir.join("pki-dst"));
        ca.write_host(&src_pki, &["source.test", src_addr], "source-daemon");
        ca.write_host(
            &dst_pki,
            &["destination.test", dst_addr],
            "destination-daemon",
        );
        args[0].extend(["--tls-dir".into(), src_pki.display().to_string()]);
        args[1].extend([
            "--tls-dir".into(),
            dst_pki.display().to_string(),
            "--tls-allow".into(),
            "CN=source-*".into(),
        ]);
    }
    args
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
        let (src_listen, dst_listen, src_ns, dst_ns) = match &hosts {
            Some(h) => (
                format!("{}:0", h.a_addr),
                format!("{}:0", h.b_addr),
                Some(h.a.clone()),
                Some(h.b.clone()),
            ),
            None => ("127.0.0.1:0".into(), "127.0.0.1:0".into(), None, None),
        };
        let [src_args, dst_args] = daemon_args(&options, dir.path(), hosts.as_ref());
        let src_args: Vec<&str> = src_args.iter().map(String::as_str).collect();
        let dst_args: Vec<&str> = dst_args.iter().map(String::as_str).collect();
        let source = DaemonProcess::start(
            dir.path(),
            "srcd",
            &src_listen,
            src_ns.as_deref(),
            &src_args,
        )
        .await;
        let destination = DaemonProcess::start(
            dir.path(),
            "dstd",
            &dst_listen,
            dst_ns.as_deref(),
            &dst_args,
        )
        .await;
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

    /// The bytes of RAM the source QEMU has sent so far.
    pub async fn ram_sent(&mut self) -> u64 {
        let info = self.src_vm.execute("query-migrate", Value::Null).await;
        info["ram"]["transferred"].as_u64().unwrap_or(0)
    }

    /// Waits (looking every 20 ms) until the source QEMU has sent more than `bytes` of RAM:
    /// when it did.
    pub async fn ram_sent_beyond(&mut self, bytes: u64) -> std::time::Instant {
        let limit = std::time::Instant::now() + Duration::from_secs(60);
        while self.ram_sent().await <= bytes {
            assert!(std::time::Instant::now() < limit, "no RAM moved in 60 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        std::time::Instant::now()
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
