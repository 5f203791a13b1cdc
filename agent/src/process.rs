//! Process-wide state — dump and restore: identity (session, group, credentials),
//! the mm fields (`PR_SET_MM_MAP`), rlimits, cwd, umask, personality, and the
//! state only the process itself can tell (signal handlers, timers, `brk`), read by
//! system calls injected into its leader.
//!
//! Threads ([`crate::thread`]), memory ([`crate::mem`]) and descriptors
//! ([`crate::fd`]) keep their own state; this module assembles one
//! [`ckpt_shared::image::Process`] from what it reads itself and what they give it.

use std::os::fd::OwnedFd;

use ckpt_shared::image::{self, Creds, Mapping, MmFields, Process, Thread};
use libc::pid_t;
use tracing::warn;

use crate::dump::DumpError;
use crate::freeze::FrozenProcess;
use crate::inject::{InjectError, Remote};
use crate::mem::{self, ShmemPlan};
use crate::rescue::{self, Journal, Record};
use crate::signals::{self, SignalState};
use crate::sys::{self, nr, proc};
use crate::thread::{self, StackScratch, ThreadError, SCRATCH_LEN};

/// What the dump learns by injecting system calls into a process's leader.
pub struct Injected {
    pub signals: SignalState,
    pub brk: u64,
    /// The process's userfaultfd for write tracking (reused or new), if any.
    pub uffd: Option<OwnedFd>,
}

/// How write tracking wants the process's userfaultfd.
pub enum Uffd {
    /// None wanted.
    None,
    /// The one the holder kept from the last arming.
    Reuse(OwnedFd),
    /// A new one, created inside the process.
    Create,
}

/// Reads every thread of `fp` (registers, FPU, pending signals…) and then the
/// process-wide state that needs injected calls into its leader. The injections
/// borrow scratch bytes below the leader's stack pointer and put them back; the
/// registers and masks go back ([`FrozenProcess::settle`]) before this returns,
/// whatever failed.
pub fn dump_threads_and_injected(
    fp: &mut FrozenProcess,
    syscall_ip: u64,
    uffd: Uffd,
    journal: Option<&Journal>,
) -> Result<(Vec<Thread>, Injected), DumpError> {
    let pid = fp.pid;
    let mut threads = Vec::new();
    for t in &mut fp.threads {
        let (th, swallowed) = thread::dump(pid, t, syscall_ip, journal)?;
        fp.swallowed
            .extend(swallowed.into_iter().map(|s| (t.tid, s)));
        threads.push(th);
    }
    let leader = &fp.threads[0];
    let scratch = StackScratch::take(leader.tid, leader.regs.rsp)?;
    rescue::note(journal, scratch.record(pid, leader.tid)).map_err(ThreadError::from)?;
    let mut remote = Remote {
        tid: leader.tid,
        syscall_ip,
        base: leader.regs,
        scratch: scratch.addr,
        scratch_len: SCRATCH_LEN,
        new_children: Vec::new(),
        swallowed: Vec::new(),
    };
    let got = (|| -> Result<_, DumpError> {
        let signals = signals::dump(&mut remote, pid)?;
        let brk = remote.syscall(nr::BRK, [0; 6])?;
        let uffd = match uffd {
            Uffd::Reuse(fd) => Some(fd),
            Uffd::Create => {
                let before = rescue::uffd_fds(pid);
                rescue::note(journal, Record::Uffd { pid, before }).map_err(ThreadError::from)?;
                let fd = crate::track::create(&mut remote)?;
                rescue::note(journal, Record::UffdClosed { pid }).map_err(ThreadError::from)?;
                fd
            }
            Uffd::None => None,
        };
        Ok(Injected { signals, brk, uffd })
    })();
    let leader_tid = leader.tid;
    scratch.give_back(leader_tid)?;
    fp.swallowed
        .extend(remote.swallowed.iter().map(|&s| (leader_tid, s)));
    fp.settle();
    Ok((threads, got?))
}

/// The process-wide state of `pid` read from `/proc` (no injection), with the
/// threads and injected state already read, and its mappings classified
/// (`shmem` gathers the shared anonymous memory of the whole tree).
pub fn describe(
    fp: &FrozenProcess,
    vmas: &[proc::Vma],
    threads: Vec<Thread>,
    injected: SignalState,
    brk: u64,
    shmem: &mut ShmemPlan,
) -> Result<Process, DumpError> {
    let pid = fp.pid;
    let leader = &fp.threads[0];
    let shared_pending = sys::ptrace::peek_siginfo(leader.tid, true)
        .map_err(ThreadError::from)?
        .into_iter()
        .map(thread::siginfo)
        .collect();
    let st = proc::stat(pid)?;
    let status = proc::status(pid)?;
    let rlimits = proc::limits(pid)?;
    let personality = std::fs::read_to_string(format!("/proc/{pid}/personality"))
        .ok()
        .and_then(|s| u32::from_str_radix(s.trim(), 16).ok())
        .unwrap_or(0);
    let mappings = vmas
        .iter()
        .map(|v| mapping(pid, v, shmem))
        .collect::<Result<Vec<_>, _>>()?;
    let SignalState {
        actions: sigactions,
        itimers,
        timers: posix_timers,
    } = injected;
    Ok(Process {
        pid,
        ppid: st.ppid,
        pgid: st.pgid,
        sid: st.sid,
        threads,
        mappings,
        mm: MmFields {
            start_code: st.start_code,
            end_code: st.end_code,
            start_data: st.start_data,
            end_data: st.end_data,
            start_brk: st.start_brk,
            brk,
            start_stack: st.start_stack,
            arg_start: st.arg_start,
            arg_end: st.arg_end,
            env_start: st.env_start,
            env_end: st.env_end,
            auxv: proc::auxv(pid)?,
            exe: proc::readlink(format!("/proc/{pid}/exe"))?,
        },
        fds: Vec::new(),
        sigactions,
        shared_pending,
        itimers,
        posix_timers,
        rlimits,
        cwd: proc::readlink(format!("/proc/{pid}/cwd"))?,
        umask: status.umask,
        creds: Creds {
            uid: status.uid,
            gid: status.gid,
            groups: status.groups,
        },
        stopped: fp.stopped,
        personality,
    })
}

/// One mapping as the image records it (its data is filled in once stored).
fn mapping(pid: pid_t, v: &proc::Vma, shmem: &mut ShmemPlan) -> Result<Mapping, DumpError> {
    let kind = mem::classify(pid, v, shmem)?;
    let prot = [
        (v.read, image::prot::READ),
        (v.write, image::prot::WRITE),
        (v.exec, image::prot::EXEC),
    ]
    .iter()
    .filter(|(on, _)| *on)
    .fold(0, |acc, (_, bit)| acc | bit);
    Ok(Mapping {
        start: v.start,
        end: v.end,
        prot,
        shared: v.shared,
        kind,
        vm_flags: v.vm_flags.clone(),
        data: Vec::new(),
    })
}

/// cwd, umask, personality and rlimits, from inside the husk.
pub fn restore_environment(r: &mut Remote, p: &Process) -> Result<(), InjectError> {
    let a = r.put_str(0, &p.cwd)?;
    r.syscall(nr::CHDIR, [a, 0, 0, 0, 0, 0])?;
    r.syscall(nr::UMASK, [p.umask as u64, 0, 0, 0, 0, 0])?;
    if p.personality != 0 {
        r.syscall(nr::PERSONALITY, [p.personality as u64, 0, 0, 0, 0, 0])?;
    }
    for &(res, soft, hard) in &p.rlimits {
        // From inside the husk: prlimit on another process needs CAP_SYS_RESOURCE,
        // which a restoring root may not have.
        let a = r.put(0, &[soft.to_ne_bytes(), hard.to_ne_bytes()].concat())?;
        if let Err(e) = r.syscall(nr::PRLIMIT64, [0, res as u64, a, 0, 0, 0]) {
            warn!(pid = p.pid, res, soft, hard, %e, "rlimit not restored");
        }
    }
    Ok(())
}

/// The mm fields (`PR_SET_MM_MAP`: code, data, brk, stack, args, env, auxv, and
/// the exe link through `exe_fd`, a descriptor of the husk's).
pub fn restore_mm(r: &mut Remote, p: &Process, exe_fd: u64) -> Result<(), InjectError> {
    let mm = &p.mm;
    let auxv: Vec<u8> = mm.auxv.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let auxv_addr = r.put(512, &auxv)?;
    let mut b = Vec::with_capacity(104);
    for w in [
        mm.start_code,
        mm.end_code,
        mm.start_data,
        mm.end_data,
        mm.start_brk,
        mm.brk,
        mm.start_stack,
        mm.arg_start,
        mm.arg_end,
        mm.env_start,
        mm.env_end,
        auxv_addr,
    ] {
        b.extend_from_slice(&w.to_ne_bytes());
    }
    b.extend_from_slice(&(auxv.len() as u32).to_ne_bytes());
    b.extend_from_slice(&(exe_fd as u32).to_ne_bytes());
    let a = r.put(0, &b)?;
    const PR_SET_MM: u64 = 35;
    const PR_SET_MM_MAP: u64 = 14;
    r.syscall(
        nr::PRCTL,
        [PR_SET_MM, PR_SET_MM_MAP, a, b.len() as u64, 0, 0],
    )?;
    Ok(())
}

/// Credentials of one thread (they are per thread in the kernel), set last.
pub fn restore_creds(r: &mut Remote, p: &Process) -> Result<(), InjectError> {
    let c = &p.creds;
    if c.uid == [0; 4] && c.gid == [0; 4] && c.groups.is_empty() {
        return Ok(());
    }
    let groups: Vec<u8> = c.groups.iter().flat_map(|g| g.to_ne_bytes()).collect();
    let a = r.put(0, &groups)?;
    r.syscall(nr::SETGROUPS, [c.groups.len() as u64, a, 0, 0, 0, 0])?;
    r.syscall(
        nr::SETRESGID,
        [c.gid[0] as u64, c.gid[1] as u64, c.gid[2] as u64, 0, 0, 0],
    )?;
    r.syscall(nr::SETFSGID, [c.gid[3] as u64, 0, 0, 0, 0, 0])?;
    r.syscall(
        nr::SETRESUID,
        [c.uid[0] as u64, c.uid[1] as u64, c.uid[2] as u64, 0, 0, 0],
    )?;
    r.syscall(nr::SETFSUID, [c.uid[3] as u64, 0, 0, 0, 0, 0])?;
    Ok(())
}
