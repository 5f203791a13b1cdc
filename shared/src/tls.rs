//! The cluster's certificates, and the QUIC endpoints that use them (mutual TLS).
//!
//! `ckpt-controller ca init` makes a cluster CA and certificates for the controller
//! and the named agents; `ca issue --agent NAME` adds one. Layout of the directory:
//!
//! ```text
//! ca.pem  ca.key                  the cluster CA (keep ca.key on the controller only)
//! controller.pem  controller.key  the controller's certificate (server and client)
//! agents/NAME.pem  agents/NAME.key  one per agent node; NAME is in its SAN
//! ```
//!
//! Both ends speak TLS 1.3 over QUIC with ALPN `ckpt/1`; each requires the other's
//! certificate to chain to the cluster CA, so a peer with no certificate, or one of
//! another CA, is refused during the handshake, before any message is read. Keys are
//! ECDSA P-256, written with mode 0600.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// ALPN of the controller–agent protocol.
pub const ALPN: &[u8] = b"ckpt/1";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{dir} already holds a cluster CA (ca.key): refusing to replace it, which would \
         lock out every agent; use `ca issue` to add agents, or choose another directory"
    )]
    CaExists { dir: PathBuf },
    #[error("no cluster CA in {dir} (ca.pem, ca.key): run `ckpt-controller ca init` first")]
    NoCa { dir: PathBuf },
    #[error(
        "agent {name} already has a certificate in {dir}/agents; remove it to issue a new one"
    )]
    AgentExists { name: String, dir: PathBuf },
    #[error("{name:?} cannot name an agent: use letters, digits, '.', '-' and '_' (a host name)")]
    BadName { name: String },
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{what} in {path}: {reason}")]
    Pem {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("TLS configuration: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("QUIC configuration: {0}")]
    Quic(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn check_name(name: &str) -> Result<(), TlsError> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(TlsError::BadName { name: name.into() })
    }
}

fn write_pair(dir: &Path, stem: &str, cert: &str, key: &str) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let c = dir.join(format!("{stem}.pem"));
    std::fs::write(&c, cert).map_err(io(&c))?;
    let k = dir.join(format!("{stem}.key"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&k)
        .map_err(io(&k))?;
    f.write_all(key.as_bytes()).map_err(io(&k))?;
    Ok(())
}

/// A certificate for `names` (SANs; the first is the CN) signed by the CA, for both
/// TLS client and server use.
fn leaf(
    names: &[String],
    ca: &rcgen::Certificate,
    ca_key: &KeyPair,
) -> Result<(String, String), TlsError> {
    let mut p = CertificateParams::new(names.to_vec())?;
    p.distinguished_name.push(
        DnType::CommonName,
        names.first().cloned().unwrap_or_default(),
    );
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, ca, ca_key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// `ca init`: a new cluster CA in `dir`, a certificate for the controller (valid for
/// `controller_names`, which should hold the names and addresses agents use to reach
/// it), and one per agent in `agents`.
pub fn ca_init(dir: &Path, controller_names: &[String], agents: &[String]) -> Result<(), TlsError> {
    for a in agents {
        check_name(a)?;
    }
    std::fs::create_dir_all(dir.join("agents")).map_err(io(dir))?;
    if dir.join("ca.key").exists() {
        return Err(TlsError::CaExists {
            dir: dir.to_path_buf(),
        });
    }
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(DnType::CommonName, "ckpt cluster CA");
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = KeyPair::generate()?;
    let ca = p.self_signed(&ca_key)?;
    write_pair(dir, "ca", &ca.pem(), &ca_key.serialize_pem())?;
    let mut names = vec!["controller".to_string()];
    names.extend(controller_names.iter().cloned());
    let (c, k) = leaf(&names, &ca, &ca_key)?;
    write_pair(dir, "controller", &c, &k)?;
    for a in agents {
        let (c, k) = leaf(std::slice::from_ref(a), &ca, &ca_key)?;
        write_pair(&dir.join("agents"), a, &c, &k)?;
    }
    Ok(())
}

/// `ca issue --agent NAME`: a certificate for one more agent.
pub fn ca_issue(dir: &Path, agent: &str) -> Result<(PathBuf, PathBuf), TlsError> {
    check_name(agent)?;
    let (ca_pem, ca_key) = (dir.join("ca.pem"), dir.join("ca.key"));
    if !ca_pem.exists() || !ca_key.exists() {
        return Err(TlsError::NoCa {
            dir: dir.to_path_buf(),
        });
    }
    let agents = dir.join("agents");
    if agents.join(format!("{agent}.pem")).exists() {
        return Err(TlsError::AgentExists {
            name: agent.into(),
            dir: dir.to_path_buf(),
        });
    }
    let key = KeyPair::from_pem(&std::fs::read_to_string(&ca_key).map_err(io(&ca_key))?)?;
    // The issuer's name and key are what a signature needs; re-signing the CA's own
    // parameters gives an equivalent issuer certificate.
    let params = CertificateParams::from_ca_cert_pem(
        &std::fs::read_to_string(&ca_pem).map_err(io(&ca_pem))?,
    )?;
    let ca = params.self_signed(&key)?;
    let (c, k) = leaf(&[agent.to_string()], &ca, &key)?;
    std::fs::create_dir_all(&agents).map_err(io(&agents))?;
    write_pair(&agents, agent, &c, &k)?;
    Ok((
        agents.join(format!("{agent}.pem")),
        agents.join(format!("{agent}.key")),
    ))
}

/// A certificate chain, its key, and the CA that peers must chain to.
#[derive(Debug)]
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub ca: Vec<CertificateDer<'static>>,
}

impl Identity {
    /// Loads `cert`, `key` and `ca` PEM files.
    pub fn load(cert: &Path, key: &Path, ca: &Path) -> Result<Identity, TlsError> {
        let certs = |p: &Path, what| -> Result<Vec<CertificateDer<'static>>, TlsError> {
            let v: Result<Vec<_>, _> = CertificateDer::pem_file_iter(p)
                .map_err(|e| TlsError::Pem {
                    what,
                    path: p.into(),
                    reason: e.to_string(),
                })?
                .collect();
            let v = v.map_err(|e| TlsError::Pem {
                what,
                path: p.into(),
                reason: e.to_string(),
            })?;
            if v.is_empty() {
                return Err(TlsError::Pem {
                    what,
                    path: p.into(),
                    reason: "no certificate".into(),
                });
            }
            Ok(v)
        };
        Ok(Identity {
            chain: certs(cert, "certificate")?,
            key: PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Pem {
                what: "private key",
                path: key.into(),
                reason: e.to_string(),
            })?,
            ca: certs(ca, "CA certificate")?,
        })
    }

    /// The controller's identity in a `ca init` directory.
    pub fn controller(dir: &Path) -> Result<Identity, TlsError> {
        Identity::load(
            &dir.join("controller.pem"),
            &dir.join("controller.key"),
            &dir.join("ca.pem"),
        )
    }

    /// Agent `name`'s identity in a `ca init` directory.
    pub fn agent(dir: &Path, name: &str) -> Result<Identity, TlsError> {
        let a = dir.join("agents");
        Identity::load(
            &a.join(format!("{name}.pem")),
            &a.join(format!("{name}.key")),
            &dir.join("ca.pem"),
        )
    }

    fn roots(&self) -> Result<rustls::RootCertStore, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        for c in &self.ca {
            roots.add(c.clone())?;
        }
        Ok(roots)
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The QUIC server side (the controller): TLS 1.3, a client certificate of the
/// cluster CA required.
pub fn server_config(id: &Identity) -> Result<quinn::ServerConfig, TlsError> {
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(id.roots()?),
        provider(),
    )
    .build()?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(id.chain.clone(), id.key.clone_key())?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    Ok(quinn::ServerConfig::with_crypto(Arc::new(quic)))
}

/// The QUIC client side (an agent): the server must chain to the cluster CA; our
/// certificate is presented unless `present` is false (tests of refusal).
pub fn client_config(id: &Identity, present: bool) -> Result<quinn::ClientConfig, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(id.roots()?);
    let mut tls = if present {
        builder.with_client_auth_cert(id.chain.clone(), id.key.clone_key())?
    } else {
        builder.with_no_client_auth()
    };
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    Ok(quinn::ClientConfig::new(Arc::new(quic)))
}

/// The DNS names a certificate is valid for (an agent's certificate names its node),
/// so the controller can check that an agent registers under its own name.
pub fn cert_names(der: &CertificateDer<'_>) -> Vec<String> {
    match CertificateParams::from_ca_cert_der(der) {
        Ok(p) => p
            .subject_alt_names
            .iter()
            .filter_map(|s| match s {
                rcgen::SanType::DnsName(n) => Some(n.as_str().to_string()),
                _ => None,
            })
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// QUIC transport settings of both sides: a keep-alive well inside `lease`, and a
/// connection that hears nothing for `lease` is closed, so each side learns of a
/// dead peer within its lease.
pub fn transport(lease: std::time::Duration) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(lease / 4));
    t.max_idle_timeout(quinn::IdleTimeout::try_from(lease).ok());
    Arc::new(t)
}
