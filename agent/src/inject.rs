//! Single injected system calls.
//!
//! Where the kernel offers no outside interface (sigaltstack, rt_sigaction with a
//! NULL new action, getitimer, `PR_GET_TID_ADDRESS`), and for every step of building a
//! husk at restore, the agent makes the stopped thread execute exactly one `syscall`
//! instruction with arguments of our choosing:
//!
//! 1. set the registers: `rip` at a `syscall` instruction that already exists in the
//!    target (one found in the vDSO at dump; our trampoline page at restore), `rax`
//!    the number, the arguments in `rdi, rsi, rdx, r10, r8, r9`, and `orig_rax = -1`
//!    so the kernel's syscall-restart logic leaves this state alone;
//! 2. `PTRACE_SYSCALL` to the entry stop and again to the exit stop, then read `rax`.
//!
//! No code of ours is ever written into the target. The caller owns putting the
//! thread's registers back (see [`crate::freeze::normalize_restart`]): after an
//! injection the thread sits in a syscall-exit stop, where the kernel will not
//! restart an interrupted call on its own.
//!
//! Signals: the caller blocks all blockable signals of the thread first (dump) or
//! works on a husk that has none, so the only stops we expect between entry and exit
//! are fork/clone events. A signal-delivery stop that still happens is recorded (the
//! signal is swallowed there) so the caller can send it again.

use libc::{pid_t, user_regs_struct};

use crate::sys::{self, ptrace, ptrace::Stop};

#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error(transparent)]
    Ptrace(#[from] ptrace::PtraceError),
    #[error(transparent)]
    Sys(#[from] sys::SysError),
    #[error("thread {tid} left while a system call was injected ({how})")]
    Vanished { tid: pid_t, how: String },
    #[error("injected system call {nr} in thread {tid} returned {errno}")]
    Failed { tid: pid_t, nr: u64, errno: i32 },
}

/// A stopped thread we can make system calls in.
pub struct Remote {
    pub tid: pid_t,
    /// Address of a `syscall` instruction in the target.
    pub syscall_ip: u64,
    /// Registers to base each injection on (segment registers etc.).
    pub base: user_regs_struct,
    /// Start of a writable scratch area in the target, and its size.
    pub scratch: u64,
    pub scratch_len: u64,
    /// Children created by fork/clone events during injections, in order.
    pub new_children: Vec<pid_t>,
    /// Signals swallowed by signal-delivery stops during injections.
    pub swallowed: Vec<i32>,
}

impl Remote {
    /// Make the thread run system call `nr`. Returns the raw `rax` (negative errno on
    /// failure).
    pub fn syscall_raw(&mut self, nr: u64, args: [u64; 6]) -> Result<i64, InjectError> {
        let mut r = self.base;
        r.rip = self.syscall_ip;
        r.rax = nr;
        r.orig_rax = u64::MAX;
        r.rdi = args[0];
        r.rsi = args[1];
        r.rdx = args[2];
        r.r10 = args[3];
        r.r8 = args[4];
        r.r9 = args[5];
        ptrace::set_regs(self.tid, &r)?;
        let mut exits = 0;
        ptrace::syscall(self.tid, 0)?;
        // Entry stop, then (fork/clone events), then exit stop.
        let mut entered = false;
        loop {
            let st = ptrace::wait(self.tid)?;
            tracing::trace!(tid = self.tid, nr, ?st, "injection stop");
            match st {
                Stop::Syscall => {
                    if entered {
                        break;
                    }
                    entered = true;
                }
                Stop::Event { event, .. }
                    if event == ptrace::EVENT_FORK || event == ptrace::EVENT_CLONE =>
                {
                    let child = ptrace::event_msg(self.tid)? as pid_t;
                    self.new_children.push(child);
                }
                Stop::Event { .. } => {}
                Stop::Signal(sig) => {
                    self.swallowed.push(sig);
                }
                Stop::Exited(code) => {
                    return Err(InjectError::Vanished {
                        tid: self.tid,
                        how: format!("exited with {code}"),
                    })
                }
                Stop::Killed(sig) => {
                    return Err(InjectError::Vanished {
                        tid: self.tid,
                        how: format!("killed by signal {sig}"),
                    })
                }
            }
            exits += 1;
            if exits > 64 {
                return Err(InjectError::Vanished {
                    tid: self.tid,
                    how: "never reached the syscall exit".into(),
                });
            }
            ptrace::syscall(self.tid, 0)?;
        }
        let out = ptrace::get_regs(self.tid)?;
        Ok(out.rax as i64)
    }

    /// Like [`Remote::syscall_raw`], but a negative return is an error.
    pub fn syscall(&mut self, nr: u64, args: [u64; 6]) -> Result<u64, InjectError> {
        let r = self.syscall_raw(nr, args)?;
        if (-4095..0).contains(&r) {
            return Err(InjectError::Failed {
                tid: self.tid,
                nr,
                errno: (-r) as i32,
            });
        }
        Ok(r as u64)
    }

    /// Copy `bytes` into the scratch area at `off`; returns the remote address.
    pub fn put(&self, off: u64, bytes: &[u8]) -> Result<u64, InjectError> {
        assert!(
            off + bytes.len() as u64 <= self.scratch_len,
            "scratch overflow"
        );
        let addr = self.scratch + off;
        let n = sys::process_vm_writev(self.tid, addr, bytes)?;
        if n != bytes.len() {
            return Err(InjectError::Vanished {
                tid: self.tid,
                how: "short write to scratch".into(),
            });
        }
        Ok(addr)
    }

    /// Put a NUL-terminated string at `off`.
    pub fn put_str(&self, off: u64, s: &str) -> Result<u64, InjectError> {
        let mut b = s.as_bytes().to_vec();
        b.push(0);
        self.put(off, &b)
    }

    pub fn get(&self, off: u64, len: usize) -> Result<Vec<u8>, InjectError> {
        let mut b = vec![0u8; len];
        let n = sys::process_vm_readv(self.tid, self.scratch + off, &mut b)?;
        if n != len {
            return Err(InjectError::Vanished {
                tid: self.tid,
                how: "short read from scratch".into(),
            });
        }
        Ok(b)
    }
}

/// A userfaultfd bound to the mm of `r`'s process, handshaken with `features`:
/// created inside the process (one injected `userfaultfd(2)`, since the descriptor
/// binds to its creator's mm), taken out with `pidfd_getfd`, and closed there again,
/// so that the process never keeps it. `Ok(None)`, with the reason logged, where
/// the kernel refuses any step; an error only if the injected `close` fails, which
/// would leave the descriptor in the process.
pub fn userfaultfd_of(
    r: &mut Remote,
    features: u64,
) -> Result<Option<std::os::fd::OwnedFd>, InjectError> {
    use std::os::fd::AsFd;
    let pid = r.tid;
    let flags = libc::O_CLOEXEC as u64 | crate::sys::uffd::USER_MODE_ONLY;
    let theirs = match r.syscall(crate::sys::nr::USERFAULTFD, [flags, 0, 0, 0, 0, 0]) {
        Ok(fd) => fd,
        Err(e) => {
            tracing::debug!(pid, %e, "userfaultfd refused");
            return Ok(None);
        }
    };
    let ours = crate::sys::pidfd_open(pid)
        .and_then(|pidfd| crate::sys::pidfd_getfd(&pidfd, pid, theirs as std::os::fd::RawFd));
    r.syscall(crate::sys::nr::CLOSE, [theirs, 0, 0, 0, 0, 0])?;
    let ours = match ours {
        Ok(fd) => fd,
        Err(e) => {
            tracing::debug!(pid, %e, "taking the userfaultfd out failed");
            return Ok(None);
        }
    };
    match crate::sys::uffd::handshake_with(ours.as_fd(), features) {
        Ok(()) => Ok(Some(ours)),
        Err(e) => {
            tracing::debug!(pid, features, %e, "userfaultfd handshake refused");
            Ok(None)
        }
    }
}

/// Find a `syscall` instruction (0f 05) in `bytes`, which start at `base`.
pub fn find_syscall_insn(bytes: &[u8], base: u64) -> Option<u64> {
    bytes
        .windows(2)
        .position(|w| w == [0x0f, 0x05])
        .map(|p| base + p as u64)
}
