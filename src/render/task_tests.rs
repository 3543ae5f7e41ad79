//! The per-task engine features: `association` claims, `tasks` tables, `scatter` figures and
//! tables with per-run intervals, on hand-made frames whose answers are computed by hand.

use super::claims::{evaluate, Verdict};
use super::{figure, table};
use crate::frames::{Frames, ResultRow, TaskRow};
use crate::params::{ParamValue, Params};
use crate::spec::{ClaimDecl, Experiment, FigureDecl, TableDecl};

fn result(key: &str, variant: &str, seed: u64, metrics: &[(&str, f64)]) -> ResultRow {
    ResultRow {
        experiment: "e".into(),
        run: format!("variant={variant}"),
        key: key.into(),
        seed,
        status: "ok".into(),
        reason: None,
        epoch: Some(10),
        params: Params::from([("variant".to_string(), ParamValue::Str(variant.into()))]),
        metrics: metrics.iter().map(|(k, v)| (k.to_string(), Some(*v))).collect(),
    }
}

fn task(key: &str, seed: u64, set: &str, task: i64, class: Option<i64>, values: &[(&str, f64)]) -> TaskRow {
    TaskRow { experiment: "e".into(), run: "r".into(), key: key.into(), seed, epoch: 10, set: set.into(), task, class, values: values.iter().map(|(k, v)| (k.to_string(), Some(*v))).collect() }
}

fn experiment() -> Experiment {
    Experiment { active: true, id: "e".into(), title: "e".into(), description: None, axes: vec!["variant".into()], seeds: vec![0, 1, 2], runs: Vec::new() }
}

/// Three runs of variant `a`, each with four tasks whose γ against N has a known rank
/// correlation, and whose classes' ω against shots has one too; a run of `b` with none.
fn frames() -> Frames {
    let mut f = Frames::default();
    // Per run: N = 10, 20, 30, 40 and γ with ranks (1 2 3 4) → ρ = 1; (1 2 4 3) → ρ = 0.8;
    // (2 1 4 3) → ρ = 0.6. Mean 0.8.
    let gammas = [[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 4.0, 3.0], [2.0, 1.0, 4.0, 3.0]];
    for (seed, g) in gammas.iter().enumerate() {
        let key = format!("k{seed}");
        f.results.push(result(&key, "a", seed as u64, &[("accuracy", 50.0 + seed as f64), ("accuracy_ci", 2.0)]));
        for (t, gv) in g.iter().enumerate() {
            f.per_task.push(task(&key, seed as u64, "id", t as i64, None, &[("n", 10.0 * (t + 1) as f64), ("gamma", *gv), ("order", 4.0 - t as f64)]));
            // Classes: shots 1, 2, 3 and ω falling (ρ = −1) in tasks 0-2; task 3 balanced (no ρ).
            for c in 0..3 {
                let shots = if t == 3 { 2.0 } else { (c + 1) as f64 };
                f.per_task.push(task(&key, seed as u64, "id", t as i64, Some(c), &[("shots", shots), ("omega", 0.5 - 0.1 * c as f64)]));
            }
        }
        // A task without γ or classes (not a probe task): tables that list those leave it out.
        f.per_task.push(task(&key, seed as u64, "id", 4, None, &[("n", 50.0)]));
        // Another set that the claims filter out.
        f.per_task.push(task(&key, seed as u64, "ood", 0, None, &[("n", 5.0), ("gamma", 100.0)]));
    }
    f.results.push(result("kb", "b", 0, &[("accuracy", 40.0), ("accuracy_ci", 3.0)]));
    f
}

fn claim(extra: &str) -> ClaimDecl {
    toml::from_str(&format!("id = \"t\"\ntext = \"γ rises with N\"\nsource = \"document\"\nexperiment = \"e\"\nkind = \"association\"\na = {{ variant = \"a\" }}\nset = \"id\"\n{extra}")).unwrap()
}

#[test]
fn an_association_is_the_mean_over_runs_of_spearman_within_each_run() {
    let f = frames();
    let r = evaluate(&claim("x = \"n\"\nmetric = \"gamma\"\nmin = 0.5\n"), &f);
    assert_eq!(r.n, 3);
    assert!((r.value.unwrap() - 0.8).abs() < 1e-12, "{:?}", r.value);
    // ρ = 1, 0.8, 0.6: mean 0.8, sd 0.2, t(0.975, 2) = 4.3027: 0.8 ± 0.4968.
    let (lo, hi) = r.interval.unwrap();
    let half = 4.302_652_7 * 0.2 / 3f64.sqrt();
    assert!((lo - (0.8 - half)).abs() < 1e-6 && (hi - (0.8 + half)).abs() < 1e-6, "{lo} {hi}");
    // The interval reaches below 0.5: inconclusive; above 0.2 entirely: holds; below 2: fails.
    assert_eq!(r.verdict, Verdict::Inconclusive);
    assert_eq!(evaluate(&claim("x = \"n\"\nmetric = \"gamma\"\nmin = 0.2\n"), &f).verdict, Verdict::Holds);
    assert_eq!(evaluate(&claim("x = \"n\"\nmetric = \"gamma\"\nmin = 1.5\n"), &f).verdict, Verdict::DoesNotHold);
    // Within tasks: ρ(shots, ω) = −1 in the three imbalanced tasks of every run; the balanced
    // task has no ρ and is left out. Every run −1: a zero-width interval at −1.
    let r = evaluate(&claim("x = \"shots\"\nmetric = \"omega\"\nwithin = \"task\"\nmax = -0.8\n"), &f);
    assert_eq!((r.verdict, r.value, r.n), (Verdict::Holds, Some(-1.0), 3), "{}", r.measured);
    // One run: no interval, no verdict.
    let mut one = frames();
    one.results.retain(|r| r.seed == 0);
    let r = evaluate(&claim("x = \"n\"\nmetric = \"gamma\"\nmin = 0.2\n"), &one);
    assert_eq!((r.verdict, r.interval), (Verdict::Inconclusive, None));
    // A value no task has: not measured, and the text says why.
    let r = evaluate(&claim("x = \"n\"\nmetric = \"nothing\"\nmin = 0.2\n"), &f);
    assert_eq!(r.verdict, Verdict::NotMeasured);
    assert!(r.measured.contains("no run has a defined ρ"), "{}", r.measured);
}

#[test]
fn a_tasks_table_shows_one_run_sorted_and_limited_with_class_values_joined() {
    let f = frames();
    let decl: TableDecl = toml::from_str(
        "id = \"g\"\nexperiment = \"e\"\nkind = \"tasks\"\ntitle = \"γ\"\nselect = { variant = \"a\" }\nset = \"id\"\nmetrics = [\"n\", \"gamma\", \"shots\", \"omega\"]\nsort = \"order\"\nlimit = 3\n",
    )
    .unwrap();
    let t = table::build_tasks(&decl, &experiment(), &f);
    // Seed 0's run: of its tasks with every value (0-3; task 4 has no γ), the first three in
    // task order, then sorted by `order` (4 − task): tasks 2, 1, 0.
    let rows: Vec<Vec<String>> = t.rows.iter().map(|r| r.labels.clone()).collect();
    assert_eq!(t.row_params, ["task", "n", "gamma", "shots", "omega"]);
    assert_eq!(rows.iter().map(|r| r[0].as_str()).collect::<Vec<_>>(), ["2", "1", "0"]);
    assert_eq!(rows[2], ["0", "10", "1", "1 2 3", "0.500 0.400 0.300"]);
    let md = table::markdown(&t);
    assert!(md.contains("seed=0") || md.contains("cell `k0`"), "{md}");
    assert!(md.contains("the first 3 of its 4 tasks with these values, sorted by order"), "{md}");
}

#[test]
fn a_table_with_intervals_prints_mean_plus_minus_the_mean_interval_and_the_spread() {
    let f = frames();
    let decl: TableDecl = toml::from_str("id = \"m\"\nexperiment = \"e\"\ntitle = \"acc\"\nmetrics = [\"accuracy\"]\nintervals = { accuracy = \"accuracy_ci\" }\n").unwrap();
    let t = table::build(&decl, &experiment(), &f);
    let md = table::markdown(&t);
    // a: 50, 51, 52 (sd 1), interval 2 each; b: one run, 40 ± 3.
    assert!(md.contains("| 51.0 ± 2.0 (sd 1.0) |"), "{md}");
    assert!(md.contains("| 40.0 ± 3.0 |"), "{md}");
    let csv = table::csv(&t);
    assert!(csv.lines().next().unwrap().contains("accuracy_interval"), "{csv}");
}

#[test]
fn a_scatter_figure_draws_every_selected_task() {
    let f = frames();
    let decl: FigureDecl =
        toml::from_str("id = \"s\"\nexperiment = \"e\"\ntitle = \"γ <against> N\"\nkind = \"scatter\"\nselect = { variant = \"a\" }\nset = \"id\"\nx = \"n\"\ny = [\"gamma\", \"omega\"]\n").unwrap();
    let svg = figure::svg(&decl, &experiment(), &f).unwrap();
    // 3 runs × 4 tasks have γ; ω sits on class rows, which have no N: no points.
    assert!(svg.contains("gamma (12 points)") && svg.contains("omega (0 points)"), "{svg}");
    assert!(!svg.contains("<against>"), "the title is escaped in the SVG");
    // No run selected: a placeholder, not an error.
    let none: FigureDecl = toml::from_str("id = \"s\"\nexperiment = \"e\"\ntitle = \"t\"\nkind = \"scatter\"\nselect = { variant = \"zzz\" }\nx = \"n\"\ny = \"gamma\"\n").unwrap();
    assert!(figure::svg(&none, &experiment(), &f).unwrap().contains("no data"));
}

#[test]
fn per_task_rows_survive_the_parquet_round_trip_and_are_written_only_when_present() {
    let f = Frames { metric_names: vec!["accuracy".into(), "accuracy_ci".into()], ..frames() };
    assert_eq!(f.names(), ["results", "per_class", "objects", "per_task"]);
    let dir = tempfile::tempdir().unwrap();
    f.write(dir.path()).unwrap();
    let back = Frames::read(dir.path(), &["accuracy", "accuracy_ci"]).unwrap();
    assert_eq!(back.per_task, f.per_task);
    assert_eq!(f.round_trip().unwrap().per_task, f.per_task);
    let plain = Frames { per_task: Vec::new(), ..f.clone() };
    let dir = tempfile::tempdir().unwrap();
    plain.write(dir.path()).unwrap();
    assert!(!dir.path().join("per_task.parquet").exists());
    assert!(Frames::read(dir.path(), &["accuracy"]).unwrap().per_task.is_empty());
}
