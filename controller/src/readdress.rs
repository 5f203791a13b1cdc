//! New addresses for the TCP connections of a job restored on other nodes
//! (../shared/DESIGN.md, "Consistent network cut"): a pure function of the checkpoint, the
//! placement and the new nodes' addresses.
//!
//! Both ends of a connection inside the job are found by their addresses (a
//! loopback address only within its node). Each end moves with its rank: an
//! address of the old node becomes the same port on the new node's address; a
//! loopback connection stays loopback if both ranks land on one node and becomes a
//! connection between the two new nodes' addresses otherwise. Both ends compute
//! mirror images of the same new 4-tuple. A connection whose peer is outside the
//! job keeps its remote address. Listening sockets: a wildcard or loopback address
//! stays; a node address moves with its rank.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};

use ckpt_shared::catalog::JobManifest;
use ckpt_shared::proto::{ConnRef, SavedConn};

/// What each rank must change.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Moves {
    pub conns: BTreeMap<u32, Vec<(ConnRef, ConnRef)>>,
    pub listen: BTreeMap<u32, Vec<(SocketAddr, SocketAddr)>>,
    /// For each connection inside the job (by its old 4-tuple, from each end): the
    /// other end's `rcv_nxt` at the cut, where the restored send queue starts.
    pub peer_recv: BTreeMap<u32, Vec<(ConnRef, u32)>>,
}

/// Which rank owns each end of the job's connections, by its 4-tuple from its
/// side, with the node for a loopback connection. The whole 4-tuple: the
/// connections accepted from one listener share their local address.
struct Ends<'a> {
    owner: HashMap<(String, SocketAddr, SocketAddr), (u32, &'a SavedConn)>,
}

impl<'a> Ends<'a> {
    fn key(node: &str, local: SocketAddr, remote: SocketAddr) -> (String, SocketAddr, SocketAddr) {
        let node = if local.ip().is_loopback() {
            node.to_string()
        } else {
            String::new()
        };
        (node, local, remote)
    }

    fn of(m: &'a JobManifest) -> Ends<'a> {
        let mut owner = HashMap::new();
        for r in &m.ranks {
            for c in &r.tcp {
                owner.insert(Ends::key(&r.node, c.local, c.remote), (r.rank, c));
            }
        }
        Ends { owner }
    }

    /// The rank holding the other end of `c`, an end on `node`, and that end.
    fn peer(&self, node: &str, c: &SavedConn) -> Option<(u32, &'a SavedConn)> {
        self.owner.get(&Ends::key(node, c.remote, c.local)).copied()
    }
}

/// The connections of `m` whose other end is not a rank of the job: (rank, its
/// node, the connection).
pub fn outside(m: &JobManifest) -> Vec<(u32, String, ConnRef)> {
    let ends = Ends::of(m);
    let mut out = Vec::new();
    for r in &m.ranks {
        for c in &r.tcp {
            if ends.peer(&r.node, c).is_none() {
                out.push((
                    r.rank,
                    r.node.clone(),
                    ConnRef {
                        local: c.local,
                        remote: c.remote,
                    },
                ));
            }
        }
    }
    out
}

/// Plans the moves of `m`'s connections for the placement `place` (rank → new
/// node); `ip_of(node, v6)` is a node's address of that family.
pub fn plan(
    m: &JobManifest,
    place: &BTreeMap<u32, String>,
    ip_of: &dyn Fn(&str, bool) -> Option<IpAddr>,
) -> Moves {
    let old_node: HashMap<u32, &str> = m.ranks.iter().map(|r| (r.rank, r.node.as_str())).collect();
    let ends = Ends::of(m);
    let moved = |rank: u32| place.get(&rank).map(|n| n.as_str()) != old_node.get(&rank).copied();
    let on_new = |rank: u32, a: SocketAddr| -> SocketAddr {
        match place.get(&rank).and_then(|n| ip_of(n, a.is_ipv6())) {
            Some(ip) => SocketAddr::new(ip, a.port()),
            None => a,
        }
    };
    // An endpoint of `rank`, given whether both ends share a new node.
    let addr_for = |rank: u32, a: SocketAddr, same_new: bool| -> SocketAddr {
        if a.ip().is_loopback() {
            if same_new {
                a
            } else {
                on_new(rank, a)
            }
        } else if moved(rank) {
            on_new(rank, a)
        } else {
            a
        }
    };
    let mut out = Moves::default();
    for r in &m.ranks {
        for c in &r.tcp {
            let found = ends.peer(&r.node, c);
            let peer = found.map(|(s, _)| s);
            let saved = c;
            let c = &ConnRef {
                local: c.local,
                remote: c.remote,
            };
            if let Some(rcv) = found.and_then(|(_, p)| p.recv_nxt) {
                if saved.send_una.is_some() {
                    out.peer_recv.entry(r.rank).or_default().push((*c, rcv));
                }
            }
            let new = match peer {
                Some(s) => {
                    let same_new = place.get(&r.rank) == place.get(&s);
                    ConnRef {
                        local: addr_for(r.rank, c.local, same_new),
                        remote: addr_for(s, c.remote, same_new),
                    }
                }
                // A peer outside the job stays where it is.
                None => ConnRef {
                    local: if moved(r.rank) && !c.local.ip().is_loopback() {
                        on_new(r.rank, c.local)
                    } else {
                        c.local
                    },
                    remote: c.remote,
                },
            };
            if new != *c {
                out.conns.entry(r.rank).or_default().push((*c, new));
            }
        }
        // Listening TCP sockets and bound UDP sockets alike.
        for a in r.listen.iter().chain(&r.udp) {
            if !a.ip().is_unspecified() && !a.ip().is_loopback() && moved(r.rank) {
                out.listen
                    .entry(r.rank)
                    .or_default()
                    .push((*a, on_new(r.rank, *a)));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ckpt_shared::catalog::{JobRank, JOB_FORMAT_VERSION};

    fn rank(rank: u32, node: &str, tcp: &[(&str, &str)], listen: &[&str]) -> JobRank {
        JobRank {
            rank,
            image: ckpt_shared::location::Location::Dir(Default::default()),
            node: node.into(),
            pid: 0,
            memory_bytes: 0,
            stored_bytes: 0,
            kernel: String::new(),
            tcp: tcp
                .iter()
                .map(|(l, r)| ckpt_shared::proto::SavedConn {
                    local: l.parse().unwrap(),
                    remote: r.parse().unwrap(),
                    send_queued: 0,
                    recv_queued: 0,
                    send_una: None,
                    recv_nxt: None,
                    external: false,
                })
                .collect(),
            listen: listen.iter().map(|a| a.parse().unwrap()).collect(),
            udp: vec![],
        }
    }

    fn job(ranks: Vec<JobRank>) -> JobManifest {
        JobManifest {
            format_version: JOB_FORMAT_VERSION,
            id: "j-1".into(),
            job: "j".into(),
            uid: 0,
            created_unix: 0,
            store: ckpt_shared::objstore::StoreUrl::File("/var/lib/ckpt".into()),
            killed: true,
            ranks,
            freeze_us: 0,
            total_us: 0,
            external_tcp: None,
        }
    }

    fn ips(node: &str, _v6: bool) -> Option<IpAddr> {
        Some(
            match node {
                "a" => "10.0.0.1",
                "b" => "10.0.0.2",
                "c" => "10.0.0.3",
                "d" => "10.0.0.4",
                _ => return None,
            }
            .parse()
            .unwrap(),
        )
    }

    fn place(p: &[(u32, &str)]) -> BTreeMap<u32, String> {
        p.iter().map(|(r, n)| (*r, n.to_string())).collect()
    }

    fn c(l: &str, r: &str) -> ConnRef {
        ConnRef {
            local: l.parse().unwrap(),
            remote: r.parse().unwrap(),
        }
    }

    #[test]
    fn both_ends_of_a_connection_get_mirror_images_of_one_new_tuple() {
        // Rank 0 on a serves :7000; rank 1 on b is connected to it.
        let m = job(vec![
            rank(
                0,
                "a",
                &[("10.0.0.1:7000", "10.0.0.2:40000")],
                &["0.0.0.0:7000"],
            ),
            rank(1, "b", &[("10.0.0.2:40000", "10.0.0.1:7000")], &[]),
        ]);
        let mv = plan(&m, &place(&[(0, "c"), (1, "d")]), &ips);
        assert_eq!(
            mv.conns[&0],
            vec![(
                c("10.0.0.1:7000", "10.0.0.2:40000"),
                c("10.0.0.3:7000", "10.0.0.4:40000")
            )]
        );
        assert_eq!(
            mv.conns[&1],
            vec![(
                c("10.0.0.2:40000", "10.0.0.1:7000"),
                c("10.0.0.4:40000", "10.0.0.3:7000")
            )]
        );
        assert!(mv.listen.is_empty(), "a wildcard listener stays a wildcard");
        // Restored where they were: nothing moves.
        assert_eq!(
            plan(&m, &place(&[(0, "a"), (1, "b")]), &ips),
            Moves::default()
        );
    }

    #[test]
    fn loopback_splits_onto_two_nodes_and_two_nodes_merge_onto_one() {
        let m = job(vec![
            rank(
                0,
                "a",
                &[("127.0.0.1:7000", "127.0.0.1:40000")],
                &["127.0.0.1:7000"],
            ),
            rank(1, "a", &[("127.0.0.1:40000", "127.0.0.1:7000")], &[]),
        ]);
        let mv = plan(&m, &place(&[(0, "c"), (1, "d")]), &ips);
        assert_eq!(mv.conns[&0][0].1, c("10.0.0.3:7000", "10.0.0.4:40000"));
        assert_eq!(mv.conns[&1][0].1, c("10.0.0.4:40000", "10.0.0.3:7000"));
        // Both onto one new node: loopback stays loopback.
        assert_eq!(
            plan(&m, &place(&[(0, "c"), (1, "c")]), &ips),
            Moves::default()
        );
        // Node addresses, both ranks onto one node: the new node's address both ends.
        let m2 = job(vec![
            rank(
                0,
                "a",
                &[("10.0.0.1:7000", "10.0.0.2:40000")],
                &["10.0.0.1:7000"],
            ),
            rank(1, "b", &[("10.0.0.2:40000", "10.0.0.1:7000")], &[]),
        ]);
        let mv = plan(&m2, &place(&[(0, "c"), (1, "c")]), &ips);
        assert_eq!(mv.conns[&0][0].1, c("10.0.0.3:7000", "10.0.0.3:40000"));
        assert_eq!(
            mv.listen[&0],
            vec![(
                "10.0.0.1:7000".parse().unwrap(),
                "10.0.0.3:7000".parse().unwrap()
            )]
        );
    }

    #[test]
    fn connections_accepted_from_one_listener_are_told_apart_by_their_remote_end() {
        // Ranks 1 and 2 (on b) both connected to rank 0's listener on a: rank 0
        // holds two connections with the same local address.
        let m = job(vec![
            rank(
                0,
                "a",
                &[
                    ("10.0.0.1:7000", "10.0.0.2:40000"),
                    ("10.0.0.1:7000", "10.0.0.2:40001"),
                ],
                &["0.0.0.0:7000"],
            ),
            rank(1, "b", &[("10.0.0.2:40000", "10.0.0.1:7000")], &[]),
            rank(2, "b", &[("10.0.0.2:40001", "10.0.0.1:7000")], &[]),
        ]);
        let mv = plan(&m, &place(&[(0, "c"), (1, "d"), (2, "d")]), &ips);
        assert_eq!(mv.conns[&1][0].1, c("10.0.0.4:40000", "10.0.0.3:7000"));
        assert_eq!(mv.conns[&2][0].1, c("10.0.0.4:40001", "10.0.0.3:7000"));
        assert_eq!(
            mv.conns[&0],
            vec![
                (
                    c("10.0.0.1:7000", "10.0.0.2:40000"),
                    c("10.0.0.3:7000", "10.0.0.4:40000")
                ),
                (
                    c("10.0.0.1:7000", "10.0.0.2:40001"),
                    c("10.0.0.3:7000", "10.0.0.4:40001")
                )
            ]
        );
    }

    #[test]
    fn each_end_learns_what_the_other_end_has_received() {
        let mut m = job(vec![
            rank(0, "a", &[("10.0.0.1:7000", "10.0.0.2:40000")], &[]),
            rank(1, "b", &[("10.0.0.2:40000", "10.0.0.1:7000")], &[]),
            // Outside the job: no other end to learn from.
            rank(2, "b", &[("10.0.0.2:40001", "192.0.2.9:11211")], &[]),
        ]);
        for (r, una, nxt) in [(0, 100, 5_000), (1, 4_000, 250), (2, 1, 1)] {
            m.ranks[r].tcp[0].send_una = Some(una);
            m.ranks[r].tcp[0].recv_nxt = Some(nxt);
        }
        let mv = plan(&m, &place(&[(0, "a"), (1, "b"), (2, "b")]), &ips);
        assert!(mv.conns.is_empty());
        assert_eq!(
            mv.peer_recv[&0],
            vec![(c("10.0.0.1:7000", "10.0.0.2:40000"), 250)]
        );
        assert_eq!(
            mv.peer_recv[&1],
            vec![(c("10.0.0.2:40000", "10.0.0.1:7000"), 5_000)]
        );
        assert!(!mv.peer_recv.contains_key(&2));
    }

    #[test]
    fn a_peer_outside_the_job_keeps_its_address() {
        let m = job(vec![rank(
            0,
            "a",
            &[("10.0.0.1:5000", "192.0.2.9:11211")],
            &[],
        )]);
        let mv = plan(&m, &place(&[(0, "b")]), &ips);
        assert_eq!(mv.conns[&0][0].1, c("10.0.0.2:5000", "192.0.2.9:11211"));
        assert_eq!(
            outside(&m),
            vec![(0, "a".to_string(), c("10.0.0.1:5000", "192.0.2.9:11211"))]
        );
        // Two ranks of one job over loopback on one node: nothing leaves the job;
        // the same loopback tuple on another node is another connection.
        let lo = job(vec![
            rank(0, "a", &[("127.0.0.1:7000", "127.0.0.1:40000")], &[]),
            rank(1, "a", &[("127.0.0.1:40000", "127.0.0.1:7000")], &[]),
            rank(2, "b", &[("127.0.0.1:7000", "127.0.0.1:40000")], &[]),
        ]);
        assert_eq!(
            outside(&lo),
            vec![(2, "b".to_string(), c("127.0.0.1:7000", "127.0.0.1:40000"))]
        );
    }
}
