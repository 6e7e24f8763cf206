//! Two libvirt hosts on one machine: each a network namespace (joined by a veth pair), a mount
//! namespace of its own (own `/run`, `/etc/libvirt`, `/var/lib/libvirt`, `/var/log/libvirt`)
//! and a UTS namespace, running a real `libvirtd --listen` on qemu+tcp and a `migproxy daemon`.
//! A small guest whose RAM holds a random image (the destination's image is zeros, so equal RAM
//! after a migration proves the bytes crossed). Needs root and libvirt (scripts/test installs
//! it); everything is torn down when dropped.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::netns::TwoHosts;
use super::process::BIN;

/// Guest RAM in MiB, and the random image loaded into it at 64 MiB.
pub const GUEST_MIB: u64 = 256;
const IMAGE_MIB: u64 = 64;
const IMAGE_ADDR: u64 = 64 << 20;

/// One libvirt host: libvirtd in its namespaces, a migproxy daemon beside it.
pub struct Host {
    pub name: String,
    pub addr: String,
    /// A process in the host's namespaces (libvirtd), for `nsenter`.
    pid: u32,
    libvirtd: std::process::Child,
    daemon: Option<std::process::Child>,
    /// The host's own files (bind-mounted into its namespace).
    pub dir: PathBuf,
    /// The migproxy API socket (in the shared test directory, reachable from the test).
    pub api: PathBuf,
}

pub struct Libvirt {
    pub source: Host,
    pub destination: Host,
    net: TwoHosts,
    pub dir: tempfile::TempDir,
}

/// Fails loudly when libvirt is missing: these tests must not vanish silently.
fn require_libvirt() {
    for tool in ["libvirtd", "virsh", "nsenter", "unshare"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            found,
            "{tool} is missing: run scripts/test, which installs libvirt"
        );
    }
    // The package sets /dev/kvm to root:kvm 0660 through udev, which does not run here.
    if Path::new("/dev/kvm").exists() {
        let _ = Command::new("chown")
            .args(["root:kvm", "/dev/kvm"])
            .status();
        let _ = Command::new("chmod").args(["0660", "/dev/kvm"]).status();
    }
}

impl Libvirt {
    /// Both hosts, each with libvirtd and a plaintext migproxy daemon (`daemon_args` for
    /// both), and the guest `g1` running on the source.
    pub async fn start(tag: &str, daemon_args: &[&str]) -> Libvirt {
        let mut args = vec!["--insecure-plaintext"];
        args.extend_from_slice(daemon_args);
        Self::start_with(tag, &args, false).await
    }

    /// The same over mutual TLS: certificates in QEMU's layout under `DIR/pki-HOST` from one
    /// CA, and the destination's API also served over mutual TLS on port 4701.
    pub async fn start_tls(tag: &str, daemon_args: &[&str]) -> Libvirt {
        Self::start_with(tag, daemon_args, true).await
    }

    /// The path of `host`'s certificates (with [`start_tls`](Self::start_tls)).
    pub fn pki(&self, host: &Host) -> PathBuf {
        self.dir.path().join(format!("pki-{}", host.name))
    }

    async fn start_with(tag: &str, daemon_args: &[&str], tls: bool) -> Libvirt {
        require_libvirt();
        let net = TwoHosts::new(tag);
        let dir = tempfile::Builder::new()
            .prefix("mplv-")
            .tempdir_in("/tmp")
            .unwrap();
        // QEMU (libvirt-qemu) writes its RAM dumps under it.
        chmod(dir.path(), 0o755);
        let source = Host::start(dir.path(), "source", &net.a, &net.a_addr);
        let destination = Host::start(dir.path(), "destination", &net.b, &net.b_addr);
        let mut lv = Libvirt {
            source,
            destination,
            net,
            dir,
        };
        lv.source.image(true);
        lv.destination.image(false);
        let mut ca = tls.then(|| super::certs::Ca::new("migproxy libvirt test CA"));
        for host in [&mut lv.source, &mut lv.destination] {
            host.wait_libvirtd().await;
            let mut args: Vec<String> = daemon_args.iter().map(|a| a.to_string()).collect();
            if let Some(ca) = &mut ca {
                let pki = lv.dir.path().join(format!("pki-{}", host.name));
                ca.write_host(&pki, &[&host.addr], &format!("{}-daemon", host.name));
                args.extend(["--tls-dir".into(), pki.display().to_string()]);
                if host.name == "destination" {
                    args.extend(["--api-listen".into(), format!("{}:4701", host.addr)]);
                }
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            host.start_daemon(&args).await;
        }
        lv.source.define_and_start_guest(lv.dir.path());
        lv
    }

    /// Every segment to the destination daemon's peer port (4700) is answered with a reset
    /// until [`heal`](Self::heal): libvirtd's own connection and the API port go on.
    pub fn reset_peer_port(&self) {
        self.net.reset_port_b(4700);
    }

    /// Lifts [`reset_peer_port`](Self::reset_peer_port).
    pub fn heal(&self) {
        self.net.restore_b();
    }

    /// The destination libvirtd, as the source reaches it.
    pub fn dest_uri(&self) -> String {
        format!("qemu+tcp://{}/system", self.destination.addr)
    }

    /// The guest's random image on the destination equals the source's.
    pub fn assert_ram_migrated(&self) {
        let dump = self.dir.path().join("dumps");
        std::fs::create_dir_all(&dump).unwrap();
        chmod(&dump, 0o777);
        let file = dump.join("destination.bin");
        let _ = std::fs::remove_file(&file);
        let command = format!(
            r#"{{"execute":"pmemsave","arguments":{{"val":{IMAGE_ADDR},"size":{},"filename":"{}"}}}}"#,
            IMAGE_MIB << 20,
            file.display()
        );
        let out = self
            .destination
            .virsh(&["qemu-monitor-command", "g1", &command]);
        assert!(out.status.success(), "pmemsave: {}", text(&out));
        let got = blake3::hash(&std::fs::read(&file).unwrap());
        let want = blake3::hash(&std::fs::read(self.source.image_path()).unwrap());
        assert_eq!(
            got, want,
            "the destination guest's RAM differs from the source's image"
        );
    }
}

impl Host {
    fn start(root: &Path, name: &str, ns: &str, addr: &str) -> Host {
        let dir = root.join(name);
        for sub in ["etc", "lib", "log", "cache"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        copy_tree("/etc/libvirt", &dir.join("etc"));
        copy_tree("/var/lib/libvirt", &dir.join("lib"));
        append(
            &dir.join("etc/libvirtd.conf"),
            &format!(
                "listen_tls = 0\nlisten_tcp = 1\nauth_tcp = \"none\"\nlisten_addr = \"{addr}\"\n\
                 host_uuid = \"{}\"\n",
                uuid()
            ),
        );
        // No virtlogd here: QEMU's output goes to a file.
        append(&dir.join("etc/qemu.conf"), "stdio_handler = \"file\"\n");
        let mounts = format!(
            "hostname {name} && mount -t tmpfs tmpfs /run && mkdir -p /run/lock && \
             mount --bind {d}/etc /etc/libvirt && mount --bind {d}/lib /var/lib/libvirt && \
             mount --bind {d}/log /var/log/libvirt && mount --bind {d}/cache /var/cache/libvirt && \
             exec libvirtd --listen",
            d = dir.display()
        );
        let log = std::fs::File::create(dir.join("libvirtd.log")).unwrap();
        let libvirtd = Command::new("ip")
            .args(["netns", "exec", ns, "unshare", "--mount", "--uts"])
            .args(["--propagation", "private", "sh", "-c", &mounts])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("libvirtd in its namespaces");
        let pid = libvirtd.id();
        Host {
            name: name.to_owned(),
            addr: addr.to_owned(),
            pid,
            libvirtd,
            daemon: None,
            api: dir.join("api.sock"),
            dir,
        }
    }

    /// A command run inside this host's namespaces.
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("nsenter");
        command
            .args(["-t", &self.pid.to_string(), "-m", "-u", "-n", program])
            .stdin(Stdio::null());
        command
    }

    /// The same for tokio (a command the test waits for without blocking the runtime).
    pub fn async_command(&self, program: &str) -> tokio::process::Command {
        tokio::process::Command::from(self.command(program))
    }

    pub fn virsh(&self, args: &[&str]) -> Output {
        self.command("virsh")
            .args(["-c", "qemu:///system"])
            .args(args)
            .output()
            .unwrap()
    }

    async fn wait_libvirtd(&self) {
        wait(&format!("libvirtd on {}", self.name), || {
            self.virsh(&["version"]).status.success()
        })
        .await;
    }

    async fn start_daemon(&mut self, extra: &[&str]) {
        let log = std::fs::File::create(self.dir.join("migproxy.log")).unwrap();
        let child = self
            .command(BIN)
            .arg("daemon")
            .arg("--api")
            .arg(&self.api)
            .args(["--peer-listen", &format!("{}:4700", self.addr)])
            // The same runtime directory on both hosts (libvirt's same-path rule), where QEMU
            // (group kvm) creates the destination's socket.
            .args([
                "--runtime-dir",
                "/run/migproxy",
                "--runtime-dir-group",
                "kvm",
            ])
            .args(extra)
            // What each daemon did, for a failing test's message.
            .env("MIGPROXY_LOG", super::daemon_log_level())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.daemon = Some(child);
        let api = self.api.clone();
        let start = Instant::now();
        while !api.exists() {
            let exited = self
                .daemon
                .as_mut()
                .and_then(|d| d.try_wait().ok().flatten());
            assert!(
                exited.is_none() && start.elapsed() < Duration::from_secs(30),
                "migproxy on {} did not start ({exited:?}): {}",
                self.name,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn image_path(&self) -> PathBuf {
        self.dir.join("lib/images/guest-ram.bin")
    }

    /// The image the guest's loader puts into its RAM: random on the source, zeros on the
    /// destination (whose QEMU loads it too, before the migration overwrites it).
    fn image(&self, random: bool) {
        let path = self.image_path();
        let mut data = vec![0u8; (IMAGE_MIB << 20) as usize];
        if random {
            use rand::RngCore;
            rand::thread_rng().fill_bytes(&mut data);
        }
        std::fs::write(&path, data).unwrap();
        chmod(&path, 0o644);
        chmod(path.parent().unwrap(), 0o755);
    }

    fn define_and_start_guest(&self, root: &Path) {
        let xml = root.join("g1.xml");
        std::fs::write(&xml, guest_xml()).unwrap();
        let xml = xml.display().to_string();
        for args in [&["define", &xml][..], &["start", "g1"]] {
            let out = self.virsh(args);
            assert!(out.status.success(), "virsh {args:?}: {}", text(&out));
        }
    }

    /// `virsh domstate g1`, trimmed (`running`, `shut off`, or the error).
    pub fn guest_state(&self) -> String {
        let out = self.virsh(&["domstate", "g1"]);
        if out.status.success() {
            String::from_utf8_lossy(&out.stdout).trim().to_owned()
        } else {
            format!("error: {}", text(&out).trim())
        }
    }

    /// The migproxy API of this host.
    pub async fn request(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        super::daemon::http(&self.api, method, path, body).await
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("migproxy.log")).unwrap_or_default()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        // QEMU outlives libvirtd: destroy the guests first.
        let out = self.virsh(&["list", "--name"]);
        for name in String::from_utf8_lossy(&out.stdout).lines() {
            if !name.trim().is_empty() {
                let _ = self.virsh(&["destroy", name.trim()]);
            }
        }
        if let Some(mut daemon) = self.daemon.take() {
            let _ = daemon.kill();
            let _ = daemon.wait();
        }
        let _ = self.libvirtd.kill();
        let _ = self.libvirtd.wait();
    }
}

impl Libvirt {
    /// A second guest, `g2`, with a raw disk not shared between the hosts (random on the
    /// source but for a zero boot sector, zeros on the destination) and the random RAM image;
    /// started on the source. Returns the disk's path on each host's side of the filesystem.
    pub fn start_disk_guest(&self) -> (PathBuf, PathBuf) {
        let disks = (
            self.source.dir.join("lib/images/disk.raw"),
            self.destination.dir.join("lib/images/disk.raw"),
        );
        let mut data = vec![0u8; (DISK_MIB << 20) as usize];
        {
            use rand::RngCore;
            rand::thread_rng().fill_bytes(&mut data[512..]);
        }
        std::fs::write(&disks.0, &data).unwrap();
        std::fs::write(&disks.1, vec![0u8; data.len()]).unwrap();
        for disk in [&disks.0, &disks.1] {
            let status = Command::new("chown")
                .args(["libvirt-qemu:kvm", &disk.display().to_string()])
                .status()
                .unwrap();
            assert!(status.success());
        }
        let xml = self.dir.path().join("g2.xml");
        std::fs::write(
            &xml,
            guest_xml()
                .replace("<name>g1</name>", "<name>g2</name>")
                .replace(
                    "<devices>",
                    "<devices><disk type='file' device='disk'><driver name='qemu' type='raw'/>\
             <source file='/var/lib/libvirt/images/disk.raw'/>\
             <target dev='vda' bus='virtio'/></disk>",
                ),
        )
        .unwrap();
        let xml = xml.display().to_string();
        for args in [&["define", &xml][..], &["start", "g2"]] {
            let out = self.source.virsh(args);
            assert!(out.status.success(), "virsh {args:?}: {}", text(&out));
        }
        disks
    }
}

/// The non-shared disk of `g2`, in MiB.
const DISK_MIB: u64 = 16;

fn guest_xml() -> String {
    format!(
        "<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>g1</name>
  <memory unit='MiB'>{GUEST_MIB}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator></devices>
  <qemu:commandline>
    <qemu:arg value='-device'/>
    <qemu:arg value='loader,file=/var/lib/libvirt/images/guest-ram.bin,addr={IMAGE_ADDR:#x},force-raw=on'/>
  </qemu:commandline>
</domain>
"
    )
}

async fn wait(what: &str, ready: impl Fn() -> bool) {
    let start = Instant::now();
    while !ready() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{what} not up in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn copy_tree(from: &str, to: &Path) {
    let status = Command::new("cp")
        .args(["-a", &format!("{from}/."), &to.display().to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "cp -a {from}");
}

fn append(path: &Path, text: &str) {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    file.write_all(text.as_bytes()).unwrap();
}

fn chmod(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn uuid() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .unwrap()
        .trim()
        .to_owned()
}

pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
