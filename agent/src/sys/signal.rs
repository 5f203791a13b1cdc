//! Our own signal handlers (not the targets'): SIGINT and SIGTERM only set a flag
//! (see [`crate::cancel`]).
//!
//! Kernel contract: `rt_sigaction` (any Linux); no capability.

use std::sync::atomic::{AtomicI32, AtomicPtr, Ordering};
use std::sync::Arc;

use super::SysError;

/// The flag the handler sets: a leaked `Arc`, never freed, so the handler may read
/// it at any instant.
static FLAG: AtomicPtr<AtomicI32> = AtomicPtr::new(std::ptr::null_mut());

extern "C" fn on_signal(sig: libc::c_int) {
    let p = FLAG.load(Ordering::SeqCst);
    if !p.is_null() {
        // SAFETY: `p` comes from `Arc::into_raw` in `cancel_on` and is never
        // released; an atomic store is async-signal-safe.
        unsafe { (*p).store(sig, Ordering::SeqCst) };
    }
}

/// From now on, each of `signals` stores its number into `flag` instead of ending
/// the process (a second one too: the clean-up it started is not cut short). The
/// handler restarts interrupted system calls (`SA_RESTART`), so no code of ours sees
/// EINTR. A later call replaces the flag.
pub fn cancel_on(signals: &[i32], flag: Arc<AtomicI32>) -> Result<(), SysError> {
    FLAG.store(Arc::into_raw(flag).cast_mut(), Ordering::SeqCst);
    for &sig in signals {
        // SAFETY: a zeroed sigaction is a valid value of the plain C struct; every
        // field we rely on is set below.
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        sa.sa_flags = libc::SA_RESTART;
        // SAFETY: `sa.sa_mask` is a valid sigset_t inside `sa`.
        unsafe { libc::sigemptyset(&mut sa.sa_mask) };
        // SAFETY: `sa` is initialised, the old action is not asked for (null), and
        // the handler only does an atomic store.
        if unsafe { libc::sigaction(sig, &sa, std::ptr::null_mut()) } < 0 {
            return Err(SysError::last("sigaction", sig));
        }
    }
    Ok(())
}
