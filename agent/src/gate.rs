//! Where a dump or a restore waits for the rest of its job.
//!
//! A job's checkpoint is one cut across every rank of every node (../shared/DESIGN.md, "Data
//! flow of a checkpoint"): no rank may be read before every rank is frozen, and no
//! restored rank may run before every rank is rebuilt. The engine itself knows
//! nothing of jobs; it calls a [`Gate`] at those points, and the agent daemon's gate
//! blocks there until the controller says go, or answers with the reason to give
//! up. An `Err` from a gate unwinds the operation the way any failure does: a dump
//! thaws the tree and commits nothing, a restore kills its husks.
//!
//! The command-line `dump` and `restore` pass [`Alone`], which never waits.

/// The points of a coordinated dump or restore. Each returns `Err(reason)` to give
/// the operation up.
pub trait Gate: Sync {
    /// Every thread of the tree is seized; nothing has been read yet.
    fn frozen(&self) -> Result<(), String> {
        Ok(())
    }
    /// Threads, descriptors and memory are captured (copied into a snapshot when the
    /// tree is let run on); the tree is still frozen. After `Ok` the dump lets the
    /// tree go (or, when it kills, stores while it stays frozen).
    fn captured(&self) -> Result<(), String> {
        Ok(())
    }
    /// A dump that lets the tree run on: the tree runs again and its snapshot is
    /// about to be stored.
    fn storing(&self) -> Result<(), String> {
        Ok(())
    }
    /// A dump that kills: the rank's image `img` is written and the tree is still
    /// frozen. `Ok` means the job's checkpoint is committed and the tree may be
    /// killed; `Err` thaws it.
    fn stored(&self, img: &ckpt_shared::image::Image) -> Result<(), String> {
        let _ = img;
        Ok(())
    }
    /// A restore: every process is rebuilt and held (the tree's root is `root`);
    /// `Ok` releases them.
    fn rebuilt(&self, root: i32) -> Result<(), String> {
        let _ = root;
        Ok(())
    }
    /// The network lock's table and this rank's part of it
    /// ([`crate::netlock::NetLock::lock_part`]); `None`: a table of its own.
    fn lock_name(&self) -> Option<(String, String)> {
        None
    }
}

/// The gate of a single-process command: never waits.
pub struct Alone;

impl Gate for Alone {}
