//! Safe, typed wrappers around the system calls the agent makes on its own behalf.
//!
//! Kernel contract: Linux ≥ 5.14 on x86_64 (`pidfd_getfd` 5.6, `close_range` 5.9,
//! `PTRACE_GET_RSEQ_CONFIGURATION` 5.13, `MADV_POPULATE_WRITE` 5.14, `clone3` with
//! `set_tid` 5.5). The caller needs `CAP_SYS_PTRACE` over the targets and
//! `CAP_CHECKPOINT_RESTORE` (or root) to choose PIDs.
//!
//! Every `unsafe` block in the agent that talks to the kernel lives under this module.

pub mod fd;
pub mod mem;
pub mod nr;
pub mod proc;
pub mod ptrace;
pub mod socket;
pub mod syscalls;
pub mod uffd;

pub use socket::socket_domain_type;
pub use syscalls::*;
pub use uffd::pagemap_scan_written;
