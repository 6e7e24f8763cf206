//! Two network namespaces joined by a veth pair: two hosts on one machine, with a cable the
//! tests can cut. Needs root (CI runs as root); removed when dropped.

use std::process::Command;

pub struct TwoHosts {
    pub a: String,
    pub b: String,
    pub a_addr: String,
    pub b_addr: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("the ip command (iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Panics with a clear message when not root: these tests must not vanish silently.
pub fn require_root() {
    let uid = nix::unistd::Uid::effective();
    assert!(
        uid.is_root(),
        "this test builds network namespaces and needs root (CI runs as root)"
    );
}

impl TwoHosts {
    pub fn new(tag: &str) -> TwoHosts {
        require_root();
        // Unique per process and test, short enough for interface names (15 bytes).
        let n = std::process::id() % 10_000;
        let (a, b) = (format!("mp{tag}a{n}"), format!("mp{tag}b{n}"));
        let subnet = 1 + (n % 250);
        let hosts = TwoHosts {
            a_addr: format!("10.213.{subnet}.1"),
            b_addr: format!("10.213.{subnet}.2"),
            a,
            b,
        };
        let (va, vb) = (format!("v{tag}a{n}"), format!("v{tag}b{n}"));
        ip(&["netns", "add", &hosts.a]);
        ip(&["netns", "add", &hosts.b]);
        ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb]);
        ip(&["link", "set", &va, "netns", &hosts.a]);
        ip(&["link", "set", &vb, "netns", &hosts.b]);
        for (ns, dev, addr) in [
            (&hosts.a, &va, &hosts.a_addr),
            (&hosts.b, &vb, &hosts.b_addr),
        ] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        hosts
    }

    /// Lifts [`blackhole_b`](Self::blackhole_b): the cable is back.
    pub fn restore_b(&self) {
        self.nft_b("delete table inet cut");
    }

    /// Drops every packet arriving at host B: a blackhole, no reset, no error.
    pub fn blackhole_b(&self) {
        self.nft_b(
            "table inet cut { \
             chain input { type filter hook input priority 0; policy drop; }; \
             chain output { type filter hook output priority 0; policy drop; }; }",
        );
    }

    /// Answers every TCP segment arriving at host B for `port` with a reset (a firewall's
    /// reject): each connection to it breaks as soon as its peer sends, and new ones are
    /// refused, until [`restore_b`](Self::restore_b).
    pub fn reset_port_b(&self, port: u16) {
        self.nft_b(&format!(
            "table inet cut {{ \
             chain input {{ type filter hook input priority 0; \
             tcp dport {port} reject with tcp reset; }}; }}"
        ));
    }

    /// Runs one nft command in host B's namespace.
    fn nft_b(&self, command: &str) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.b, "nft", command])
            .output()
            .expect("nft (nftables)");
        assert!(
            out.status.success(),
            "nft {command}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth pair with it.
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}
