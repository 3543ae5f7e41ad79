use super::*;

#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
struct WithSource {
    path: String,
    source: std::io::Error,
}

#[test]
fn an_os_error_is_printed_once() {
    let e = anyhow::Error::new(WithSource { path: "x/y".into(), source: std::io::Error::other("disk full") }).context("writing the report");
    assert_eq!(chain(&e), "writing the report: x/y: disk full");
    // A cause that adds something is kept.
    let e = anyhow::Error::new(std::io::Error::other("disk full")).context("x/y");
    assert_eq!(chain(&e), "x/y: disk full");
}
