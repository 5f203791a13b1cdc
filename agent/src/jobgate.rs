//! The gate of one job attempt on this node, as a state machine with no threads,
//! locks, clocks or sockets of its own (the barrier's style, `controller/src/
//! barrier.rs`; quinn-proto's): it is fed [`Event`]s with the time they happen
//! ([`GateMachine::handle`], [`GateMachine::handle_timeout`]), says what to send
//! ([`GateMachine::poll`]) and whether a rank waiting at a step may go on
//! ([`GateMachine::verdict`]). `serve.rs` drives it from the ranks' threads and the
//! controller connection; the unit tests below drive it with simulated time.
//!
//! The rules:
//! - each rank of the attempt on this node arrives at each step once; the last to
//!   arrive makes the machine report the step to the controller (with what the
//!   ranks recorded: their manifests at STORED, their root PIDs at REBUILT);
//! - a rank waits at a step until the controller opens it, or the attempt is
//!   given up: by the controller's ABORT, by a rank's failure (reported once), or
//!   by the lease: the controller silent for longer than the lease;
//! - once given up, every rank at or arriving at any step is told the reason.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use ckpt_shared::proto::{AttemptId, FromAgent, RankManifest, RankRef};

/// The barrier points, in the order a rank meets them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Frozen = 0,
    Captured = 1,
    Stored = 2,
    Rebuilt = 3,
}

impl Step {
    pub fn name(self) -> &'static str {
        match self {
            Step::Frozen => "frozen",
            Step::Captured => "captured",
            Step::Stored => "stored",
            Step::Rebuilt => "rebuilt",
        }
    }
}

/// What happens to the gate.
#[derive(Debug, Clone)]
pub enum Event {
    /// A rank arrived at `step`.
    Arrive(Step),
    /// A rank recorded its image's manifest (before it arrives at STORED).
    Manifest(RankManifest),
    /// A rank recorded its rebuilt root (before it arrives at REBUILT).
    Rebuilt(RankRef),
    /// The controller opened `step`: the ranks waiting there go on.
    Open(Step),
    /// The controller gave the attempt up.
    ControllerAbort(String),
    /// The attempt is given up for a reason of this node (a lost controller).
    Abort(String),
    /// A rank failed: the others stop, and the controller is told once.
    Failed(String),
    /// The controller was heard from at this instant (any message).
    Heard(Instant),
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send this to the controller; `step` is the step it reports, if any (the
    /// driver's test hook may hang there instead).
    Send { step: Option<Step>, msg: FromAgent },
}

/// Whether a rank waiting at a step may go on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Wait,
    Go,
    GiveUp(String),
}

/// The state of one attempt's gate.
#[derive(Debug)]
pub struct GateMachine {
    attempt: AttemptId,
    ranks: usize,
    lease: Duration,
    heard: Instant,
    arrived: [usize; 4],
    open: [bool; 4],
    abort: Option<String>,
    /// The controller itself said ABORT: the attempt is certainly not committed
    /// (a lost controller may have committed it before it went).
    aborted_by_controller: bool,
    /// `Failed` was sent (once per attempt).
    failed_sent: bool,
    manifests: Vec<RankManifest>,
    rebuilt: Vec<RankRef>,
    actions: VecDeque<Action>,
}

impl GateMachine {
    /// The gate of `attempt` for `ranks` ranks on this node; the controller was
    /// last heard at `heard`.
    pub fn new(attempt: AttemptId, ranks: usize, lease: Duration, heard: Instant) -> Self {
        GateMachine {
            attempt,
            ranks,
            lease,
            heard,
            arrived: [0; 4],
            open: [false; 4],
            abort: None,
            aborted_by_controller: false,
            failed_sent: false,
            manifests: Vec::new(),
            rebuilt: Vec::new(),
            actions: VecDeque::new(),
        }
    }

    /// Feeds one event. Only [`GateMachine::handle_timeout`] looks at the clock: a
    /// rank busy storing for longer than the lease, with the controller heard all
    /// along, must not be given up when the controller's word finally comes.
    pub fn handle(&mut self, now: Instant, ev: Event) {
        match ev {
            Event::Arrive(step) => self.arrive(step),
            Event::Manifest(m) => self.manifests.push(m),
            Event::Rebuilt(r) => self.rebuilt.push(r),
            Event::Open(step) => self.open[step as usize] = true,
            Event::ControllerAbort(reason) => {
                self.aborted_by_controller = true;
                self.give_up(reason);
            }
            Event::Abort(reason) => self.give_up(reason),
            Event::Failed(reason) => {
                self.give_up(reason.clone());
                if !self.failed_sent {
                    self.failed_sent = true;
                    self.actions.push_back(Action::Send {
                        step: None,
                        msg: FromAgent::Failed {
                            attempt: self.attempt,
                            reason,
                        },
                    });
                }
            }
            Event::Heard(at) => self.heard = self.heard.max(at),
        }
        let _ = now;
    }

    /// The lease: a controller silent for longer than it gives the attempt up.
    pub fn handle_timeout(&mut self, now: Instant) {
        let silent = now.saturating_duration_since(self.heard);
        if silent > self.lease && self.abort.is_none() {
            tracing::warn!(attempt = self.attempt, "controller silent: lease expired");
            self.abort = Some(format!(
                "the controller was silent for {:.1} s, longer than the lease of {:.1} s",
                silent.as_secs_f64(),
                self.lease.as_secs_f64()
            ));
        }
    }

    /// When [`GateMachine::handle_timeout`] must run next, unless an event comes
    /// first; `None` once the attempt is given up.
    pub fn next_timeout(&self) -> Option<Instant> {
        // Just past the lease: at exactly heard + lease the controller is not yet
        // silent for longer than it.
        self.abort
            .is_none()
            .then(|| self.heard + self.lease + Duration::from_millis(1))
    }

    /// The next thing to send.
    pub fn poll(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Whether a rank that arrived at `step` may go on.
    pub fn verdict(&self, step: Step) -> Verdict {
        match (&self.abort, self.open[step as usize]) {
            (Some(r), _) => Verdict::GiveUp(r.clone()),
            (None, true) => Verdict::Go,
            (None, false) => Verdict::Wait,
        }
    }

    /// Why the attempt was given up, if it was.
    pub fn abort_reason(&self) -> Option<&str> {
        self.abort.as_deref()
    }

    /// The controller's own ABORT gave the attempt up.
    pub fn aborted_by_controller(&self) -> bool {
        self.aborted_by_controller
    }

    /// The manifests the ranks recorded.
    pub fn manifests(&self) -> &[RankManifest] {
        &self.manifests
    }

    fn give_up(&mut self, reason: String) {
        if self.abort.is_none() {
            self.abort = Some(reason);
        }
    }

    /// A rank arrives; the last one reports the step. A rank arriving after the
    /// attempt was given up does not count (it is told the reason at once).
    fn arrive(&mut self, step: Step) {
        if self.abort.is_some() {
            return;
        }
        let n = &mut self.arrived[step as usize];
        *n += 1;
        if *n != self.ranks {
            return;
        }
        let attempt = self.attempt;
        let msg = match step {
            Step::Frozen => FromAgent::Frozen { attempt },
            Step::Captured => FromAgent::Captured { attempt },
            Step::Stored => FromAgent::Stored {
                attempt,
                ranks: self.manifests.clone(),
            },
            Step::Rebuilt => FromAgent::Rebuilt {
                attempt,
                ranks: self.rebuilt.clone(),
            },
        };
        self.actions.push_back(Action::Send {
            step: Some(step),
            msg,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(5);

    fn sends(m: &mut GateMachine) -> Vec<FromAgent> {
        std::iter::from_fn(|| m.poll())
            .map(|Action::Send { msg, .. }| msg)
            .collect()
    }

    #[test]
    fn the_last_rank_reports_and_all_wait_for_the_word() {
        let t0 = Instant::now();
        let mut m = GateMachine::new(7, 3, LEASE, t0);
        m.handle(t0, Event::Arrive(Step::Frozen));
        m.handle(t0, Event::Arrive(Step::Frozen));
        assert!(
            sends(&mut m).is_empty(),
            "reported before every rank arrived"
        );
        assert_eq!(m.verdict(Step::Frozen), Verdict::Wait);
        m.handle(t0, Event::Arrive(Step::Frozen));
        assert_eq!(sends(&mut m), [FromAgent::Frozen { attempt: 7 }]);
        assert_eq!(m.verdict(Step::Frozen), Verdict::Wait);
        m.handle(t0, Event::Open(Step::Frozen));
        assert_eq!(m.verdict(Step::Frozen), Verdict::Go);
        assert_eq!(m.verdict(Step::Captured), Verdict::Wait);
    }

    #[test]
    fn stored_and_rebuilt_carry_what_the_ranks_recorded() {
        let t0 = Instant::now();
        let mut m = GateMachine::new(1, 2, LEASE, t0);
        for pid in [10, 20] {
            m.handle(
                t0,
                Event::Rebuilt(RankRef {
                    rank: pid as u32 / 10,
                    pid,
                }),
            );
            m.handle(t0, Event::Arrive(Step::Rebuilt));
        }
        assert_eq!(
            sends(&mut m),
            [FromAgent::Rebuilt {
                attempt: 1,
                ranks: vec![RankRef { rank: 1, pid: 10 }, RankRef { rank: 2, pid: 20 }],
            }]
        );
    }

    #[test]
    fn the_lease_gives_up_after_silence_and_a_word_renews_it() {
        let t0 = Instant::now();
        let mut m = GateMachine::new(1, 1, LEASE, t0);
        m.handle(t0, Event::Arrive(Step::Frozen));
        let _ = sends(&mut m);
        let t4 = t0 + Duration::from_secs(4);
        m.handle(t4, Event::Heard(t4));
        let deadline = m.next_timeout().unwrap();
        assert!(deadline > t4 + LEASE, "{deadline:?}");
        m.handle_timeout(t4 + LEASE);
        assert_eq!(
            m.verdict(Step::Frozen),
            Verdict::Wait,
            "gave up within the lease"
        );
        m.handle_timeout(deadline);
        match m.verdict(Step::Frozen) {
            Verdict::GiveUp(r) => assert!(r.contains("silent"), "{r}"),
            v => panic!("{v:?}"),
        }
        assert_eq!(m.next_timeout(), None);
        assert!(sends(&mut m).is_empty(), "a lease expiry sends nothing");
    }

    #[test]
    fn a_failure_is_reported_once_and_stops_everyone() {
        let t0 = Instant::now();
        let mut m = GateMachine::new(3, 2, LEASE, t0);
        m.handle(t0, Event::Arrive(Step::Frozen));
        m.handle(t0, Event::Failed("rank 1: boom".into()));
        m.handle(t0, Event::Failed("rank 0: aborted too".into()));
        assert_eq!(
            sends(&mut m),
            [FromAgent::Failed {
                attempt: 3,
                reason: "rank 1: boom".into()
            }]
        );
        assert_eq!(
            m.verdict(Step::Frozen),
            Verdict::GiveUp("rank 1: boom".into())
        );
        // A rank arriving now neither counts nor makes the step be reported.
        m.handle(t0, Event::Arrive(Step::Frozen));
        assert!(sends(&mut m).is_empty());
        assert!(!m.aborted_by_controller());
        // Opening after the abort does not let anyone go.
        m.handle(t0, Event::Open(Step::Frozen));
        assert!(matches!(m.verdict(Step::Frozen), Verdict::GiveUp(_)));
    }

    #[test]
    fn the_controllers_abort_is_remembered_as_such() {
        let t0 = Instant::now();
        let mut m = GateMachine::new(4, 1, LEASE, t0);
        m.handle(
            t0,
            Event::ControllerAbort("the controller aborted: x".into()),
        );
        assert!(m.aborted_by_controller());
        assert_eq!(m.abort_reason(), Some("the controller aborted: x"));
        // A later local reason does not replace the first.
        m.handle(t0, Event::Abort("lost".into()));
        assert_eq!(m.abort_reason(), Some("the controller aborted: x"));
    }

    /// Simulated time over a 1,000-rank attempt: the report goes out once, when the
    /// last rank arrives, whatever the order of arrivals and heartbeats.
    #[test]
    fn a_thousand_ranks_report_each_step_once() {
        let t0 = Instant::now();
        let mut m = GateMachine::new(9, 1000, LEASE, t0);
        let mut now = t0;
        for step in [Step::Frozen, Step::Captured] {
            for i in 0..1000 {
                now += Duration::from_millis(3);
                if i % 100 == 0 {
                    m.handle(now, Event::Heard(now));
                }
                m.handle(now, Event::Arrive(step));
            }
            assert_eq!(sends(&mut m).len(), 1, "{step:?}");
            m.handle(now, Event::Open(step));
            assert_eq!(m.verdict(step), Verdict::Go);
        }
    }
}
