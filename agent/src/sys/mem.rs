//! Memory of the agent's own: anonymous mappings it copies a frozen tree's pages
//! into (`dump --leave-running`).
//!
//! Kernel contract: `MAP_POPULATE` Linux ≥ 2.5.46; no capability (the mapping is
//! `MAP_NORESERVE`, so overcommit does not refuse a large one).

use std::io;

/// An anonymous private read-write mapping of ours, unmapped on drop.
pub struct AnonMap {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; access goes through
// `&self` / `&mut self` slices, so the borrow rules order every access.
unsafe impl Send for AnonMap {}
// SAFETY: as above: shared access is read-only.
unsafe impl Sync for AnonMap {}

impl AnonMap {
    /// mmap(2) of `len` (> 0) bytes, populated (faulted in) now if `populate`.
    pub fn new(len: usize, populate: bool) -> io::Result<AnonMap> {
        let flags = libc::MAP_PRIVATE
            | libc::MAP_ANONYMOUS
            | libc::MAP_NORESERVE
            | if populate { libc::MAP_POPULATE } else { 0 };
        // SAFETY: a fresh anonymous mapping at an address of the kernel's choice:
        // it overlaps nothing of ours. The result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(AnonMap { ptr: p.cast(), len })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `len` readable bytes at `ptr`, mapped for as long as `self`
        // lives (anonymous memory is zero until written, so initialised).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes this the only access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for AnonMap {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped; no slice of it outlives
        // `self`.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}
