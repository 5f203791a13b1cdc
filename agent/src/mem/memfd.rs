//! memfds (`memfd_create`): anonymous files with a name and, if made with
//! `MFD_ALLOW_SEALING`, seals.
//!
//! Dump: a mapping named `/memfd:NAME (deleted)` or a descriptor whose link is
//! that; the content is read through a descriptor of ours ([`super::object`]),
//! the seals with `F_GET_SEALS`.
//!
//! Restore: `memfd_create(NAME)` at the size, with `MFD_ALLOW_SEALING` unless the
//! only seal is `F_SEAL_SEAL` (what a memfd made without it has), filled, then
//! sealed with the image's seals before any husk maps it. A memfd made with
//! `MFD_NOEXEC_SEAL` has `F_SEAL_EXEC` among its seals and gets it back the same
//! way. Refused: `MFD_HUGETLB` memfds (their pages are huge pages, which this
//! restore does not make). Not kept: the memfd's inode number.

use std::os::fd::{BorrowedFd, OwnedFd};

use ckpt_shared::image::ShmBacking;
use libc::pid_t;

use super::object::{self, ShmemPlan};
use super::MemError;
use crate::sys::{self, proc};

/// `F_SEAL_SEAL`: the one seal of a memfd made without `MFD_ALLOW_SEALING`.
const F_SEAL_SEAL: u32 = 0x0001;

/// The name of a memfd from its link or mapping name (`/memfd:NAME (deleted)`).
pub fn name_of(link: &str) -> &str {
    let n = object::undeleted(link);
    n.strip_prefix("/memfd:").unwrap_or(n)
}

/// The backing of the memfd behind `file`.
pub fn backing(link: &str, file: &std::fs::File) -> Result<ShmBacking, MemError> {
    use std::os::fd::AsFd;
    if sys::shm::on_hugetlbfs(file.as_fd(), link)? {
        return Err(MemError::Object(format!(
            "a memfd of huge pages (MFD_HUGETLB): {link}"
        )));
    }
    let seals = sys::shm::get_seals(file.as_fd(), link)?;
    Ok(ShmBacking::Memfd {
        name: name_of(link).to_string(),
        seals,
    })
}

/// Mapping `v` of `pid`, of a memfd: the object's id.
pub fn classify(pid: pid_t, v: &proc::Vma, shmem: &mut ShmemPlan) -> Result<u32, MemError> {
    let file = object::open_mapped(pid, v)?;
    shmem.object(file, &v.name, |f, _| backing(&v.name, f))
}

/// A memfd named `name` of `size` bytes, ready to take the seals `seals` once
/// filled.
pub fn make(name: &str, seals: u32, size: u64) -> Result<OwnedFd, MemError> {
    let flags = if seals == F_SEAL_SEAL {
        0
    } else {
        libc::MFD_ALLOW_SEALING
    };
    Ok(sys::shm::memfd(name, flags, size)?)
}

/// The seals of the image's memfd on ours (filled by now).
pub fn seal(fd: BorrowedFd<'_>, name: &str, seals: u32) -> Result<(), MemError> {
    if seals == F_SEAL_SEAL || seals == 0 {
        return Ok(());
    }
    sys::shm::add_seals(fd, seals, &format!("memfd {name}")).map_err(MemError::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memfd_names_lose_their_decoration() {
        assert_eq!(name_of("/memfd:ring (deleted)"), "ring");
        assert_eq!(name_of("/memfd:a b (deleted)"), "a b");
        assert_eq!(name_of("/memfd:"), "");
    }
}
