//! The network lock of a checkpoint attempt (../shared/DESIGN.md, "Consistent network cut").
//!
//! Before any socket of the job is read, every packet of exactly the job's
//! connections is dropped, both ways, so nothing moves between the queues that are
//! being read: a byte in flight is then in the sender's write queue, in the
//! receiver's read queue, or in both (sequence numbers tell). TCP treats the drops
//! as loss and retransmits once the lock is lifted; nothing is lost.
//!
//! One nftables table per attempt, `inet ckpt_<attempt>` (a save's or a
//! restore's), in which each rank of the attempt on this node has a part: an
//! input and an output chain, `in_r<rank>` and `out_r<rank>` (loopback connections
//! cross both hooks; a connection to another node crosses one each way), each rule
//! matching one connection's full 4-tuple. A dump locks before its rank reports
//! FROZEN and lifts its part when the rank runs again or is killed; a restore
//! locks the new 4-tuples before any socket is rebuilt and lifts its part at the
//! job's RELEASE, once every rank of the job is rebuilt. The last part lifted
//! takes the table with it; dropping a lock lifts it too.
//!
//! Each table carries its owner in its comment, `ckpt owner PID START`: the process
//! that made it (the daemon, or a command-line `dump` or `restore`), named by its PID
//! and its start time (`/proc/PID/stat` field 22), which together survive PID
//! reuse. A process that died while holding a lock (SIGKILL, a crash) leaves its
//! table behind, and it would hold the job's connections forever;
//! [`remove_stale`] (the daemon's start) removes the tables whose owner is gone,
//! and only those: a command-line dump running beside the daemon, or another
//! daemon of the same network namespace, keeps its lock. A table without an owner
//! comment (made before owners were recorded) counts as stale. The comment was
//! preferred to a name that holds the owner: the names stay what the callers chose
//! (`ckpt_<attempt>`), and nft keeps the comment with the table.

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};

/// Prefix of every table this module makes.
pub const TABLE_PREFIX: &str = "ckpt_";

/// A TCP connection, from one of its ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Conn {
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("cannot run nft (install the nftables package): {0}")]
    Spawn(std::io::Error),
    #[error("nft refused the lock table {table}: {stderr}")]
    Nft { table: String, stderr: String },
    #[error("lock name {0:?}: only letters, digits and _ are allowed")]
    Name(String),
    #[error("connection {0:?} mixes IPv4 and IPv6 addresses")]
    Family(Conn),
}

/// The lock of one attempt; lifted on [`unlock`](NetLock::unlock) or drop.
#[derive(Debug)]
pub struct NetLock {
    table: String,
    part: String,
    /// The sets of the part (deleted after its chains, which refer to them).
    sets: Vec<String>,
    lifted: bool,
}

/// An `nft -f -` started ahead, waiting for its script on stdin: a dump starts it
/// before it freezes the tree, so that starting a process is not part of the
/// standstill. Dropped unused, it reads an empty script and exits.
pub struct Prepared(Option<std::process::Child>);

fn spawn_nft() -> std::io::Result<std::process::Child> {
    Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
}

/// Starts `nft` ahead of a lock; `None` if it cannot be started (the lock then
/// reports why).
pub fn prepare() -> Option<Prepared> {
    spawn_nft().ok().map(|c| Prepared(Some(c)))
}

impl Drop for Prepared {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            drop(c.stdin.take());
            let _ = c.wait();
        }
    }
}

fn nft(script: &str) -> Result<(), (bool, String)> {
    nft_with(None, script)
}

fn nft_with(pre: Option<Prepared>, script: &str) -> Result<(), (bool, String)> {
    let mut child = match pre.and_then(|mut p| p.0.take()) {
        Some(c) => c,
        None => spawn_nft().map_err(|e| (true, e.to_string()))?,
    };
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(script.as_bytes())
        .map_err(|e| (false, e.to_string()))?;
    let out = child
        .wait_with_output()
        .map_err(|e| (false, e.to_string()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err((
            false,
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

/// The nft script that adds part `part` of lock table `table` over `conns` (the
/// table is made if it is not there yet), and the names of the sets it makes.
///
/// The connections go into sets of 4-tuples, one per address family, each matched
/// by one rule per chain: nft loads two thousand set elements in about a tenth of
/// the time it takes for two thousand rules, and matches a packet with one hash
/// lookup instead of a walk down the rules.
pub fn script(table: &str, part: &str, conns: &[Conn]) -> (String, Vec<String>) {
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for c in conns {
        // Both ends of a connection within one tree make the same elements.
        if !seen.insert((c.local.min(c.remote), c.local.max(c.remote))) {
            continue;
        }
        // One element per connection; each chain matches it both ways (a loopback
        // connection's packets cross output then input, a remote one's cross one
        // of the hooks each way). An IPv6 socket talking to an IPv4 peer sends
        // IPv4 packets.
        let canon = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
        let (s, d) = (canon(c.local), canon(c.remote));
        let e = format!("{} . {} . {} . {}", s.ip(), s.port(), d.ip(), d.port());
        if s.is_ipv4() {
            v4.push(e);
        } else {
            v6.push(e);
        }
    }
    let mut sets = String::new();
    let mut rules = String::new();
    let mut names = Vec::new();
    for (fam, ty, elems) in [("ip", "ipv4_addr", &v4), ("ip6", "ipv6_addr", &v6)] {
        if elems.is_empty() {
            continue;
        }
        let name = format!("{fam}_{part}");
        sets += &format!(
            "\tset {name} {{\n\t\ttype {ty} . inet_service . {ty} . inet_service\n\t\telements = {{ {} }}\n\t}}\n",
            elems.join(", ")
        );
        rules += &format!(
            "\t\t{fam} saddr . tcp sport . {fam} daddr . tcp dport @{name} drop\n\
             \t\t{fam} daddr . tcp dport . {fam} saddr . tcp sport @{name} drop\n"
        );
        names.push(name);
    }
    let text = format!(
        "table inet {table} {{\n\tcomment \"{}\"\n{sets}\
         \tchain in_{part} {{\n\t\ttype filter hook input priority -300; policy accept;\n{rules}\t}}\n\
         \tchain out_{part} {{\n\t\ttype filter hook output priority -300; policy accept;\n{rules}\t}}\n\
         }}\n",
        owner_comment()
    );
    (text, names)
}

/// A table name for an operation of its own (a command-line dump or restore of
/// process `pid`): `what`, the PID and the time.
pub fn own_name(what: &str, pid: i32) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{what}{pid}_{nanos}")
}

fn valid(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl NetLock {
    /// Drops every packet of `conns` from now on, in a table of its own named
    /// after `name` (letters, digits, `_`).
    pub fn lock(name: &str, conns: &[Conn]) -> Result<NetLock, LockError> {
        NetLock::lock_part(name, "all", conns)
    }

    /// Drops every packet of `conns` from now on, as part `part` of the lock table
    /// `name` of an attempt, beside the parts of the attempt's other ranks. Lifting
    /// the part removes its chains, and the table with the last of them.
    pub fn lock_part(name: &str, part: &str, conns: &[Conn]) -> Result<NetLock, LockError> {
        NetLock::lock_prepared(None, name, part, conns)
    }

    /// [`lock_part`](Self::lock_part) through an `nft` started ahead.
    pub fn lock_prepared(
        pre: Option<Prepared>,
        name: &str,
        part: &str,
        conns: &[Conn],
    ) -> Result<NetLock, LockError> {
        for n in [name, part] {
            if !valid(n) {
                return Err(LockError::Name(n.into()));
            }
        }
        if let Some(c) = conns
            .iter()
            .find(|c| c.local.is_ipv4() != c.remote.is_ipv4())
        {
            return Err(LockError::Family(*c));
        }
        let table = format!("{TABLE_PREFIX}{name}");
        let (text, sets) = script(&table, part, conns);
        nft_with(pre, &text).map_err(|(spawn, e)| {
            if spawn {
                LockError::Spawn(std::io::Error::other(e))
            } else {
                LockError::Nft {
                    table: table.clone(),
                    stderr: e,
                }
            }
        })?;
        Ok(NetLock {
            table,
            part: part.to_string(),
            sets,
            lifted: false,
        })
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    /// Lifts the lock: the connections' packets flow again.
    pub fn unlock(mut self) -> Result<(), LockError> {
        self.lifted = true;
        self.lift().map_err(|e| LockError::Nft {
            table: self.table.clone(),
            stderr: e,
        })
    }

    fn lift(&self) -> Result<(), String> {
        let (t, p) = (&self.table, &self.part);
        let mut cmds = format!("delete chain inet {t} in_{p}\ndelete chain inet {t} out_{p}\n");
        for s in &self.sets {
            cmds += &format!("delete set inet {t} {s}\n");
        }
        nft(&cmds).map_err(|(_, e)| e)?;
        // The last part out takes the table with it. Two parts lifted at once may
        // both find it empty: the second delete fails, harmlessly.
        let listed = Command::new("nft")
            .args(["list", "table", "inet", t])
            .stderr(Stdio::null())
            .output();
        if let Ok(out) = listed {
            if out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("chain ") {
                let _ = nft(&format!("delete table inet {t}\n"));
            }
        }
        Ok(())
    }
}

impl Drop for NetLock {
    fn drop(&mut self) {
        if !self.lifted {
            if let Err(e) = self.lift() {
                tracing::warn!(table = self.table, e, "could not lift a network lock");
            }
        }
    }
}

/// The lock tables present in this network namespace.
pub fn tables() -> Vec<String> {
    let out = Command::new("nft")
        .args(["list", "tables", "inet"])
        .stderr(Stdio::null())
        .output();
    let Ok(out) = out else { return Vec::new() };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("table inet "))
        .map(|t| t.trim().to_string())
        .filter(|t| t.starts_with(TABLE_PREFIX))
        .collect()
}

/// The comment of the tables this process makes: `ckpt owner PID START`.
fn owner_comment() -> &'static str {
    static OWNER: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    OWNER.get_or_init(|| {
        let pid = std::process::id() as i32;
        let start = crate::sys::proc::stat(pid)
            .map(|s| s.start_time)
            .unwrap_or(0);
        format!("{OWNER_TAG} {pid} {start}")
    })
}

const OWNER_TAG: &str = "ckpt owner";

/// The owner (PID, start time) in a table's comment.
fn parse_owner(comment: &str) -> Option<(i32, u64)> {
    let mut w = comment.strip_prefix(OWNER_TAG)?.split_whitespace();
    let pid = w.next()?.parse().ok()?;
    let start = w.next()?.parse().ok()?;
    Some((pid, start))
}

/// The lock tables of `nft list ruleset` text, each with the owner its comment
/// names (`None`: no owner comment).
fn owners_in(ruleset: &str) -> Vec<(String, Option<(i32, u64)>)> {
    let mut out = Vec::new();
    let mut lines = ruleset.lines().peekable();
    while let Some(l) = lines.next() {
        let Some(name) = l
            .strip_prefix("table inet ")
            .and_then(|r| r.strip_suffix(" {"))
            .filter(|n| n.starts_with(TABLE_PREFIX))
        else {
            continue;
        };
        let owner = lines
            .peek()
            .and_then(|n| n.trim().strip_prefix("comment \""))
            .and_then(|c| c.strip_suffix('"'))
            .and_then(parse_owner);
        out.push((name.to_string(), owner));
    }
    out
}

/// Whether the process that started at tick `start` still runs at `pid`.
fn alive(pid: i32, start: u64) -> bool {
    crate::sys::proc::stat(pid)
        .map(|s| s.start_time == start && s.state != 'Z' && s.state != 'X')
        .unwrap_or(false)
}

/// Removes the lock tables whose owner is gone (see the module doc); returns
/// their names. The tables of a live owner, this process included, stay.
pub fn remove_stale() -> Vec<String> {
    let out = Command::new("nft")
        .args(["list", "ruleset", "inet"])
        .stderr(Stdio::null())
        .output();
    let Ok(out) = out else { return Vec::new() };
    let mut stale = Vec::new();
    for (t, owner) in owners_in(&String::from_utf8_lossy(&out.stdout)) {
        if owner.is_some_and(|(pid, start)| alive(pid, start)) {
            continue;
        }
        if nft(&format!("delete table inet {t}\n")).is_ok() {
            stale.push(t);
        }
    }
    stale
}

/// Deletes table `inet NAME` (a lock left by an agent that died: see
/// [`crate::rescue`]); a table that is gone already is no error.
pub fn delete_table(name: &str) {
    if !valid(name.strip_prefix(TABLE_PREFIX).unwrap_or("")) {
        tracing::warn!(name, "not a lock table name: left alone");
        return;
    }
    match nft(&format!("delete table inet {name}\n")) {
        Ok(()) => tracing::info!(name, "removed a lock table left by a dead agent"),
        Err((_, e)) => tracing::debug!(name, e, "lock table not removed (gone already?)"),
    }
}

/// Removes the lock tables this process made and still holds (a daemon that
/// stops: its locks were lifted with their operations; this is the last sweep).
pub fn remove_own() -> Vec<String> {
    let out = Command::new("nft")
        .args(["list", "ruleset", "inet"])
        .stderr(Stdio::null())
        .output();
    let Ok(out) = out else { return Vec::new() };
    let me = parse_owner(owner_comment());
    let mut removed = Vec::new();
    for (t, owner) in owners_in(&String::from_utf8_lossy(&out.stdout)) {
        if owner.is_some() && owner == me && nft(&format!("delete table inet {t}\n")).is_ok() {
            removed.push(t);
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_matches_both_directions_in_both_chains() {
        let c = Conn {
            local: "10.0.0.1:5000".parse().unwrap(),
            remote: "10.0.0.2:80".parse().unwrap(),
        };
        let (s, sets) = script("ckpt_7", "r0", &[c]);
        assert_eq!(sets, vec!["ip_r0".to_string()]);
        assert!(
            s.contains("elements = { 10.0.0.1 . 5000 . 10.0.0.2 . 80 }"),
            "{s}"
        );
        let out = "ip saddr . tcp sport . ip daddr . tcp dport @ip_r0 drop";
        let back = "ip daddr . tcp dport . ip saddr . tcp sport @ip_r0 drop";
        assert_eq!(s.matches(out).count(), 2, "one in each chain: {s}");
        assert_eq!(s.matches(back).count(), 2, "one in each chain: {s}");
        // Its other end, in the same tree, adds nothing.
        let mirror = Conn {
            local: c.remote,
            remote: c.local,
        };
        assert_eq!(script("ckpt_7", "r0", &[c, mirror]).0, s);
        let v6 = Conn {
            local: "[fd00::1]:1".parse().unwrap(),
            remote: "[fd00::2]:2".parse().unwrap(),
        };
        let (s6, sets6) = script("ckpt_8", "r1", &[c, v6]);
        assert_eq!(sets6, vec!["ip_r1".to_string(), "ip6_r1".to_string()]);
        assert!(s6.contains("fd00::1 . 1 . fd00::2 . 2"), "{s6}");
        assert!(s6.contains("ip6 saddr . tcp sport . ip6 daddr . tcp dport @ip6_r1 drop"));
        assert!(matches!(
            NetLock::lock("bad name", &[]),
            Err(LockError::Name(_))
        ));
        // The owner is this process.
        let me = std::process::id();
        assert!(s.contains(&format!("comment \"ckpt owner {me} ")), "{s}");
    }

    #[test]
    fn owners_are_read_from_the_table_comments() {
        let ruleset =
            "table inet ckpt_1 {\n\tcomment \"ckpt owner 42 977\"\n\tchain in_r0 {\n\t}\n}\n\
                       table inet other {\n\tcomment \"ckpt owner 1 1\"\n}\n\
                       table inet ckpt_old {\n\tchain in_r0 {\n\t}\n}\n";
        assert_eq!(
            owners_in(ruleset),
            vec![
                ("ckpt_1".to_string(), Some((42, 977))),
                ("ckpt_old".to_string(), None)
            ]
        );
        assert_eq!(parse_owner("ckpt owner x 1"), None);
        let me = std::process::id() as i32;
        let start = crate::sys::proc::stat(me).unwrap().start_time;
        assert!(alive(me, start));
        assert!(!alive(me, start + 1));
    }
}
