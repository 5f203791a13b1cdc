//! How the binaries print an error: the whole chain of causes, each cause once.
//!
//! `{:#}` on an `anyhow::Error` joins every cause with `: `. Many of our error
//! types, and those of the crates below us (object_store, quinn, std::io through
//! them), already put their source into their own message, so that form printed
//! one cause two to four times ("cannot reopen /x: No such file or directory: No
//! such file or directory"). Rewriting every Display to leave its source out would
//! not reach the crates we do not own, so the chain is joined here instead: a cause
//! whose text the message already holds adds nothing and is left out.

use std::error::Error;

/// The message of `top` followed by each cause that says something new.
pub fn chain<'a>(causes: impl IntoIterator<Item = &'a (dyn Error + 'static)>) -> String {
    let mut text = String::new();
    for cause in causes {
        let t = cause.to_string();
        if t.is_empty() || text.contains(&t) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&t);
    }
    text
}

/// [`chain`] of one error and its sources.
pub fn error_chain(e: &(dyn Error + 'static)) -> String {
    chain(std::iter::successors(Some(e), |&e| e.source()))
}

#[cfg(test)]
mod tests {
    use super::error_chain;

    #[derive(Debug, thiserror::Error)]
    enum Inner {
        #[error("cannot open {path}: {source}")]
        Open {
            path: String,
            #[source]
            source: std::io::Error,
        },
    }

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error(transparent)]
        Inner(#[from] Inner),
        #[error("restore failed: {0}")]
        Wrapped(#[source] Inner),
        #[error("dump of PID 7 failed")]
        Plain(#[source] Inner),
    }

    fn inner() -> Inner {
        Inner::Open {
            path: "/x".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        }
    }

    #[test]
    fn each_cause_is_printed_once() {
        let io = std::io::Error::from(std::io::ErrorKind::NotFound).to_string();
        for (e, want) in [
            (Outer::Inner(inner()), format!("cannot open /x: {io}")),
            (
                Outer::Wrapped(inner()),
                format!("restore failed: cannot open /x: {io}"),
            ),
            (
                Outer::Plain(inner()),
                format!("dump of PID 7 failed: cannot open /x: {io}"),
            ),
        ] {
            let got = error_chain(&e);
            assert_eq!(got, want);
            assert_eq!(got.matches(&io).count(), 1, "{got}");
        }
    }

    #[test]
    fn an_anyhow_context_chain_is_printed_once_per_cause() {
        let e = anyhow::Error::from(Outer::Wrapped(inner())).context("ckpt-agent restore");
        let got = super::chain(e.chain());
        assert_eq!(
            got,
            format!(
                "ckpt-agent restore: restore failed: cannot open /x: {}",
                std::io::Error::from(std::io::ErrorKind::NotFound)
            )
        );
        // What `{:#}` printed before: the io error three times.
        assert_eq!(format!("{e:#}").matches("entity not found").count(), 3);
    }
}
