//! Issue 20: a spec can neither write nor read outside the project, nor put markup into the
//! HTML report. Each test is a reproduction from the issue, run through the binary where the
//! command line is involved.

mod common;

use std::path::Path;

use common::{project, reprise, walk};

fn edit_spec(p: &Path, edit: impl Fn(String) -> String) {
    let spec = p.join("reports/tiny.toml");
    let text = std::fs::read_to_string(&spec).unwrap();
    std::fs::write(&spec, edit(text)).unwrap();
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// Issue 20, defect 3: table and figure ids and profile names that are paths are spec errors
/// (exit 2), and nothing is written, inside the project or out of it.
#[test]
fn issue_20_ids_and_profiles_that_are_paths_write_nothing_anywhere() {
    let outside = tempfile::tempdir().unwrap();
    let p = project("paths-ids");
    let abs = outside.path().join("x");
    edit_spec(p.path(), |t| {
        t.replacen("id = \"imb\"", "id = \"../../../../x\"", 1).replacen("id = \"drift\"", &format!("id = \"{}\"", abs.display()), 1).replace("[profiles.long]", "[profiles.\"../../../../escape\"]")
    });
    let out = reprise(p.path(), &["run", "reports/tiny.toml"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("table id `../../../../x` must be a non-empty name") && err.contains("reports/tiny.toml:26:"), "{err}");
    assert!(err.contains(&format!("figure id `{}`", abs.display())), "{err}");
    assert!(err.contains("profile name `../../../../escape`"), "{err}");
    assert!(walk(outside.path()).is_empty());
    assert!(!p.path().join("artifacts/tiny").exists());

    let p = project("paths-profile");
    let out = reprise(p.path(), &["run", "reports/tiny.toml", "--profile", "../../../../escape"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("in the argument `--profile ../../../../escape`"), "{}", stderr(&out));
    assert!(!p.path().join("artifacts").exists() || walk(&p.path().join("artifacts")).iter().all(|f| !f.to_string_lossy().contains("escape")));
}

/// Issue 20, defect 4: the template comes from `templates/` and a manifest from
/// `data-manifests/`, nowhere else; an unknown manifest is placed in the spec with the names
/// that exist.
#[test]
fn issue_20_template_and_manifest_are_read_from_their_folders_only() {
    let p = project("paths-read");
    std::fs::write(p.path().join("secret.toml"), "licence = \"do not copy\"\n").unwrap();
    for template in ["../../../../etc/passwd", "/etc/passwd", "../secret.toml"] {
        edit_spec(p.path(), |t| {
            let line = t.lines().find(|l| l.starts_with("template = ")).unwrap().to_string();
            t.replace(&line, &format!("template = \"{template}\""))
        });
        let out = reprise(p.path(), &["run", "reports/tiny.toml"]);
        assert_eq!(out.status.code(), Some(2), "{template}: {}", stderr(&out));
        assert!(stderr(&out).contains(&format!("template `{template}` must be a relative path inside")), "{}", stderr(&out));
        assert!(!p.path().join("artifacts/tiny/report.md").exists());
    }

    let p = project("paths-manifest");
    std::fs::write(p.path().join("secret.toml"), "").unwrap();
    edit_spec(p.path(), |t| t.replace("manifest = \"optdigits-8x8\"", "manifest = \"../secret\""));
    let out = reprise(p.path(), &["run", "reports/tiny.toml"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("manifest name `../secret` must be a non-empty name"), "{}", stderr(&out));

    edit_spec(p.path(), |t| t.replace("manifest = \"../secret\"", "manifest = \"optdigits-8x9\""));
    let out = reprise(p.path(), &["run", "reports/tiny.toml"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("unknown manifest `optdigits-8x9`") && err.contains("reports/tiny.toml:8:12") && err.contains("did you mean `optdigits-8x8`?"), "{err}");
}

/// Issue 20, defect 10: `--set` values that are not TOML say so, and are blamed on the `--set`.
#[test]
fn issue_20_bad_set_values_are_named_on_the_set() {
    let p = project("paths-set");
    for (set, says) in [("defaults.epochs=[1,2", "is not a valid TOML value"), ("defaults.epochs=1e400", "is out of range for a number"), ("report.title=a\nb", "contains a line break")] {
        let out = reprise(p.path(), &["run", "reports/tiny.toml", "--set", set]);
        assert_eq!(out.status.code(), Some(2), "{set}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains(says) && err.contains(&format!("in the override `--set {set}`")), "{set}: {err}");
        assert!(!err.contains("found a string"), "{err}");
    }
    // Shown at the experiment, caused by the `--set`.
    let out = reprise(p.path(), &["run", "reports/tiny.toml", "--set", "defaults.analyze_freq=5"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("in the override `--set defaults.analyze_freq=5`"), "{}", stderr(&out));
}

/// Issue 20, defect 10: a spec path that is a directory, a device or a FIFO says what it is
/// (and reading the FIFO, which would block, is never tried).
#[test]
fn issue_20_a_spec_that_is_not_a_regular_file_says_what_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let e = reprise::spec::load(dir.path(), "quick", &[]).unwrap_err();
    assert!(e.to_string().ends_with("it is a directory"), "{e}");
    let e = reprise::spec::load(Path::new("/dev/null"), "quick", &[]).unwrap_err();
    assert!(e.to_string().contains("it is a device, not a regular file"), "{e}");
    let fifo = dir.path().join("spec.toml");
    if std::process::Command::new("mkfifo").arg(&fifo).status().is_ok_and(|s| s.success()) {
        let e = reprise::spec::load(&fifo, "quick", &[]).unwrap_err();
        assert!(e.to_string().contains("named pipe"), "{e}");
    }
    let e = reprise::spec::load(&dir.path().join("missing.toml"), "quick", &[]).unwrap_err();
    assert!(matches!(e, reprise::spec::LoadError::Io { .. }), "{e}");
}

/// Issue 20, defect 6: markup in the report title, an experiment title, a table and figure
/// title and a claim's text reaches report.md as written and report.html only as text.
#[test]
fn issue_20_markup_in_the_spec_is_text_in_report_html() {
    let p = project("paths-html");
    edit_spec(p.path(), |t| {
        t.replace("title = \"Tiny\"", "title = \"Tiny <script>alert(1)</script>\"")
            .replace("title = \"Imbalance\"", "title = \"Imbalance <script>alert(2)</script>\"")
            .replace("title = \"Drift\"", "title = \"Drift <img src=x onerror=alert(3)>\"")
            .replace("text = \"Drift grows with imbalance.\"", "text = \"Drift <script>alert(4)</script> grows.\"")
    });
    let out = reprise(p.path(), &["run", "reports/tiny.toml", "--jobs", "2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let html = std::fs::read_to_string(p.path().join("artifacts/tiny/report.html")).unwrap();
    assert!(!html.contains("<script") && !html.contains("<img"), "{html}");
    assert!(html.contains("<title>Tiny &lt;script&gt;alert(1)&lt;/script&gt;</title>"), "{html}");
    assert!(html.contains("Drift &lt;script&gt;alert(4)&lt;/script&gt; grows."), "{html}");
    let md = std::fs::read_to_string(p.path().join("artifacts/tiny/report.md")).unwrap();
    assert!(md.starts_with("# Tiny <script>alert(1)</script>"), "{md}");
}
