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

#[test]
fn repeated_flags_are_quoted_for_a_shell() {
    let opts = SpecOpts { profile: "paper".into(), sets: vec!["defaults.epochs=2".into(), "report.title=it's".into()], cache: Some(PathBuf::from("/tmp/my store")) };
    assert_eq!(repeat_flags(&opts), " --profile paper --set defaults.epochs=2 --set 'report.title=it'\\''s' --cache '/tmp/my store'");
    let none = SpecOpts { profile: DEFAULT_PROFILE.into(), sets: vec![], cache: None };
    assert_eq!(repeat_flags(&none), "");
}
