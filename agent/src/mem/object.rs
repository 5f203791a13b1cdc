//! Memory objects: what the kinds of object (shared anonymous memory,
//! [`super::memfd`], [`super::deleted`], [`super::tmpfs`], [`super::sysv`]) share.
//!
//! Dump: [`ShmemPlan`] is the tree's registry of objects, by device and inode:
//! every mapping and every descriptor of one object, in any process of the tree,
//! gets the one id, so the object is stored once and comes back as one. Shared
//! anonymous memory is read through the mappings (it has no descriptor of ours);
//! every other object through a descriptor the dump opens onto it
//! (`/proc/PID/map_files/START-END` for a mapping, `/proc/PID/fd/N` for a
//! descriptor), once, whole, its holes skipped (`SEEK_DATA`). Reading the object
//! rather than its mappings also covers the parts no process maps, and objects no
//! process maps at all (a memfd held only by a descriptor).
//!
//! Restore: [`Objects::make`] makes every object again in the restorer (each kind
//! its own way), before any husk exists; the file objects are then filled and
//! finished (memfd seals) before any husk maps them, so a sealed memfd is never
//! writable by the husks in between. Each mapping of an object is an `mmap` of the
//! restorer's descriptor taken by the husk (a System V segment: an injected
//! `shmat`), each descriptor a reopening of it through `/proc/self/fd` (its own
//! open file description, with its flags and position).
//!
//! A failed restore leaves no object behind: the unlinked files and memfds go with
//! the restorer's descriptors, the System V segments it made are removed, and a
//! tmpfs file only takes its path at the release ([`Objects::publish`]), under a
//! temporary name until then (left behind only if the restorer is SIGKILLed
//! before the release: `.ckpt-restore-PID-N` beside the path).

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use ckpt_shared::image::{Extent, SharedMemory, ShmBacking, PAGE_SIZE};
use libc::pid_t;
use tracing::warn;

use super::{MemError, ReadJob, ShmemKey, Source, Target};
use crate::sys::{self, proc};

/// An object read through a descriptor of ours.
struct Object {
    backing: ShmBacking,
    file: Arc<File>,
}

/// The tree's memory objects, found while the dump classifies mappings and
/// descriptors.
#[derive(Default)]
pub struct ShmemPlan {
    ids: HashMap<ShmemKey, u32>,
    /// Size of each object: the largest offset a mapping reaches (shared
    /// anonymous), or its file's size.
    size: HashMap<u32, u64>,
    objects: HashMap<u32, Object>,
}

/// The key of inode `ino` of device `dev` (`st_dev` split as the kernel encodes
/// it, as smaps shows it).
pub fn key_of(dev: u64, ino: u64) -> ShmemKey {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    (major as u32, minor as u32, ino)
}

impl ShmemPlan {
    fn id(&mut self, key: ShmemKey) -> (u32, bool) {
        let next = self.ids.len() as u32;
        let mut new = false;
        let id = *self.ids.entry(key).or_insert_with(|| {
            new = true;
            next
        });
        (id, new)
    }

    /// The id of the shared anonymous object `key`, which a mapping uses up to
    /// offset `end`.
    pub fn anon(&mut self, key: ShmemKey, end: u64) -> u32 {
        let (id, _) = self.id(key);
        let s = self.size.entry(id).or_insert(0);
        *s = (*s).max(end);
        id
    }

    /// The id of the object `file` is a descriptor of, registered on first sight
    /// with the backing `backing` makes of it; `what` names it in errors.
    pub fn object(
        &mut self,
        file: File,
        what: &str,
        backing: impl FnOnce(&File, &libc::stat) -> Result<ShmBacking, MemError>,
    ) -> Result<u32, MemError> {
        let st = sys::shm::fstat(file.as_fd(), what)?;
        let (id, new) = self.id(key_of(st.st_dev, st.st_ino));
        if new {
            let b = backing(&file, &st)?;
            self.size.insert(id, st.st_size as u64);
            self.objects.insert(
                id,
                Object {
                    backing: b,
                    file: Arc::new(file),
                },
            );
        }
        Ok(id)
    }

    /// The id of the object that is inode `ino` of device `dev`, if the tree
    /// has one there that the image carries (not a shared anonymous one).
    pub fn known(&self, dev: u64, ino: u64) -> Option<u32> {
        let id = *self.ids.get(&key_of(dev, ino))?;
        self.objects.contains_key(&id).then_some(id)
    }

    /// The reads of every object that has a descriptor of ours: its runs of data,
    /// whole pages, at most `chunk_max` bytes a job.
    pub fn reads(&self, chunk_max: u64) -> Result<Vec<ReadJob>, MemError> {
        let mut jobs = Vec::new();
        let mut ids: Vec<&u32> = self.objects.keys().collect();
        ids.sort();
        for &id in ids {
            let o = &self.objects[&id];
            let size = self.size[&id];
            let what = format!("memory object {id}");
            for (s, e) in sys::shm::data_runs(o.file.as_fd(), size, &what)? {
                let (mut at, end) = (s / PAGE_SIZE * PAGE_SIZE, e.div_ceil(PAGE_SIZE) * PAGE_SIZE);
                while at < end {
                    let len = (end - at).min(chunk_max);
                    jobs.push(ReadJob {
                        target: Target::Shmem { id },
                        pid: 0,
                        addr: at,
                        len,
                        rebase: 0,
                        force: false,
                        source: Source::File(o.file.clone()),
                    });
                    at += len;
                }
            }
        }
        Ok(jobs)
    }

    /// The image's objects, with their stored extents (taken out of `extents`).
    pub fn into_image(self, extents: &mut HashMap<Target, Vec<Extent>>) -> Vec<SharedMemory> {
        let mut out: Vec<SharedMemory> = self
            .size
            .iter()
            .map(|(&id, &size)| SharedMemory {
                id,
                size,
                data: extents.remove(&Target::Shmem { id }).unwrap_or_default(),
                backing: self
                    .objects
                    .get(&id)
                    .map_or(ShmBacking::Anon, |o| o.backing.clone()),
            })
            .collect();
        out.sort_by_key(|s| s.id);
        out
    }
}

/// A descriptor of ours onto what mapping `v` of `pid` maps.
pub fn open_mapped(pid: pid_t, v: &proc::Vma) -> Result<File, MemError> {
    let path = format!("/proc/{pid}/map_files/{:x}-{:x}", v.start, v.end);
    File::open(&path).map_err(|source| MemError::Read {
        pid,
        addr: v.start,
        source,
    })
}

/// The path a mapping or descriptor link names, without ` (deleted)`.
pub fn undeleted(name: &str) -> &str {
    name.strip_suffix(" (deleted)").unwrap_or(name)
}

/// The tree's objects made again in the restorer.
#[derive(Default)]
pub struct Objects {
    /// Our descriptor of each object, by id.
    pub fds: HashMap<u32, OwnedFd>,
    /// The System V segments, by object id: their ids in this IPC namespace.
    pub segments: HashMap<u32, i32>,
    /// Segments this restore made: removed if it fails.
    made_segments: Vec<i32>,
    /// The temporary names of the tmpfs files, by object id: removed if it fails.
    temps: HashMap<u32, String>,
    kept: bool,
}

impl Objects {
    /// Makes every object of `shm`, empty, at its size.
    pub fn make(shm: &[SharedMemory]) -> Result<Objects, MemError> {
        let mut o = Objects::default();
        for s in shm {
            let fd = match &s.backing {
                ShmBacking::Anon => {
                    sys::restorer::memfd_sized(&format!("ckpt-shmem-{}", s.id), s.size)?
                }
                ShmBacking::Memfd { name, seals } => super::memfd::make(name, *seals, s.size)?,
                ShmBacking::Deleted { path, owner } => super::deleted::make(path, owner, s.size)?,
                ShmBacking::Tmpfs { path, owner } => {
                    let (fd, temp) = super::tmpfs::make(path, owner, s.size)?;
                    o.temps.insert(s.id, temp);
                    fd
                }
                ShmBacking::SysV {
                    key, shmid, owner, ..
                } => {
                    let (id, fd) = super::sysv::make(*key, *shmid, owner, s.size)?;
                    o.made_segments.push(id);
                    o.segments.insert(s.id, id);
                    fd
                }
            };
            o.fds.insert(s.id, fd);
        }
        Ok(o)
    }

    /// Once the file objects hold their content: their sizes (the fill writes
    /// whole pages, which may reach past the end of a file), then the seals of the
    /// memfds.
    pub fn finish(&self, shm: &[SharedMemory]) -> Result<(), MemError> {
        for s in shm {
            let fd = self.fds[&s.id].as_fd();
            if !matches!(s.backing, ShmBacking::Anon | ShmBacking::SysV { .. }) {
                sys::shm::truncate(fd, s.size, &format!("memory object {}", s.id))?;
            }
            if let ShmBacking::Memfd { name, seals } = &s.backing {
                super::memfd::seal(fd, name, *seals)?;
            }
        }
        Ok(())
    }

    /// Once every husk has attached its segments: those marked for removal at the
    /// dump are marked again.
    pub fn attached(&self, shm: &[SharedMemory]) -> Result<(), MemError> {
        for s in shm {
            if let ShmBacking::SysV { removed: true, .. } = s.backing {
                sys::shm::shm_remove(self.segments[&s.id])?;
            }
        }
        Ok(())
    }

    /// The release: every tmpfs object takes its path (replacing what is there),
    /// and from here on nothing is undone.
    pub fn publish(&mut self, shm: &[SharedMemory]) -> Result<(), MemError> {
        for s in shm {
            if let ShmBacking::Tmpfs { path, .. } = &s.backing {
                if let Some(temp) = self.temps.remove(&s.id) {
                    super::tmpfs::publish(&temp, path)?;
                }
            }
        }
        self.kept = true;
        Ok(())
    }
}

impl Drop for Objects {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        for temp in self.temps.values() {
            if let Err(e) = std::fs::remove_file(temp) {
                warn!(%temp, %e, "a file of the failed restore is left");
            }
        }
        for &id in &self.made_segments {
            if let Err(e) = sys::shm::shm_remove(id) {
                warn!(segment = id, %e, "a System V segment of the failed restore is left");
            }
        }
    }
}
