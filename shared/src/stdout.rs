//! A command's answer on standard output, written so that a reader that goes away
//! (`ckpt-controller job list | head -n1`) ends the command quietly instead of
//! panicking.
//!
//! Rust ignores SIGPIPE, so a write into a closed pipe fails with EPIPE, and
//! `println!` panics on that failure (exit 101). [`out!`](crate::out) and
//! [`outln!`](crate::outln) are `print!` and `println!` that return the failure
//! instead, as a [`StdoutError`], through the caller's `?`. The binary tells
//! [`StdoutError::Closed`] (the reader has what it wanted: like `cat`, stop and
//! exit 0) from a real failure with [`closed`], anywhere in an error's chain.

use std::error::Error;
use std::fmt;
use std::io::{self, Write};

/// Writing to standard output failed.
#[derive(Debug, thiserror::Error)]
pub enum StdoutError {
    /// The reader closed its end (EPIPE): not a failure of the command.
    #[error("standard output was closed")]
    Closed,
    /// Any other failure of the write.
    #[error("writing to standard output")]
    Write(#[source] io::Error),
}

impl From<io::Error> for StdoutError {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::BrokenPipe {
            StdoutError::Closed
        } else {
            StdoutError::Write(e)
        }
    }
}

/// Writes `args` to standard output (what [`out!`](crate::out) expands to).
pub fn print(args: fmt::Arguments<'_>) -> Result<(), StdoutError> {
    io::stdout().lock().write_fmt(args)?;
    Ok(())
}

/// Writes `args` and a newline to standard output, in one locked write (what
/// [`outln!`](crate::outln) expands to).
pub fn print_line(args: fmt::Arguments<'_>) -> Result<(), StdoutError> {
    let mut out = io::stdout().lock();
    out.write_fmt(args)?;
    out.write_all(b"\n")?;
    Ok(())
}

/// Whether `e`, or any error in its chain of sources, is [`StdoutError::Closed`]
/// (an `anyhow::Error` holding one, or an error that holds one as its
/// `#[source]`). A `#[error(transparent)]` wrapper hides it: its `source()` is the
/// source of what it wraps, so such an enum matches its variant itself.
pub fn closed(e: &(dyn Error + 'static)) -> bool {
    std::iter::successors(Some(e), |&e| e.source())
        .any(|e| matches!(e.downcast_ref::<StdoutError>(), Some(StdoutError::Closed)))
}

/// `print!` that returns a failed write (a [`StdoutError`]) through `?` instead of
/// panicking on it.
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::stdout::print(::std::format_args!($($arg)*))?
    };
}

/// `println!` that returns a failed write (a [`StdoutError`]) through `?` instead
/// of panicking on it.
#[macro_export]
macro_rules! outln {
    () => {
        $crate::stdout::print(::std::format_args!("\n"))?
    };
    ($($arg:tt)*) => {
        $crate::stdout::print_line(::std::format_args!($($arg)*))?
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("listing the jobs")]
    struct Outer(#[source] StdoutError);

    #[test]
    fn a_closed_pipe_is_told_from_a_failed_write_anywhere_in_the_chain() {
        let epipe = StdoutError::from(io::Error::from(io::ErrorKind::BrokenPipe));
        assert!(matches!(epipe, StdoutError::Closed));
        assert!(closed(&epipe));
        assert!(closed(&Outer(epipe)));
        let full = StdoutError::from(io::Error::from_raw_os_error(libc::ENOSPC));
        assert!(matches!(full, StdoutError::Write(_)));
        assert!(!closed(&full));
        assert!(!closed(&Outer(full)));
    }
}
