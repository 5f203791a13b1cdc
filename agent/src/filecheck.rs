//! The files an image depends on, checked at restore before anything is created,
//! and the tree's output put back as it was at the checkpoint.
//!
//! Every file behind a mapping or a descriptor has a [`FileCheck`]: its size,
//! mtime, device and inode at the freeze, and (up to [`crate::host`]'s hash
//! limit) the BLAKE3 of its bytes. A file whose identity or content differs is
//! refused, with one exception: **output the tree wrote**.
//!
//! # Which files are the tree's output
//!
//! A file qualifies when, at the dump, it was a regular file open for writing
//! (`O_WRONLY` or `O_RDWR`, with or without `O_APPEND`) by some descriptor of the
//! tree, and no process of the tree mapped it executable ([`FileCheck::written`]
//! and [`FileCheck::mapped_exec`], filled by the dump). That is a program's
//! `> out` (the shell opens it `O_WRONLY|O_CREAT|O_TRUNC`), a log it opened, a
//! results file it rewrites. A file the tree only read, or mapped executable
//! (code, libraries), that changed is refused whatever the policy: the restored
//! process would run against bytes it never saw.
//!
//! After a `--leave-running` dump the tree goes on writing: by the time the job
//! dies and is restarted from that checkpoint, its output holds what it wrote
//! after the checkpoint, which the restored run writes again. So the dump hashes
//! the bytes a written file held at the freeze while the tree is still frozen
//! (files up to the hash limit, 64 MiB: reading them lengthens the freeze of a
//! `--leave-running` dump by that much; without it the tree never runs again and
//! they are hashed after), and the restore, by default ([`ChangedFiles::Truncate`]):
//! - a file that **grew** and whose first `size` bytes are the ones hashed at the
//!   freeze is truncated to `size`: the output ends where it ended at the
//!   checkpoint, and the restored run continues it byte for byte as an
//!   uninterrupted run would have. A file larger than the hash limit has no hash;
//!   it is truncated too, and the summary says that its first bytes were not
//!   compared;
//! - a file whose bytes **before** the saved size changed (same size, other
//!   content; or grown with another prefix) is refused: the image does not hold
//!   those bytes, so it cannot bring them back, and a restore against them would
//!   not give the uninterrupted run's output;
//! - a file that **shrank** below the saved size is refused (bytes the tree had
//!   written are gone).
//!
//! With [`ChangedFiles::Keep`] (`--changed-files=keep`) a written file is left as
//! it is, whatever happened to it, and the summary names it. A job restore (the
//! agent daemon) always uses the default: the controller does not pass a policy
//! down yet.
//!
//! The truncation is done at the release, after every process of the tree is
//! rebuilt and before any of it runs (so a restore refused earlier, for any
//! reason, leaves the file untouched); the restore's summary names each file it
//! truncated.

use std::path::Path;

use ckpt_shared::image::FileCheck;

use crate::restore::RestoreError;

/// What the restore does with output that changed since the dump.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ChangedFiles {
    /// Bring it back to the checkpoint's (truncate what grew; refuse the rest).
    #[default]
    Truncate,
    /// Leave it as it is.
    Keep,
}

impl std::str::FromStr for ChangedFiles {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "truncate" => Ok(ChangedFiles::Truncate),
            "keep" => Ok(ChangedFiles::Keep),
            _ => Err(format!("`{s}`: expected truncate or keep")),
        }
    }
}

/// A file of the tree's output that changed, and what the restore does with it.
#[derive(Debug, Clone, PartialEq)]
pub struct Changed {
    pub path: String,
    pub action: Action,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Truncated back to `to` bytes at the release (it is `now` bytes).
    Truncate { to: u64, now: u64, verified: bool },
    /// Left as it is (`--changed-files=keep`); `what` changed.
    Keep { what: String },
}

impl std::fmt::Display for Changed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.action {
            Action::Truncate { to, now, verified } => write!(
                f,
                "file {} truncated to {to} bytes, its size at the checkpoint (it had grown \
                 to {now}){}",
                self.path,
                if *verified {
                    ""
                } else {
                    "; its first bytes were not compared (larger than the hash limit)"
                }
            ),
            Action::Keep { what } => write!(
                f,
                "file {} kept as it is (--changed-files=keep): {what}",
                self.path
            ),
        }
    }
}

/// Checks every file of an image; the output files that changed but may be
/// restored against, with what to do with each.
pub fn check_all(checks: &[FileCheck], policy: ChangedFiles) -> Result<Vec<Changed>, RestoreError> {
    let mut out = Vec::new();
    for c in checks {
        if let Some(action) = check_file(c, policy)? {
            out.push(Changed {
                path: c.path.clone(),
                action,
            });
        }
    }
    Ok(out)
}

/// Truncates what [`check_all`] decided, once the tree is rebuilt.
pub fn apply(changed: &[Changed]) -> Result<(), RestoreError> {
    for c in changed {
        if let Action::Truncate { to, .. } = c.action {
            let fail = |e: std::io::Error| RestoreError::FileChanged {
                path: c.path.clone(),
                what: format!("it grew and cannot be truncated back to {to} bytes: {e}"),
            };
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&c.path)
                .map_err(fail)?;
            f.set_len(to).map_err(fail)?;
        }
    }
    Ok(())
}

fn mtime_ns(m: &std::fs::Metadata) -> i128 {
    use std::os::unix::fs::MetadataExt;
    m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128
}

fn check_file(c: &FileCheck, policy: ChangedFiles) -> Result<Option<Action>, RestoreError> {
    use std::os::unix::fs::MetadataExt;
    let changed = |what: String| RestoreError::FileChanged {
        path: c.path.clone(),
        what,
    };
    let m = std::fs::metadata(&c.path).map_err(|e| changed(format!("cannot stat it: {e}")))?;
    let now = m.len();
    if now == c.size && mtime_ns(&m) == c.mtime_ns && m.ino() == c.ino && m.dev() == c.dev {
        return Ok(None);
    }
    if !c.written || c.mapped_exec {
        return check_unwritten(c, now).map(|()| None);
    }
    let keep = "; restore with --changed-files=keep to run against it as it is";
    if policy == ChangedFiles::Keep {
        let what = if now == c.size {
            format!("its inode or mtime differs (size {now})")
        } else {
            format!("size {now} now, {} then", c.size)
        };
        return Ok(Some(Action::Keep { what }));
    }
    if now < c.size {
        return Err(changed(format!(
            "size {now} now, {} then: bytes the tree had written are gone{keep}",
            c.size
        )));
    }
    let verified = match c.hash {
        Some(h) => {
            let p = crate::host::prefix_hash(Path::new(&c.path), c.size)
                .map_err(|e| changed(format!("cannot read it: {e}")))?;
            if p != h {
                return Err(changed(format!(
                    "its first {} bytes, which the tree had written at the checkpoint, \
                     differ now, and the image does not hold them{keep}",
                    c.size
                )));
            }
            true
        }
        None if now == c.size => {
            return Err(changed(format!(
                "its inode or mtime differs and it is too large to compare by content{keep}"
            )))
        }
        None => false,
    };
    if now == c.size {
        return Ok(None);
    }
    Ok(Some(Action::Truncate {
        to: c.size,
        now,
        verified,
    }))
}

/// A file the tree did not write (or maps executable): it must be as it was.
fn check_unwritten(c: &FileCheck, now: u64) -> Result<(), RestoreError> {
    let why = if c.mapped_exec {
        "it is mapped executable"
    } else {
        "the tree only reads it"
    };
    let changed = |what: String| RestoreError::FileChanged {
        path: c.path.clone(),
        what: format!("{what}; {why}"),
    };
    if now != c.size {
        return Err(changed(format!("size {now} now, {} then", c.size)));
    }
    match c.hash {
        Some(h) => {
            let now = crate::host::prefix_hash(Path::new(&c.path), c.size)
                .map_err(|e| changed(format!("cannot read it: {e}")))?;
            if now != h {
                return Err(changed("its content differs".into()));
            }
            Ok(())
        }
        None => Err(changed(
            "its inode or mtime differs and it is too large to compare by content".into(),
        )),
    }
}
