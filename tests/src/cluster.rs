//! A test cluster of N "nodes" on this one machine, built from network namespaces.
//!
//! The end-to-end tests need several hosts that talk to each other over IP: a
//! controller on one, agents on the others, with addresses that are not loopback
//! (the agents must not all be reachable at 127.0.0.1, or a test could pass while
//! talking to the wrong node). Real machines or VMs are out of reach in CI, so each
//! node is a network namespace:
//!
//! ```text
//!   namespace <tag>-br (the hub)          namespace <tag>-n<i> (node i)
//!   br0  <subnet>.1/24 ── v<i> ═══ veth ═══ eth0  <subnet>.(10+i)/24
//!   lo up                                  lo up
//! ```
//!
//! The hub namespace holds only a Linux bridge, which has the address `<subnet>.1`
//! so that a controller started in the hub is reachable from every node. Only the
//! network is separate: the nodes share the file system, the PID namespace and
//! everything else with the test process, which is what a checkpoint test wants
//! (the test reads `/proc` of every process and every node sees the same images).
//!
//! # Names and addresses
//!
//! The `tag` is `ck<pid>-<counter>`: the test process's PID keeps apart test
//! processes that run at the same time, the counter the clusters of one process
//! (cargo runs the tests of a binary on parallel threads). The `/24` subnet
//! `10.<a>.<b>.0` comes from the same counter, so that two clusters of one process
//! never share one even though, strictly, they could: each cluster has its own
//! bridge in its own namespace and no route leads from one to the other. Unique
//! subnets keep a log or an error message unambiguous.
//!
//! Every interface is created directly inside the namespace it lives in
//! (`ip -n <tag>-br link add v<i> type veth peer name eth0 netns <tag>-n<i>`), never
//! in the root namespace: short fixed names (`br0`, `v<i>`, `eth0`) then fit
//! IFNAMSIZ and cannot collide with the interfaces of a parallel test or of the host.
//! Nothing in the root namespace is touched, so no traffic of the cluster can leave
//! the machine.
//!
//! # Teardown
//!
//! Dropping the [`Cluster`] (also while a test panics) SIGKILLs and reaps, by PID,
//! the processes started with [`Cluster::spawn_in`] and their descendants, then
//! whatever else still runs in the cluster's namespaces, then deletes the node
//! namespaces and the hub namespace (deleting a namespace deletes its veth ends and
//! the bridge). A namespace with a process left in it would live on after
//! `ip netns delete`, hence the killing first. [`Cluster::new`] builds the cluster
//! inside the value it returns, so a failure halfway drops what exists so far and
//! the same teardown removes it.

use std::ffi::CString;
use std::io;
use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use anyhow::{bail, ensure, Context, Result};

use crate::process::{become_subreaper, start_time, tree_pids, PidsGuard};

/// Where `ip netns add` mounts the namespaces it names (`/var/run/netns`, and
/// `/var/run` is a link to `/run`).
const NETNS_DIR: &str = "/run/netns";

/// Host numbers of the nodes start here: node `i` is `<subnet>.(10 + i)`.
const FIRST_NODE_HOST: usize = 10;

/// The largest cluster: the last node must stay below the broadcast address .255.
pub const MAX_NODES: usize = 254 - FIRST_NODE_HOST + 1;

/// Numbers the clusters of this process; source of both the tag and the subnet.
static NEXT_CLUSTER: AtomicU32 = AtomicU32::new(0);

/// One node of a [`Cluster`]: a network namespace with one interface, `eth0`,
/// on the cluster's bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Short name of the node, `n<i>` (what a Slurm configuration would call it).
    pub name: String,
    /// The node's network namespace, `<tag>-n<i>` (as `ip netns list` shows it).
    pub netns: String,
    /// The node's address on the bridge, `<subnet>.(10+i)`.
    pub addr: Ipv4Addr,
}

/// N nodes and a hub joined by a bridge; see the module docs. Dropping it kills
/// what was spawned in it and deletes its namespaces.
#[derive(Debug)]
pub struct Cluster {
    tag: String,
    /// The first three octets of the cluster's /24.
    subnet: [u8; 3],
    hub_netns: String,
    nodes: Vec<Node>,
    /// Every namespace created so far, hub first, in creation order. Filled while
    /// [`Cluster::new`] runs, so that a failure halfway tears down exactly these.
    created: Vec<String>,
    /// Processes started by [`Cluster::spawn_in`], with their start time (field 22
    /// of `/proc/PID/stat`) so that a PID recycled after the caller reaped the child
    /// is left alone.
    spawned: Mutex<Vec<(i32, Option<u64>)>>,
}

impl Cluster {
    /// `n` nodes. One namespace `<tag>-br` holds a Linux bridge with address
    /// `<subnet>.1/24`; each node is a namespace `<tag>-n<i>` joined to the bridge by
    /// a veth pair, with address `<subnet>.(10+i)/24` and loopback up. `tag` and the
    /// subnet are unique per cluster (see the module docs), so tests may build
    /// clusters in parallel. Needs root (`CAP_SYS_ADMIN` and `CAP_NET_ADMIN`) and
    /// `ip` (iproute2) on `PATH`.
    pub fn new(n: usize) -> Result<Cluster> {
        Self::build(n, &|_, _| Ok(()))
    }

    /// [`Cluster::new`], calling `after_node(&cluster, i)` once node `i` is set up:
    /// the unit tests use it to fail halfway.
    fn build(n: usize, after_node: &dyn Fn(&Cluster, usize) -> Result<()>) -> Result<Cluster> {
        ensure!(
            (1..=MAX_NODES).contains(&n),
            "a cluster has 1 to {MAX_NODES} nodes, not {n}"
        );
        let seq = NEXT_CLUSTER.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let tag = format!("ck{pid}-{seq}");
        // 10.<a>.<b>.0/24: <b> from the counter, <a> from the PID (to make clashes
        // between test processes unlikely, though harmless) and the counter's carry.
        let a = ((pid + seq / 256) % 256) as u8;
        let b = (seq % 256) as u8;
        let mut cluster = Cluster {
            hub_netns: format!("{tag}-br"),
            tag,
            subnet: [10, a, b],
            nodes: Vec::with_capacity(n),
            created: Vec::new(),
            spawned: Mutex::new(Vec::new()),
        };
        // Namespaces of this tag can only be leftovers of an earlier test process
        // that had our PID and was killed before its clusters were dropped: no live
        // process but us has this PID. They would make `ip netns add` fail.
        for stale in namespaces_with_prefix(&cluster.ns_prefix()) {
            eprintln!("ckpt-tests: deleting stale network namespace {stale}");
            let _ = ip(&["netns", "delete", &stale]);
        }

        let hub = cluster.hub_netns.clone();
        cluster.add_netns(&hub)?;
        let hub_cidr = format!("{}/24", cluster.hub_addr());
        ip(&["-n", &hub, "link", "set", "lo", "up"])?;
        // forward_delay 0 (and STP off, the default): a port forwards as soon as it
        // is up, instead of listening and learning for 15 s first.
        ip(&[
            "-n",
            &hub,
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "forward_delay",
            "0",
        ])?;
        ip(&["-n", &hub, "addr", "add", &hub_cidr, "dev", "br0"])?;
        ip(&["-n", &hub, "link", "set", "br0", "up"])?;

        for i in 0..n {
            let node = Node {
                name: format!("n{i}"),
                netns: format!("{}-n{i}", cluster.tag),
                addr: cluster.host_addr(FIRST_NODE_HOST + i),
            };
            let ns = node.netns.clone();
            cluster.add_netns(&ns)?;
            let veth = format!("v{i}");
            let cidr = format!("{}/24", node.addr);
            cluster.nodes.push(node);
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&[
                "-n", &hub, "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ])?;
            ip(&["-n", &hub, "link", "set", &veth, "master", "br0", "up"])?;
            ip(&["-n", &ns, "addr", "add", &cidr, "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            after_node(&cluster, i)?;
        }
        Ok(cluster)
    }

    /// The cluster's tag, `ck<pid>-<counter>`: every namespace name of the cluster
    /// starts with `<tag>-`.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The nodes, node `i` at index `i`.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// Namespace of the "hub" (the bridge namespace), where a controller runs.
    pub fn hub_netns(&self) -> &str {
        &self.hub_netns
    }

    /// Address of the hub, `<subnet>.1` (the bridge's own address).
    pub fn hub_addr(&self) -> Ipv4Addr {
        self.host_addr(1)
    }

    /// Runs `cmd` inside namespace `netns` (the hub's or a node's) and returns the
    /// child; the cluster remembers its PID and SIGKILLs and reaps it, with its
    /// descendants, when dropped if it still runs.
    ///
    /// The child enters the namespace with `setns(2)` between fork and exec (a
    /// `pre_exec` hook that opens `/run/netns/<netns>`), so the returned PID is the
    /// program itself, not an `ip netns exec` wrapper. Only the network namespace
    /// changes: unlike `ip netns exec`, `/sys` is not remounted (so
    /// `/sys/class/net` still shows the root namespace's interfaces; netlink, as
    /// `ip` uses it, and sockets see the node's) and `/etc/netns/` is not applied.
    /// The hook stays on `cmd`; spawning `cmd` again enters the same namespace.
    pub fn spawn_in(&self, netns: &str, cmd: &mut Command) -> Result<Child> {
        self.enter_on_exec(netns, cmd)?;
        // Orphans of what the child forks become our children, so that the guards
        // can reap them (see the crate docs).
        become_subreaper();
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {cmd:?} in network namespace {netns}"))?;
        let pid = child.id() as i32;
        self.spawned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((pid, start_time(pid)));
        Ok(child)
    }

    /// Runs `cmd` inside namespace `netns` to completion, as [`spawn_in`] enters it,
    /// and returns its output (stdout and stderr captured, stdin from `/dev/null`):
    /// for `ip` commands inside a node and other short checks. A failing exit status
    /// is returned, not turned into an error.
    ///
    /// [`spawn_in`]: Self::spawn_in
    pub fn run_in(&self, netns: &str, cmd: &mut Command) -> Result<Output> {
        self.enter_on_exec(netns, cmd)?;
        cmd.output()
            .with_context(|| format!("running {cmd:?} in network namespace {netns}"))
    }

    /// Adds the `pre_exec` hook that moves the child into `netns`, which must be a
    /// namespace of this cluster (so that a typo cannot start a process in some
    /// other test's namespace, or leave it in the root one).
    fn enter_on_exec(&self, netns: &str, cmd: &mut Command) -> Result<()> {
        ensure!(
            netns == self.hub_netns || self.nodes.iter().any(|n| n.netns == netns),
            "{netns} is not a namespace of cluster {} (hub {}, nodes {:?})",
            self.tag,
            self.hub_netns,
            self.nodes.iter().map(|n| &n.netns).collect::<Vec<_>>()
        );
        let path = format!("{NETNS_DIR}/{netns}");
        let c_path = CString::new(path.as_str()).context("namespace name has a NUL")?;
        // The path is opened in the child, not here: a descriptor opened here would
        // be closed when this function returns and its number could be reused by the
        // time `cmd` is spawned again.
        // SAFETY: the closure runs in the forked child before exec. It only makes
        // async-signal-safe system calls (open, setns, close) with plain integers
        // and `c_path`, a NUL-terminated string owned by the closure, and allocates
        // nothing (`last_os_error` only reads errno).
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(c_path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                let r = libc::setns(fd, libc::CLONE_NEWNET);
                let err = io::Error::last_os_error();
                libc::close(fd);
                if r != 0 {
                    return Err(err);
                }
                Ok(())
            });
        }
        Ok(())
    }

    /// `<subnet>.host`.
    fn host_addr(&self, host: usize) -> Ipv4Addr {
        let [a, b, c] = self.subnet;
        Ipv4Addr::new(a, b, c, host as u8)
    }

    /// The prefix every namespace name of this cluster starts with, `<tag>-`. The
    /// trailing dash keeps tag `ck1-1` from matching the names of tag `ck1-12`.
    fn ns_prefix(&self) -> String {
        format!("{}-", self.tag)
    }

    /// `ip netns add name`, remembering it for the teardown.
    fn add_netns(&mut self, name: &str) -> Result<()> {
        ip(&["netns", "add", name])?;
        self.created.push(name.to_string());
        Ok(())
    }

    /// SIGKILLs and reaps what [`spawn_in`](Self::spawn_in) started that still
    /// runs, with all its descendants (they could hold a namespace alive).
    fn kill_spawned(&mut self) {
        let spawned = std::mem::take(self.spawned.get_mut().unwrap_or_else(|e| e.into_inner()));
        let mut guard = PidsGuard::default();
        for (pid, start) in spawned {
            // A changed start time: the caller reaped the child and the PID now
            // belongs to someone else. No start time: gone and reaped already. A
            // zombie still has its start time and is reaped by the guard.
            if start.is_none() || start_time(pid) != start {
                continue;
            }
            for p in tree_pids(pid) {
                guard.push(p);
            }
        }
        guard.kill_all();
    }

    /// SIGKILLs whatever else runs in the cluster's namespaces (something started
    /// there without [`spawn_in`](Self::spawn_in), a tree restored into a node):
    /// the namespaces are this cluster's, so is everything in them.
    fn kill_leftovers(&self) {
        let me = std::process::id() as i32;
        for ns in &self.created {
            let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() else {
                continue;
            };
            let pids: Vec<i32> = String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .filter(|&p| p != me)
                .collect();
            if !pids.is_empty() {
                eprintln!("ckpt-tests: killing processes left in network namespace {ns}: {pids:?}");
                PidsGuard::new(pids).kill_all();
            }
        }
    }

    /// Deletes the namespaces, nodes before the hub (last created first), then any
    /// other namespace with this cluster's prefix (one `ip netns add` created
    /// before failing, say).
    fn delete_namespaces(&mut self) {
        for ns in std::mem::take(&mut self.created).iter().rev() {
            if let Err(e) = ip(&["netns", "delete", ns]) {
                eprintln!("ckpt-tests: {e:#}");
            }
        }
        for ns in namespaces_with_prefix(&self.ns_prefix()) {
            if let Err(e) = ip(&["netns", "delete", &ns]) {
                eprintln!("ckpt-tests: {e:#}");
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.kill_spawned();
        self.kill_leftovers();
        self.delete_namespaces();
    }
}

/// Runs `ip args`; fails with the command line and what `ip` printed.
fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .with_context(|| format!("running `ip {}` (is iproute2 installed?)", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The named network namespaces (entries of `/run/netns`) whose name starts with
/// `prefix`, sorted.
pub fn namespaces_with_prefix(prefix: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(NETNS_DIR)
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Whether process `pid` is in network namespace `netns` (a name under
/// `/run/netns`): compares the namespace inodes, as `ip netns identify` does.
pub fn in_netns(pid: i32, netns: &str) -> io::Result<bool> {
    let want = std::fs::metadata(format!("{NETNS_DIR}/{netns}"))?;
    let have = std::fs::metadata(format!("/proc/{pid}/ns/net"))?;
    Ok(want.dev() == have.dev() && want.ino() == have.ino())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failure while node 1 is set up must leave no namespace of the cluster
    /// behind.
    #[test]
    fn a_cluster_failing_halfway_removes_its_namespaces() {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED: building a cluster needs root");
            return;
        }
        let tag = Mutex::new(None);
        let err = Cluster::build(3, &|c, i| {
            *tag.lock().unwrap() = Some(c.tag().to_string());
            ensure!(i < 1, "injected failure after node {i}");
            assert_eq!(namespaces_with_prefix(&c.ns_prefix()).len(), 2);
            Ok(())
        })
        .expect_err("the injected failure");
        assert!(format!("{err}").contains("injected failure after node 1"));
        let tag = tag.into_inner().unwrap().expect("node 0 was set up");
        assert_eq!(
            namespaces_with_prefix(&format!("{tag}-")),
            Vec::<String>::new()
        );
    }

    #[test]
    fn too_many_or_no_nodes_are_refused() {
        assert!(Cluster::new(0).is_err());
        assert!(Cluster::new(MAX_NODES + 1).is_err());
    }
}
