//! Job checkpoints in a store: the job manifest, the proof that a checkpoint of a
//! whole job exists.
//!
//! Each rank's image is an ordinary image of the store (`images/<ckpt>.r<N>/`),
//! written by the agent of its node. The controller writes the job manifest,
//! `jobs/<ckpt>`, once every rank's image is written: that write is the commit
//! (../shared/DESIGN.md, "Data flow"). A rank image without a job manifest belongs to a
//! checkpoint that never committed; the controller deletes those on abort, and
//! lists only job manifests. Because the manifests live in the store, a controller
//! that starts again rebuilds its catalog by listing `jobs/`.

use serde::{Deserialize, Serialize};

use crate::codec::{self, CodecError};
use crate::objstore::{BlockingStore, ObjStoreError};

/// Directory of the job manifests in a store.
pub const JOBS_DIR: &str = "jobs";
/// Envelope kind of a job manifest.
pub const KIND_JOB: [u8; 4] = *b"JOBM";
/// Version of the job manifest format.
pub const JOB_FORMAT_VERSION: u32 = 1;

/// One rank of a job checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRank {
    pub rank: u32,
    /// Its image.
    pub image: crate::location::Location,
    /// The node it ran on, and its PID there.
    pub node: String,
    pub pid: i32,
    pub memory_bytes: u64,
    pub stored_bytes: u64,
    /// The kernel release of its node: a restore needs the same kernel build (the
    /// vDSO comes back at its old address).
    #[serde(default)]
    pub kernel: String,
    /// Its established TCP connections and listening addresses at the save.
    #[serde(default)]
    pub tcp: Vec<crate::proto::SavedConn>,
    #[serde(default)]
    pub listen: Vec<std::net::SocketAddr>,
    /// The addresses its UDP sockets are bound to.
    #[serde(default)]
    pub udp: Vec<std::net::SocketAddr>,
}

/// A committed checkpoint of a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobManifest {
    pub format_version: u32,
    /// The checkpoint's id (`<job>-<n>`).
    pub id: String,
    pub job: String,
    /// Owner of the job: only they, or root, may restore or remove it.
    pub uid: u32,
    pub created_unix: u64,
    /// The store the rank images are in.
    pub store: crate::objstore::StoreUrl,
    /// Whether the save killed the job.
    pub killed: bool,
    pub ranks: Vec<JobRank>,
    /// From the FREEZE sent to the last FROZEN + CAPTURED: how long the job stood
    /// still (leave-running saves), in microseconds.
    pub freeze_us: u64,
    /// From FREEZE to the commit.
    pub total_us: u64,
    /// The job's own policy for connections that leave it (as its ranks were
    /// attached), restored with it.
    #[serde(default)]
    pub external_tcp: Option<crate::proto::ExternalTcp>,
}

impl JobManifest {
    pub fn memory_bytes(&self) -> u64 {
        self.ranks.iter().map(|r| r.memory_bytes).sum()
    }
    pub fn stored_bytes(&self) -> u64 {
        self.ranks.iter().map(|r| r.stored_bytes).sum()
    }
    /// The nodes the ranks ran on, sorted, each once.
    pub fn nodes(&self) -> Vec<String> {
        let mut n: Vec<String> = self.ranks.iter().map(|r| r.node.clone()).collect();
        n.sort();
        n.dedup();
        n
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error(transparent)]
    Store(#[from] ObjStoreError),
    #[error("job manifest {id} is damaged: {source}")]
    Damaged {
        id: String,
        #[source]
        source: CodecError,
    },
    #[error("job manifest {id} is of format {found}; this ckpt reads format {JOB_FORMAT_VERSION}")]
    Format { id: String, found: u32 },
}

/// Writes `m`: the commit of its checkpoint.
pub fn put(store: &BlockingStore, m: &JobManifest) -> Result<(), CatalogError> {
    let bytes = codec::encode(KIND_JOB, m).map_err(|source| CatalogError::Damaged {
        id: m.id.clone(),
        source,
    })?;
    store.put_object(JOBS_DIR, &m.id, &bytes)?;
    Ok(())
}

/// Reads checkpoint `id`: `None` if it does not exist.
pub fn get(store: &BlockingStore, id: &str) -> Result<Option<JobManifest>, CatalogError> {
    let Some(bytes) = store.get_object(JOBS_DIR, id)? else {
        return Ok(None);
    };
    let m: JobManifest =
        codec::decode(KIND_JOB, &bytes).map_err(|source| CatalogError::Damaged {
            id: id.into(),
            source,
        })?;
    if m.format_version != JOB_FORMAT_VERSION {
        return Err(CatalogError::Format {
            id: id.into(),
            found: m.format_version,
        });
    }
    Ok(Some(m))
}

/// Every committed checkpoint of the store, oldest first; damaged manifests are
/// returned as errors beside the good ones, so one bad object does not hide the rest.
pub fn list(store: &BlockingStore) -> Result<Vec<Result<JobManifest, CatalogError>>, CatalogError> {
    let mut out = Vec::new();
    for id in store.list_objects(JOBS_DIR)? {
        match get(store, &id) {
            Ok(Some(m)) => out.push(Ok(m)),
            Ok(None) => {} // removed meanwhile
            Err(e) => out.push(Err(e)),
        }
    }
    out.sort_by_key(|r| match r {
        Ok(m) => (m.created_unix, m.id.clone()),
        Err(_) => (0, String::new()),
    });
    Ok(out)
}

/// Removes checkpoint `m`: the job manifest first (from then on it does not exist),
/// then its rank images' manifests. The chunks go at the next gc.
pub fn remove(store: &BlockingStore, m: &JobManifest) -> Result<(), CatalogError> {
    store.delete_object(JOBS_DIR, &m.id)?;
    for r in &m.ranks {
        store.delete_manifest(&crate::proto::rank_image_name(&m.id, r.rank))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objstore::StoreConfig;

    fn manifest(id: &str, created: u64) -> JobManifest {
        JobManifest {
            format_version: JOB_FORMAT_VERSION,
            id: id.into(),
            job: "j".into(),
            uid: 1000,
            created_unix: created,
            store: crate::objstore::StoreUrl::parse("file:///var/lib/ckpt").unwrap(),
            killed: false,
            ranks: vec![JobRank {
                rank: 0,
                image: crate::location::Location::parse("file:///var/lib/ckpt/j-1.r0").unwrap(),
                node: "a".into(),
                pid: 10,
                memory_bytes: 5,
                stored_bytes: 3,
                kernel: "6.18".into(),
                tcp: vec![],
                listen: vec![],
                udp: vec![],
            }],
            freeze_us: 1,
            total_us: 2,
            external_tcp: None,
        }
    }

    #[test]
    fn manifests_round_trip_list_in_order_and_damage_is_reported_by_name() {
        let store = BlockingStore::open("memory://", &StoreConfig::default()).unwrap();
        put(&store, &manifest("j-2", 20)).unwrap();
        put(&store, &manifest("j-1", 10)).unwrap();
        assert_eq!(get(&store, "j-1").unwrap().unwrap(), manifest("j-1", 10));
        assert!(get(&store, "nope").unwrap().is_none());
        let ids: Vec<String> = list(&store)
            .unwrap()
            .into_iter()
            .map(|r| r.unwrap().id)
            .collect();
        assert_eq!(ids, ["j-1", "j-2"]);
        store.put_object(JOBS_DIR, "j-3", b"garbage").unwrap();
        let all = list(&store).unwrap();
        assert_eq!(all.len(), 3);
        let bad = all.iter().find_map(|r| r.as_ref().err()).unwrap();
        assert!(bad.to_string().contains("j-3"), "{bad}");
        remove(&store, &manifest("j-1", 10)).unwrap();
        assert!(get(&store, "j-1").unwrap().is_none());
    }
}
