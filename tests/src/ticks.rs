//! The line protocol of the workloads, and the continuity checks built on it.
//!
//! Every workload prints lines `tick <n> <chain> [key value]...` where `n` counts
//! from 1 by one and `chain` (16 hex digits) is `chain_n = chain_step(chain_{n-1}, n)`
//! with `chain_0 = 0`, computed by the program from its own memory (the C side is
//! `chain_step` in `workloads/common.h`, the Python side `chain_step` in
//! `workloads/stateful.py`). A workload that finds its own state inconsistent
//! prints a line starting with `FAIL`.
//!
//! So a log proves continuity across a checkpoint when its tick numbers run
//! 1, 2, 3, ... with no gap or repeat, each chain value is the one recomputed here,
//! and no line says `FAIL`: a restored process that lost or duplicated state, or
//! restarted from an older image, breaks one of the three.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use anyhow::{bail, Context, Result};

/// One step of the chain; the same function as `chain_step` in `common.h`.
pub fn chain_step(acc: u64, n: u64) -> u64 {
    let mut z = acc.wrapping_add(n.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The chain value a workload prints on tick `n`.
pub fn chain(n: u64) -> u64 {
    (1..=n).fold(0, chain_step)
}

/// The hash in `file_writer`'s record `seq`.
pub fn record_hash(seq: u64) -> u64 {
    chain_step(seq, 0x5EC)
}

/// Size of one `file_writer` record.
pub const RECORD_SIZE: usize = 64;

/// One parsed tick line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tick {
    pub n: u64,
    pub chain: u64,
    /// The `key value` pairs after the chain.
    pub fields: BTreeMap<String, String>,
    /// Index of the line in the log.
    pub line: usize,
}

impl Tick {
    /// The field `key` as a decimal number (hex fields: [`Tick::hex`]).
    pub fn num(&self, key: &str) -> Option<u64> {
        self.fields.get(key)?.parse().ok()
    }

    /// The field `key` read as hexadecimal.
    pub fn hex(&self, key: &str) -> Option<u64> {
        u64::from_str_radix(self.fields.get(key)?, 16).ok()
    }
}

/// Parses one `tick` line; `None` for any other line.
pub fn parse_tick(line: &str, index: usize) -> Option<Tick> {
    let mut words = line.split_whitespace();
    if words.next()? != "tick" {
        return None;
    }
    let n = words.next()?.parse().ok()?;
    let chain = u64::from_str_radix(words.next()?, 16).ok()?;
    let mut fields = BTreeMap::new();
    while let Some(k) = words.next() {
        fields.insert(k.to_owned(), words.next().unwrap_or("").to_owned());
    }
    Some(Tick {
        n,
        chain,
        fields,
        line: index,
    })
}

/// The complete lines of a log (a last line without its newline is still being
/// written and is left out). Invalid UTF-8 is replaced, not an error.
pub fn read_log_lines(path: &Path) -> Result<Vec<String>> {
    let bytes = fs::read(path).with_context(|| format!("reading log {}", path.display()))?;
    let complete = match bytes.iter().rposition(|&b| b == b'\n') {
        Some(i) => &bytes[..=i],
        None => &[][..],
    };
    Ok(String::from_utf8_lossy(complete)
        .lines()
        .map(str::to_owned)
        .collect())
}

/// The last tick number in `lines`.
pub fn last_tick_of(lines: &[String]) -> Option<u64> {
    lines
        .iter()
        .enumerate()
        .rev()
        .find_map(|(i, l)| parse_tick(l, i))
        .map(|t| t.n)
}

/// The last tick number in the log at `path` (`None` if none yet or unreadable).
pub fn last_tick(path: &Path) -> Option<u64> {
    last_tick_of(&read_log_lines(path).ok()?)
}

/// The last `n` lines of a log, for error messages.
pub fn log_tail(path: &Path, n: usize) -> String {
    let lines = read_log_lines(path).unwrap_or_default();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn context(lines: &[String], at: usize) -> String {
    let from = at.saturating_sub(3);
    let to = (at + 4).min(lines.len());
    (from..to)
        .map(|i| format!("{:>6}: {}", i + 1, lines[i]))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Checks the log's continuity (see the module docs): no line contains `FAIL`, there
/// is at least one tick, ticks are numbered 1, 2, 3, ... with no gap or repeat, and
/// every chain value is right. Returns the ticks.
pub fn check_continuity(lines: &[String]) -> Result<Vec<Tick>> {
    let fails: Vec<usize> = (0..lines.len())
        .filter(|&i| lines[i].contains("FAIL"))
        .collect();
    if let Some(&first) = fails.first() {
        bail!(
            "the workload reported {} failure(s); the first, in context:\n{}",
            fails.len(),
            context(lines, first)
        );
    }
    let mut ticks = Vec::new();
    let mut acc = 0;
    for (i, line) in lines.iter().enumerate() {
        let Some(tick) = parse_tick(line, i) else {
            if line.starts_with("tick") {
                bail!("malformed tick line {}:\n{}", i + 1, context(lines, i));
            }
            continue;
        };
        let expected = ticks.len() as u64 + 1;
        if tick.n != expected {
            let what = if tick.n < expected {
                "repeated"
            } else {
                "skipped"
            };
            bail!(
                "tick {} follows tick {} (ticks {what}) at line {}:\n{}",
                tick.n,
                expected - 1,
                i + 1,
                context(lines, i)
            );
        }
        acc = chain_step(acc, tick.n);
        if tick.chain != acc {
            bail!(
                "tick {} carries chain {:016x}, expected {acc:016x} (state lost or corrupted) at line {}:\n{}",
                tick.n,
                tick.chain,
                i + 1,
                context(lines, i)
            );
        }
        ticks.push(tick);
    }
    if ticks.is_empty() {
        bail!("the log holds no tick at all:\n{}", lines.join("\n"));
    }
    Ok(ticks)
}

/// Reads the log at `path` and checks its continuity ([`check_continuity`]).
pub fn check_log(path: &Path) -> Result<Vec<Tick>> {
    let lines = read_log_lines(path)?;
    check_continuity(&lines).with_context(|| format!("continuity of {}", path.display()))
}

/// The text of `file_writer`'s record `seq`.
pub fn record_text(seq: u64) -> String {
    let mut s = format!("rec {seq:010} {:016x} ", record_hash(seq));
    while s.len() < RECORD_SIZE - 1 {
        s.push('.');
    }
    s.push('\n');
    s
}

/// Checks a file written by `file_writer`: a whole number of records, record `i`
/// at offset `64 * i` for every `i`, each exactly once. Returns the record count.
pub fn check_records_file(path: &Path) -> Result<u64> {
    let data = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if data.len() % RECORD_SIZE != 0 {
        bail!(
            "{} is {} bytes, not a whole number of {RECORD_SIZE}-byte records (torn write)",
            path.display(),
            data.len()
        );
    }
    for (i, rec) in data.chunks(RECORD_SIZE).enumerate() {
        let want = record_text(i as u64);
        if rec != want.as_bytes() {
            bail!(
                "{}: record {i} at offset {} is {:?}, expected {:?}",
                path.display(),
                i * RECORD_SIZE,
                String::from_utf8_lossy(rec),
                want
            );
        }
    }
    Ok((data.len() / RECORD_SIZE) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(ticks: &[(u64, u64)]) -> Vec<String> {
        let mut v = vec!["header".to_string()];
        for &(n, c) in ticks {
            v.push(format!("tick {n} {c:016x} k 7"));
        }
        v
    }

    #[test]
    fn chain_matches_the_c_workloads() {
        // Printed by counter.c and stateful.py for ticks 1 and 2.
        assert_eq!(chain(1), 0xe220a8397b1dcdaf);
        assert_eq!(chain(2), 0xb382a305f4414f5e);
    }

    #[test]
    fn a_good_log_passes_and_fields_parse() {
        let ticks = check_continuity(&log(&[(1, chain(1)), (2, chain(2)), (3, chain(3))])).unwrap();
        assert_eq!(ticks.len(), 3);
        assert_eq!(ticks[2].num("k"), Some(7));
    }

    #[test]
    fn gaps_repeats_bad_chains_and_fails_are_caught() {
        let gap = log(&[(1, chain(1)), (3, chain(3))]);
        assert!(check_continuity(&gap)
            .unwrap_err()
            .to_string()
            .contains("skipped"));
        let rep = log(&[(1, chain(1)), (2, chain(2)), (2, chain(2))]);
        assert!(check_continuity(&rep)
            .unwrap_err()
            .to_string()
            .contains("repeated"));
        let bad = log(&[(1, chain(1)), (2, chain(1))]);
        assert!(check_continuity(&bad)
            .unwrap_err()
            .to_string()
            .contains("chain"));
        let mut failed = log(&[(1, chain(1))]);
        failed.push("FAIL something".into());
        assert!(check_continuity(&failed)
            .unwrap_err()
            .to_string()
            .contains("failure"));
        assert!(check_continuity(&["hello".to_string()]).is_err());
    }

    #[test]
    fn record_text_is_one_record() {
        let r = record_text(1);
        assert_eq!(r.len(), RECORD_SIZE);
        assert!(r.starts_with("rec 0000000001 e87b92df794e5cd2 "));
    }
}
