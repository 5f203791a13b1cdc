//! One line for an error and its causes, for the places where an error becomes
//! text inside the library: a log line, or a refusal sent to a client. It is what
//! `anyhow`'s `{:#}` prints in the binary ("a: b: c"), without taking `anyhow`
//! into the library.

/// `e` and each of its sources, joined by ": ".
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_cause_once_in_order() {
        let e = crate::munge::MungeError::Spawn {
            program: "unmunge",
            hint: "",
            source: std::io::Error::from_raw_os_error(libc::ENOENT),
        };
        assert_eq!(
            chain(&e),
            format!(
                "running `unmunge`: {}",
                std::io::Error::from_raw_os_error(libc::ENOENT)
            )
        );
    }
}
