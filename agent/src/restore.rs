//! `ckpt-agent restore`: rebuild a process tree from an image inside husks.
//!
//! A husk is a process we fork with `clone3(set_tid)` so it has the original PID,
//! hold under ptrace, and transform with injected system calls (../shared/DESIGN.md,
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
//!    segment ahead of the workers' `process_vm_writev`. [`Fill::Populate`]
//!    forces the second way (the tests use it to cover the fallback). Then the
//!    protections go back, map the vDSO where it was, set the mm fields
//!    (`PR_SET_MM_MAP`), install descriptors (`pidfd_getfd` + `dup3`), cwd, umask,
//!    handlers, rlimits;
//! 5. clone the threads with their TIDs, restore per-thread state, sessions and
//!    groups, credentials, pending signals and timers;
//! 6. set registers and masks, drop the trampoline, and detach every thread of every
//!    process together.
//!
//! The steps are the phases of a [`RestoreSession`]. Any failure kills every husk:
//! no process of a partly restored tree ever runs.
//!
//! # Dying with the restorer
//!
//! The restorer (`ckpt-agent restore`, or the agent's restore thread) may be
//! SIGKILLed at any instant; before the release no process of the image may be
//! left, not even a zombie, and none may have executed an instruction of the
//! image. Which mechanism covers which instant:
//!
//! - **From the root husk's `clone3` to its first stop**: the child's first
//!   system call is `prctl(PR_SET_PDEATHSIG, SIGKILL)`, then it checks that
//!   `getppid()` is still the restorer (else the restorer died before the
//!   `prctl` and it exits). It is traced with `PTRACE_TRACEME` but without
//!   EXITKILL until `take_husk` sets the options; the death signal covers that
//!   gap. (Checked by the test pause `restore:cloned`: before this, a restorer
//!   killed there left a stopped, untraced husk for good.)
//! - **From the root's first stop to the release**: every thread of every husk
//!   is traced with `PTRACE_O_EXITKILL`. The root gets it at its first stop;
//!   every other process (`clone3` injected in its parent husk) and thread is
//!   attached by the kernel inside `clone3` itself (`PTRACE_O_TRACEFORK` /
//!   `TRACECLONE`), with the tracer's options, EXITKILL included, before it runs
//!   at all. The tracer dying SIGKILLs them all. The root's death signal is
//!   cleared near the end (`thread_state`): the restored process must not die
//!   with the restorer's thread after the release.
//! - **A new PID namespace** is tied to us too: its init has the death signal
//!   until the commit, and the kernel kills every process of a namespace whose
//!   init dies.
//! - **Reaping**: the root husk and the namespace init are our children; once we
//!   are dead they are reparented to the nearest subreaper (or init), which
//!   reaps them (the tests are a subreaper and reap them). The other husks are
//!   children of husks, which die too, so they are reparented the same way.
//!   While we live, `Husks`'s drop kills and waits for each one, its threads
//!   first; `ckpt-agent restore` is a subreaper, so the husks whose parent husk
//!   died are its children then, and a refused restore returns with none of the
//!   image's PIDs held, not even by a zombie (a daemon that is no subreaper
//!   waits up to 2 s for an outside reaper).
//!
//! # The release
//!
//! Detaching one process after the other would let a restorer killed in the
//! middle leave part of a tree running (the detached part) and the rest killed
//! (by EXITKILL). So the release has one commit point:
//! 1. SIGSTOP to every process, while every thread is in a ptrace stop: it only
//!    waits, pending. Killed here: EXITKILL kills everything.
//! 2. Every thread detached. On its way back to user space a detached thread
//!    dequeues the SIGSTOP, or joins the group stop another thread began (the
//!    kernel reinstates a pending group stop at detach): it executes nothing of
//!    the image. Detaching drops EXITKILL with the tracing.
//! 3. The commit: the journal's `Released` record (below). In a new PID
//!    namespace its init first gives up its death signal
//!    ([`sys::pidns::NsInit::release`]); a restorer killed before that takes the
//!    whole namespace down, so there the release is atomic by construction, even
//!    without a watchdog.
//! 4. SIGCONT to every process that was not stopped at the dump.
//!
//! In the restorer's own PID namespace, a restorer killed between the first
//! detach and the commit leaves the detached processes stopped (never run, but
//! there): the rescue watchdog ([`crate::rescue`], a process of its own, not the
//! tracer) kills them, and continues them after the commit. Its journal holds a
//! `Husk` record (PID and start time) for each process as it is forked, the lock
//! table before it is made (the watchdog removes it), and `Released`, the commit,
//! once every thread is detached. A restore killed before `Released` thus leaves
//! no process and no table; one killed after it leaves the tree running.
//!
//! One more case escapes the stop: a root husk that shares the restorer's session
//! (an image whose root led no session) in a process group of its own. If the
//! restorer dies while that group is stopped, the group becomes orphaned, and the
//! kernel sends it SIGHUP and SIGCONT. The tests' workloads lead their sessions.
//!
//! The stop is visible to the tree in one way that a restore without it would
//! not show: a parent in the tree whose SIGCHLD handler lacks `SA_NOCLDSTOP`
//! gets a `CLD_STOPPED` and a `CLD_CONTINUED` SIGCHLD for each child. (The
//! alternative that hides it, the cgroup v2 freezer, moves the tree into a cgroup
//! of ours, which a Slurm step's cgroup forbids.) A SIGCONT handler does not
//! run: the threads of a process that catches SIGCONT stay traced through the
//! commit (without EXITKILL) and one of them takes step 4's SIGCONT out of the
//! queue ([`crate::freeze::continue_quietly`]).

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::time::Instant;

use ckpt_shared::codec;
use ckpt_shared::image::{ChunkRef, Image, MappingKind, Process, ShmBacking, PAGE_SIZE};
use ckpt_shared::location::{ImageStore, ImageStoreError, Location};
use ckpt_shared::objstore::{Drive, StoreConfig};
use libc::pid_t;
use tracing::{debug, warn};

use crate::fd::{self, FdError};
use crate::inject::{InjectError, Remote};
use crate::mem::{self, Dest, MemError};
use crate::rescue::{self, Record};
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
    #[error(transparent)]
    Rescue(#[from] crate::rescue::RescueError),
    #[error("induced failure at stage {0} (test hook)")]
    Fault(&'static str),
}

#[derive(Debug, Clone)]
pub struct RestoreOptions {
    pub image: Location,
    pub new_pid_ns: bool,
    pub workers: usize,
    /// New addresses for TCP endpoints (see [`fd::Moves`]); empty: the old ones.
    pub moves: fd::Moves,
    /// How to reach the store (S3 endpoint, credentials, retries).
    pub store: StoreConfig,
    pub fill: Fill,
    /// Test hooks: the pause points of [`PAUSE_POINTS`].
    pub hooks: crate::hooks::Hooks,
    /// The watchdog that kills the husks if this process dies before the
    /// release's commit, and continues them after it (see [`crate::rescue`]);
    /// `None` runs without one.
    pub rescue: Option<std::sync::Arc<crate::rescue::Watch>>,
    /// What to do with output the tree wrote that changed since the dump (see
    /// [`crate::filecheck`]).
    pub changed_files: crate::filecheck::ChangedFiles,
}

/// The points at which a restore hangs when `CKPT_TEST_PAUSE` names one (a build
/// with `test-hooks`), for a test to SIGKILL it there; in the order they are met.
pub const PAUSE_POINTS: &[&str] = &[
    // The root husk exists, traced by TRACEME, its options (EXITKILL) not set yet.
    "restore:cloned",
    // The root husk is traced with EXITKILL and cleaned.
    "restore:husk-traced",
    // Every process of the tree exists.
    "restore:tree",
    // Every mapping is in place, no data yet.
    "restore:mapped",
    // The second segment is being populated while workers write the first
    // (populate fill only: `CKPT_FILL=populate`).
    "restore:filling",
    // The memory is filled.
    "restore:filled",
    // The first thread of a process is cloned, not the others.
    "restore:cloning-threads",
    // Descriptors, environment, threads: everything but the per-thread state.
    "restore:threads",
    // The final registers and masks are set, still traced.
    "restore:final-regs",
    // The release: SIGSTOP queued to every process, none detached.
    "restore:stopped",
    // The first process is detached (stopped), the others still traced.
    "restore:detaching",
    // Every thread is detached and stopping; before the commit.
    "restore:detached",
    // After the commit, before the SIGCONTs.
    "restore:committed",
];

/// How private anonymous memory goes into a husk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fill {
    /// `UFFDIO_COPY` through a userfaultfd taken from the husk, where the kernel
    /// allows it (else populate).
    #[default]
    Uffd,
    /// Always populate and write with `process_vm_writev` (the fallback; the tests
    /// force it to cover it).
    Populate,
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
    /// Output files truncated back to the checkpoint, or kept as they were.
    pub changed_files: Vec<crate::filecheck::Changed>,
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
        // The threads too: each traced thread's exit waits for us, and a
        // leader's is not reported before its other threads' are collected.
        let tids: Vec<Vec<pid_t>> = self
            .pids
            .iter()
            .map(|&p| sys::proc::tasks(p).unwrap_or_default())
            .collect();
        for &p in &self.pids {
            let _ = sys::kill(p, libc::SIGKILL);
        }
        if let Some(p) = self.ns_init {
            let _ = sys::kill(p, libc::SIGKILL);
        }
        for (&p, tids) in self.pids.iter().zip(&tids) {
            for &t in tids.iter().filter(|&&t| t != p).chain(std::iter::once(&p)) {
                while let Ok(s) = ptrace::wait(t) {
                    if matches!(s, Stop::Exited(_) | Stop::Killed(_)) {
                        break;
                    }
                }
            }
        }
        self.reap();
    }
}

impl Husks {
    /// Waits, briefly, until no killed husk holds its PID, not even as a zombie.
    /// The root husk and a namespace's init are our children; every other husk
    /// passes, when its parent husk dies, to the nearest subreaper: this process
    /// when it is one (`ckpt-agent restore` is, see
    /// [`sys::spawn::become_subreaper`]), and then the wait above (parents
    /// first) has reaped it already, or we reap it here; else to a reaper
    /// outside (the agent daemon is none), which we can only wait for.
    fn reap(&self) {
        let mut left: Vec<pid_t> = self.pids.iter().copied().chain(self.ns_init).collect();
        let deadline = Instant::now() + std::time::Duration::from_secs(2);
        loop {
            left.retain(|&p| !sys::spawn::reap_exited_any(p) && sys::proc::stat(p).is_ok());
            if left.is_empty() || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        if !left.is_empty() {
            warn!(
                ?left,
                "killed husks still hold their PIDs (zombies of a reaper other than us)"
            );
        }
    }
}

/// Opens the image at `location`, reads and decodes its manifest. In a local store
/// every chunk it names is looked up too (a cheap stat each) so that a missing one
/// is reported before anything is created; in a remote store that would cost a
/// request per chunk, and the fill finds a missing or damaged chunk anyway before
/// any process runs (every chunk is verified as it is read, and any failure kills
/// every husk).
pub fn load(
    location: &Location,
    config: &StoreConfig,
) -> Result<(ImageStore, Image), RestoreError> {
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
        ..config.clone()
    };
    let store = ImageStore::open(location, &config)?;
    let bytes = store.get_manifest()?;
    let img = codec::decode_image(&bytes)?;
    if !store.is_remote() {
        let mut seen = HashSet::new();
        for c in img.extents().filter(|c| seen.insert(c.chunk)) {
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
            if let Some(at) = sys::restorer::map_trampoline(cand, TRAMP_LEN, &[0x0f, 0x05, 0xcc]) {
                return Ok(at);
            }
        }
        cand += 0x1000_0000;
    }
    Err(RestoreError::NoTrampoline)
}

fn clone_args_bytes(flags: u64, exit_signal: u64, set_tid_addr: u64) -> Vec<u8> {
    let words = [flags, 0, 0, 0, exit_signal, 0, 0, 0, set_tid_addr, 1, 0];
    words.iter().flat_map(|w| w.to_ne_bytes()).collect()
}

/// Fork the root husk from the restorer: `clone3` with the wanted PID, then the
/// child asks to be traced and stops.
fn fork_root(pid: pid_t, in_new_ns: bool) -> Result<pid_t, RestoreError> {
    sys::restorer::fork_traced(pid, in_new_ns).map_err(|e| {
        if e.raw_os_error() == Some(libc::EEXIST) {
            RestoreError::PidTaken {
                pid,
                by: "another process".into(),
            }
        } else {
            RestoreError::Sys(sys::SysError {
                op: "clone3",
                what: format!("pid {pid}"),
                source: e,
            })
        }
    })
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
struct Husk {
    /// Its process in the image.
    pi: usize,
    r: Remote,
    /// Other threads, once cloned.
    threads: Vec<Remote>,
    pidfd_slot: u64,
}

impl Husk {
    /// Thread `i` of the process (0: the leader).
    fn thread(&mut self, i: usize) -> &mut Remote {
        if i == 0 {
            &mut self.r
        } else {
            &mut self.threads[i - 1]
        }
    }
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
    let mut s = RestoreSession::load(opts)?;
    s.lock_network(gate)?;
    s.open_resources()?;
    s.fork_tree()?;
    s.map_memory()?;
    s.fill_memory()?;
    s.rebuild_processes()?;
    s.process_groups()?;
    s.thread_state()?;
    gate.rebuilt(s.root_pid).map_err(RestoreError::Aborted)?;
    s.release()
}

/// What the restorer opens for the husks to take: descriptions at their old
/// numbers, memfds standing for shared memory, the files behind mappings.
#[derive(Default)]
struct Resources {
    fds: Vec<OwnedFd>,
    /// The other ends of FIFOs, held open until every husk has its end.
    fifo_holders: Vec<OwnedFd>,
    tcp: Vec<fd::tcp::Rebuilt>,
    /// Controlling terminals for session leaders, until their groups are set.
    ctty: Vec<fd::pty::Ctty>,
    /// Memory objects (shared anonymous memory, memfds, deleted and tmpfs files,
    /// System V segments), made again.
    objects: mem::Objects,
    /// By path and whether they are opened for writing.
    map_files: HashMap<(String, bool), OwnedFd>,
}

/// One restore in progress; its methods are the phases, in order (see the module
/// doc). Dropping it before [`RestoreSession::release`] kills every husk (and a
/// new PID namespace's init) and lifts the network lock.
pub struct RestoreSession<'a> {
    opts: &'a RestoreOptions,
    store: ImageStore,
    img: Image,
    phases: crate::Phases,
    t0: Instant,
    net_lock: Option<crate::netlock::NetLock>,
    res: Resources,
    tramp: u64,
    husks_guard: Husks,
    husks: Vec<Husk>,
    /// The process whose descriptors husks take (in their PID namespace).
    src_pid: pid_t,
    ns_init: Option<crate::sys::pidns::NsInit>,
    root_pid: pid_t,
    segs: Vec<mem::Segment>,
    direct: Vec<mem::WriteJob>,
    /// Our copies of each husk's userfaultfd: they must outlive the fill. Closing
    /// them unregisters every range.
    uffds: Vec<OwnedFd>,
    written: u64,
    fill_us: u64,
    uffd_processes: usize,
    /// The output files to truncate at the release (see [`crate::filecheck`]).
    changed_files: Vec<crate::filecheck::Changed>,
    /// Last, so that it goes after the husks are killed (on failure) or
    /// continued (see [`crate::rescue`]).
    journal: Option<std::sync::Arc<crate::rescue::Journal>>,
}

impl<'a> RestoreSession<'a> {
    /// Reads the image and checks it against this host: nothing is created yet.
    pub fn load(opts: &'a RestoreOptions) -> Result<Self, RestoreError> {
        let t0 = Instant::now();
        let mut phases = crate::Phases::new("restore");
        let (store, img) = load(&opts.image, &opts.store)?;
        phases.mark("load");
        let changed_files = crate::host::check(&img, opts.new_pid_ns, opts.changed_files)?;
        phases.mark("check");
        let journal = match &opts.rescue {
            Some(w) => Some(w.journal("restore")?),
            None => None,
        };
        Ok(RestoreSession {
            opts,
            store,
            img,
            phases,
            t0,
            net_lock: None,
            res: Resources::default(),
            tramp: 0,
            husks_guard: Husks {
                pids: Vec::new(),
                ns_init: None,
                released: false,
            },
            husks: Vec::new(),
            src_pid: 0,
            ns_init: None,
            root_pid: 0,
            segs: Vec::new(),
            direct: Vec::new(),
            uffds: Vec::new(),
            written: 0,
            fill_us: 0,
            uffd_processes: 0,
            changed_files,
            journal,
        })
    }

    /// A test hook's point: hangs there (`CKPT_TEST_PAUSE`) or fails there
    /// (`CKPT_FAULT`) when asked.
    fn point(&self, point: &'static str) -> Result<(), RestoreError> {
        self.opts.hooks.hang_at(point);
        if self.opts.hooks.fails_at(point) {
            return Err(RestoreError::Fault(point));
        }
        Ok(())
    }

    /// Notes `r` in the journal, if there is one.
    fn note(&self, r: Record) -> Result<(), RestoreError> {
        Ok(rescue::note(self.journal.as_deref(), r)?)
    }

    /// Notes a husk just created (by its PID in our namespace and start time), so
    /// that a watchdog can tell it from a later process with its PID.
    fn note_husk(&self, pid: pid_t) -> Result<(), RestoreError> {
        if self.journal.is_none() {
            return Ok(());
        }
        let start_time = sys::proc::stat(pid)
            .map_err(|e| RestoreError::Husk {
                pid,
                what: format!("reading its start time: {e}"),
            })?
            .start_time;
        self.note(Record::Husk { pid, start_time })
    }

    /// The network lock on the connections' new 4-tuples, before any of them is
    /// rebuilt, until every rank of the job is (`gate.rebuilt`).
    pub fn lock_network(&mut self, gate: &dyn crate::gate::Gate) -> Result<(), RestoreError> {
        let conns = self.opts.moves.tuples(&self.img.files);
        if conns.is_empty() {
            return Ok(());
        }
        let (table, part) = gate.lock_name().unwrap_or_else(|| {
            let root = self.img.processes.first().map_or(0, |p| p.pid);
            (crate::netlock::own_name("r", root), "r0".into())
        });
        let full = format!("{}{table}", crate::netlock::TABLE_PREFIX);
        self.note(Record::NetLock { table: full })?;
        self.net_lock = Some(crate::netlock::NetLock::lock_part(&table, &part, &conns)?);
        Ok(())
    }

    /// Descriptions, shared memory and mapped files, opened in the restorer.
    pub fn open_resources(&mut self) -> Result<(), RestoreError> {
        self.res.objects = mem::Objects::make(&self.img.shmem)?;
        self.fill_objects()?;
        let fd::Opened {
            fds,
            holders,
            tcp,
            ctty,
        } = fd::open_all(&self.img.files, &self.opts.moves, &self.res.objects.fds)?;
        self.res.fds = fds;
        self.res.ctty = ctty;
        self.res.fifo_holders = holders;
        self.res.tcp = tcp;
        // Files behind mappings, opened once per path and mode.
        for p in &self.img.processes {
            for m in &p.mappings {
                if let MappingKind::File { path, .. } = &m.kind {
                    let write = m.shared && m.prot & ckpt_shared::image::prot::WRITE != 0;
                    open_map_file(&mut self.res.map_files, path, write)?;
                }
            }
            open_map_file(&mut self.res.map_files, &p.mm.exe, false)?;
        }
        self.phases.mark("open-files");
        Ok(())
    }

    /// The memory objects that are files get their content and their seals now,
    /// before any husk maps them (see [`mem::object`]); shared anonymous memory is
    /// filled with the husks' memory.
    fn fill_objects(&mut self) -> Result<(), RestoreError> {
        let direct: Vec<(ChunkRef, mem::Piece)> = self
            .img
            .shmem
            .iter()
            .filter(|s| s.backing != ShmBacking::Anon)
            .flat_map(|s| {
                let fd = self.res.objects.fds[&s.id].as_raw_fd();
                s.data
                    .iter()
                    .map(move |e| (e.chunk, mem::Piece::of(Dest::Fd(fd), e)))
            })
            .collect();
        if !direct.is_empty() {
            self.written += mem::fill_pipelined(
                mem::by_chunk(direct),
                Vec::new(),
                &self.store,
                self.opts.workers,
                |_| Ok::<(), RestoreError>(()),
            )?;
        }
        self.res.objects.finish(&self.img.shmem)?;
        Ok(())
    }

    /// Forks the root husk (in a new PID namespace if asked), cleans it, and from
    /// it forks every other process of the tree with its PID.
    pub fn fork_tree(&mut self) -> Result<(), RestoreError> {
        self.tramp = map_trampoline(&self.img)?;
        let root_pid = if self.opts.new_pid_ns {
            let (init, ctl) = crate::sys::pidns::spawn_ns_init()?;
            self.husks_guard.ns_init = Some(init);
            self.ns_init = Some(ctl);
            let ours = crate::sys::pidns::enter(init)?;
            self.src_pid = 1;
            let root = fork_root(self.img.root_pid, true);
            // Back to our own namespace for children: the kernel refuses to create
            // threads (our fill workers) while it differs from our active one.
            crate::sys::pidns::leave(ours)?;
            root?
        } else {
            self.src_pid = std::process::id() as pid_t;
            fork_root(self.img.root_pid, false)?
        };
        self.root_pid = root_pid;
        self.husks_guard.pids.push(root_pid);
        self.note_husk(root_pid)?;
        self.opts.hooks.hang_at("restore:cloned");
        let base = take_husk(root_pid)?;
        let mut root = remote(root_pid, base, self.tramp);
        clean_husk(&mut root, self.tramp)?;
        self.opts.hooks.hang_at("restore:husk-traced");
        // The tree: each process forks its children, with their PIDs.
        let mut pending: Vec<(usize, Remote)> = vec![(0, root)];
        while let Some((pi, mut r)) = pending.pop() {
            let p = &self.img.processes[pi];
            if p.sid == p.pid {
                r.syscall(nr::SETSID, [0; 6])?;
                // Its controlling terminal before it forks the rest of its
                // session, who inherit it.
                if let Some(c) = self.res.ctty.iter().find(|c| c.session == p.pid) {
                    fd::pty::set_ctty(&mut r, self.src_pid, c)?;
                }
            }
            for (ci, c) in self.img.processes.iter().enumerate() {
                if c.ppid != p.pid || ci == pi {
                    continue;
                }
                let child = clone_child(&mut r, p.pid, c.pid)?;
                self.husks_guard.pids.push(child);
                self.note_husk(child)?;
                let cbase = take_husk(child)?;
                pending.push((ci, remote(child, cbase, self.tramp)));
            }
            self.husks.push(Husk {
                pi,
                r,
                threads: Vec::new(),
                pidfd_slot: 0,
            });
        }
        self.husks.sort_by_key(|h| h.pi);
        self.phases.mark("fork-tree");
        self.point("restore:tree")
    }

    /// Memory layout of every husk: each mapping at its old address, and the plan
    /// of how its data goes in (userfaultfd or populate and write).
    pub fn map_memory(&mut self) -> Result<(), RestoreError> {
        let use_uffd = self.opts.fill == Fill::Uffd;
        let mut direct = Vec::new();
        for (hi, h) in self.husks.iter_mut().enumerate() {
            let p = &self.img.processes[h.pi];
            let r = &mut h.r;
            h.pidfd_slot = take_pidfd_slot(r, p, self.src_pid)?;
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
                h.pidfd_slot,
                &self.res.map_files,
                &self.res.objects,
                uffd.as_ref().map(|f| f.as_fd()),
                &mut direct,
                &mut self.segs,
            )?;
            self.uffds.extend(uffd);
        }
        self.res.objects.attached(&self.img.shmem)?;
        // Shared anonymous objects are filled through our memfd: the pages are
        // the same ones the husks mapped.
        for s in self
            .img
            .shmem
            .iter()
            .filter(|s| s.backing == ShmBacking::Anon)
        {
            let fd = self.res.objects.fds[&s.id].as_raw_fd();
            direct.extend(
                s.data
                    .iter()
                    .map(|e| (e.chunk, mem::Piece::of(Dest::Fd(fd), e))),
            );
        }
        self.direct = mem::by_chunk(direct);
        self.phases.mark("map");
        self.opts.hooks.hang_at("restore:mapped");
        Ok(())
    }

    /// Fetches, verifies and writes every chunk, in parallel.
    pub fn fill_memory(&mut self) -> Result<(), RestoreError> {
        let t_fill = Instant::now();
        let hooks = &self.opts.hooks;
        let mut populated = 0usize;
        let husks = &mut self.husks;
        self.written += mem::fill_pipelined(
            std::mem::take(&mut self.direct),
            std::mem::take(&mut self.segs),
            &self.store,
            self.opts.workers,
            |seg| -> Result<(), RestoreError> {
                populated += 1;
                if populated == 2 {
                    hooks.hang_at("restore:filling");
                }
                let r = &mut husks[seg.husk].r;
                // Populate in bulk: far cheaper than a fault per page when we
                // write. It is only an optimisation: where it fails, the writes
                // fault pages in.
                if let Err(err) = r.syscall(
                    nr::MADVISE,
                    [seg.start, seg.end - seg.start, MADV_POPULATE_WRITE, 0, 0, 0],
                ) {
                    debug!(pid = r.tid, start = format!("{:#x}", seg.start), %err, "populate failed");
                }
                Ok(())
            },
        )?;
        self.fill_us = t_fill.elapsed().as_micros() as u64;
        self.uffd_processes = self.uffds.len();
        self.uffds.clear();
        self.phases.mark("populate+fill");
        self.opts.hooks.hang_at("restore:filled");
        Ok(())
    }

    /// Per husk: protections, mm fields, descriptors, epolls, cwd and the rest of
    /// its environment, signal handlers, then its threads with their TIDs.
    pub fn rebuild_processes(&mut self) -> Result<(), RestoreError> {
        let mut epolls_done = HashSet::new();
        for h in &mut self.husks {
            let p = &self.img.processes[h.pi];
            finish_memory(&mut h.r, p)?;
            set_mm(&mut h.r, p, h.pidfd_slot, &self.res.map_files)?;
            fd::install(
                &mut h.r,
                h.pidfd_slot,
                &p.fds,
                &self.img.files,
                &self.res.fds,
            )?;
            fd::register_epoll(&mut h.r, &p.fds, &self.img.files, &mut epolls_done)?;
            crate::process::restore_environment(&mut h.r, p)?;
            signals::restore_actions(&mut h.r, &p.sigactions)?;
            for (i, t) in p.threads.iter().enumerate().skip(1) {
                let tid = clone_thread(&mut h.r, p.pid, t.tid)?;
                let tb = ptrace::get_regs(tid)?;
                h.threads.push(remote(tid, tb, self.tramp));
                if i == 1 && p.threads.len() > 2 {
                    self.opts.hooks.hang_at("restore:cloning-threads");
                }
            }
        }
        self.phases.mark("mm+fds+threads");
        self.point("restore:threads")
    }

    /// Process groups: leaders first, then members (sessions were made at fork).
    pub fn process_groups(&mut self) -> Result<(), RestoreError> {
        let pids_in_tree: HashSet<pid_t> = self.img.processes.iter().map(|p| p.pid).collect();
        for pass in 0..2 {
            for h in &mut self.husks {
                let p = &self.img.processes[h.pi];
                let leader = p.pgid == p.pid;
                if p.sid == p.pid || !pids_in_tree.contains(&p.pgid) || (pass == 0) != leader {
                    continue;
                }
                let target = if leader { 0 } else { p.pgid as u64 };
                h.r.syscall(nr::SETPGID, [0, target, 0, 0, 0, 0])?;
            }
        }
        // The foreground group of each controlling terminal, from its session
        // leader, now that the groups exist.
        for c in &self.res.ctty {
            if let Some(h) = self
                .husks
                .iter_mut()
                .find(|h| self.img.processes[h.pi].pid == c.session)
            {
                fd::pty::set_foreground(&mut h.r, h.pidfd_slot, c)?;
            }
        }
        Ok(())
    }

    /// Per thread state with signals blocked until the very end, pending signals,
    /// timers, credentials last; then the trampoline goes and the final registers
    /// and masks are set.
    pub fn thread_state(&mut self) -> Result<(), RestoreError> {
        for h in &mut self.husks {
            let p = &self.img.processes[h.pi];
            for (i, t) in p.threads.iter().enumerate() {
                let r = h.thread(i);
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
            if h.r.tid == self.root_pid {
                // The root husk's parent-death signal covered its first instants
                // (see the module doc); EXITKILL covers it until the release, and
                // the restored process must not die with the restorer's thread.
                h.r.syscall(nr::PRCTL, [libc::PR_SET_PDEATHSIG as u64, 0, 0, 0, 0, 0])?;
            }
            for i in 0..p.threads.len() {
                crate::process::restore_creds(h.thread(i), p)?;
            }
            // Drop the trampoline: the last injected call unmaps its own page, and
            // the thread never executes there again (its registers are set next).
            h.r.syscall(nr::MUNMAP, [self.tramp, TRAMP_LEN, 0, 0, 0, 0])?;
            for (i, t) in p.threads.iter().enumerate() {
                let host_tid = h.thread(i).tid;
                thread::restore_final(host_tid, t)?;
            }
        }
        self.phases.mark("thread-state");
        self.res.fifo_holders.clear();
        self.res.ctty.clear();
        self.res.fds.clear();
        self.opts.hooks.hang_at("restore:final-regs");
        Ok(())
    }

    /// The thread of husk `h` to keep traced at the release, so that step 4's
    /// SIGCONT does not run the program's SIGCONT handler: one that does not block
    /// SIGCONT, in a process that catches it and was running at the dump.
    fn quiet_thread(&self, h: &Husk) -> Option<pid_t> {
        let p = &self.img.processes[h.pi];
        let catches = p
            .sigactions
            .iter()
            .any(|a| a.signo == libc::SIGCONT && a.handler > 1);
        if p.stopped || !catches {
            return None;
        }
        let bit = 1u64 << (libc::SIGCONT - 1);
        let i = p.threads.iter().position(|t| t.sigmask & bit == 0)?;
        Some(if i == 0 {
            h.r.tid
        } else {
            h.threads.get(i - 1)?.tid
        })
    }

    /// Every end of every connection exists now (for a job: on every node): lift
    /// the lock first (a packet sent by an end finished elsewhere must not be
    /// dropped here: its retransmission would wait for the first timer, a second
    /// on a fresh connection), then leave repair mode and send what the peers may
    /// lack; then release the tree with one commit point (see the module doc,
    /// "The release"): every process is sent SIGSTOP while all its threads are
    /// traced, every thread is detached (each one enters the group stop before it
    /// returns to user space), the commit, then SIGCONT to every process that was
    /// not stopped at the dump.
    pub fn release(mut self) -> Result<RestoreReport, RestoreError> {
        // Output that grew after the checkpoint goes back to it, before anything
        // of the tree runs (a failure still kills every husk).
        crate::filecheck::apply(&self.changed_files)?;
        if let Some(l) = self.net_lock.take() {
            let table = l.table().to_string();
            l.unlock()?;
            self.note(Record::NetUnlock { table })?;
        }
        let root_pid = self.root_pid;
        for t in std::mem::take(&mut self.res.tcp) {
            drop(t.finish().map_err(|e| RestoreError::Husk {
                pid: root_pid,
                what: format!("finishing a TCP connection: {e}"),
            })?);
        }
        // The tmpfs files take their paths (the last thing undone by a failure).
        self.res.objects.publish(&self.img.shmem)?;
        // 1. Stop. Every thread is in a ptrace stop, so the signal only waits,
        // shared, in each process; any failure from here to the commit still
        // kills every husk (the guard).
        for h in &self.husks {
            sys::kill(h.r.tid, libc::SIGSTOP)?;
        }
        self.opts.hooks.hang_at("restore:stopped");
        // 2. Detach. A detached thread dequeues the SIGSTOP (or joins the group
        // stop another thread began) on its way back to user space: it executes
        // nothing of the image. Detaching also drops its EXITKILL.
        // The threads of a process that catches SIGCONT stay traced (without
        // EXITKILL: past this point a death of ours kills nothing, as a detach)
        // so that step 4's SIGCONT is taken away from the handler.
        let keep: Vec<Option<pid_t>> = self.husks.iter().map(|h| self.quiet_thread(h)).collect();
        for (i, h) in self.husks.iter().enumerate() {
            for r in h.threads.iter().chain([&h.r]) {
                if keep[i].is_some() {
                    ptrace::set_options(r.tid, ptrace::O_TRACESYSGOOD)?;
                } else {
                    ptrace::detach(r.tid, 0)?;
                }
            }
            if i == 0 && self.husks.len() > 1 {
                self.opts.hooks.hang_at("restore:detaching");
            }
        }
        self.opts.hooks.hang_at("restore:detached");
        // 3. The commit: the journal's `Released` record. From it on, a watchdog
        // continues the husks instead of killing them. In a new PID namespace,
        // first its init gives up the parent-death signal that would take the
        // whole namespace down with us (a death between the two: the watchdog
        // kills the husks, as before the commit).
        if let Some(init) = self.ns_init.take() {
            init.release();
        }
        self.note(Record::Released)?;
        self.husks_guard.released = true;
        self.opts.hooks.hang_at("restore:committed");
        // 4. Run: every process that was running at the dump goes on; the
        // others stay stopped, as they were.
        let stopped = |h: &Husk| self.img.processes[h.pi].stopped;
        for (h, keep) in self.husks.iter().zip(&keep).filter(|(h, _)| !stopped(h)) {
            // Past the commit nothing is undone: a process that cannot be
            // continued (it died meanwhile) must not keep the others stopped.
            let continued = match keep {
                Some(tid) => {
                    let tids: Vec<pid_t> = h.threads.iter().chain([&h.r]).map(|r| r.tid).collect();
                    crate::freeze::continue_quietly(h.r.tid, *tid, &tids)
                }
                None => sys::kill(h.r.tid, libc::SIGCONT).map_err(|e| e.to_string()),
            };
            if let Err(e) = continued {
                warn!(pid = h.r.tid, %e, "restored process not continued");
            }
        }
        for h in self.husks.iter().filter(|h| stopped(h)) {
            wait_stopped(h.r.tid);
        }
        self.phases.mark("release");
        sys::restorer::unmap_trampoline(self.tramp, TRAMP_LEN);
        Ok(RestoreReport {
            root_pid,
            memory_bytes: self.written,
            total_us: self.t0.elapsed().as_micros() as u64,
            fill_us: self.fill_us,
            uffd_processes: self.uffd_processes,
            processes: self.img.processes.len(),
            changed_files: std::mem::take(&mut self.changed_files),
        })
    }
}

/// Opens `path` for a mapping (once per path and mode).
fn open_map_file(
    files: &mut HashMap<(String, bool), OwnedFd>,
    path: &str,
    write: bool,
) -> Result<(), RestoreError> {
    if let std::collections::hash_map::Entry::Vacant(e) = files.entry((path.to_string(), write)) {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .open(path)
            .map_err(|source| FdError::Open {
                path: path.to_string(),
                source,
            })?;
        e.insert(f.into());
    }
    Ok(())
}

/// Clean the root husk: no rseq area (it would fault once unmapped: the kernel
/// writes it on every return to user space), no descriptors, no memory but the
/// trampoline.
fn clean_husk(root: &mut Remote, tramp: u64) -> Result<(), RestoreError> {
    if let Some((ptr, len, sig, _)) = ptrace::rseq_configuration(root.tid)? {
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
    Ok(())
}

/// The PID, in our namespace, of what the last injected `clone3` created: the
/// call returns it in the husk's namespace (another one with `--new-pid-ns`), the
/// fork or clone event gives it in ours.
fn created(r: &mut Remote, got: i64) -> pid_t {
    r.new_children.pop().unwrap_or(got as pid_t)
}

/// Forks, from husk `r` (process `parent`), its child with PID `pid`; returns its
/// PID in our namespace.
fn clone_child(r: &mut Remote, parent: pid_t, pid: pid_t) -> Result<pid_t, RestoreError> {
    let tid_addr = r.put(CLONE_ARGS_SIZE as u64, &pid.to_ne_bytes())?;
    let args = r.put(0, &clone_args_bytes(0, libc::SIGCHLD as u64, tid_addr))?;
    r.new_children.clear();
    let got = r.syscall_raw(nr::CLONE3, [args, CLONE_ARGS_SIZE as u64, 0, 0, 0, 0])?;
    if got == -(libc::EEXIST as i64) {
        return Err(RestoreError::PidTaken {
            pid,
            by: "another process".into(),
        });
    }
    if got < 0 {
        return Err(RestoreError::Husk {
            pid: parent,
            what: format!("clone3 of child {pid} failed: errno {}", -got),
        });
    }
    Ok(created(r, got))
}

/// Creates, in husk `r` (process `pid`), its thread with TID `tid`, and waits for
/// its first stop; returns its TID in our namespace.
fn clone_thread(r: &mut Remote, pid: pid_t, tid: pid_t) -> Result<pid_t, RestoreError> {
    let tid_addr = r.put(CLONE_ARGS_SIZE as u64, &tid.to_ne_bytes())?;
    let flags = (libc::CLONE_VM
        | libc::CLONE_FS
        | libc::CLONE_FILES
        | libc::CLONE_SIGHAND
        | libc::CLONE_THREAD
        | libc::CLONE_SYSVSEM) as u64;
    let args = r.put(0, &clone_args_bytes(flags, 0, tid_addr))?;
    r.new_children.clear();
    let got = r.syscall_raw(nr::CLONE3, [args, CLONE_ARGS_SIZE as u64, 0, 0, 0, 0])?;
    if got < 0 {
        if got == -(libc::EEXIST as i64) {
            return Err(RestoreError::PidTaken {
                pid: tid,
                by: "another process".into(),
            });
        }
        return Err(RestoreError::Husk {
            pid,
            what: format!("clone3 of thread {tid} failed: errno {}", -got),
        });
    }
    let tid = created(r, got);
    match ptrace::wait(tid)? {
        Stop::Signal(libc::SIGSTOP) | Stop::Event { .. } => Ok(tid),
        other => Err(RestoreError::Husk {
            pid: tid,
            what: format!("unexpected first stop {other:?}"),
        }),
    }
}

/// Gives the husk a pidfd of the restorer (`src_pid`, in the husk's PID
/// namespace) at a slot above every descriptor it will have; returns the slot.
fn take_pidfd_slot(r: &mut Remote, p: &Process, src_pid: pid_t) -> Result<u64, RestoreError> {
    let max_fd = p.fds.iter().map(|f| f.fd).max().unwrap_or(2).max(2);
    let slot = (max_fd + 1) as u64;
    let pfd = r.syscall(nr::PIDFD_OPEN, [src_pid as u64, 0, 0, 0, 0, 0])?;
    if pfd != slot {
        r.syscall(nr::DUP3, [pfd, slot, libc::O_CLOEXEC as u64, 0, 0, 0])?;
        r.syscall(nr::CLOSE, [pfd, 0, 0, 0, 0, 0])?;
    }
    Ok(slot)
}

/// A process that was stopped is stopped again when we return: the SIGSTOP we
/// queued takes effect once it is detached, so wait for it to land.
fn wait_stopped(pid: pid_t) {
    let not_stopped = || {
        sys::proc::stat(pid)
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
        // Seen rarely under load in a new PID namespace: the stop queued while the
        // husk was traced did not take. Stop it now that it is detached.
        warn!(
            pid,
            "stopped process did not stop after release; sending SIGSTOP again"
        );
        let _ = sys::kill(pid, libc::SIGSTOP);
        wait(2000);
    }
}

#[allow(clippy::too_many_arguments)]
fn map_memory(
    r: &mut Remote,
    p: &Process,
    husk: usize,
    slot: u64,
    map_files: &HashMap<(String, bool), OwnedFd>,
    objects: &mem::Objects,
    uffd: Option<BorrowedFd<'_>>,
    direct: &mut Vec<(ChunkRef, mem::Piece)>,
    segs: &mut Vec<mem::Segment>,
) -> Result<(), RestoreError> {
    let host_pid = r.tid;
    place_vdso(r, p)?;
    for m in &p.mappings {
        let Some(got) = map_one(r, m, slot, map_files, objects)? else {
            continue;
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
            match sys::uffd::register(fd, m.start, m.end - m.start) {
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

/// The vDSO and vvar where they were (`ARCH_MAP_VDSO_64`), checked: the kernel
/// takes the address as a hint, and the program's saved pointers into the vDSO
/// expect it there.
fn place_vdso(r: &mut Remote, p: &Process) -> Result<(), RestoreError> {
    let host_pid = r.tid;
    let find = |k: fn(&MappingKind) -> bool| p.mappings.iter().find(|m| k(&m.kind));
    let vvar = find(|k| matches!(k, MappingKind::Vvar));
    let vdso = find(|k| matches!(k, MappingKind::Vdso));
    if let Some(at) = vvar.or(vdso) {
        r.syscall(nr::ARCH_PRCTL, [ARCH_MAP_VDSO_64, at.start, 0, 0, 0, 0])?;
    }
    let Some(vd) = vdso else {
        return Ok(());
    };
    let now = sys::proc::smaps(host_pid).map_err(|e| RestoreError::Husk {
        pid: host_pid,
        what: e.to_string(),
    })?;
    match now.iter().find(|v| v.name == "[vdso]") {
        Some(v) if v.start == vd.start && v.end == vd.end => Ok(()),
        other => Err(RestoreError::Husk {
            pid: host_pid,
            what: format!(
                "the vDSO could not be placed at {:#x} (it is at {})",
                vd.start,
                other.map_or("no address".to_string(), |v| format!("{:#x}", v.start))
            ),
        }),
    }
}

/// Maps `m` in the husk at its address, with what backs it; `None` for what the
/// kernel maps itself (vDSO, vvar, vsyscall). A mapping whose data is written
/// next is writable until [`finish_memory`] puts its protection back.
fn map_one(
    r: &mut Remote,
    m: &ckpt_shared::image::Mapping,
    slot: u64,
    map_files: &HashMap<(String, bool), OwnedFd>,
    objects: &mem::Objects,
) -> Result<Option<u64>, RestoreError> {
    use ckpt_shared::image::prot;
    let len = m.end - m.start;
    let prot_now = m.prot as u64
        | if m.data.is_empty() {
            0
        } else {
            prot::WRITE as u64 | prot::READ as u64
        };
    let growsdown = if m.vm_flags.iter().any(|f| f == "gd") {
        libc::MAP_GROWSDOWN as u64
    } else {
        0
    };
    let fixed = libc::MAP_FIXED as u64;
    let share = if m.shared {
        libc::MAP_SHARED
    } else {
        libc::MAP_PRIVATE
    } as u64;
    // An mmap of the restorer's descriptor `src`, taken by the husk for the call.
    let of_fd = |r: &mut Remote, src: RawFd, prot: u64, flags: u64, offset: u64| {
        let fd = r.syscall(nr::PIDFD_GETFD, [slot, src as u64, 0, 0, 0, 0])?;
        let got = r.syscall(nr::MMAP, [m.start, len, prot, flags, fd, offset]);
        r.syscall(nr::CLOSE, [fd, 0, 0, 0, 0, 0])?;
        got
    };
    let got = match &m.kind {
        MappingKind::Vdso | MappingKind::Vvar | MappingKind::Vsyscall => return Ok(None),
        MappingKind::Anon { .. } => {
            let flags = libc::MAP_PRIVATE as u64 | libc::MAP_ANONYMOUS as u64 | fixed | growsdown;
            r.syscall(nr::MMAP, [m.start, len, prot_now, flags, u64::MAX, 0])?
        }
        MappingKind::Object { shmem_id, .. } if objects.segments.contains_key(shmem_id) => {
            attach_segment(r, m, objects.segments[shmem_id])?
        }
        MappingKind::Object { shmem_id, offset } => {
            let src = objects.fds[shmem_id].as_raw_fd();
            of_fd(r, src, prot_now, share | fixed | growsdown, *offset)?
        }
        MappingKind::SharedAnon { shmem_id, offset } => {
            let src = objects.fds[shmem_id].as_raw_fd();
            let flags = libc::MAP_SHARED as u64 | fixed;
            of_fd(r, src, m.prot as u64, flags, *offset)?
        }
        MappingKind::File { path, offset, .. } => {
            let write = m.shared && m.prot & prot::WRITE != 0;
            let src: RawFd = map_files[&(path.clone(), write)].as_raw_fd();
            of_fd(r, src, prot_now, share | fixed | growsdown, *offset)?
        }
    };
    Ok(Some(got))
}

/// Attaches System V segment `shmid` at mapping `m`'s address (injected
/// `shmat`), with the mapping's protection.
fn attach_segment(
    r: &mut Remote,
    m: &ckpt_shared::image::Mapping,
    shmid: i32,
) -> Result<u64, RestoreError> {
    use ckpt_shared::image::prot;
    const SHM_RDONLY: u64 = 0o10000;
    const SHM_EXEC: u64 = 0o100000;
    let mut flags = 0;
    if m.prot & prot::WRITE == 0 {
        flags |= SHM_RDONLY;
    }
    if m.prot & prot::EXEC != 0 {
        flags |= SHM_EXEC;
    }
    let got = r.syscall(nr::SHMAT, [shmid as u64, m.start, flags, 0, 0, 0])?;
    if got == m.start && m.prot & prot::READ == 0 {
        r.syscall(
            nr::MPROTECT,
            [m.start, m.end - m.start, m.prot as u64, 0, 0, 0],
        )?;
    }
    Ok(got)
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
    crate::process::restore_mm(r, p, exe_fd)?;
    r.syscall(nr::CLOSE, [exe_fd, 0, 0, 0, 0, 0])?;
    Ok(())
}

/// Used by restore-time figures.
pub fn image_memory_bytes(img: &Image) -> u64 {
    img.extents().map(|e| e.bytes()).sum()
}
