//! Command-line arguments of `ckpt-agent`. The doc comments are the `--help` text.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

/// ckpt-agent: checkpoint and restore Linux process trees from outside, with ptrace.
///
/// The agent freezes every thread of a process tree, reads its memory, registers,
/// descriptors and signal state without running any code inside it, and writes an
/// image: a manifest plus content-addressed memory chunks. `restore` rebuilds the
/// tree with its original PIDs, and it carries on where it stopped.
///
/// Needs root (CAP_SYS_PTRACE and CAP_CHECKPOINT_RESTORE) on Linux ≥ 5.14, x86_64.
///
/// Example:
///   ckpt-agent dump --pid 4121 --image /scratch/ckpt/job1
///   ckpt-agent inspect --image /scratch/ckpt/job1
///   ckpt-agent restore --image /scratch/ckpt/job1
#[derive(Debug, Parser)]
#[command(name = "ckpt-agent", version, verbatim_doc_comment)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Dump the process tree rooted at PID into an image directory.
    ///
    /// Every process and thread under PID is frozen (the tree cannot tell), its state
    /// is written to DIR, and then the tree is killed — unless --leave-running is
    /// given, in which case it runs on unaffected. If anything fails the tree is left
    /// running exactly as before and no image is committed: an image exists only once
    /// DIR/manifest.ckpt does.
    ///
    /// Supported: memory of all kinds but System V shm and memfd, threads with full
    /// register/FPU/AVX state, signal state, timers, regular files, directories,
    /// /dev/{null,zero,random,urandom}, pipes and FIFOs with their buffered data.
    /// Other descriptors (sockets, eventfd, ...) abort the dump with a message naming
    /// the fd and the PID.
    #[command(verbatim_doc_comment)]
    Dump {
        /// Root of the process tree to dump.
        #[arg(long)]
        pid: i32,
        /// Image directory (created if missing; must not hold an image already).
        #[arg(long, value_name = "DIR")]
        image: PathBuf,
        /// Let the tree run on after the dump instead of killing it.
        #[arg(long)]
        leave_running: bool,
        /// zstd level for memory chunks (0 stores them raw; raw is the default because
        /// HPC memory is mostly incompressible floating point).
        #[arg(long, default_value_t = 0, value_name = "LEVEL")]
        compress: i32,
        /// Worker threads that read, hash and store memory (default: CPUs).
        #[arg(long)]
        workers: Option<usize>,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Restore a process tree from an image; prints the root PID as the last line.
    ///
    /// The tree comes back with its original PIDs and TIDs and keeps running after
    /// this command returns (it is reparented to init). The image is checked against
    /// this host first (format, CPU features, vDSO, PIDs, and every file it refers to);
    /// a mismatch is refused before anything is created.
    Restore {
        /// Image directory written by `dump`.
        #[arg(long, value_name = "DIR")]
        image: PathBuf,
        /// Restore into a fresh PID namespace, where the original PIDs are free.
        #[arg(long)]
        new_pid_ns: bool,
        /// Worker threads that fetch and write memory (default: CPUs).
        #[arg(long)]
        workers: Option<usize>,
    },
    /// Show what an image holds: processes, threads, mappings, descriptors, sizes.
    Inspect {
        /// Image directory.
        #[arg(long, value_name = "DIR")]
        image: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

fn cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Dump {
            pid,
            image,
            leave_running,
            compress,
            workers,
            json,
        } => {
            let opts = crate::dump::DumpOptions {
                pid,
                image: image.clone(),
                leave_running,
                zstd_level: (compress > 0).then_some(compress),
                workers: workers.unwrap_or_else(cpus),
                snapshot_limit: crate::dump::default_snapshot_limit(),
            };
            let img = crate::dump::dump(&opts).with_context(|| {
                format!("dump of PID {pid} failed; the process tree was left running")
            })?;
            let s = &img.stats;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&crate::inspect::stats_json(&img))?
                );
            } else {
                let threads: usize = img.processes.iter().map(|p| p.threads.len()).sum();
                println!(
                    "dumped PID {pid} ({} processes, {threads} threads) to {}",
                    img.processes.len(),
                    image.display()
                );
                println!(
                    "frozen {:.1} ms, total {:.1} ms, memory {}, stored {} in {} chunks, {}/s",
                    s.freeze_us as f64 / 1e3,
                    s.total_us as f64 / 1e3,
                    crate::inspect::human(s.memory_bytes),
                    crate::inspect::human(s.stored_bytes),
                    s.chunks,
                    crate::inspect::human(
                        (s.memory_bytes as f64 / (s.total_us.max(1) as f64 / 1e6)) as u64
                    ),
                );
                println!(
                    "{}",
                    if leave_running {
                        "the tree runs on"
                    } else {
                        "the tree was killed"
                    }
                );
            }
        }
        Command::Restore {
            image,
            new_pid_ns,
            workers,
        } => {
            let opts = crate::restore::RestoreOptions {
                image: image.clone(),
                new_pid_ns,
                workers: workers.unwrap_or_else(cpus),
            };
            let rep = crate::restore::restore(&opts).with_context(|| {
                format!(
                    "restore from {} failed; no process was started",
                    image.display()
                )
            })?;
            eprintln!(
                "restored {} of memory in {:.1} ms (fill {:.1} ms)",
                crate::inspect::human(rep.memory_bytes),
                rep.total_us as f64 / 1e3,
                rep.fill_us as f64 / 1e3
            );
            println!("{}", rep.root_pid);
        }
        Command::Inspect { image, json } => {
            let (_, img) = crate::restore::load(&image)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&crate::inspect::to_json(&img))?
                );
            } else {
                print!("{}", crate::inspect::to_text(&img));
            }
        }
    }
    Ok(())
}
