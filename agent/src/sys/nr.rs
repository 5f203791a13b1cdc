//! x86_64 system call numbers, for the calls the agent injects into a tracee.
//!
//! Kernel contract: none of its own (constants only, no call). Each injected
//! call needs what its own man page says, in the target, checked where it is
//! injected (`inject.rs` and its callers): the newest are `pidfd_getfd` (438,
//! Linux ≥ 5.6), `close_range` (436, ≥ 5.9) and `clone3` (435, ≥ 5.3); `rseq`
//! ≥ 4.18, `userfaultfd` ≥ 4.3.
//!
//! These are ABI constants; we spell them out rather than take them from `libc` so the
//! injected calls read the same as the kernel's `syscall_64.tbl`.

pub const READ: u64 = 0;
pub const CLOSE: u64 = 3;
pub const LSEEK: u64 = 8;
pub const MMAP: u64 = 9;
pub const SHMAT: u64 = 30;
pub const SHMCTL: u64 = 31;
pub const MPROTECT: u64 = 10;
pub const MUNMAP: u64 = 11;
pub const BRK: u64 = 12;
pub const RT_SIGACTION: u64 = 13;
pub const IOCTL: u64 = 16;
pub const MADVISE: u64 = 28;
pub const GETITIMER: u64 = 36;
pub const SETITIMER: u64 = 38;
pub const FCNTL: u64 = 72;
pub const CHDIR: u64 = 80;
pub const UMASK: u64 = 95;
pub const SETPGID: u64 = 109;
pub const SETSID: u64 = 112;
pub const SETGROUPS: u64 = 116;
pub const SETRESUID: u64 = 117;
pub const SETRESGID: u64 = 119;
pub const SETFSUID: u64 = 122;
pub const SETFSGID: u64 = 123;
pub const RT_SIGQUEUEINFO: u64 = 129;
pub const SIGALTSTACK: u64 = 131;
pub const PERSONALITY: u64 = 135;
pub const PRCTL: u64 = 157;
pub const ARCH_PRCTL: u64 = 158;
pub const SET_TID_ADDRESS: u64 = 218;
pub const RESTART_SYSCALL: u64 = 219;
pub const TIMER_CREATE: u64 = 222;
pub const TIMER_SETTIME: u64 = 223;
pub const TIMER_GETTIME: u64 = 224;
pub const SET_ROBUST_LIST: u64 = 273;
pub const DUP3: u64 = 292;
pub const RT_TGSIGQUEUEINFO: u64 = 297;
pub const PRLIMIT64: u64 = 302;
pub const USERFAULTFD: u64 = 323;
pub const RSEQ: u64 = 334;
pub const PIDFD_OPEN: u64 = 434;
pub const CLONE3: u64 = 435;
pub const CLOSE_RANGE: u64 = 436;
pub const PIDFD_GETFD: u64 = 438;
pub const EPOLL_CTL: u64 = 233;
