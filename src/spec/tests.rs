//! Spec parsing and validation: every error names its place and gives a hint.

use std::path::{Path, PathBuf};

use super::*;

fn root() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("reprise-spec-tests-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("templates")).unwrap();
    std::fs::write(dir.join("templates/t.md.j2"), "x").unwrap();
    dir
}

const BASE: &str = r#"
[report]
id = "demo"
title = "Demo"
template = "t.md.j2"

[data.mnist]
manifest = "mnist-5k"

[defaults]
epochs = 3
analyze_freq = 1

[experiments.e1]
title = "Imbalance"
grid = { imbalance = [1.0, 0.1] }
seeds = [0, 1]
"#;

fn parse_ok(text: &str, sets: &[&str]) -> Spec {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    match parse(text, Path::new("reports/demo.toml"), &root(), "quick", &sets) {
        Ok(s) => s,
        Err(e) => panic!("unexpected error:\n{e}"),
    }
}

fn parse_err(text: &str, profile: &str, sets: &[&str]) -> SpecError {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    parse(text, Path::new("reports/demo.toml"), &root(), profile, &sets).expect_err("expected an error")
}

#[test]
fn grid_expands_over_seeds() {
    let s = parse_ok(BASE, &[]);
    let e = &s.experiments[0];
    assert_eq!(e.axes, vec!["imbalance"]);
    assert_eq!(e.runs.len(), 4);
    assert_eq!(e.runs[0].label(), "imbalance=1.0 seed=0");
    assert_eq!(e.runs[3].params["imbalance"], ParamValue::Float(0.1));
    assert_eq!(e.runs[3].params["epochs"], ParamValue::Int(3));
    // Schema defaults fill what the spec leaves out.
    assert_eq!(e.runs[0].params["loss"], ParamValue::Str("ce".into()));
}

#[test]
fn unknown_key_in_a_section_is_located_with_a_suggestion() {
    let text = BASE.replace("title = \"Demo\"", "titel = \"Demo\"");
    let e = parse_err(&text, "quick", &[]);
    let d = &e.diagnostics[0];
    assert!(d.message.contains("unknown field `titel`"), "{e}");
    assert_eq!(d.hint.as_deref(), Some("did you mean `title`?"));
    match &d.origin {
        Origin::File { line, col, .. } => assert_eq!((*line, *col), (4, 1)),
        o => panic!("{o:?}"),
    }
}

#[test]
fn unknown_parameter_and_bad_values_are_all_reported_at_once() {
    let text = BASE.replace("epochs = 3", "epochs = 0\nlearning_rate = 0.1").replace("[1.0, 0.1]", "[1.0, 0.0]");
    let e = parse_err(&text, "quick", &[]);
    let msgs: Vec<&str> = e.diagnostics.iter().map(|d| d.message.as_str()).collect();
    assert_eq!(e.diagnostics.len(), 3, "{e}");
    assert!(msgs.iter().any(|m| m.contains("`epochs` = 0 is out of range")), "{e}");
    assert!(msgs.iter().any(|m| m.contains("unknown parameter `learning_rate`")), "{e}");
    assert!(msgs.iter().any(|m| m.contains("`imbalance` = 0.0 is out of range")), "{e}");
    let text_e = e.to_string();
    assert!(text_e.contains("reports/demo.toml:12:"), "{text_e}");
    assert!(text_e.contains("3 problems"), "{text_e}");
}

#[test]
fn unknown_data_set_gets_did_you_mean() {
    let text = BASE.replace("grid = { imbalance = [1.0, 0.1] }", "grid = { dataset = [\"minst\"] }");
    let e = parse_err(&text, "quick", &[]);
    assert_eq!(e.diagnostics[0].message, "unknown data set `minst`");
    assert_eq!(e.diagnostics[0].hint.as_deref(), Some("did you mean `mnist`?"));
}

#[test]
fn empty_grid_and_empty_seeds_are_errors() {
    let text = BASE.replace("[1.0, 0.1]", "[]").replace("seeds = [0, 1]", "seeds = []");
    let e = parse_err(&text, "quick", &[]);
    assert_eq!(e.diagnostics.len(), 2, "{e}");
    assert!(e.to_string().contains("is empty"), "{e}");
}

#[test]
fn wrong_type_is_reported() {
    let text = BASE.replace("epochs = 3", "epochs = \"three\"");
    let e = parse_err(&text, "quick", &[]);
    assert!(e.diagnostics[0].message.contains("`epochs` must be an integer"), "{e}");
}

#[test]
fn malformed_toml_is_located() {
    let text = BASE.replace("epochs = 3", "epochs = ");
    let e = parse_err(&text, "quick", &[]);
    assert!(matches!(e.diagnostics[0].origin, Origin::File { line: 11, .. }), "{e}");
}

#[test]
fn set_overrides_are_applied_and_validated() {
    let s = parse_ok(BASE, &["defaults.epochs=5", "experiments.e1.grid.imbalance=[0.5]", "defaults.model=cnn"]);
    let e = &s.experiments[0];
    assert_eq!(e.runs.len(), 2);
    assert_eq!(e.runs[0].params["epochs"], ParamValue::Int(5));
    assert_eq!(e.runs[0].params["model"], ParamValue::Str("cnn".into()));
    assert_eq!(s.overrides.len(), 3);

    let e = parse_err(BASE, "quick", &["defaults.epoch=5"]);
    assert!(matches!(&e.diagnostics[0].origin, Origin::Override { arg } if arg == "defaults.epoch=5"), "{e}");
    assert_eq!(e.diagnostics[0].hint.as_deref(), Some("did you mean `epochs`?"));

    let e = parse_err(BASE, "quick", &["experiments.e9.grid.imbalance=[0.5]"]);
    assert!(e.to_string().contains("no key `e9`"), "{e}");

    let e = parse_err(BASE, "quick", &["defaults.imbalance=2"]);
    assert!(e.to_string().contains("out of range") && e.to_string().contains("--set defaults.imbalance=2"), "{e}");

    let e = parse_err(BASE, "quick", &["no-equals-sign"]);
    assert!(e.to_string().contains("key.path=value"), "{e}");
}

#[test]
fn profiles_are_overrides() {
    let text = format!("{BASE}\n[profiles.paper]\n\"defaults.epochs\" = 200\n");
    let sets: Vec<String> = vec![];
    let s = parse(&text, Path::new("reports/demo.toml"), &root(), "paper", &sets).unwrap();
    assert_eq!(s.experiments[0].runs[0].params["epochs"], ParamValue::Int(200));
    let e = parse_err(&text, "papr", &[]);
    assert_eq!(e.diagnostics[0].hint.as_deref(), Some("did you mean `paper`?"));
}

#[test]
fn explicit_points_pair_parameters() {
    let text = BASE.replace("grid = { imbalance = [1.0, 0.1] }", "points = [{ optimizer = \"sgd\", lr = 0.1 }, { optimizer = \"adam\", lr = 0.001 }]");
    let s = parse_ok(&text, &[]);
    let e = &s.experiments[0];
    assert_eq!(e.axes, vec!["lr", "optimizer"]);
    assert_eq!(e.runs.len(), 4);
    assert_eq!(e.runs[2].params["optimizer"], ParamValue::Str("adam".into()));
    assert_eq!(e.runs[2].params["lr"], ParamValue::Float(0.001));
}

#[test]
fn unknown_metric_in_a_table_is_located() {
    let text = format!("{BASE}\n[[tables]]\nid = \"t\"\nexperiment = \"e1\"\ntitle = \"T\"\nmetrics = [\"acuracy\"]\n");
    let e = parse_err(&text, "quick", &[]);
    assert_eq!(e.diagnostics[0].hint.as_deref(), Some("did you mean `accuracy`?"));
    assert!(matches!(e.diagnostics[0].origin, Origin::File { line: 23, .. }), "{e}");
}

#[test]
fn per_metric_reference_values_parse() {
    let text = format!("{BASE}\n[[tables]]\nid = \"t\"\nexperiment = \"e1\"\ntitle = \"T\"\nmetrics = [\"accuracy\"]\n[tables.reference]\nlabel = \"doc\"\n[tables.reference.values.\"1.0\"]\naccuracy = \"65-70\"\n[tables.reference.values.\"0.1\"]\naccuracy = \"60\"\n");
    let s = parse_ok(&text, &[]);
    let r = s.tables[0].reference.as_ref().unwrap();
    assert_eq!(r.values["1.0"], RefValue::PerMetric([("accuracy".to_string(), "65-70".to_string())].into_iter().collect()));
}
