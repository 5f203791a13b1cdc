//! The checkpoint image model.
//!
//! An image is one [`Image`] manifest plus the content-addressed chunks its memory
//! extents name. The manifest is plain data: it is encoded by [`crate::codec`] and the
//! chunks live in a [`crate::store::ChunkStore`]. Everything here is what the dumper
//! read from outside the process, in the form the restorer needs to rebuild it.
//!
//! Register blobs (`user_regs_struct`, XSAVE) are kept as raw bytes in the kernel's
//! layout for the architecture named in [`Image::arch`]; restore refuses an image of
//! another architecture before it looks at them.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// Version of the image format. Bumped on every incompatible change; restore refuses
/// any other version with a message naming both.
pub const FORMAT_VERSION: u32 = 1;

/// Architecture string this build produces and accepts.
pub const ARCH: &str = "x86_64";

/// Page size the image was taken with (x86_64 base pages).
pub const PAGE_SIZE: u64 = 4096;

/// A whole process-tree image.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Image {
    pub format_version: u32,
    /// `x86_64`.
    pub arch: String,
    /// Version of the tool that wrote the image (for messages only).
    pub tool_version: String,
    /// Seconds since the epoch at which the tree was frozen.
    pub created_unix: u64,
    pub host: HostFingerprint,
    /// PID of the root of the dumped tree.
    pub root_pid: i32,
    /// Every process of the tree, parents before children.
    pub processes: Vec<Process>,
    /// Open file descriptions, shared by the descriptors that refer to them.
    pub files: Vec<OpenFile>,
    /// Shared memory objects (shared anonymous mappings), filled from chunks.
    pub shmem: Vec<SharedMemory>,
    /// Files that mappings or descriptors depend on, checked before restore.
    pub file_checks: Vec<FileCheck>,
    /// Figures of the dump (freeze time, bytes), for `inspect` and the demo.
    pub stats: DumpStats,
}

impl Image {
    /// Every stored extent the image references: what a gc must keep, what a
    /// restore must find and what decoding checks. A new kind of content stored in
    /// chunks is added here, and only here.
    pub fn extents(&self) -> impl Iterator<Item = &Extent> {
        self.processes
            .iter()
            .flat_map(|p| p.mappings.iter().flat_map(|m| m.data.iter()))
            .chain(self.shmem.iter().flat_map(|s| s.data.iter()))
    }
}

/// What the restorer compares with the host before it maps anything.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HostFingerprint {
    /// `uname -r` of the dumping host (informational).
    pub kernel: String,
    /// Hostname of the dumping host (informational).
    pub hostname: String,
    /// XCR0: the XSAVE feature mask the registers were saved with.
    pub xcr0: u64,
    /// Size in bytes of the XSAVE area (`NT_X86_XSTATE`).
    pub xsave_size: u32,
    /// BLAKE3 of the vDSO text, and its size in bytes.
    pub vdso_hash: [u8; 32],
    pub vdso_size: u64,
    /// Size of the vvar area in front of the vDSO.
    pub vvar_size: u64,
}

/// Figures measured while dumping.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct DumpStats {
    /// How long the tree was stopped, in microseconds.
    pub freeze_us: u64,
    /// Total wall time of the dump, in microseconds.
    pub total_us: u64,
    /// Bytes of memory captured (before dedup and compression).
    pub memory_bytes: u64,
    /// Bytes written to the store (chunks, after dedup and compression).
    pub stored_bytes: u64,
    /// Number of distinct chunks referenced.
    pub chunks: u64,
    /// Bytes of memory not read again but taken from the parent image's chunks
    /// (incremental dumps; 0 otherwise).
    #[serde(default)]
    pub reused_bytes: u64,
    /// The parent image of an incremental dump, as its location (`None` for a
    /// full dump). The image does not need it to be restored: its extents name
    /// the parent's chunks directly.
    #[serde(default)]
    pub parent: Option<String>,
}

/// One process.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Process {
    pub pid: i32,
    /// Parent PID; for the root this is outside the tree.
    pub ppid: i32,
    pub pgid: i32,
    pub sid: i32,
    /// Threads; the first one is the thread-group leader (tid == pid).
    pub threads: Vec<Thread>,
    pub mappings: Vec<Mapping>,
    pub mm: MmFields,
    /// Descriptor table.
    pub fds: Vec<Fd>,
    /// Handlers of signals 1..=64 that are not `SIG_DFL`.
    pub sigactions: Vec<SigAction>,
    /// Signals pending for the whole process (shared queue).
    pub shared_pending: Vec<SigInfo>,
    /// ITIMER_REAL, ITIMER_VIRTUAL, ITIMER_PROF, in that order.
    pub itimers: [ITimer; 3],
    pub posix_timers: Vec<PosixTimer>,
    /// (resource, soft, hard).
    pub rlimits: Vec<(u32, u64, u64)>,
    pub cwd: String,
    pub umask: u32,
    pub creds: Creds,
    /// Was the process stopped (job control, `T` state) when it was dumped.
    pub stopped: bool,
    /// `personality(2)` value.
    pub personality: u32,
}

/// Credentials of a process (all threads share them in what we support).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Creds {
    pub uid: [u32; 4],
    pub gid: [u32; 4],
    pub groups: Vec<u32>,
}

/// The mm fields set back with `PR_SET_MM_MAP`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct MmFields {
    pub start_code: u64,
    pub end_code: u64,
    pub start_data: u64,
    pub end_data: u64,
    pub start_brk: u64,
    pub brk: u64,
    pub start_stack: u64,
    pub arg_start: u64,
    pub arg_end: u64,
    pub env_start: u64,
    pub env_end: u64,
    pub auxv: Vec<u64>,
    /// Path of `/proc/PID/exe`.
    pub exe: String,
}

/// One thread.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Thread {
    pub tid: i32,
    pub comm: String,
    /// `struct user_regs_struct`, raw, normalised so that an interrupted restartable
    /// system call is re-issued on resume.
    #[serde(with = "serde_bytes")]
    pub regs: Vec<u8>,
    /// XSAVE area (`NT_X86_XSTATE`), raw.
    #[serde(with = "serde_bytes")]
    pub xsave: Vec<u8>,
    /// Blocked signal mask.
    pub sigmask: u64,
    /// Signals pending for this thread only.
    pub pending: Vec<SigInfo>,
    pub rseq: Option<Rseq>,
    /// `get_robust_list`: head and length.
    pub robust_list: (u64, u64),
    /// `PR_GET_TID_ADDRESS`.
    pub clear_child_tid: u64,
    pub sigaltstack: SigAltStack,
}

/// rseq registration (`PTRACE_GET_RSEQ_CONFIGURATION`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Rseq {
    pub abi_pointer: u64,
    pub abi_size: u32,
    pub flags: u32,
    pub signature: u32,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SigAltStack {
    pub sp: u64,
    pub flags: i32,
    pub size: u64,
}

/// A queued signal: the raw 128-byte `siginfo_t`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SigInfo {
    pub signo: i32,
    #[serde(with = "serde_bytes")]
    pub raw: Vec<u8>,
}

/// A `struct kernel_sigaction` as `rt_sigaction` sees it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SigAction {
    pub signo: i32,
    /// Handler address, or 1 for `SIG_IGN`.
    pub handler: u64,
    pub flags: u64,
    pub restorer: u64,
    pub mask: u64,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct ITimer {
    /// Interval and current value, in microseconds.
    pub interval_us: u64,
    pub value_us: u64,
}

/// A POSIX timer (`timer_create`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PosixTimer {
    pub id: i32,
    pub clock: i32,
    /// `sigev_notify` (SIGEV_SIGNAL, SIGEV_THREAD_ID, SIGEV_NONE).
    pub notify: i32,
    pub signo: i32,
    /// Thread the signal goes to, for `SIGEV_THREAD_ID`.
    pub notify_tid: i32,
    /// `sigev_value`.
    pub value: u64,
    pub interval_ns: u64,
    pub value_ns: u64,
    pub overrun: i32,
}

/// Memory protection bits (`PROT_*`).
pub mod prot {
    pub const READ: u32 = 1;
    pub const WRITE: u32 = 2;
    pub const EXEC: u32 = 4;
}

/// One virtual memory area.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    /// `prot::*` bits.
    pub prot: u32,
    /// MAP_SHARED (true) or MAP_PRIVATE (false).
    pub shared: bool,
    pub kind: MappingKind,
    /// `VmFlags` of smaps that matter: growsdown, dontfork, dontdump, hugepage...
    pub vm_flags: Vec<String>,
    /// The page contents that must be written back, as extents over
    /// `[start, end)`. Pages not listed are zero (anonymous) or come from the file.
    pub data: Vec<Extent>,
}

/// What backs a mapping.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum MappingKind {
    /// Private or shared anonymous memory (`[heap]` and `[stack]` included).
    Anon { name: Option<String> },
    /// A shared anonymous object, filled once from [`Image::shmem`] and mapped by
    /// every process that shares it.
    SharedAnon { shmem_id: u32, offset: u64 },
    /// A file whose content the image holds ([`Image::shmem`], with its
    /// [`ShmBacking`]: a memfd, a deleted file, a file on tmpfs, a System V
    /// segment), mapped at `offset` of it. A shared mapping's pages are the
    /// object's; a private one keeps only the process's own copies in `data`.
    Object { shmem_id: u32, offset: u64 },
    /// A regular file. `check` indexes [`Image::file_checks`].
    File {
        path: String,
        offset: u64,
        check: u32,
    },
    /// The vDSO text.
    Vdso,
    /// The vvar pages in front of the vDSO.
    Vvar,
    /// The legacy vsyscall page (fixed; nothing to restore).
    Vsyscall,
}

/// A run of memory whose bytes are a chunk of the store, or a part of one.
///
/// A dump packs the pages it reads into chunks of up to 1 MiB: a run of pages with
/// all-zero pages left out becomes one chunk with several extents, and an
/// incremental dump packs scattered written pages into one chunk. An incremental
/// dump also points its unchanged pages at the parts of its parent's chunks that
/// hold them. `off` and `len` are absent (0) for an extent that is a whole chunk,
/// which keeps manifests of older dumps readable.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Extent {
    /// Address (or offset, inside a shared-memory object) of the first byte.
    pub addr: u64,
    /// Content address of the chunk that holds the bytes.
    pub chunk: ChunkRef,
    /// Where the bytes start inside the chunk.
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub off: u32,
    /// How many bytes, from `off`; 0 means all of the chunk.
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub len: u32,
}

fn is_zero_u32(v: &u32) -> bool {
    *v == 0
}

impl Extent {
    /// An extent that is all of `chunk`.
    pub fn whole(addr: u64, chunk: ChunkRef) -> Extent {
        Extent {
            addr,
            chunk,
            off: 0,
            len: 0,
        }
    }

    /// The extent's length in bytes.
    pub fn bytes(&self) -> u64 {
        if self.len == 0 {
            self.chunk.len as u64
        } else {
            self.len as u64
        }
    }

    /// The end address (exclusive).
    pub fn end(&self) -> u64 {
        self.addr + self.bytes()
    }

    /// Whether the extent lies inside its chunk and is made of whole pages.
    pub fn check(&self) -> Result<(), String> {
        let end = self.off as u64 + self.bytes();
        if end > self.chunk.len as u64 {
            return Err(format!(
                "extent at {:#x} reads bytes {}..{end} of chunk {} which has {}",
                self.addr,
                self.off,
                self.chunk.hex(),
                self.chunk.len
            ));
        }
        let aligned = [self.off as u64, self.bytes(), self.addr]
            .iter()
            .all(|v| v.is_multiple_of(PAGE_SIZE));
        if !aligned {
            return Err(format!(
                "extent at {:#x} (offset {}, {} bytes) is not made of whole pages",
                self.addr,
                self.off,
                self.bytes()
            ));
        }
        Ok(())
    }
}

/// The identity of a chunk: BLAKE3 of its uncompressed bytes, and their length.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkRef {
    pub hash: [u8; 32],
    pub len: u32,
}

impl ChunkRef {
    pub fn of(bytes: &[u8]) -> ChunkRef {
        ChunkRef {
            hash: *blake3::hash(bytes).as_bytes(),
            len: u32::try_from(bytes.len()).expect("chunk larger than 4 GiB"),
        }
    }

    /// Lowercase hex of the hash: the chunk's name in the store.
    pub fn hex(&self) -> String {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut s = String::with_capacity(64);
        for b in self.hash {
            s.push(char::from(DIGITS[usize::from(b >> 4)]));
            s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
        }
        s
    }
}

/// A memory object whose content the image holds: shared anonymous memory, or a
/// file of one of the kinds of [`ShmBacking`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SharedMemory {
    pub id: u32,
    /// Size in bytes.
    pub size: u64,
    /// Contents; `Extent::addr` is an offset into the object.
    pub data: Vec<Extent>,
    /// What the object is, and so how the restore makes it again.
    #[serde(default)]
    pub backing: ShmBacking,
}

/// What backs a memory object of [`Image::shmem`].
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub enum ShmBacking {
    /// Shared anonymous memory (`MAP_SHARED | MAP_ANONYMOUS`, `/dev/zero`).
    #[default]
    Anon,
    /// A memfd: its name (without `memfd:`) and its seals (`F_GET_SEALS`; a memfd
    /// made without `MFD_ALLOW_SEALING` has `F_SEAL_SEAL`).
    Memfd { name: String, seals: u32 },
    /// A file unlinked while the tree held it: made again unlinked, in the
    /// directory of `path` (the name it had).
    Deleted { path: String, owner: FileOwner },
    /// A file on a tmpfs (`/dev/shm`: POSIX shared memory) that the tree maps
    /// shared: made again at `path` with the image's content.
    Tmpfs { path: String, owner: FileOwner },
    /// A System V shared memory segment.
    SysV {
        key: i32,
        shmid: i32,
        owner: FileOwner,
        /// Marked for removal (`IPC_RMID`) while attached.
        removed: bool,
    },
}

/// Mode and owner of a file or segment.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileOwner {
    /// Permission bits (`0o7777` at most).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// A descriptor slot.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Fd {
    pub fd: i32,
    pub cloexec: bool,
    /// Index into [`Image::files`].
    pub file: u32,
}

/// An open file description. Descriptors in one or many processes that refer to
/// the same description (dup, fork) share one entry, as `kcmp(KCMP_FILE)` showed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OpenFile {
    pub id: u32,
    /// `O_*` status flags from fdinfo (access mode included).
    pub flags: u32,
    pub kind: FileKind,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum FileKind {
    /// A regular file. `check` indexes [`Image::file_checks`].
    Regular {
        path: String,
        pos: u64,
        check: u32,
    },
    Directory {
        path: String,
        pos: u64,
    },
    /// `/dev/null`, `/dev/zero`, `/dev/random`, `/dev/urandom`.
    CharDevice {
        path: String,
        rdev: u64,
    },
    /// One end of a pipe (or a FIFO at `fifo_path`). Ends of the same pipe share
    /// `pipe_id`; the data buffered in the pipe is stored once, on the read end.
    Pipe {
        pipe_id: u64,
        read_end: bool,
        fifo_path: Option<String>,
        #[serde(with = "serde_bytes")]
        buffered: Vec<u8>,
        capacity: u32,
    },
    /// A descriptor whose other side is outside the tree (a terminal, a pipe to the
    /// shell): at restore it is replaced by the restore command's own descriptor of
    /// the same number. Only fds 0, 1 and 2 may be inherited.
    Inherited {
        what: String,
    },
    /// One end of an established TCP connection, as read under the network lock.
    Tcp {
        conn: Box<TcpConn>,
    },
    /// A listening TCP socket: bound to `addr` (a wildcard stays a wildcard).
    TcpListen {
        addr: SocketAddr,
        backlog: u32,
        /// Absent in images of older versions: the defaults.
        #[serde(default)]
        opts: SockOpts,
    },
    /// A UDP socket: its bound address (a wildcard stays a wildcard; port 0: not
    /// bound), the peer it is connected to, if any, and its options. Datagrams
    /// queued in it at the dump are not kept: to the application that is the loss
    /// UDP allows.
    Udp {
        local: SocketAddr,
        remote: Option<SocketAddr>,
        opts: UdpOpts,
    },
    /// An eventfd: its counter and whether it counts as a semaphore.
    EventFd {
        count: u64,
        semaphore: bool,
    },
    /// A descriptor of a memory object of [`Image::shmem`] (a memfd, a deleted
    /// file, a file on tmpfs that the tree maps shared), at position `pos`.
    Object {
        shmem_id: u32,
        pos: u64,
    },
    /// An epoll instance and what it watches. The restore registers the targets
    /// again from inside the first process that holds it, once its descriptors
    /// are in place.
    Epoll {
        targets: Vec<EpollTarget>,
    },
    /// A UNIX socket whose peer, if any, is in the tree too.
    Unix(Box<UnixSock>),
    /// A timerfd: its clock, how it was set, what it had left and the expirations
    /// not yet read (`agent/src/fd/timerfd.rs` says how the time passes).
    TimerFd {
        /// The `clockid_t` it counts on.
        clock: i32,
        /// `TFD_TIMER_ABSTIME` and `TFD_TIMER_CANCEL_ON_SET`, as it was set.
        flags: u32,
        /// Time left to its next expiration at the dump (0: disarmed), and its
        /// interval (0: one-shot).
        value_ns: u64,
        interval_ns: u64,
        /// Expirations not yet read.
        ticks: u64,
        /// For an absolute timer on `CLOCK_REALTIME(_ALARM)`: its wall-clock
        /// deadline, in ns since the epoch, kept as it is.
        #[serde(default)]
        deadline_ns: Option<u64>,
    },
    /// A signalfd and the signals it takes (bit `n - 1` for signal `n`).
    SignalFd {
        mask: u64,
    },
    /// The master of a pseudo-terminal pair (`/dev/ptmx`), with the state of the
    /// pair: settings, queues, controlling terminal.
    PtyMaster {
        pty: Box<PtyPair>,
    },
    /// A descriptor of the slave of a pair whose master is in the image: `index`
    /// is the pair's `/dev/pts/N` at the dump (the restored pair may have another).
    PtySlave {
        index: u32,
    },
}

/// A pseudo-terminal pair whose master is in the tree, as the dump read it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtyPair {
    /// `N` of `/dev/pts/N` at the dump.
    pub index: u32,
    /// The path the master was opened by (`/dev/ptmx`, `/dev/pts/ptmx`).
    pub path: String,
    /// The slave's terminal settings (the master has none of its own).
    pub termios: Termios,
    pub winsize: WinSize,
    /// Packet mode (`TIOCPKT`) on the master.
    pub packet: bool,
    /// Still locked (`unlockpt` not called): no slave was ever opened.
    pub locked: bool,
    /// Every descriptor of the slave was closed (the master reads EIO once its
    /// queue is empty).
    pub slave_closed: bool,
    /// What the slave will read, as the line discipline holds it.
    pub input: PtyInput,
    /// What the master will read (the slave's output, after its processing).
    #[serde(with = "serde_bytes")]
    pub output: Vec<u8>,
    /// The session it is the controlling terminal of (its leader's PID), if any.
    #[serde(default)]
    pub session: Option<i32>,
    /// Its foreground process group, when it is a controlling terminal.
    #[serde(default)]
    pub foreground: Option<i32>,
}

/// `struct termios2` as the kernel keeps it for a terminal (x86-64: 19 `c_cc`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Termios {
    pub iflag: u32,
    pub oflag: u32,
    pub cflag: u32,
    pub lflag: u32,
    pub line: u8,
    /// `c_cc`, `NCCS` (19) bytes.
    #[serde(with = "serde_bytes")]
    pub cc: Vec<u8>,
    pub ispeed: u32,
    pub ospeed: u32,
}

/// `struct winsize`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WinSize {
    pub rows: u16,
    pub cols: u16,
    pub xpixel: u16,
    pub ypixel: u16,
}

/// The input queue of a terminal: complete lines (canonical mode), each as one
/// read returns it, then what no line end has ended yet (all of the queue in
/// non-canonical mode).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtyInput {
    pub lines: Vec<PtyLine>,
    #[serde(with = "serde_bytes")]
    pub rest: Vec<u8>,
}

/// One complete line of a canonical input queue: with its end (`\n`, `VEOL`,
/// `VEOL2`) as its last byte, or ended by `VEOF` (`eof`), which a read does not
/// return.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtyLine {
    #[serde(with = "serde_bytes")]
    pub bytes: Vec<u8>,
    pub eof: bool,
}

/// A UNIX socket: stream, datagram or seqpacket; named (a path or an abstract
/// name), listening, connected, or neither; and what was queued for it to read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnixSock {
    /// Its inode at the dump: how its peer names it.
    pub ino: u64,
    /// `SOCK_STREAM`, `SOCK_DGRAM` or `SOCK_SEQPACKET`.
    pub ty: i32,
    /// The name it is bound to: a path, or an abstract name (its bytes, without
    /// the leading NUL).
    pub name: Option<UnixName>,
    /// Listening, with this backlog.
    pub listen: Option<u32>,
    /// The inode of the socket it is connected to (in this image).
    pub peer: Option<u64>,
    /// Queued for it to read, in order: one entry per datagram or seqpacket
    /// message, chunks of bytes for a stream. Written back by its peer at restore.
    pub queue: Vec<serde_bytes::ByteBuf>,
    pub passcred: bool,
    /// As the kernel reports them (twice what was asked).
    pub sndbuf: u32,
    pub rcvbuf: u32,
}

/// The name a UNIX socket is bound to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum UnixName {
    Path(String),
    #[serde(with = "serde_bytes")]
    Abstract(Vec<u8>),
}

/// One descriptor watched by an epoll instance, as its owner registered it: the
/// descriptor number in the process that holds the instance, the event mask (with
/// EPOLLET, EPOLLONESHOT and the like) and the user data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpollTarget {
    pub fd: i32,
    pub events: u32,
    pub data: u64,
}

/// The options of a UDP socket that a restore sets again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UdpOpts {
    pub reuseaddr: bool,
    pub reuseport: bool,
    pub broadcast: bool,
    /// As the kernel reports them (twice what was asked).
    pub sndbuf: u32,
    pub rcvbuf: u32,
    /// `IPV6_V6ONLY` of an IPv6 socket (absent in older images: off).
    #[serde(default)]
    pub v6only: bool,
}

/// The socket options of a TCP socket (listening or connected) that a restore sets
/// again. Each field is absent in images of older versions, which decode to these
/// defaults. The tuning options are kept only where they differ from what a fresh
/// socket of the dumping host has (`None`): a restore elsewhere then keeps that
/// host's defaults.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SockOpts {
    /// `IPV6_V6ONLY` (IPv6 sockets only).
    pub v6only: bool,
    pub reuseaddr: bool,
    pub reuseport: bool,
    pub keepalive: bool,
    /// `SO_LINGER`: the linger time in seconds when it is on.
    pub linger: Option<u32>,
    /// `TCP_NODELAY`.
    pub nodelay: bool,
    /// `TCP_KEEPIDLE`, `TCP_KEEPINTVL` (seconds), `TCP_KEEPCNT`.
    pub keepidle: Option<u32>,
    pub keepintvl: Option<u32>,
    pub keepcnt: Option<u32>,
    /// `SO_SNDBUF` / `SO_RCVBUF` as the kernel reports them (twice what was asked),
    /// of a listener whose application set them. A connection keeps its buffers in
    /// [`TcpConn::sndbuf`] and [`TcpConn::rcvbuf`].
    pub sndbuf: Option<u32>,
    pub rcvbuf: Option<u32>,
}

/// `struct tcp_repair_window`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepairWindow {
    pub snd_wl1: u32,
    pub snd_wnd: u32,
    pub max_window: u32,
    pub rcv_wnd: u32,
    pub rcv_wup: u32,
}

/// Everything needed to rebuild one end of an established connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpConn {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// Sequence number after the last byte written (`write_seq`).
    pub send_seq: u32,
    /// Sequence number after the last byte received (`rcv_nxt`).
    pub recv_seq: u32,
    /// Written but not acknowledged, in order; the last `unsent` of them were
    /// never sent.
    #[serde(with = "serde_bytes")]
    pub send_queue: Vec<u8>,
    pub unsent: u32,
    /// Received but not read by the application.
    #[serde(with = "serde_bytes")]
    pub recv_queue: Vec<u8>,
    pub mss: u32,
    /// Window scales (`None` when not negotiated).
    pub snd_wscale: Option<u8>,
    pub rcv_wscale: Option<u8>,
    pub sack: bool,
    pub timestamps: bool,
    /// The connection's TCP timestamp clock now (restored as an offset).
    pub timestamp: u32,
    pub window: RepairWindow,
    /// SO_SNDBUF and SO_RCVBUF as the kernel reports them (twice what was asked).
    /// The receive window was offered against this buffer: a smaller one would
    /// drop what the peer may send.
    pub sndbuf: u32,
    pub rcvbuf: u32,
    /// The socket options (absent in older images: the defaults).
    #[serde(default)]
    pub opts: SockOpts,
}

impl TcpConn {
    /// Sequence number of the first unacknowledged byte.
    pub fn send_una(&self) -> u32 {
        self.send_seq.wrapping_sub(self.send_queue.len() as u32)
    }
}

/// A file the image depends on, as it was when dumped.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FileCheck {
    pub path: String,
    pub size: u64,
    pub mtime_ns: i128,
    pub dev: u64,
    pub ino: u64,
    /// BLAKE3 of the content, for files small enough to hash at dump time (a file
    /// with the same content is accepted even if it was copied or touched).
    pub hash: Option<[u8; 32]>,
    /// Open for writing (`O_WRONLY` or `O_RDWR`) by a descriptor of the tree: output
    /// the tree writes, which may have grown after a `--leave-running` dump (see the
    /// agent's `filecheck` module for what the restore does with it).
    #[serde(default)]
    pub written: bool,
    /// Mapped with execute permission by a process of the tree (its code).
    #[serde(default)]
    pub mapped_exec: bool,
}

impl Image {
    /// Every memory object's content lies inside it, and every mapping or descriptor
    /// of an object names one the image has.
    pub fn check_objects(&self) -> Result<(), String> {
        let image = self;
        let mut ids = std::collections::HashSet::new();
        for s in &image.shmem {
            if !ids.insert(s.id) {
                return Err(format!("memory object {} appears twice", s.id));
            }
            let room = s.size.div_ceil(PAGE_SIZE) * PAGE_SIZE;
            if let Some(e) = s.data.iter().find(|e| e.end() > room) {
                return Err(format!(
                    "memory object {} of {} bytes has content at {:#x}..{:#x}",
                    s.id,
                    s.size,
                    e.addr,
                    e.end()
                ));
            }
        }
        let known = |id: &u32, what: &str| {
            if ids.contains(id) {
                Ok(())
            } else {
                Err(format!(
                    "{what} names memory object {id}, which the image lacks"
                ))
            }
        };
        for p in &image.processes {
            for m in &p.mappings {
                if let MappingKind::SharedAnon { shmem_id, .. }
                | MappingKind::Object { shmem_id, .. } = &m.kind
                {
                    known(
                        shmem_id,
                        &format!("mapping {:#x} of PID {}", m.start, p.pid),
                    )?;
                }
            }
        }
        for f in &image.files {
            if let FileKind::Object { shmem_id, .. } = &f.kind {
                known(shmem_id, &format!("open file {}", f.id))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Memory objects are untrusted input too: content past an object's end, a
    /// mapping or descriptor of an object the image lacks, an id twice.
    #[test]
    fn images_with_bad_memory_objects_are_refused() {
        use crate::codec::{decode_image, encode_image, tests::sample_image, CodecError};
        let bad = |edit: &dyn Fn(&mut Image), needle: &str| {
            let mut img = sample_image();
            edit(&mut img);
            match decode_image(&encode_image(&img).unwrap()) {
                Err(CodecError::Invalid(m)) => assert!(m.contains(needle), "{m}"),
                other => panic!("expected Invalid ({needle}), got {other:?}"),
            }
        };
        let chunk = ChunkRef {
            hash: [1; 32],
            len: 4096,
        };
        bad(
            &|img| img.shmem[0].data.push(Extent::whole(4096, chunk)),
            "has content at",
        );
        bad(
            &|img| {
                img.processes[0].mappings[0].kind = MappingKind::Object {
                    shmem_id: 9,
                    offset: 0,
                }
            },
            "lacks",
        );
        bad(
            &|img| {
                img.files[0].kind = FileKind::Object {
                    shmem_id: 9,
                    pos: 0,
                }
            },
            "lacks",
        );
        bad(
            &|img| {
                let again = img.shmem[0].clone();
                img.shmem.push(again)
            },
            "twice",
        );
    }

    /// The shapes of these kinds before their socket options were kept.
    #[derive(Serialize)]
    enum Old {
        TcpListen { addr: SocketAddr, backlog: u32 },
    }

    #[derive(Serialize)]
    struct OldUdp {
        reuseaddr: bool,
        reuseport: bool,
        broadcast: bool,
        sndbuf: u32,
        rcvbuf: u32,
    }

    #[test]
    fn images_written_before_the_socket_options_still_decode_with_the_defaults() {
        let addr: SocketAddr = "[::]:7000".parse().unwrap();
        let old = rmp_serde::to_vec_named(&Old::TcpListen { addr, backlog: 5 }).unwrap();
        let k: FileKind = rmp_serde::from_slice(&old).unwrap();
        assert_eq!(
            k,
            FileKind::TcpListen {
                addr,
                backlog: 5,
                opts: SockOpts::default()
            }
        );
        let udp = OldUdp {
            reuseaddr: true,
            reuseport: false,
            broadcast: false,
            sndbuf: 1,
            rcvbuf: 2,
        };
        let u: UdpOpts = rmp_serde::from_slice(&rmp_serde::to_vec_named(&udp).unwrap()).unwrap();
        assert!(u.reuseaddr && !u.v6only && u.rcvbuf == 2);
    }
}
