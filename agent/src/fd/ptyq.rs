//! The queues of a pseudo-terminal pair: taken out under the freeze, and put back
//! exactly, into the dumped pair (the tree runs on with it) and into the restored
//! one.
//!
//! A terminal cannot be peeked: the dump reads what is queued out of its own
//! descriptors, and puts it back before the tree runs again, whatever the dump
//! does next (a `--leave-running` dump, or a kill-mode dump that fails and thaws).
//! Two queues:
//!
//! - **Output** (what the master will read): the slave's writes, after the
//!   slave's output processing, in the master's line discipline, whose settings
//!   are raw and never change (a termios call on a master acts on its slave).
//!   Taken by reading the master (a `poll` first: our duplicate shares the
//!   program's description, which may be blocking; poll also lets the line
//!   discipline take in what its flip buffer still holds). Put back with
//!   `TIOCSTI` on the master: at once, as raw bytes, without touching the slave.
//!   The master's line discipline holds 4095 bytes; beyond that, the rest is
//!   written to the slave with its output processing (`OPOST`) off meanwhile,
//!   and reaches the master after the first part, as the flip buffer queues it.
//! - **Input** (what the slave will read), in the slave's line discipline after
//!   its input processing. Taken through a slave descriptor of our own
//!   (`TIOCGPTPEER`, non-blocking): in canonical mode line by line, as the
//!   program would read it (a line ended by `VEOF` reads without its end), then
//!   the unfinished line with `ICANON` off for the one read. Put back with
//!   `TIOCSTI` on the slave, which runs each byte through the line discipline at
//!   once: with echo, signals and input translation off, the erase and kill
//!   characters set to a byte the queue does not hold, a line that `VEOF` ended
//!   ended by another unused byte made `VEOF`, and a line end inside a line
//!   (typed after `VLNEXT`) preceded by an unused byte made `VLNEXT`. Then the
//!   settings go back; `ICANON` is the same throughout the writing, so the line
//!   discipline keeps the line boundaries.
//!
//! Refused (before anything is read): an input queue of 2 KiB or more (beyond
//! the line discipline's 4 KiB, bytes wait unprocessed in the flip buffer, and
//! taking the queue out would have them processed with the settings of the
//! moment), `EXTPROC`, a packet-mode status not yet read, and in non-canonical
//! mode with `IXON` an input queue holding the start or stop character.

use std::os::fd::BorrowedFd;

use ckpt_shared::image::{PtyInput, PtyLine, Termios};

use crate::sys::tty::{self, Read};
use crate::sys::{self, SysError};

/// What a line discipline takes in at most (`N_TTY_BUF_SIZE` less one).
pub const LDISC_ROOM: usize = 4095;
/// Input queues from this size on are refused (see the module doc).
pub const INPUT_LIMIT: usize = 2048;
/// Output queues larger than this are refused (a pty buffers far less).
const OUTPUT_LIMIT: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum PtyError {
    #[error(transparent)]
    Sys(#[from] SysError),
    #[error("{0}")]
    Unsupported(String),
}

pub fn to_image(t: &libc::termios2) -> Termios {
    Termios {
        iflag: t.c_iflag,
        oflag: t.c_oflag,
        cflag: t.c_cflag,
        lflag: t.c_lflag,
        line: t.c_line,
        cc: t.c_cc.to_vec(),
        ispeed: t.c_ispeed,
        ospeed: t.c_ospeed,
    }
}

pub fn from_image(t: &Termios) -> libc::termios2 {
    let mut cc = [0u8; 19];
    let n = t.cc.len().min(cc.len());
    cc[..n].copy_from_slice(&t.cc[..n]);
    libc::termios2 {
        c_iflag: t.iflag,
        c_oflag: t.oflag,
        c_cflag: t.cflag,
        c_lflag: t.lflag,
        c_line: t.line,
        c_cc: cc,
        c_ispeed: t.ispeed,
        c_ospeed: t.ospeed,
    }
}

fn canonical(t: &libc::termios2) -> bool {
    t.c_lflag & libc::ICANON != 0
}

pub fn input_is_empty(i: &PtyInput) -> bool {
    i.lines.is_empty() && i.rest.is_empty()
}

/// Takes the input queue out through `slave`: what was read, and why the reading
/// stopped short, if it did (the caller puts back what was read in any case).
pub fn take_input(slave: BorrowedFd<'_>, t: &libc::termios2) -> (PtyInput, Option<PtyError>) {
    let mut input = PtyInput::default();
    let err = read_input(slave, t, &mut input).err();
    (input, err)
}

fn read_input(
    slave: BorrowedFd<'_>,
    t: &libc::termios2,
    input: &mut PtyInput,
) -> Result<(), PtyError> {
    let queued = tty::queued(slave)?;
    if queued >= INPUT_LIMIT {
        return Err(PtyError::Unsupported(format!(
            "{queued} bytes are queued for its slave to read ({INPUT_LIMIT} or more)"
        )));
    }
    let mut buf = vec![0u8; LDISC_ROOM + 1];
    if canonical(t) {
        let ends = line_ends(t);
        while input.lines.len() <= LDISC_ROOM {
            match tty::read(slave, &mut buf)? {
                Read::Bytes(n) => {
                    let bytes = buf[..n].to_vec();
                    let eof = bytes.last().is_none_or(|c| !ends.contains(c));
                    input.lines.push(PtyLine { bytes, eof });
                }
                Read::Empty | Read::Closed => break,
            }
        }
        // The unfinished line: readable only with ICANON off.
        let mut raw = *t;
        raw.c_lflag &= !libc::ICANON;
        raw.c_cc[libc::VMIN] = 0;
        raw.c_cc[libc::VTIME] = 0;
        tty::set_termios(slave, &raw)?;
        let rest = read_all(slave, &mut buf, &mut input.rest);
        let back = tty::set_termios(slave, t);
        rest?;
        back?;
    } else {
        read_all(slave, &mut buf, &mut input.rest)?;
    }
    let held: usize = input
        .lines
        .iter()
        .map(|l| l.bytes.len() + l.eof as usize)
        .sum::<usize>()
        + input.rest.len();
    if held >= INPUT_LIMIT {
        return Err(PtyError::Unsupported(format!(
            "{held} bytes were queued for its slave to read ({INPUT_LIMIT} or more)"
        )));
    }
    Ok(())
}

/// The bytes that end a line in canonical mode with settings `t`.
fn line_ends(t: &libc::termios2) -> Vec<u8> {
    let mut ends = vec![b'\n', t.c_cc[libc::VEOL]];
    if t.c_lflag & libc::IEXTEN != 0 {
        ends.push(t.c_cc[libc::VEOL2]);
    }
    ends
}

fn read_all(fd: BorrowedFd<'_>, buf: &mut [u8], out: &mut Vec<u8>) -> Result<(), SysError> {
    while out.len() <= OUTPUT_LIMIT {
        match tty::read(fd, buf)? {
            Read::Bytes(0) | Read::Empty | Read::Closed => break,
            Read::Bytes(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    Ok(())
}

/// Takes the output queue out of `master` into `out`: whether every slave
/// descriptor is closed (the master then reads EIO), or why it stopped short.
pub fn take_output(
    master: BorrowedFd<'_>,
    packet: bool,
    out: &mut Vec<u8>,
) -> Result<bool, PtyError> {
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let ready = tty::poll(master, 0)?;
        if !ready.input {
            return Ok(ready.hangup);
        }
        match tty::read(master, &mut buf)? {
            Read::Bytes(0) | Read::Empty => return Ok(false),
            Read::Closed => return Ok(true),
            // In packet mode every read starts with a status byte, 0 for data.
            Read::Bytes(n) if packet && buf[0] != 0 => {
                return Err(PtyError::Unsupported(format!(
                    "its master (packet mode) gave status {:#x} while it was read ({n} bytes)",
                    buf[0]
                )))
            }
            Read::Bytes(n) => out.extend_from_slice(&buf[usize::from(packet)..n]),
        }
        if out.len() > OUTPUT_LIMIT {
            return Err(PtyError::Unsupported(format!(
                "more than {OUTPUT_LIMIT} bytes are queued for its master"
            )));
        }
    }
}

/// Puts `input` and `output` into the pair of `master` (settings `t`): see the
/// module doc. `slave` is a descriptor of ours on its slave, needed for an input
/// queue and for output beyond [`LDISC_ROOM`].
pub fn put_back(
    master: BorrowedFd<'_>,
    slave: Option<BorrowedFd<'_>>,
    t: &libc::termios2,
    input: &PtyInput,
    output: &[u8],
) -> Result<(), PtyError> {
    let direct = output.len().min(LDISC_ROOM);
    for &c in &output[..direct] {
        tty::inject_byte(master, c)?;
    }
    let took = tty::queued(master)?;
    if took < direct {
        return Err(PtyError::Unsupported(format!(
            "its master took back {took} of the {direct} bytes it had queued"
        )));
    }
    if input_is_empty(input) && output.len() == direct {
        return Ok(());
    }
    let slave = slave.ok_or_else(|| {
        PtyError::Unsupported("its queue cannot be put back without a slave to write to".into())
    })?;
    let w = Writing::new(t, input)?;
    tty::set_termios(slave, &w.termios)?;
    let put = w
        .inject(slave, input)
        .and_then(|()| write_all(slave, &output[direct..]));
    let back = tty::set_termios(slave, t);
    put?;
    back?;
    Ok(())
}

/// The settings the input queue is written back with, and its spare bytes.
struct Writing {
    termios: libc::termios2,
    canon: bool,
    /// Bytes that need `lnext` before them inside a line.
    escape: [bool; 256],
    lnext: u8,
    eof: u8,
}

impl Writing {
    fn new(t: &libc::termios2, input: &PtyInput) -> Result<Writing, PtyError> {
        let canon = canonical(t);
        let cc = &t.c_cc;
        let mut escape = [false; 256];
        if t.c_iflag & libc::IXON != 0 {
            escape[usize::from(cc[libc::VSTART])] = true;
            escape[usize::from(cc[libc::VSTOP])] = true;
        }
        let mut used = [false; 256];
        for b in input.lines.iter().flat_map(|l| &l.bytes).chain(&input.rest) {
            used[usize::from(*b)] = true;
        }
        if !canon && (0..256).any(|c| escape[c] && used[c]) {
            return Err(PtyError::Unsupported(
                "its input queue holds its start or stop character in non-canonical mode".into(),
            ));
        }
        if canon {
            for c in [b'\n', cc[libc::VEOL], cc[libc::VEOL2]] {
                escape[usize::from(c)] = true;
            }
        }
        let spare: Vec<u8> = (1..=255u8)
            .filter(|&c| !used[usize::from(c)] && !escape[usize::from(c)] && c != b'\r')
            .take(3)
            .collect();
        let &[erase, lnext, eof] = spare.as_slice() else {
            return Err(PtyError::Unsupported(
                "its input queue holds nearly every byte value".into(),
            ));
        };
        let mut w = *t;
        w.c_iflag = t.c_iflag & (libc::IXON | libc::IXANY | libc::IXOFF | libc::IUTF8);
        w.c_oflag = t.c_oflag & !libc::OPOST;
        w.c_lflag = if canon {
            libc::ICANON | libc::IEXTEN
        } else {
            0
        };
        for i in [libc::VERASE, libc::VKILL, libc::VWERASE, libc::VREPRINT] {
            w.c_cc[i] = erase;
        }
        w.c_cc[libc::VLNEXT] = lnext;
        w.c_cc[libc::VEOF] = eof;
        Ok(Writing {
            termios: w,
            canon,
            escape,
            lnext,
            eof,
        })
    }

    fn byte(&self, slave: BorrowedFd<'_>, c: u8) -> Result<(), SysError> {
        if self.canon && self.escape[usize::from(c)] {
            tty::inject_byte(slave, self.lnext)?;
        }
        tty::inject_byte(slave, c)
    }

    /// Writes the input queue through the line discipline, and checks it took it.
    fn inject(&self, slave: BorrowedFd<'_>, input: &PtyInput) -> Result<(), PtyError> {
        for line in &input.lines {
            let (body, end) = match line.bytes.split_last() {
                Some((&end, body)) if !line.eof => (body, end),
                _ => (&line.bytes[..], self.eof),
            };
            for &c in body {
                self.byte(slave, c)?;
            }
            tty::inject_byte(slave, end)?;
        }
        for &c in &input.rest {
            self.byte(slave, c)?;
        }
        // FIONREAD counts the complete lines in canonical mode (without the VEOF
        // that ends one), everything otherwise.
        let want = if self.canon {
            input.lines.iter().map(|l| l.bytes.len()).sum()
        } else {
            input.rest.len()
        };
        let took = tty::queued(slave)?;
        if took != want {
            return Err(PtyError::Unsupported(format!(
                "its slave took back {took} bytes of input where {want} were expected"
            )));
        }
        Ok(())
    }
}

/// Writes all of `buf` to the non-blocking `slave`, waiting for room.
fn write_all(slave: BorrowedFd<'_>, mut buf: &[u8]) -> Result<(), PtyError> {
    while !buf.is_empty() {
        match sys::fd::write(slave, buf, "a pty slave") {
            Ok(n) => buf = &buf[n..],
            Err(e) if e.errno() == Some(libc::EAGAIN) => {
                if !tty::poll(slave, 2000)?.output {
                    return Err(PtyError::Unsupported(format!(
                        "its slave took no more output for 2 s ({} bytes left)",
                        buf.len()
                    )));
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsFd, OwnedFd};
    use std::os::unix::fs::OpenOptionsExt;

    fn pair() -> (OwnedFd, OwnedFd) {
        let m: OwnedFd = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
            .open("/dev/ptmx")
            .unwrap()
            .into();
        tty::set_pty_locked(m.as_fd(), false).unwrap();
        let s = tty::open_peer(m.as_fd(), libc::O_RDWR | libc::O_NONBLOCK).unwrap();
        (m, s)
    }

    fn write(fd: BorrowedFd<'_>, b: &[u8]) {
        let mut done = 0;
        while done < b.len() {
            match sys::fd::write(fd, &b[done..], "test") {
                Ok(n) => done += n,
                Err(e) if e.errno() == Some(libc::EAGAIN) => {
                    std::thread::sleep(std::time::Duration::from_millis(1))
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    /// Every read the descriptor gives now (in canonical mode, one per line).
    fn reads(fd: BorrowedFd<'_>) -> Vec<Vec<u8>> {
        let mut buf = vec![0u8; 1 << 16];
        let mut out = Vec::new();
        while tty::poll(fd, 100).unwrap().input {
            match tty::read(fd, &mut buf).unwrap() {
                Read::Bytes(n) => out.push(buf[..n].to_vec()),
                _ => break,
            }
        }
        out
    }

    /// A canonical input queue with a line ended by VEOF, one by VEOL, one with a
    /// newline typed after VLNEXT and an unfinished line, and an output queue
    /// larger than the master's line discipline holds: taken out and put back,
    /// they read exactly as they would have.
    #[test]
    fn queues_are_put_back_exactly_both_ways() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: TIOCSTI on a terminal not ours needs CAP_SYS_ADMIN (run as root)");
            return;
        }
        let (m, s) = pair();
        let (m, s) = (m.as_fd(), s.as_fd());
        let mut t = tty::get_termios(s).unwrap();
        t.c_lflag = libc::ICANON | libc::IEXTEN | libc::ISIG;
        t.c_oflag = libc::OPOST | libc::ONLCR;
        t.c_cc[libc::VEOL] = b'#';
        tty::set_termios(s, &t).unwrap();
        write(m, b"abc\nde\x04f#\x16\nxy\npart");
        let sent: Vec<u8> = (0..1500)
            .flat_map(|i| format!("{i:04}\n").into_bytes())
            .collect();
        write(s, &sent);
        let shown: Vec<u8> = sent
            .iter()
            .flat_map(|&c| {
                if c == b'\n' {
                    vec![b'\r', b'\n']
                } else {
                    vec![c]
                }
            })
            .collect();
        std::thread::sleep(std::time::Duration::from_millis(100));

        let (input, err) = take_input(s, &t);
        assert!(err.is_none(), "{err:?}");
        let line = |b: &[u8], eof| PtyLine {
            bytes: b.to_vec(),
            eof,
        };
        assert_eq!(
            input.lines,
            vec![
                line(b"abc\n", false),
                line(b"de", true),
                line(b"f#", false),
                line(b"\nxy\n", false)
            ]
        );
        assert_eq!(input.rest, b"part");
        let mut output = Vec::new();
        assert!(!take_output(m, false, &mut output).unwrap());
        assert_eq!(output, shown);
        assert!(output.len() > LDISC_ROOM);

        put_back(m, Some(s), &t, &input, &output).unwrap();
        assert_eq!(to_image(&tty::get_termios(s).unwrap()), to_image(&t));
        let got = reads(s);
        let want: Vec<&[u8]> = vec![b"abc\n", b"de", b"f#", b"\nxy\n"];
        assert_eq!(got, want);
        write(m, b"ial\n");
        assert_eq!(reads(s), vec![b"partial\n".to_vec()]);
        assert_eq!(reads(m).concat(), shown);
    }
}
