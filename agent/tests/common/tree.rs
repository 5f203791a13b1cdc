//! A workload tree under test, for the engine tests of one resource kind
//! (`engine_shm`, `engine_tty`): start it, wait for it, dump it, kill it, restore
//! it with its PIDs, check its log. Included with `#[path = "common/tree.rs"] mod
//! tree;` beside `mod common;`.

#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{ensure, Result};
use ckpt_shared::codec;
use ckpt_shared::image::Image;
use ckpt_tests::process::wait_gone;
use ckpt_tests::ticks::{check_log, last_tick};
use ckpt_tests::{
    ensure_untraced, expect_killed_by_dump, guard_restored, is_alive, last_line_pid, run_dump,
    run_restore, spawn_workload, tree_pids, wait_for, wait_for_tick, AgentRun, PidsGuard,
    ProcGuard, Tick,
};
use tempfile::TempDir;

use crate::common::{agent, WAIT};

/// Field order is drop order: descendants, root, then the directory.
pub struct Tree {
    pub descendants: PidsGuard,
    pub root: ProcGuard,
    /// Holds the log and the image; removed last.
    _dir: TempDir,
    pub log: PathBuf,
    pub image: PathBuf,
    pub pid: i32,
    pub pids: Vec<i32>,
}

impl Tree {
    /// Starts workload `name` with `args` in a directory named after `kind`.
    pub fn start(kind: &str, name: &str, args: &[&str]) -> Result<Tree> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("ckpt-{kind}-{name}-"))
            .tempdir()?;
        let log = dir.path().join("log");
        let root = spawn_workload(name, args, &log)?;
        let pid = root.id();
        Ok(Tree {
            descendants: PidsGuard::default(),
            root,
            image: dir.path().join("img"),
            log,
            _dir: dir,
            pid,
            pids: vec![pid],
        })
    }

    pub fn last_tick(&self) -> u64 {
        last_tick(&self.log).unwrap_or(0)
    }

    /// Waits for tick `n` and for `procs` processes; guards them.
    pub fn ready(&mut self, n: u64, procs: usize) -> Result<()> {
        wait_for_tick(&self.log, n, WAIT)?;
        ensure!(
            wait_for(|| tree_pids(self.pid).len() == procs, WAIT),
            "the tree of {} should have {procs} processes, it has {:?}",
            self.pid,
            tree_pids(self.pid)
        );
        self.pids = tree_pids(self.pid);
        self.descendants.forget();
        self.descendants = PidsGuard::new(self.pids.iter().copied().skip(1));
        Ok(())
    }

    pub fn dump(&self, extra: &[&str]) -> Result<AgentRun> {
        run_dump(agent(), self.pid, &self.image, extra, &[])
    }

    pub fn dump_and_kill(&mut self) -> Result<()> {
        let run = self.dump(&[])?.ok()?;
        expect_killed_by_dump(&run, &mut self.root, &self.descendants, &self.image, WAIT)
    }

    /// Kills the tree (after a `--leave-running` dump) and waits for its PIDs to
    /// be free.
    pub fn kill(&mut self) -> Result<()> {
        self.descendants.kill_all();
        self.root.kill();
        // The children, reparented to us (a subreaper), are reaped here.
        for &p in &self.pids {
            ensure!(
                wait_gone(p, WAIT),
                "process {p} of the tree outlived its SIGKILL"
            );
        }
        Ok(())
    }

    /// Restores with the original PIDs; checks every process is back.
    pub fn restore(&mut self) -> Result<()> {
        let run = run_restore(agent(), &self.image, &[], &[])?;
        if run.success() {
            guard_restored(&run, &mut self.root);
            self.descendants.rearm();
        }
        let run = run.ok()?;
        let pid = last_line_pid(&run)?;
        ensure!(pid == self.pid, "restored root {pid}, dumped {}", self.pid);
        for &p in &self.pids {
            ensure!(is_alive(p), "process {p} is not running after the restore");
        }
        Ok(())
    }

    /// [`Tree::restore`], and every process untraced.
    pub fn restore_untraced(&mut self) -> Result<()> {
        self.restore()?;
        for &p in &self.pids {
            ensure_untraced(p, Duration::from_secs(5))?;
        }
        Ok(())
    }

    pub fn advance(&self, more: u64) -> Result<u64> {
        wait_for_tick(&self.log, self.last_tick() + more, WAIT)
    }

    pub fn manifest(&self) -> Result<Image> {
        let bytes = std::fs::read(self.image.join("manifest.ckpt"))?;
        Ok(codec::decode_image(&bytes)?)
    }

    pub fn finish(&mut self) -> Result<Vec<Tick>> {
        self.descendants.kill_all();
        self.root.kill();
        check_log(&self.log)
    }
}
