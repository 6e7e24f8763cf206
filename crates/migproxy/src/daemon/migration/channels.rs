//! The channel table's live half: the relay counters of channels still running, read for
//! progress, stall detection and snapshots. The lifecycle's half (claimed, state, final
//! counts, the peer's counts) is in [`super::state`].

use std::sync::Arc;

use migproxy_proto::Totals;

use super::state::Channel;
use super::view::ChannelSnapshot;
use crate::relay::{ByteCounts, Counters};

/// The live counters of each channel, by index.
#[derive(Debug, Default)]
pub struct Live {
    counters: Vec<Option<Arc<Counters>>>,
}

impl Live {
    /// Channel `index`'s relay runs with these counters.
    pub fn running(&mut self, index: u32, counters: Arc<Counters>) {
        let index = index as usize;
        if self.counters.len() <= index {
            self.counters.resize(index + 1, None);
        }
        self.counters[index] = Some(counters);
    }

    /// Channel `index`'s counts: live while it runs, as recorded once it has ended.
    pub fn bytes(&self, index: usize, channel: &Channel) -> ByteCounts {
        match self.counters.get(index) {
            Some(Some(counters)) if !channel.state.is_final() => counters.bytes(),
            _ => counts(channel.bytes),
        }
    }

    /// Every channel's counts, each read once.
    pub fn rows(&self, channels: &[Channel]) -> Vec<ChannelSnapshot> {
        channels
            .iter()
            .enumerate()
            .map(|(index, c)| ChannelSnapshot {
                index: index as u32,
                state: c.state,
                bytes: self.bytes(index, c),
            })
            .collect()
    }

    /// The sum over every channel.
    pub fn total(&self, channels: &[Channel]) -> ByteCounts {
        channels
            .iter()
            .enumerate()
            .fold(ByteCounts::default(), |acc, (i, c)| {
                add(acc, self.bytes(i, c))
            })
    }

    /// Bytes of channels still being relayed, and how many of them are running.
    pub fn running_bytes(&self, channels: &[Channel]) -> (ByteCounts, u64) {
        let mut bytes = ByteCounts::default();
        let mut running = 0;
        for (i, c) in channels.iter().enumerate() {
            if !c.state.is_final() {
                bytes = add(bytes, self.bytes(i, c));
                running += u64::from(c.state == super::state::ChannelState::Active);
            }
        }
        (bytes, running)
    }

    /// The live counters of channels still running, for the stall watch.
    pub fn running_counters(&self, channels: &[Channel]) -> Vec<(u32, Arc<Counters>)> {
        channels
            .iter()
            .enumerate()
            .filter(|(_, c)| !c.state.is_final())
            .filter_map(|(i, _)| Some((i as u32, self.counters.get(i)?.clone()?)))
            .collect()
    }
}

pub fn add(a: ByteCounts, b: ByteCounts) -> ByteCounts {
    ByteCounts {
        to_destination: a.to_destination.saturating_add(b.to_destination),
        to_source: a.to_source.saturating_add(b.to_source),
    }
}

pub fn totals(bytes: ByteCounts) -> Totals {
    Totals {
        to_destination: bytes.to_destination,
        to_source: bytes.to_source,
    }
}

pub fn counts(bytes: Totals) -> ByteCounts {
    ByteCounts {
        to_destination: bytes.to_destination,
        to_source: bytes.to_source,
    }
}
