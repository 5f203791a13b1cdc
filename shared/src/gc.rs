//! Deleting images and the chunks nothing references, safely beside checkpoints in
//! progress, in a shared store (`file://` or `s3://`).
//!
//! The hazard: a checkpoint in progress finds chunk X already in the store and does
//! not upload it again, while a gc, seeing no manifest that references X, deletes it;
//! the checkpoint then commits a manifest naming a chunk that is gone. The protocol
//! that rules this out uses two kinds of marker objects and the store's
//! read-after-write consistency (S3 has it, and so does a local file system):
//!
//! ```text
//! <prefix>/pending/<image>.<pid>.<nanos>   a checkpoint in progress
//! <prefix>/gc/gc.<pid>.<nanos>             a gc in progress
//! ```
//!
//! - A checkpoint writes its `pending` marker *before* it asks the store about any
//!   chunk, then lists `gc/`: while a gc marker younger than the gc lease exists, it
//!   waits (and gives up, before anything is frozen, after a bound). It deletes its
//!   marker once its manifest is written, or when it fails.
//! - A gc writes its `gc` marker, then lists `pending/`: if a marker younger than the
//!   checkpoint lease exists, it deletes its own marker and stops, deleting nothing
//!   (run it again later). Otherwise it reads every manifest (one it cannot decode
//!   stops it: never delete when unsure), and deletes every chunk that none
//!   references.
//!
//! Each side writes its own marker before it reads the other's, so at least one of
//! them sees the other: either the gc stops, or the checkpoint waits until the gc is
//! over and only then looks at chunks. Ages are measured in the store's clock (the
//! modification time of the marker just written against the others'), so clocks of
//! the nodes do not matter.
//!
//! A crashed checkpoint leaves its marker: a gc treats one older than the checkpoint
//! lease (default 6 hours) as abandoned and deletes it. A checkpoint therefore must
//! not commit after its lease: it checks, just before it writes its manifest, that
//! its marker still exists and that less than the lease minus a margin has passed on
//! its own monotonic clock, and aborts otherwise. A crashed gc leaves its marker too;
//! checkpoints ignore one older than the gc lease (default 1 hour).
//!
//! Retention ([`prune`]) deletes manifests only; the chunks go at the next gc.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use crate::codec;
use crate::objstore::ObjectStoreBackend;
use crate::store::StoreError;

/// Marker directory of checkpoints in progress.
pub const PENDING: &str = "pending";
/// Marker directory of gcs in progress.
pub const GC: &str = "gc";

/// How long a marker counts as alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leases {
    /// A checkpoint's marker; a checkpoint that runs longer is aborted.
    pub checkpoint: Duration,
    /// A gc's marker.
    pub gc: Duration,
    /// How long a checkpoint waits for a running gc before it gives up.
    pub wait_for_gc: Duration,
}

impl Default for Leases {
    fn default() -> Self {
        Leases {
            checkpoint: Duration::from_secs(6 * 3600),
            gc: Duration::from_secs(3600),
            wait_for_gc: Duration::from_secs(600),
        }
    }
}

impl Leases {
    /// The defaults, with `CKPT_GC_WAIT_SECS` (how long a checkpoint waits for a
    /// running gc) taken from `lookup` when set there (the caller's environment:
    /// the library reads none itself).
    pub fn from_vars(lookup: impl Fn(&str) -> Option<String>) -> Self {
        let mut l = Leases::default();
        if let Some(s) = lookup("CKPT_GC_WAIT_SECS").and_then(|v| v.parse::<u64>().ok()) {
            l.wait_for_gc = Duration::from_secs(s);
        }
        l
    }
}

/// The margin a checkpoint keeps before its lease ends.
const LEASE_MARGIN: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error(transparent)]
    Store(#[from] StoreError),

    #[error(
        "gc of store {store} stopped before deleting anything: checkpoint(s) in progress \
         ({}); run it again once they are done",
        names.join(", ")
    )]
    CheckpointInProgress { store: String, names: Vec<String> },

    #[error(
        "a gc has been running on store {store} for longer than this checkpoint may wait \
         ({waited:?}); nothing was frozen: try again once it is done (or, if that gc \
         crashed, once its marker {marker} is older than the gc lease)"
    )]
    GcRunning {
        store: String,
        marker: String,
        waited: Duration,
    },

    #[error(
        "manifest of image {name:?} in store {store} cannot be decoded ({reason}); gc \
         deletes nothing while it cannot tell what that image references: remove the \
         image or repair the manifest first"
    )]
    BadManifest {
        store: String,
        name: String,
        reason: String,
    },

    #[error(
        "checkpoint {marker} in store {store} outlived its lease ({lease:?}) or its marker \
         was removed: a gc may have deleted chunks it relies on, so it is not committed"
    )]
    LeaseLost {
        store: String,
        marker: String,
        lease: Duration,
    },
}

/// A checkpoint registered in a store by [`begin_checkpoint`].
#[derive(Debug, Clone)]
pub struct Registration {
    pub marker: String,
    started: Instant,
    lease: Duration,
}

fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{prefix}.{}.{nanos}", std::process::id())
}

/// Registers a checkpoint of image `name` before it looks at any chunk, and waits
/// for a running gc to finish (see the module doc).
pub async fn begin_checkpoint(
    store: &ObjectStoreBackend,
    name: &str,
    leases: &Leases,
) -> Result<Registration, GcError> {
    let marker = unique(name);
    let started = Instant::now();
    let t0 = store.put_marker(PENDING, &marker).await?;
    loop {
        // "Now" in the store's clock: our marker's time plus what passed since.
        let now = t0 + started.elapsed().as_millis() as i64;
        let running: Vec<(String, i64)> = store
            .list_markers(GC)
            .await?
            .into_iter()
            .filter(|(_, t)| now - t < leases.gc.as_millis() as i64)
            .collect();
        let Some((gc_marker, _)) = running.into_iter().next() else {
            return Ok(Registration {
                marker,
                started,
                lease: leases.checkpoint,
            });
        };
        if started.elapsed() >= leases.wait_for_gc {
            let _ = store.delete_marker(PENDING, &marker).await;
            return Err(GcError::GcRunning {
                store: store.display_name().to_string(),
                marker: gc_marker,
                waited: started.elapsed(),
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Just before the manifest is written: the checkpoint is still inside its lease
/// and its marker is still there.
pub async fn check_checkpoint(
    store: &ObjectStoreBackend,
    reg: &Registration,
) -> Result<(), GcError> {
    let in_time = reg.started.elapsed() + LEASE_MARGIN.min(reg.lease / 2) < reg.lease;
    if !in_time || !store.has_marker(PENDING, &reg.marker).await? {
        return Err(GcError::LeaseLost {
            store: store.display_name().to_string(),
            marker: reg.marker.clone(),
            lease: reg.lease,
        });
    }
    Ok(())
}

/// The checkpoint is over (committed or failed): removes its marker.
pub async fn end_checkpoint(store: &ObjectStoreBackend, reg: &Registration) -> Result<(), GcError> {
    Ok(store.delete_marker(PENDING, &reg.marker).await?)
}

/// What a gc did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct GcReport {
    pub images: usize,
    pub chunks: usize,
    pub referenced: usize,
    pub deleted: usize,
    /// Markers of checkpoints older than their lease, deleted.
    pub abandoned_markers: Vec<String>,
}

/// Deletes every chunk that no manifest references, unless a checkpoint is in
/// progress (see the module doc).
pub async fn gc(store: &ObjectStoreBackend, leases: &Leases) -> Result<GcReport, GcError> {
    let marker = unique("gc");
    let now = store.put_marker(GC, &marker).await?;
    let out = sweep(store, leases, now).await;
    // The marker goes in every case; a failure to delete it only delays checkpoints
    // until its lease ends, so the sweep's own result is what is reported.
    let _ = store.delete_marker(GC, &marker).await;
    out
}

/// A checkpoint that failed removes the chunks it wrote itself (`chunks`, hex
/// names): a dump that filled the disk must give the space back. The same protocol
/// as [`gc`], narrowed to those chunks: a gc marker first, then, unless another
/// checkpoint than `own` is in progress (it may have found one of them in the store
/// and be about to reference it), every chunk of `chunks` that no manifest
/// references is deleted. With another checkpoint in progress nothing is deleted
/// and `Ok(None)` says so: the chunks are garbage for the next gc. Returns how many
/// were deleted.
pub async fn discard(
    store: &ObjectStoreBackend,
    leases: &Leases,
    own: Option<&Registration>,
    chunks: &[String],
) -> Result<Option<usize>, GcError> {
    if chunks.is_empty() {
        return Ok(Some(0));
    }
    let marker = unique("gc");
    let now = store.put_marker(GC, &marker).await?;
    let out = async {
        let others = store
            .list_markers(PENDING)
            .await?
            .into_iter()
            .any(|(m, t)| {
                Some(m.as_str()) != own.map(|r| r.marker.as_str())
                    && now - t < leases.checkpoint.as_millis() as i64
            });
        if others {
            return Ok(None);
        }
        let names = store.list_manifests().await?;
        let referenced = referenced_chunks(store, &names).await?;
        let mut deleted = 0;
        for c in chunks.iter().filter(|c| !referenced.contains(*c)) {
            store.delete_chunk(c).await?;
            deleted += 1;
        }
        Ok(Some(deleted))
    }
    .await;
    let _ = store.delete_marker(GC, &marker).await;
    out
}

async fn sweep(store: &ObjectStoreBackend, leases: &Leases, now: i64) -> Result<GcReport, GcError> {
    let mut report = GcReport::default();
    let mut active = Vec::new();
    for (m, t) in store.list_markers(PENDING).await? {
        if now - t < leases.checkpoint.as_millis() as i64 {
            active.push(m);
        } else {
            report.abandoned_markers.push(m);
        }
    }
    if !active.is_empty() {
        return Err(GcError::CheckpointInProgress {
            store: store.display_name().to_string(),
            names: active,
        });
    }
    for m in &report.abandoned_markers {
        store.delete_marker(PENDING, m).await?;
    }
    let names = store.list_manifests().await?;
    report.images = names.len();
    let referenced = referenced_chunks(store, &names).await?;
    report.referenced = referenced.len();
    let chunks = store.list_chunks().await?;
    report.chunks = chunks.len();
    for c in chunks.iter().filter(|c| !referenced.contains(*c)) {
        store.delete_chunk(c).await?;
        report.deleted += 1;
    }
    Ok(report)
}

/// The chunks (by hex name) that the images `names` reference. An image removed
/// since the listing references nothing any more.
async fn referenced_chunks(
    store: &ObjectStoreBackend,
    names: &[String],
) -> Result<HashSet<String>, GcError> {
    let mut referenced = HashSet::new();
    for name in names {
        let Some(img) = read_image(store, name).await? else {
            continue;
        };
        referenced.extend(img.extents().map(|e| e.chunk.hex()));
    }
    Ok(referenced)
}

/// The decoded manifest of image `name`; `None` if it is gone. One that cannot be
/// decoded is an error: a gc must not guess what it references.
async fn read_image(
    store: &ObjectStoreBackend,
    name: &str,
) -> Result<Option<crate::image::Image>, GcError> {
    let bytes = match store.get_manifest(name).await {
        Ok(b) => b,
        Err(StoreError::NoImage { .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    codec::decode_image(&bytes)
        .map(Some)
        .map_err(|e| GcError::BadManifest {
            store: store.display_name().to_string(),
            name: name.into(),
            reason: e.to_string(),
        })
}

/// The retention unit that image `name` belongs to in job `job`'s history, or `None`
/// if it is not the job's. The product writes two kinds of names:
///
/// - a job checkpoint's rank images, `<job>-<attempt>.r<rank>`
///   ([`crate::proto::rank_image_name`] of the checkpoint `<job>-<attempt>`): every
///   rank of one checkpoint is one unit, kept or removed together, and its job
///   manifest (`jobs/<job>-<attempt>`) with them;
/// - images dumped by hand, named as the help suggests, `<job>-<n>` or `<job>.<n>`:
///   each is a unit of its own.
///
/// `job1` does not claim `job10-…`: the job name must be followed by `-` and digits,
/// or by `.`.
pub fn retention_unit(job: &str, name: &str) -> Option<Unit> {
    let rest = name.strip_prefix(job)?;
    if let Some(tail) = rest.strip_prefix('.') {
        return (!tail.is_empty()).then(|| Unit::Image(name.to_string()));
    }
    let tail = rest.strip_prefix('-')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    match tail.split_once(".r") {
        None if digits(tail) => Some(Unit::Image(name.to_string())),
        Some((attempt, rank)) if digits(attempt) && digits(rank) => Some(Unit::Checkpoint(
            name[..job.len() + 1 + attempt.len()].to_string(),
        )),
        _ => None,
    }
}

/// What [`prune`] keeps or removes as one.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Unit {
    /// A job checkpoint (its id): its rank images and its job manifest.
    Checkpoint(String),
    /// One image dumped on its own.
    Image(String),
}

impl Unit {
    fn name(&self) -> &str {
        match self {
            Unit::Checkpoint(n) | Unit::Image(n) => n,
        }
    }
}

/// Retention: of job `job`'s checkpoints and images (see [`retention_unit`]), keeps
/// the `keep` newest (by the time their dump started, then by name) and deletes the
/// others: a job checkpoint's job manifest first (so it is never listed with ranks
/// missing), then its rank images' manifests. Returns the image names deleted,
/// oldest first. Their chunks go at the next [`gc`].
pub async fn prune(
    store: &ObjectStoreBackend,
    job: &str,
    keep: usize,
) -> Result<Vec<String>, GcError> {
    let mut units: std::collections::BTreeMap<Unit, (u64, Vec<String>)> = Default::default();
    for name in store.list_manifests().await? {
        let Some(unit) = retention_unit(job, &name) else {
            continue;
        };
        let Some(img) = read_image(store, &name).await? else {
            continue;
        };
        let u = units.entry(unit).or_default();
        u.0 = u.0.max(img.created_unix);
        u.1.push(name);
    }
    let mut dated: Vec<(u64, Unit, Vec<String>)> = units
        .into_iter()
        .map(|(u, (t, names))| (t, u, names))
        .collect();
    dated.sort_by(|a, b| (a.0, a.1.name()).cmp(&(b.0, b.1.name())));
    let drop_n = dated.len().saturating_sub(keep);
    let mut removed = Vec::new();
    for (_, unit, names) in dated.into_iter().take(drop_n) {
        if let Unit::Checkpoint(id) = &unit {
            store.delete_object(crate::catalog::JOBS_DIR, id).await?;
        }
        for name in names {
            store.delete_manifest(&name).await?;
            removed.push(name);
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod retention_tests {
    use super::{retention_unit, Unit};
    use crate::proto::rank_image_name;

    #[test]
    fn prune_finds_the_names_the_product_writes() {
        // A job checkpoint's rank images, named by the function the agents use.
        let r0 = rank_image_name("job1-1733000000123", 0);
        let r7 = rank_image_name("job1-1733000000123", 7);
        let ck = Unit::Checkpoint("job1-1733000000123".into());
        assert_eq!(retention_unit("job1", &r0), Some(ck.clone()));
        assert_eq!(retention_unit("job1", &r7), Some(ck));
        // Images dumped by hand, as the help names them.
        assert_eq!(
            retention_unit("job1", "job1-0001"),
            Some(Unit::Image("job1-0001".into()))
        );
        assert_eq!(
            retention_unit("job", "job.3"),
            Some(Unit::Image("job.3".into()))
        );
        // Another job's, or not a job's at all.
        for other in [
            "job10-0001",
            "job10-5.r0",
            "job1",
            "job1.",
            "job1-",
            "job1-x.r0",
            "job1-5.rx",
            "xjob1-5",
        ] {
            assert_eq!(retention_unit("job1", other), None, "{other}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_from_vars() {
        let l = Leases::from_vars(|k| (k == "CKPT_GC_WAIT_SECS").then(|| "7".into()));
        assert_eq!(l.wait_for_gc, Duration::from_secs(7));
        assert_eq!(l.gc, Leases::default().gc);
        assert_eq!(Leases::from_vars(|_| Some("x".into())), Leases::default());
    }
}
