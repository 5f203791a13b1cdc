//! Readers of `/proc/PID/*`.
//!
//! The formats are the kernel's (Documentation/filesystems/proc.rst). Parsers are
//! strict about what they use and ignore the rest, so new kernel fields don't break
//! them.
//!
//! Kernel contract: `/proc/PID/task/TID/children` Linux ≥ 3.5 (`CONFIG_PROC_CHILDREN`
//! since 4.2, `CONFIG_CHECKPOINT_RESTORE` before); `/proc/PID/timers` ≥ 3.10 and
//! `CONFIG_CHECKPOINT_RESTORE`; `fdinfo` with `pos`/`flags` ≥ 2.6.22; `smaps`,
//! `auxv`, `limits`, `stat`, `status` older still. The links of `/proc/PID/fd` and
//! the files `fdinfo`, `auxv` and `smaps` of a process not ours need a ptrace
//! access check over it (PTRACE_MODE_READ_FSCREDS: the same user, or
//! `CAP_SYS_PTRACE`); the descriptors are read relative to `/proc/PID/fd` held
//! open (`readlinkat`, `fstatat`, `openat`), which need nothing more.

use std::fs;
use std::io;

use libc::pid_t;

#[derive(Debug, thiserror::Error)]
#[error("reading {path}: {source}")]
pub struct ProcError {
    pub path: String,
    #[source]
    pub source: io::Error,
}

type Result<T> = std::result::Result<T, ProcError>;

fn read(path: String) -> Result<String> {
    fs::read_to_string(&path).map_err(|source| ProcError { path, source })
}

fn bad(path: String, what: &str) -> ProcError {
    ProcError {
        path,
        source: io::Error::new(io::ErrorKind::InvalidData, what.to_string()),
    }
}

/// Thread IDs of a process.
pub fn tasks(pid: pid_t) -> Result<Vec<pid_t>> {
    let path = format!("/proc/{pid}/task");
    let mut out = Vec::new();
    for e in fs::read_dir(&path).map_err(|source| ProcError {
        path: path.clone(),
        source,
    })? {
        let e = e.map_err(|source| ProcError {
            path: path.clone(),
            source,
        })?;
        if let Some(t) = e.file_name().to_str().and_then(|s| s.parse().ok()) {
            out.push(t);
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// Children of a process (of all its threads).
pub fn children(pid: pid_t) -> Result<Vec<pid_t>> {
    let mut out = Vec::new();
    for tid in tasks(pid)? {
        let s = read(format!("/proc/{pid}/task/{tid}/children"))?;
        out.extend(s.split_whitespace().filter_map(|x| x.parse::<pid_t>().ok()));
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// Fields of `/proc/PID/stat` that we use.
#[derive(Debug, Clone, Default)]
pub struct Stat {
    pub comm: String,
    pub state: char,
    pub ppid: pid_t,
    pub pgid: pid_t,
    pub sid: pid_t,
    pub start_code: u64,
    pub end_code: u64,
    pub start_stack: u64,
    pub start_data: u64,
    pub end_data: u64,
    pub start_brk: u64,
    pub arg_start: u64,
    pub arg_end: u64,
    pub env_start: u64,
    pub env_end: u64,
    /// Clock ticks after boot when the process started: with the PID, an identity
    /// that survives PID reuse.
    pub start_time: u64,
}

pub fn stat(pid: pid_t) -> Result<Stat> {
    let path = format!("/proc/{pid}/stat");
    let s = read(path.clone())?;
    parse_stat(&s).ok_or_else(|| bad(path, "unexpected format"))
}

pub fn thread_stat(pid: pid_t, tid: pid_t) -> Result<Stat> {
    let path = format!("/proc/{pid}/task/{tid}/stat");
    let s = read(path.clone())?;
    parse_stat(&s).ok_or_else(|| bad(path, "unexpected format"))
}

fn parse_stat(s: &str) -> Option<Stat> {
    let open = s.find('(')?;
    let close = s.rfind(')')?;
    let comm = s[open + 1..close].to_string();
    let rest: Vec<&str> = s[close + 2..].split_whitespace().collect();
    // rest[0] is field 3 (state).
    let f = |n: usize| -> Option<u64> { rest.get(n - 3)?.parse().ok() };
    Some(Stat {
        comm,
        state: rest.first()?.chars().next()?,
        ppid: f(4)? as pid_t,
        pgid: f(5)? as pid_t,
        sid: f(6)? as pid_t,
        start_code: f(26)?,
        end_code: f(27)?,
        start_stack: f(28)?,
        start_data: f(45)?,
        end_data: f(46)?,
        start_brk: f(47)?,
        arg_start: f(48)?,
        arg_end: f(49)?,
        env_start: f(50)?,
        env_end: f(51)?,
        start_time: f(22)?,
    })
}

/// Fields of `/proc/PID/status` that we use.
#[derive(Debug, Clone, Default)]
pub struct Status {
    pub uid: [u32; 4],
    pub gid: [u32; 4],
    pub groups: Vec<u32>,
    pub umask: u32,
    pub sig_ign: u64,
    pub sig_cgt: u64,
    pub nspid: Vec<pid_t>,
    /// Resident anonymous and shared-memory kilobytes (RssAnon + RssShmem).
    pub rss_anon_kb: u64,
}

pub fn status(pid: pid_t) -> Result<Status> {
    let path = format!("/proc/{pid}/status");
    let s = read(path.clone())?;
    let mut st = Status::default();
    for line in s.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let v = v.trim();
        let nums = || {
            v.split_whitespace()
                .filter_map(|x| x.parse::<u32>().ok())
                .collect::<Vec<_>>()
        };
        match k {
            "Uid" | "Gid" => {
                let n = nums();
                if n.len() != 4 {
                    return Err(bad(path, "bad Uid/Gid line"));
                }
                let a = [n[0], n[1], n[2], n[3]];
                if k == "Uid" {
                    st.uid = a
                } else {
                    st.gid = a
                }
            }
            "Groups" => st.groups = nums(),
            "Umask" => {
                st.umask = u32::from_str_radix(v, 8).map_err(|_| bad(path.clone(), "bad Umask"))?
            }
            "SigIgn" => {
                st.sig_ign =
                    u64::from_str_radix(v, 16).map_err(|_| bad(path.clone(), "bad SigIgn"))?
            }
            "SigCgt" => {
                st.sig_cgt =
                    u64::from_str_radix(v, 16).map_err(|_| bad(path.clone(), "bad SigCgt"))?
            }
            "RssAnon" | "RssShmem" => {
                st.rss_anon_kb += v
                    .split_whitespace()
                    .next()
                    .and_then(|x| x.parse::<u64>().ok())
                    .unwrap_or(0)
            }
            "NSpid" => {
                st.nspid = v
                    .split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect()
            }
            _ => {}
        }
    }
    Ok(st)
}

/// One line of `/proc/PID/smaps`, with its `VmFlags`.
#[derive(Debug, Clone)]
pub struct Vma {
    pub start: u64,
    pub end: u64,
    pub read: bool,
    pub write: bool,
    pub exec: bool,
    pub shared: bool,
    pub pgoff: u64,
    pub dev: (u32, u32),
    pub inode: u64,
    /// The path or pseudo-name (`[heap]`, `[stack]`, `[vdso]`, ...), empty if none.
    pub name: String,
    pub vm_flags: Vec<String>,
}

impl Vma {
    pub fn has_flag(&self, f: &str) -> bool {
        self.vm_flags.iter().any(|x| x == f)
    }
}

pub fn smaps(pid: pid_t) -> Result<Vec<Vma>> {
    let path = format!("/proc/{pid}/smaps");
    let s = read(path.clone())?;
    let mut out: Vec<Vma> = Vec::new();
    for line in s.lines() {
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            if let Some(v) = out.last_mut() {
                v.vm_flags = flags.split_whitespace().map(str::to_string).collect();
            }
            continue;
        }
        let first = line.split_whitespace().next().unwrap_or("");
        if !first.contains('-') || first.ends_with(':') {
            continue;
        }
        out.push(parse_maps_line(line).ok_or_else(|| bad(path.clone(), "bad mapping line"))?);
    }
    Ok(out)
}

fn parse_maps_line(line: &str) -> Option<Vma> {
    let mut it = line.splitn(6, ' ');
    let range = it.next()?;
    let perms = it.next()?.as_bytes();
    let off = it.next()?;
    let dev = it.next()?;
    let inode = it.next()?;
    let name = it.next().unwrap_or("").trim_start().to_string();
    let (a, b) = range.split_once('-')?;
    let (ma, mi) = dev.split_once(':')?;
    Some(Vma {
        start: u64::from_str_radix(a, 16).ok()?,
        end: u64::from_str_radix(b, 16).ok()?,
        read: perms.first() == Some(&b'r'),
        write: perms.get(1) == Some(&b'w'),
        exec: perms.get(2) == Some(&b'x'),
        shared: perms.get(3) == Some(&b's'),
        pgoff: u64::from_str_radix(off, 16).ok()?,
        dev: (
            u32::from_str_radix(ma, 16).ok()?,
            u32::from_str_radix(mi, 16).ok()?,
        ),
        inode: inode.parse().ok()?,
        name,
        vm_flags: Vec::new(),
    })
}

/// The whole text of `/proc/PID/fdinfo/FD`.
pub fn fdinfo_text(pid: pid_t, fd: i32) -> Result<String> {
    read(format!("/proc/{pid}/fdinfo/{fd}"))
}

/// `/proc/PID/fd` and `/proc/PID/fdinfo`, held open: each descriptor is then
/// looked up from its directory, not from `/`, which with a thousand descriptors
/// is a good part of the time they take to read.
pub struct FdDirs {
    pid: pid_t,
    fd: fs::File,
    info: fs::File,
}

impl FdDirs {
    pub fn open(pid: pid_t) -> Result<FdDirs> {
        let dir = |what: &str| {
            let path = format!("/proc/{pid}/{what}");
            fs::File::open(&path).map_err(|source| ProcError { path, source })
        };
        Ok(FdDirs {
            pid,
            fd: dir("fd")?,
            info: dir("fdinfo")?,
        })
    }

    fn err(&self, what: &str, n: i32) -> ProcError {
        ProcError {
            path: format!("/proc/{}/{what}/{n}", self.pid),
            source: io::Error::last_os_error(),
        }
    }

    /// Where descriptor `n` leads (`readlink`).
    pub fn link(&self, n: i32) -> Result<String> {
        use std::os::fd::AsRawFd;
        let name = std::ffi::CString::new(n.to_string()).expect("digits");
        let mut buf = vec![0u8; 4096];
        // SAFETY: readlinkat into our own buffer of the given size.
        let len = unsafe {
            libc::readlinkat(
                self.fd.as_raw_fd(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if len < 0 {
            return Err(self.err("fd", n));
        }
        buf.truncate(len as usize);
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }

    /// What descriptor `n` leads to (`stat`, following the link).
    pub fn stat(&self, n: i32) -> Result<libc::stat> {
        use std::os::fd::AsRawFd;
        let name = std::ffi::CString::new(n.to_string()).expect("digits");
        // SAFETY: stat is plain old data; fstatat fills it.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstatat on our directory descriptor, into `st`.
        if unsafe { libc::fstatat(self.fd.as_raw_fd(), name.as_ptr(), &mut st, 0) } != 0 {
            return Err(self.err("fd", n));
        }
        Ok(st)
    }

    /// `fdinfo` of descriptor `n`: (pos, flags).
    pub fn info(&self, n: i32) -> Result<(u64, u32)> {
        use std::os::fd::{AsRawFd, FromRawFd};
        let name = std::ffi::CString::new(n.to_string()).expect("digits");
        // SAFETY: openat relative to our directory descriptor.
        let raw = unsafe {
            libc::openat(
                self.info.as_raw_fd(),
                name.as_ptr(),
                libc::O_RDONLY | libc::O_CLOEXEC,
            )
        };
        if raw < 0 {
            return Err(self.err("fdinfo", n));
        }
        // SAFETY: a fresh descriptor we own (closed when `f` drops).
        let f = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
        // One read: pos and flags are the first lines, well within 256 bytes (and
        // a plain read skips the size probing of read_to_string).
        let mut buf = [0u8; 256];
        // SAFETY: read into our own buffer of that size.
        let len = unsafe { libc::read(f.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if len < 0 {
            return Err(self.err("fdinfo", n));
        }
        let s = String::from_utf8_lossy(&buf[..len as usize]);
        parse_fdinfo(&s).ok_or_else(|| {
            bad(
                format!("/proc/{}/fdinfo/{n}", self.pid),
                "missing pos or flags",
            )
        })
    }
}

fn parse_fdinfo(s: &str) -> Option<(u64, u32)> {
    let mut pos = None;
    let mut flags = None;
    for line in s.lines() {
        if let Some(v) = line.strip_prefix("pos:") {
            pos = v.trim().parse().ok();
        } else if let Some(v) = line.strip_prefix("flags:") {
            flags = u32::from_str_radix(v.trim(), 8).ok();
        }
    }
    Some((pos?, flags?))
}

/// Open descriptor numbers of a process.
pub fn fds(pid: pid_t) -> Result<Vec<i32>> {
    let path = format!("/proc/{pid}/fd");
    let mut out = Vec::new();
    for e in fs::read_dir(&path).map_err(|source| ProcError {
        path: path.clone(),
        source,
    })? {
        let e = e.map_err(|source| ProcError {
            path: path.clone(),
            source,
        })?;
        if let Some(n) = e.file_name().to_str().and_then(|s| s.parse().ok()) {
            out.push(n);
        }
    }
    out.sort_unstable();
    Ok(out)
}

pub fn readlink(path: String) -> Result<String> {
    fs::read_link(&path)
        .map(|p| p.to_string_lossy().into_owned())
        .map_err(|source| ProcError { path, source })
}

/// `/proc/PID/limits`: (resource, soft, hard) in resource order, `u64::MAX` for
/// unlimited. Read from /proc rather than with `prlimit(2)`, which needs
/// CAP_SYS_RESOURCE for a process of another user.
pub fn limits(pid: pid_t) -> Result<Vec<(u32, u64, u64)>> {
    let path = format!("/proc/{pid}/limits");
    let s = read(path.clone())?;
    let val = |v: &str| -> Option<u64> {
        let v = v.trim();
        if v == "unlimited" {
            Some(u64::MAX)
        } else {
            v.parse().ok()
        }
    };
    let mut out = Vec::new();
    for (i, line) in s.lines().skip(1).enumerate() {
        let (Some(soft), Some(hard)) = (
            line.get(26..47).and_then(val),
            line.get(47..68).and_then(val),
        ) else {
            return Err(bad(path, "unexpected limits line"));
        };
        out.push((i as u32, soft, hard));
    }
    Ok(out)
}

/// `/proc/PID/auxv` as words.
pub fn auxv(pid: pid_t) -> Result<Vec<u64>> {
    let path = format!("/proc/{pid}/auxv");
    let b = fs::read(&path).map_err(|source| ProcError { path, source })?;
    Ok(b.chunks_exact(8)
        .map(|c| u64::from_ne_bytes(c.try_into().expect("8 bytes")))
        .collect())
}

/// One entry of `/proc/PID/timers` (a POSIX timer).
#[derive(Debug, Clone, Copy)]
pub struct TimerInfo {
    pub id: i32,
    pub signo: i32,
    pub notify: i32,
    pub notify_tid: i32,
    pub clock: i32,
    /// `sigev_value`.
    pub value: u64,
}

/// Entries of `/proc/PID/timers` (POSIX timers).
pub fn posix_timers(pid: pid_t) -> Result<Vec<TimerInfo>> {
    let path = format!("/proc/{pid}/timers");
    let s = read(path.clone())?;
    let mut out = Vec::new();
    let (mut id, mut signo, mut value, mut notify, mut ntid) = (0i32, 0i32, 0u64, 0i32, 0i32);
    for line in s.lines() {
        let line = line.trim();
        if let Some(v) = line.strip_prefix("ID:") {
            id = v.trim().parse().map_err(|_| bad(path.clone(), "bad ID"))?;
        } else if let Some(v) = line.strip_prefix("signal:") {
            // "signal: 14/0000000000000000"
            let (a, b) = v
                .trim()
                .split_once('/')
                .ok_or_else(|| bad(path.clone(), "bad signal"))?;
            signo = a.parse().map_err(|_| bad(path.clone(), "bad signal"))?;
            value = u64::from_str_radix(b.trim_start_matches("0x"), 16).unwrap_or(0);
        } else if let Some(v) = line.strip_prefix("notify:") {
            // "notify: signal/pid.123", "signal/tid.123" (SIGEV_THREAD_ID),
            // "none/pid.0"; "thread" is SIGEV_THREAD.
            let (kind, who) = v
                .trim()
                .split_once('/')
                .ok_or_else(|| bad(path.clone(), "bad notify"))?;
            let base = match kind {
                "signal" => libc::SIGEV_SIGNAL,
                "thread" => libc::SIGEV_THREAD,
                _ => libc::SIGEV_NONE,
            };
            notify = if who.starts_with("tid.") {
                base | libc::SIGEV_THREAD_ID
            } else {
                base
            };
            ntid = who
                .split('.')
                .nth(1)
                .and_then(|x| x.parse().ok())
                .unwrap_or(0);
        } else if let Some(v) = line.strip_prefix("ClockID:") {
            let clock = v
                .trim()
                .parse()
                .map_err(|_| bad(path.clone(), "bad ClockID"))?;
            out.push(TimerInfo {
                id,
                signo,
                notify,
                notify_tid: ntid,
                clock,
                value,
            });
        }
    }
    Ok(out)
}

/// Read the pagemap entries for `[start, end)`: one u64 per page.
pub fn pagemap(file: &fs::File, start: u64, end: u64) -> io::Result<Vec<u64>> {
    use std::os::unix::fs::FileExt;
    let pages = ((end - start) / 4096) as usize;
    let mut buf = vec![0u8; pages * 8];
    let mut done = 0;
    while done < buf.len() {
        let n = file.read_at(&mut buf[done..], (start / 4096) * 8 + done as u64)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "short pagemap read",
            ));
        }
        done += n;
    }
    Ok(buf
        .chunks_exact(8)
        .map(|c| u64::from_ne_bytes(c.try_into().expect("8 bytes")))
        .collect())
}

pub const PM_PRESENT: u64 = 1 << 63;
pub const PM_SWAP: u64 = 1 << 62;
pub const PM_FILE: u64 = 1 << 61;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_maps_line() {
        let v =
            parse_maps_line("7f0000000000-7f0000021000 rw-p 00001000 fd:01 1234   /usr/lib/x y.so")
                .unwrap();
        assert_eq!(
            (v.start, v.end, v.pgoff, v.inode),
            (0x7f0000000000, 0x7f0000021000, 0x1000, 1234)
        );
        assert!(v.read && v.write && !v.exec && !v.shared);
        assert_eq!(v.name, "/usr/lib/x y.so");
        assert_eq!(v.dev, (0xfd, 1));
        let v = parse_maps_line(
            "7ffd1000-7ffd2000 r-xp 00000000 00:00 0                          [vdso]",
        )
        .unwrap();
        assert_eq!(v.name, "[vdso]");
    }

    #[test]
    fn parses_own_stat_and_status() {
        let me = std::process::id() as pid_t;
        let s = stat(me).unwrap();
        assert!(matches!(s.state, 'R' | 'S'), "state {}", s.state);
        assert!(s.start_brk > 0 && s.arg_end > s.arg_start);
        let st = status(me).unwrap();
        assert_eq!(st.nspid.first(), Some(&me));
        assert!(!smaps(me).unwrap().is_empty());
        let lim = limits(me).unwrap();
        assert_eq!(lim.len(), 16);
        let nofile = lim[libc::RLIMIT_NOFILE as usize];
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one rlimit.
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) };
        assert_eq!((nofile.1, nofile.2), (r.rlim_cur, r.rlim_max));
    }
}
