//! The network-namespace test cluster on its own: its nodes reach each other and
//! the hub over the bridge, two clusters built at once do not collide, and dropping
//! a cluster (also from a panicking test) leaves no namespace and no process behind.
//!
//! These need root (namespaces, veth, bridges), `ip` (iproute2) and python3, which
//! plays the TCP server and client inside the namespaces: `ping` is not installed
//! everywhere, and a TCP exchange shows more than an echo reply anyway.

use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;

use anyhow::{ensure, Context, Result};
use ckpt_tests::cluster::{in_netns, namespaces_with_prefix, Cluster};
use ckpt_tests::process::start_time;

/// Where the test servers listen, in every namespace (each has its own ports).
const PORT: u16 = 7100;

/// Accepts connections on `argv[1]:argv[2]` forever and answers each with the line
/// `argv[3]`; prints `ready` once it listens.
const SERVER: &str = r#"
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(16)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    c.sendall(sys.argv[3].encode() + b"\n")
    c.close()
"#;

/// Connects to `argv[1]:argv[2]` and prints the line the server sent, or `error`
/// and the reason (exit status 1).
const CLIENT: &str = r#"
import socket, sys
try:
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
    print(c.makefile().readline().strip())
except OSError as e:
    print("error", type(e).__name__, e)
    sys.exit(1)
"#;

/// True (after saying so) when this process is not root and must skip.
fn not_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: the test cluster needs root (network namespaces, veth, bridges)");
        return true;
    }
    false
}

/// The real python3 executable (not a pyenv shim that execs it), so that the PID
/// `spawn_in` returns is the server itself.
fn python() -> &'static str {
    static PYTHON: OnceLock<String> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let out = Command::new("python3")
            .args(["-c", "import sys; print(sys.executable)"])
            .output()
            .expect("python3 is needed by the cluster tests");
        assert!(out.status.success(), "python3 -c failed: {out:?}");
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    })
}

/// Starts the TCP server in `netns` on `addr`, answering `label`, and waits until
/// it listens. Checks first that the server really is in `netns`.
fn start_server(cluster: &Cluster, netns: &str, addr: Ipv4Addr, label: &str) -> Result<Child> {
    let mut child = cluster.spawn_in(
        netns,
        Command::new(python())
            .args(["-c", SERVER, &addr.to_string(), &PORT.to_string(), label])
            .stdin(Stdio::null())
            .stdout(Stdio::piped()),
    )?;
    let pid = child.id() as i32;
    ensure!(
        in_netns(pid, netns)?,
        "server {pid} is not in network namespace {netns}"
    );
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .context("reading the server's ready line")?;
    ensure!(
        line.trim() == "ready",
        "server in {netns} said {line:?} instead of ready"
    );
    Ok(child)
}

/// Connects from `netns` to `addr:PORT`; returns the line the server sent, or
/// `error ...`.
fn connect_from(cluster: &Cluster, netns: &str, addr: &str) -> Result<String> {
    let out = cluster.run_in(
        netns,
        Command::new(python()).args(["-c", CLIENT, addr, &PORT.to_string()]),
    )?;
    ensure!(
        out.stderr.is_empty(),
        "client stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The namespaces `ip netns list` shows whose name starts with `prefix`.
fn listed_namespaces(prefix: &str) -> Result<Vec<String>> {
    let out = Command::new("ip").args(["netns", "list"]).output()?;
    ensure!(out.status.success(), "ip netns list: {out:?}");
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(prefix))
        .map(str::to_owned)
        .collect())
}

/// Whether the incarnation of `pid` that started at `start` is gone, zombie
/// included (a zombie's /proc/PID/stat would still show the same start time).
fn gone(pid: i32, start: Option<u64>) -> bool {
    start_time(pid).is_none() || start_time(pid) != start
}

#[test]
fn three_nodes_reach_each_other_and_vanish_on_drop() -> Result<()> {
    if not_root() {
        return Ok(());
    }
    let cluster = Cluster::new(3)?;
    let prefix = format!("{}-", cluster.tag());
    let nodes = cluster.nodes().to_vec();
    ensure!(nodes.len() == 3);
    let hub = cluster.hub_addr();
    for (i, node) in nodes.iter().enumerate() {
        let o = hub.octets();
        ensure!(node.addr == Ipv4Addr::new(o[0], o[1], o[2], 10 + i as u8));
        ensure!(node.name == format!("n{i}") && node.netns == format!("{prefix}n{i}"));
    }
    ensure!(hub.octets()[3] == 1 && cluster.hub_netns() == format!("{prefix}br"));
    let mut listed = listed_namespaces(&prefix)?;
    listed.sort();
    let mut expected: Vec<&str> = nodes.iter().map(|n| n.netns.as_str()).collect();
    expected.push(cluster.hub_netns());
    expected.sort();
    ensure!(listed == expected, "ip netns list shows {listed:?}");

    // `ip` inside a node sees the node's interface and address, not the host's.
    let out = cluster.run_in(
        &nodes[0].netns,
        Command::new("ip").args(["-o", "-4", "addr", "show", "dev", "eth0"]),
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && text.contains(&format!("inet {}/24", nodes[0].addr)),
        "ip addr in node 0: {out:?}"
    );

    let server_n1 = start_server(&cluster, &nodes[1].netns, nodes[1].addr, "node1")?;
    let server_hub = start_server(&cluster, cluster.hub_netns(), hub, "hub")?;
    let pids: Vec<(i32, Option<u64>)> = [&server_n1, &server_hub]
        .iter()
        .map(|c| (c.id() as i32, start_time(c.id() as i32)))
        .collect();

    // Node 0 reaches node 1 and the hub over the bridge...
    let got = connect_from(&cluster, &nodes[0].netns, &nodes[1].addr.to_string())?;
    ensure!(got == "node1", "node 0 -> node 1: {got}");
    let got = connect_from(&cluster, &nodes[0].netns, &hub.to_string())?;
    ensure!(got == "hub", "node 0 -> hub: {got}");
    // ... node 2 reaches node 1 too, and the hub reaches node 1 ...
    let got = connect_from(&cluster, &nodes[2].netns, &nodes[1].addr.to_string())?;
    ensure!(got == "node1", "node 2 -> node 1: {got}");
    let got = connect_from(&cluster, cluster.hub_netns(), &nodes[1].addr.to_string())?;
    ensure!(got == "node1", "hub -> node 1: {got}");
    // ... but its own loopback is its own: nothing listens there.
    let got = connect_from(&cluster, &nodes[0].netns, "127.0.0.1")?;
    ensure!(
        got.starts_with("error ConnectionRefusedError"),
        "node 0 -> its 127.0.0.1: {got}"
    );

    // A namespace of no cluster is refused.
    ensure!(cluster
        .spawn_in("not-a-cluster-netns", &mut Command::new("true"))
        .is_err());

    // The servers still run when the cluster goes; the drop kills and reaps them
    // (we keep the Child handles and never wait on them).
    drop(cluster);
    for &(pid, start) in &pids {
        ensure!(start.is_some(), "no start time for server {pid}");
        ensure!(gone(pid, start), "server {pid} survived the cluster");
    }
    let left = listed_namespaces(&prefix)?;
    ensure!(left.is_empty(), "namespaces left after drop: {left:?}");
    drop((server_n1, server_hub));
    Ok(())
}

#[test]
fn two_clusters_at_once_get_distinct_names_and_subnets() -> Result<()> {
    if not_root() {
        return Ok(());
    }
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| Cluster::new(2));
        let b = s.spawn(|| Cluster::new(2));
        (a.join().unwrap(), b.join().unwrap())
    });
    let (a, b) = (a?, b?);
    ensure!(a.tag() != b.tag(), "same tag {}", a.tag());
    let (ha, hb) = (a.hub_addr().octets(), b.hub_addr().octets());
    ensure!(ha[..3] != hb[..3], "same subnet: {ha:?} and {hb:?}");
    let mut names: Vec<&str> = [&a, &b]
        .iter()
        .flat_map(|c| {
            std::iter::once(c.hub_netns()).chain(c.nodes().iter().map(|n| n.netns.as_str()))
        })
        .collect();
    names.sort();
    names.dedup();
    ensure!(names.len() == 6, "namespace names collide: {names:?}");
    for c in [&a, &b] {
        for n in c.nodes() {
            let o = c.hub_addr().octets();
            ensure!(n.addr.octets()[..3] == o[..3], "{n:?} outside its subnet");
        }
    }

    // Each cluster is a network of its own: the same port serves both hubs.
    let _sa = start_server(&a, a.hub_netns(), a.hub_addr(), "hub a")?;
    let _sb = start_server(&b, b.hub_netns(), b.hub_addr(), "hub b")?;
    let got = connect_from(&a, &a.nodes()[1].netns, &a.hub_addr().to_string())?;
    ensure!(got == "hub a", "a: {got}");
    let got = connect_from(&b, &b.nodes()[0].netns, &b.hub_addr().to_string())?;
    ensure!(got == "hub b", "b: {got}");

    let prefixes = [format!("{}-", a.tag()), format!("{}-", b.tag())];
    drop(a);
    // Dropping one leaves the other whole.
    ensure!(namespaces_with_prefix(&prefixes[0]).is_empty());
    ensure!(namespaces_with_prefix(&prefixes[1]).len() == 3);
    let got = connect_from(&b, &b.nodes()[1].netns, &b.hub_addr().to_string())?;
    ensure!(got == "hub b", "b after a was dropped: {got}");
    drop(b);
    for p in &prefixes {
        let left = listed_namespaces(p)?;
        ensure!(left.is_empty(), "namespaces left after drop: {left:?}");
    }
    Ok(())
}

#[test]
fn a_panicking_test_still_tears_its_cluster_down() -> Result<()> {
    if not_root() {
        return Ok(());
    }
    let seen = std::sync::Mutex::new(None);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let cluster = Cluster::new(1).unwrap();
        // Never waited for here on purpose: the cluster's drop must kill and reap it.
        #[allow(clippy::zombie_processes)]
        let child = cluster
            .spawn_in(
                &cluster.nodes()[0].netns,
                Command::new("sleep").arg("1000").stdin(Stdio::null()),
            )
            .unwrap();
        let pid = child.id() as i32;
        *seen.lock().unwrap() = Some((cluster.tag().to_string(), pid, start_time(pid)));
        panic!("deliberate panic with a cluster alive");
    }));
    ensure!(result.is_err(), "the closure was meant to panic");
    let (tag, pid, start) = seen.into_inner().unwrap().context("cluster was built")?;
    ensure!(start.is_some() && gone(pid, start), "sleep {pid} survived");
    let left = listed_namespaces(&format!("{tag}-"))?;
    ensure!(left.is_empty(), "namespaces left after the panic: {left:?}");
    Ok(())
}
