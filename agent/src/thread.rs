//! Thread state: registers, XSAVE, signal mask and queue, rseq, robust list,
//! `clear_child_tid`, sigaltstack and comm — its dump and its restore.
//!
//! Read from outside: `PTRACE_GETREGS`, `PTRACE_GETREGSET(NT_X86_XSTATE)`,
//! `PTRACE_GETSIGMASK`, `PTRACE_PEEKSIGINFO`, `PTRACE_GET_RSEQ_CONFIGURATION`,
//! `get_robust_list`. Injected (no outside interface): `sigaltstack(NULL, &old)` and
//! `prctl(PR_GET_TID_ADDRESS)`.

use ckpt_shared::image::{Rseq, SigAltStack, SigInfo, Thread};
use libc::pid_t;

use crate::freeze::{normalize_restart, FrozenThread};
use crate::inject::{InjectError, Remote};
use crate::sys::{self, nr, ptrace};

#[derive(Debug, thiserror::Error)]
pub enum ThreadError {
    #[error(transparent)]
    Ptrace(#[from] ptrace::PtraceError),
    #[error(transparent)]
    Sys(#[from] sys::SysError),
    #[error(transparent)]
    Inject(#[from] InjectError),
    #[error(transparent)]
    Proc(#[from] sys::proc::ProcError),
    #[error(transparent)]
    Journal(#[from] crate::rescue::RescueError),
    #[error("thread {tid}: register blob has the wrong size ({len} bytes)")]
    BadRegs { tid: pid_t, len: usize },
}

pub fn regs_to_bytes(r: &libc::user_regs_struct) -> Vec<u8> {
    ptrace::regs_as_bytes(r).to_vec()
}

pub fn regs_from_bytes(tid: pid_t, b: &[u8]) -> Result<libc::user_regs_struct, ThreadError> {
    ptrace::regs_from_bytes(b).ok_or(ThreadError::BadRegs { tid, len: b.len() })
}

/// A scratch area on the thread's stack, below the red zone, whose bytes are saved
/// and put back after the injections.
pub struct StackScratch {
    pub addr: u64,
    saved: Vec<u8>,
}

pub const SCRATCH_LEN: u64 = 512;

impl StackScratch {
    pub fn take(tid: pid_t, rsp: u64) -> Result<StackScratch, ThreadError> {
        let addr = (rsp - 1024) & !15;
        let mut saved = vec![0u8; SCRATCH_LEN as usize];
        let n = sys::process_vm_readv(tid, addr, &mut saved)?;
        if n != saved.len() {
            return Err(InjectError::Vanished {
                tid,
                how: "stack scratch area not readable".into(),
            }
            .into());
        }
        Ok(StackScratch { addr, saved })
    }

    /// The journal record that lets a watchdog put the bytes back.
    pub fn record(&self, pid: pid_t, tid: pid_t) -> crate::rescue::Record {
        crate::rescue::Record::Scratch {
            pid,
            tid,
            addr: self.addr,
            bytes: self.saved.clone(),
        }
    }

    pub fn give_back(self, tid: pid_t) -> Result<(), ThreadError> {
        sys::process_vm_writev(tid, self.addr, &self.saved)?;
        Ok(())
    }
}

/// Dump one frozen thread. `syscall_ip` points at a `syscall` instruction in the
/// target (from its vDSO). Its registers and mask are in `journal` already (the
/// freeze put them there); the stack bytes it borrows go there before they are.
pub fn dump(
    pid: pid_t,
    ft: &mut FrozenThread,
    syscall_ip: u64,
    journal: Option<&crate::rescue::Journal>,
) -> Result<(Thread, Vec<i32>), ThreadError> {
    let tid = ft.tid;
    let xsave = ptrace::get_xstate(tid)?;
    let mut pending = Vec::new();
    for raw in ptrace::peek_siginfo(tid, false)? {
        pending.push(siginfo(raw));
    }
    let rseq =
        ptrace::rseq_configuration(tid)?.map(|(abi_pointer, abi_size, signature, flags)| Rseq {
            abi_pointer,
            abi_size,
            flags,
            signature,
        });
    let robust_list = sys::get_robust_list(tid)?;
    let comm = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm"))
        .map(|s| s.trim_end_matches('\n').to_string())
        .unwrap_or_default();

    // Injections: block every signal first so none is delivered while we step.
    let scratch = StackScratch::take(tid, ft.regs.rsp)?;
    crate::rescue::note(journal, scratch.record(pid, tid))?;
    ft.touched = true;
    ptrace::set_sigmask(tid, !0)?;
    let mut remote = Remote {
        tid,
        syscall_ip,
        base: ft.regs,
        scratch: scratch.addr,
        scratch_len: SCRATCH_LEN,
        new_children: Vec::new(),
        swallowed: Vec::new(),
    };
    let result = (|| -> Result<(SigAltStack, u64), ThreadError> {
        let ss = remote.scratch;
        remote.syscall(nr::SIGALTSTACK, [0, ss, 0, 0, 0, 0])?;
        let b = remote.get(0, 24)?;
        let word = |i: usize| u64::from_ne_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        let alt = SigAltStack {
            sp: word(0),
            flags: word(1) as i32,
            size: word(2),
        };
        remote.syscall(nr::PRCTL, [libc::PR_GET_TID_ADDRESS as u64, ss, 0, 0, 0, 0])?;
        let b = remote.get(0, 8)?;
        Ok((alt, u64::from_ne_bytes(b.try_into().expect("8 bytes"))))
    })();
    scratch.give_back(tid)?;
    let (sigaltstack, clear_child_tid) = result?;

    let mut regs = ft.regs;
    normalize_restart(&mut regs);
    Ok((
        Thread {
            tid,
            comm,
            regs: regs_to_bytes(&regs),
            xsave,
            sigmask: ft.sigmask,
            pending,
            rseq,
            robust_list,
            clear_child_tid,
            sigaltstack,
        },
        remote.swallowed,
    ))
}

pub fn siginfo(raw: [u8; 128]) -> SigInfo {
    SigInfo {
        signo: i32::from_ne_bytes(raw[0..4].try_into().expect("4 bytes")),
        raw: raw.to_vec(),
    }
}

/// Restore the per-thread kernel state of a husk thread (everything but registers,
/// mask and credentials, which come last). The thread runs injections through `r`.
pub fn restore_state(r: &mut Remote, t: &Thread) -> Result<(), ThreadError> {
    if t.robust_list.0 != 0 {
        r.syscall(
            nr::SET_ROBUST_LIST,
            [t.robust_list.0, t.robust_list.1, 0, 0, 0, 0],
        )?;
    }
    r.syscall(nr::SET_TID_ADDRESS, [t.clear_child_tid, 0, 0, 0, 0, 0])?;
    if let Some(rs) = &t.rseq {
        r.syscall(
            nr::RSEQ,
            [
                rs.abi_pointer,
                rs.abi_size as u64,
                0,
                rs.signature as u64,
                0,
                0,
            ],
        )?;
    }
    if t.sigaltstack.flags & libc::SS_DISABLE == 0 {
        let mut b = Vec::with_capacity(24);
        b.extend_from_slice(&t.sigaltstack.sp.to_ne_bytes());
        b.extend_from_slice(
            &(t.sigaltstack.flags as u64 & !(libc::SS_ONSTACK as u64)).to_ne_bytes(),
        );
        b.extend_from_slice(&t.sigaltstack.size.to_ne_bytes());
        let a = r.put(0, &b)?;
        r.syscall(nr::SIGALTSTACK, [a, 0, 0, 0, 0, 0])?;
    }
    let a = r.put_str(0, &t.comm)?;
    r.syscall(nr::PRCTL, [libc::PR_SET_NAME as u64, a, 0, 0, 0, 0])?;
    Ok(())
}

/// Queue the thread's own pending signals again (as the thread itself, which may
/// queue any si_code to itself), with every signal blocked so none fires early.
pub fn restore_pending(r: &mut Remote, pid: pid_t, t: &Thread) -> Result<(), ThreadError> {
    for s in &t.pending {
        let a = r.put(0, &s.raw)?;
        r.syscall(
            nr::RT_TGSIGQUEUEINFO,
            [pid as u64, t.tid as u64, s.signo as u64, a, 0, 0],
        )?;
    }
    Ok(())
}

/// Last step for a thread: the mask, the extended state and the registers.
/// `host_tid` is the thread as the restorer sees it (it differs from `t.tid` in a
/// new PID namespace).
pub fn restore_final(host_tid: pid_t, t: &Thread) -> Result<(), ThreadError> {
    let regs = regs_from_bytes(host_tid, &t.regs)?;
    ptrace::set_xstate(host_tid, &t.xsave)?;
    ptrace::set_sigmask(host_tid, t.sigmask)?;
    ptrace::set_regs(host_tid, &regs)?;
    Ok(())
}
