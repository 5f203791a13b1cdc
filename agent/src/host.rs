//! The host an image was made on, and whether this one can run it.
//!
//! Dump records a [`HostFingerprint`] (kernel, XSAVE features and size, the vDSO's
//! bytes and the vvar size); restore refuses, before anything is created, an image
//! whose threads need CPU state this host lacks, whose vDSO differs (the tree comes
//! back with its vDSO at the old address, and saved pointers into it must still
//! point at the same code), whose PIDs are taken, or whose files changed (see
//! [`crate::filecheck`]).

use std::path::Path;
use std::time::Instant;

use ckpt_shared::image::{FileCheck, HostFingerprint, Image};
use libc::pid_t;

use crate::dump::DumpError;
use crate::filecheck::{Changed, ChangedFiles};
use crate::restore::RestoreError;
use crate::sys::{self, proc};

/// Files larger than this are checked by size, mtime and inode only.
const HASH_LIMIT: u64 = 64 << 20;

/// The fingerprint of this host as seen through process `pid`'s mappings (`vmas`)
/// and its vDSO bytes; the XSAVE size is the first thread's (filled in by the caller
/// once the threads are read).
pub fn fingerprint(vmas: &[proc::Vma], vdso_bytes: &[u8]) -> HostFingerprint {
    HostFingerprint {
        kernel: uname_release(),
        hostname: hostname(),
        xcr0: sys::host_xcr0(),
        xsave_size: 0,
        vdso_hash: *blake3::hash(vdso_bytes).as_bytes(),
        vdso_size: vdso_bytes.len() as u64,
        vvar_size: vvar_size(vmas),
    }
}

fn vvar_size(vmas: &[proc::Vma]) -> u64 {
    vmas.iter()
        .filter(|v| v.name.starts_with("[vvar"))
        .map(|v| v.end - v.start)
        .sum()
}

pub fn uname_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Size, mtime and identity of a file, taken while the tree is frozen.
pub fn stat_check(path: &str) -> Result<FileCheck, DumpError> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).map_err(|source| DumpError::FileCheck {
        path: path.to_string(),
        source,
    })?;
    Ok(FileCheck {
        path: path.to_string(),
        size: m.len(),
        mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
        dev: m.dev(),
        ino: m.ino(),
        hash: None,
        written: false,
        mapped_exec: false,
    })
}

/// BLAKE3 of the first `size` bytes of a file (those that existed at the freeze),
/// if the file is small enough to hash.
pub fn hash_prefix(path: &str, size: u64) -> Result<Option<[u8; 32]>, DumpError> {
    if size > HASH_LIMIT {
        return Ok(None);
    }
    prefix_hash(Path::new(path), size)
        .map(Some)
        .map_err(|source| DumpError::FileCheck {
            path: path.to_string(),
            source,
        })
}

/// BLAKE3 of the first `size` bytes of a file; an error if it has fewer.
pub fn prefix_hash(path: &Path, size: u64) -> std::io::Result<[u8; 32]> {
    let f = std::fs::File::open(path)?;
    let mut h = blake3::Hasher::new();
    let copied = std::io::copy(&mut std::io::Read::take(f, size), &mut h)?;
    if copied != size {
        return Err(std::io::Error::other(format!(
            "the file shrank below {size} bytes while it was hashed"
        )));
    }
    Ok(*h.finalize().as_bytes())
}

fn hex(b: &[u8]) -> String {
    b.iter().take(8).map(|x| format!("{x:02x}")).collect()
}

/// Our own vDSO: its bytes, and the size of the vvar area in front of it.
pub fn host_vdso() -> Result<(Vec<u8>, u64), RestoreError> {
    let me = std::process::id() as pid_t;
    let vmas = proc::smaps(me).map_err(|e| RestoreError::Husk {
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
    Ok((
        sys::restorer::own_mapping_bytes(v.start, v.end),
        vvar_size(&vmas),
    ))
}

fn host_xsave_size() -> u32 {
    // CPUID leaf 0xD sub-leaf 0: EBX is the XSAVE area size for the features
    // enabled in XCR0.
    std::arch::x86_64::__cpuid_count(0xd, 0).ebx
}

/// Refuse an image this host cannot run, before anything is created; the output
/// files that changed but may be restored against (see [`crate::filecheck`]).
pub fn check(
    img: &Image,
    new_pid_ns: bool,
    changed_files: ChangedFiles,
) -> Result<Vec<Changed>, RestoreError> {
    check_cpu(img)?;
    check_vdso(img)?;
    if !new_pid_ns {
        check_pids(img)?;
    }
    crate::filecheck::check_all(&img.file_checks, changed_files)
}

fn check_cpu(img: &Image) -> Result<(), RestoreError> {
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
    Ok(())
}

fn check_vdso(img: &Image) -> Result<(), RestoreError> {
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
    Ok(())
}

fn check_pids(img: &Image) -> Result<(), RestoreError> {
    for p in &img.processes {
        for t in &p.threads {
            if pid_in_use(t.tid) {
                let by = match proc::stat(t.tid) {
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
    Ok(())
}

/// Is `pid` taken? A zombie whose parent is about to reap it (the usual state
/// right after `dump` killed the tree) is given a moment to go.
fn pid_in_use(pid: pid_t) -> bool {
    let deadline = Instant::now() + std::time::Duration::from_secs(3);
    loop {
        match proc::stat(pid) {
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
