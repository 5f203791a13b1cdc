//! ptrace(2) wrappers.
//!
//! Kernel contract: `PTRACE_SEIZE`/`PTRACE_INTERRUPT` (3.4), `PTRACE_GETSIGMASK` and
//! `PTRACE_PEEKSIGINFO` (3.11), `PTRACE_GET_RSEQ_CONFIGURATION` (5.13). The caller
//! must be the thread that attached: ptrace requests from another thread of the
//! tracer fail with ESRCH, so all tracing stays on one thread of the agent.

use std::io;

use libc::{c_long, c_void, pid_t, user_regs_struct};

pub const O_TRACESYSGOOD: c_long = 1;
pub const O_TRACEFORK: c_long = 1 << 1;
pub const O_TRACECLONE: c_long = 1 << 3;
pub const O_EXITKILL: c_long = 1 << 20;

pub const EVENT_FORK: i32 = 1;
pub const EVENT_CLONE: i32 = 3;
pub const EVENT_STOP: i32 = 128;

const PTRACE_GET_RSEQ_CONFIGURATION: libc::c_uint = 0x420f;
const PTRACE_SETSIGMASK: libc::c_uint = 0x420b;
const PTRACE_GETSIGMASK: libc::c_uint = 0x420a;
const PTRACE_PEEKSIGINFO: libc::c_uint = 0x4209;
const PTRACE_PEEKSIGINFO_SHARED: u32 = 1;
const NT_X86_XSTATE: usize = 0x202;

/// A ptrace failure: the request name and the thread.
#[derive(Debug, thiserror::Error)]
#[error("ptrace({op}) on thread {tid}: {source}")]
pub struct PtraceError {
    pub op: &'static str,
    pub tid: pid_t,
    #[source]
    pub source: io::Error,
}

type Result<T> = std::result::Result<T, PtraceError>;

fn check(op: &'static str, tid: pid_t, ret: c_long) -> Result<c_long> {
    if ret == -1 {
        Err(PtraceError {
            op,
            tid,
            source: io::Error::last_os_error(),
        })
    } else {
        Ok(ret)
    }
}

/// # Safety
/// `addr` and `data` must be valid for the request as ptrace(2) documents it.
unsafe fn raw(req: libc::c_uint, tid: pid_t, addr: *mut c_void, data: *mut c_void) -> c_long {
    // SAFETY: forwarded; the caller vouches for addr/data.
    unsafe { libc::ptrace(req, tid, addr, data) }
}

pub fn seize(tid: pid_t, options: c_long) -> Result<()> {
    // SAFETY: PTRACE_SEIZE takes the options in data and no pointers.
    let r = unsafe {
        raw(
            libc::PTRACE_SEIZE,
            tid,
            std::ptr::null_mut(),
            options as *mut c_void,
        )
    };
    check("SEIZE", tid, r).map(drop)
}

pub fn interrupt(tid: pid_t) -> Result<()> {
    // SAFETY: no pointers.
    let r = unsafe {
        raw(
            libc::PTRACE_INTERRUPT,
            tid,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
    };
    check("INTERRUPT", tid, r).map(drop)
}

pub fn set_options(tid: pid_t, options: c_long) -> Result<()> {
    // SAFETY: options in data, no pointers.
    let r = unsafe {
        raw(
            libc::PTRACE_SETOPTIONS,
            tid,
            std::ptr::null_mut(),
            options as *mut c_void,
        )
    };
    check("SETOPTIONS", tid, r).map(drop)
}

/// Detach, delivering `sig` (0 for none).
pub fn detach(tid: pid_t, sig: i32) -> Result<()> {
    // SAFETY: signal number in data, no pointers.
    let r = unsafe {
        raw(
            libc::PTRACE_DETACH,
            tid,
            std::ptr::null_mut(),
            sig as c_long as *mut c_void,
        )
    };
    check("DETACH", tid, r).map(drop)
}

/// Resume until the next system-call entry or exit.
pub fn syscall(tid: pid_t, sig: i32) -> Result<()> {
    // SAFETY: signal number in data, no pointers.
    let r = unsafe {
        raw(
            libc::PTRACE_SYSCALL,
            tid,
            std::ptr::null_mut(),
            sig as c_long as *mut c_void,
        )
    };
    check("SYSCALL", tid, r).map(drop)
}

pub fn cont(tid: pid_t, sig: i32) -> Result<()> {
    // SAFETY: signal number in data, no pointers.
    let r = unsafe {
        raw(
            libc::PTRACE_CONT,
            tid,
            std::ptr::null_mut(),
            sig as c_long as *mut c_void,
        )
    };
    check("CONT", tid, r).map(drop)
}

pub fn get_regs(tid: pid_t) -> Result<user_regs_struct> {
    // SAFETY: user_regs_struct is plain old data; all-zero is a valid value.
    let mut regs: user_regs_struct = unsafe { std::mem::zeroed() };
    // SAFETY: PTRACE_GETREGS writes exactly one user_regs_struct to data.
    let r = unsafe {
        raw(
            libc::PTRACE_GETREGS,
            tid,
            std::ptr::null_mut(),
            (&mut regs as *mut user_regs_struct).cast(),
        )
    };
    check("GETREGS", tid, r)?;
    Ok(regs)
}

pub fn set_regs(tid: pid_t, regs: &user_regs_struct) -> Result<()> {
    // SAFETY: PTRACE_SETREGS reads one user_regs_struct from data.
    let r = unsafe {
        raw(
            libc::PTRACE_SETREGS,
            tid,
            std::ptr::null_mut(),
            (regs as *const user_regs_struct).cast_mut().cast(),
        )
    };
    check("SETREGS", tid, r).map(drop)
}

/// The XSAVE area (`NT_X86_XSTATE`), as long as the kernel makes it.
pub fn get_xstate(tid: pid_t) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: the iovec points at `buf`, which lives across the call; the kernel
    // shrinks iov_len to what it wrote.
    let r = unsafe {
        raw(
            libc::PTRACE_GETREGSET,
            tid,
            NT_X86_XSTATE as *mut c_void,
            (&mut iov as *mut libc::iovec).cast(),
        )
    };
    check("GETREGSET(NT_X86_XSTATE)", tid, r)?;
    buf.truncate(iov.iov_len);
    Ok(buf)
}

pub fn set_xstate(tid: pid_t, xstate: &[u8]) -> Result<()> {
    let mut iov = libc::iovec {
        iov_base: xstate.as_ptr().cast_mut().cast(),
        iov_len: xstate.len(),
    };
    // SAFETY: the kernel only reads iov_len bytes from the buffer for SETREGSET.
    let r = unsafe {
        raw(
            libc::PTRACE_SETREGSET,
            tid,
            NT_X86_XSTATE as *mut c_void,
            (&mut iov as *mut libc::iovec).cast(),
        )
    };
    check("SETREGSET(NT_X86_XSTATE)", tid, r).map(drop)
}

pub fn get_sigmask(tid: pid_t) -> Result<u64> {
    let mut mask: u64 = 0;
    // SAFETY: addr is the size of the mask (8), data points at a u64.
    let r = unsafe {
        raw(
            PTRACE_GETSIGMASK,
            tid,
            8 as *mut c_void,
            (&mut mask as *mut u64).cast(),
        )
    };
    check("GETSIGMASK", tid, r)?;
    Ok(mask)
}

pub fn set_sigmask(tid: pid_t, mask: u64) -> Result<()> {
    let mut m = mask;
    // SAFETY: addr is the size of the mask (8), data points at a u64.
    let r = unsafe {
        raw(
            PTRACE_SETSIGMASK,
            tid,
            8 as *mut c_void,
            (&mut m as *mut u64).cast(),
        )
    };
    check("SETSIGMASK", tid, r).map(drop)
}

#[repr(C)]
struct PeekSigInfoArgs {
    off: u64,
    flags: u32,
    nr: i32,
}

/// Queued signals without dequeuing them: the thread's own queue, or the shared
/// (process-wide) one. Each entry is a raw 128-byte `siginfo_t`.
pub fn peek_siginfo(tid: pid_t, shared: bool) -> Result<Vec<[u8; 128]>> {
    let mut out = Vec::new();
    loop {
        let mut buf = [[0u8; 128]; 32];
        let mut args = PeekSigInfoArgs {
            off: out.len() as u64,
            flags: if shared { PTRACE_PEEKSIGINFO_SHARED } else { 0 },
            nr: buf.len() as i32,
        };
        // SAFETY: addr points at the args struct, data at room for `nr` siginfos.
        let r = unsafe {
            raw(
                PTRACE_PEEKSIGINFO,
                tid,
                (&mut args as *mut PeekSigInfoArgs).cast(),
                buf.as_mut_ptr().cast(),
            )
        };
        let n = check("PEEKSIGINFO", tid, r)? as usize;
        out.extend_from_slice(&buf[..n]);
        if n < buf.len() {
            return Ok(out);
        }
    }
}

#[repr(C)]
#[derive(Default)]
struct RseqConfiguration {
    rseq_abi_pointer: u64,
    rseq_abi_size: u32,
    signature: u32,
    flags: u32,
    pad: u32,
}

/// The thread's rseq registration, if any: (pointer, size, signature, flags).
pub fn rseq_configuration(tid: pid_t) -> Result<Option<(u64, u32, u32, u32)>> {
    let mut conf = RseqConfiguration::default();
    // SAFETY: addr is the size of the struct, data points at it.
    let r = unsafe {
        raw(
            PTRACE_GET_RSEQ_CONFIGURATION,
            tid,
            std::mem::size_of::<RseqConfiguration>() as *mut c_void,
            (&mut conf as *mut RseqConfiguration).cast(),
        )
    };
    check("GET_RSEQ_CONFIGURATION", tid, r)?;
    Ok((conf.rseq_abi_pointer != 0).then_some((
        conf.rseq_abi_pointer,
        conf.rseq_abi_size,
        conf.signature,
        conf.flags,
    )))
}

/// Why a traced thread stopped, as `waitpid(__WALL)` reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// A system-call entry or exit stop (`SIGTRAP | 0x80`).
    Syscall,
    /// A `PTRACE_EVENT_*` stop; `sig` is the stop signal for `EVENT_STOP`.
    Event {
        event: i32,
        sig: i32,
    },
    /// A signal-delivery stop.
    Signal(i32),
    Exited(i32),
    Killed(i32),
}

/// Wait for `tid` (any thread, child or not) to change state.
pub fn wait(tid: pid_t) -> Result<Stop> {
    let mut status = 0;
    loop {
        // SAFETY: status is a valid out-pointer.
        let r = unsafe { libc::waitpid(tid, &mut status, libc::__WALL) };
        if r == -1 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(PtraceError {
                op: "waitpid",
                tid,
                source: e,
            });
        }
        break;
    }
    Ok(decode_status(status))
}

pub fn decode_status(status: i32) -> Stop {
    if libc::WIFEXITED(status) {
        Stop::Exited(libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        Stop::Killed(libc::WTERMSIG(status))
    } else {
        let sig = libc::WSTOPSIG(status);
        let event = status >> 16;
        if sig == (libc::SIGTRAP | 0x80) {
            Stop::Syscall
        } else if event != 0 {
            Stop::Event { event, sig }
        } else {
            Stop::Signal(sig)
        }
    }
}

/// `PTRACE_GETEVENTMSG`: the new PID after a fork/clone event.
pub fn event_msg(tid: pid_t) -> Result<u64> {
    let mut msg: libc::c_ulong = 0;
    // SAFETY: data points at one unsigned long.
    let r = unsafe {
        raw(
            libc::PTRACE_GETEVENTMSG,
            tid,
            std::ptr::null_mut(),
            (&mut msg as *mut libc::c_ulong).cast(),
        )
    };
    check("GETEVENTMSG", tid, r)?;
    Ok(msg)
}

/// The bytes of a register set, as the image stores them (the kernel's
/// `user_regs_struct` layout).
pub fn regs_as_bytes(r: &user_regs_struct) -> &[u8] {
    // SAFETY: user_regs_struct is plain old data of 27 u64s with no padding; viewing
    // it as bytes for its exact size, for as long as `r` is borrowed, is sound.
    unsafe {
        std::slice::from_raw_parts(
            (r as *const user_regs_struct).cast::<u8>(),
            std::mem::size_of_val(r),
        )
    }
}

/// A register set from its bytes ([`regs_as_bytes`]); `None` when `b` is not
/// exactly one set long.
pub fn regs_from_bytes(b: &[u8]) -> Option<user_regs_struct> {
    if b.len() != std::mem::size_of::<user_regs_struct>() {
        return None;
    }
    // SAFETY: the length matches exactly and every bit pattern is a valid
    // user_regs_struct (all fields are integers); read_unaligned copes with alignment.
    Some(unsafe { std::ptr::read_unaligned(b.as_ptr().cast::<user_regs_struct>()) })
}
