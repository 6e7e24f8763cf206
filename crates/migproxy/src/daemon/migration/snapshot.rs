//! A migration as the API shows it: one consistent snapshot of the lifecycle and the live
//! counters, and the throughput a reader sees.

use std::time::{Duration, Instant};

use super::state::{Core, Recovery};
use super::view::{self, Snapshot};
use super::{Inner, Migration, State, channels};
use crate::daemon::attribution;
use crate::daemon::names::{HostName, Link};
use crate::relay::ByteCounts;

impl Migration {
    /// A consistent view for the API.
    pub fn snapshot(&self) -> Snapshot {
        let mut inner = self.lock();
        // Live counters move while they are read: read each once, and add those up.
        let mut channels = inner.live.rows(inner.core.channels());
        self.shown_channels(&mut channels);
        let total = channels
            .iter()
            .fold(ByteCounts::default(), |acc, c| channels::add(acc, c.bytes));
        let throughput = self.throughput(&mut inner, total);
        let state = self.shown_state(inner.core.state());
        let elapsed = inner.ended.unwrap_or_else(Instant::now) - self.started;
        Snapshot {
            id: self.spec.id.clone(),
            direction: self.spec.role,
            state,
            phase: inner.core.phase().name().to_owned(),
            peer: self.spec.peer.clone(),
            local: self.local_uri(),
            recoverable: self.spec.recoverable,
            data_path: self.data_path().unwrap_or(&self.spec.data_path_here).path,
            data_path_reason: match self.data_path() {
                Some(choice) => choice.reason.clone(),
                None => format!(
                    "{} (not settled with the peer yet)",
                    self.spec.data_path_here.reason
                ),
            },
            group: self.spec.group.clone(),
            link: Link::of(self.spec.tls),
            bytes: total,
            channels,
            error: inner.core.error().map(attribution::Report::from),
            pauses: inner
                .core
                .pauses()
                .iter()
                .map(attribution::Report::from)
                .collect(),
            recoveries: recoveries(&inner.core),
            recovered: inner.core.recoveries().recovered(),
            frozen_ms: inner
                .core
                .recoveries()
                .frozen_ms(elapsed.as_millis() as u64),
            recover_timeout_ms: self.spec.recover_timeout.map(|t| t.as_millis() as u64),
            resume: self.resume_view(),
            cancelled_by: inner.core.cancelled_by().map(HostName::from),
            verdict: view::verdict(state, inner.core.cancelled_paused()),
            created_at: view::unix_seconds(Some(self.created)).unwrap_or_default(),
            elapsed_ms: elapsed.as_millis() as u64,
            throughput,
            timestamps: view::Timestamps {
                created: view::unix_seconds(Some(self.created)),
                active: view::unix_seconds(inner.activated),
                paused: view::unix_seconds(inner.paused),
                ended: view::unix_seconds(inner.ended_at),
            },
            qemu: self
                .spec
                .qemu
                .as_ref()
                .zip(inner.qemu.clone())
                .map(|(settings, report)| view::QemuView {
                    settings: settings.clone(),
                    report,
                }),
            peer_view: view::PeerView {
                ended_late: self.late_end(),
                ..peer_view(&inner.core)
            },
        }
    }

    /// Throughput now and on average. Samples move on at most once a second, whoever reads:
    /// readers polling at least once a second (the CLI's live line) see the rate over the
    /// last one to two seconds, and no reader shortens another's window; a rarer reader sees
    /// the rate since the read before.
    fn throughput(&self, inner: &mut Inner, total: ByteCounts) -> view::Throughput {
        let now = Instant::now();
        if now.duration_since(inner.rate_samples[1].0) >= Duration::from_secs(1) {
            inner.rate_samples = [inner.rate_samples[1], (now, total.to_destination)];
        }
        let (since, then) = inner.rate_samples[0];
        let window = now.duration_since(since).as_secs_f64();
        let current = if inner.core.state() == State::Active && window > 0.0 {
            (total.to_destination.saturating_sub(then) as f64 / window) as u64
        } else {
            0
        };
        let elapsed = inner.ended.unwrap_or(now).duration_since(self.started);
        let average = match elapsed.as_secs_f64() {
            secs if secs > 0.0 => (total.to_destination as f64 / secs) as u64,
            _ => 0,
        };
        view::Throughput {
            current_bytes_per_second: current,
            average_bytes_per_second: average,
        }
    }
}

fn recoveries(core: &Core) -> Vec<view::RecoveryView> {
    let view = |r: &Recovery| view::RecoveryView {
        cause: attribution::Report::from(&r.cause),
        paused_at_ms: r.paused_at_ms,
        frozen_ms: r.frozen_ms,
        failed_attempts: r.failed_attempts,
    };
    core.recoveries().all().iter().map(view).collect()
}

fn peer_view(core: &Core) -> view::PeerView {
    let channels = core
        .channels()
        .iter()
        .enumerate()
        .filter_map(|(index, c)| {
            c.peer_end.map(|(end, bytes)| view::PeerChannel {
                index: index as u32,
                end: end.into(),
                bytes: channels::counts(bytes),
            })
        })
        .collect();
    view::PeerView {
        channels,
        done: core.peer_done().map(|done| view::PeerDone {
            channels: done.channels,
            bytes: channels::counts(done.bytes),
            verdict: done.verdict.into(),
        }),
        ended_late: None,
    }
}

impl Migration {
    /// The resumable channels' view, once both daemons agreed on them.
    fn resume_view(&self) -> Option<view::ResumeView> {
        let timeout = self.spec.resume_timeout?;
        let outages = self.resumable.outages();
        let link_down = self.resumable.link_down().map(|d| d.since.elapsed());
        let agreed = self.resumable.on() || outages.resumptions > 0;
        agreed.then(|| view::ResumeView {
            timeout_ms: timeout.as_millis() as u64,
            resumptions: outages.resumptions,
            lost_ms: outages.lost_until_now().as_millis() as u64,
            replayed: outages.replayed,
            resuming: outages.open.keys().copied().collect(),
            link_outages: outages.link_outages,
            link_lost_ms: (outages.link_lost + link_down.unwrap_or_default()).as_millis() as u64,
            link_down_ms: link_down.map(|d| d.as_millis() as u64),
            down_ms: outages
                .open
                .values()
                .map(|since| since.elapsed().as_millis() as u64)
                .max(),
        })
    }
}
