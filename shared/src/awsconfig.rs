//! The AWS shared configuration files (`~/.aws/credentials` and `~/.aws/config`)
//! and the CA bundle, read the way the AWS CLI reads them, for
//! [`crate::objstore::S3Config::resolve`].
//!
//! This module reads files only: which files, and which profile, the caller says
//! (from its environment, through [`crate::objstore::S3Config::fill_from`]); it reads
//! no environment variable and sends nothing over the network. No kernel contract
//! and no capability beyond read access to the files.
//!
//! The format, as the AWS SDKs document it:
//! - `[NAME]` opens a profile in the credentials file; in the config file it is
//!   `[profile NAME]`, or `[default]` (`[profile default]` too). Other sections of the
//!   config file (`[sso-session x]`, `[services x]`, a bare `[x]`) are not profiles
//!   and are skipped, as the CLI does.
//! - `key = value`, with any spaces around `=`; a line whose first non-blank
//!   character is `#` or `;` is a comment, and so is the rest of a line from a `#`
//!   or `;` that follows a blank.
//! - `s3 =` with no value opens a nested block: the indented `key = value` lines
//!   below it belong to it (`s3.endpoint_url` here). An indented line below a
//!   property with a value continues that value.
//! - A profile in both files is merged, the credentials file's keys over the config
//!   file's (what botocore does).
//!
//! Why our own reader and not a crate: `aws-config` reads the environment itself,
//! is async and pulls in the whole AWS SDK runtime; the general INI crates know
//! neither the nested blocks nor the `profile` prefix rule. The format is small.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use object_store::Certificate;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

/// The errors of reading the AWS configuration: each names the file and the
/// variable (or profile) that pointed at it, so that the user knows what to fix.
#[derive(Debug, thiserror::Error)]
pub enum AwsConfigError {
    #[error("cannot read the AWS {what} {} ({var}): {source}", path.display())]
    Read {
        what: &'static str,
        var: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{}:{line}: {reason}", path.display())]
    Parse {
        path: PathBuf,
        line: usize,
        reason: String,
    },

    #[error(
        "AWS profile {profile:?} (AWS_PROFILE) is in neither {} nor {}: name a \
         profile that exists, or unset AWS_PROFILE",
        show(credentials_file),
        show(config_file)
    )]
    NoSuchProfile {
        profile: String,
        credentials_file: Option<PathBuf>,
        config_file: Option<PathBuf>,
    },

    #[error("AWS profile {profile:?} has {has} but not {missing}: set both, or neither")]
    PartialKeys {
        profile: String,
        has: &'static str,
        missing: &'static str,
    },

    #[error("cannot read the CA bundle {} ({from}): {source}", path.display())]
    CaBundleRead {
        path: PathBuf,
        from: String,
        #[source]
        source: std::io::Error,
    },

    #[error("the CA bundle {} ({from}) is not a PEM file of certificates: {reason}", path.display())]
    CaBundleParse {
        path: PathBuf,
        from: String,
        reason: String,
    },

    /// Half of a pair of variables that only mean something together.
    #[error("{set} is set but {unset} is not: set both, or neither")]
    HalfSet {
        set: &'static str,
        unset: &'static str,
    },
}

fn show(path: &Option<PathBuf>) -> String {
    match path {
        Some(p) => p.display().to_string(),
        None => "(no file: HOME is not set)".into(),
    }
}

/// One section of a shared file: its properties, nested ones as `parent.key`.
pub type Properties = HashMap<String, String>;

/// Parses the text of a shared file into its sections, by header as written
/// (`profile x`, `default`, `x`). A section named twice is merged, later keys over
/// earlier ones.
pub fn parse(path: &Path, text: &str) -> Result<HashMap<String, Properties>, AwsConfigError> {
    let mut sections: HashMap<String, Properties> = HashMap::new();
    let mut current: Option<String> = None;
    // The property an indented line belongs to: a nested block's parent (`s3`) or
    // a value being continued.
    let mut last: Option<(String, bool)> = None;
    for (i, raw) in text.lines().enumerate() {
        let err = |reason: &str| AwsConfigError::Parse {
            path: path.to_path_buf(),
            line: i + 1,
            reason: reason.into(),
        };
        let line = strip_comment(raw);
        if line.trim().is_empty() {
            continue;
        }
        let indented = line.starts_with([' ', '\t']);
        let line = line.trim();
        if let Some(rest) = line.strip_prefix('[') {
            let name = rest
                .strip_suffix(']')
                .ok_or_else(|| err("a section header ends with ]"))?
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ");
            if name.is_empty() {
                return Err(err("a section header names a section: [NAME]"));
            }
            sections.entry(name.clone()).or_default();
            current = Some(name);
            last = None;
            continue;
        }
        let Some(section) = current.as_ref() else {
            return Err(err("a property before any [section]"));
        };
        let props = sections.entry(section.clone()).or_default();
        match (indented, &last) {
            (true, Some((parent, true))) => {
                let (k, v) = line
                    .split_once('=')
                    .ok_or_else(|| err("a nested property is `key = value`"))?;
                props.insert(format!("{parent}.{}", k.trim()), v.trim().to_string());
            }
            (true, Some((key, false))) => {
                let value = props.entry(key.clone()).or_default();
                value.push('\n');
                value.push_str(line);
            }
            _ => {
                let (k, v) = line
                    .split_once('=')
                    .ok_or_else(|| err("a property is `key = value`"))?;
                let (k, v) = (k.trim(), v.trim());
                if k.is_empty() {
                    return Err(err("a property has a name before its `=`"));
                }
                // `s3 =` opens a nested block; a property with a value may be
                // continued on indented lines.
                last = Some((k.to_string(), v.is_empty()));
                if !v.is_empty() {
                    props.insert(k.to_string(), v.to_string());
                }
            }
        }
    }
    Ok(sections)
}

/// `line` without its comment: all of it when it starts with `#` or `;`, else
/// from a `#` or `;` that follows a blank. A value never holds a blank followed
/// by one of them (keys, tokens, regions and URLs have no blanks).
fn strip_comment(line: &str) -> &str {
    if line.trim_start().starts_with(['#', ';']) {
        return "";
    }
    let bytes = line.as_bytes();
    for i in 1..bytes.len() {
        if matches!(bytes[i], b'#' | b';') && matches!(bytes[i - 1], b' ' | b'\t') {
            return &line[..i];
        }
    }
    line
}

/// A profile's settings, from both shared files.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Profile {
    pub name: String,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub session_token: Option<String>,
    pub region: Option<String>,
    /// The `s3 =` block's `endpoint_url`, else the profile's own.
    pub endpoint_url: Option<String>,
    pub ca_bundle: Option<PathBuf>,
    /// Where `ca_bundle` was read, for errors about the bundle.
    pub config_file: Option<PathBuf>,
}

impl std::fmt::Debug for Profile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redact = |s: &Option<String>| s.as_ref().map(|_| "<redacted>");
        f.debug_struct("Profile")
            .field("name", &self.name)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &redact(&self.secret_access_key))
            .field("session_token", &redact(&self.session_token))
            .field("region", &self.region)
            .field("endpoint_url", &self.endpoint_url)
            .field("ca_bundle", &self.ca_bundle)
            .finish()
    }
}

/// Reads `path`, a missing file being an empty one (most nodes have no
/// `~/.aws`); any other failure (a directory, no permission) is an error.
fn read_optional(
    path: Option<&Path>,
    what: &'static str,
    var: &'static str,
) -> Result<Option<HashMap<String, Properties>>, AwsConfigError> {
    let Some(path) = path else { return Ok(None) };
    match std::fs::read_to_string(path) {
        Ok(text) => parse(path, &text).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(AwsConfigError::Read {
            what,
            var,
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Loads profile `name` from the credentials file and the config file. `explicit`
/// says the user named it (`AWS_PROFILE`): then a profile in neither file is an
/// error; the `default` profile, when not named, may be missing (`Ok(None)`).
pub fn load_profile(
    name: &str,
    explicit: bool,
    credentials_file: Option<&Path>,
    config_file: Option<&Path>,
) -> Result<Option<Profile>, AwsConfigError> {
    let creds = read_optional(
        credentials_file,
        "credentials file",
        "AWS_SHARED_CREDENTIALS_FILE",
    )?;
    let config = read_optional(config_file, "config file", "AWS_CONFIG_FILE")?;
    let mut merged: Option<Properties> = None;
    if let Some(config) = config {
        // `[profile default]` and `[default]` both name the default profile; the
        // prefixed form wins, as in the CLI.
        let bare = (name == "default").then(|| config.get("default")).flatten();
        for section in [bare, config.get(&format!("profile {name}"))]
            .into_iter()
            .flatten()
        {
            merged
                .get_or_insert_with(Properties::new)
                .extend(section.clone());
        }
    }
    if let Some(section) = creds.as_ref().and_then(|c| c.get(name)) {
        merged
            .get_or_insert_with(Properties::new)
            .extend(section.clone());
    }
    let Some(mut props) = merged else {
        if explicit {
            return Err(AwsConfigError::NoSuchProfile {
                profile: name.into(),
                credentials_file: credentials_file.map(Path::to_path_buf),
                config_file: config_file.map(Path::to_path_buf),
            });
        }
        return Ok(None);
    };
    let mut take = |k: &str| props.remove(k).filter(|v| !v.is_empty());
    let profile = Profile {
        name: name.into(),
        access_key_id: take("aws_access_key_id"),
        secret_access_key: take("aws_secret_access_key"),
        session_token: take("aws_session_token"),
        region: take("region"),
        endpoint_url: take("s3.endpoint_url").or_else(|| take("endpoint_url")),
        ca_bundle: take("ca_bundle").map(PathBuf::from),
        config_file: config_file.map(Path::to_path_buf),
    };
    match (&profile.access_key_id, &profile.secret_access_key) {
        (Some(_), None) => Err(AwsConfigError::PartialKeys {
            profile: name.into(),
            has: "aws_access_key_id",
            missing: "aws_secret_access_key",
        }),
        (None, Some(_)) => Err(AwsConfigError::PartialKeys {
            profile: name.into(),
            has: "aws_secret_access_key",
            missing: "aws_access_key_id",
        }),
        _ => Ok(Some(profile)),
    }
}

/// The certificates of the PEM file at `path`, which `from` (the variable or the
/// profile) named. A file that cannot be read, does not parse or holds no
/// certificate is an error: a bundle that was asked for and silently left out
/// would fail later as an unknown issuer, far from its cause.
pub fn read_ca_bundle(path: &Path, from: &str) -> Result<Vec<Certificate>, AwsConfigError> {
    let pem = std::fs::read(path).map_err(|source| AwsConfigError::CaBundleRead {
        path: path.to_path_buf(),
        from: from.into(),
        source,
    })?;
    let parse_err = |reason: String| AwsConfigError::CaBundleParse {
        path: path.to_path_buf(),
        from: from.into(),
        reason,
    };
    // Each certificate is checked here, as a trust anchor (what rustls does with a
    // root): reqwest's own PEM reader only decodes base64, so a damaged
    // certificate would otherwise pass and fail the first connection instead.
    let mut certs = Vec::new();
    for (i, der) in CertificateDer::pem_slice_iter(&pem).enumerate() {
        let n = i + 1;
        let der = der.map_err(|e| parse_err(format!("certificate {n}: {e}")))?;
        rustls::RootCertStore::empty()
            .add(der.clone())
            .map_err(|e| parse_err(format!("certificate {n}: {e}")))?;
        certs.push(
            Certificate::from_der(&der).map_err(|e| parse_err(format!("certificate {n}: {e}")))?,
        );
    }
    if certs.is_empty() {
        return Err(parse_err(
            "it holds no -----BEGIN CERTIFICATE----- block".into(),
        ));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sections(text: &str) -> HashMap<String, Properties> {
        parse(Path::new("test"), text).unwrap()
    }

    #[test]
    fn ini_comments_spaces_and_nesting() {
        let s = sections(
            "# a comment\n\
             ; another\n\
             [default]\n\
             region=eu-west-1\n\
             [profile  x ]\n\
             \x20 region   =   us-west-2   # inline comment\n\
             output = json;not-a-comment\n\
             s3 =\n\
             \x20 endpoint_url = http://127.0.0.1:9000\n\
             \x20 addressing_style = path\n\
             endpoint_url = https://global.example\n\
             [x]\n\
             region = ignored-in-config\n",
        );
        assert_eq!(s["default"]["region"], "eu-west-1");
        let x = &s["profile x"];
        assert_eq!(x["region"], "us-west-2");
        assert_eq!(x["output"], "json;not-a-comment");
        assert_eq!(x["s3.endpoint_url"], "http://127.0.0.1:9000");
        assert_eq!(x["s3.addressing_style"], "path");
        assert_eq!(x["endpoint_url"], "https://global.example");
        assert!(!x.contains_key("s3"));
        assert_eq!(s["x"]["region"], "ignored-in-config");
    }

    #[test]
    fn ini_continuation_and_merge() {
        let s = sections("[a]\nk = one\n  two\n[b]\nk = 1\n[a]\nj = 2\n");
        assert_eq!(s["a"]["k"], "one\ntwo");
        assert_eq!(s["a"]["j"], "2");
        assert_eq!(s["b"]["k"], "1");
    }

    #[test]
    fn ini_errors_name_the_line() {
        for (text, line, want) in [
            ("k = v\n", 1, "before any [section]"),
            ("[a]\n\njust words\n", 3, "key = value"),
            ("[a\n", 1, "ends with ]"),
            ("[ ]\n", 1, "names a section"),
            ("[a]\n = v\n", 2, "name before"),
        ] {
            let e = parse(Path::new("/f"), text).unwrap_err();
            let msg = e.to_string();
            assert!(msg.starts_with(&format!("/f:{line}: ")), "{msg}");
            assert!(msg.contains(want), "{want:?} in {msg}");
        }
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn profiles_from_both_files() {
        let dir = tempfile::tempdir().unwrap();
        let creds = write(
            dir.path(),
            "credentials",
            "[default]\naws_access_key_id = DID\naws_secret_access_key = DSECRET\n\
             [profile x]\naws_access_key_id = WRONG\naws_secret_access_key = WRONG\n\
             [x]\naws_access_key_id = XID\naws_secret_access_key = XSECRET\n\
             aws_session_token = XTOKEN\n",
        );
        let config = write(
            dir.path(),
            "config",
            "[default]\nregion = eu-west-1\n\
             [x]\nregion = not-a-profile-in-config\n\
             [profile x]\nregion = us-west-2\naws_access_key_id = CONFIG-ID\n\
             endpoint_url = https://global.example\ns3 =\n  endpoint_url = https://s3.example\n\
             ca_bundle = /etc/ca.pem\n",
        );
        let x = load_profile("x", true, Some(&creds), Some(&config))
            .unwrap()
            .unwrap();
        assert_eq!(
            x.access_key_id.as_deref(),
            Some("XID"),
            "credentials file wins"
        );
        assert_eq!(x.secret_access_key.as_deref(), Some("XSECRET"));
        assert_eq!(x.session_token.as_deref(), Some("XTOKEN"));
        assert_eq!(x.region.as_deref(), Some("us-west-2"));
        assert_eq!(x.endpoint_url.as_deref(), Some("https://s3.example"));
        assert_eq!(x.ca_bundle.as_deref(), Some(Path::new("/etc/ca.pem")));
        let shown = format!("{x:?}");
        assert!(
            !shown.contains("XSECRET") && !shown.contains("XTOKEN"),
            "{shown}"
        );

        let d = load_profile("default", false, Some(&creds), Some(&config))
            .unwrap()
            .unwrap();
        assert_eq!(d.access_key_id.as_deref(), Some("DID"));
        assert_eq!(d.region.as_deref(), Some("eu-west-1"));
        assert_eq!(d.endpoint_url, None);
    }

    #[test]
    fn a_named_profile_must_exist_the_default_need_not() {
        let dir = tempfile::tempdir().unwrap();
        let creds = write(
            dir.path(),
            "credentials",
            "[other]\naws_access_key_id = a\n",
        );
        let missing = dir.path().join("no-config");
        let e = load_profile("nope", true, Some(&creds), Some(&missing)).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, AwsConfigError::NoSuchProfile { .. }), "{msg}");
        assert!(
            msg.contains("\"nope\"") && msg.contains("AWS_PROFILE"),
            "{msg}"
        );
        assert!(msg.contains(&creds.display().to_string()), "{msg}");
        assert!(msg.contains(&missing.display().to_string()), "{msg}");
        assert_eq!(
            load_profile("default", false, Some(&creds), Some(&missing)).unwrap(),
            None
        );
        assert_eq!(load_profile("default", false, None, None).unwrap(), None);
        // `AWS_PROFILE=default` names it: then it must exist too.
        assert!(load_profile("default", true, Some(&creds), None).is_err());
    }

    #[test]
    fn half_a_key_pair_in_a_profile_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let creds = write(dir.path(), "credentials", "[p]\naws_access_key_id = a\n");
        let msg = load_profile("p", true, Some(&creds), None)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("aws_secret_access_key"), "{msg}");
    }

    #[test]
    fn an_unreadable_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where the file should be.
        let msg = load_profile("default", false, Some(dir.path()), None)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("credentials file"), "{msg}");
        assert!(msg.contains("AWS_SHARED_CREDENTIALS_FILE"), "{msg}");
        assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
    }

    #[test]
    fn ca_bundle_errors_name_the_file_and_the_variable() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let msg = read_ca_bundle(&missing, "AWS_CA_BUNDLE")
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("missing.pem") && msg.contains("AWS_CA_BUNDLE"),
            "{msg}"
        );
        let junk = write(dir.path(), "junk.pem", "not a certificate\n");
        let msg = read_ca_bundle(&junk, "AWS_CA_BUNDLE")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("junk.pem") && msg.contains("PEM"), "{msg}");
        let bad = write(
            dir.path(),
            "bad.pem",
            "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n",
        );
        let msg = read_ca_bundle(&bad, "AWS_CA_BUNDLE")
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("bad.pem") && msg.contains("certificate 1"),
            "{msg}"
        );
    }

    #[test]
    fn ca_bundle_reads_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let a = rcgen::generate_simple_self_signed(vec!["a.test".into()]).unwrap();
        let b = rcgen::generate_simple_self_signed(vec!["b.test".into()]).unwrap();
        let pem = format!("{}\n{}", a.cert.pem(), b.cert.pem());
        let path = write(dir.path(), "ca.pem", &pem);
        assert_eq!(read_ca_bundle(&path, "AWS_CA_BUNDLE").unwrap().len(), 2);
    }
}
