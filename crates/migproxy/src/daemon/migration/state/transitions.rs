//! The transition function: [`Core::step`] takes one [`Input`] in the current phase to the
//! next phase and its [`Effect`]s. Every guard of the lifecycle is here, one function per
//! input; [`TRANSITIONS`](super::TRANSITIONS) lists the phase changes they make.

use migproxy_proto::{Attribution, ChannelEnd, Control, Host, Totals, Verdict};

use super::*;
use crate::daemon::attribution;
use crate::daemon::qemu::report::{CancelRefused, Status};

/// Causes kept in `pauses`, at most.
const MAX_PAUSES_LISTED: usize = 64;

impl Core {
    /// Takes one input; returns what to do, or why it was not taken (the phase is then
    /// unchanged).
    pub fn step(&mut self, input: Input, now: Now) -> Steps {
        if let Phase::Ended { state } = self.phase
            && !matches!(
                input,
                Input::Running { .. }
                    | Input::Abandoned { .. }
                    | Input::SetupFailed { .. }
                    | Input::Ended { .. }
            )
        {
            return Err(Refusal::Phase(state.name()));
        }
        self.now = now;
        match input {
            Input::Attach { first_channel } => self.attach(first_channel, now),
            Input::Open { index } => self.open(index),
            Input::Connected { epoch, index } => self.connected(epoch, index),
            Input::Running { index } => self.running(index),
            Input::Abandoned { index } => self.abandoned(index),
            Input::SetupFailed {
                epoch,
                index,
                blame,
                wait,
            } => self.setup_failed(epoch, index, blame, wait),
            Input::Ended {
                epoch,
                index,
                end,
                bytes,
                failure,
                return_path,
            } => self.ended(epoch, index, end, bytes, failure, return_path, now),
            Input::Failure { epoch, blame, wait } => self.failure(epoch, blame, wait),
            Input::GraceOver { epoch, blame } => self.grace_over(epoch, blame),
            Input::AskCancel { by } => self.ask_cancel(by).map(|(effects, _)| effects),
            Input::Cancel { by } => self.cancel(by),
            Input::CancelWaitOver => self.cancel_wait_over(),
            Input::LinkClosed { epoch } => self.link_closed(epoch),
            Input::TtlOver => self.ttl_over(),
            Input::FirstChannelOver { epoch, limit_ms } => {
                self.first_channel_over(epoch, limit_ms, now)
            }
            Input::Peer { epoch, control } => self.peer(epoch, control),
            Input::Qemu { status } => self.qemu(status),
            Input::QemuFollowing => {
                self.qemu_following = true;
                Ok(Vec::new())
            }
            Input::ResumeFailed { blame } => self.resume_failed(blame),
            Input::ResumeRefused { blame } => self.resume_refused(blame),
            Input::RecoverOver { pause, limit_ms } => self.recover_over(pause, limit_ms),
        }
    }

    /// As [`Input::AskCancel`], also saying which route the cancel takes.
    pub fn ask(&mut self, by: Host) -> Result<(Vec<Effect>, CancelRoute), Refusal> {
        if let Phase::Ended { state } = self.phase {
            return Err(Refusal::Phase(state.name()));
        }
        self.ask_cancel(by)
    }

    fn attach(&mut self, first: u32, now: Now) -> Steps {
        let known = self.channels.len() as u32;
        // A resume names the first channel after every one this host has seen, and not
        // absurdly far beyond (each index up to it gets a slot).
        let plausible = first >= known && first - known <= self.config.max_channels;
        let recoverable = self.config.recoverable && plausible;
        let mut effects = Vec::new();
        match self.phase {
            Phase::Pending if first == 0 => {}
            Phase::Paused if recoverable => {}
            // The source paused and came back before this host noticed the break (a
            // blackholed link is only detected by silence): the old epoch is over.
            // (The same first channel again: the source's epoch broke before any channel,
            // and so has this host's, which carried nothing either.)
            Phase::Attached | Phase::Active | Phase::Completing
                if recoverable
                    && (first > self.epoch_start
                        || self.channels.len() as u32 <= self.epoch_start) =>
            {
                let blame = attribution::peer_link(
                    self.host(),
                    migproxy_proto::Op::Read,
                    None,
                    "the source daemon resumed on a new control link".to_owned(),
                    now.bytes,
                    now.elapsed_ms,
                );
                effects.extend(self.pause(blame));
            }
            Phase::Attached | Phase::Active | Phase::Completing => {
                return Err(Refusal::Attached);
            }
            phase => return Err(Refusal::Phase(phase.name())),
        }
        let resuming = self.phase == Phase::Paused;
        self.link = true;
        self.epoch += 1;
        self.epoch_start = first;
        self.local_done = None;
        self.peer_done = None;
        self.return_path = ReturnPath::NotWatched;
        if resuming {
            self.error = None;
            let pause = self.recoveries.all().len() as u32;
            effects.push(Effect::Announce(Note::Recovering { pause }));
        }
        self.phase = Phase::Attached;
        effects.push(Effect::BeginEpoch {
            epoch: self.epoch,
            first_channel: first,
        });
        effects.push(Effect::Release { index: first });
        // A link brought back after a pause waits for QEMU's recovery, however long the
        // person (or libvirt) takes: the recover timeout bounds it, not this deadline.
        if !resuming {
            effects.push(Effect::AwaitFirstChannel);
        }
        Ok(effects)
    }

    fn open(&mut self, index: u32) -> Steps {
        if !self.phase.is_live() {
            return Err(Refusal::Phase(self.phase.name()));
        }
        let max = self.config.max_channels;
        if index < self.epoch_start || index - self.epoch_start >= max {
            return Err(Refusal::TooMany { index, max });
        }
        while self.channels.len() <= index as usize {
            self.channels.push(Channel::new());
        }
        let channel = &mut self.channels[index as usize];
        if channel.claimed {
            return Err(Refusal::Duplicate { index });
        }
        channel.claimed = true;
        // A new channel means this host is not done after all.
        self.local_done = None;
        if matches!(self.phase, Phase::Attached | Phase::Completing) {
            self.phase = Phase::Active;
        }
        Ok(Vec::new())
    }

    fn connected(&mut self, epoch: Epoch, index: u32) -> Steps {
        if !self.is_current(epoch) {
            return Err(Refusal::Stale);
        }
        Ok(vec![Effect::Release {
            index: index.saturating_add(1),
        }])
    }

    fn running(&mut self, index: u32) -> Steps {
        let channel = self.channel_opening(index)?;
        channel.state = ChannelState::Active;
        let mut effects = vec![Effect::Send(Control::ChannelOpened { channel: index })];
        // Without QEMU's word, the resumed epoch's main stream running is the recovery.
        if !self.config.qemu && index == self.epoch_start {
            effects.extend(self.resumed());
        }
        Ok(effects)
    }

    fn channel_opening(&mut self, index: u32) -> Result<&mut Channel, Refusal> {
        self.channels
            .get_mut(index as usize)
            .filter(|c| c.state == ChannelState::Opening)
            .ok_or(Refusal::Stale)
    }

    fn abandoned(&mut self, index: u32) -> Steps {
        self.channel_opening(index)?.state = ChannelState::Cancelled;
        Ok(Vec::new())
    }

    /// A channel that could not be set up failed, and with it the epoch; if the epoch has
    /// ended meanwhile (cancel, pause, another failure), it was only abandoned.
    fn setup_failed(&mut self, epoch: Epoch, index: u32, blame: Attribution, wait: bool) -> Steps {
        let current = self.is_current(epoch) && !self.is_cancelling();
        self.channel_opening(index)?.state = match current {
            true => ChannelState::Failed,
            false => ChannelState::Cancelled,
        };
        if !current {
            return Ok(Vec::new());
        }
        self.failure(epoch, blame, wait)
    }

    fn is_cancelling(&self) -> bool {
        matches!(self.phase, Phase::Cancelling { .. })
    }

    #[allow(clippy::too_many_arguments)]
    fn ended(
        &mut self,
        epoch: Epoch,
        index: u32,
        mut end: ChannelEnd,
        bytes: Totals,
        failure: Option<(Attribution, bool)>,
        return_path: ReturnPath,
        now: Now,
    ) -> Steps {
        // Torn down by the source while it carries out this host's cancel.
        if end == ChannelEnd::Failed && self.is_cancelling() {
            end = ChannelEnd::Cancelled;
        }
        let Some(channel) = self.channels.get_mut(index as usize) else {
            return Err(Refusal::Stale);
        };
        channel.state = ChannelState::of(end);
        channel.bytes = bytes;
        let mut effects = vec![Effect::Send(Control::ChannelClosed {
            channel: index,
            end,
            bytes,
        })];
        if self.phase.state().is_final() || epoch != self.epoch {
            return Ok(effects);
        }
        if index == self.epoch_start && end == ChannelEnd::Completed {
            self.return_path = return_path;
        }
        let step = match (end, failure) {
            (ChannelEnd::Completed, _) => match self.unfinished(index, bytes, now) {
                Some((blame, wait)) => self.failure(epoch, blame, wait),
                None => self.check_done(),
            },
            (ChannelEnd::Failed, Some((blame, wait))) => self.failure(epoch, blame, wait),
            _ => Ok(Vec::new()),
        };
        effects.extend(step.unwrap_or_default());
        Ok(effects)
    }

    /// A main channel that closed cleanly without the destination QEMU's `SHUT`, where one
    /// was to come: QEMU did not finish. A recoverable migration pauses at once (postcopy
    /// paused). Otherwise the host whose QEMU it is about concludes, and the other waits for
    /// its word, so that both tell one story.
    fn unfinished(&self, index: u32, bytes: Totals, now: Now) -> Option<(Attribution, bool)> {
        if index != self.epoch_start || self.config.qemu {
            return None;
        }
        let status = match (self.return_path, self.config.recoverable) {
            (ReturnPath::Shut(0) | ReturnPath::Unknown | ReturnPath::NotWatched, _) => {
                return None;
            }
            (ReturnPath::Silent, false) => return None,
            (ReturnPath::Shut(status), _) => Some(status),
            (ReturnPath::Silent | ReturnPath::Unfinished, _) => None,
        };
        let recoverable = self.config.recoverable;
        let blame = attribution::unfinished(index, bytes, status, recoverable, now.elapsed_ms);
        let wait = !recoverable && blame.host != self.host();
        Some((blame, wait))
    }

    fn failure(&mut self, epoch: Epoch, blame: Attribution, wait: bool) -> Steps {
        let pending = self.phase == Phase::Pending;
        if !pending && !self.is_current(epoch) {
            return Err(Refusal::Stale);
        }
        if self.is_cancelling() {
            // The cancel's echo: the source tears its side down.
            return Err(Refusal::Phase("cancelling"));
        }
        if wait && !pending {
            return Ok(vec![Effect::AwaitExplanation { epoch, blame }]);
        }
        Ok(self.fail(blame, true))
    }

    fn grace_over(&mut self, epoch: Epoch, blame: Attribution) -> Steps {
        if !self.is_current(epoch) {
            return Err(Refusal::Stale);
        }
        if self.is_cancelling() {
            return Err(Refusal::Phase("cancelling"));
        }
        Ok(self.fail(blame, true))
    }

    /// Ends the current epoch with a failure: a recoverable migration pauses where it can
    /// be recovered, any other fails.
    fn fail(&mut self, blame: Attribution, tell_peer: bool) -> Vec<Effect> {
        let mut effects = Vec::new();
        let pauses = self.pauses_for(&blame);
        if tell_peer {
            // What this host concluded, for the peer to follow (its own view of QEMU's
            // status may be a poll behind, around the switch to postcopy): a pause here is
            // `Failed`, which pauses a recoverable peer; a failure is for good.
            effects.push(Effect::Send(match pauses {
                true => Control::Failed(blame.clone()),
                false => Control::GaveUp(blame.clone()),
            }));
        }
        if pauses {
            effects.extend(self.pause(blame));
        } else {
            self.error = Some(blame);
            effects.extend(self.finish(State::Failed));
        }
        effects
    }

    /// Whether a failure pauses rather than fails. Without QMP a recoverable migration
    /// always pauses: only the person driving QEMU knows whether it can be recovered. With
    /// QMP only a break of the transport pauses, and only while QEMU runs postcopy (in
    /// precopy the guest still runs on the source: the migration fails as any other; a dead
    /// QEMU cannot be recovered at all).
    fn pauses_for(&self, blame: &Attribution) -> bool {
        if !self.config.recoverable || self.phase == Phase::Pending {
            return false;
        }
        !self.config.qemu || (blame.leg == migproxy_proto::Leg::Peer && self.qemu.is_postcopy())
    }

    fn pause(&mut self, blame: Attribution) -> Vec<Effect> {
        self.error = Some(blame.clone());
        self.pauses.push(blame.clone());
        self.paused += 1;
        self.link = false;
        self.phase = Phase::Paused;
        let mut effects = vec![Effect::EndEpoch];
        if let Some(pause) = self.recoveries.paused(blame.clone(), self.now.elapsed_ms) {
            effects.push(Effect::Announce(Note::Paused {
                pause,
                cause: blame,
            }));
            if let Some(limit_ms) = self.config.recover_timeout_ms {
                effects.push(Effect::AwaitRecovery { pause, limit_ms });
            }
        }
        effects
    }

    /// The open pause is over: the guest runs again.
    fn resumed(&mut self) -> Option<Effect> {
        let frozen_ms = self.recoveries.resumed(self.now.elapsed_ms)?;
        let pause = self.recoveries.all().len() as u32;
        Some(Effect::Announce(Note::Resumed { pause, frozen_ms }))
    }

    /// The recover timeout of pause `pause` ran out: still not recovered, the migration
    /// fails for good, saying where the guest is and what a person can still do.
    fn recover_over(&mut self, pause: u32, limit_ms: u64) -> Steps {
        if !self.recoveries.is_open(pause) {
            return Err(Refusal::Stale);
        }
        let cause = self.recoveries.open().map(|r| r.cause.message.clone());
        let message = attribution::recovery_timed_out(limit_ms, &cause.unwrap_or_default());
        let (bytes, elapsed_ms) = (self.now.bytes, self.now.elapsed_ms);
        let op = migproxy_proto::Op::Timeout;
        let blame = attribution::peer_link(self.host(), op, None, message, bytes, elapsed_ms);
        Ok(self.fail_for_good(blame))
    }

    /// The peer (or QEMU) refused to resume: waiting longer cannot help.
    fn resume_refused(&mut self, blame: Attribution) -> Steps {
        if self.phase != Phase::Paused && self.recoveries.open().is_none() {
            return Err(Refusal::Phase(self.phase.name()));
        }
        Ok(self.fail_for_good(blame))
    }

    fn finish(&mut self, state: State) -> Vec<Effect> {
        self.link = false;
        self.phase = Phase::Ended { state };
        vec![Effect::EndEpoch, Effect::Stop]
    }

    fn resume_failed(&mut self, blame: Attribution) -> Steps {
        if self.phase != Phase::Paused {
            return Err(Refusal::Phase(self.phase.name()));
        }
        self.error = Some(blame.clone());
        // The same cause again (a dial retried every few seconds) is counted, not listed.
        // A long outage by hand may alternate causes for hours: the list is bounded (the
        // attempts are still counted, and `error` holds the latest).
        let last = self.pauses.last().map(|p| (&p.message, &p.errno));
        if last != Some((&blame.message, &blame.errno)) && self.pauses.len() < MAX_PAUSES_LISTED {
            self.pauses.push(blame);
        }
        self.recoveries.attempt_failed();
        Ok(Vec::new())
    }

    /// Chooses how a cancel is carried out. A cancel asked on this host is refused once the
    /// guest may already be the destination's.
    fn ask_cancel(&mut self, by: Host) -> Result<(Vec<Effect>, CancelRoute), Refusal> {
        let here = by == self.host();
        // Paused, or the link back but QEMU not resumed yet (recovering).
        if self.phase == Phase::Paused || self.recoveries.open().is_some() {
            // Nothing moves and no link is up: the cancel only stops the recovery; both
            // QEMUs stay paused as they are, for a person to recover or give up.
            return self.cancel(by).map(|effects| (effects, CancelRoute::Now));
        }
        if here {
            if self.qemu.is_postcopy() {
                return Err(CancelRefused::Postcopy.into());
            }
            if self.qemu == Status::Completed {
                return Err(CancelRefused::Completed.into());
            }
            if self.config.role == Role::Incoming && self.config.qemu && self.config.postcopy {
                return Err(CancelRefused::AskTheSource.into());
            }
        }
        let ask_source = here
            && self.config.role == Role::Incoming
            && self.phase.is_live()
            && self.link
            && self.local_done.is_none();
        if ask_source {
            let mut effects = Vec::new();
            if !self.is_cancelling() {
                effects.push(Effect::Send(Control::Cancel { by }));
                effects.push(Effect::AwaitSourceCancel);
                self.phase = Phase::Cancelling { by: by.into() };
            }
            return Ok((effects, CancelRoute::AskedTheSource));
        }
        if self.qemu_following {
            return Ok((vec![Effect::CancelQemu { by }], CancelRoute::ThroughQemu));
        }
        self.cancel(by).map(|effects| (effects, CancelRoute::Now))
    }

    /// Cancels on behalf of `by`; tells the peer when the cancel is this host's.
    fn cancel(&mut self, by: Host) -> Steps {
        let here = by == self.host();
        // Once this host has told the peer it is done, the peer may already have completed:
        // a cancel now would leave the hosts with different stories. Once QEMU has completed
        // here, the guest is the destination's.
        if here && self.local_done.is_some() {
            return Err(CancelRefused::Completing.into());
        }
        if here && self.qemu == Status::Completed {
            return Err(CancelRefused::Completed.into());
        }
        let mut effects = Vec::new();
        if here && !self.is_cancelling() {
            effects.push(Effect::Send(Control::Cancel { by }));
        }
        effects.extend(self.finish_cancel(by));
        Ok(effects)
    }

    fn finish_cancel(&mut self, by: Host) -> Vec<Effect> {
        self.cancelled_by = Some(by);
        self.finish(State::Cancelled)
    }

    fn cancel_wait_over(&mut self) -> Steps {
        match self.phase {
            // This host or the peer has said Done: the source may have completed; its Done
            // (or the link's end) decides, not the clock.
            Phase::Cancelling { .. } if self.local_done.is_some() || self.peer_done.is_some() => {
                Err(Refusal::Phase("completing"))
            }
            Phase::Cancelling { by } => Ok(self.finish_cancel(by.into())),
            phase => Err(Refusal::Phase(phase.name())),
        }
    }

    /// The control link of `epoch` ended. It ends a cancel this host asked the source for:
    /// the source has ended its side.
    fn link_closed(&mut self, epoch: Epoch) -> Steps {
        match self.phase {
            Phase::Cancelling { by } if epoch == self.epoch => Ok(self.finish_cancel(by.into())),
            _ => Err(Refusal::Phase(self.phase.name())),
        }
    }

    fn ttl_over(&mut self) -> Steps {
        if self.phase != Phase::Pending {
            return Err(Refusal::Phase(self.phase.name()));
        }
        Ok(self.finish(State::Expired))
    }

    /// An attached migration that never saw a channel would hold its slot for ever.
    fn first_channel_over(&mut self, epoch: Epoch, limit_ms: u64, now: Now) -> Steps {
        if epoch != self.epoch {
            return Err(Refusal::Stale);
        }
        if self.phase != Phase::Attached {
            return Err(Refusal::Phase(self.phase.name()));
        }
        let blame = attribution::no_first_channel(limit_ms, now.elapsed_ms);
        // Nothing was carried in this epoch: there is nothing to recover, and a pause would
        // hold the slot for ever.
        Ok(self.fail_for_good(blame))
    }

    /// Fails without pausing (nothing was ever carried in this epoch to recover, or the
    /// recovery is over), and tells the peer so: it fails too, whatever it would pause for.
    fn fail_for_good(&mut self, blame: Attribution) -> Vec<Effect> {
        let mut effects = vec![Effect::Send(Control::GaveUp(blame.clone()))];
        self.error = Some(blame);
        effects.extend(self.finish(State::Failed));
        effects
    }

    /// The peer's failure; `may_pause`: a plain failure, which may pause a recoverable
    /// migration here, not one for good.
    fn peer_failed(&mut self, epoch: Epoch, blame: Attribution, may_pause: bool) -> Steps {
        if !self.is_current(epoch) && self.phase != Phase::Pending {
            return Err(Refusal::Stale);
        }
        match self.phase {
            // A recoverable source paused before it saw this host's cancel: the operator
            // asked to cancel, and the epoch is gone anyway.
            Phase::Cancelling { by } if self.config.recoverable => {
                Ok(self.finish_cancel(by.into()))
            }
            // The peer paused: so does a recoverable migration here, whatever this host has
            // seen of QEMU so far (the peer's QEMU may have switched to postcopy a poll
            // before this host's saw it). (The source failed before it saw this host's
            // cancel: its story is the one both hosts tell.)
            _ if may_pause && self.config.recoverable && self.phase != Phase::Pending => {
                Ok(self.pause(blame))
            }
            _ => {
                self.error = Some(blame);
                Ok(self.finish(State::Failed))
            }
        }
    }

    fn peer(&mut self, epoch: Epoch, control: Control) -> Steps {
        if epoch != self.epoch {
            return Err(Refusal::Stale);
        }
        match control {
            Control::Heartbeat | Control::ChannelOpened { .. } => Ok(Vec::new()),
            // Resumable channels' and their control link's own: the daemon handles them
            // before the lifecycle (`resuming`, `control`).
            Control::Progress { .. }
            | Control::Broken { .. }
            | Control::Received { .. }
            | Control::Hurry { .. }
            | Control::Parked => Ok(Vec::new()),
            Control::ChannelClosed {
                channel,
                end,
                bytes,
            } => {
                if let Some(c) = self.channels.get_mut(channel as usize) {
                    c.peer_end = Some((end, bytes));
                }
                Ok(Vec::new())
            }
            // GaveUp: the peer failed for good (its recover timeout, a refused resume), and a
            // pause here would wait for a recovery nobody will make.
            Control::Failed(blame) => self.peer_failed(epoch, blame, true),
            Control::GaveUp(blame) => self.peer_failed(epoch, blame, false),
            // Once this host has said Done (or its QEMU completed), the peer will hear that
            // Done and complete too: a cancel crossing it changes nothing. A Done of an epoch
            // that paused since is no such promise (the source's cancel may be told while
            // paused, on a hello that attaches nothing).
            Control::Cancel { .. }
                if (self.local_done.is_some() && self.phase != Phase::Paused)
                    || self.qemu == Status::Completed =>
            {
                Err(Refusal::Cancel(CancelRefused::Completing))
            }
            Control::Cancel { by } if self.qemu_following => Ok(vec![Effect::CancelQemu { by }]),
            Control::Cancel { by } => self.cancel(by),
            Control::Done { .. } if !self.is_current(epoch) => Err(Refusal::Stale),
            Control::Done {
                channels,
                bytes,
                verdict,
            } => {
                self.peer_done = Some(Done {
                    channels,
                    bytes,
                    verdict,
                });
                self.check_done()
            }
        }
    }

    fn qemu(&mut self, status: Status) -> Steps {
        let completed = status == Status::Completed && self.qemu != Status::Completed;
        // QEMU back in postcopy after a pause, on the resumed epoch — or already completed,
        // when both came within one look: the recovery is done.
        let back = matches!(status, Status::PostcopyActive | Status::Completed);
        let resumed = back && self.phase.is_live();
        self.qemu = status;
        let mut effects: Vec<Effect> = match resumed {
            true => self.resumed().into_iter().collect(),
            false => Vec::new(),
        };
        if completed {
            effects.extend(self.check_done()?);
        }
        Ok(effects)
    }

    /// What this host holds as evidence that QEMU finished.
    fn verdict(&self) -> Verdict {
        if self.config.qemu {
            Verdict::Qemu
        } else if self.return_path == ReturnPath::Shut(0) {
            Verdict::ReturnPath
        } else {
            Verdict::Unknown
        }
    }

    /// When every channel of the epoch has completed here, says so to the peer; when the
    /// peer has said the same with equal counts, the migration has ended.
    fn check_done(&mut self) -> Steps {
        let start = (self.epoch_start as usize).min(self.channels.len());
        if !self.phase.is_live() || self.channels.len() == start {
            return Ok(Vec::new());
        }
        let mut effects: Vec<Effect> = self.say_done(start).into_iter().collect();
        if let Some(blame) = self.channel_count_disagreement() {
            effects.extend(self.fail_for_good(blame));
            return Ok(effects);
        }
        effects.extend(self.compare_dones());
        Ok(effects)
    }

    /// The `Done` this host sends once, when every channel of the epoch (from `start`) has
    /// completed and, with QEMU driven here, QEMU has said so too.
    fn say_done(&mut self, start: usize) -> Option<Effect> {
        let epoch = &self.channels[start..];
        let qemu_done = !self.config.qemu || self.qemu == Status::Completed;
        let all_clean = epoch.iter().all(|c| c.state == ChannelState::Completed);
        if self.local_done.is_some() || !qemu_done || !all_clean {
            return None;
        }
        let done = Done {
            channels: epoch.len() as u32,
            bytes: sum(epoch),
            verdict: self.verdict(),
        };
        self.local_done = Some(done);
        // Said: what is left is the peer's word (or a failure), not more bytes.
        if self.phase == Phase::Active {
            self.phase = Phase::Completing;
        }
        Some(Effect::Send(Control::Done {
            channels: done.channels,
            bytes: done.bytes,
            verdict: done.verdict,
        }))
    }

    /// Both hosts' `Done`: equal counts end the migration, with the weaker of the two
    /// verdicts; equal channels with different bytes mean data was lost between the daemons.
    fn compare_dones(&mut self) -> Vec<Effect> {
        match (self.local_done, self.peer_done) {
            (Some(local), Some(peer))
                if (local.channels, local.bytes) == (peer.channels, peer.bytes) =>
            {
                let state = match (local.verdict, peer.verdict) {
                    (Verdict::Unknown, _) | (_, Verdict::Unknown) => State::Transferred,
                    _ => State::Completed,
                };
                self.finish(state)
            }
            (Some(local), Some(peer)) if local.channels == peer.channels => {
                let (source, destination) = self.as_source_destination(local.bytes, peer.bytes);
                let first = self.first_disagreement();
                let blame = attribution::disagreement(source, destination, first);
                self.fail_for_good(blame)
            }
            // Otherwise one side has seen fewer channels so far: wait for the rest.
            _ => Vec::new(),
        }
    }

    /// The source's count is the truth (it accepts every connection QEMU opens): a
    /// destination that carried more channels than the source opened admitted a connection
    /// the source never made.
    fn channel_count_disagreement(&self) -> Option<Attribution> {
        let here = self
            .channels
            .len()
            .saturating_sub(self.epoch_start as usize) as u32;
        let (source, destination) = match (self.config.role, self.local_done, self.peer_done) {
            (Role::Incoming, _, Some(peer)) if peer.channels < here => (peer.channels, here),
            (Role::Outgoing, Some(local), Some(peer)) if peer.channels > local.channels => {
                (local.channels, peer.channels)
            }
            _ => return None,
        };
        Some(attribution::channel_count(source, destination))
    }

    /// This host's and the peer's figures, as (source's, destination's).
    fn as_source_destination(&self, local: Totals, peer: Totals) -> (Totals, Totals) {
        match self.config.role {
            Role::Outgoing => (local, peer),
            Role::Incoming => (peer, local),
        }
    }

    /// The first channel and direction (to destination first) whose count differs between
    /// this host and the peer's `ChannelClosed`, which the peer sent before its `Done`: both
    /// hosts find the same one.
    fn first_disagreement(&self) -> Option<attribution::Disagreement> {
        let start = self.epoch_start as usize;
        self.channels
            .iter()
            .enumerate()
            .skip(start)
            .find_map(|(i, channel)| {
                let (_, peer) = channel.peer_end?;
                let (source, destination) = self.as_source_destination(channel.bytes, peer);
                attribution::Disagreement::between(i as u32, source, destination)
            })
    }
}

fn sum(channels: &[Channel]) -> Totals {
    channels.iter().fold(Totals::default(), |acc, c| Totals {
        to_destination: acc.to_destination.saturating_add(c.bytes.to_destination),
        to_source: acc.to_source.saturating_add(c.bytes.to_source),
    })
}
