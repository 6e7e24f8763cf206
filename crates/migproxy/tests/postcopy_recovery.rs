//! Postcopy that survives the network: two daemons in two network namespaces drive real
//! QEMUs over QMP; the link between them is blackholed (nftables) while postcopy runs, and
//! the daemons recover the migration by themselves — or fail it, or cancel it, as asked.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::scenario::{Options, Scenario, qemu_status};
use serde_json::{Value, json};

/// Postcopy's own bandwidth cap, bytes per second: postcopy lasts tens of seconds.
const POSTCOPY_BANDWIDTH: u64 = 24 << 20;

/// Starts a QMP-driven postcopy migration `id` of a `mib` MiB guest through two daemons in
/// two namespaces (peer timeout 3 s), and waits until QEMU runs postcopy. `extra` goes into
/// both create requests.
async fn in_postcopy(id: &str, mib: u64, extra: Value) -> Scenario {
    let mut s = two_hosts(mib).await;
    let mut body = json!({"direction": "incoming", "id": id, "postcopy": true,
        "qmp": s.dst_vm.spare_qmp()});
    merge(&mut body, &extra);
    let (status, incoming) = s
        .destination
        .request("POST", "/v1/migrations", Some(body))
        .await;
    assert_eq!(status, 201, "{incoming}");
    let mut body = json!({"direction": "outgoing", "id": id, "token": incoming["token"],
        "peer": incoming["peer"], "qmp": s.src_vm.spare_qmp(), "postcopy_after": 0.5,
        "max_bandwidth": 64u64 << 20});
    merge(&mut body, &extra);
    let (status, outgoing) = s.source.request("POST", "/v1/migrations", Some(body)).await;
    assert_eq!(status, 201, "{outgoing}");
    qemu_status(&mut s.src_vm, &["postcopy-active"], Duration::from_secs(30)).await;
    // Some of postcopy goes through before the cut.
    tokio::time::sleep(Duration::from_secs(2)).await;
    s
}

/// Two daemons in two namespaces (peer timeout 3 s), postcopy's bandwidth capped.
async fn two_hosts(mib: u64) -> Scenario {
    let mut s = Scenario::start(Options {
        mib: Some(mib),
        netns: true,
        // Without resumable channels, which would carry the channels across the break
        // themselves: QEMU's own recovery is under test.
        daemon_args: ["--peer-timeout", "3", "--resume-timeout", "0"]
            .map(String::from)
            .to_vec(),
        ..Options::default()
    })
    .await;
    s.src_vm
        .execute(
            "migrate-set-parameters",
            json!({"max-postcopy-bandwidth": POSTCOPY_BANDWIDTH}),
        )
        .await;
    s
}

fn merge(body: &mut Value, extra: &Value) {
    if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
        body.extend(extra.clone());
    }
}

fn hosts(s: &Scenario) -> &common::netns::TwoHosts {
    s.hosts.as_ref().expect("two network namespaces (root)")
}

/// Both daemons report migration `id` paused (the cut found by the peer timeout).
async fn both_paused(s: &Scenario, id: &str) -> [Value; 2] {
    let mut views = Vec::new();
    for daemon in [&s.source, &s.destination] {
        let view = daemon
            .wait_for(id, "paused", Duration::from_secs(15), |v| {
                v["state"] == "paused"
            })
            .await;
        let open = view["recoveries"]
            .as_array()
            .and_then(|r| r.last())
            .cloned();
        assert!(
            open.is_some_and(|r| r["frozen_ms"].is_null()),
            "an open pause: {view}"
        );
        assert_eq!(view["error"]["leg"], "peer", "a network failure: {view}");
        views.push(view);
    }
    [views.remove(0), views.remove(0)]
}

/// Cuts the link for `outage`, checks both hosts paused meanwhile, and restores it.
async fn cut_for(s: &Scenario, id: &str, outage: Duration) {
    let cut = Instant::now();
    hosts(s).blackhole_b();
    let [source, _] = both_paused(s, id).await;
    let qemu = &source["qemu"]["status"];
    eprintln!("paused after {:?}; source QEMU {qemu}", cut.elapsed());
    tokio::time::sleep(outage.saturating_sub(cut.elapsed())).await;
    hosts(s).restore_b();
}

/// Both QEMUs completed, and both daemons say `completed` with `recoveries` recoveries, each
/// frozen at least `frozen_at_least`.
async fn completes_after(s: &mut Scenario, id: &str, recoveries: u64, frozen_at_least: Duration) {
    for vm in [&mut s.src_vm, &mut s.dst_vm] {
        let info = qemu_status(vm, &["completed", "failed"], Duration::from_secs(120)).await;
        assert_eq!(info["status"], "completed", "{info}");
    }
    for daemon in [&s.source, &s.destination] {
        let view = daemon.wait_final(id, Duration::from_secs(15)).await;
        assert_eq!(view["state"], "completed", "{view}");
        assert_eq!(view["recovered"], recoveries, "{view}");
        let list = view["recoveries"].as_array().unwrap();
        assert_eq!(list.len() as u64, recoveries, "{view}");
        for r in list {
            let frozen = r["frozen_ms"].as_u64().expect("recovered");
            assert!(
                frozen >= frozen_at_least.as_millis() as u64,
                "frozen {frozen} ms: {view}"
            );
            assert_eq!(r["cause"]["leg"], "peer", "{r}");
        }
        eprintln!(
            "{}: frozen {} ms in all",
            view["direction"], view["frozen_ms"]
        );
    }
    s.assert_ram_equal().await;
}

/// `migproxy migrate` from the source host, reaching both daemons' API sockets.
fn migrate(s: &Scenario, id: &str) -> tokio::process::Child {
    tokio::process::Command::new(common::process::BIN)
        .arg("migrate")
        .arg("--api")
        .arg(&s.source.api)
        .arg("--to")
        .arg(format!("unix:{}", s.destination.api.display()))
        .arg("--qmp")
        .arg(s.src_vm.spare_qmp())
        .arg("--dest-qmp")
        .arg(s.dst_vm.spare_qmp())
        .args([
            "--id",
            id,
            "--postcopy-after",
            "0.5",
            "--max-bandwidth",
            "64M",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_blackholed_for_20_s_in_postcopy_recovers_by_itself_and_completes() {
    let mut s = two_hosts(1024).await;
    let command = migrate(&s, "pc1");
    qemu_status(&mut s.src_vm, &["postcopy-active"], Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    cut_for(&s, "pc1", Duration::from_secs(20)).await;
    completes_after(&mut s, "pc1", 1, Duration::from_secs(10)).await;
    let output = tokio::time::timeout(Duration::from_secs(30), command.wait_with_output())
        .await
        .expect("migproxy migrate ends")
        .unwrap();
    let report = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{report}");
    assert!(report.contains("pc1: completed"), "{report}");
    assert!(report.contains("pause 1: resumed after"), "{report}");
    assert!(report.contains("recoveries: 1, guest frozen"), "{report}");
    let (_, metrics) = s.source.request("GET", "/metrics", None).await;
    let text = metrics
        .as_str()
        .map(str::to_owned)
        .unwrap_or(metrics.to_string());
    assert!(
        text.contains("migproxy_postcopy_recoveries_total 1"),
        "{text}"
    );
}

/// The recovery events of migration `id` on `daemon`, in order, until it ends.
fn recovery_events(
    daemon: &common::process::DaemonProcess,
    id: &'static str,
) -> tokio::task::JoinHandle<Vec<String>> {
    use migproxy::client::{Client, Received};
    use migproxy::daemon::migration::view::EventKind;
    let client = Client::new(&daemon.api);
    tokio::spawn(async move {
        let mut events = client.events(Some(id)).await.unwrap();
        let mut seen = Vec::new();
        while let Ok(Some(Received::Event(event))) = events.next().await {
            match event.kind {
                EventKind::Paused { pause, .. } => seen.push(format!("paused {pause}")),
                EventKind::Recovering { pause } => seen.push(format!("recovering {pause}")),
                EventKind::Resumed { pause, frozen_ms } => {
                    assert!(frozen_ms > 0, "{event:?}");
                    seen.push(format!("resumed {pause}"));
                }
                EventKind::State { state, .. } if state.is_final() => break,
                _ => {}
            }
        }
        seen
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_broken_twice_recovers_twice() {
    let mut s = in_postcopy("pc2", 512, json!({})).await;
    let events = [&s.source, &s.destination].map(|d| recovery_events(d, "pc2"));
    cut_for(&s, "pc2", Duration::from_secs(8)).await;
    s.source
        .wait_for("pc2", "resumed", Duration::from_secs(60), |v| {
            v["recovered"] == 1 && v["state"] == "active"
        })
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    cut_for(&s, "pc2", Duration::from_secs(8)).await;
    completes_after(&mut s, "pc2", 2, Duration::from_secs(3)).await;
    let expected = [
        "paused 1",
        "recovering 1",
        "resumed 1",
        "paused 2",
        "recovering 2",
        "resumed 2",
    ];
    for events in events {
        let seen = tokio::time::timeout(Duration::from_secs(10), events)
            .await
            .expect("the event stream ends with the migration")
            .unwrap();
        assert_eq!(seen, expected, "both hosts announce each step");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_never_restored_fails_at_the_recover_timeout_saying_what_is_left() {
    let s = in_postcopy("pc3", 256, json!({"recover_timeout": 6})).await;
    let cut = Instant::now();
    hosts(&s).blackhole_b();
    for daemon in [&s.source, &s.destination] {
        let view = daemon.wait_final("pc3", Duration::from_secs(30)).await;
        assert_eq!(view["state"], "failed", "{view}");
        let message = view["error"]["message"].as_str().unwrap();
        assert!(message.contains("recover_timeout"), "{message}");
        assert!(message.contains("paused on the destination"), "{message}");
        assert!(message.contains("migrate-recover"), "{message}");
        assert_eq!(view["recovered"], 0, "{view}");
        eprintln!("{} failed after {:?}", view["direction"], cut.elapsed());
    }
    // Nobody touched QEMU: both wait, paused, for a person.
    let mut s = s;
    for vm in [&mut s.src_vm, &mut s.dst_vm] {
        let info = vm.execute("query-migrate", Value::Null).await;
        assert_eq!(info["status"], "postcopy-paused", "{info}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_while_paused_cancels_both_hosts_and_says_where_the_guest_is() {
    let mut s = in_postcopy("pc4", 256, json!({})).await;
    hosts(&s).blackhole_b();
    both_paused(&s, "pc4").await;
    let (status, answer) = s
        .source
        .request("POST", "/v1/migrations/pc4/cancel", None)
        .await;
    assert_eq!(status, 200, "{answer}");
    let view = s.source.wait_final("pc4", Duration::from_secs(5)).await;
    assert_eq!(view["state"], "cancelled", "{view}");
    let verdict = view["verdict"].as_str().unwrap_or_default();
    assert!(verdict.contains("paused on the destination"), "{view}");
    // The destination hears of it once the link is back.
    hosts(&s).restore_b();
    let view = s
        .destination
        .wait_final("pc4", Duration::from_secs(30))
        .await;
    assert_eq!(view["state"], "cancelled", "{view}");
    assert_eq!(view["cancelled_by"], "source", "{view}");
    for vm in [&mut s.src_vm, &mut s.dst_vm] {
        let info = vm.execute("query-migrate", Value::Null).await;
        assert_eq!(
            info["status"], "postcopy-paused",
            "left for a person: {info}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_recovery_a_break_in_postcopy_fails_as_before() {
    let s = in_postcopy("pc5", 256, json!({"recoverable": false})).await;
    hosts(&s).blackhole_b();
    for daemon in [&s.source, &s.destination] {
        let view = daemon.wait_final("pc5", Duration::from_secs(20)).await;
        assert_eq!(view["state"], "failed", "{view}");
        assert_eq!(view["recoverable"], false, "{view}");
        assert_eq!(view["error"]["leg"], "peer", "{view}");
        assert!(view["recoveries"].as_array().unwrap().is_empty(), "{view}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_kernel_path_qemu_recovers_on_a_new_connection_handed_over() {
    let mut s = in_postcopy("pc6", 512, json!({"data_path": "kernel"})).await;
    cut_for(&s, "pc6", Duration::from_secs(10)).await;
    completes_after(&mut s, "pc6", 1, Duration::from_secs(3)).await;
    for daemon in [&s.source, &s.destination] {
        let (_, view) = daemon.request("GET", "/v1/migrations/pc6", None).await;
        assert_eq!(view["data_path"], "kernel", "{view}");
        let channels = view["channels"].as_array().unwrap();
        assert_eq!(channels.len(), 2, "one connection per epoch: {view}");
        assert_eq!(channels[1]["state"], "completed", "{view}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_daemon_restarted_while_paused_is_reported_at_once_by_the_source() {
    use common::process::DaemonProcess;
    let mut s = in_postcopy("pc7", 256, json!({})).await;
    hosts(&s).blackhole_b();
    let [source, _] = both_paused(&s, "pc7").await;
    // The destination daemon dies and a new one takes its address: it never heard of pc7.
    let address = source["peer"].as_str().unwrap().to_owned();
    s.destination.child.kill().await.unwrap();
    let _ = s.destination.child.wait().await;
    let netns = hosts(&s).b.clone();
    let args = ["--peer-timeout", "3", "--resume-timeout", "0"];
    let _restarted =
        DaemonProcess::start(s.dir.path(), "dstd2", &address, Some(&netns), &args).await;
    hosts(&s).restore_b();
    let view = s.source.wait_final("pc7", Duration::from_secs(30)).await;
    assert_eq!(view["state"], "failed", "{view}");
    let message = view["error"]["message"].as_str().unwrap();
    assert!(message.contains("refused to resume"), "{message}");
    assert!(message.contains("no incoming migration"), "{message}");
    assert!(message.contains("migrate-recover"), "{message}");
    let info = s.src_vm.execute("query-migrate", Value::Null).await;
    assert_eq!(
        info["status"], "postcopy-paused",
        "left for a person: {info}"
    );
}
