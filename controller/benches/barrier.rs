//! Protocol overhead of one job checkpoint: FREEZE to RESUME (every agent frozen and
//! captured, the dump work itself left out), for 10 and for 1,000 agents over
//! loopback QUIC with mutual TLS, against the real controller (`serve::start`).
//! The agents are tasks in this process (`tests/common/simagent.rs`) that answer
//! each step at once. Also shown: the whole save, through the STORE round and the
//! commit of the job manifest to a local store, as the CLI sees it.
//!
//!     cargo bench -p ckpt-controller --bench barrier
//!
//! `CKPT_BENCH_AGENTS` (default `10,1000`) and `CKPT_BENCH_REPS` (default 15).

use std::time::{Duration, Instant};

use ckpt_controller::api::{Done, Event, Request};
use ckpt_controller::{client, tls};
use ckpt_tests::stats::{median_range, Samples};

#[path = "../tests/common/ctl.rs"]
mod ctl;
#[path = "../tests/common/simagent.rs"]
mod simagent;

fn main() {
    let sizes: Vec<usize> = std::env::var("CKPT_BENCH_AGENTS")
        .unwrap_or_else(|_| "10,1000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let reps: usize = std::env::var("CKPT_BENCH_REPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15);
    let max = *sizes.iter().max().unwrap_or(&10);
    let c = ctl::start(&[], 30.0, |_| {});
    let t = Instant::now();
    for i in 0..max {
        tls::ca_issue(&c.certs, &format!("a{i:04}")).unwrap();
    }
    eprintln!(
        "issued {max} agent certificates in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let (certs, socket) = (c.certs.clone(), c.socket.clone());
    let ctl = &c.ctl;
    ADDR.set(ctl.addr).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!("protocol overhead of one save, FREEZE to RESUME, agents as tasks on loopback QUIC (2-core machine)");
    println!(
        "{:>7} {:>5}  {:>28}  {:>28}",
        "agents", "reps", "FREEZE->RESUME ms med (min-max)", "whole save ms med (min-max)"
    );
    let mut medians = Vec::new();
    for &n in &sizes {
        let job = format!("bench{n}");
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let ep = {
            let _g = rt.enter();
            ckpt_shared::wire::endpoint("127.0.0.1:0".parse().unwrap(), None).unwrap()
        };
        let t = Instant::now();
        for i in 0..n {
            let id = tls::Identity::agent(&certs, &format!("a{i:04}")).unwrap();
            let (ep, tx, job) = (ep.clone(), tx.clone(), job.clone());
            let name = format!("a{i:04}");
            rt.spawn(async move {
                let r = simagent::run(ep, &id, name.clone(), ctl_addr(), job, i as u32, tx).await;
                // The end of each round closes the endpoint: not an error.
                if let Err(e) = r.map_err(|e| format!("{e:#}")) {
                    if !e.contains("closed") {
                        eprintln!("agent {name}: {e}");
                    }
                }
            });
        }
        rt.block_on(async {
            for _ in 0..n {
                rx.recv().await.unwrap();
            }
        });
        // Wait until the controller shows every rank.
        loop {
            let ev = client::call(&socket, &Request::Jobs, |_| {}).unwrap();
            let have = match ev {
                Event::Done(Done { jobs, .. }) => jobs
                    .iter()
                    .find(|j| j.job == job)
                    .map(|j| j.ranks.len())
                    .unwrap_or(0),
                _ => 0,
            };
            if have == n {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "{n} agents connected and registered in {:.2} s",
            t.elapsed().as_secs_f64()
        );
        let mut freeze = Samples::new();
        let mut total = Samples::new();
        for _ in 0..reps {
            let ev = client::call(
                &socket,
                &Request::Save {
                    job: job.clone(),
                    kill: false,
                    wait: true,
                    external_tcp: None,
                },
                |_| {},
            )
            .unwrap();
            let Event::Done(Done {
                outcome: Some(o), ..
            }) = ev
            else {
                panic!("no outcome")
            };
            freeze.push(o.freeze_ms);
            total.push(o.total_ms);
        }
        let at_least_one = "CKPT_BENCH_REPS must be at least 1";
        println!(
            "{n:>7} {reps:>5}  {:>28}  {:>28}",
            median_range(&freeze, 1).expect(at_least_one),
            median_range(&total, 1).expect(at_least_one)
        );
        medians.push((n, freeze.median_high().expect(at_least_one)));
        ep.close(0u32.into(), b"done");
    }
    if let (Some(&(n0, a)), Some(&(n1, b))) = (medians.first(), medians.last()) {
        if n1 > n0 {
            println!(
                "{n1} agents cost {:.1}x the time of {n0} ({:.1} ms vs {:.1} ms); target for 1,000: <= 100 ms: {}",
                b / a.max(1e-9),
                b,
                a,
                if b <= 100.0 { "PASS" } else { "MISS" }
            );
        }
    }
    drop(rt);
    drop(c);
}

static ADDR: std::sync::OnceLock<std::net::SocketAddr> = std::sync::OnceLock::new();

fn ctl_addr() -> std::net::SocketAddr {
    *ADDR.get().expect("set")
}
