//! Chunk stores named by URL, on the `object_store` crate: `file:///path`,
//! `s3://bucket/prefix` (any S3-compatible endpoint) and `memory://` (unit tests).
//!
//! ```text
//! <prefix>/chunks/<first 2 hex>/<64 hex>   one object per distinct chunk
//! <prefix>/images/<name>/manifest.ckpt     one manifest per image, written last
//! ```
//!
//! A chunk object is byte for byte what [`crate::store::ChunkStore`] writes
//! ([`crate::chunkfmt`]), under the same `chunks/<2 hex>/<64 hex>` names, so a
//! directory can be filled by one and read by the other, and copying a directory
//! store into a bucket (`aws s3 sync`, `rclone`) gives a valid S3 store.
//!
//! Why `object_store` and not an S3 SDK: it speaks S3 (SigV4, path-style or
//! virtual-hosted addressing, any endpoint), a local directory and memory through one
//! trait, so one code path and one test suite cover all three; it retries transient
//! errors itself (see [`RetryPolicy`]); and it is a fraction of the size of the AWS
//! SDK. Its S3 client sends plain `PUT`s (atomic: an object is never seen half written)
//! and is used here for objects of one chunk (about 1 MiB), so multipart uploads are
//! never needed.
//!
//! Writing, and what a commit is:
//! - [`ObjectStoreBackend::put_chunk`] asks first whether the object exists (`HEAD`)
//!   and uploads only when it does not: the same pages across ranks or checkpoints
//!   cost one request, not one upload. Two writers racing on one new chunk may both
//!   upload it; the content is the same (content addressing), so either copy is right.
//! - A `PUT` that returned is durable on S3. For `file://` the local backend is opened
//!   with `fsync` on, so every object is on disk when its put returns: this costs the
//!   write throughput that [`crate::store::ChunkStore`] saves with its batched sync,
//!   and `ChunkStore` stays the fast path for a local directory.
//! - The manifest is the commit point: the caller writes it with
//!   [`ObjectStoreBackend::put_manifest`] after every chunk it names was put. Before it
//!   exists there is no image, only garbage for a later gc.
//!
//! Every read is verified (header, length, BLAKE3 of the uncompressed bytes), and an
//! object larger than its chunk could be is refused before it is fetched: a store is
//! shared, so nothing read from it is trusted.
//!
//! Configuration of S3 comes from an [`S3Config`] (the controller's config file) and,
//! for what it leaves unset, the variables and shared files of the AWS CLI
//! (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_PROFILE`, `~/.aws/credentials`, ...: the
//! table is in [`S3Config`]'s documentation). With a custom endpoint
//! requests use path-style addressing (`http://host:port/bucket/key`), which every
//! S3-compatible server accepts; plain `http` is allowed only when the endpoint is
//! `http://`.
//!
//! The API is async; [`BlockingStore`] wraps it for plain threads (the agent's dump
//! workers), with a runtime of its own. Compression and verification run on the
//! thread that polls the call: in [`BlockingStore`] that is the caller's thread, so a
//! dump's CPU work stays on its workers and off the runtime's two I/O threads.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures_util::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path as ObjPath;
use object_store::{
    BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig,
};

use crate::awsconfig::{self, AwsConfigError};
use crate::chunkfmt::{self, ChunkFmtError};
use crate::codec;
use crate::image::ChunkRef;
pub use crate::store::IMAGES_DIR;
pub use crate::store::{check_image_name, StoreError, MAX_IMAGE_NAME, STREAM_STEP};
use crate::store::{ChunkBackend, ChunkSink, PutOutcome, CHUNKS_DIR, MANIFEST_NAME};

/// The errors of an object store are those of every chunk store: this is the name
/// they had when the two stores had an enum each.
pub type ObjStoreError = StoreError;

/// A parsed store URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// `file:///path`: a local directory (created if missing).
    File(std::path::PathBuf),
    /// `memory://`: a new, empty store in this process.
    Memory,
    /// `s3://bucket/prefix`: objects under `prefix/` (which may be empty) in `bucket`.
    S3 { bucket: String, prefix: String },
}

impl StoreUrl {
    /// Parses a store URL, with an error that says which forms are accepted.
    pub fn parse(s: &str) -> Result<Self, StoreError> {
        let url = url::Url::parse(s).map_err(|_| StoreError::NotAUrl { url: s.into() })?;
        let bad = |reason: &str| StoreError::BadUrl {
            url: s.into(),
            reason: reason.into(),
        };
        if url.query().is_some() || url.fragment().is_some() {
            return Err(bad("a store URL has no query (?...) or fragment (#...)"));
        }
        match url.scheme() {
            "file" => {
                if url.host().is_some() {
                    return Err(bad(
                        "a file URL names a local directory: file:///absolute/path",
                    ));
                }
                let path = url
                    .to_file_path()
                    .map_err(|()| bad("a file URL needs an absolute path: file:///path"))?;
                Ok(StoreUrl::File(path))
            }
            "memory" => {
                if url.path().trim_matches('/').is_empty() && url.host().is_none() {
                    Ok(StoreUrl::Memory)
                } else {
                    Err(bad("a memory store has no name or path: memory://"))
                }
            }
            "s3" => {
                let bucket = url.host_str().unwrap_or_default();
                if bucket.is_empty() {
                    return Err(bad("no bucket: s3://bucket/prefix"));
                }
                if url.port().is_some() || !url.username().is_empty() || url.password().is_some() {
                    return Err(bad("an s3 URL names a bucket only; set the endpoint with \
                         AWS_ENDPOINT_URL and the credentials with AWS_ACCESS_KEY_ID and \
                         AWS_SECRET_ACCESS_KEY"));
                }
                // The URL parser resolves "a/../b" to "b": refuse it instead, since a
                // prefix that means another one is a typo more often than not.
                if s.split(['/', '?', '#'])
                    .any(|seg| seg == "." || seg == "..")
                {
                    return Err(bad("no . or .. segments in the prefix"));
                }
                let prefix = url.path().trim_matches('/');
                let prefix =
                    percent_decode(prefix).ok_or_else(|| bad("bad %-escape in the prefix"))?;
                if !prefix.is_empty() {
                    ObjPath::parse(&prefix).map_err(|e| bad(&format!("bad prefix: {e}")))?;
                }
                Ok(StoreUrl::S3 {
                    bucket: bucket.to_string(),
                    prefix,
                })
            }
            other => Err(StoreError::UnsupportedScheme {
                scheme: other.to_string(),
            }),
        }
    }
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreUrl::File(p) => write!(f, "file://{}", p.display()),
            StoreUrl::Memory => f.write_str("memory://"),
            StoreUrl::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            StoreUrl::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
        }
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// How to reach an S3-compatible endpoint, and with which credentials. Each field
/// left unset is filled from the environment the caller passes, by
/// [`S3Config::fill_from`] (which only looks variables up), and then from the AWS
/// shared files, by [`S3Config::resolve`] (which reads them, when the store is
/// opened). The variables are those of the AWS CLI:
///
/// | Variable | Meaning |
/// |---|---|
/// | `AWS_ENDPOINT_URL_S3`, then `AWS_ENDPOINT_URL` | `http(s)://host:port` of a store other than AWS (path-style addressing) |
/// | `AWS_REGION`, then `AWS_DEFAULT_REGION` | region (default `us-east-1`) |
/// | `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` | static keys |
/// | `AWS_SESSION_TOKEN` | the session token of temporary keys |
/// | `AWS_CA_BUNDLE` | a PEM file of root certificates to trust besides the system's |
/// | `AWS_PROFILE` | the profile of the shared files (default `default`); one named that exists in neither file is an error |
/// | `AWS_SHARED_CREDENTIALS_FILE` | the credentials file (default `$HOME/.aws/credentials`): `[NAME]`, `aws_access_key_id`, `aws_secret_access_key`, `aws_session_token` |
/// | `AWS_CONFIG_FILE` | the config file (default `$HOME/.aws/config`): `[profile NAME]` or `[default]`, `region`, `endpoint_url`, an `s3 =` block's `endpoint_url`, `ca_bundle` |
/// | `AWS_WEB_IDENTITY_TOKEN_FILE`, `AWS_ROLE_ARN`, `AWS_ROLE_SESSION_NAME` | assume a role with a web identity token (EKS, GitHub Actions); `AWS_ENDPOINT_URL_STS` for another STS |
/// | `AWS_CONTAINER_CREDENTIALS_RELATIVE_URI` | ECS task credentials |
/// | `AWS_CONTAINER_CREDENTIALS_FULL_URI`, `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE` | EKS Pod Identity credentials (both needed) |
/// | `CKPT_S3_INSTANCE_ROLE=1` | with AWS and nothing above: this EC2 instance's role (off by default) |
///
/// Credentials are taken, as the AWS CLI takes them, from the first of: static keys
/// (set here or from the environment), the profile's keys, web identity, container
/// credentials, the instance role. Region and endpoint: set here or in the
/// environment, else the profile's. [`credentials_source`](Self::credentials_source)
/// records which one won, for errors and logs. Not supported: a profile's
/// `role_arn`/`source_profile` (assume role), `credential_process`, SSO.
///
/// Serialized whole, secrets included, for the controller to send to its agents
/// over their mutual-TLS channel; `Debug` redacts the secrets, so that a logged
/// configuration does not give them away. Paths (files, the CA bundle) are read
/// where the store is opened.
#[derive(Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct S3Config {
    /// `http(s)://host:port` of a non-AWS endpoint; `None` is AWS.
    pub endpoint: Option<String>,
    /// Region (default `us-east-1`).
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    /// The session token that goes with temporary keys.
    pub session_token: Option<String>,
    /// Whether plain `http` is allowed; by default only when the endpoint is `http://`.
    pub allow_http: Option<bool>,
    /// With AWS and no other credentials: use the instance role's credentials from
    /// the metadata service. Off by default.
    pub instance_role: bool,
    /// A PEM file of extra root certificates.
    pub ca_bundle: Option<std::path::PathBuf>,
    /// The profile named by the user; `None` is `default`, which may be missing.
    pub profile: Option<String>,
    /// The shared credentials file; `None` reads none.
    pub credentials_file: Option<std::path::PathBuf>,
    /// The shared config file; `None` reads none.
    pub config_file: Option<std::path::PathBuf>,
    /// Web identity: the file of the token, re-read at each refresh.
    pub web_identity_token_file: Option<std::path::PathBuf>,
    /// Web identity: the role to assume.
    pub role_arn: Option<String>,
    /// Web identity: the session's name (object_store's default when `None`).
    pub role_session_name: Option<String>,
    /// Web identity: the STS endpoint (`https://sts.REGION.amazonaws.com` if `None`).
    pub sts_endpoint: Option<String>,
    /// ECS: the path of the task's credentials at 169.254.170.2.
    pub container_credentials_relative_uri: Option<String>,
    /// EKS Pod Identity: the URL of the credentials.
    pub container_credentials_full_uri: Option<String>,
    /// EKS Pod Identity: the file of the token that authorizes the request.
    pub container_authorization_token_file: Option<std::path::PathBuf>,
    /// Where the credentials come from: set by [`fill_from`](Self::fill_from) for
    /// keys from the environment, by [`resolve`](Self::resolve) for the others.
    pub credentials_source: Option<CredentialsSource>,
}

/// Where an [`S3Config`]'s credentials come from, in the order they are tried.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum CredentialsSource {
    /// Keys set in the configuration itself (the controller's file, a test).
    Configuration,
    /// `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`.
    Environment,
    /// The keys of this profile of the shared files.
    Profile(String),
    /// `AWS_WEB_IDENTITY_TOKEN_FILE` and `AWS_ROLE_ARN`.
    WebIdentity,
    /// `AWS_CONTAINER_CREDENTIALS_RELATIVE_URI` or `_FULL_URI`.
    Container,
    /// The EC2 instance's role (`CKPT_S3_INSTANCE_ROLE=1`).
    InstanceRole,
}

impl fmt::Display for CredentialsSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CredentialsSource::Configuration => f.write_str("configuration"),
            CredentialsSource::Environment => f.write_str("environment"),
            CredentialsSource::Profile(name) => write!(f, "profile {name}"),
            CredentialsSource::WebIdentity => f.write_str("web identity"),
            CredentialsSource::Container => f.write_str("container credentials"),
            CredentialsSource::InstanceRole => f.write_str("instance role"),
        }
    }
}

/// What `Debug` prints instead of a secret.
const REDACTED: &str = "<redacted>";

impl fmt::Debug for S3Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Destructured, so that a new field cannot be forgotten here (and a new
        // secret shown by accident).
        let S3Config {
            endpoint,
            region,
            access_key_id,
            secret_access_key,
            session_token,
            allow_http,
            instance_role,
            ca_bundle,
            profile,
            credentials_file,
            config_file,
            web_identity_token_file,
            role_arn,
            role_session_name,
            sts_endpoint,
            container_credentials_relative_uri,
            container_credentials_full_uri,
            container_authorization_token_file,
            credentials_source,
        } = self;
        let redact = |s: &Option<String>| s.as_ref().map(|_| REDACTED);
        f.debug_struct("S3Config")
            .field("endpoint", endpoint)
            .field("region", region)
            .field("access_key_id", access_key_id)
            .field("secret_access_key", &redact(secret_access_key))
            .field("session_token", &redact(session_token))
            .field("allow_http", allow_http)
            .field("instance_role", instance_role)
            .field("ca_bundle", ca_bundle)
            .field("profile", profile)
            .field("credentials_file", credentials_file)
            .field("config_file", config_file)
            .field("web_identity_token_file", web_identity_token_file)
            .field("role_arn", role_arn)
            .field("role_session_name", role_session_name)
            .field("sts_endpoint", sts_endpoint)
            .field(
                "container_credentials_relative_uri",
                container_credentials_relative_uri,
            )
            .field(
                "container_credentials_full_uri",
                container_credentials_full_uri,
            )
            .field(
                "container_authorization_token_file",
                container_authorization_token_file,
            )
            .field(
                "credentials_source",
                &credentials_source.as_ref().map(|s| s.to_string()),
            )
            .finish()
    }
}

impl S3Config {
    /// Fills each unset field from `lookup` (an environment); empty values count as
    /// unset. Looks variables up and nothing else: the files they name are read by
    /// [`resolve`](Self::resolve).
    pub fn fill_from(self, lookup: impl Fn(&str) -> Option<String>) -> Self {
        let get = |k: &str| lookup(k).filter(|v| !v.is_empty());
        let home = get("HOME");
        // `~/` in a file variable is the home directory, as in the AWS CLI.
        let file = |var: &str, default: &str| {
            let path = |p: &str| match (p.strip_prefix("~/"), &home) {
                (Some(rest), Some(h)) => std::path::Path::new(h).join(rest),
                _ => std::path::PathBuf::from(p),
            };
            match get(var) {
                Some(p) => Some(path(&p)),
                None => home.as_ref().map(|h| std::path::Path::new(h).join(default)),
            }
        };
        let path = |var: &str| get(var).map(std::path::PathBuf::from);
        let env_keys = self.access_key_id.is_none()
            && self.secret_access_key.is_none()
            && get("AWS_ACCESS_KEY_ID").is_some()
            && get("AWS_SECRET_ACCESS_KEY").is_some();
        S3Config {
            endpoint: self
                .endpoint
                .or_else(|| get("AWS_ENDPOINT_URL_S3"))
                .or_else(|| get("AWS_ENDPOINT_URL")),
            region: self
                .region
                .or_else(|| get("AWS_REGION"))
                .or_else(|| get("AWS_DEFAULT_REGION")),
            access_key_id: self.access_key_id.or_else(|| get("AWS_ACCESS_KEY_ID")),
            secret_access_key: self
                .secret_access_key
                .or_else(|| get("AWS_SECRET_ACCESS_KEY")),
            session_token: self.session_token.or_else(|| get("AWS_SESSION_TOKEN")),
            allow_http: self.allow_http,
            instance_role: self.instance_role
                || get("CKPT_S3_INSTANCE_ROLE").is_some_and(|v| v == "1" || v == "true"),
            ca_bundle: self.ca_bundle.or_else(|| path("AWS_CA_BUNDLE")),
            profile: self.profile.or_else(|| get("AWS_PROFILE")),
            credentials_file: self
                .credentials_file
                .or_else(|| file("AWS_SHARED_CREDENTIALS_FILE", ".aws/credentials")),
            config_file: self
                .config_file
                .or_else(|| file("AWS_CONFIG_FILE", ".aws/config")),
            web_identity_token_file: self
                .web_identity_token_file
                .or_else(|| path("AWS_WEB_IDENTITY_TOKEN_FILE")),
            role_arn: self.role_arn.or_else(|| get("AWS_ROLE_ARN")),
            role_session_name: self
                .role_session_name
                .or_else(|| get("AWS_ROLE_SESSION_NAME")),
            sts_endpoint: self.sts_endpoint.or_else(|| get("AWS_ENDPOINT_URL_STS")),
            container_credentials_relative_uri: self
                .container_credentials_relative_uri
                .or_else(|| get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")),
            container_credentials_full_uri: self
                .container_credentials_full_uri
                .or_else(|| get("AWS_CONTAINER_CREDENTIALS_FULL_URI")),
            container_authorization_token_file: self
                .container_authorization_token_file
                .or_else(|| path("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE")),
            credentials_source: self
                .credentials_source
                .or_else(|| env_keys.then_some(CredentialsSource::Environment)),
        }
    }

    /// The configuration a store is opened with: the profile's settings (from the
    /// shared files, read now) under the ones set here, and
    /// [`credentials_source`](Self::credentials_source) set to the source that
    /// wins (`None` if there is none). Sends nothing over the network; does not
    /// read the CA bundle (opening the store does).
    ///
    /// Resolving happens when the store is opened, not in `fill_from`, so that
    /// errors in the files come out where every other configuration error does,
    /// as a [`StoreError::Config`] naming the store, and so that the AWS CLI's
    /// rule holds: a setting is looked for only in the profile the run names.
    pub fn resolve(&self) -> Result<S3Config, AwsConfigError> {
        let mut r = self.clone();
        let name = self.profile.as_deref().unwrap_or("default");
        let profile = awsconfig::load_profile(
            name,
            self.profile.is_some(),
            self.credentials_file.as_deref(),
            self.config_file.as_deref(),
        )?;
        if let Some(p) = &profile {
            r.region = r.region.or_else(|| p.region.clone());
            r.endpoint = r.endpoint.or_else(|| p.endpoint_url.clone());
            r.ca_bundle = r.ca_bundle.or_else(|| p.ca_bundle.clone());
        }
        let half =
            |set: &'static str, unset: &'static str| Err(AwsConfigError::HalfSet { set, unset });
        r.credentials_source = if r.access_key_id.is_some() || r.secret_access_key.is_some() {
            // Half a pair is refused when the store is opened, as before.
            Some(
                r.credentials_source
                    .clone()
                    .unwrap_or(CredentialsSource::Configuration),
            )
        } else if let Some(p) = profile.filter(|p| p.access_key_id.is_some()) {
            // A profile's keys come with the profile's token, never another's.
            r.access_key_id = p.access_key_id;
            r.secret_access_key = p.secret_access_key;
            r.session_token = p.session_token;
            Some(CredentialsSource::Profile(p.name))
        } else if r.web_identity_token_file.is_some() || r.role_arn.is_some() {
            match (&r.web_identity_token_file, &r.role_arn) {
                (Some(_), None) => return half("AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN"),
                (None, Some(_)) => return half("AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE"),
                _ => Some(CredentialsSource::WebIdentity),
            }
        } else if r.container_credentials_relative_uri.is_some() {
            Some(CredentialsSource::Container)
        } else if r.container_credentials_full_uri.is_some() {
            if r.container_authorization_token_file.is_none() {
                return half(
                    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
                );
            }
            Some(CredentialsSource::Container)
        } else if r.instance_role {
            Some(CredentialsSource::InstanceRole)
        } else {
            None
        };
        Ok(r)
    }

    /// What names the CA bundle, for errors about it: the variable, or the
    /// profile whose `ca_bundle` it is.
    fn ca_bundle_origin(&self) -> String {
        match (&self.ca_bundle, &self.config_file) {
            (Some(_), _) => "AWS_CA_BUNDLE".into(),
            (None, Some(file)) => format!(
                "ca_bundle of profile {} in {}",
                self.profile.as_deref().unwrap_or("default"),
                file.display()
            ),
            (None, None) => "ca_bundle".into(),
        }
    }
}

/// How long a request is retried before the store is declared down.
///
/// Transient errors (connection refused or reset, timeouts, HTTP 5xx, 429) are retried
/// by `object_store`'s own S3 client ([`object_store::RetryConfig`]) with exponential
/// backoff and jitter: each wait is drawn between `init_backoff` and twice the previous
/// wait, capped at `max_backoff`, and retrying stops after `max_retries` retries or
/// once `retry_timeout` has passed, whichever comes first.
/// Other errors (403, 404, a bad signature) are not retried. `file://` and
/// `memory://` do not retry.
///
/// Serialized with its durations in seconds (fractions allowed: `0.05`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct RetryPolicy {
    pub max_retries: usize,
    #[serde(with = "secs")]
    pub init_backoff: Duration,
    #[serde(with = "secs")]
    pub max_backoff: Duration,
    #[serde(with = "secs")]
    pub retry_timeout: Duration,
    /// Limit on establishing one connection.
    #[serde(with = "secs")]
    pub connect_timeout: Duration,
    /// Limit on one whole request (a chunk upload, say).
    #[serde(with = "secs")]
    pub request_timeout: Duration,
}

/// A [`Duration`] as seconds (an `f64`), for [`RetryPolicy`]'s fields.
mod secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let secs = f64::deserialize(d)?;
        Duration::try_from_secs_f64(secs).map_err(|e| {
            serde::de::Error::custom(format!("{secs} is not a duration in seconds: {e}"))
        })
    }
}

impl Default for RetryPolicy {
    /// About a minute of retries: a store that restarts or fails over is waited for,
    /// and one that stays down fails the operation within about 1.5 minutes.
    fn default() -> Self {
        RetryPolicy {
            max_retries: 10,
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(15),
            retry_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(60),
        }
    }
}

/// Everything needed to open a store besides its URL. Serializable, so that the
/// controller can send its configuration to the agents with each save and
/// restore; [`drive`](Self::drive) is the opener's own choice and does not travel.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct StoreConfig {
    pub s3: S3Config,
    pub retry: RetryPolicy,
    /// Which threads drive a [`BlockingStore`]'s connections.
    #[serde(skip)]
    pub drive: Drive,
}

impl StoreConfig {
    /// This configuration (the controller's, sent with a save or a restore), with
    /// what it leaves unset taken from `own` (the agent's, from its environment):
    /// an endpoint, region or keys the controller names win; a node whose agent has
    /// its own keys keeps them where the controller has none. The retry policy is
    /// the controller's; `drive` is `own`'s.
    pub fn or(&self, own: &StoreConfig) -> StoreConfig {
        StoreConfig {
            s3: self.s3.or(&own.s3),
            retry: self.retry.clone(),
            drive: own.drive,
        }
    }
}

impl S3Config {
    /// Each setting of `self`, or `own`'s where `self` has none (see
    /// [`StoreConfig::or`]). Credentials go as one group, never mixed: the
    /// controller's when it names keys itself, else the agent's own chain (its
    /// keys, profile, web identity, container or instance role). Exhaustive: a new
    /// setting must say how it merges.
    pub fn or(&self, own: &S3Config) -> S3Config {
        let S3Config {
            endpoint,
            region,
            access_key_id,
            secret_access_key: _,
            session_token: _,
            allow_http,
            instance_role: _,
            ca_bundle,
            profile: _,
            credentials_file: _,
            config_file: _,
            web_identity_token_file: _,
            role_arn: _,
            role_session_name: _,
            sts_endpoint: _,
            container_credentials_relative_uri: _,
            container_credentials_full_uri: _,
            container_authorization_token_file: _,
            credentials_source: _,
        } = self;
        let creds = if access_key_id.is_some() { self } else { own };
        S3Config {
            endpoint: endpoint.clone().or_else(|| own.endpoint.clone()),
            region: region.clone().or_else(|| own.region.clone()),
            allow_http: allow_http.or(own.allow_http),
            ca_bundle: ca_bundle.clone().or_else(|| own.ca_bundle.clone()),
            access_key_id: creds.access_key_id.clone(),
            secret_access_key: creds.secret_access_key.clone(),
            session_token: creds.session_token.clone(),
            instance_role: creds.instance_role,
            profile: creds.profile.clone(),
            credentials_file: creds.credentials_file.clone(),
            config_file: creds.config_file.clone(),
            web_identity_token_file: creds.web_identity_token_file.clone(),
            role_arn: creds.role_arn.clone(),
            role_session_name: creds.role_session_name.clone(),
            sts_endpoint: creds.sts_endpoint.clone(),
            container_credentials_relative_uri: creds.container_credentials_relative_uri.clone(),
            container_credentials_full_uri: creds.container_credentials_full_uri.clone(),
            container_authorization_token_file: creds.container_authorization_token_file.clone(),
            credentials_source: creds.credentials_source.clone(),
        }
    }
}

/// Which threads drive the connections of a [`BlockingStore`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Drive {
    /// Two threads of the store's own. For many threads calling at once, each with
    /// a request or two (a dump's workers): none of them has to drive the others'.
    #[default]
    Threads,
    /// The calling thread, inside each call. For one thread that keeps many requests
    /// in flight ([`crate::location::ImageStore::fetch_each`], the restore): each
    /// piece of a response is read by the thread that consumes it, with no wake-up
    /// of another thread in between. Measured on a 2-core node restoring 1 GiB from
    /// a local S3 server: 4.03 s against 4.16 s (median of 5, interleaved runs).
    /// Several threads may still call at once: they take turns at driving.
    Caller,
}

impl StoreConfig {
    /// S3 settings from `lookup` (the caller's environment, through a closure: the
    /// library reads none itself), and
    /// the default retries, but for `CKPT_STORE_RETRY_SECS`: how long a failing
    /// request is retried before the store is declared down (default 60; a tree
    /// frozen in kill mode waits that long on a store that went away).
    pub fn from_vars(lookup: impl Fn(&str) -> Option<String>) -> Self {
        let mut retry = RetryPolicy::default();
        if let Some(secs) = lookup("CKPT_STORE_RETRY_SECS").and_then(|v| v.parse::<u64>().ok()) {
            retry.retry_timeout = Duration::from_secs(secs);
            retry.connect_timeout = retry.connect_timeout.min(Duration::from_secs(secs.max(1)));
        }
        StoreConfig {
            s3: S3Config::default().fill_from(lookup),
            retry,
            drive: Drive::default(),
        }
    }
}

/// A content-addressed chunk store and image manifests on an object store.
/// `Send + Sync`; clones share the connection pool.
#[derive(Debug, Clone)]
pub struct ObjectStoreBackend {
    url: StoreUrl,
    /// How errors name the store: the URL, and the endpoint where there is one.
    name: Arc<str>,
    store: Arc<dyn ObjectStore>,
    /// Key prefix inside the store (empty for `file://` and `memory://`).
    root: ObjPath,
}

impl ObjectStoreBackend {
    /// Opens the store at `url` (see [`StoreUrl::parse`]). Nothing is sent to the
    /// store yet: [`check`](Self::check) does that.
    pub fn open(url: &str, config: &StoreConfig) -> Result<Self, StoreError> {
        Self::open_url(StoreUrl::parse(url)?, config)
    }

    /// Opens a parsed store URL.
    pub fn open_url(url: StoreUrl, config: &StoreConfig) -> Result<Self, StoreError> {
        let plain = url.to_string();
        let (store, root, name): (Arc<dyn ObjectStore>, ObjPath, String) = match &url {
            StoreUrl::Memory => (Arc::new(InMemory::new()), ObjPath::default(), plain),
            StoreUrl::File(dir) => {
                std::fs::create_dir_all(dir).map_err(|e| StoreError::Config {
                    store: plain.clone(),
                    reason: format!("create directory {}: {e}", dir.display()),
                })?;
                let fs = LocalFileSystem::new_with_prefix(dir)
                    .map_err(|source| StoreError::Open {
                        store: plain.clone(),
                        source: Box::new(source),
                    })?
                    .with_fsync(true);
                (Arc::new(fs), ObjPath::default(), plain)
            }
            StoreUrl::S3 { bucket, prefix } => {
                let (s3, resolved) = open_s3(&plain, bucket, &config.s3, &config.retry)?;
                let name = match &resolved.endpoint {
                    Some(ep) => format!("{plain} (endpoint {ep})"),
                    None => plain,
                };
                (s3, ObjPath::from(prefix.as_str()), name)
            }
        };
        Ok(ObjectStoreBackend {
            url,
            name: name.into(),
            store,
            root,
        })
    }

    /// The store's URL.
    pub fn url(&self) -> &StoreUrl {
        &self.url
    }

    /// How errors name this store: its URL, and its endpoint where it has one.
    pub fn display_name(&self) -> &str {
        &self.name
    }

    /// The underlying `object_store` (for tools and tests that need raw objects).
    pub fn raw_store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// Key of the object holding the chunk named `hex`.
    pub fn chunk_key(&self, hex: &str) -> ObjPath {
        self.root
            .clone()
            .join(CHUNKS_DIR)
            .join(hex.get(..2).unwrap_or(hex))
            .join(hex)
    }

    /// Key of the manifest of image `name`.
    pub fn manifest_key(&self, name: &str) -> ObjPath {
        self.root
            .clone()
            .join(IMAGES_DIR)
            .join(name)
            .join(MANIFEST_NAME)
    }

    /// Checks that the store answers and its bucket (or directory) exists, with one
    /// listing request, so a command can fail before it freezes anything.
    pub async fn check(&self) -> Result<(), StoreError> {
        self.store
            .list_with_delimiter(Some(&self.root))
            .await
            .map(|_| ())
            .map_err(|e| self.request_err("list", &self.root, e))
    }

    /// Stores `bytes` under `chunk` (computed by the caller with [`ChunkRef::of`]: the
    /// hash is trusted, the length checked), compressed with zstd at `zstd_level` when
    /// that makes it smaller. A chunk already in the store is not uploaded again:
    /// `stored_bytes` is then 0.
    pub async fn put_chunk(
        &self,
        chunk: ChunkRef,
        bytes: &[u8],
        zstd_level: Option<i32>,
    ) -> Result<PutOutcome, StoreError> {
        if bytes.len() != chunk.len as usize {
            return Err(ChunkFmtError::RefMismatch {
                chunk: chunk.hex(),
                expected: chunk.len,
                got: bytes.len(),
            }
            .into());
        }
        if let Some(level) = zstd_level {
            chunkfmt::check_zstd_level(level)?;
        }
        if self.has_chunk(&chunk).await? {
            return Ok(PutOutcome {
                chunk,
                stored_bytes: 0,
            });
        }
        let object = chunkfmt::encode(&chunk, bytes, zstd_level)?;
        let stored_bytes = object.len() as u64;
        let key = self.chunk_key(&chunk.hex());
        self.store
            .put(&key, PutPayload::from(object))
            .await
            .map_err(|e| self.write_err("put chunk", &key, e))?;
        Ok(PutOutcome {
            chunk,
            stored_bytes,
        })
    }

    /// Whether an object for `chunk` exists (its content is not checked).
    pub async fn has_chunk(&self, chunk: &ChunkRef) -> Result<bool, StoreError> {
        let key = self.chunk_key(&chunk.hex());
        self.exists("head chunk", &key).await
    }

    /// Reads `chunk` into `out` (exactly `chunk.len` bytes), verifying its header,
    /// length and BLAKE3.
    pub async fn get_chunk(&self, chunk: &ChunkRef, out: &mut [u8]) -> Result<(), StoreError> {
        self.get_chunk_with(chunk, out, |_, _| Ok(())).await
    }

    /// [`get_chunk`](Self::get_chunk) that hands the bytes on while they arrive:
    /// `arrived(off, bytes)` gets `out[off..off + bytes.len()]` as soon as that part is
    /// in, in order, in steps of [`STREAM_STEP`] (the last one shorter), each hashed
    /// just before, so that the caller writes them out while they are still in the
    /// CPU's cache instead of reading 4 MiB back from memory twice.
    ///
    /// **The bytes handed on are not verified yet**: only an `Ok` return says the
    /// whole chunk matched its BLAKE3. The caller must let nothing use them before
    /// (the restore writes them into processes that never run unless every chunk
    /// verified). A compressed object is decoded and verified first, then handed
    /// on in one call.
    pub async fn get_chunk_with<E: From<StoreError>>(
        &self,
        chunk: &ChunkRef,
        out: &mut [u8],
        mut arrived: impl FnMut(usize, &[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        if out.len() != chunk.len as usize {
            return Err(StoreError::from(ChunkFmtError::BufferSize {
                chunk: chunk.hex(),
                expected: chunk.len,
                got: out.len(),
            })
            .into());
        }
        let hex = chunk.hex();
        let key = self.chunk_key(&hex);
        let got = match self.store.get(&key).await {
            Ok(got) => got,
            Err(ref e @ object_store::Error::NotFound { .. }) if !is_missing_bucket(e) => {
                return Err(StoreError::Missing {
                    store: self.name.to_string(),
                    chunk: hex,
                }
                .into());
            }
            Err(e) => return Err(self.request_err("get chunk", &key, e).into()),
        };
        let max = chunkfmt::max_object_len(chunk.len);
        if got.meta.size > max {
            return Err(self
                .corrupt(
                    hex,
                    format!(
                        "object is {} bytes, more than the {max} a chunk of {} bytes takes",
                        got.meta.size, chunk.len
                    ),
                )
                .into());
        }
        let size = got.meta.size;
        let fix = |e| StoreError::from_format(&self.name, e);
        if size != (chunkfmt::CHUNK_HEADER_LEN + out.len()) as u64 {
            // Compressed (or damaged): whole, then decoded and verified.
            let object = got
                .bytes()
                .await
                .map_err(|e| self.request_err("get chunk", &key, e))?;
            chunkfmt::decode_into(chunk, &object, out).map_err(fix)?;
            return arrived(0, out);
        }
        // The size of a raw chunk: the payload streams straight into `out`, with no
        // buffer allocated (and faulted in) per request. The header is checked as soon
        // as it is in; the bytes are hashed and handed on a step at a time.
        let mut header = [0u8; chunkfmt::CHUNK_HEADER_LEN];
        let mut at = 0usize;
        let total = size as usize;
        let mut hasher = blake3::Hasher::new();
        let mut handed = 0usize;
        let mut stream = got.into_stream();
        while let Some(piece) = stream
            .try_next()
            .await
            .map_err(|e| self.request_err("get chunk", &key, e))?
        {
            let mut piece = &piece[..];
            if at + piece.len() > total {
                let e = self.corrupt(hex, format!("object is longer than its {total} bytes"));
                return Err(e.into());
            }
            if at < header.len() {
                let n = piece.len().min(header.len() - at);
                header[at..at + n].copy_from_slice(&piece[..n]);
                at += n;
                piece = &piece[n..];
                if at == header.len() {
                    chunkfmt::check_raw_header(chunk, &header).map_err(fix)?;
                }
            }
            if !piece.is_empty() {
                let o = at - header.len();
                out[o..o + piece.len()].copy_from_slice(piece);
                at += piece.len();
            }
            let have = at.saturating_sub(header.len());
            while have - handed >= STREAM_STEP {
                let step = &out[handed..handed + STREAM_STEP];
                hasher.update(step);
                arrived(handed, step)?;
                handed += STREAM_STEP;
            }
        }
        if at != total {
            let e = self.corrupt(hex, format!("object ended after {at} of {total} bytes"));
            return Err(e.into());
        }
        if handed < out.len() {
            let rest = &out[handed..];
            hasher.update(rest);
            arrived(handed, rest)?;
        }
        chunkfmt::check_hash(chunk, &hasher.finalize()).map_err(fix)?;
        Ok(())
    }

    /// Names (64 hex digits) of every chunk in the store, sorted. Objects that are not
    /// chunks are skipped.
    pub async fn list_chunks(&self) -> Result<Vec<String>, StoreError> {
        let dir = self.root.clone().join(CHUNKS_DIR);
        let mut names: Vec<String> = self
            .list_under(&dir)
            .await?
            .into_iter()
            .filter_map(|parts| match <[String; 2]>::try_from(parts) {
                Ok([shard, name]) if chunkfmt::is_chunk_name(&name) && name[..2] == shard => {
                    Some(name)
                }
                _ => None,
            })
            .collect();
        names.sort_unstable();
        Ok(names)
    }

    /// Deletes the chunk named `hex` (as [`list_chunks`](Self::list_chunks) gives it).
    /// Deleting a chunk that is not there is not an error (S3 does not tell).
    pub async fn delete_chunk(&self, hex: &str) -> Result<(), StoreError> {
        if !chunkfmt::is_chunk_name(hex) {
            return Err(StoreError::BadChunkName { name: hex.into() });
        }
        let key = self.chunk_key(hex);
        self.delete_if_there("delete chunk", &key).await
    }

    /// Writes the manifest of image `name`: the commit point, to be called after every
    /// chunk the manifest names was put. Replaces an older manifest of that name whole.
    pub async fn put_manifest(&self, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
        check_image_name(name)?;
        let max = codec::MAX_ENVELOPE;
        if bytes.len() as u64 > max {
            return Err(self.manifest_too_large(name, bytes.len() as u64));
        }
        let key = self.manifest_key(name);
        self.store
            .put(&key, PutPayload::from(bytes.to_vec()))
            .await
            .map_err(|e| self.write_err("put manifest", &key, e))?;
        Ok(())
    }

    /// Reads the manifest of image `name` (at most [`codec::MAX_ENVELOPE`] bytes; a
    /// larger one is refused before it is fetched). The bytes are not decoded here:
    /// [`codec::decode_image`] checks them.
    pub async fn get_manifest(&self, name: &str) -> Result<Vec<u8>, StoreError> {
        check_image_name(name)?;
        let key = self.manifest_key(name);
        let got = match self.store.get(&key).await {
            Ok(got) => got,
            Err(ref e @ object_store::Error::NotFound { .. }) if !is_missing_bucket(e) => {
                return Err(StoreError::NoImage {
                    store: self.name.to_string(),
                    name: name.into(),
                });
            }
            Err(e) => return Err(self.request_err("get manifest", &key, e)),
        };
        let max = codec::MAX_ENVELOPE;
        let too_large = |len| self.manifest_too_large(name, len);
        if got.meta.size > max {
            return Err(too_large(got.meta.size));
        }
        let bytes = got
            .bytes()
            .await
            .map_err(|e| self.request_err("get manifest", &key, e))?;
        if bytes.len() as u64 > max {
            return Err(too_large(bytes.len() as u64));
        }
        Ok(bytes.to_vec())
    }

    /// Names of the images that have a manifest, sorted.
    pub async fn list_manifests(&self) -> Result<Vec<String>, StoreError> {
        let dir = self.root.clone().join(IMAGES_DIR);
        let mut names: Vec<String> = self
            .list_under(&dir)
            .await?
            .into_iter()
            .filter_map(|parts| match <[String; 2]>::try_from(parts) {
                Ok([name, file]) if file == MANIFEST_NAME && check_image_name(&name).is_ok() => {
                    Some(name)
                }
                _ => None,
            })
            .collect();
        names.sort_unstable();
        Ok(names)
    }

    /// Deletes the manifest of image `name`: the image no longer exists (its chunks
    /// stay until a gc finds nothing else references them). Deleting an image that
    /// is not there is not an error.
    pub async fn delete_manifest(&self, name: &str) -> Result<(), StoreError> {
        check_image_name(name)?;
        let key = self.manifest_key(name);
        self.delete_if_there("delete manifest", &key).await
    }

    /// Writes the small object `<root>/<dir>/<name>` whole (the job manifests of
    /// [`crate::catalog`]); `name` follows the rules of image names.
    pub async fn put_object(&self, dir: &str, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
        check_image_name(name)?;
        let key = self.root.clone().join(dir).join(name);
        self.store
            .put(&key, PutPayload::from(bytes.to_vec()))
            .await
            .map_err(|e| self.write_err("put", &key, e))?;
        Ok(())
    }

    /// Reads the small object `<root>/<dir>/<name>`: `None` if it is not there; one
    /// larger than [`codec::MAX_ENVELOPE`] is refused before it is fetched.
    pub async fn get_object(&self, dir: &str, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        check_image_name(name)?;
        let key = self.root.clone().join(dir).join(name);
        let got = match self.store.get(&key).await {
            Ok(got) => got,
            Err(ref e @ object_store::Error::NotFound { .. }) if !is_missing_bucket(e) => {
                return Ok(None)
            }
            Err(e) => return Err(self.request_err("get", &key, e)),
        };
        if got.meta.size > codec::MAX_ENVELOPE {
            return Err(self.manifest_too_large(name, got.meta.size));
        }
        let bytes = got
            .bytes()
            .await
            .map_err(|e| self.request_err("get", &key, e))?;
        Ok(Some(bytes.to_vec()))
    }

    /// Names of the objects directly in `<root>/<dir>`, sorted.
    pub async fn list_objects(&self, dir: &str) -> Result<Vec<String>, StoreError> {
        let d = self.root.clone().join(dir);
        let mut names: Vec<String> = self
            .list_under(&d)
            .await?
            .into_iter()
            .filter_map(|parts| match <[String; 1]>::try_from(parts) {
                Ok([name]) if check_image_name(&name).is_ok() => Some(name),
                _ => None,
            })
            .collect();
        names.sort_unstable();
        Ok(names)
    }

    /// Deletes `<root>/<dir>/<name>`; one that is not there is not an error.
    pub async fn delete_object(&self, dir: &str, name: &str) -> Result<(), StoreError> {
        check_image_name(name)?;
        let key = self.root.clone().join(dir).join(name);
        self.delete_if_there("delete", &key).await
    }

    /// Writes the marker `<root>/<kind>/<id>` (see [`crate::gc`]); returns its
    /// modification time in the store's clock (ms since the epoch).
    pub async fn put_marker(&self, kind: &str, id: &str) -> Result<i64, StoreError> {
        let key = self.root.clone().join(kind).join(id);
        self.store
            .put(&key, PutPayload::from(id.as_bytes().to_vec()))
            .await
            .map_err(|e| self.write_err("put marker", &key, e))?;
        let meta = self
            .store
            .head(&key)
            .await
            .map_err(|e| self.request_err("head marker", &key, e))?;
        Ok(meta.last_modified.timestamp_millis())
    }

    /// Deletes marker `<root>/<kind>/<id>` (absent is fine).
    pub async fn delete_marker(&self, kind: &str, id: &str) -> Result<(), StoreError> {
        let key = self.root.clone().join(kind).join(id);
        self.delete_if_there("delete marker", &key).await
    }

    /// Whether marker `<root>/<kind>/<id>` exists.
    pub async fn has_marker(&self, kind: &str, id: &str) -> Result<bool, StoreError> {
        let key = self.root.clone().join(kind).join(id);
        self.exists("head marker", &key).await
    }

    /// Every marker under `<root>/<kind>/`: its id and modification time (ms since
    /// the epoch, the store's clock).
    pub async fn list_markers(&self, kind: &str) -> Result<Vec<(String, i64)>, StoreError> {
        let dir = self.root.clone().join(kind);
        Ok(self
            .list_metas(&dir)
            .await?
            .into_iter()
            .filter_map(|m| {
                let parts: Vec<String> = m
                    .location
                    .prefix_match(&dir)?
                    .map(|p| p.as_ref().to_string())
                    .collect();
                match <[String; 1]>::try_from(parts) {
                    Ok([id]) => Some((id, m.last_modified.timestamp_millis())),
                    Err(_) => None,
                }
            })
            .collect())
    }

    /// Every object under `dir`; a local store whose directory was never written
    /// lists as empty.
    async fn list_metas(&self, dir: &ObjPath) -> Result<Vec<object_store::ObjectMeta>, StoreError> {
        match self.store.list(Some(dir)).try_collect().await {
            Ok(m) => Ok(m),
            Err(object_store::Error::NotFound { .. })
                if !matches!(self.url, StoreUrl::S3 { .. }) =>
            {
                Ok(Vec::new())
            }
            Err(e) => Err(self.request_err("list", dir, e)),
        }
    }

    /// The path segments below `dir` of every object under it.
    async fn list_under(&self, dir: &ObjPath) -> Result<Vec<Vec<String>>, StoreError> {
        Ok(self
            .list_metas(dir)
            .await?
            .into_iter()
            .filter_map(|m| {
                m.location
                    .prefix_match(dir)
                    .map(|parts| parts.map(|p| p.as_ref().to_string()).collect())
            })
            .collect())
    }

    /// Deletes `key`; one that is not there is not an error (S3 does not tell).
    async fn delete_if_there(&self, op: &'static str, key: &ObjPath) -> Result<(), StoreError> {
        match self.store.delete(key).await {
            Ok(()) => Ok(()),
            Err(ref e @ object_store::Error::NotFound { .. }) if !is_missing_bucket(e) => Ok(()),
            Err(e) => Err(self.request_err(op, key, e)),
        }
    }

    /// Whether an object `key` exists.
    async fn exists(&self, op: &'static str, key: &ObjPath) -> Result<bool, StoreError> {
        match self.store.head(key).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.request_err(op, key, e)),
        }
    }

    fn manifest_too_large(&self, name: &str, len: u64) -> StoreError {
        StoreError::ManifestTooLarge {
            manifest: format!("of image {name:?} in store {}", self.name),
            len,
            max: codec::MAX_ENVELOPE,
        }
    }

    fn corrupt(&self, chunk: String, reason: String) -> StoreError {
        StoreError::Corrupt {
            store: self.name.to_string(),
            chunk,
            reason,
        }
    }

    /// A failed write: "not found" there means the bucket (or directory) is missing.
    fn write_err(&self, op: &'static str, key: &ObjPath, e: object_store::Error) -> StoreError {
        match e {
            object_store::Error::NotFound { .. } => StoreError::NoBucket {
                store: self.name.to_string(),
                op,
                key: key.to_string(),
                source: Box::new(e),
            },
            e => self.request_err(op, key, e),
        }
    }

    /// Sorts a failed request into what the user should do about it.
    fn request_err(&self, op: &'static str, key: &ObjPath, e: object_store::Error) -> StoreError {
        let store = self.name.to_string();
        let key = key.to_string();
        match e {
            object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. } => StoreError::Denied {
                store,
                op,
                key,
                source: Box::new(e),
            },
            object_store::Error::NotFound { .. } => StoreError::NoBucket {
                store,
                op,
                key,
                source: Box::new(e),
            },
            e if is_missing_bucket(&e) => StoreError::NoBucket {
                store,
                op,
                key,
                source: Box::new(e),
            },
            e if is_transport_error(&e) => StoreError::Unreachable {
                store,
                op,
                key,
                cause: root_cause(&e),
                source: Box::new(e),
            },
            e => StoreError::Request {
                store,
                op,
                key,
                source: Box::new(e),
            },
        }
    }
}

/// Whether `e` comes from the network (connect, timeout, reset) or from the server
/// failing (5xx), after the client's own retries: the store is down, not wrong.
fn is_transport_error(e: &object_store::Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(h) = err.downcast_ref::<object_store::client::HttpError>() {
            use object_store::client::HttpErrorKind as K;
            return matches!(
                h.kind(),
                K::Connect | K::Request | K::Timeout | K::Interrupted
            );
        }
        // object_store keeps the status of a failed request in a private type; its
        // message is the only way to see a 5xx (after retries: the server is failing).
        if err
            .to_string()
            .contains("Server returned non-2xx status code: 5")
        {
            return true;
        }
        cur = err.source();
    }
    false
}

/// The message of the innermost error of `e`'s chain.
fn root_cause(e: &object_store::Error) -> String {
    let mut cur: &(dyn std::error::Error + 'static) = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// Whether the server said the bucket does not exist (S3's `NoSuchBucket`, which
/// `object_store` reports as a plain "not found", or not at all for a listing).
fn is_missing_bucket(e: &object_store::Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.to_string().contains("<Code>NoSuchBucket</Code>") {
            return true;
        }
        cur = err.source();
    }
    false
}

/// Builds the S3 client of `bucket` from `s3` resolved ([`S3Config::resolve`]),
/// which it returns too, for the store's name.
fn open_s3(
    store: &str,
    bucket: &str,
    s3: &S3Config,
    retry: &RetryPolicy,
) -> Result<(Arc<dyn ObjectStore>, S3Config), StoreError> {
    let resolved = s3
        .resolve()
        .map_err(|e| config_err(store, crate::report::error_chain(&e)))?;
    let client = client_options(store, s3, &resolved, retry)?;
    let builder = s3_builder(bucket, &resolved, retry);
    let (client, builder) = with_endpoint(store, &resolved, client, builder)?;
    let builder = with_credentials(store, &resolved, builder)?;
    let built = builder
        .with_client_options(client)
        .build()
        .map_err(|source| StoreError::Open {
            store: store.to_string(),
            source: Box::new(source),
        })?;
    Ok((Arc::new(built), resolved))
}

/// The S3 settings of `store` cannot work: `reason` says why and what to set.
fn config_err(store: &str, reason: String) -> StoreError {
    StoreError::Config {
        store: store.to_string(),
        reason,
    }
}

/// The HTTP client's timeouts, and the CA bundle's certificates as its roots.
/// `s3` is the configuration as given (to name where its bundle came from),
/// `resolved` the one with the shared files applied.
fn client_options(
    store: &str,
    s3: &S3Config,
    resolved: &S3Config,
    retry: &RetryPolicy,
) -> Result<ClientOptions, StoreError> {
    let mut client = ClientOptions::new()
        .with_connect_timeout(retry.connect_timeout)
        .with_timeout(retry.request_timeout);
    if let Some(bundle) = &resolved.ca_bundle {
        let origin = s3.ca_bundle_origin();
        for cert in awsconfig::read_ca_bundle(bundle, &origin)
            .map_err(|e| config_err(store, crate::report::error_chain(&e)))?
        {
            client = client.with_root_certificate(cert);
        }
    }
    Ok(client)
}

/// The builder's bucket, region and retries.
fn s3_builder(bucket: &str, s3: &S3Config, retry: &RetryPolicy) -> AmazonS3Builder {
    AmazonS3Builder::new()
        .with_bucket_name(bucket)
        .with_region(s3.region.as_deref().unwrap_or("us-east-1"))
        .with_retry(RetryConfig {
            backoff: BackoffConfig {
                init_backoff: retry.init_backoff,
                max_backoff: retry.max_backoff,
                base: 2.0,
            },
            max_retries: retry.max_retries,
            retry_timeout: retry.retry_timeout,
        })
}

/// An endpoint of its own (path-style, http only where allowed, credentials
/// required) or AWS itself (virtual-hosted, https).
fn with_endpoint(
    store: &str,
    s3: &S3Config,
    mut client: ClientOptions,
    mut builder: AmazonS3Builder,
) -> Result<(ClientOptions, AmazonS3Builder), StoreError> {
    let config_err = |reason: String| config_err(store, reason);
    let source = s3.credentials_source.as_ref();
    match &s3.endpoint {
        Some(endpoint) => {
            let parsed = url::Url::parse(endpoint).map_err(|e| {
                config_err(format!(
                    "endpoint {endpoint:?} is not a URL ({e}): use http(s)://host:port"
                ))
            })?;
            let is_http = match parsed.scheme() {
                "http" => true,
                "https" => false,
                other => {
                    return Err(config_err(format!(
                        "endpoint {endpoint:?} has scheme {other:?}: use http:// or https://"
                    )))
                }
            };
            if is_http && s3.allow_http == Some(false) {
                return Err(config_err(format!(
                    "endpoint {endpoint} is plain http but http is not allowed: use an \
                     https endpoint, or allow http"
                )));
            }
            client = client.with_allow_http(s3.allow_http.unwrap_or(is_http));
            // Path-style addressing (endpoint/bucket/key): what every S3-compatible
            // server accepts, and needs no DNS name per bucket.
            builder = builder
                .with_endpoint(endpoint.trim_end_matches('/'))
                .with_virtual_hosted_style_request(false);
            // The instance role is AWS's alone: with another endpoint it would only
            // send requests to 169.254.169.254 and fail slowly.
            let keys = s3.access_key_id.is_some() && s3.secret_access_key.is_some();
            let other = matches!(
                source,
                Some(CredentialsSource::WebIdentity | CredentialsSource::Container)
            );
            if !keys && !other {
                return Err(config_err(format!(
                    "no credentials for endpoint {endpoint}: set AWS_ACCESS_KEY_ID and \
                     AWS_SECRET_ACCESS_KEY, or name a profile with keys (AWS_PROFILE)"
                )));
            }
        }
        None => {
            // AWS itself: virtual-hosted addressing, the only kind new buckets accept.
            client = client.with_allow_http(s3.allow_http.unwrap_or(false));
            builder = builder.with_virtual_hosted_style_request(true);
        }
    }
    Ok((client, builder))
}

/// The credentials of the source that won (see [`CredentialsSource`]), and only
/// those.
fn with_credentials(
    store: &str,
    s3: &S3Config,
    mut builder: AmazonS3Builder,
) -> Result<AmazonS3Builder, StoreError> {
    let config_err = |reason: String| config_err(store, reason);
    let source = s3.credentials_source.as_ref();
    // Only the winning source goes to the builder, so that object_store's own
    // order of providers cannot pick another one.
    use object_store::aws::AmazonS3ConfigKey as Key;
    match source {
        Some(
            CredentialsSource::Configuration
            | CredentialsSource::Environment
            | CredentialsSource::Profile(_),
        ) => match (&s3.access_key_id, &s3.secret_access_key) {
            (Some(id), Some(secret)) => {
                builder = builder
                    .with_access_key_id(id)
                    .with_secret_access_key(secret);
                if let Some(token) = &s3.session_token {
                    builder = builder.with_token(token);
                }
            }
            _ => {
                return Err(config_err(format!(
                    "set both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or neither \
                     (credentials from the {})",
                    source.map(|s| s.to_string()).unwrap_or_default()
                )))
            }
        },
        Some(CredentialsSource::WebIdentity) => {
            let path = |p: &std::path::PathBuf| p.display().to_string();
            for (key, value) in [
                (
                    Key::WebIdentityTokenFile,
                    s3.web_identity_token_file.as_ref().map(path),
                ),
                (Key::RoleArn, s3.role_arn.clone()),
                (Key::RoleSessionName, s3.role_session_name.clone()),
                (Key::StsEndpoint, s3.sts_endpoint.clone()),
            ] {
                if let Some(value) = value {
                    builder = builder.with_config(key, value);
                }
            }
        }
        Some(CredentialsSource::Container) => {
            if let Some(uri) = &s3.container_credentials_relative_uri {
                builder = builder.with_config(Key::ContainerCredentialsRelativeUri, uri);
            } else if let (Some(uri), Some(token)) = (
                &s3.container_credentials_full_uri,
                &s3.container_authorization_token_file,
            ) {
                builder = builder
                    .with_config(Key::ContainerCredentialsFullUri, uri)
                    .with_config(
                        Key::ContainerAuthorizationTokenFile,
                        token.display().to_string(),
                    );
            }
        }
        // AWS without keys: the instance's role, through the metadata service, only
        // when asked for. Otherwise a node with no credentials would send requests
        // to 169.254.169.254 and fail slowly with a confusing error.
        Some(CredentialsSource::InstanceRole) => {}
        None => {
            return Err(config_err(
                "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and \
                 AWS_ENDPOINT_URL for a store other than AWS), name a profile of \
                 ~/.aws/credentials (AWS_PROFILE), or CKPT_S3_INSTANCE_ROLE=1 \
                 to use the credentials of this EC2 instance's role"
                    .into(),
            ))
        }
    }
    Ok(builder)
}

/// [`ObjectStoreBackend`] for plain threads: the same operations, synchronous. It owns
/// a Tokio runtime: by default 2 worker threads that drive the connections, or none
/// ([`Drive::Caller`]); each call runs on the caller's thread with
/// [`tokio::runtime::Runtime::block_on`], so many threads can call at once
/// (`Send + Sync`). Must not be called, nor dropped, from inside an async context
/// (Tokio forbids blocking there): async code uses the backend directly.
#[derive(Debug)]
pub struct BlockingStore {
    backend: ObjectStoreBackend,
    runtime: tokio::runtime::Runtime,
}

impl BlockingStore {
    /// Opens the store at `url` with a runtime of its own.
    pub fn open(url: &str, config: &StoreConfig) -> Result<Self, StoreError> {
        let url = StoreUrl::parse(url)?;
        let runtime = match config.drive {
            Drive::Threads => tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("ckpt-store-io")
                .enable_all()
                .build(),
            Drive::Caller => tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build(),
        }
        .map_err(|source| StoreError::Runtime {
            store: url.to_string(),
            source,
        })?;
        // The HTTP client is created inside the runtime it will use.
        let backend = {
            let _guard = runtime.enter();
            ObjectStoreBackend::open_url(url, config)?
        };
        Ok(BlockingStore { backend, runtime })
    }

    /// The async backend (for code that has a runtime of its own).
    pub fn backend(&self) -> &ObjectStoreBackend {
        &self.backend
    }

    /// Runs `fut` to completion on this store's runtime, from the calling thread.
    pub fn block_on<F: std::future::Future>(&self, fut: F) -> F::Output {
        self.runtime.block_on(fut)
    }

    /// See [`ObjectStoreBackend::check`].
    pub fn check(&self) -> Result<(), StoreError> {
        self.block_on(self.backend.check())
    }

    /// See [`ObjectStoreBackend::put_chunk`].
    pub fn put_chunk(
        &self,
        chunk: ChunkRef,
        bytes: &[u8],
        zstd_level: Option<i32>,
    ) -> Result<PutOutcome, StoreError> {
        self.block_on(self.backend.put_chunk(chunk, bytes, zstd_level))
    }

    /// See [`ObjectStoreBackend::get_chunk`].
    pub fn get_chunk(&self, chunk: &ChunkRef, out: &mut [u8]) -> Result<(), StoreError> {
        self.block_on(self.backend.get_chunk(chunk, out))
    }

    /// See [`ObjectStoreBackend::has_chunk`].
    pub fn has_chunk(&self, chunk: &ChunkRef) -> Result<bool, StoreError> {
        self.block_on(self.backend.has_chunk(chunk))
    }

    /// See [`ObjectStoreBackend::list_chunks`].
    pub fn list_chunks(&self) -> Result<Vec<String>, StoreError> {
        self.block_on(self.backend.list_chunks())
    }

    /// See [`ObjectStoreBackend::delete_chunk`].
    pub fn delete_chunk(&self, hex: &str) -> Result<(), StoreError> {
        self.block_on(self.backend.delete_chunk(hex))
    }

    /// See [`ObjectStoreBackend::put_manifest`].
    pub fn put_manifest(&self, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
        self.block_on(self.backend.put_manifest(name, bytes))
    }

    /// See [`ObjectStoreBackend::get_manifest`].
    pub fn get_manifest(&self, name: &str) -> Result<Vec<u8>, StoreError> {
        self.block_on(self.backend.get_manifest(name))
    }

    /// See [`ObjectStoreBackend::list_manifests`].
    pub fn list_manifests(&self) -> Result<Vec<String>, StoreError> {
        self.block_on(self.backend.list_manifests())
    }

    /// See [`ObjectStoreBackend::delete_manifest`].
    pub fn delete_manifest(&self, name: &str) -> Result<(), StoreError> {
        self.block_on(self.backend.delete_manifest(name))
    }

    /// See [`ObjectStoreBackend::put_object`].
    pub fn put_object(&self, dir: &str, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
        self.block_on(self.backend.put_object(dir, name, bytes))
    }

    /// See [`ObjectStoreBackend::get_object`].
    pub fn get_object(&self, dir: &str, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.block_on(self.backend.get_object(dir, name))
    }

    /// See [`ObjectStoreBackend::list_objects`].
    pub fn list_objects(&self, dir: &str) -> Result<Vec<String>, StoreError> {
        self.block_on(self.backend.list_objects(dir))
    }

    /// See [`ObjectStoreBackend::delete_object`].
    pub fn delete_object(&self, dir: &str, name: &str) -> Result<(), StoreError> {
        self.block_on(self.backend.delete_object(dir, name))
    }
}

/// The synchronous interface of every chunk store. An object store keeps no image
/// of its own: the manifest calls name the image.
impl ChunkBackend for BlockingStore {
    fn display_name(&self) -> &str {
        self.backend.display_name()
    }

    fn is_remote(&self) -> bool {
        true
    }

    fn check(&self) -> Result<(), StoreError> {
        BlockingStore::check(self)
    }

    fn put_chunk(
        &self,
        chunk: ChunkRef,
        bytes: &[u8],
        zstd_level: Option<i32>,
    ) -> Result<PutOutcome, StoreError> {
        BlockingStore::put_chunk(self, chunk, bytes, zstd_level)
    }

    fn get_chunk_with(
        &self,
        chunk: &ChunkRef,
        out: &mut [u8],
        sink: &mut ChunkSink<'_>,
    ) -> Result<(), StoreError> {
        self.block_on(self.backend.get_chunk_with(chunk, out, sink))
    }

    fn has_chunk(&self, chunk: &ChunkRef) -> Result<bool, StoreError> {
        BlockingStore::has_chunk(self, chunk)
    }

    fn list_chunks(&self) -> Result<Vec<String>, StoreError> {
        BlockingStore::list_chunks(self)
    }

    fn delete_chunk(&self, hex: &str) -> Result<(), StoreError> {
        BlockingStore::delete_chunk(self, hex)
    }

    /// A put is durable when it returns.
    fn sync(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn put_manifest(&self, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
        BlockingStore::put_manifest(self, name, bytes)
    }

    fn get_manifest(&self, name: &str) -> Result<Vec<u8>, StoreError> {
        BlockingStore::get_manifest(self, name)
    }

    fn list_manifests(&self) -> Result<Vec<String>, StoreError> {
        BlockingStore::list_manifests(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_controllers_store_settings_win_and_the_agents_fill_the_rest() {
        let controller = StoreConfig {
            s3: S3Config {
                endpoint: Some("http://10.0.0.1:9000".into()),
                access_key_id: Some("ctl-key".into()),
                secret_access_key: Some("ctl-secret".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let agent = StoreConfig {
            s3: S3Config {
                endpoint: Some("http://127.0.0.1:1".into()),
                region: Some("eu-west-1".into()),
                access_key_id: Some("agent-key".into()),
                secret_access_key: Some("agent-secret".into()),
                ..Default::default()
            },
            drive: Drive::Caller,
            ..Default::default()
        };
        let got = controller.or(&agent);
        assert_eq!(got.s3.endpoint.as_deref(), Some("http://10.0.0.1:9000"));
        assert_eq!(got.s3.region.as_deref(), Some("eu-west-1"));
        assert_eq!(got.s3.access_key_id.as_deref(), Some("ctl-key"));
        assert_eq!(got.s3.secret_access_key.as_deref(), Some("ctl-secret"));
        assert_eq!(got.drive, Drive::Caller);
        // A controller without keys: the agent's pair, both halves.
        let keyless = StoreConfig::default().or(&agent);
        assert_eq!(keyless.s3.access_key_id.as_deref(), Some("agent-key"));
        assert_eq!(
            keyless.s3.secret_access_key.as_deref(),
            Some("agent-secret")
        );
    }

    #[test]
    fn is_send_sync() {
        fn check<T: Send + Sync>() {}
        check::<ObjectStoreBackend>();
        check::<BlockingStore>();
    }

    #[test]
    fn parses_store_urls() {
        assert_eq!(
            StoreUrl::parse("file:///var/ckpt/store").unwrap(),
            StoreUrl::File("/var/ckpt/store".into())
        );
        assert_eq!(StoreUrl::parse("memory://").unwrap(), StoreUrl::Memory);
        assert_eq!(
            StoreUrl::parse("s3://bucket/a/b/").unwrap(),
            StoreUrl::S3 {
                bucket: "bucket".into(),
                prefix: "a/b".into()
            }
        );
        assert_eq!(
            StoreUrl::parse("s3://bucket").unwrap(),
            StoreUrl::S3 {
                bucket: "bucket".into(),
                prefix: String::new()
            }
        );
        for s in ["file:///x/y", "memory://", "s3://b", "s3://b/p/q"] {
            assert_eq!(StoreUrl::parse(s).unwrap().to_string(), s);
        }
    }

    #[test]
    fn url_errors_say_what_to_use() {
        let err = StoreUrl::parse("ftp://host/x").unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"unsupported store URL scheme "ftp": use file://, s3:// or memory://"#
        );
        assert!(matches!(
            StoreUrl::parse("/var/ckpt"),
            Err(StoreError::NotAUrl { .. })
        ));
        for bad in [
            "s3:///prefix",
            "s3://bucket:9000/x",
            "s3://key:secret@bucket/x",
            "s3://bucket/a/../b",
            "file://host/x",
            "memory://name",
            "s3://bucket/x?region=eu",
        ] {
            match StoreUrl::parse(bad) {
                Err(StoreError::BadUrl { url, .. }) => assert_eq!(url, bad),
                other => panic!("{bad}: expected BadUrl, got {other:?}"),
            }
        }
    }

    #[test]
    fn s3_config_from_environment() {
        let env = |k: &str| {
            match k {
                "AWS_ENDPOINT_URL" => Some("http://127.0.0.1:9000"),
                "AWS_DEFAULT_REGION" => Some("eu-west-1"),
                "AWS_ACCESS_KEY_ID" => Some("id"),
                "AWS_SECRET_ACCESS_KEY" => Some(""),
                _ => None,
            }
            .map(String::from)
        };
        let filled = S3Config {
            secret_access_key: Some("from-file".into()),
            ..S3Config::default()
        }
        .fill_from(env);
        assert_eq!(
            filled,
            S3Config {
                endpoint: Some("http://127.0.0.1:9000".into()),
                region: Some("eu-west-1".into()),
                access_key_id: Some("id".into()),
                secret_access_key: Some("from-file".into()),
                allow_http: None,
                instance_role: false,
                // The rest are unset: the environment has none of them, and only
                // the id came from it, so the source is not "environment".
                ..S3Config::default()
            }
        );
        // Set fields win over the environment.
        let set = S3Config {
            region: Some("us-west-2".into()),
            ..S3Config::default()
        }
        .fill_from(env);
        assert_eq!(set.region.as_deref(), Some("us-west-2"));
        assert_eq!(set.secret_access_key, None, "empty values count as unset");
    }

    /// A fake environment from pairs.
    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    }

    #[test]
    fn s3_config_reads_the_aws_cli_variables() {
        let c = S3Config::default().fill_from(vars(&[
            ("AWS_ENDPOINT_URL", "http://global:1"),
            ("AWS_ENDPOINT_URL_S3", "http://s3-only:2"),
            ("AWS_SESSION_TOKEN", "tok"),
            ("AWS_CA_BUNDLE", "/etc/ca.pem"),
            ("AWS_PROFILE", "p"),
            ("HOME", "/home/u"),
            ("AWS_CONFIG_FILE", "~/cfg"),
            ("AWS_WEB_IDENTITY_TOKEN_FILE", "/var/tok"),
            ("AWS_ROLE_ARN", "arn:aws:iam::1:role/r"),
            ("AWS_ROLE_SESSION_NAME", "s"),
            (
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                "/v2/credentials/x",
            ),
        ]));
        assert_eq!(c.endpoint.as_deref(), Some("http://s3-only:2"));
        assert_eq!(c.session_token.as_deref(), Some("tok"));
        assert_eq!(
            c.ca_bundle.as_deref(),
            Some(std::path::Path::new("/etc/ca.pem"))
        );
        assert_eq!(c.profile.as_deref(), Some("p"));
        assert_eq!(
            c.credentials_file.as_deref(),
            Some(std::path::Path::new("/home/u/.aws/credentials"))
        );
        assert_eq!(
            c.config_file.as_deref(),
            Some(std::path::Path::new("/home/u/cfg"))
        );
        assert_eq!(c.role_session_name.as_deref(), Some("s"));
        assert_eq!(c.credentials_source, None, "no keys in the environment");
        let keys = S3Config::default().fill_from(vars(&[
            ("AWS_ACCESS_KEY_ID", "id"),
            ("AWS_SECRET_ACCESS_KEY", "secret"),
        ]));
        assert_eq!(
            keys.credentials_source,
            Some(CredentialsSource::Environment)
        );
        assert_eq!(keys.credentials_file, None, "no HOME, no shared files");
    }

    /// The AWS CLI's order: environment keys, the profile's keys, web identity,
    /// container credentials, the instance role; region and endpoint from the
    /// environment over the profile's.
    #[test]
    fn credentials_follow_the_aws_cli_precedence() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().to_str().unwrap().to_string();
        std::fs::create_dir(dir.path().join(".aws")).unwrap();
        std::fs::write(
            dir.path().join(".aws/credentials"),
            "[default]\naws_access_key_id = PID\naws_secret_access_key = PSECRET\n\
             aws_session_token = PTOKEN\n[nokeys]\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join(".aws/config"),
            "[default]\nregion = eu-north-1\ns3 =\n  endpoint_url = http://profile:9\n",
        )
        .unwrap();
        let web = [
            ("AWS_WEB_IDENTITY_TOKEN_FILE", "/var/tok"),
            ("AWS_ROLE_ARN", "arn:aws:iam::1:role/r"),
        ];
        let container = [("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "/v2/c")];
        let role = [("CKPT_S3_INSTANCE_ROLE", "1")];
        let env_keys = [
            ("AWS_ACCESS_KEY_ID", "EID"),
            ("AWS_SECRET_ACCESS_KEY", "ESECRET"),
            ("AWS_SESSION_TOKEN", "ETOKEN"),
        ];
        let resolve = |extra: &[(&str, &str)]| {
            let mut all = vec![("HOME", home.as_str())];
            all.extend_from_slice(extra);
            S3Config::default().fill_from(vars(&all)).resolve().unwrap()
        };
        let everything: Vec<_> = [&env_keys[..], &web, &container, &role].concat();
        let r = resolve(&everything);
        assert_eq!(r.credentials_source, Some(CredentialsSource::Environment));
        assert_eq!(r.access_key_id.as_deref(), Some("EID"));
        assert_eq!(r.session_token.as_deref(), Some("ETOKEN"));
        assert_eq!(r.region.as_deref(), Some("eu-north-1"));
        assert_eq!(r.endpoint.as_deref(), Some("http://profile:9"));

        // Without environment keys, the profile's, with its own token only.
        let r = resolve(
            &[
                &web[..],
                &container,
                &role,
                &[("AWS_SESSION_TOKEN", "ETOKEN")],
            ]
            .concat(),
        );
        assert_eq!(
            r.credentials_source,
            Some(CredentialsSource::Profile("default".into()))
        );
        assert_eq!(r.access_key_id.as_deref(), Some("PID"));
        assert_eq!(r.secret_access_key.as_deref(), Some("PSECRET"));
        assert_eq!(r.session_token.as_deref(), Some("PTOKEN"));

        // A profile without keys: web identity, then the container, then the role.
        let nokeys = ("AWS_PROFILE", "nokeys");
        let r = resolve(&[&[nokeys][..], &web, &container, &role].concat());
        assert_eq!(r.credentials_source, Some(CredentialsSource::WebIdentity));
        assert_eq!(r.region, None, "the profile named has no region");
        let r = resolve(&[&[nokeys][..], &container, &role].concat());
        assert_eq!(r.credentials_source, Some(CredentialsSource::Container));
        let r = resolve(&[&[nokeys][..], &role].concat());
        assert_eq!(r.credentials_source, Some(CredentialsSource::InstanceRole));
        assert_eq!(resolve(&[nokeys]).credentials_source, None);

        // Region and endpoint of the environment win over the profile's.
        let r = resolve(&[
            ("AWS_REGION", "us-west-1"),
            ("AWS_ENDPOINT_URL", "http://env:1"),
        ]);
        assert_eq!(r.region.as_deref(), Some("us-west-1"));
        assert_eq!(r.endpoint.as_deref(), Some("http://env:1"));
        // Resolving twice changes nothing.
        assert_eq!(r.resolve().unwrap(), r);
        // Keys set in the configuration (the controller's file) are its own.
        let set = S3Config {
            access_key_id: Some("a".into()),
            secret_access_key: Some("b".into()),
            ..S3Config::default()
        };
        assert_eq!(
            set.resolve().unwrap().credentials_source,
            Some(CredentialsSource::Configuration)
        );
    }

    #[test]
    fn resolve_refuses_what_is_half_set() {
        for (pairs, want) in [
            (
                &[("AWS_WEB_IDENTITY_TOKEN_FILE", "/t")][..],
                "AWS_WEB_IDENTITY_TOKEN_FILE is set but AWS_ROLE_ARN is not",
            ),
            (&[("AWS_ROLE_ARN", "arn")][..], "AWS_ROLE_ARN is set but"),
            (
                &[("AWS_CONTAINER_CREDENTIALS_FULL_URI", "http://x")][..],
                "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE is not",
            ),
        ] {
            let e = S3Config::default()
                .fill_from(vars(pairs))
                .resolve()
                .unwrap_err();
            assert!(e.to_string().contains(want), "{want:?} in {e}");
        }
    }

    /// Errors in the shared files and the CA bundle come out when the store is
    /// opened, naming the store, the file and the variable.
    #[test]
    fn open_reports_profile_and_ca_bundle_errors() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().to_str().unwrap();
        let open = |pairs: &[(&str, &str)]| {
            let config = StoreConfig::from_vars(vars(pairs));
            ObjectStoreBackend::open("s3://b/p", &config)
                .unwrap_err()
                .to_string()
        };
        let msg = open(&[("HOME", home), ("AWS_PROFILE", "ghost")]);
        assert!(msg.starts_with("cannot open store s3://b/p: "), "{msg}");
        assert!(
            msg.contains("\"ghost\"") && msg.contains("AWS_PROFILE"),
            "{msg}"
        );
        assert!(msg.contains(&format!("{home}/.aws/credentials")), "{msg}");
        // The default profile missing is no error: it is the usual "no credentials".
        let msg = open(&[("HOME", home)]);
        assert!(msg.contains("no S3 credentials"), "{msg}");

        let keys = [
            ("AWS_ENDPOINT_URL", "https://127.0.0.1:1"),
            ("AWS_ACCESS_KEY_ID", "id"),
            ("AWS_SECRET_ACCESS_KEY", "secret"),
        ];
        let missing = format!("{home}/no-such.pem");
        let msg = open(&[&keys[..], &[("AWS_CA_BUNDLE", missing.as_str())]].concat());
        assert!(
            msg.contains(&missing) && msg.contains("AWS_CA_BUNDLE"),
            "{msg}"
        );
        let junk = format!("{home}/junk.pem");
        std::fs::write(&junk, "junk").unwrap();
        let msg = open(&[&keys[..], &[("AWS_CA_BUNDLE", junk.as_str())]].concat());
        assert!(msg.contains(&junk) && msg.contains("PEM"), "{msg}");

        // A good bundle opens, and the endpoint of the profile names the store.
        let ca = rcgen::generate_simple_self_signed(vec!["ca.test".into()]).unwrap();
        let good = format!("{home}/ca.pem");
        std::fs::write(&good, ca.cert.pem()).unwrap();
        let cfg = format!("{home}/config");
        std::fs::write(&cfg, "[profile p]\nendpoint_url = https://from-profile:4\n").unwrap();
        let config = StoreConfig::from_vars(vars(&[
            ("AWS_ACCESS_KEY_ID", "id"),
            ("AWS_SECRET_ACCESS_KEY", "secret"),
            ("AWS_CA_BUNDLE", good.as_str()),
            ("AWS_CONFIG_FILE", cfg.as_str()),
            ("AWS_PROFILE", "p"),
        ]));
        let b = ObjectStoreBackend::open("s3://b/p", &config).unwrap();
        assert!(
            b.name.contains("endpoint https://from-profile:4"),
            "{}",
            b.name
        );
    }

    /// Web identity and container credentials open without keys, even with another
    /// endpoint; the instance role does not (it is AWS's alone).
    #[test]
    fn open_with_other_credential_sources() {
        for pairs in [
            &[
                ("AWS_WEB_IDENTITY_TOKEN_FILE", "/var/tok"),
                ("AWS_ROLE_ARN", "arn:aws:iam::1:role/r"),
                ("AWS_ENDPOINT_URL_STS", "https://sts.example"),
            ][..],
            &[("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "/v2/c")],
            &[
                ("AWS_CONTAINER_CREDENTIALS_FULL_URI", "http://127.0.0.1:1/c"),
                ("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", "/var/tok"),
            ],
        ] {
            for endpoint in [None, Some("http://127.0.0.1:1")] {
                let mut all = pairs.to_vec();
                all.extend(endpoint.map(|e| ("AWS_ENDPOINT_URL", e)));
                let config = StoreConfig::from_vars(vars(&all));
                ObjectStoreBackend::open("s3://b/p", &config).unwrap();
            }
        }
        let config = StoreConfig::from_vars(vars(&[
            ("CKPT_S3_INSTANCE_ROLE", "1"),
            ("AWS_ENDPOINT_URL", "http://127.0.0.1:1"),
        ]));
        let msg = ObjectStoreBackend::open("s3://b/p", &config)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("no credentials for endpoint"), "{msg}");
    }

    #[test]
    fn store_config_from_vars() {
        let vars = |k: &str| {
            match k {
                "CKPT_STORE_RETRY_SECS" => Some("2"),
                "AWS_ACCESS_KEY_ID" => Some("id"),
                _ => None,
            }
            .map(String::from)
        };
        let c = StoreConfig::from_vars(vars);
        assert_eq!(c.retry.retry_timeout, Duration::from_secs(2));
        assert_eq!(c.retry.connect_timeout, Duration::from_secs(2));
        assert_eq!(c.s3.access_key_id.as_deref(), Some("id"));
        assert_eq!(StoreConfig::from_vars(|_| None), StoreConfig::default());
    }

    /// What the controller sends its agents comes back the same, secrets and
    /// sub-second durations included, but for the drive, which stays the
    /// receiver's.
    #[test]
    fn store_config_travels() {
        let config = StoreConfig {
            drive: Drive::Caller,
            ..s3_config("http://127.0.0.1:9000")
        };
        let mut config = config;
        config.retry.init_backoff = Duration::from_millis(50);
        let bytes = rmp_serde::to_vec_named(&config).unwrap();
        let back: StoreConfig = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(back.drive, Drive::Threads);
        assert_eq!(
            back,
            StoreConfig {
                drive: Drive::Threads,
                ..config
            }
        );
        assert_eq!(back.s3.secret_access_key.as_deref(), Some("secret"));
    }

    /// A logged configuration does not give its secret away.
    #[test]
    fn debug_redacts_secrets() {
        let mut config = s3_config("http://127.0.0.1:9000");
        config.s3.secret_access_key = Some("wJalrXUtnFEMI-very-secret".into());
        config.s3.session_token = Some("FwoGZXIvYXdz-very-secret-token".into());
        config.s3.credentials_source = Some(CredentialsSource::Profile("ci".into()));
        for shown in [
            format!("{config:?}"),
            format!("{:?}", config.s3),
            format!("{config:#?}"),
        ] {
            assert!(!shown.contains("very-secret"), "{shown}");
            assert!(shown.contains("<redacted>"), "{shown}");
        }
        assert!(format!("{:?}", config.s3).contains("access_key_id: Some(\"id\")"));
        assert!(
            format!("{:?}", config.s3).contains("credentials_source: Some(\"profile ci\")"),
            "the source is shown"
        );
        let none = format!("{:?}", S3Config::default());
        assert!(none.contains("secret_access_key: None"), "{none}");
    }

    #[test]
    fn aws_without_keys_is_refused_unless_the_instance_role_is_asked_for() {
        let cfg = StoreConfig::default();
        let err = ObjectStoreBackend::open("s3://bucket/p", &cfg)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no S3 credentials"), "{err}");
        let role =
            S3Config::default().fill_from(|k| (k == "CKPT_S3_INSTANCE_ROLE").then(|| "1".into()));
        assert!(role.instance_role);
    }

    /// A `Drive::Caller` store starts no thread of its own: its calls drive the
    /// connections (the restore's fetch relies on that to avoid wake-ups).
    #[test]
    fn the_drive_picks_the_runtime() {
        let open = |drive| {
            let config = StoreConfig {
                drive,
                ..StoreConfig::default()
            };
            BlockingStore::open("memory://", &config).unwrap()
        };
        assert_eq!(
            open(Drive::Caller).runtime.handle().runtime_flavor(),
            tokio::runtime::RuntimeFlavor::CurrentThread
        );
        let threads = open(Drive::Threads);
        assert_eq!(
            threads.runtime.handle().runtime_flavor(),
            tokio::runtime::RuntimeFlavor::MultiThread
        );
        assert_eq!(threads.runtime.metrics().num_workers(), 2);
    }

    fn s3_config(endpoint: &str) -> StoreConfig {
        StoreConfig {
            s3: S3Config {
                endpoint: Some(endpoint.into()),
                access_key_id: Some("id".into()),
                secret_access_key: Some("secret".into()),
                ..S3Config::default()
            },
            retry: RetryPolicy::default(),
            drive: Drive::default(),
        }
    }

    #[test]
    fn s3_open_checks_its_config() {
        // Opening sends nothing, so these need no server.
        ObjectStoreBackend::open("s3://b/p", &s3_config("http://127.0.0.1:1")).unwrap();
        ObjectStoreBackend::open("s3://b/p", &s3_config("https://s3.example.org")).unwrap();
        let mut no_http = s3_config("http://127.0.0.1:1");
        no_http.s3.allow_http = Some(false);
        let mut no_creds = s3_config("http://127.0.0.1:1");
        no_creds.s3.secret_access_key = None;
        let mut half_creds = StoreConfig::default();
        half_creds.s3.access_key_id = Some("id".into());
        for (config, want) in [
            (no_http, "plain http"),
            (no_creds, "AWS_SECRET_ACCESS_KEY"),
            (s3_config("ftp://x"), "use http:// or https://"),
            (s3_config("not a url"), "not a URL"),
            (half_creds, "or neither"),
        ] {
            match ObjectStoreBackend::open("s3://b/p", &config) {
                Err(e @ StoreError::Config { .. }) => {
                    let msg = e.to_string();
                    assert!(msg.starts_with("cannot open store s3://b/p: "), "{msg}");
                    assert!(msg.contains(want), "want {want:?} in {msg}");
                }
                other => panic!("expected Config error, got {other:?}"),
            }
        }
    }

    #[test]
    fn keys_follow_the_layout() {
        let b = ObjectStoreBackend::open("s3://b/run/7", &s3_config("http://127.0.0.1:1")).unwrap();
        let hex = ChunkRef::of(b"").hex();
        assert_eq!(
            b.chunk_key(&hex).to_string(),
            format!("run/7/chunks/af/{hex}")
        );
        assert_eq!(
            b.manifest_key("job-1").to_string(),
            "run/7/images/job-1/manifest.ckpt"
        );
        let m = ObjectStoreBackend::open("memory://", &StoreConfig::default()).unwrap();
        assert_eq!(m.chunk_key(&hex).to_string(), format!("chunks/af/{hex}"));
    }

    #[test]
    fn image_names() {
        for ok in ["job-1", "a", "step_2.rank-3", &"x".repeat(MAX_IMAGE_NAME)] {
            check_image_name(ok).unwrap();
        }
        for bad in [
            "",
            ".hidden",
            "a/b",
            "..",
            "a b",
            &"x".repeat(MAX_IMAGE_NAME + 1),
        ] {
            assert!(matches!(
                check_image_name(bad),
                Err(StoreError::BadImageName { .. })
            ));
        }
    }
}
