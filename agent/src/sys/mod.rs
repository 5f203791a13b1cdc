//! Safe, typed wrappers around the system calls the agent makes on its own behalf.
//!
//! Kernel contract: Linux ≥ 5.14 on x86_64 (`pidfd_getfd` 5.6, `close_range` 5.9,
//! `PTRACE_GET_RSEQ_CONFIGURATION` 5.13, `MADV_POPULATE_WRITE` 5.14, `clone3` with
//! `set_tid` 5.5). The caller needs `CAP_SYS_PTRACE` over the targets and
//! `CAP_CHECKPOINT_RESTORE` (or root) to choose PIDs.
//!
//! Each file is one kernel area, and its module doc states what that area needs:
//! [`ptrace`], [`proc`] (`/proc/PID/*`), [`socket`] (TCP_REPAIR: Linux ≥ 3.5,
//! CAP_NET_ADMIN), [`uffd`] (userfaultfd, PAGEMAP_SCAN: ≥ 6.7), [`mem`] (our own
//! mappings), [`fd`] (status flags, positions, eventfd, epoll), [`restorer`] (the
//! restorer's own calls: `clone3` with `set_tid`, its trampoline, memfds),
//! [`pidns`] (a new PID namespace and its init), [`spawn`] (our helper
//! processes), [`signal`] (our own SIGINT/SIGTERM handler), [`timer`] (timerfd, signalfd),
//! [`tty`] (pseudo-terminals) and [`syscalls`] (`pidfd_getfd`:
//! ≥ 5.6, PTRACE_MODE_ATTACH_REALCREDS; `kcmp`, pipes, signals).
//!
//! Every raw system call the agent makes for itself goes through a small safe
//! wrapper here, named after the call, and every `unsafe` block belongs here with
//! its `// SAFETY:` reason. The descriptor kinds (`fd/`), `mem`, `thread`,
//! `signals`, `inject`, `freeze` and `restore` hold none, and the crate root denies
//! `unsafe_code` everywhere but here.

pub mod fd;
pub mod mem;
pub mod nr;
pub mod pidns;
pub mod proc;
pub mod ptrace;
pub mod restorer;
pub mod shm;
pub mod signal;
pub mod socket;
pub mod spawn;
pub mod syscalls;
pub mod timer;
pub mod tty;
pub mod uffd;
pub mod unix;

pub use socket::socket_domain_type;
pub use syscalls::*;
pub use uffd::pagemap_scan_written;
