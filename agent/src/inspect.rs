//! `ckpt-agent inspect`: an image for a person (text) and for a script (JSON).

use std::fmt::Write;

use ckpt_shared::image::{prot, Image, Mapping, MappingKind};
use serde_json::{json, Value};

pub fn human(b: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

fn prot_str(m: &Mapping) -> String {
    format!(
        "{}{}{}{}",
        if m.prot & prot::READ != 0 { 'r' } else { '-' },
        if m.prot & prot::WRITE != 0 { 'w' } else { '-' },
        if m.prot & prot::EXEC != 0 { 'x' } else { '-' },
        if m.shared { 's' } else { 'p' }
    )
}

fn kind_str(k: &MappingKind) -> String {
    match k {
        MappingKind::Anon { name } => name.clone().unwrap_or_else(|| "[anon]".into()),
        MappingKind::SharedAnon { shmem_id, .. } => format!("[shared anon #{shmem_id}]"),
        MappingKind::Object { shmem_id, .. } => format!("[object #{shmem_id}]"),
        MappingKind::File { path, .. } => path.clone(),
        MappingKind::Vdso => "[vdso]".into(),
        MappingKind::Vvar => "[vvar]".into(),
        MappingKind::Vsyscall => "[vsyscall]".into(),
    }
}

/// What backs a memory object, for `inspect --json`.
fn backing_json(b: &ckpt_shared::image::ShmBacking) -> Value {
    use ckpt_shared::image::ShmBacking;
    match b {
        ShmBacking::Anon => json!({"kind": "anon"}),
        ShmBacking::Memfd { name, seals } => json!({"kind": "memfd", "name": name, "seals": seals}),
        ShmBacking::Deleted { path, owner } => {
            json!({"kind": "deleted", "path": path, "mode": owner.mode})
        }
        ShmBacking::Tmpfs { path, owner } => {
            json!({"kind": "tmpfs", "path": path, "mode": owner.mode})
        }
        ShmBacking::SysV {
            key,
            shmid,
            owner,
            removed,
        } => {
            json!({"kind": "sysv", "key": key, "shmid": shmid, "mode": owner.mode, "removed": removed})
        }
    }
}

fn stored(m: &Mapping) -> u64 {
    m.data.iter().map(|e| e.bytes()).sum()
}

pub fn stats_json(img: &Image) -> Value {
    json!({
        "root_pid": img.root_pid,
        "processes": img.processes.len(),
        "threads": img.processes.iter().map(|p| p.threads.len()).sum::<usize>(),
        "freeze_us": img.stats.freeze_us,
        "total_us": img.stats.total_us,
        "memory_bytes": img.stats.memory_bytes,
        "stored_bytes": img.stats.stored_bytes,
        "chunks": img.stats.chunks,
        "reused_bytes": img.stats.reused_bytes,
        "parent": img.stats.parent,
    })
}

pub fn to_json(img: &Image) -> Value {
    let procs: Vec<Value> = img
        .processes
        .iter()
        .map(|p| {
            json!({
                "pid": p.pid, "ppid": p.ppid, "pgid": p.pgid, "sid": p.sid,
                "comm": p.threads.first().map(|t| t.comm.clone()),
                "exe": p.mm.exe, "cwd": p.cwd, "stopped": p.stopped,
                "uid": p.creds.uid, "gid": p.creds.gid,
                "threads": p.threads.iter().map(|t| json!({
                    "tid": t.tid, "comm": t.comm, "sigmask": format!("{:#x}", t.sigmask),
                    "pending": t.pending.iter().map(|s| s.signo).collect::<Vec<_>>(),
                    "rseq": t.rseq.is_some(), "sigaltstack": t.sigaltstack.size,
                })).collect::<Vec<_>>(),
                "mappings": p.mappings.iter().map(|m| json!({
                    "start": format!("{:#x}", m.start), "end": format!("{:#x}", m.end),
                    "prot": prot_str(m), "what": kind_str(&m.kind),
                    "stored_bytes": stored(m), "extents": m.data.len(),
                })).collect::<Vec<_>>(),
                "fds": p.fds.iter().map(|f| {
                    let of = &img.files[f.file as usize];
                    let mut v = crate::fd::json(&of.kind);
                    v["fd"] = json!(f.fd);
                    v["flags"] = json!(format!("{:#o}", of.flags));
                    v["cloexec"] = json!(f.cloexec);
                    v["file"] = json!(f.file);
                    v
                }).collect::<Vec<_>>(),
                "signal_handlers": p.sigactions.len(),
                "shared_pending": p.shared_pending.iter().map(|s| s.signo).collect::<Vec<_>>(),
                "posix_timers": p.posix_timers.len(),
            })
        })
        .collect();
    json!({
        "format_version": img.format_version,
        "arch": img.arch,
        "tool_version": img.tool_version,
        "created_unix": img.created_unix,
        "host": {"kernel": img.host.kernel, "hostname": img.host.hostname, "xcr0": format!("{:#x}", img.host.xcr0), "xsave_size": img.host.xsave_size},
        "root_pid": img.root_pid,
        "stats": stats_json(img),
        "processes": procs,
        "shared_memory": img.shmem.iter().map(|s| json!({"id": s.id, "size": s.size, "stored_bytes": s.data.iter().map(|e| e.bytes()).sum::<u64>(), "backing": backing_json(&s.backing)})).collect::<Vec<_>>(),
        "file_checks": img.file_checks.iter().map(|c| json!({"path": c.path, "size": c.size, "hashed": c.hash.is_some(), "written": c.written, "mapped_exec": c.mapped_exec})).collect::<Vec<_>>(),
    })
}

pub fn to_text(img: &Image) -> String {
    let mut o = String::new();
    let s = &img.stats;
    let _ = writeln!(
        o,
        "image format {} ({}), dumped on {} ({}), root PID {}",
        img.format_version, img.arch, img.host.hostname, img.host.kernel, img.root_pid
    );
    let _ = writeln!(
        o,
        "memory {} captured, {} stored in {} chunks; frozen {:.1} ms, dump {:.1} ms",
        human(s.memory_bytes),
        human(s.stored_bytes),
        s.chunks,
        s.freeze_us as f64 / 1e3,
        s.total_us as f64 / 1e3
    );
    if let Some(parent) = &s.parent {
        let _ = writeln!(
            o,
            "incremental: {} of unwritten pages taken from the chunks of {parent}",
            human(s.reused_bytes)
        );
    }
    for p in &img.processes {
        let comm = p.threads.first().map(|t| t.comm.as_str()).unwrap_or("?");
        let _ = writeln!(
            o,
            "\nPID {} ({comm}) ppid {} pgid {} sid {}{}  exe {}  cwd {}",
            p.pid,
            p.ppid,
            p.pgid,
            p.sid,
            if p.stopped { " [stopped]" } else { "" },
            p.mm.exe,
            p.cwd
        );
        let tids: Vec<String> = p
            .threads
            .iter()
            .map(|t| format!("{} ({})", t.tid, t.comm))
            .collect();
        let _ = writeln!(o, "  threads: {}", tids.join(", "));
        let _ = writeln!(o, "  mappings:");
        for m in &p.mappings {
            let _ = writeln!(
                o,
                "    {:>12x}-{:<12x} {} {:>10} stored  {}",
                m.start,
                m.end,
                prot_str(m),
                human(stored(m)),
                kind_str(&m.kind)
            );
        }
        let _ = writeln!(o, "  descriptors:");
        for f in &p.fds {
            let of = &img.files[f.file as usize];
            let what = crate::fd::describe(&of.kind);
            let _ = writeln!(
                o,
                "    {:>4}  {what}  flags {:#o}{}",
                f.fd,
                of.flags,
                if f.cloexec { " cloexec" } else { "" }
            );
        }
        let _ = writeln!(
            o,
            "  signals: {} handlers, {} pending (shared); timers: {} posix",
            p.sigactions.len(),
            p.shared_pending.len(),
            p.posix_timers.len()
        );
    }
    if !img.shmem.is_empty() {
        let _ = writeln!(o, "\nmemory objects:");
        for m in &img.shmem {
            let _ = writeln!(
                o,
                "  #{:<3} {:>10} {:>10} stored  {}",
                m.id,
                human(m.size),
                human(m.data.iter().map(|e| e.bytes()).sum()),
                backing_str(&m.backing)
            );
        }
    }
    o
}

/// One line for what backs a memory object.
fn backing_str(b: &ckpt_shared::image::ShmBacking) -> String {
    use ckpt_shared::image::ShmBacking;
    match b {
        ShmBacking::Anon => "shared anonymous".into(),
        ShmBacking::Memfd { name, seals } => format!("memfd {name} (seals {seals:#x})"),
        ShmBacking::Deleted { path, owner } => {
            format!("deleted file {path} (mode {:o})", owner.mode)
        }
        ShmBacking::Tmpfs { path, owner } => format!("tmpfs file {path} (mode {:o})", owner.mode),
        ShmBacking::SysV {
            key,
            shmid,
            owner,
            removed,
        } => format!(
            "System V segment {shmid} key {key:#x} (mode {:o}){}",
            owner.mode,
            if *removed { " marked for removal" } else { "" }
        ),
    }
}
