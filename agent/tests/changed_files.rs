//! Files that changed after a running save (issue 14): "the job died; restart it
//! from the last checkpoint" for a program writing its output to a file with `>`.
//!
//! The program is the `counter` workload started as `sh -c 'exec counter 10 > out'`
//! (the shell opens `out` `O_WRONLY|O_CREAT|O_TRUNC`, no `O_APPEND`), so its whole
//! output is the tick protocol: a header line, then `tick <n> <chain>` lines, each
//! one `write(2)`. It is saved with `--leave-running`, runs on (its output grows),
//! is killed (the job died), and is restored from the image:
//! - by default the output ends exactly as an uninterrupted run's: byte for byte
//!   the header and ticks 1..=N for the last N it printed, computed here from the
//!   protocol (a restore that kept the grown file would repeat the ticks written
//!   after the checkpoint);
//! - with `--changed-files=keep` the grown file is kept as it is (its bytes up to
//!   the kill are still there after the restore, the repeated ticks after them);
//! - a file the tree only reads (its stdin) or maps executable (its program) that
//!   changed is still refused, `keep` or not, with an error that names the file;
//!   once they are put back the same image restores.
//!
//! Every process is guarded by PID and killed when the test ends, failed or not.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use ckpt_tests::ticks::chain;
use ckpt_tests::workload::{spawn_program, workload};
use ckpt_tests::{
    guard_restored, is_stopped, last_line_pid, last_tick, path_str, require_root, run_dump,
    run_restore, send_signal, wait_for, wait_for_tick, ProcGuard,
};
use tempfile::TempDir;

mod common;
use common::{agent, WAIT};

/// A `counter` writing to `DIR/out` through `sh -c 'exec ... > out'`. Field order is
/// drop order: the process, then the directory.
struct Writer {
    root: ProcGuard,
    dir: TempDir,
    out: PathBuf,
    image: PathBuf,
    pid: i32,
}

impl Writer {
    /// Starts it (a copy of `counter` in DIR when `copy_program`, else `counter`),
    /// with stdin from `DIR/input` when `input` is true, and the output redirected
    /// with `redirect` (`>` or `>>`).
    fn start(copy_program: bool, input: bool, redirect: &str) -> Result<Writer> {
        let dir = tempfile::Builder::new().prefix("ckpt-changed-").tempdir()?;
        let mut program = workload("counter")?;
        if copy_program {
            let copy = dir.path().join("counter-copy");
            fs::copy(&program, &copy)?;
            program = copy;
        }
        let redirect_in = if input {
            fs::write(dir.path().join("input"), b"the tree reads this\n")?;
            " < input"
        } else {
            ""
        };
        let script = format!(
            "exec {} 10{redirect_in} {redirect} out",
            path_str(&program)?
        );
        let root = spawn_program(
            Path::new("/bin/sh"),
            ["-c", &script],
            &dir.path().join("harness.log"),
        )?;
        let pid = root.id();
        let out = dir.path().join("out");
        let image = dir.path().join("image");
        let w = Writer {
            root,
            dir,
            out,
            image,
            pid,
        };
        wait_for_tick(&w.out, 5, WAIT)?;
        Ok(w)
    }

    fn last(&self) -> u64 {
        last_tick(&self.out).unwrap_or(0)
    }

    /// The job dies: the original is killed (the guard keeps its PID for a restore).
    fn die(&mut self) -> Result<()> {
        self.root.kill();
        ensure!(
            ckpt_tests::wait_gone(self.pid, WAIT),
            "PID {} did not go",
            self.pid
        );
        Ok(())
    }

    fn restore(&mut self, extra: &[&str]) -> Result<ckpt_tests::AgentRun> {
        let run = run_restore(agent(), &self.image, extra, &[])?;
        guard_restored(&run, &mut self.root);
        Ok(run)
    }
}

/// What an uninterrupted `counter 10 > out` of PID `pid` has written after `n` ticks.
fn uninterrupted(pid: i32, n: u64) -> String {
    let mut s = format!("counter pid {pid} interval 10 ms\n");
    for i in 1..=n {
        s.push_str(&format!("tick {i} {:016x}\n", chain(i)));
    }
    s
}

/// The job dies after a running save; the restore brings the output back to the
/// checkpoint. The program is stopped (SIGSTOP) across the dump, so that it comes
/// back stopped and the output can be seen exactly as the restore left it (the
/// bytes of the checkpoint, nothing after); then it runs on and, killed, its
/// output is an uninterrupted run's, byte for byte.
fn grown_output_ends_as_an_uninterrupted_run(redirect: &str) -> Result<()> {
    let mut w = Writer::start(false, false, redirect)?;
    send_signal(w.pid, libc::SIGSTOP)?;
    ensure!(
        wait_for(|| is_stopped(w.pid), WAIT),
        "SIGSTOP did not stop it"
    );
    let at_dump = w.last();
    run_dump(agent(), w.pid, &w.image, &["--leave-running"], &[])?.ok()?;
    send_signal(w.pid, libc::SIGCONT)?;
    wait_for_tick(&w.out, at_dump + 20, WAIT)?;
    w.die()?;
    let grown = fs::metadata(&w.out)?.len();

    let run = w.restore(&[])?.ok()?;
    ensure!(last_line_pid(&run)? == w.pid, "restored under another PID");
    let out = path_str(&w.out)?.to_owned();
    ensure!(
        run.stderr
            .lines()
            .any(|l| l.contains(&out) && l.contains("truncated")),
        "the restore's summary does not name {out} as truncated (it had {grown} bytes):\n{}",
        run.describe()
    );
    ensure!(
        wait_for(|| is_stopped(w.pid), WAIT),
        "it did not come back stopped"
    );
    same_as_uninterrupted(&w.out, w.pid, Some(at_dump))?;
    send_signal(w.pid, libc::SIGCONT)?;
    wait_for_tick(&w.out, at_dump + 30, WAIT)?;
    w.root.kill();
    same_as_uninterrupted(&w.out, w.pid, None)
}

/// The output at `out` is what an uninterrupted run prints in `ticks` ticks (or as
/// many as it holds).
fn same_as_uninterrupted(out: &Path, pid: i32, ticks: Option<u64>) -> Result<()> {
    let got = fs::read_to_string(out)?;
    let n = got.lines().filter(|l| l.starts_with("tick ")).count() as u64;
    let n = ticks.unwrap_or(n);
    let want = uninterrupted(pid, n);
    ensure!(
        got == want,
        "the output differs from an uninterrupted run's {n} ticks ({} bytes, {} expected); \
         first difference at byte {}",
        got.len(),
        want.len(),
        got.bytes()
            .zip(want.bytes())
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(want.len()))
    );
    Ok(())
}

#[test]
fn output_file_grown_after_a_running_save_ends_as_an_uninterrupted_run() -> Result<()> {
    require_root!(Ok(()));
    grown_output_ends_as_an_uninterrupted_run(">")
}

#[test]
fn appended_output_grown_after_a_running_save_ends_as_an_uninterrupted_run() -> Result<()> {
    require_root!(Ok(()));
    grown_output_ends_as_an_uninterrupted_run(">>")
}

#[test]
fn changed_files_keep_leaves_the_grown_output_as_it_is() -> Result<()> {
    require_root!(Ok(()));
    let mut w = Writer::start(false, false, ">>")?;
    run_dump(agent(), w.pid, &w.image, &["--leave-running"], &[])?.ok()?;
    let at_dump = w.last();
    wait_for_tick(&w.out, at_dump + 20, WAIT)?;
    w.die()?;
    let before = fs::read(&w.out)?;

    let run = w.restore(&["--changed-files=keep"])?.ok()?;
    ensure!(
        run.stderr.lines().any(|l| l.contains("kept as it is")),
        "the restore's summary does not say the output was kept:\n{}",
        run.describe()
    );
    wait_for_tick(&w.out, at_dump + 30, WAIT)?;
    w.root.kill();
    let after = fs::read(&w.out)?;
    ensure!(
        after.len() >= before.len() && after[..before.len()] == before[..],
        "--changed-files=keep did not keep the {} bytes the output had at the restore",
        before.len()
    );
    Ok(())
}

/// The restore refused because of `file` (named in its error), with `keep` or not.
fn expect_refused(w: &mut Writer, file: &Path, why: &str) -> Result<()> {
    let name = path_str(file)?.to_owned();
    for extra in [&[][..], &["--changed-files=keep"][..]] {
        let run = w.restore(extra)?;
        ensure!(
            !run.success(),
            "a restore {extra:?} against a changed {name} succeeded:\n{}",
            run.describe()
        );
        let err = run.error_line();
        ensure!(
            run.stderr.contains(&name)
                && run.stderr.contains(why)
                && run.stderr.contains("changed"),
            "the refusal does not name {name} as changed ({why}): {err}\n{}",
            run.describe()
        );
        ensure!(
            !ckpt_tests::is_alive(w.pid),
            "a refused restore left PID {} in use",
            w.pid
        );
    }
    Ok(())
}

#[test]
fn a_changed_program_or_input_is_refused_even_with_keep() -> Result<()> {
    require_root!(Ok(()));
    let mut w = Writer::start(true, true, ">")?;
    run_dump(agent(), w.pid, &w.image, &[], &[])?.ok()?;
    w.die()?;
    let input = w.dir.path().join("input");
    let program = w.dir.path().join("counter-copy");
    let (input_bytes, program_bytes) = (fs::read(&input)?, fs::read(&program)?);

    fs::write(&input, b"the tree reads this, and more\n")?;
    expect_refused(&mut w, &input, "only reads")?;
    fs::write(&input, &input_bytes)?;

    let mut changed = program_bytes.clone();
    let last = changed.len() - 1;
    changed[last] ^= 0xff;
    fs::write(&program, &changed)?;
    expect_refused(&mut w, &program, "mapped executable")?;

    // Put back (same bytes, new mtime): the content hash accepts them.
    fs::write(&program, &program_bytes)?;
    std::thread::sleep(Duration::from_millis(10));
    let run = w
        .restore(&[])?
        .ok()
        .context("the restore once the files were put back")?;
    ensure!(last_line_pid(&run)? == w.pid);
    wait_for_tick(&w.out, w.last() + 10, WAIT)?;
    Ok(())
}
