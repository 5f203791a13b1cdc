//! The global barrier of one checkpoint attempt: a state machine with no I/O.
//!
//! It is driven the way quinn-proto drives a connection: the caller feeds it what
//! happened — [`Barrier::handle`] for a message from an agent, [`Barrier::agent_lost`]
//! for a connection that dropped, [`Barrier::handle_timeout`] when the deadline of
//! [`Barrier::poll_timeout`] passes, [`Barrier::commit_done`] once the job manifest
//! is written — and takes what to do from [`Barrier::poll`]: messages to send, the
//! commit to perform, the outcome. Time is a parameter, so a test drives a thousand
//! simulated agents through every failure in milliseconds.
//!
//! ```text
//! Freezing ──all Frozen──▶ Capturing ──all Captured──▶ Storing ──all Stored──▶ Committing ──ok──▶ Done
//!   │ any failure,            │                          │ (save: ranks resumed;   │ (kill: KILL sent
//!   │ loss or timeout         │                          │  kill: still frozen)    │  only now)
//!   └────────────────────────┴──────────────────────────┴────────────────────────┴──▶ Aborted: ABORT to all
//! ```
//!
//! Invariants (tested): a commit is asked for only when every agent has stored; an
//! attempt that fails before its commit sends ABORT to every agent and never a
//! commit; in a save that kills, no rank is killed before the commit succeeded (the
//! ranks stay frozen while they are stored: ../shared/DESIGN.md's data flow shows KILL before
//! STORED, which would lose the job if the store then failed); messages of another
//! attempt, of unknown agents, or repeated, change nothing.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use ckpt_shared::catalog::CatalogError;
use ckpt_shared::proto::{
    AttemptId, FromAgent, RankManifest, RankRef, RestoreRank, SaveSpec, ToAgent,
};

/// An agent, by its node name.
pub type AgentId = String;

/// Why the driver could not write the job manifest, the commit of a save
/// ([`Barrier::commit_done`]). The barrier aborts with it as the reason.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// The store did not take the manifest.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    /// The task that writes it ended without an answer (it panicked, or the
    /// runtime is shutting down).
    #[error("the task writing it ended early: {0}")]
    Writer(#[source] tokio::task::JoinError),
}

/// What a save does with the ranks once they are captured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveMode {
    /// They run on while their snapshot is stored.
    LeaveRunning,
    /// They stay frozen while stored and are killed once the checkpoint is committed.
    Kill,
}

/// How long each phase may take, for all agents together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub freeze: Duration,
    pub capture: Duration,
    pub store: Duration,
    pub commit: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            freeze: Duration::from_secs(30),
            capture: Duration::from_secs(60),
            store: Duration::from_secs(3600),
            commit: Duration::from_secs(60),
        }
    }
}

/// Where an attempt is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Freezing,
    Capturing,
    Storing,
    Committing,
    Done,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Freezing => "FREEZE",
            Phase::Capturing => "CAPTURE",
            Phase::Storing => "STORE",
            Phase::Committing => "COMMIT",
            Phase::Done => "DONE",
        }
    }
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Committed,
    Aborted { phase: Phase, reason: String },
}

/// What the driver must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Send {
        to: AgentId,
        msg: ToAgent,
    },
    /// Write the job manifest naming these rank images, then call
    /// [`Barrier::commit_done`].
    Commit {
        ranks: Vec<RankManifest>,
    },
    /// The attempt is over.
    Finished(Outcome),
}

#[derive(Debug, Default, Clone)]
struct AgentState {
    reached: Option<Phase>,
    stored: Vec<RankManifest>,
}

/// One checkpoint attempt of one job.
#[derive(Debug)]
pub struct Barrier {
    attempt: AttemptId,
    mode: SaveMode,
    timeouts: Timeouts,
    phase: Phase,
    deadline: Instant,
    agents: BTreeMap<AgentId, AgentState>,
    actions: VecDeque<Action>,
    outcome: Option<Outcome>,
}

impl Barrier {
    /// Starts attempt `attempt` of the save `spec` over `ranks` (the ranks of each
    /// agent): FREEZE goes to every agent.
    pub fn start(
        now: Instant,
        attempt: AttemptId,
        spec: &SaveSpec,
        ranks: BTreeMap<AgentId, Vec<RankRef>>,
        timeouts: Timeouts,
    ) -> Barrier {
        let mode = if spec.kill {
            SaveMode::Kill
        } else {
            SaveMode::LeaveRunning
        };
        let mut b = Barrier {
            attempt,
            mode,
            timeouts,
            phase: Phase::Freezing,
            deadline: now + timeouts.freeze,
            agents: ranks
                .keys()
                .map(|a| (a.clone(), AgentState::default()))
                .collect(),
            actions: VecDeque::new(),
            outcome: None,
        };
        for (a, r) in ranks {
            b.actions.push_back(Action::Send {
                to: a,
                msg: ToAgent::Freeze {
                    attempt,
                    spec: spec.clone(),
                    ranks: r,
                },
            });
        }
        if b.agents.is_empty() {
            b.abort("the job has no ranks".into());
        }
        b
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn outcome(&self) -> Option<&Outcome> {
        self.outcome.as_ref()
    }

    /// When [`handle_timeout`](Self::handle_timeout) must be called, if the attempt
    /// is still running.
    pub fn poll_timeout(&self) -> Option<Instant> {
        (self.phase != Phase::Done).then_some(self.deadline)
    }

    /// The next thing to do.
    pub fn poll(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// A message from agent `from`.
    pub fn handle(&mut self, now: Instant, from: &str, msg: FromAgent) {
        if self.phase == Phase::Done {
            return;
        }
        let Some(state) = self.agents.get_mut(from) else {
            return; // not part of this attempt
        };
        let (reached, attempt) = match msg {
            FromAgent::Hello(_)
            | FromAgent::Register(_)
            | FromAgent::Ranks(_)
            | FromAgent::Rebuilt { .. }
            | FromAgent::Released { .. }
            | FromAgent::Pong => return,
            FromAgent::Failed { attempt, reason } => {
                if attempt == self.attempt {
                    self.abort(format!(
                        "agent {from} failed in {}: {reason}",
                        self.phase.name()
                    ));
                }
                return;
            }
            FromAgent::Frozen { attempt } => (Phase::Freezing, attempt),
            FromAgent::Captured { attempt } => (Phase::Capturing, attempt),
            FromAgent::Stored { attempt, ranks } => {
                if attempt == self.attempt && self.phase == Phase::Storing {
                    state.stored = ranks;
                }
                (Phase::Storing, attempt)
            }
        };
        // Only the answer to the current phase counts; anything else (another
        // attempt, a repeat, an answer out of turn) changes nothing.
        if attempt != self.attempt || reached != self.phase {
            return;
        }
        state.reached = Some(reached);
        if self.agents.values().all(|s| s.reached == Some(self.phase)) {
            self.advance(now);
        }
    }

    /// The connection to agent `from` is gone.
    pub fn agent_lost(&mut self, _now: Instant, from: &str) {
        if self.phase != Phase::Done && self.agents.contains_key(from) {
            self.abort(format!("lost agent {from} in {}", self.phase.name()));
        }
    }

    /// The deadline of [`poll_timeout`](Self::poll_timeout) may have passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.phase == Phase::Done || now < self.deadline {
            return;
        }
        let late: Vec<&str> = self
            .agents
            .iter()
            .filter(|(_, s)| s.reached != Some(self.phase))
            .map(|(a, _)| a.as_str())
            .collect();
        let reason = if self.phase == Phase::Committing {
            "the job manifest was not written in time".to_string()
        } else {
            format!("timed out waiting for {}", late.join(", "))
        };
        self.abort(format!("{} {reason}", self.phase.name()));
    }

    /// The driver wrote the job manifest (`Ok`), or could not (`Err`).
    pub fn commit_done(&mut self, _now: Instant, result: Result<(), CommitError>) {
        if self.phase != Phase::Committing {
            return;
        }
        match result {
            Ok(()) => {
                if self.mode == SaveMode::Kill {
                    self.send_all(|attempt| ToAgent::Kill { attempt });
                }
                self.finish(Outcome::Committed);
            }
            Err(e) => self.abort(format!(
                "the job manifest could not be written: {}",
                ckpt_shared::report::error_chain(&e)
            )),
        }
    }

    /// The controller will not commit what it was asked to (the checkpoint breaks
    /// a policy): abort, as before a commit, since nothing was written.
    /// The controller stops: the attempt is given up unless its checkpoint is
    /// being committed or is done.
    pub fn stop(&mut self, reason: String) {
        if matches!(
            self.phase,
            Phase::Freezing | Phase::Capturing | Phase::Storing
        ) {
            self.abort(reason);
        }
    }

    pub fn refuse(&mut self, reason: String) {
        if self.phase != Phase::Committing {
            return;
        }
        self.phase = Phase::Storing;
        self.abort(reason);
    }

    fn advance(&mut self, now: Instant) {
        match self.phase {
            Phase::Freezing => {
                self.phase = Phase::Capturing;
                self.deadline = now + self.timeouts.capture;
                self.send_all(|attempt| ToAgent::Capture { attempt });
            }
            Phase::Capturing => {
                self.phase = Phase::Storing;
                self.deadline = now + self.timeouts.store;
                match self.mode {
                    SaveMode::LeaveRunning => self.send_all(|attempt| ToAgent::Resume { attempt }),
                    SaveMode::Kill => self.send_all(|attempt| ToAgent::Store { attempt }),
                }
            }
            Phase::Storing => {
                self.phase = Phase::Committing;
                self.deadline = now + self.timeouts.commit;
                let mut ranks: Vec<RankManifest> = self
                    .agents
                    .values()
                    .flat_map(|s| s.stored.iter().cloned())
                    .collect();
                ranks.sort_by_key(|r| r.rank);
                self.actions.push_back(Action::Commit { ranks });
            }
            Phase::Committing | Phase::Done => {}
        }
    }

    fn send_all(&mut self, msg: impl Fn(AttemptId) -> ToAgent) {
        for a in self.agents.keys() {
            self.actions.push_back(Action::Send {
                to: a.clone(),
                msg: msg(self.attempt),
            });
        }
    }

    fn abort(&mut self, reason: String) {
        let phase = self.phase;
        let r = reason.clone();
        self.send_all(|attempt| ToAgent::Abort {
            attempt,
            reason: r.clone(),
        });
        self.finish(Outcome::Aborted { phase, reason });
    }

    fn finish(&mut self, outcome: Outcome) {
        self.phase = Phase::Done;
        self.outcome = Some(outcome.clone());
        self.actions.push_back(Action::Finished(outcome));
    }
}

/// Where a restore is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum RestorePhase {
    /// Every agent rebuilds its ranks and holds them.
    Rebuilding,
    /// Every rank is rebuilt; the agents release them together.
    Releasing,
    Done,
}

/// One restore of a job: a barrier of two phases, in the same style as [`Barrier`].
/// No rank runs before every rank of the job is rebuilt: RELEASE goes out only once
/// every agent has answered REBUILT, and any failure, loss or timeout before that
/// sends ABORT (kill what you rebuilt) to everyone. A failure after some agent has
/// released cannot be undone; it is reported as such.
#[derive(Debug)]
pub struct RestoreBarrier {
    attempt: AttemptId,
    phase: RestorePhase,
    deadline: Instant,
    release_timeout: Duration,
    agents: BTreeMap<AgentId, (bool, Vec<RankRef>)>,
    actions: VecDeque<Action>,
    outcome: Option<Outcome>,
}

impl RestoreBarrier {
    /// Starts restore `attempt` of `job`: RESTORE goes to each agent with its ranks.
    pub fn start(
        now: Instant,
        attempt: AttemptId,
        job: &str,
        ranks: BTreeMap<AgentId, Vec<RestoreRank>>,
        store_config: &ckpt_shared::objstore::StoreConfig,
        rebuild_timeout: Duration,
        release_timeout: Duration,
    ) -> RestoreBarrier {
        let mut b = RestoreBarrier {
            attempt,
            phase: RestorePhase::Rebuilding,
            deadline: now + rebuild_timeout,
            release_timeout,
            agents: ranks
                .keys()
                .map(|a| (a.clone(), (false, Vec::new())))
                .collect(),
            actions: VecDeque::new(),
            outcome: None,
        };
        for (a, r) in ranks {
            b.actions.push_back(Action::Send {
                to: a,
                msg: ToAgent::Restore {
                    attempt,
                    job: job.to_string(),
                    ranks: r,
                    store_config: Box::new(store_config.clone()),
                },
            });
        }
        if b.agents.is_empty() {
            b.abort("the checkpoint has no ranks".into());
        }
        b
    }

    pub fn phase(&self) -> RestorePhase {
        self.phase
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        (self.phase != RestorePhase::Done).then_some(self.deadline)
    }

    pub fn poll(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The PIDs each agent reported for its rebuilt ranks.
    pub fn rebuilt(&self) -> impl Iterator<Item = (&AgentId, &RankRef)> {
        self.agents
            .iter()
            .flat_map(|(a, (_, r))| r.iter().map(move |r| (a, r)))
    }

    pub fn handle(&mut self, now: Instant, from: &str, msg: FromAgent) {
        if self.phase == RestorePhase::Done {
            return;
        }
        let phase = self.phase;
        let Some(state) = self.agents.get_mut(from) else {
            return;
        };
        match msg {
            FromAgent::Failed { attempt, reason } if attempt == self.attempt => {
                let what = if phase == RestorePhase::Rebuilding {
                    "rebuilding"
                } else {
                    "releasing"
                };
                self.abort(format!("agent {from} failed {what} its ranks: {reason}"));
            }
            FromAgent::Rebuilt { attempt, ranks }
                if attempt == self.attempt && phase == RestorePhase::Rebuilding && !state.0 =>
            {
                *state = (true, ranks);
                if self.agents.values().all(|s| s.0) {
                    self.phase = RestorePhase::Releasing;
                    self.deadline = now + self.release_timeout;
                    for (a, s) in self.agents.iter_mut() {
                        s.0 = false;
                        self.actions.push_back(Action::Send {
                            to: a.clone(),
                            msg: ToAgent::Release {
                                attempt: self.attempt,
                            },
                        });
                    }
                }
            }
            FromAgent::Released { attempt }
                if attempt == self.attempt && phase == RestorePhase::Releasing =>
            {
                state.0 = true;
                if self.agents.values().all(|s| s.0) {
                    self.phase = RestorePhase::Done;
                    self.outcome = Some(Outcome::Committed);
                    self.actions.push_back(Action::Finished(Outcome::Committed));
                }
            }
            _ => {}
        }
    }

    pub fn agent_lost(&mut self, _now: Instant, from: &str) {
        if self.phase != RestorePhase::Done && self.agents.contains_key(from) {
            self.abort(format!("lost agent {from} during the restore"));
        }
    }

    /// The controller stops: a restore not yet released is given up (its husks
    /// killed); one being released goes on.
    pub fn stop(&mut self, reason: String) {
        if self.phase == RestorePhase::Rebuilding {
            self.abort(reason);
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if self.phase == RestorePhase::Done || now < self.deadline {
            return;
        }
        let late: Vec<&str> = self
            .agents
            .iter()
            .filter(|(_, s)| !s.0)
            .map(|(a, _)| a.as_str())
            .collect();
        self.abort(format!("timed out waiting for {}", late.join(", ")));
    }

    fn abort(&mut self, reason: String) {
        let phase = match self.phase {
            RestorePhase::Rebuilding => Phase::Capturing,
            _ => Phase::Done,
        };
        let reason = if self.phase == RestorePhase::Releasing {
            format!("{reason} (after the release began: ranks already released keep running)")
        } else {
            reason
        };
        for a in self.agents.keys() {
            self.actions.push_back(Action::Send {
                to: a.clone(),
                msg: ToAgent::Abort {
                    attempt: self.attempt,
                    reason: reason.clone(),
                },
            });
        }
        self.phase = RestorePhase::Done;
        let o = Outcome::Aborted { phase, reason };
        self.outcome = Some(o.clone());
        self.actions.push_back(Action::Finished(o));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(mode: SaveMode) -> SaveSpec {
        SaveSpec {
            job: "job".into(),
            ckpt: "job-9".into(),
            store: ckpt_shared::objstore::StoreUrl::parse("s3://b").unwrap(),
            kill: mode == SaveMode::Kill,
            zstd_level: None,
            store_config: Default::default(),
        }
    }

    fn ranks(n: usize) -> BTreeMap<AgentId, Vec<RankRef>> {
        (0..n)
            .map(|i| {
                (
                    format!("node{i:04}"),
                    vec![RankRef {
                        rank: i as u32,
                        pid: 1000 + i as i32,
                    }],
                )
            })
            .collect()
    }

    /// Drains the actions: the messages per agent, the commits, the outcome.
    #[derive(Default, Debug)]
    struct Seen {
        sent: BTreeMap<AgentId, Vec<ToAgent>>,
        commits: Vec<Vec<RankManifest>>,
        outcome: Option<Outcome>,
    }

    fn drain(b: &mut Barrier, seen: &mut Seen) {
        while let Some(a) = b.poll() {
            match a {
                Action::Send { to, msg } => seen.sent.entry(to).or_default().push(msg),
                Action::Commit { ranks } => seen.commits.push(ranks),
                Action::Finished(o) => {
                    assert!(seen.outcome.is_none(), "finished twice");
                    seen.outcome = Some(o);
                }
            }
        }
    }

    fn stored(attempt: AttemptId, rank: u32) -> FromAgent {
        FromAgent::Stored {
            attempt,
            ranks: vec![RankManifest {
                rank,
                image: ckpt_shared::location::Location::parse(&format!(
                    "s3://b/j.{attempt}.r{rank}"
                ))
                .unwrap(),
                memory_bytes: 1,
                stored_bytes: 1,
                tcp: vec![],
                listen: vec![],
                udp: vec![],
            }],
        }
    }

    /// Runs an attempt of `n` agents in `mode`; agent `fail_agent` fails (or is
    /// lost, or is silent) in phase `fail_at`, if given. Returns what was seen.
    fn run(n: usize, mode: SaveMode, fail_at: Option<(Phase, usize, u8)>) -> Seen {
        let t0 = Instant::now();
        let mut now = t0;
        let attempt = 9;
        let mut b = Barrier::start(now, attempt, &spec(mode), ranks(n), Timeouts::default());
        let mut seen = Seen::default();
        drain(&mut b, &mut seen);
        let names: Vec<AgentId> = ranks(n).into_keys().collect();
        for phase in [Phase::Freezing, Phase::Capturing, Phase::Storing] {
            for (i, a) in names.iter().enumerate() {
                if b.phase() == Phase::Done {
                    break;
                }
                now += Duration::from_micros(50);
                match fail_at {
                    Some((p, who, how)) if p == phase && who == i => match how {
                        0 => b.handle(
                            now,
                            a,
                            FromAgent::Failed {
                                attempt,
                                reason: "injected".into(),
                            },
                        ),
                        1 => b.agent_lost(now, a),
                        _ => {} // silent: the deadline will pass
                    },
                    _ => {
                        let msg = match phase {
                            Phase::Freezing => FromAgent::Frozen { attempt },
                            Phase::Capturing => FromAgent::Captured { attempt },
                            _ => stored(attempt, i as u32),
                        };
                        // Noise that must change nothing: a stale attempt, an
                        // unknown agent, a repeat.
                        b.handle(
                            now,
                            a,
                            FromAgent::Frozen {
                                attempt: attempt - 1,
                            },
                        );
                        b.handle(now, "stranger", msg.clone());
                        b.handle(now, a, msg.clone());
                        b.handle(now, a, msg);
                    }
                }
                drain(&mut b, &mut seen);
            }
            if b.phase() != Phase::Done && b.phase() <= phase {
                // Someone is silent: let time pass.
                now = b.poll_timeout().expect("running") + Duration::from_millis(1);
                b.handle_timeout(now);
                drain(&mut b, &mut seen);
            }
        }
        if b.phase() == Phase::Committing {
            assert_eq!(seen.commits.len(), 1);
            assert_eq!(seen.commits[0].len(), n, "every rank in the commit");
            b.commit_done(now, Ok(()));
            drain(&mut b, &mut seen);
        }
        seen
    }

    #[test]
    fn a_thousand_agents_commit_and_every_message_comes_in_order() {
        for mode in [SaveMode::LeaveRunning, SaveMode::Kill] {
            let seen = run(1000, mode, None);
            assert_eq!(seen.outcome, Some(Outcome::Committed));
            assert_eq!(seen.commits.len(), 1);
            for msgs in seen.sent.values() {
                let kinds: Vec<&str> = msgs
                    .iter()
                    .map(|m| match m {
                        ToAgent::Freeze { .. } => "freeze",
                        ToAgent::Capture { .. } => "capture",
                        ToAgent::Resume { .. } => "resume",
                        ToAgent::Store { .. } => "store",
                        ToAgent::Kill { .. } => "kill",
                        ToAgent::Abort { .. } => "abort",
                        _ => "other",
                    })
                    .collect();
                let want = match mode {
                    SaveMode::LeaveRunning => vec!["freeze", "capture", "resume"],
                    SaveMode::Kill => vec!["freeze", "capture", "store", "kill"],
                };
                assert_eq!(kinds, want);
            }
        }
    }

    #[test]
    fn any_failure_loss_or_silence_before_the_commit_aborts_everyone_and_commits_nothing() {
        for mode in [SaveMode::LeaveRunning, SaveMode::Kill] {
            for phase in [Phase::Freezing, Phase::Capturing, Phase::Storing] {
                for how in 0..3u8 {
                    for who in [0, 7, 63] {
                        let seen = run(64, mode, Some((phase, who, how)));
                        let ctx = format!("{mode:?} {phase:?} how={how} who={who}");
                        assert!(seen.commits.is_empty(), "{ctx}: committed");
                        match &seen.outcome {
                            Some(Outcome::Aborted { phase: p, reason }) => {
                                assert_eq!(*p, phase, "{ctx}: {reason}");
                                let name = format!("node{who:04}");
                                assert!(reason.contains(&name), "{ctx}: reason {reason:?}");
                            }
                            other => panic!("{ctx}: {other:?}"),
                        }
                        for (a, msgs) in &seen.sent {
                            assert!(
                                matches!(msgs.last(), Some(ToAgent::Abort { .. })),
                                "{ctx}: {a} was not told to abort: {msgs:?}"
                            );
                            assert!(
                                !msgs.iter().any(|m| matches!(m, ToAgent::Kill { .. })),
                                "{ctx}: {a} was killed"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_failed_commit_aborts_and_a_save_that_kills_kills_nobody() {
        let now = Instant::now();
        let mut b = Barrier::start(now, 1, &spec(SaveMode::Kill), ranks(3), Timeouts::default());
        let names: Vec<AgentId> = ranks(3).into_keys().collect();
        for a in &names {
            b.handle(now, a, FromAgent::Frozen { attempt: 1 });
        }
        for a in &names {
            b.handle(now, a, FromAgent::Captured { attempt: 1 });
        }
        for (i, a) in names.iter().enumerate() {
            b.handle(now, a, stored(1, i as u32));
        }
        assert_eq!(b.phase(), Phase::Committing);
        let down = ckpt_shared::store::StoreError::Config {
            store: "s3://bucket".into(),
            reason: "store down".into(),
        };
        b.commit_done(now, Err(CatalogError::Store(down).into()));
        let mut seen = Seen::default();
        drain(&mut b, &mut seen);
        match &seen.outcome {
            Some(Outcome::Aborted {
                phase: Phase::Committing,
                reason,
            }) => assert!(
                reason.contains("job manifest could not be written")
                    && reason.contains("store down"),
                "{reason}"
            ),
            other => panic!("not aborted in the commit: {other:?}"),
        }
        for msgs in seen.sent.values() {
            assert!(matches!(msgs.last(), Some(ToAgent::Abort { .. })));
            assert!(!msgs.iter().any(|m| matches!(m, ToAgent::Kill { .. })));
        }
        // Late news changes nothing.
        b.commit_done(now, Ok(()));
        b.handle(now, &names[0], FromAgent::Frozen { attempt: 1 });
        assert!(b.poll().is_none());
        assert!(b.poll_timeout().is_none());
    }

    #[test]
    fn a_refused_commit_aborts_as_before_the_commit_and_kills_nobody() {
        let now = Instant::now();
        let mut b = Barrier::start(now, 1, &spec(SaveMode::Kill), ranks(2), Timeouts::default());
        let names: Vec<AgentId> = ranks(2).into_keys().collect();
        b.refuse("too early: changes nothing".into());
        assert_eq!(b.phase(), Phase::Freezing);
        for a in &names {
            b.handle(now, a, FromAgent::Frozen { attempt: 1 });
        }
        for a in &names {
            b.handle(now, a, FromAgent::Captured { attempt: 1 });
        }
        for (i, a) in names.iter().enumerate() {
            b.handle(now, a, stored(1, i as u32));
        }
        assert_eq!(b.phase(), Phase::Committing);
        b.refuse("a connection leaves the job".into());
        let mut seen = Seen::default();
        drain(&mut b, &mut seen);
        // Nothing was written: the controller need not remove a job manifest.
        match &seen.outcome {
            Some(Outcome::Aborted { phase, reason }) => {
                assert_eq!(*phase, Phase::Storing);
                assert!(reason.contains("leaves the job"), "{reason}");
            }
            o => panic!("{o:?}"),
        }
        for msgs in seen.sent.values() {
            assert!(matches!(msgs.last(), Some(ToAgent::Abort { .. })));
            assert!(!msgs.iter().any(|m| matches!(m, ToAgent::Kill { .. })));
        }
    }

    #[test]
    fn the_commit_itself_has_a_deadline() {
        let now = Instant::now();
        let mut b = Barrier::start(
            now,
            1,
            &spec(SaveMode::LeaveRunning),
            ranks(1),
            Timeouts::default(),
        );
        let a = "node0000";
        b.handle(now, a, FromAgent::Frozen { attempt: 1 });
        b.handle(now, a, FromAgent::Captured { attempt: 1 });
        b.handle(now, a, stored(1, 0));
        assert_eq!(b.phase(), Phase::Committing);
        let late = b.poll_timeout().unwrap() + Duration::from_millis(1);
        b.handle_timeout(late);
        let mut seen = Seen::default();
        drain(&mut b, &mut seen);
        assert!(matches!(
            seen.outcome,
            Some(Outcome::Aborted {
                phase: Phase::Committing,
                ..
            })
        ));
    }
}
