//! Spec parsing and validation: every error names its place and gives a hint.

use std::path::{Path, PathBuf};

use super::*;

fn root() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("reprise-spec-tests-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("templates")).unwrap();
    std::fs::write(dir.join("templates/t.md.j2"), "x").unwrap();
    // Only the manifest's presence is checked at load; its content is read by the planner.
    std::fs::create_dir_all(dir.join("data-manifests")).unwrap();
    std::fs::write(dir.join("data-manifests/mnist-5k.toml"), "").unwrap();
    std::fs::write(dir.join("secret.toml"), "").unwrap();
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

fn messages(e: &SpecError) -> Vec<String> {
    e.diagnostics.iter().map(|d| d.message.clone()).collect()
}

fn line_of(d: &Diagnostic) -> usize {
    match &d.origin {
        Origin::File { line, .. } => *line,
        o => panic!("expected a place in the file, got {o:?}"),
    }
}

const TABLE_FIGURE_CLAIM: &str = r#"
[[tables]]
id = "../../../../x"
experiment = "e1"
title = "T"
metrics = ["accuracy"]

[[figures]]
id = "/any/where/x"
experiment = "e1"
title = "F"
kind = "epochs"
y = "accuracy"

[[claims]]
id = "c\" onmouseover=\"x"
text = "T"
source = "ours"
experiment = "e1"
kind = "change"
metric = "accuracy"
min = 0.0
"#;

/// Issue 20, defect 3: ids and names become file names (`tables/<id>.csv`, the report folder
/// `<id>-<profile>`) or HTML ids, so anything but a plain name is an error at its place.
#[test]
fn issue_20_ids_and_names_that_are_paths_are_errors_at_their_place() {
    let text = format!("{BASE}{TABLE_FIGURE_CLAIM}");
    let e = parse_err(&text, "quick", &[]);
    assert_eq!(e.diagnostics.len(), 3, "{e}");
    assert!(e.diagnostics[0].message.contains("table id `../../../../x` must be a non-empty name"), "{e}");
    assert_eq!(line_of(&e.diagnostics[0]), 20);
    assert!(e.diagnostics[1].message.contains("figure id `/any/where/x`"), "{e}");
    assert_eq!(line_of(&e.diagnostics[1]), 26);
    assert!(e.diagnostics[2].message.starts_with("claim id `c\\\" onmouseover"), "{e}");
    assert!(e.diagnostics.iter().all(|d| d.hint.is_some()), "{e}");

    let text = BASE.replace("[experiments.e1]", "[experiments.\"../e1\"]").replace("[data.mnist]", "[data.\"a/b\"]");
    let e = parse_err(&text, "quick", &[]);
    let msgs = messages(&e);
    assert!(msgs.iter().any(|m| m.contains("experiment id `../e1`")), "{e}");
    assert!(msgs.iter().any(|m| m.contains("data set name `a/b`")), "{e}");

    // A profile name, declared or given as the flag.
    let text = format!("{BASE}\n[profiles.\"../../p\"]\n\"defaults.epochs\" = 2\n");
    let e = parse_err(&text, "quick", &[]);
    assert!(e.diagnostics[0].message.contains("profile name `../../p`"), "{e}");
    assert_eq!(line_of(&e.diagnostics[0]), 19);
    let e = parse_err(BASE, "../../p", &[]);
    assert!(matches!(&e.diagnostics[0].origin, Origin::Argument { arg } if arg == "--profile ../../p"), "{e}");
    assert!(e.to_string().contains("in the argument `--profile ../../p`"), "{e}");
}

/// Issue 20, defect 9: every profile is validated, not only the one selected.
#[test]
fn issue_20_every_profile_is_validated_whichever_runs() {
    let text = format!("{BASE}\n[profiles.paper]\n\"defaults.epoch\" = 200\n\n[profiles.wide]\n\"defaults.epochs\" = 0\n\n[profiles.long]\n\"defaults.analyze_freq\" = 9\n");
    let e = parse_err(&text, "quick", &[]);
    assert_eq!(e.diagnostics.len(), 3, "{e}");
    let by = |needle: &str| e.diagnostics.iter().find(|d| d.message.contains(needle)).unwrap_or_else(|| panic!("no `{needle}` in {e}"));
    let d = by("unknown parameter `epoch`");
    assert!(matches!(&d.origin, Origin::Profile { name, line: 20, .. } if name == "paper"), "{e}");
    assert_eq!(d.hint.as_deref(), Some("did you mean `epochs`?"));
    assert!(matches!(&by("`epochs` = 0 is out of range").origin, Origin::Profile { name, line: 23, .. } if name == "wide"), "{e}");
    // A problem a profile causes away from its own entries names the profile.
    assert!(by("with profile `long`: experiment `e1`").message.contains("analyze_freq = 9 exceeds epochs = 3"), "{e}");
    // The same spec selected with a good profile still reports the bad ones.
    let fixed = text.replace("\"defaults.epoch\" = 200", "\"defaults.epochs\" = 200");
    let e = parse_err(&fixed, "paper", &[]);
    assert_eq!(e.diagnostics.len(), 2, "{e}");
    let with_good = fixed.replace("\"defaults.analyze_freq\" = 9", "\"defaults.analyze_freq\" = 2").replace("\"defaults.epochs\" = 0", "\"defaults.epochs\" = 1");
    let s = parse_ok(&with_good, &[]);
    assert_eq!(s.profile, "quick");

    // An experiment limited to a profile that does not exist would silently never run.
    let text = BASE.replace("seeds = [0, 1]", "seeds = [0, 1]\nprofiles = [\"papr\"]");
    let text = format!("{text}\n[profiles.paper]\n\"defaults.epochs\" = 200\n");
    let e = parse_err(&text, "quick", &[]);
    assert_eq!(e.diagnostics[0].message, "unknown profile `papr`");
    assert_eq!(e.diagnostics[0].hint.as_deref(), Some("did you mean `paper`?"));
}

/// Issue 20, defect 4: the template is read from `templates/` only.
#[test]
fn issue_20_template_outside_the_templates_folder_is_refused() {
    for bad in ["../../../../etc/passwd", "/etc/passwd", "../secret.toml", "./t.md.j2"] {
        let text = BASE.replace("template = \"t.md.j2\"", &format!("template = \"{bad}\""));
        let e = parse_err(&text, "quick", &[]);
        assert!(e.diagnostics[0].message.contains("must be a relative path inside"), "{bad}: {e}");
        assert_eq!(line_of(&e.diagnostics[0]), 5);
    }
    #[cfg(unix)]
    {
        let link = root().join("templates/escape.md.j2");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(root().join("secret.toml"), &link).unwrap();
        let text = BASE.replace("template = \"t.md.j2\"", "template = \"escape.md.j2\"");
        let e = parse_err(&text, "quick", &[]);
        assert!(e.diagnostics[0].message.contains("leads outside"), "{e}");
    }
    let text = BASE.replace("template = \"t.md.j2\"", "template = \"tt.md.j2\"");
    let e = parse_err(&text, "quick", &[]);
    assert!(e.diagnostics[0].message.contains("template `tt.md.j2` not found"), "{e}");
    assert_eq!(e.diagnostics[0].hint.as_deref(), Some("did you mean `t.md.j2`?"));
}

/// Issue 20, defects 4 and 10: a manifest is `data-manifests/<name>.toml`, nothing else, and an
/// unknown one is placed in the spec with the known names.
#[test]
fn issue_20_manifest_names_are_confined_and_located() {
    for bad in ["../secret", "/tmp/x", "a.b"] {
        let text = BASE.replace("manifest = \"mnist-5k\"", &format!("manifest = \"{bad}\""));
        let e = parse_err(&text, "quick", &[]);
        assert!(e.diagnostics[0].message.contains(&format!("manifest name `{bad}` must be a non-empty name")), "{e}");
        assert_eq!(line_of(&e.diagnostics[0]), 8);
    }
    let text = BASE.replace("manifest = \"mnist-5k\"", "manifest = \"mnist-5\"");
    let e = parse_err(&text, "quick", &[]);
    assert!(e.diagnostics[0].message.starts_with("unknown manifest `mnist-5`"), "{e}");
    assert_eq!(line_of(&e.diagnostics[0]), 8);
    assert_eq!(e.diagnostics[0].hint.as_deref(), Some("did you mean `mnist-5k`?"));
    assert!(e.to_string().contains("reports/demo.toml:8:12"), "{e}");
}

/// Issue 20, defect 10: what a `--set` value is wrong with, and who is to blame.
#[test]
fn issue_20_set_values_that_are_not_toml_are_named_and_blamed_on_the_set() {
    let e = parse_err(BASE, "quick", &["defaults.epochs=[1,2"]);
    assert!(matches!(&e.diagnostics[0].origin, Origin::Override { arg } if arg == "defaults.epochs=[1,2"), "{e}");
    assert!(e.diagnostics[0].message.contains("is not a valid TOML value"), "{e}");
    assert!(!e.to_string().contains("found a string"), "{e}");

    let e = parse_err(BASE, "quick", &["defaults.epochs=1e400"]);
    assert!(e.diagnostics[0].message.contains("`1e400` of `defaults.epochs` is out of range"), "{e}");

    let e = parse_err(BASE, "quick", &["report.title=a\nb"]);
    assert!(e.diagnostics[0].message.contains("line break"), "{e}");

    // Bare words are still strings.
    let s = parse_ok(BASE, &["defaults.model=cnn"]);
    assert_eq!(s.experiments[0].runs[0].params["model"], ParamValue::Str("cnn".into()));

    // A `--set` that breaks a run shows at the experiment, but is the `--set`'s fault.
    let e = parse_err(BASE, "quick", &["defaults.epochs=2", "defaults.analyze_freq=5"]);
    assert_eq!(e.diagnostics.len(), 1, "{e}");
    assert!(matches!(&e.diagnostics[0].origin, Origin::Override { arg } if arg == "defaults.analyze_freq=5"), "{e}");
    assert!(e.diagnostics[0].message.contains("exceeds epochs") && e.diagnostics[0].message.contains("(it shows at reports/demo.toml:14:"), "{e}");

    // A `--set` that makes the spec ill-typed is named, whichever of several it is.
    let e = parse_err(BASE, "quick", &["report.title=5", "defaults.epochs=2"]);
    assert!(matches!(&e.diagnostics[0].origin, Origin::Override { arg } if arg == "report.title=5"), "{e}");
}

/// The messages of the problems blamed on the override `--set arg`.
fn blamed_on(e: &SpecError, arg: &str) -> Vec<String> {
    e.diagnostics.iter().filter(|d| matches!(&d.origin, Origin::Override { arg: a } if a == arg)).map(|d| d.message.clone()).collect()
}

/// Every bad `--set` is a problem of its own, blamed on it: one did not stop the others from
/// being applied and checked.
#[test]
fn every_bad_set_is_reported_and_blamed_on_its_set() {
    // A plain word where an integer is needed, and an unknown parameter.
    let e = parse_err(BASE, "quick", &["defaults.epochs=x", "defaults.nope=1"]);
    assert_eq!(e.diagnostics.len(), 2, "{e}");
    assert_eq!(blamed_on(&e, "defaults.epochs=x"), vec!["`epochs` must be an integer, found a string"], "{e}");
    assert_eq!(blamed_on(&e, "defaults.nope=1"), vec!["`defaults.nope`: unknown parameter `nope`"], "{e}");
    assert!(e.to_string().contains("in the override `--set defaults.epochs=x`") && e.to_string().contains("in the override `--set defaults.nope=1`"), "{e}");

    // One of each kind: not TOML, no such key, ill-typed, out of range; a good one among them.
    let sets = ["defaults.epochs=[1,2", "experiments.e9.seeds=[1]", "report.title=5", "defaults.lr=0.5", "defaults.imbalance=2"];
    let e = parse_err(BASE, "quick", &sets);
    assert_eq!(e.diagnostics.len(), 4, "{e}");
    assert!(blamed_on(&e, sets[0])[0].contains("is not a valid TOML value"), "{e}");
    assert!(blamed_on(&e, sets[1])[0].contains("no key `e9`"), "{e}");
    assert!(blamed_on(&e, sets[2])[0].contains("after applying the override"), "{e}");
    assert!(blamed_on(&e, sets[3]).is_empty(), "{e}");
    assert!(blamed_on(&e, sets[4])[0].contains("`imbalance` = 2.0 is out of range"), "{e}");
    assert!(e.to_string().contains("4 problems"), "{e}");
}

/// A bad `--set` does not hide the problems of the file, nor they it.
#[test]
fn a_bad_set_and_a_bad_value_in_the_file_are_both_reported() {
    let text = BASE.replace("[1.0, 0.1]", "[1.0, 0.0]");
    for set in ["defaults.nope=1", "defaults.epochs=x", "defaults.epochs=[1,2", "report.title=5"] {
        let e = parse_err(&text, "quick", &[set]);
        assert_eq!(e.diagnostics.len(), 2, "{set}: {e}");
        assert_eq!(blamed_on(&e, set).len(), 1, "{set}: {e}");
        let d = e.diagnostics.iter().find(|d| d.message.contains("`imbalance` = 0.0 is out of range")).unwrap_or_else(|| panic!("{set}: {e}"));
        assert_eq!(line_of(d), 16, "{set}: {e}");
        assert!(e.to_string().contains("reports/demo.toml:16:28"), "{set}: {e}");
    }
    // Every problem of both: two bad `--set`s, two bad entries in the file.
    let text = text.replace("analyze_freq = 1", "analyze_freq = 1\nlearning_rate = 0.1");
    let e = parse_err(&text, "quick", &["defaults.epochs=x", "defaults.nope=1"]);
    assert_eq!(e.diagnostics.len(), 4, "{e}");
    assert_eq!(blamed_on(&e, "defaults.epochs=x").len(), 1, "{e}");
    assert_eq!(blamed_on(&e, "defaults.nope=1").len(), 1, "{e}");
    let msgs = messages(&e);
    assert!(msgs.iter().any(|m| m.contains("`imbalance` = 0.0 is out of range")), "{e}");
    assert!(msgs.iter().any(|m| m == "unknown parameter `learning_rate`"), "{e}");
}

/// A method with one list-valued parameter, for the tests of lists in specs.
struct Lists;

#[derive(serde::Deserialize)]
#[allow(dead_code)]
struct ListParams {
    classes: Vec<u32>,
}

impl crate::params::ParamStruct for ListParams {
    const SCHEMA: &'static [ParamDef] = &[ParamDef {
        name: "classes",
        kind: crate::params::ParamKind::IntList { min: 0, max: 9, min_len: 1, max_len: 10 },
        default: crate::params::DefaultValue::IntList(&[0, 1]),
        doc: "the classes of a task",
    }];
}

impl crate::methods::Method for Lists {
    fn name(&self) -> &'static str {
        "lists"
    }
    fn version(&self) -> u32 {
        1
    }
    fn schema(&self) -> crate::params::Schema {
        crate::params::Schema::of::<ListParams>()
    }
    fn run(&self, _: &Params, _: u64, _: &crate::methods::TrainInputs, _: &dyn crate::methods::Progress) -> Result<crate::methods::Outcome, crate::methods::MethodError> {
        Ok(crate::methods::Outcome::Done(BTreeMap::new()))
    }
}

const LISTS: &str = r#"
[report]
id = "lists"
title = "Lists"
template = "t.md.j2"
method = "lists"

[defaults]
classes = [3, 4]

[experiments.e]
title = "Tasks"
grid = { classes = [[0, 1], [2, 3, 4]] }
"#;

fn parse_lists(text: &str, sets: &[&str]) -> Result<Spec, SpecError> {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    let registry = Registry::empty().with(Lists);
    parse_with(text, Path::new("reports/lists.toml"), &root(), "quick", &sets, &registry)
}

#[test]
fn list_parameters_in_defaults_grids_and_sets() {
    let spec = parse_lists(LISTS, &[]).unwrap();
    let labels: Vec<String> = spec.experiments[0].runs.iter().map(|r| r.label()).collect();
    assert_eq!(labels, ["classes=[0,1] seed=0", "classes=[2,3,4] seed=0"]);
    // A --set of a list replaces the default (a grid is not involved here).
    let text = LISTS.replace("grid = { classes = [[0, 1], [2, 3, 4]] }", "");
    let spec = parse_lists(&text, &["defaults.classes=[7,8,9]"]).unwrap();
    assert_eq!(spec.experiments[0].runs[0].params["classes"], ParamValue::IntList(vec![7, 8, 9]));
    // Bad lists are located: an entry out of range in the grid and a list of strings in the
    // defaults, at once; an empty list from a --set.
    let bad = LISTS.replace("[2, 3, 4]]", "[2, 30, 4]]").replace("classes = [3, 4]", "classes = [\"a\"]");
    let e = parse_lists(&bad, &[]).unwrap_err();
    let m = messages(&e);
    assert!(m.iter().any(|m| m == "`classes`: entry 1 = 30 is out of range"), "{m:?}");
    assert!(m.iter().any(|m| m == "`classes` must be a list of integers"), "{m:?}");
    let m = messages(&parse_lists(&text, &["defaults.classes=[]"]).unwrap_err());
    assert!(m.iter().any(|m| m.contains("`classes` has 0 entries")), "{m:?}");
    let grid_line = bad.lines().position(|l| l.starts_with("grid")).unwrap() + 1;
    assert!(e.diagnostics.iter().any(|d| d.message.contains("entry 1 = 30") && line_of(d) == grid_line), "{e}");
}

#[test]
fn the_method_cannot_be_overridden() {
    let e = parse_err(BASE, "quick", &["report.method=class_aware_lora"]);
    let m = messages(&e);
    assert!(m.iter().any(|m| m.contains("`report.method` cannot be overridden")), "{m:?}");
}

#[test]
fn a_list_where_a_single_value_belongs_points_to_the_grid() {
    let text = BASE.replace("epochs = 3", "epochs = [3, 5]");
    let e = parse_err(&text, "quick", &[]);
    assert!(e.diagnostics.iter().any(|d| d.message == "`epochs` must be a single value" && d.hint.as_deref() == Some("lists of values belong in an experiment's `grid`")), "{e}");
}

/// A parameter table: the document's column, then each profile's values of the experiment's
/// runs (every distinct value once; `–` where no run has the parameter).
#[test]
fn a_parameter_table_shows_each_profile_beside_the_document() {
    let text = format!(
        "{BASE}\n[[tables]]\nid = \"cfg\"\nexperiment = \"e1\"\ntitle = \"Configuration\"\nparams = [\"epochs\", \"imbalance\", \"lr\", \"momentum\"]\n[tables.document]\nepochs = \"200\"\n\n[profiles.paper]\n\"defaults.epochs\" = 50\n\"defaults.optimizer\" = \"adam\"\n"
    );
    let s = parse_ok(&text, &[]);
    let names: Vec<&str> = s.profile_params.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["quick", "paper"]);
    let t = crate::render::table(&s, &crate::frames::Frames::default(), "cfg").unwrap();
    assert_eq!(t.row_params, ["parameter", "document", "quick", "paper"]);
    let rows: Vec<Vec<&str>> = t.rows.iter().map(|r| r.labels.iter().map(String::as_str).collect()).collect();
    assert_eq!(rows[0], ["epochs", "200", "3", "50"]);
    assert_eq!(rows[1], ["imbalance", "–", "1.0, 0.1", "1.0, 0.1"]);
    // Adam does not read SGD's momentum: the paper profile's runs leave it out.
    assert_eq!(rows[3], ["momentum", "–", "0.9", "–"]);
    let md = crate::render::table::markdown(&t);
    assert!(md.contains("| epochs | 200 | 3 | 50 |") && !md.contains("cells"), "{md}");

    // Both metrics and parameters, or a document value of a parameter it does not list: errors.
    let both = format!("{BASE}\n[[tables]]\nid = \"cfg\"\nexperiment = \"e1\"\ntitle = \"x\"\nmetrics = [\"accuracy\"]\nparams = [\"epochs\"]\n");
    assert!(parse_err(&both, "quick", &[]).to_string().contains("both metrics and parameters"));
    let stray = format!("{BASE}\n[[tables]]\nid = \"cfg\"\nexperiment = \"e1\"\ntitle = \"x\"\nparams = [\"epochs\"]\n[tables.document]\nlr = \"1\"\n");
    assert!(parse_err(&stray, "quick", &[]).to_string().contains("not one of its `params`"));
    let unknown = format!("{BASE}\n[[tables]]\nid = \"cfg\"\nexperiment = \"e1\"\ntitle = \"x\"\nparams = [\"epochz\"]\n");
    assert!(parse_err(&unknown, "quick", &[]).to_string().contains("epochz"));
}

/// A `level` claim needs bounds; its selection names known parameters.
#[test]
fn a_level_claim_is_checked_like_the_others() {
    let claim = |rest: &str| format!("{BASE}\n[[claims]]\nid = \"l\"\ntext = \"x\"\nsource = \"ours\"\nexperiment = \"e1\"\nkind = \"level\"\nmetric = \"accuracy\"\n{rest}");
    parse_ok(&claim("a = { imbalance = 0.1 }\nmin = 0.0\nmax = 100.0\n"), &[]);
    assert!(parse_err(&claim("a = { imbalance = 0.1 }\n"), "quick", &[]).to_string().contains("needs `min` and/or `max`"));
    assert!(parse_err(&claim("a = { imbalanse = 0.1 }\nmin = 0.0\n"), "quick", &[]).to_string().contains("imbalanse"));
}

/// Issue 21: the planner adds seeds to the runs a claim reads, and only to those.
#[test]
fn claims_get_their_seeds() {
    let compare = |extra: &str| {
        format!("{BASE}\n[[claims]]\nid = \"c\"\ntext = \"x\"\nsource = \"ours\"\nexperiment = \"e1\"\nkind = \"compare\"\nmetric = \"accuracy\"\na = {{ imbalance = 0.1 }}\nb = {{ imbalance = 1.0 }}\nmin = 0.0\n{extra}")
    };
    let seeds_of = |s: &Spec, imb: f64| -> Vec<u64> {
        let mut v: Vec<u64> = s.experiments[0].runs.iter().filter(|r| r.params["imbalance"] == ParamValue::Float(imb)).map(|r| r.seed).collect();
        v.sort_unstable();
        v
    };
    // Without `seeds` the experiment's own seeds (0, 1) stay.
    let s = parse_ok(&compare(""), &[]);
    assert_eq!(s.experiments[0].runs.len(), 4);
    // Both sides of the comparison get seeds 2 and 3; the declared runs come first.
    let s = parse_ok(&compare("seeds = 4\n"), &[]);
    assert_eq!((seeds_of(&s, 0.1), seeds_of(&s, 1.0)), (vec![0, 1, 2, 3], vec![0, 1, 2, 3]));
    assert_eq!(s.experiments[0].runs[..4].iter().map(|r| r.seed).collect::<Vec<_>>(), vec![0, 1, 0, 1]);
    // A level claim on one point adds seeds to that point only; the report default applies to
    // claims without their own `seeds`, and `--set report.claim_seeds` changes it.
    let level = format!("{BASE}\n[[claims]]\nid = \"l\"\ntext = \"x\"\nsource = \"ours\"\nexperiment = \"e1\"\nkind = \"level\"\nmetric = \"accuracy\"\na = {{ imbalance = 0.1 }}\nmin = 0.0\n");
    let s = parse_ok(&level, &["report.claim_seeds=3"]);
    assert_eq!((seeds_of(&s, 0.1), seeds_of(&s, 1.0)), (vec![0, 1, 2], vec![0, 1]));
    // Seeds already there count: declared seeds 5 and 7 with 3 wanted add seed 0 only.
    let s = parse_ok(&compare("seeds = 3\n").replace("seeds = [0, 1]", "seeds = [5, 7]"), &[]);
    assert_eq!(seeds_of(&s, 0.1), vec![0, 5, 7]);
    // Zero seeds is an error at its place.
    let e = parse_err(&compare("seeds = 0\n"), "quick", &[]);
    assert!(e.to_string().contains("0 seeds per claim"), "{e}");
}

/// An `interaction` claim needs a known `metric2`, both selections and a bound.
#[test]
fn an_interaction_claim_needs_a_second_metric_and_both_selections() {
    let claim = |rest: &str| format!("{BASE}\n[[claims]]\nid = \"i\"\ntext = \"x\"\nsource = \"ours\"\nexperiment = \"e1\"\nkind = \"interaction\"\nmetric = \"accuracy\"\n{rest}");
    let sel = "a = { imbalance = 0.1 }\nb = { imbalance = 0.01 }\nmin = 0.0\n";
    parse_ok(&claim(&format!("metric2 = \"tail_accuracy\"\n{sel}")), &[]);
    assert!(parse_err(&claim(sel), "quick", &[]).to_string().contains("needs `metric2`"));
    assert!(parse_err(&claim(&format!("metric2 = \"tail_acuracy\"\n{sel}")), "quick", &[]).to_string().contains("tail_acuracy"));
    assert!(parse_err(&claim("metric2 = \"tail_accuracy\"\na = { imbalance = 0.1 }\nmin = 0.0\n"), "quick", &[]).to_string().contains("interaction claim `i` needs `b`"));
}

/// Per-task names are checked against the method's `task_values`, and the per-task fields belong
/// to their kinds.
#[test]
fn per_task_claims_figures_and_tables_are_checked() {
    let claim = |rest: &str| format!("{BASE}\n[[claims]]\nid = \"a\"\ntext = \"x\"\nsource = \"ours\"\nexperiment = \"e1\"\n{rest}");
    // `supervised` records no per-task values.
    let e = parse_err(&claim("kind = \"association\"\nx = \"n\"\nmetric = \"gamma\"\nmin = 0.5\n"), "quick", &[]).to_string();
    assert!(e.contains("unknown per-task value `gamma`") && e.contains("unknown per-task value `n`"), "{e}");
    let e = parse_err(&claim("kind = \"association\"\nmetric = \"task\"\nwithin = \"run\"\nmin = 0.5\n"), "quick", &[]).to_string();
    assert!(e.contains("needs `x`") && e.contains("`within` can only be \"task\""), "{e}");
    let e = parse_err(&claim("kind = \"level\"\nmetric = \"accuracy\"\nset = \"id\"\nmin = 0.5\n"), "quick", &[]).to_string();
    assert!(e.contains("`set` belongs to `association` claims"), "{e}");
    let fig = format!("{BASE}\n[[figures]]\nid = \"f\"\nexperiment = \"e1\"\ntitle = \"t\"\nkind = \"epochs\"\ny = \"accuracy\"\nselect = {{ imbalance = 0.1 }}\n");
    assert!(parse_err(&fig, "quick", &[]).to_string().contains("belong to `scatter` figures"));
    let fig = format!("{BASE}\n[[figures]]\nid = \"f\"\nexperiment = \"e1\"\ntitle = \"t\"\nkind = \"scatter\"\ny = \"task\"\n");
    assert!(parse_err(&fig, "quick", &[]).to_string().contains("scatter figure `f` needs `x`"));
    let table = format!("{BASE}\n[[tables]]\nid = \"t\"\nexperiment = \"e1\"\ntitle = \"t\"\nmetrics = [\"accuracy\"]\nsort = \"task\"\nintervals = {{ tail_accuracy = \"accuracy\" }}\n");
    let e = parse_err(&table, "quick", &[]).to_string();
    assert!(e.contains("belong to `tasks` tables") && e.contains("gives an interval for `tail_accuracy`"), "{e}");
    let table = format!("{BASE}\n[[tables]]\nid = \"t\"\nexperiment = \"e1\"\ntitle = \"t\"\nkind = \"tasks\"\nmetrics = [\"task\", \"class\"]\nsort = \"task\"\nlimit = 3\n");
    parse_ok(&table, &[]);
}
