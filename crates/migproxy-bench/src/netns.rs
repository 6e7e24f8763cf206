//! Two hosts on one machine: two network namespaces joined by a veth pair, and a blackhole
//! (nftables) that drops every packet in or out of host B. After the tests'
//! `common/netns.rs`, with errors returned instead of panics. Needs root; the namespaces (and
//! the veth pair with them) are removed when dropped, and a blackhole is lifted when its
//! guard is.

use std::process::Command;

use crate::measure::BenchError;

#[derive(Debug)]
pub struct TwoHosts {
    pub a: String,
    pub b: String,
    pub a_addr: String,
    pub b_addr: String,
}

/// Runs `ip ARGS`; its stderr in the error.
fn ip(args: &[&str]) -> Result<(), BenchError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("the ip command (iproute2): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into())
    }
}

impl TwoHosts {
    /// Namespaces `mp{tag}a{N}` and `mp{tag}b{N}` (N from this process's id), addresses
    /// 10.213.X.1 and 10.213.X.2 on the veth pair between them.
    pub fn new(tag: &str) -> Result<TwoHosts, BenchError> {
        if !nix::unistd::Uid::effective().is_root() {
            return Err("this benchmark builds network namespaces and needs root".into());
        }
        // Short enough for interface names (15 bytes).
        let n = std::process::id() % 10_000;
        let subnet = 1 + (n % 250);
        // Made before the first namespace: whatever was set up is removed on an error.
        let hosts = TwoHosts {
            a: format!("mp{tag}a{n}"),
            b: format!("mp{tag}b{n}"),
            a_addr: format!("10.213.{subnet}.1"),
            b_addr: format!("10.213.{subnet}.2"),
        };
        let (va, vb) = (format!("v{tag}a{n}"), format!("v{tag}b{n}"));
        ip(&["netns", "add", &hosts.a])?;
        ip(&["netns", "add", &hosts.b])?;
        ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb])?;
        ip(&["link", "set", &va, "netns", &hosts.a])?;
        ip(&["link", "set", &vb, "netns", &hosts.b])?;
        for (ns, dev, addr) in [
            (&hosts.a, &va, &hosts.a_addr),
            (&hosts.b, &vb, &hosts.b_addr),
        ] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(hosts)
    }

    /// `program` to be run inside namespace `ns` (`ip netns exec`, which execs it: the
    /// child's process id is the program's).
    pub fn command(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", ns]).arg(program);
        command
    }

    /// Drops every packet arriving at or leaving host B (no reset, no error) until the
    /// guard is restored or dropped.
    pub fn blackhole_b(&self) -> Result<Blackhole<'_>, BenchError> {
        self.nft_b(
            "table inet cut { \
             chain input { type filter hook input priority 0; policy drop; }; \
             chain output { type filter hook output priority 0; policy drop; }; }",
        )?;
        Ok(Blackhole {
            hosts: self,
            on: true,
        })
    }

    /// Runs one nft command in host B's namespace.
    fn nft_b(&self, command: &str) -> Result<(), BenchError> {
        ip(&["netns", "exec", &self.b, "nft", command])
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

/// Host B blackholed; lifted by [`Blackhole::restore`], or when dropped (on an error).
#[derive(Debug)]
pub struct Blackhole<'a> {
    hosts: &'a TwoHosts,
    on: bool,
}

impl Blackhole<'_> {
    /// The cable is back once this returns.
    pub fn restore(mut self) -> Result<(), BenchError> {
        self.on = false;
        self.hosts.nft_b("delete table inet cut")
    }
}

impl Drop for Blackhole<'_> {
    fn drop(&mut self) {
        if self.on {
            let _ = self.hosts.nft_b("delete table inet cut");
        }
    }
}
