//! Memory objects that are files: memfds and their seals, unlinked files made
//! with `O_TMPFILE`, which parts of a file hold data, tmpfs, and System V shared
//! memory segments (made, attached and removed in the agent's own process).
//!
//! Kernel contract: `memfd_create` Linux ≥ 3.17 (`MFD_NOEXEC_SEAL`/`F_SEAL_EXEC`
//! 6.3), `O_TMPFILE` ≥ 3.11 (tmpfs, ext4, xfs, btrfs), `SEEK_DATA`/`SEEK_HOLE`
//! ≥ 3.1, `/proc/sys/kernel/shm_next_id` ≥ 3.19. Choosing a segment's id needs
//! `CAP_SYS_RESOURCE` in the IPC namespace's user namespace; `fchown` to another
//! user needs `CAP_CHOWN`.

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use super::SysError;

type Result<T> = std::result::Result<T, SysError>;

/// `TMPFS_MAGIC` of statfs(2).
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// `HUGETLBFS_MAGIC` of statfs(2).
const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

fn fs_magic(fd: BorrowedFd<'_>, what: &str) -> Result<i64> {
    let st = nix::sys::statfs::fstatfs(fd).map_err(|e| SysError::nix("fstatfs", what, e))?;
    Ok(st.filesystem_type().0 as i64)
}

/// Whether the file behind `fd` lives on a tmpfs.
pub fn on_tmpfs(fd: BorrowedFd<'_>, what: &str) -> Result<bool> {
    Ok(fs_magic(fd, what)? == TMPFS_MAGIC)
}

/// Whether `path` is a regular file on a tmpfs (statfs and stat by path: nothing
/// is opened, so a device behind the path is never touched).
pub fn path_on_tmpfs(path: &str) -> Result<bool> {
    let st = nix::sys::statfs::statfs(path).map_err(|e| SysError::nix("statfs", path, e))?;
    if st.filesystem_type().0 as i64 != TMPFS_MAGIC {
        return Ok(false);
    }
    let m = nix::sys::stat::stat(path).map_err(|e| SysError::nix("stat", path, e))?;
    Ok(m.st_mode & libc::S_IFMT == libc::S_IFREG)
}

/// Whether the file behind `fd` lives on a hugetlbfs (a `MFD_HUGETLB` memfd).
pub fn on_hugetlbfs(fd: BorrowedFd<'_>, what: &str) -> Result<bool> {
    Ok(fs_magic(fd, what)? == HUGETLBFS_MAGIC)
}

/// fstat(2) of `fd`.
pub fn fstat(fd: BorrowedFd<'_>, what: &str) -> Result<libc::stat> {
    nix::sys::stat::fstat(fd).map_err(|e| SysError::nix("fstat", what, e))
}

/// fcntl(F_GET_SEALS) of a memfd.
pub fn get_seals(fd: BorrowedFd<'_>, what: &str) -> Result<u32> {
    // SAFETY: F_GET_SEALS takes no argument and reads nothing of ours.
    let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
    if r < 0 {
        return Err(SysError::last("fcntl(F_GET_SEALS)", what));
    }
    Ok(r as u32)
}

/// fcntl(F_ADD_SEALS) of `seals` on a memfd.
pub fn add_seals(fd: BorrowedFd<'_>, seals: u32, what: &str) -> Result<()> {
    // SAFETY: F_ADD_SEALS takes an int by value.
    let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals as libc::c_int) };
    if r < 0 {
        return Err(SysError::last("fcntl(F_ADD_SEALS)", what));
    }
    Ok(())
}

/// memfd_create(2) of `name` with `flags` (close-on-exec added), `size` bytes.
pub fn memfd(name: &str, flags: u32, size: u64) -> Result<OwnedFd> {
    let cname = CString::new(name).map_err(|_| SysError {
        op: "memfd_create",
        what: name.to_string(),
        source: std::io::ErrorKind::InvalidInput.into(),
    })?;
    // SAFETY: a NUL-terminated name that outlives the call, and plain flags.
    let raw = unsafe { libc::memfd_create(cname.as_ptr(), flags | libc::MFD_CLOEXEC) };
    if raw < 0 {
        return Err(SysError::last("memfd_create", name));
    }
    // SAFETY: a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    truncate(fd.as_fd(), size, name)?;
    Ok(fd)
}

/// ftruncate(2) to `size`.
pub fn truncate(fd: BorrowedFd<'_>, size: u64, what: &str) -> Result<()> {
    nix::unistd::ftruncate(fd, size as i64).map_err(|e| SysError::nix("ftruncate", what, e))
}

/// An unlinked regular file in directory `dir` (`O_TMPFILE`), read-write,
/// `size` bytes, with `mode` and owner `uid:gid`.
pub fn tmpfile(dir: &str, size: u64, mode: u32, uid: u32, gid: u32) -> Result<OwnedFd> {
    let cdir = CString::new(dir).map_err(|_| SysError {
        op: "open(O_TMPFILE)",
        what: dir.to_string(),
        source: std::io::ErrorKind::InvalidInput.into(),
    })?;
    // SAFETY: a NUL-terminated path that outlives the call, plain flags and mode.
    let raw = unsafe {
        libc::open(
            cdir.as_ptr(),
            libc::O_TMPFILE | libc::O_RDWR | libc::O_CLOEXEC,
            (mode & 0o7777) as libc::c_uint,
        )
    };
    if raw < 0 {
        return Err(SysError::last("open(O_TMPFILE)", dir));
    }
    // SAFETY: a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    truncate(fd.as_fd(), size, dir)?;
    // The umask took bits from the mode at the open.
    nix::sys::stat::fchmod(
        fd.as_fd(),
        nix::sys::stat::Mode::from_bits_truncate(mode & 0o7777),
    )
    .map_err(|e| SysError::nix("fchmod", dir, e))?;
    nix::unistd::fchown(
        fd.as_fd(),
        Some(nix::unistd::Uid::from_raw(uid)),
        Some(nix::unistd::Gid::from_raw(gid)),
    )
    .map_err(|e| SysError::nix("fchown", dir, e))?;
    Ok(fd)
}

/// The runs `[start, end)` of `fd` below `size` that hold data (`SEEK_DATA` /
/// `SEEK_HOLE`): the holes of a sparse file are not read.
pub fn data_runs(fd: BorrowedFd<'_>, size: u64, what: &str) -> Result<Vec<(u64, u64)>> {
    use nix::unistd::{lseek, Whence};
    let mut out = Vec::new();
    let mut at = 0u64;
    while at < size {
        let start = match lseek(fd, at as i64, Whence::SeekData) {
            Ok(s) => s as u64,
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => return Err(SysError::nix("lseek(SEEK_DATA)", what, e)),
        };
        if start >= size {
            break;
        }
        let end = lseek(fd, start as i64, Whence::SeekHole)
            .map_err(|e| SysError::nix("lseek(SEEK_HOLE)", what, e))? as u64;
        let end = end.min(size);
        out.push((start, end));
        at = end;
    }
    Ok(out)
}

/// What `shmctl(IPC_STAT)` says of a segment.
#[derive(Debug, Clone, Copy)]
pub struct SegmentStat {
    pub key: i32,
    pub size: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nattch: u64,
}

/// shmctl(IPC_STAT) of segment `shmid`.
pub fn shm_stat(shmid: i32) -> Result<SegmentStat> {
    // SAFETY: shmid_ds is plain data; the kernel fills it.
    let mut ds: libc::shmid_ds = unsafe { std::mem::zeroed() };
    // SAFETY: a pointer to our own shmid_ds for the call.
    let r = unsafe { libc::shmctl(shmid, libc::IPC_STAT, &mut ds) };
    if r < 0 {
        return Err(SysError::last(
            "shmctl(IPC_STAT)",
            format!("segment {shmid}"),
        ));
    }
    Ok(SegmentStat {
        key: ds.shm_perm.__key,
        size: ds.shm_segsz as u64,
        mode: ds.shm_perm.mode as u32,
        uid: ds.shm_perm.uid,
        gid: ds.shm_perm.gid,
        nattch: ds.shm_nattch as u64,
    })
}

/// shmctl(IPC_SET): owner and permission bits of segment `shmid`.
pub fn shm_set_owner(shmid: i32, mode: u32, uid: u32, gid: u32) -> Result<()> {
    // SAFETY: shmid_ds is plain data.
    let mut ds: libc::shmid_ds = unsafe { std::mem::zeroed() };
    ds.shm_perm.uid = uid;
    ds.shm_perm.gid = gid;
    ds.shm_perm.mode = (mode & 0o777) as _;
    // SAFETY: a pointer to our own shmid_ds; IPC_SET reads uid, gid and mode.
    let r = unsafe { libc::shmctl(shmid, libc::IPC_SET, &mut ds) };
    if r < 0 {
        return Err(SysError::last(
            "shmctl(IPC_SET)",
            format!("segment {shmid}"),
        ));
    }
    Ok(())
}

/// shmctl(IPC_RMID): the segment goes once nothing has it attached.
pub fn shm_remove(shmid: i32) -> Result<()> {
    // SAFETY: IPC_RMID reads no buffer.
    let r = unsafe { libc::shmctl(shmid, libc::IPC_RMID, std::ptr::null_mut()) };
    if r < 0 {
        return Err(SysError::last(
            "shmctl(IPC_RMID)",
            format!("segment {shmid}"),
        ));
    }
    Ok(())
}

/// The id of the segment with `key` in our IPC namespace, if one exists.
pub fn shm_lookup(key: i32) -> Result<Option<i32>> {
    // SAFETY: shmget with size 0 and no IPC_CREAT only looks the key up.
    let r = unsafe { libc::shmget(key, 0, 0) };
    if r >= 0 {
        return Ok(Some(r));
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ENOENT) => Ok(None),
        _ => Err(SysError {
            op: "shmget",
            what: format!("key {key:#x}"),
            source: e,
        }),
    }
}

/// A new segment of `size` bytes with `key` (`IPC_PRIVATE`: 0) and, if the kernel
/// grants it, the id `want`: the id is asked for through `shm_next_id`, and the
/// one the kernel gave is returned (the caller checks it).
pub fn shm_create(key: i32, size: u64, mode: u32, want: i32) -> Result<i32> {
    std::fs::write("/proc/sys/kernel/shm_next_id", want.to_string()).map_err(|source| {
        SysError {
            op: "write",
            what: "/proc/sys/kernel/shm_next_id".into(),
            source,
        }
    })?;
    let flags = libc::IPC_CREAT | libc::IPC_EXCL | (mode & 0o777) as i32;
    // SAFETY: shmget with plain arguments.
    let r = unsafe { libc::shmget(key, size as usize, flags) };
    if r < 0 {
        let e = SysError::last("shmget", format!("key {key:#x}"));
        let _ = std::fs::write("/proc/sys/kernel/shm_next_id", "-1");
        return Err(e);
    }
    Ok(r)
}

/// A read-write descriptor of segment `shmid`'s memory: the segment is attached
/// to us for as long as it takes to open its file through
/// `/proc/self/map_files`, then detached.
pub fn shm_file(shmid: i32, size: u64) -> Result<OwnedFd> {
    // SAFETY: shmat at an address the kernel picks; we detach it below and never
    // touch the memory.
    let at = unsafe { libc::shmat(shmid, std::ptr::null(), 0) };
    if at as isize == -1 {
        return Err(SysError::last("shmat", format!("segment {shmid}")));
    }
    let len = size.div_ceil(4096) * 4096;
    let path = format!("/proc/self/map_files/{:x}-{:x}", at as u64, at as u64 + len);
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path);
    // SAFETY: `at` is the attachment made above, which nothing of ours uses.
    unsafe { libc::shmdt(at) };
    let f = opened.map_err(|source| SysError {
        op: "open",
        what: path,
        source,
    })?;
    Ok(f.into())
}

/// Whether process `pid` is in our IPC namespace.
pub fn same_ipc_ns(pid: libc::pid_t) -> Result<bool> {
    let link = |p: String| {
        std::fs::read_link(&p).map_err(|source| SysError {
            op: "readlink",
            what: p,
            source,
        })
    };
    Ok(link(format!("/proc/{pid}/ns/ipc"))? == link("/proc/self/ns/ipc".into())?)
}
