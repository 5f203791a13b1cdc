//! `ckpt-agent restore`: rebuild a process tree from an image inside husks.
//!
//! A husk is a process we fork with `clone3(set_tid)` so it has the original PID,
//! hold under ptrace, and transform with injected system calls (DESIGN.md,
//! Restore). The only code a husk executes is one `syscall` instruction on a
//! trampoline page that we map at an address no mapping of the image uses, and
//! unmap again at the end.
//!
//! Steps:
//! 1. check the image against the host before anything is created: format version
//!    and architecture (codec), XSAVE features and size, the vDSO, PIDs, and every
//!    file behind a mapping or descriptor;
//! 2. open the tree's files, pipes and shared memory in the restorer;
//! 3. fork the root husk, clean it (close every descriptor, unmap everything but the
//!    trampoline), and from it fork the children husks, recursively, with their PIDs;
//! 4. in every husk: map the memory at its old addresses and fill it from the
//!    store in parallel worker threads, each chunk verified as it is read. Private
//!    anonymous memory (most of a process) goes in with `UFFDIO_COPY` through a
//!    userfaultfd taken from the husk: every page is allocated and written once.
//!    The rest (private file mappings), or everything where the kernel refuses
//!    userfaultfd, is populated in bulk (`MADV_POPULATE_WRITE`, injected) one
//!    segment ahead of the workers' `process_vm_writev`. `CKPT_FILL=populate`
//!    forces the second way (the tests use it to cover the fallback). Then the
//!    protections go back, map the vDSO where it was, set the mm fields
//!    (`PR_SET_MM_MAP`), install descriptors (`pidfd_getfd` + `dup3`), cwd, umask,
//!    handlers, rlimits;
//! 5. clone the threads with their TIDs, restore per-thread state, sessions and
//!    groups, credentials, pending signals and timers;
//! 6. set registers and masks, drop the trampoline, and detach every thread of every
//!    process together.
//!
//! Any failure kills every husk: no process of a partly restored tree ever runs.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Instant;

use ckpt_shared::codec;
use ckpt_shared::image::{ChunkRef, Image, MappingKind, Process, PAGE_SIZE};
use ckpt_shared::location::{ImageStore, ImageStoreError, Location};
use ckpt_shared::objstore::{Drive, StoreConfig};
use libc::pid_t;
use tracing::{debug, warn};

use crate::fd::{self, FdError};
use crate::inject::{InjectError, Remote};
use crate::mem::{self, Dest, MemError};
use crate::signals::{self, SignalError};
use crate::sys::{self, nr, ptrace, ptrace::Stop};
use crate::thread::{self, ThreadError};

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("no image at {path}: {reason}")]
    NoImage { path: PathBuf, reason: String },
    #[error(transparent)]
    Store(#[from] ImageStoreError),
    #[error(transparent)]
    Codec(#[from] codec::CodecError),
    #[error("the image needs CPU state components this host lacks (XCR0 image {image:#x}, host {host:#x}, missing {missing:#x}); restore it on a host with the same CPU features")]
    CpuFeatures { image: u64, host: u64, missing: u64 },
    #[error("the image's XSAVE area is {image} bytes but this host's is {host}; restore it on a host with the same CPU features")]
    XsaveSize { image: u32, host: u32 },
    #[error("the vDSO of this kernel ({host}) differs from the image's ({image}); restore on a host running the same kernel build as {kernel}")]
    Vdso {
        image: String,
        host: String,
        kernel: String,
    },
    #[error("PID {pid} is taken on this node (by `{by}`); end that process or restore with --new-pid-ns")]
    PidTaken { pid: pid_t, by: String },
    #[error(
        "file {path} changed since the dump ({what}); the image cannot be restored against it"
    )]
    FileChanged { path: String, what: String },
    #[error(transparent)]
    Fd(#[from] FdError),
    #[error(transparent)]
    Mem(#[from] MemError),
    #[error(transparent)]
    Inject(#[from] InjectError),
    #[error(transparent)]
    Thread(#[from] ThreadError),
    #[error(transparent)]
    Signal(#[from] SignalError),
    #[error(transparent)]
    Ptrace(#[from] ptrace::PtraceError),
    #[error(transparent)]
    Sys(#[from] sys::SysError),
    #[error("network lock: {0}")]
    Lock(#[from] crate::netlock::LockError),
    #[error("husk {pid}: {what}")]
    Husk { pid: pid_t, what: String },
    #[error("no free address range for the restore trampoline")]
    NoTrampoline,
    #[error("the job's restore was given up: {0}")]
    Aborted(String),
}

#[derive(Debug, Clone)]
pub struct RestoreOptions {
    pub image: Location,
    pub new_pid_ns: bool,
    pub workers: usize,
    /// New addresses for TCP endpoints (see [`fd::Moves`]); empty: the old ones.
    pub moves: fd::Moves,
}

/// Figures of one restore.
#[derive(Debug, Clone, Default)]
pub struct RestoreReport {
    pub root_pid: pid_t,
    pub memory_bytes: u64,
    pub total_us: u64,
    pub fill_us: u64,
    /// Processes whose private anonymous memory went in through a userfaultfd
    /// (the others were populated and copied).
    pub uffd_processes: usize,
    pub processes: usize,
}

const TRAMP_LEN: u64 = 2 * PAGE_SIZE;
const TASK_SIZE: u64 = (1 << 47) - PAGE_SIZE;
const ARCH_MAP_VDSO_64: u64 = 0x2003;
const MADV_POPULATE_WRITE: u64 = 23;
const CLONE_ARGS_SIZE: usize = 88;

/// Every husk, killed on drop unless released.
struct Husks {
    pids: Vec<pid_t>,
    ns_init: Option<pid_t>,
    released: bool,
}

impl Drop for Husks {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        for &p in &self.pids {
            let _ = sys::kill(p, libc::SIGKILL);
        }
        if let Some(p) = self.ns_init {
            let _ = sys::kill(p, libc::SIGKILL);
        }
        for &p in &self.pids {
            while let Ok(s) = ptrace::wait(p) {
                if matches!(s, Stop::Exited(_) | Stop::Killed(_)) {
                    break;
                }
            }
        }
    }
}

/// Opens the image at `location`, reads and decodes its manifest. In a local store
/// every chunk it names is looked up too (a cheap stat each) so that a missing one
/// is reported before anything is created; in a remote store that would cost a
/// request per chunk, and the fill finds a missing or damaged chunk anyway before
/// any process runs (every chunk is verified as it is read, and any failure kills
/// every husk).
pub fn load(location: &Location) -> Result<(ImageStore, Image), RestoreError> {
    if let Location::Dir(dir) = location {
        if !dir.join("manifest.ckpt").is_file() {
            let reason = if dir.is_dir() {
                "manifest.ckpt is missing (the dump did not complete?)".to_string()
            } else {
                "the directory does not exist".to_string()
            };
            return Err(RestoreError::NoImage {
                path: dir.clone(),
                reason,
            });
        }
    }
    // One thread (this one) keeps every request of the fill in flight and consumes
    // what arrives: it drives the connections itself.
    let config = StoreConfig {
        drive: Drive::Caller,
        ..StoreConfig::from_env()
    };
    let store = ImageStore::open(location, &config)?;
    let bytes = store.get_manifest()?;
    let img = codec::decode_image(&bytes)?;
    if !store.is_remote() {
        let chunks = img
            .processes
            .iter()
            .flat_map(|p| p.mappings.iter().flat_map(|m| m.data.iter()))
            .chain(img.shmem.iter().flat_map(|s| s.data.iter()));
        let mut seen = HashSet::new();
        for c in chunks.filter(|c| seen.insert(c.chunk)) {
            if !store.has_chunk(&c.chunk)? {
                return Err(RestoreError::Store(ImageStoreError::Store(
                    ckpt_shared::store::StoreError::Missing {
                        store: store.display_name().into(),
                        chunk: c.chunk.hex(),
                    },
                )));
            }
        }
    }
    Ok((store, img))
}

fn hex(b: &[u8]) -> String {
    b.iter().take(8).map(|x| format!("{x:02x}")).collect()
}

/// Our own vDSO: its bytes, and the size of the vvar area in front of it.
pub fn host_vdso() -> Result<(Vec<u8>, u64), RestoreError> {
    let me = std::process::id() as pid_t;
    let vmas = sys::proc::smaps(me).map_err(|e| RestoreError::Husk {
        pid: me,
        what: e.to_string(),
    })?;
    let v = vmas
        .iter()
        .find(|v| v.name == "[vdso]")
        .ok_or_else(|| RestoreError::Husk {
            pid: me,
            what: "this process has no vDSO".into(),
        })?;
    // SAFETY: the [vdso] mapping of our own process is readable for its whole length
    // and stays mapped for the life of the process.
    let bytes =
        unsafe { std::slice::from_raw_parts(v.start as *const u8, (v.end - v.start) as usize) }
            .to_vec();
    let vvar = vmas
        .iter()
        .filter(|v| v.name.starts_with("[vvar"))
        .map(|v| v.end - v.start)
        .sum();
    Ok((bytes, vvar))
}

fn host_xsave_size() -> u32 {
    // CPUID leaf 0xD sub-leaf 0: EBX is the XSAVE area size for the features
    // enabled in XCR0.
    std::arch::x86_64::__cpuid_count(0xd, 0).ebx
}

/// Refuse an image this host cannot run, before anything is created.
pub fn check_host(img: &Image, new_pid_ns: bool) -> Result<(), RestoreError> {
    let host = sys::host_xcr0();
    let missing = img.host.xcr0 & !host;
    if missing != 0 {
        return Err(RestoreError::CpuFeatures {
            image: img.host.xcr0,
            host,
            missing,
        });
    }
    let hs = host_xsave_size();
    for p in &img.processes {
        for t in &p.threads {
            if t.xsave.len() as u32 > hs.max(img.host.xsave_size) || img.host.xsave_size != hs {
                return Err(RestoreError::XsaveSize {
                    image: img.host.xsave_size,
                    host: hs,
                });
            }
        }
    }
    let (vdso, vvar) = host_vdso()?;
    let h = *blake3::hash(&vdso).as_bytes();
    if h != img.host.vdso_hash
        || vdso.len() as u64 != img.host.vdso_size
        || vvar != img.host.vvar_size
    {
        return Err(RestoreError::Vdso {
            image: format!(
                "{} bytes, vvar {}, hash {}",
                img.host.vdso_size,
                img.host.vvar_size,
                hex(&img.host.vdso_hash)
            ),
            host: format!("{} bytes, vvar {}, hash {}", vdso.len(), vvar, hex(&h)),
            kernel: img.host.kernel.clone(),
        });
    }
    if !new_pid_ns {
        for p in &img.processes {
            for t in &p.threads {
                if pid_in_use(t.tid) {
                    let by = match sys::proc::stat(t.tid) {
                        Ok(st) if st.state == 'Z' => {
                            format!(
                                "a zombie of {} that its parent, PID {}, has not reaped",
                                st.comm, st.ppid
                            )
                        }
                        Ok(st) => st.comm,
                        Err(_) => "a process that just exited".into(),
                    };
                    return Err(RestoreError::PidTaken { pid: t.tid, by });
                }
            }
        }
    }
    for c in &img.file_checks {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(&c.path).map_err(|e| RestoreError::FileChanged {
            path: c.path.clone(),
            what: format!("cannot stat it: {e}"),
        })?;
        let mtime = m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128;
        if m.len() == c.size && mtime == c.mtime_ns && m.ino() == c.ino && m.dev() == c.dev {
            continue;
        }
        if m.len() != c.size {
            return Err(RestoreError::FileChanged {
                path: c.path.clone(),
                what: format!("size {} now, {} then", m.len(), c.size),
            });
        }
        match c.hash {
            Some(h) => {
                let now = crate::dump::hash_file(Path::new(&c.path)).map_err(|e| {
                    RestoreError::FileChanged {
                        path: c.path.clone(),
                        what: format!("cannot read it: {e}"),
                    }
                })?;
                if now != h {
                    return Err(RestoreError::FileChanged {
                        path: c.path.clone(),
                        what: "its content differs".into(),
                    });
                }
            }
            None => {
                return Err(RestoreError::FileChanged {
                    path: c.path.clone(),
                    what: "its inode or mtime differs and it is too large to compare by content"
                        .into(),
                })
            }
        }
    }
    Ok(())
}

/// Is `pid` taken? A zombie whose parent is about to reap it (the usual state
/// right after `dump` killed the tree) is given a moment to go.
fn pid_in_use(pid: pid_t) -> bool {
    let deadline = Instant::now() + std::time::Duration::from_secs(3);
    loop {
        match sys::proc::stat(pid) {
            Err(_) => return false,
            Ok(st) if st.state == 'Z' || st.state == 'X' => {
                if Instant::now() > deadline {
                    return true;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Ok(_) => return true,
        }
    }
}

/// Pick and map the trampoline in our own process: two pages, free in every
/// process of the image and in ours. Page 1 holds `syscall; int3`, page 2 is scratch.
fn map_trampoline(img: &Image) -> Result<u64, RestoreError> {
    let used: Vec<(u64, u64)> = img
        .processes
        .iter()
        .flat_map(|p| p.mappings.iter().map(|m| (m.start, m.end)))
        .collect();
    let mut cand = 0x1000_0000u64;
    while cand < 0x7000_0000_0000 {
        let end = cand + TRAMP_LEN;
        if !used.iter().any(|&(s, e)| s < end && cand < e) {
            // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping of ours;
            // the result is checked.
            let p = unsafe {
                libc::mmap(
                    cand as *mut libc::c_void,
                    TRAMP_LEN as usize,
                    libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                    -1,
                    0,
                )
            };
            if p as u64 == cand {
                // SAFETY: we just mapped these two pages read-write at `cand`.
                unsafe {
                    std::ptr::copy_nonoverlapping([0x0fu8, 0x05, 0xcc].as_ptr(), cand as *mut u8, 3)
                };
                return Ok(cand);
            }
            if p != libc::MAP_FAILED {
                // SAFETY: unmapping what mmap just returned to us.
                unsafe { libc::munmap(p, TRAMP_LEN as usize) };
            }
        }
        cand += 0x1000_0000;
    }
    Err(RestoreError::NoTrampoline)
}

/// `struct clone_args` up to `cgroup` (CLONE_ARGS_SIZE_VER2).
#[repr(C)]
#[derive(Default)]
pub(crate) struct CloneArgs {
    pub(crate) flags: u64,
    pub(crate) pidfd: u64,
    pub(crate) child_tid: u64,
    pub(crate) parent_tid: u64,
    pub(crate) exit_signal: u64,
    pub(crate) stack: u64,
    pub(crate) stack_size: u64,
    pub(crate) tls: u64,
    pub(crate) set_tid: u64,
    pub(crate) set_tid_size: u64,
    pub(crate) cgroup: u64,
}

fn clone_args_bytes(flags: u64, exit_signal: u64, set_tid_addr: u64) -> Vec<u8> {
    let words = [flags, 0, 0, 0, exit_signal, 0, 0, 0, set_tid_addr, 1, 0];
    words.iter().flat_map(|w| w.to_ne_bytes()).collect()
}

/// Fork the root husk from the restorer: `clone3` with the wanted PID, then the
/// child asks to be traced and stops. Only raw system calls run in the child.
fn fork_root(pid: pid_t) -> Result<pid_t, RestoreError> {
    let set_tid: [pid_t; 1] = [pid];
    let args = CloneArgs {
        exit_signal: libc::SIGCHLD as u64,
        set_tid: set_tid.as_ptr() as u64,
        set_tid_size: 1,
        ..Default::default()
    };
    // SAFETY: clone3 without CLONE_VM forks; the child only makes raw system calls
    // (no allocation, no locks) before it stops under ptrace, so the copy of a
    // multi-threaded address space is never used beyond that.
    let r = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if r == 0 {
        // SAFETY: raw system calls in the child; see above.
        unsafe {
            libc::syscall(libc::SYS_ptrace, libc::PTRACE_TRACEME, 0, 0, 0);
            libc::syscall(
                libc::SYS_kill,
                libc::syscall(libc::SYS_getpid),
                libc::SIGSTOP,
            );
            loop {
                libc::syscall(libc::SYS_pause);
            }
        }
    }
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EEXIST) {
            return Err(RestoreError::PidTaken {
                pid,
                by: "another process".into(),
            });
        }
        return Err(RestoreError::Sys(sys::SysError {
            op: "clone3",
            what: format!("pid {pid}"),
            source: e,
        }));
    }
    Ok(r as pid_t)
}

/// Wait for a new husk's first stop (SIGSTOP) and set our options on it.
fn take_husk(pid: pid_t) -> Result<libc::user_regs_struct, RestoreError> {
    match ptrace::wait(pid)? {
        Stop::Signal(libc::SIGSTOP) | Stop::Event { .. } => {}
        other => {
            return Err(RestoreError::Husk {
                pid,
                what: format!("unexpected first stop {other:?}"),
            })
        }
    }
    ptrace::set_options(
        pid,
        ptrace::O_TRACESYSGOOD | ptrace::O_TRACEFORK | ptrace::O_TRACECLONE | ptrace::O_EXITKILL,
    )?;
    Ok(ptrace::get_regs(pid)?)
}

fn remote(tid: pid_t, base: libc::user_regs_struct, tramp: u64) -> Remote {
    Remote {
        tid,
        syscall_ip: tramp,
        base,
        scratch: tramp + PAGE_SIZE,
        scratch_len: PAGE_SIZE,
        new_children: Vec::new(),
        swallowed: Vec::new(),
    }
}

/// Per-process restore context.
struct Husk<'a> {
    p: &'a Process,
    r: Remote,
    /// Other threads, once cloned.
    threads: Vec<Remote>,
    pidfd_slot: u64,
}

/// Restores one tree on its own (the `restore` command).
pub fn restore(opts: &RestoreOptions) -> Result<RestoreReport, RestoreError> {
    restore_gated(opts, &crate::gate::Alone)
}

/// Restores one tree as one rank of a job: it is released only when `gate` says
/// every rank of the job is rebuilt (see [`crate::gate`]).
pub fn restore_gated(
    opts: &RestoreOptions,
    gate: &dyn crate::gate::Gate,
) -> Result<RestoreReport, RestoreError> {
    let t0 = Instant::now();
    let mut ph = crate::Phases::new("restore");
    let (store, img) = load(&opts.image)?;
    ph.mark("load");
    check_host(&img, opts.new_pid_ns)?;
    ph.mark("check");

    // The network lock on the connections' new 4-tuples, before any of them is
    // rebuilt, until every rank of the job is (`gate.rebuilt`).
    let conns = opts.moves.tuples(&img.files);
    let net_lock = if conns.is_empty() {
        None
    } else {
        let (table, part) = gate.lock_name().unwrap_or_else(|| {
            let root = img.processes.first().map_or(0, |p| p.pid);
            (crate::netlock::own_name("r", root), "r0".into())
        });
        Some(crate::netlock::NetLock::lock_part(&table, &part, &conns)?)
    };
    // Resources in the restorer.
    let fd::Opened {
        fds: ours,
        holders: fifo_holders,
        tcp: tcp_ends,
    } = fd::open_all(&img.files, &opts.moves)?;
    let mut shm_fds: HashMap<u32, OwnedFd> = HashMap::new();
    for s in &img.shmem {
        let name = std::ffi::CString::new(format!("ckpt-shmem-{}", s.id)).expect("no NUL");
        // SAFETY: name is a valid C string.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(sys::SysError::last("memfd_create", s.id).into());
        }
        // SAFETY: fresh descriptor we own.
        let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        // SAFETY: ftruncate on our own memfd.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), s.size as i64) } < 0 {
            return Err(sys::SysError::last("ftruncate", "shared memory").into());
        }
        shm_fds.insert(s.id, fd);
    }
    // Files behind mappings, opened once per path and mode.
    let mut map_files: HashMap<(String, bool), OwnedFd> = HashMap::new();
    for p in &img.processes {
        for m in &p.mappings {
            if let MappingKind::File { path, .. } = &m.kind {
                let write = m.shared && m.prot & ckpt_shared::image::prot::WRITE != 0;
                if let std::collections::hash_map::Entry::Vacant(e) =
                    map_files.entry((path.clone(), write))
                {
                    let f = std::fs::OpenOptions::new()
                        .read(true)
                        .write(write)
                        .open(path)
                        .map_err(|source| FdError::Open {
                            path: path.clone(),
                            source,
                        })?;
                    e.insert(f.into());
                }
            }
        }
        if let std::collections::hash_map::Entry::Vacant(e) =
            map_files.entry((p.mm.exe.clone(), false))
        {
            let f = std::fs::File::open(&p.mm.exe).map_err(|source| FdError::Open {
                path: p.mm.exe.clone(),
                source,
            })?;
            e.insert(f.into());
        }
    }

    ph.mark("open-files");
    let tramp = map_trampoline(&img)?;
    let mut husks_guard = Husks {
        pids: Vec::new(),
        ns_init: None,
        released: false,
    };
    let src_pid: pid_t; // the process whose descriptors husks take (in their PID namespace)
    let (ctl_w, root_pid) = if opts.new_pid_ns {
        let (init, ctl) = crate::pidns::spawn_ns_init()?;
        husks_guard.ns_init = Some(init);
        let ours = crate::pidns::enter(init)?;
        src_pid = 1;
        let root = fork_root(img.root_pid);
        // Back to our own namespace for children: the kernel refuses to create
        // threads (our fill workers) while it differs from our active one.
        crate::pidns::leave(ours)?;
        (Some(ctl), root?)
    } else {
        src_pid = std::process::id() as pid_t;
        (None, fork_root(img.root_pid)?)
    };
    husks_guard.pids.push(root_pid);
    let base = take_husk(root_pid)?;
    let mut root = remote(root_pid, base, tramp);
    // Clean the husk: no rseq area (it would fault once unmapped: the kernel writes
    // it on every return to user space), no descriptors, no memory but the
    // trampoline.
    if let Some((ptr, len, sig, _)) = ptrace::rseq_configuration(root_pid)? {
        const RSEQ_FLAG_UNREGISTER: u64 = 1;
        root.syscall(
            nr::RSEQ,
            [ptr, len as u64, RSEQ_FLAG_UNREGISTER, sig as u64, 0, 0],
        )?;
    }
    root.syscall(nr::CLOSE_RANGE, [0, u32::MAX as u64, 0, 0, 0, 0])?;
    root.syscall(nr::MUNMAP, [PAGE_SIZE, tramp - PAGE_SIZE, 0, 0, 0, 0])?;
    root.syscall(
        nr::MUNMAP,
        [tramp + TRAMP_LEN, TASK_SIZE - tramp - TRAMP_LEN, 0, 0, 0, 0],
    )?;

    // The tree: each process forks its children, with their PIDs.
    let mut husks: Vec<Husk> = Vec::new();
    let pids_in_tree: HashSet<pid_t> = img.processes.iter().map(|p| p.pid).collect();
    let mut pending: Vec<(usize, Remote)> = vec![(0, root)];
    while let Some((pi, mut r)) = pending.pop() {
        let p = &img.processes[pi];
        if p.sid == p.pid {
            r.syscall(nr::SETSID, [0; 6])?;
        }
        for (ci, c) in img.processes.iter().enumerate() {
            if c.ppid != p.pid || ci == pi {
                continue;
            }
            let tid_addr = r.put(CLONE_ARGS_SIZE as u64, &c.pid.to_ne_bytes())?;
            let args = r.put(0, &clone_args_bytes(0, libc::SIGCHLD as u64, tid_addr))?;
            let got = r.syscall_raw(nr::CLONE3, [args, CLONE_ARGS_SIZE as u64, 0, 0, 0, 0])?;
            if got == -(libc::EEXIST as i64) {
                return Err(RestoreError::PidTaken {
                    pid: c.pid,
                    by: "another process".into(),
                });
            }
            if got < 0 {
                return Err(RestoreError::Husk {
                    pid: p.pid,
                    what: format!("clone3 of child {} failed: errno {}", c.pid, -got),
                });
            }
            let child = got as pid_t;
            husks_guard.pids.push(child);
            let cbase = take_husk(child)?;
            pending.push((ci, remote(child, cbase, tramp)));
        }
        husks.push(Husk {
            p,
            r,
            threads: Vec::new(),
            pidfd_slot: 0,
        });
    }
    husks.sort_by_key(|h| img.processes.iter().position(|p| p.pid == h.p.pid));

    ph.mark("fork-tree");
    // Memory layout and descriptors of every husk.
    let mut segs: Vec<mem::Segment> = Vec::new();
    let mut direct = Vec::new();
    // Our copies of each husk's userfaultfd: they must outlive the fill. Closing
    // them unregisters every range.
    let mut uffds: Vec<OwnedFd> = Vec::new();
    let use_uffd = std::env::var_os("CKPT_FILL").is_none_or(|v| v != "populate");
    for (hi, h) in husks.iter_mut().enumerate() {
        let p = h.p;
        let r = &mut h.r;
        let max_fd = p.fds.iter().map(|f| f.fd).max().unwrap_or(2).max(2);
        let slot = (max_fd + 1) as u64;
        let pfd = r.syscall(nr::PIDFD_OPEN, [src_pid as u64, 0, 0, 0, 0, 0])?;
        if pfd != slot {
            r.syscall(nr::DUP3, [pfd, slot, libc::O_CLOEXEC as u64, 0, 0, 0])?;
            r.syscall(nr::CLOSE, [pfd, 0, 0, 0, 0, 0])?;
        }
        h.pidfd_slot = slot;
        let uffd = if use_uffd
            && p.mappings
                .iter()
                .any(|m| matches!(m.kind, MappingKind::Anon { .. }) && !m.data.is_empty())
        {
            crate::inject::userfaultfd_of(r, 0)?
        } else {
            None
        };
        map_memory(
            r,
            p,
            hi,
            slot,
            &map_files,
            &shm_fds,
            uffd.as_ref().map(|f| f.as_fd()),
            &mut direct,
            &mut segs,
        )?;
        uffds.extend(uffd);
    }
    for s in &img.shmem {
        let fd = shm_fds[&s.id].as_raw_fd();
        direct.extend(
            s.data
                .iter()
                .map(|e| (e.chunk, mem::Piece::of(Dest::Fd(fd), e))),
        );
    }
    let direct = mem::by_chunk(direct);
    // Shared memory objects are filled through our memfd: the pages are the same
    // ones the husks mapped.
    ph.mark("map");
    let t_fill = Instant::now();
    let written = mem::fill_pipelined(
        direct,
        segs,
        &store,
        opts.workers,
        |seg| -> Result<(), RestoreError> {
            let r = &mut husks[seg.husk].r;
            // Populate in bulk: far cheaper than a fault per page when we write. It is
            // only an optimisation: where it fails, the writes fault pages in.
            if let Err(err) = r.syscall(
                nr::MADVISE,
                [seg.start, seg.end - seg.start, MADV_POPULATE_WRITE, 0, 0, 0],
            ) {
                debug!(pid = r.tid, start = format!("{:#x}", seg.start), %err, "populate failed");
            }
            Ok(())
        },
    )?;
    let fill_us = t_fill.elapsed().as_micros() as u64;
    let uffd_processes = uffds.len();
    drop(uffds);
    ph.mark("populate+fill");

    let mut epolls_done = std::collections::HashSet::new();
    for h in &mut husks {
        let p = h.p;
        finish_memory(&mut h.r, p)?;
        set_mm(&mut h.r, p, h.pidfd_slot, &map_files)?;
        fd::install(&mut h.r, h.pidfd_slot, &p.fds, &img.files, &ours)?;
        fd::register_epoll(&mut h.r, &p.fds, &img.files, &mut epolls_done)?;
        let a = h.r.put_str(0, &p.cwd)?;
        h.r.syscall(nr::CHDIR, [a, 0, 0, 0, 0, 0])?;
        h.r.syscall(nr::UMASK, [p.umask as u64, 0, 0, 0, 0, 0])?;
        if p.personality != 0 {
            h.r.syscall(nr::PERSONALITY, [p.personality as u64, 0, 0, 0, 0, 0])?;
        }
        signals::restore_actions(&mut h.r, &p.sigactions)?;
        for &(res, soft, hard) in &p.rlimits {
            // From inside the husk: prlimit on another process needs
            // CAP_SYS_RESOURCE, which a restoring root may not have.
            let a =
                h.r.put(0, &[soft.to_ne_bytes(), hard.to_ne_bytes()].concat())?;
            if let Err(e) = h.r.syscall(nr::PRLIMIT64, [0, res as u64, a, 0, 0, 0]) {
                warn!(pid = p.pid, res, soft, hard, %e, "rlimit not restored");
            }
        }
        // Threads, with their TIDs.
        for t in p.threads.iter().skip(1) {
            let tid_addr = h.r.put(CLONE_ARGS_SIZE as u64, &t.tid.to_ne_bytes())?;
            let flags = (libc::CLONE_VM
                | libc::CLONE_FS
                | libc::CLONE_FILES
                | libc::CLONE_SIGHAND
                | libc::CLONE_THREAD
                | libc::CLONE_SYSVSEM) as u64;
            let args = h.r.put(0, &clone_args_bytes(flags, 0, tid_addr))?;
            let got =
                h.r.syscall_raw(nr::CLONE3, [args, CLONE_ARGS_SIZE as u64, 0, 0, 0, 0])?;
            if got < 0 {
                if got == -(libc::EEXIST as i64) {
                    return Err(RestoreError::PidTaken {
                        pid: t.tid,
                        by: "another process".into(),
                    });
                }
                return Err(RestoreError::Husk {
                    pid: p.pid,
                    what: format!("clone3 of thread {} failed: errno {}", t.tid, -got),
                });
            }
            let tid = got as pid_t;
            match ptrace::wait(tid)? {
                Stop::Signal(libc::SIGSTOP) | Stop::Event { .. } => {}
                other => {
                    return Err(RestoreError::Husk {
                        pid: tid,
                        what: format!("unexpected first stop {other:?}"),
                    })
                }
            }
            let tb = ptrace::get_regs(tid)?;
            h.threads.push(remote(tid, tb, tramp));
        }
    }

    ph.mark("mm+fds+threads");
    // Process groups: leaders first, then members (sessions were made at fork).
    for pass in 0..2 {
        for h in &mut husks {
            let p = h.p;
            let leader = p.pgid == p.pid;
            if p.sid == p.pid || !pids_in_tree.contains(&p.pgid) || (pass == 0) != leader {
                continue;
            }
            let target = if leader { 0 } else { p.pgid as u64 };
            h.r.syscall(nr::SETPGID, [0, target, 0, 0, 0, 0])?;
        }
    }

    // Per thread state; signals blocked until the very end.
    for h in &mut husks {
        let p = h.p;
        for (i, t) in p.threads.iter().enumerate() {
            let r = if i == 0 {
                &mut h.r
            } else {
                &mut h.threads[i - 1]
            };
            ptrace::set_sigmask(r.tid, !0)?;
            thread::restore_state(r, t)?;
            thread::restore_pending(r, p.pid, t)?;
        }
        for s in &p.shared_pending {
            let a = h.r.put(0, &s.raw)?;
            h.r.syscall(
                nr::RT_SIGQUEUEINFO,
                [p.pid as u64, s.signo as u64, a, 0, 0, 0],
            )?;
        }
        signals::restore_timers(&mut h.r, p.pid, &p.itimers, &p.posix_timers)?;
        // The pidfd slot goes; credentials last, in every thread (they are per
        // thread in the kernel).
        h.r.syscall(nr::CLOSE, [h.pidfd_slot, 0, 0, 0, 0, 0])?;
        for i in 0..p.threads.len() {
            let r = if i == 0 {
                &mut h.r
            } else {
                &mut h.threads[i - 1]
            };
            set_creds(r, p)?;
        }
        // Drop the trampoline: the last injected call unmaps its own page, and the
        // thread never executes there again (its registers are set next).
        h.r.syscall(nr::MUNMAP, [tramp, TRAMP_LEN, 0, 0, 0, 0])?;
        for (i, t) in p.threads.iter().enumerate() {
            let host_tid = if i == 0 {
                h.r.tid
            } else {
                h.threads[i - 1].tid
            };
            thread::restore_final(host_tid, t)?;
        }
    }
    ph.mark("thread-state");
    drop(fifo_holders);
    drop(ours);
    gate.rebuilt(root_pid).map_err(RestoreError::Aborted)?;
    // Every end of every connection exists now (for a job: on every node): lift
    // the lock first (a packet sent by an end finished elsewhere must not be
    // dropped here: its retransmission would wait for the first timer, a second
    // on a fresh connection), then leave repair mode and send what the peers may
    // lack.
    if let Some(l) = net_lock {
        l.unlock()?;
    }
    for t in tcp_ends {
        drop(t.finish().map_err(|e| RestoreError::Husk {
            pid: root_pid,
            what: format!("finishing a TCP connection: {e}"),
        })?);
    }

    // Release: every thread of every process, together.
    for h in &husks {
        if h.p.stopped {
            let _ = sys::kill(h.r.tid, libc::SIGSTOP);
        }
    }
    for h in &husks {
        for r in h.threads.iter() {
            ptrace::detach(r.tid, 0)?;
        }
        ptrace::detach(h.r.tid, 0)?;
    }
    husks_guard.released = true;
    // A process that was stopped is stopped again when we return: the SIGSTOP we
    // queued takes effect once it is detached, so wait for it to land.
    for h in husks.iter().filter(|h| h.p.stopped) {
        let not_stopped = || {
            sys::proc::stat(h.r.tid)
                .map(|st| st.state != 'T')
                .unwrap_or(false)
        };
        let wait = |ms| {
            let deadline = Instant::now() + std::time::Duration::from_millis(ms);
            while not_stopped() && Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        };
        wait(200);
        if not_stopped() {
            // Seen rarely under load in a new PID namespace: the stop queued while
            // the husk was traced did not take. Stop it now that it is detached.
            warn!(
                pid = h.r.tid,
                "stopped process did not stop after release; sending SIGSTOP again"
            );
            let _ = sys::kill(h.r.tid, libc::SIGSTOP);
            wait(2000);
        }
    }
    ph.mark("release");
    if let Some(init) = ctl_w {
        init.release();
    }
    // SAFETY: unmapping our own trampoline pages.
    unsafe { libc::munmap(tramp as *mut libc::c_void, TRAMP_LEN as usize) };
    Ok(RestoreReport {
        root_pid,
        memory_bytes: written,
        total_us: t0.elapsed().as_micros() as u64,
        fill_us,
        uffd_processes,
        processes: img.processes.len(),
    })
}

#[allow(clippy::too_many_arguments)]
fn map_memory(
    r: &mut Remote,
    p: &Process,
    husk: usize,
    slot: u64,
    map_files: &HashMap<(String, bool), OwnedFd>,
    shm_fds: &HashMap<u32, OwnedFd>,
    uffd: Option<BorrowedFd<'_>>,
    direct: &mut Vec<(ChunkRef, mem::Piece)>,
    segs: &mut Vec<mem::Segment>,
) -> Result<(), RestoreError> {
    use ckpt_shared::image::prot;
    let host_pid = r.tid;
    // The vDSO and vvar where they were.
    if let Some(vv) = p
        .mappings
        .iter()
        .find(|m| matches!(m.kind, MappingKind::Vvar))
    {
        r.syscall(nr::ARCH_PRCTL, [ARCH_MAP_VDSO_64, vv.start, 0, 0, 0, 0])?;
    } else if let Some(vd) = p
        .mappings
        .iter()
        .find(|m| matches!(m.kind, MappingKind::Vdso))
    {
        r.syscall(nr::ARCH_PRCTL, [ARCH_MAP_VDSO_64, vd.start, 0, 0, 0, 0])?;
    }
    // The kernel takes the address as a hint: make sure the vDSO is where the
    // program's saved pointers into it expect it.
    if let Some(vd) = p
        .mappings
        .iter()
        .find(|m| matches!(m.kind, MappingKind::Vdso))
    {
        let now = sys::proc::smaps(host_pid).map_err(|e| RestoreError::Husk {
            pid: host_pid,
            what: e.to_string(),
        })?;
        match now.iter().find(|v| v.name == "[vdso]") {
            Some(v) if v.start == vd.start && v.end == vd.end => {}
            other => {
                return Err(RestoreError::Husk {
                    pid: host_pid,
                    what: format!(
                        "the vDSO could not be placed at {:#x} (it is at {})",
                        vd.start,
                        other.map_or("no address".to_string(), |v| format!("{:#x}", v.start))
                    ),
                })
            }
        }
    }
    for m in &p.mappings {
        let len = m.end - m.start;
        let want_write = !m.data.is_empty();
        let prot_now = m.prot as u64
            | if want_write {
                prot::WRITE as u64 | prot::READ as u64
            } else {
                0
            };
        let growsdown = if m.vm_flags.iter().any(|f| f == "gd") {
            libc::MAP_GROWSDOWN as u64
        } else {
            0
        };
        let fixed = libc::MAP_FIXED as u64;
        let got = match &m.kind {
            MappingKind::Vdso | MappingKind::Vvar | MappingKind::Vsyscall => continue,
            MappingKind::Anon { .. } => {
                let flags =
                    libc::MAP_PRIVATE as u64 | libc::MAP_ANONYMOUS as u64 | fixed | growsdown;
                r.syscall(nr::MMAP, [m.start, len, prot_now, flags, u64::MAX, 0])?
            }
            MappingKind::SharedAnon { shmem_id, offset } => {
                let src = shm_fds[shmem_id].as_raw_fd();
                let fd = r.syscall(nr::PIDFD_GETFD, [slot, src as u64, 0, 0, 0, 0])?;
                let flags = libc::MAP_SHARED as u64 | fixed;
                let got = r.syscall(nr::MMAP, [m.start, len, m.prot as u64, flags, fd, *offset])?;
                r.syscall(nr::CLOSE, [fd, 0, 0, 0, 0, 0])?;
                got
            }
            MappingKind::File { path, offset, .. } => {
                let write = m.shared && m.prot & prot::WRITE != 0;
                let src: RawFd = map_files[&(path.clone(), write)].as_raw_fd();
                let fd = r.syscall(nr::PIDFD_GETFD, [slot, src as u64, 0, 0, 0, 0])?;
                let share = if m.shared {
                    libc::MAP_SHARED
                } else {
                    libc::MAP_PRIVATE
                } as u64;
                let got = r.syscall(
                    nr::MMAP,
                    [
                        m.start,
                        len,
                        prot_now,
                        share | fixed | growsdown,
                        fd,
                        *offset,
                    ],
                )?;
                r.syscall(nr::CLOSE, [fd, 0, 0, 0, 0, 0])?;
                got
            }
        };
        if got != m.start {
            return Err(RestoreError::Husk {
                pid: host_pid,
                what: format!("mapping {:#x} landed at {got:#x}", m.start),
            });
        }
        if matches!(m.kind, MappingKind::SharedAnon { .. }) || m.data.is_empty() {
            continue;
        }
        if let (MappingKind::Anon { .. }, Some(fd)) = (&m.kind, uffd) {
            match sys::uffd::register(fd, m.start, len) {
                Ok(()) => {
                    let dest = Dest::Uffd {
                        uffd: fd.as_raw_fd(),
                        pid: host_pid,
                    };
                    direct.extend(m.data.iter().map(|e| (e.chunk, mem::Piece::of(dest, e))));
                    continue;
                }
                Err(e) => {
                    debug!(pid = host_pid, start = format!("{:#x}", m.start), %e, "userfaultfd register failed; populating instead");
                }
            }
        }
        mem::segments(husk, host_pid, &m.data, segs);
    }
    Ok(())
}

fn finish_memory(r: &mut Remote, p: &Process) -> Result<(), RestoreError> {
    for m in &p.mappings {
        if matches!(
            m.kind,
            MappingKind::Vdso
                | MappingKind::Vvar
                | MappingKind::Vsyscall
                | MappingKind::SharedAnon { .. }
        ) {
            continue;
        }
        if !m.data.is_empty() {
            r.syscall(
                nr::MPROTECT,
                [m.start, m.end - m.start, m.prot as u64, 0, 0, 0],
            )?;
        }
        for f in &m.vm_flags {
            if let Some(adv) = mem::advice_for(f) {
                if let Err(e) =
                    r.syscall(nr::MADVISE, [m.start, m.end - m.start, adv as u64, 0, 0, 0])
                {
                    warn!(pid = p.pid, flag = %f, ?e, "madvise not restored");
                }
            }
        }
    }
    Ok(())
}

fn set_mm(
    r: &mut Remote,
    p: &Process,
    slot: u64,
    map_files: &HashMap<(String, bool), OwnedFd>,
) -> Result<(), RestoreError> {
    let exe_src = map_files[&(p.mm.exe.clone(), false)].as_raw_fd();
    let exe_fd = r.syscall(nr::PIDFD_GETFD, [slot, exe_src as u64, 0, 0, 0, 0])?;
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
    r.syscall(nr::CLOSE, [exe_fd, 0, 0, 0, 0, 0])?;
    Ok(())
}

fn set_creds(r: &mut Remote, p: &Process) -> Result<(), RestoreError> {
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

/// Used by restore-time figures.
pub fn image_memory_bytes(img: &Image) -> u64 {
    img.processes
        .iter()
        .flat_map(|p| p.mappings.iter().flat_map(|m| m.data.iter()))
        .map(|e| e.bytes())
        .sum::<u64>()
        + img
            .shmem
            .iter()
            .flat_map(|s| s.data.iter())
            .map(|e| e.bytes())
            .sum::<u64>()
}
