//! Process-wide signal and timer state: handlers, the shared pending queue, itimers
//! and POSIX timers — dump and restore.
//!
//! Handlers have no outside interface beyond the SigCgt/SigIgn masks of
//! `/proc/PID/status`, so for each caught signal we inject `rt_sigaction(sig, NULL,
//! &old)`. Likewise `getitimer` and `timer_gettime`. POSIX timer IDs are recreated
//! with `PR_TIMER_CREATE_RESTORE_IDS` (Linux ≥ 6.15) so the program's IDs stay valid.

use ckpt_shared::image::{ITimer, PosixTimer, SigAction};

use crate::inject::{InjectError, Remote};
use crate::sys::{nr, proc};

#[derive(Debug, thiserror::Error)]
pub enum SignalError {
    #[error(transparent)]
    Inject(#[from] InjectError),
    #[error(transparent)]
    Proc(#[from] proc::ProcError),
    #[error("POSIX timer {id} of process {pid} could not be recreated with the same ID (got {got}); this kernel lacks PR_TIMER_CREATE_RESTORE_IDS (Linux ≥ 6.15)")]
    TimerId { pid: i32, id: i32, got: i32 },
}

const SIG_IGN: u64 = 1;

fn words(b: &[u8]) -> Vec<u64> {
    b.chunks_exact(8)
        .map(|c| u64::from_ne_bytes(c.try_into().expect("8 bytes")))
        .collect()
}

/// The process-wide signal and timer state.
pub struct SignalState {
    pub actions: Vec<SigAction>,
    pub itimers: [ITimer; 3],
    pub timers: Vec<PosixTimer>,
}

/// Dump handlers, itimers and POSIX timers of `pid`, injecting into its leader `r`.
pub fn dump(r: &mut Remote, pid: i32) -> Result<SignalState, SignalError> {
    let st = proc::status(pid)?;
    let mut actions = Vec::new();
    for sig in 1..=64 {
        let bit = 1u64 << (sig - 1);
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        if st.sig_cgt & bit != 0 {
            r.syscall(nr::RT_SIGACTION, [sig as u64, 0, r.scratch, 8, 0, 0])?;
            let w = words(&r.get(0, 32)?);
            actions.push(SigAction {
                signo: sig,
                handler: w[0],
                flags: w[1],
                restorer: w[2],
                mask: w[3],
            });
        } else if st.sig_ign & bit != 0 {
            // Flags of an ignored signal don't matter; SIG_IGN is all there is.
            actions.push(SigAction {
                signo: sig,
                handler: SIG_IGN,
                flags: 0,
                restorer: 0,
                mask: 0,
            });
        }
    }
    let mut itimers = [ITimer::default(); 3];
    for (which, it) in itimers.iter_mut().enumerate() {
        r.syscall(nr::GETITIMER, [which as u64, r.scratch, 0, 0, 0, 0])?;
        let w = words(&r.get(0, 32)?);
        *it = ITimer {
            interval_us: w[0] * 1_000_000 + w[1],
            value_us: w[2] * 1_000_000 + w[3],
        };
    }
    let mut timers = Vec::new();
    for proc::TimerInfo {
        id,
        signo,
        notify,
        notify_tid,
        clock,
        value,
    } in proc::posix_timers(pid)?
    {
        r.syscall(nr::TIMER_GETTIME, [id as u64, r.scratch, 0, 0, 0, 0])?;
        let w = words(&r.get(0, 32)?);
        timers.push(PosixTimer {
            id,
            clock,
            notify,
            signo,
            notify_tid,
            value,
            interval_ns: w[0] * 1_000_000_000 + w[1],
            value_ns: w[2] * 1_000_000_000 + w[3],
            overrun: 0,
        });
    }
    Ok(SignalState {
        actions,
        itimers,
        timers,
    })
}

fn bytes(ws: &[u64]) -> Vec<u8> {
    ws.iter().flat_map(|w| w.to_ne_bytes()).collect()
}

/// Install handlers in a husk.
pub fn restore_actions(r: &mut Remote, actions: &[SigAction]) -> Result<(), SignalError> {
    for a in actions {
        let p = r.put(0, &bytes(&[a.handler, a.flags, a.restorer, a.mask]))?;
        r.syscall(nr::RT_SIGACTION, [a.signo as u64, p, 0, 8, 0, 0])?;
    }
    Ok(())
}

/// Arm itimers and recreate POSIX timers in a husk. Done last, just before release,
/// so the timers lose as little time as possible.
pub fn restore_timers(
    r: &mut Remote,
    pid: i32,
    itimers: &[ITimer; 3],
    timers: &[PosixTimer],
) -> Result<(), SignalError> {
    for (which, it) in itimers.iter().enumerate() {
        if it.value_us == 0 && it.interval_us == 0 {
            continue;
        }
        // A periodic ITIMER_REAL whose SIGALRM is pending reads as value 0: the
        // kernel re-arms it only when the signal is dequeued. Arm it one interval
        // out; the pending SIGALRM is queued again separately.
        let value_us = if it.value_us == 0 {
            it.interval_us
        } else {
            it.value_us
        };
        let p = r.put(
            0,
            &bytes(&[
                it.interval_us / 1_000_000,
                it.interval_us % 1_000_000,
                value_us / 1_000_000,
                value_us % 1_000_000,
            ]),
        )?;
        r.syscall(nr::SETITIMER, [which as u64, p, 0, 0, 0, 0])?;
    }
    if timers.is_empty() {
        return Ok(());
    }
    const PR_TIMER_CREATE_RESTORE_IDS: u64 = 77;
    let have_ids = r
        .syscall(nr::PRCTL, [PR_TIMER_CREATE_RESTORE_IDS, 1, 0, 0, 0, 0])
        .is_ok();
    let mut sorted: Vec<&PosixTimer> = timers.iter().collect();
    sorted.sort_by_key(|t| t.id);
    for t in sorted {
        // struct sigevent: value, signo, notify, tid, padding to 64 bytes.
        let mut ev = vec![0u8; 64];
        ev[0..8].copy_from_slice(&t.value.to_ne_bytes());
        ev[8..12].copy_from_slice(&t.signo.to_ne_bytes());
        ev[12..16].copy_from_slice(&t.notify.to_ne_bytes());
        ev[16..20].copy_from_slice(&t.notify_tid.to_ne_bytes());
        let pev = r.put(0, &ev)?;
        let pid_out = r.put(64, &t.id.to_ne_bytes())?;
        r.syscall(nr::TIMER_CREATE, [t.clock as u64, pev, pid_out, 0, 0, 0])?;
        let got = i32::from_ne_bytes(r.get(64, 4)?.try_into().expect("4 bytes"));
        if got != t.id {
            return Err(SignalError::TimerId { pid, id: t.id, got });
        }
        if t.value_ns != 0 {
            let spec = bytes(&[
                t.interval_ns / 1_000_000_000,
                t.interval_ns % 1_000_000_000,
                t.value_ns / 1_000_000_000,
                t.value_ns % 1_000_000_000,
            ]);
            let p = r.put(0, &spec)?;
            r.syscall(nr::TIMER_SETTIME, [t.id as u64, 0, p, 0, 0, 0])?;
        }
    }
    if have_ids {
        r.syscall(nr::PRCTL, [PR_TIMER_CREATE_RESTORE_IDS, 0, 0, 0, 0, 0])?;
    }
    Ok(())
}
