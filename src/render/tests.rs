//! Rendering of hostile spec text, and the template check that runs before any cell.

use std::path::{Path, PathBuf};

use super::*;
use crate::frames::Frames;
use crate::spec;

/// A project folder with `templates/` (the real base page and `tpl` as `t.md.j2`) and an empty
/// manifest, as `spec::parse` needs.
fn project(tag: &str, tpl: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new().prefix(tag).tempdir().unwrap();
    let p = dir.path();
    std::fs::create_dir_all(p.join("templates")).unwrap();
    std::fs::create_dir_all(p.join("data-manifests")).unwrap();
    std::fs::write(p.join("data-manifests/mnist-5k.toml"), "").unwrap();
    std::fs::copy(Path::new(env!("CARGO_MANIFEST_DIR")).join("templates/base.html.j2"), p.join("templates/base.html.j2")).unwrap();
    std::fs::write(p.join("templates/t.md.j2"), tpl).unwrap();
    dir
}

fn spec_in(root: &Path, text: &str) -> Spec {
    spec::parse(text, &PathBuf::from("reports/demo.toml"), root, "quick", &[]).unwrap_or_else(|e| panic!("{e}"))
}

/// A spec whose every free-text field carries markup, with one table, figure and claim.
const HOSTILE: &str = r#"
[report]
id = "demo"
title = "Demo <script>alert('title')</script>"
document = "doc <b>x</b>"
template = "t.md.j2"

[data.mnist]
manifest = "mnist-5k"

[defaults]
epochs = 5

[experiments.e1]
title = "<script>alert('experiment')</script>"
description = "<img src=x onerror=alert(1)> [click](javascript:alert(1))"
grid = { imbalance = [1.0, 0.1] }

[[tables]]
id = "t1"
experiment = "e1"
title = "<script>alert('table')</script>"
metrics = ["accuracy"]
caption = "<iframe src=x>"

[[figures]]
id = "f1"
experiment = "e1"
title = "<script>alert('figure')</script>"
kind = "epochs"
y = "accuracy"

[[claims]]
id = "c1"
text = "<script>alert('claim')</script> & [link](javascript:alert(2))"
source = "ours"
experiment = "e1"
kind = "change"
metric = "accuracy"
min = 0.0
"#;

const TEMPLATE: &str = "# {{ report.title }}\n\nFrom `{{ report.document }}`, {{ report.document }}.\n\n{% for e in experiments %}- {{ e.title }}: {{ e.description }}\n{% endfor %}\n| claim | verdict |\n|---|---|\n{% for c in claims %}| {{ c.text }} | {{ c.verdict }} |\n{% endfor %}\n{{ table(\"t1\") }}\n\n{{ figure(\"f1\") }}\n\n{{ claim(\"c1\") }}\n";

/// Issue 20, defect 6: no spec string reaches report.html as markup, nor as a `javascript:`
/// link; report.md keeps the text as written.
#[test]
fn issue_20_spec_text_is_escaped_in_html_and_kept_in_markdown() {
    let dir = project("render-hostile", TEMPLATE);
    let spec = spec_in(dir.path(), HOSTILE);
    let out = dir.path().join("out");
    let r = render(&spec, &Frames::default(), &out).unwrap();
    let html = std::fs::read_to_string(&r.html).unwrap();
    for bad in ["<script", "<img", "<iframe", "<b>x", "href=\"javascript"] {
        assert!(!html.contains(bad), "`{bad}` reached report.html:\n{html}");
    }
    // Markdown links in spec text still render, but not to script.
    assert!(html.contains("<a href=\"#\">click</a>"), "{html}");
    assert!(html.contains("<title>Demo &lt;script&gt;alert('title')&lt;/script&gt;</title>"), "{html}");
    assert!(html.contains("&lt;script&gt;alert('claim')&lt;/script&gt; &amp; "), "{html}");
    assert!(html.contains("Figure f1:</b> &lt;script&gt;alert('figure')"), "{html}");
    let md = std::fs::read_to_string(&r.markdown).unwrap();
    assert!(md.starts_with("# Demo <script>alert('title')</script>\n"), "{md}");
    assert!(md.contains("- <script>alert('experiment')</script>: <img src=x onerror=alert(1)> [click](javascript:alert(1))"), "{md}");
}

/// Ids land in `id="…"` attributes: quotes are escaped, so an id cannot leave the attribute.
#[test]
fn issue_20_ids_cannot_leave_their_attribute() {
    let fig = figure_html("a\" onload=\"alert(1)", "t", "<svg></svg>");
    assert!(fig.contains("id=\"figure-a&quot; onload=&quot;alert(1)\""), "{fig}");
    let r = claims::ClaimResult {
        id: "c\"><script>".into(),
        text: "t".into(),
        source: "ours".into(),
        cite: Some("<b>".into()),
        verdict: claims::Verdict::NotMeasured,
        measured: "m".into(),
        value: None,
        interval: None,
        n: 0,
        power: None,
        gate: false,
    };
    let h = claims::html(&r);
    assert!(h.contains("id=\"claim-c&quot;&gt;&lt;script&gt;\""), "{h}");
    assert!(h.contains("source: ours (&lt;b&gt;)"), "{h}");
}

#[test]
fn markdown_that_becomes_html_is_escaped_the_way_markdown_reads_it() {
    assert_eq!(md_esc("a < b & \"c\" > d"), "a &lt; b &amp; &quot;c&quot; &gt; d");
    // The same bytes out of pulldown-cmark for ordinary text with or without the escaping.
    let html = |s: &str| {
        let mut out = String::new();
        pulldown_cmark::html::push_html(&mut out, pulldown_cmark::Parser::new(s));
        out
    };
    for text in ["x & y \"quoted\" it's > 3", "| a | b > c |", "ρ ≥ 0.5 (n = 3)"] {
        assert_eq!(html(&md_esc(text)), html(text), "{text}");
    }
}

const SPEC_FOR_CHECK: &str = r#"
[report]
id = "demo"
title = "Demo"
template = "t.md.j2"

[data.mnist]
manifest = "mnist-5k"

[experiments.e1]
title = "E"
grid = { imbalance = [1.0, 0.1] }

[[tables]]
id = "imbalance"
experiment = "e1"
title = "T"
metrics = ["accuracy"]

[[claims]]
id = "drift"
text = "T"
source = "ours"
experiment = "e1"
kind = "change"
metric = "accuracy"
min = 0.0
"#;

/// Issue 20, defect 9: a template's mistakes are found from the spec alone, before training.
#[test]
fn issue_20_check_template_finds_every_unknown_call_before_any_run() {
    let good = "# {{ report.title }}\n{{ table(\"imbalance\") }}\n{{ claim('drift') }}\n{% for c in claims %}{{ c.text }} {{ c.verdict }} {{ c.measured }}{% endfor %}\n";
    let dir = project("check-good", good);
    check_template(&spec_in(dir.path(), SPEC_FOR_CHECK)).unwrap();

    let bad = "# {{ report.title }}\n{{ table(\"imbalanse\") }}\n{% if false %}{{ figure(\"nope\") }}{% endif %}\n{{ claim(\"drift\") }}\n";
    let dir = project("check-bad", bad);
    let e = check_template(&spec_in(dir.path(), SPEC_FOR_CHECK)).unwrap_err();
    let RenderError::UnknownCalls { problems, .. } = &e else { panic!("{e}") };
    assert_eq!(problems.len(), 2, "{e}");
    assert!(problems[0].contains("line 2: table(\"imbalanse\"): no table `imbalanse`") && problems[0].contains("did you mean `imbalance`?"), "{e}");
    // A call on a branch that does not render is still found in the text.
    assert!(problems[1].contains("line 3: figure(\"nope\")") && problems[1].contains("the spec declares no figures"), "{e}");

    // A syntax error and an unknown variable are template errors too.
    let dir = project("check-syntax", "{{ table(\"imbalance\") \n");
    assert!(matches!(check_template(&spec_in(dir.path(), SPEC_FOR_CHECK)), Err(RenderError::Template { .. })));
    let dir = project("check-var", "{{ report.titel }}\n");
    assert!(matches!(check_template(&spec_in(dir.path(), SPEC_FOR_CHECK)), Err(RenderError::Template { .. })));
    std::fs::write(dir.path().join("templates/base.html.j2"), "{% if %}").unwrap();
    assert!(matches!(check_template(&spec_in(dir.path(), SPEC_FOR_CHECK)), Err(RenderError::Template { path, .. }) if path.ends_with("base.html.j2")));
    // An id computed at render time is checked on the path rendering takes.
    let dir = project("check-dynamic", "{% for id in ['imbalance', 'other'] %}{{ table(id) }}{% endfor %}\n");
    let e = check_template(&spec_in(dir.path(), SPEC_FOR_CHECK)).unwrap_err();
    assert!(e.to_string().contains("table(\"other\")") && !e.to_string().contains("line "), "{e}");
}

#[test]
fn literal_calls_are_whole_words_with_a_literal_id() {
    let calls = literal_calls("{{ table(\"a\") }} {{ subtable(\"b\") }}\n{{ figure( 'c' ) }} {{ claim(x) }} {{ x.claim(\"d\") }}");
    assert_eq!(calls, vec![(Call::Table, "a".to_string(), 1), (Call::Figure, "c".to_string(), 2)]);
}

/// Rendering refuses a template outside `templates/` even for a `Spec` that skipped `parse`.
#[test]
fn issue_20_render_reads_templates_from_the_templates_folder_only() {
    let dir = project("render-confined", "x");
    let mut spec = spec_in(dir.path(), SPEC_FOR_CHECK);
    spec.report.template = "../data-manifests/mnist-5k.toml".into();
    let e = render(&spec, &Frames::default(), &dir.path().join("out")).unwrap_err();
    assert!(matches!(e, RenderError::TemplatePath { .. }), "{e}");
    assert!(matches!(check_template(&spec), Err(RenderError::TemplatePath { .. })));
}
