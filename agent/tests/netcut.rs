//! The network lock (nftables) and the capture of TCP state (`TCP_REPAIR`), on real
//! connections over loopback inside a network namespace of the test's own (made by
//! `unshare` on the test's thread, so nothing outside it is touched).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use ckpt_agent::fd::tcp;
use ckpt_agent::netlock::{self, Conn, NetLock};

mod common;
use common::{conn_of, pair};

/// Runs `f` on a thread in a new network namespace with loopback up.
fn in_netns<T: Send>(f: impl FnOnce() -> T + Send) -> Option<T> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root (network namespaces, nftables, TCP_REPAIR)");
        return None;
    }
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: unshare of the network namespace affects this thread only.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare");
            let st = std::process::Command::new("ip")
                .args(["link", "set", "lo", "up"])
                .status()
                .unwrap();
            assert!(st.success());
            Some(f())
        })
        .join()
        .unwrap()
    })
}

fn inq(s: &TcpStream) -> usize {
    use std::os::fd::AsRawFd;
    let mut v: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    unsafe { libc::ioctl(s.as_raw_fd(), libc::FIONREAD, &mut v) };
    v as usize
}

fn read_n(s: &mut TcpStream, n: usize, timeout: Duration) -> Vec<u8> {
    s.set_read_timeout(Some(timeout)).unwrap();
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).unwrap();
    buf
}

#[test]
fn the_lock_holds_exactly_its_connections_and_lifting_it_loses_nothing() {
    in_netns(|| {
        let (mut a, mut b) = pair();
        let (mut c, mut d) = pair();
        a.write_all(b"hello").unwrap();
        assert_eq!(read_n(&mut b, 5, Duration::from_secs(5)), b"hello");
        let lock = NetLock::lock("t1", &[conn_of(&a)]).unwrap();
        assert_eq!(netlock::tables(), vec!["ckpt_t1".to_string()]);
        a.write_all(b"world").unwrap();
        b.write_all(b"back").unwrap();
        // Nothing crosses, either way.
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(inq(&b), 0, "a byte crossed the lock a->b");
        assert_eq!(inq(&a), 0, "a byte crossed the lock b->a");
        // Another connection is not held.
        c.write_all(b"free").unwrap();
        assert_eq!(read_n(&mut d, 4, Duration::from_secs(5)), b"free");
        lock.unlock().unwrap();
        assert!(netlock::tables().is_empty());
        // Retransmission brings everything, once.
        assert_eq!(read_n(&mut b, 5, Duration::from_secs(10)), b"world");
        assert_eq!(read_n(&mut a, 4, Duration::from_secs(10)), b"back");
        // A lock dropped without unlock is lifted too; stale tables are found.
        {
            let _l = NetLock::lock("t2", &[conn_of(&c)]).unwrap();
            assert_eq!(netlock::tables(), vec!["ckpt_t2".to_string()]);
        }
        assert!(netlock::tables().is_empty());
        // One table per attempt, a part per rank: the last part lifted takes the
        // table with it, and until then the other part still holds.
        let p0 = NetLock::lock_part("77", "r0", &[conn_of(&a)]).unwrap();
        let p1 = NetLock::lock_part("77", "r1", &[conn_of(&c)]).unwrap();
        assert_eq!(netlock::tables(), vec!["ckpt_77".to_string()]);
        p0.unlock().unwrap();
        assert_eq!(netlock::tables(), vec!["ckpt_77".to_string()]);
        c.write_all(b"held").unwrap();
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(inq(&d), 0, "the other part let a byte through");
        a.write_all(b"free").unwrap();
        assert_eq!(read_n(&mut b, 4, Duration::from_secs(5)), b"free");
        p1.unlock().unwrap();
        assert!(netlock::tables().is_empty());
        assert_eq!(read_n(&mut d, 4, Duration::from_secs(10)), b"held");
        // A table left behind is stale only once its owner is gone: this process
        // still runs, so its table stays; one whose owner (PID and start time) is
        // gone goes, and so does one with no owner at all.
        std::mem::forget(NetLock::lock("t3", &[conn_of(&c)]).unwrap());
        let me = std::process::id();
        let start = ckpt_tests::process::start_time(me as i32).unwrap();
        let dead = format!(
            "table inet ckpt_t4 {{\n\tcomment \"ckpt owner {me} {}\"\n}}\n\
             table inet ckpt_t5 {{\n}}\n",
            start + 1
        );
        let mut nft = std::process::Command::new("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        nft.stdin
            .take()
            .unwrap()
            .write_all(dead.as_bytes())
            .unwrap();
        assert!(nft.wait().unwrap().success());
        let mut stale = netlock::remove_stale();
        stale.sort();
        assert_eq!(stale, vec!["ckpt_t4".to_string(), "ckpt_t5".to_string()]);
        assert_eq!(netlock::tables(), vec!["ckpt_t3".to_string()]);
        assert_eq!(netlock::remove_own(), vec!["ckpt_t3".to_string()]);
        assert!(netlock::tables().is_empty());
    });
}

#[test]
fn capture_under_the_lock_reads_a_consistent_cut_and_disturbs_nothing() {
    in_netns(|| {
        let (mut a, mut b) = pair();
        let first: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        let second: Vec<u8> = (0..3000u32).map(|i| (i % 241) as u8 ^ 0x5a).collect();
        a.write_all(&first).unwrap();
        let t = Instant::now();
        while inq(&b) < first.len() {
            assert!(t.elapsed() < Duration::from_secs(5));
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(50)); // the ACK gets home
        let lock = NetLock::lock("cut", &[conn_of(&a)]).unwrap();
        a.write_all(&second).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let ca = tcp::capture(a.as_fd()).unwrap();
        let cb = tcp::capture(b.as_fd()).unwrap();
        // The receiver holds what was delivered; the sender what it may still
        // have to send; the sequence numbers meet.
        assert_eq!(cb.recv_queue, first);
        assert_eq!(ca.send_queue, second);
        assert_eq!(ca.send_seq.wrapping_sub(ca.send_una()), second.len() as u32);
        assert_eq!(cb.recv_seq, ca.send_una(), "the cut does not meet");
        assert_eq!(ca.recv_seq, cb.send_seq, "nothing flowed b->a");
        assert!(cb.send_queue.is_empty() && ca.recv_queue.is_empty());
        assert_eq!((ca.local, ca.remote), (cb.remote, cb.local));
        assert!(ca.mss > 0 && ca.timestamps && ca.sack, "{ca:?}");
        assert!(ca.snd_wscale.is_some() && ca.window.snd_wnd > 0, "{ca:?}");
        // Reading changed nothing: once the lock is lifted, b gets every byte.
        lock.unlock().unwrap();
        let all = read_n(&mut b, first.len() + second.len(), Duration::from_secs(10));
        assert_eq!(&all[..first.len()], &first[..]);
        assert_eq!(&all[first.len()..], &second[..]);
        b.write_all(b"ok").unwrap();
        assert_eq!(read_n(&mut a, 2, Duration::from_secs(5)), b"ok");
        // A connection that is not established is refused clearly.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let e = tcp::capture(l.as_fd()).unwrap_err().to_string();
        assert!(e.contains("not established"), "{e}");
    });
}

#[test]
fn a_captured_pair_is_rebuilt_on_new_addresses_and_carries_on_byte_for_byte() {
    in_netns(|| {
        let (mut a, mut b) = pair();
        a.write_all(b"first").unwrap();
        let t = Instant::now();
        while inq(&b) < 5 {
            assert!(t.elapsed() < Duration::from_secs(5));
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(50));
        let lock = NetLock::lock("mv", &[conn_of(&a)]).unwrap();
        let second: Vec<u8> = (0..3000u32).map(|i| (i * 7 % 256) as u8).collect();
        a.write_all(&second).unwrap();
        b.write_all(b"third").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let ca = tcp::capture(a.as_fd()).unwrap();
        let cb = tcp::capture(b.as_fd()).unwrap();
        // The old ends vanish without a word to anyone.
        tcp::silence(a.as_fd()).unwrap();
        tcp::silence(b.as_fd()).unwrap();
        drop((a, b));
        // Both ends again, on other addresses (as on other nodes).
        let na: std::net::SocketAddr = "127.0.0.2:4000".parse().unwrap();
        let nb: std::net::SocketAddr = "127.0.0.3:5000".parse().unwrap();
        let t = Instant::now();
        // Both ends exist (in repair mode) before either speaks: an end that spoke
        // first would be reset by a host that has no peer for it yet.
        let ra = tcp::rebuild(&ca, na, nb).unwrap();
        let rb = tcp::rebuild(&cb, nb, na).unwrap();
        lock.unlock().unwrap();
        let mut b2 = TcpStream::from(rb.finish().unwrap());
        let mut a2 = TcpStream::from(ra.finish().unwrap());
        assert_eq!(
            (a2.local_addr().unwrap(), a2.peer_addr().unwrap()),
            (na, nb)
        );
        let got = read_n(&mut b2, 5 + second.len(), Duration::from_secs(10));
        let first_flow = t.elapsed();
        assert_eq!(&got[..5], b"first", "the receive queue came back");
        assert_eq!(&got[5..], &second[..], "the send queue came back");
        assert_eq!(read_n(&mut a2, 5, Duration::from_secs(10)), b"third");
        eprintln!(
            "rebuilt pair: all queued bytes delivered {first_flow:?} after the rebuild began"
        );
        // No retransmission timer in the way (its minimum is 200 ms).
        assert!(first_flow < Duration::from_millis(150), "{first_flow:?}");
        // And the connection simply goes on, both ways.
        a2.write_all(b"more").unwrap();
        assert_eq!(read_n(&mut b2, 4, Duration::from_secs(5)), b"more");
        b2.write_all(b"reply").unwrap();
        assert_eq!(read_n(&mut a2, 5, Duration::from_secs(5)), b"reply");
    });
}

fn nft(script: &str) {
    use std::process::{Command, Stdio};
    let mut c = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(c.wait().unwrap().success(), "nft: {script}");
}

#[test]
fn bytes_in_both_queues_at_the_cut_are_sent_once_and_nothing_stalls() {
    in_netns(|| {
        let (mut a, mut b) = pair();
        // b's acknowledgements do not get home: what a sends reaches b's queue
        // and stays in a's too, as when the lock falls between the two.
        let (ab, bb) = (conn_of(&a), conn_of(&b));
        nft(&format!(
            "table inet ckpt_acks {{\n chain out {{\n type filter hook output priority -300;\n \
             tcp sport {} tcp dport {} drop\n }}\n}}\n",
            bb.local.port(),
            bb.remote.port()
        ));
        let first: Vec<u8> = (0..2000u32).map(|i| (i % 253) as u8).collect();
        let second: Vec<u8> = (0..1000u32).map(|i| (i % 239) as u8 ^ 0x33).collect();
        a.write_all(&first).unwrap();
        let t = Instant::now();
        while inq(&b) < first.len() {
            assert!(t.elapsed() < Duration::from_secs(5));
            std::thread::sleep(Duration::from_millis(5));
        }
        let lock = NetLock::lock("ov", &[ab]).unwrap();
        nft("delete table inet ckpt_acks");
        a.write_all(&second).unwrap();
        b.write_all(b"from b").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let ca = tcp::capture(a.as_fd()).unwrap();
        let cb = tcp::capture(b.as_fd()).unwrap();
        assert_eq!(cb.recv_queue, first);
        assert_eq!(ca.send_queue.len(), first.len() + second.len());
        assert_eq!(ckpt_agent::fd::overlap(&ca, cb.recv_seq), Some(first.len()));
        assert_eq!(ckpt_agent::fd::overlap(&cb, ca.recv_seq), None);
        tcp::silence(a.as_fd()).unwrap();
        tcp::silence(b.as_fd()).unwrap();
        drop((a, b));
        let ta = ckpt_agent::fd::trimmed(&ca, Some(cb.recv_seq));
        let tb = ckpt_agent::fd::trimmed(&cb, Some(ca.recv_seq));
        assert_eq!(ta.send_queue, second, "the sender keeps only what b lacks");
        let t = Instant::now();
        // On new addresses (as a restore on other nodes): rebuilding on the old
        // 4-tuple right after closing the old ends failed once in 11 runs with
        // EADDRNOTAVAIL (the old end still hashed), which is not what this tests.
        let na: std::net::SocketAddr = "127.0.0.4:4000".parse().unwrap();
        let nb: std::net::SocketAddr = "127.0.0.5:5000".parse().unwrap();
        let ra = tcp::rebuild(&ta, na, nb).unwrap();
        let rb = tcp::rebuild(&tb, nb, na).unwrap();
        lock.unlock().unwrap();
        let mut b2 = TcpStream::from(rb.finish().unwrap());
        let mut a2 = TcpStream::from(ra.finish().unwrap());
        let got = read_n(&mut b2, first.len() + second.len(), Duration::from_secs(10));
        assert_eq!(&got[..first.len()], &first[..]);
        assert_eq!(&got[first.len()..], &second[..]);
        assert_eq!(read_n(&mut a2, 6, Duration::from_secs(10)), b"from b");
        // Both ways at once, right after: an end whose peer acknowledges bytes it
        // has not sent drops that peer's segments, which shows up here as a stall.
        a2.write_all(b"ping").unwrap();
        b2.write_all(b"pong").unwrap();
        assert_eq!(read_n(&mut b2, 4, Duration::from_secs(10)), b"ping");
        assert_eq!(read_n(&mut a2, 4, Duration::from_secs(10)), b"pong");
        let all = t.elapsed();
        eprintln!(
            "overlapping cut: everything delivered both ways {all:?} after the rebuild began"
        );
        assert!(all < Duration::from_millis(150), "stalled: {all:?}");
    });
}

#[test]
fn an_ipv6_connection_is_locked_read_and_rebuilt_on_other_addresses() {
    in_netns(|| {
        for a in ["fd00::a", "fd00::b"] {
            let st = std::process::Command::new("ip")
                .args([
                    "-6",
                    "addr",
                    "add",
                    &format!("{a}/128"),
                    "dev",
                    "lo",
                    "nodad",
                ])
                .status()
                .unwrap();
            assert!(st.success());
        }
        let l = TcpListener::bind("[::1]:0").unwrap();
        let mut a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut b, _) = l.accept().unwrap();
        a.write_all(b"six").unwrap();
        assert_eq!(read_n(&mut b, 3, Duration::from_secs(5)), b"six");
        std::thread::sleep(Duration::from_millis(50));
        let lock = NetLock::lock("v6", &[conn_of(&a)]).unwrap();
        a.write_all(b"held back").unwrap();
        b.write_all(b"and back").unwrap();
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(inq(&b), 0, "a byte crossed the IPv6 lock");
        assert_eq!(inq(&a), 0, "a byte crossed the IPv6 lock");
        let ca = tcp::capture(a.as_fd()).unwrap();
        let cb = tcp::capture(b.as_fd()).unwrap();
        assert!(ca.local.is_ipv6() && ca.send_queue == b"held back");
        assert_eq!(cb.send_queue, b"and back");
        tcp::silence(a.as_fd()).unwrap();
        tcp::silence(b.as_fd()).unwrap();
        drop((a, b));
        let na: std::net::SocketAddr = "[fd00::a]:4000".parse().unwrap();
        let nb: std::net::SocketAddr = "[fd00::b]:5000".parse().unwrap();
        let lock2 = NetLock::lock(
            "v6r",
            &[Conn {
                local: na,
                remote: nb,
            }],
        )
        .unwrap();
        let ra = tcp::rebuild(&ca, na, nb).unwrap();
        let rb = tcp::rebuild(&cb, nb, na).unwrap();
        lock.unlock().unwrap();
        lock2.unlock().unwrap();
        let mut b2 = TcpStream::from(rb.finish().unwrap());
        let mut a2 = TcpStream::from(ra.finish().unwrap());
        assert_eq!(a2.peer_addr().unwrap(), nb);
        assert_eq!(read_n(&mut b2, 9, Duration::from_secs(10)), b"held back");
        assert_eq!(read_n(&mut a2, 8, Duration::from_secs(10)), b"and back");
        a2.write_all(b"more").unwrap();
        assert_eq!(read_n(&mut b2, 4, Duration::from_secs(5)), b"more");
    });
}
