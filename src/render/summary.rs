//! Summaries of the results frame that tables, figures and claims share: the final analysis
//! epoch of each run, grouping by parameters, mean ± std over seeds, rank correlation.

use std::collections::BTreeMap;

use crate::frames::{Frames, ResultRow, TaskRow};
use crate::params::ParamValue;

/// Mean, sample standard deviation (n − 1; 0 for one value) and count.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stat {
    pub mean: f64,
    pub std: f64,
    pub n: usize,
}

impl Stat {
    pub fn of(values: &[f64]) -> Option<Stat> {
        let n = values.len();
        if n == 0 {
            return None;
        }
        let mean = values.iter().sum::<f64>() / n as f64;
        let std = if n > 1 { (values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / (n - 1) as f64).sqrt() } else { 0.0 };
        Some(Stat { mean, std, n })
    }
}

/// The final analysis epoch's row of every run of `experiment`, in frame order; runs without
/// a usable result are returned too (status ≠ "ok").
pub fn final_rows<'a>(frames: &'a Frames, experiment: &str) -> Vec<&'a ResultRow> {
    let mut last: BTreeMap<(&str, &str), &ResultRow> = BTreeMap::new();
    let mut order: Vec<(&str, &str)> = Vec::new();
    for r in frames.results.iter().filter(|r| r.experiment == experiment) {
        let k = (r.run.as_str(), r.key.as_str());
        match last.get(&k) {
            None => {
                order.push(k);
                last.insert(k, r);
            }
            Some(prev) if r.epoch > prev.epoch => {
                last.insert(k, r);
            }
            _ => {}
        }
    }
    order.into_iter().filter_map(|k| last.get(&k).copied()).collect()
}

/// One run's `per_task` rows at its final analysis epoch.
pub struct TaskRun<'a> {
    pub run: &'a ResultRow,
    pub tasks: Vec<&'a TaskRow>,
}

/// The runs of `experiment` with a usable result that `select` picks (all when `None`), in
/// frame order, each with its `per_task` rows of its final analysis epoch (of task set `set`
/// only, when given). A run without task rows is left out.
pub fn task_runs<'a>(frames: &'a Frames, experiment: &str, select: Option<&toml::Table>, set: Option<&str>) -> Vec<TaskRun<'a>> {
    let mut by_key: BTreeMap<(&str, i64), Vec<&TaskRow>> = BTreeMap::new();
    for t in frames.per_task.iter().filter(|t| t.experiment == experiment && set.is_none_or(|s| t.set == s)) {
        by_key.entry((t.key.as_str(), t.epoch)).or_default().push(t);
    }
    final_rows(frames, experiment)
        .into_iter()
        .filter(|r| r.status == "ok" && select.is_none_or(|sel| crate::spec::selects(sel, &r.params)))
        .filter_map(|r| {
            let tasks = by_key.get(&(r.key.as_str(), r.epoch?))?.clone();
            Some(TaskRun { run: r, tasks })
        })
        .collect()
}

/// Spearman's ρ between per-task values `x` and `y` over one run's rows: over its tasks' own
/// rows, or (`within_task`) over each task's class rows, then averaged over the tasks where it
/// is defined. `None` where no ρ is defined (fewer than 3 points, a constant value).
pub fn task_association(tasks: &[&TaskRow], x: &str, y: &str, within_task: bool) -> Option<f64> {
    let pairs = |rows: &mut dyn Iterator<Item = &&TaskRow>| -> (Vec<f64>, Vec<f64>) {
        rows.filter_map(|t| match (t.value(x), t.value(y)) {
            (Some(a), Some(b)) if a.is_finite() && b.is_finite() => Some((a, b)),
            _ => None,
        })
        .unzip()
    };
    if !within_task {
        let (xs, ys) = pairs(&mut tasks.iter().filter(|t| t.class.is_none()));
        return spearman(&xs, &ys);
    }
    let mut groups: BTreeMap<(&str, i64), Vec<&TaskRow>> = BTreeMap::new();
    for t in tasks.iter().filter(|t| t.class.is_some()) {
        groups.entry((t.set.as_str(), t.task)).or_default().push(t);
    }
    let rhos: Vec<f64> = groups
        .values()
        .filter_map(|g| {
            let (xs, ys) = pairs(&mut g.iter());
            spearman(&xs, &ys)
        })
        .collect();
    (!rhos.is_empty()).then(|| rhos.iter().sum::<f64>() / rhos.len() as f64)
}

/// Group rows by the canonical values of `params`, keeping first-appearance order.
pub fn group_by<'a>(rows: &[&'a ResultRow], params: &[String]) -> Vec<(Vec<String>, Vec<&'a ResultRow>)> {
    let mut groups: Vec<(Vec<String>, Vec<&ResultRow>)> = Vec::new();
    for r in rows {
        let label: Vec<String> = params.iter().map(|p| r.params.get(p).map(ParamValue::canonical).unwrap_or_default()).collect();
        match groups.iter_mut().find(|(l, _)| *l == label) {
            Some((_, g)) => g.push(r),
            None => groups.push((label, vec![r])),
        }
    }
    groups
}

/// Values of `metric` over the usable rows.
pub fn values(rows: &[&ResultRow], metric: &str) -> Vec<f64> {
    rows.iter().filter(|r| r.status == "ok").filter_map(|r| r.metrics.get(metric).copied().flatten()).filter(|v| v.is_finite()).collect()
}

/// Ranks with ties averaged (1-based).
fn ranks(xs: &[f64]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..xs.len()).collect();
    idx.sort_by(|&a, &b| xs[a].total_cmp(&xs[b]));
    let mut r = vec![0.0; xs.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && xs[idx[j + 1]] == xs[idx[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        for &k in &idx[i..=j] {
            r[k] = avg;
        }
        i = j + 1;
    }
    r
}

/// Spearman's rank correlation (Pearson correlation of the ranks); None for fewer than 3
/// points or a constant variable.
pub fn spearman(xs: &[f64], ys: &[f64]) -> Option<f64> {
    if xs.len() != ys.len() || xs.len() < 3 {
        return None;
    }
    let (rx, ry) = (ranks(xs), ranks(ys));
    let n = rx.len() as f64;
    let (mx, my) = (rx.iter().sum::<f64>() / n, ry.iter().sum::<f64>() / n);
    let cov: f64 = rx.iter().zip(&ry).map(|(a, b)| (a - mx) * (b - my)).sum();
    let vx: f64 = rx.iter().map(|a| (a - mx) * (a - mx)).sum();
    let vy: f64 = ry.iter().map(|b| (b - my) * (b - my)).sum();
    if vx == 0.0 || vy == 0.0 {
        return None;
    }
    Some(cov / (vx * vy).sqrt())
}

/// How a metric's numbers are printed: accuracies (percent) with one decimal, others with
/// four significant digits.
pub fn fmt_value(metric: &str, v: f64) -> String {
    if metric.ends_with("accuracy") {
        format!("{v:.1}")
    } else if v == 0.0 {
        "0".to_string()
    } else if v.abs() >= 1e4 || v.abs() < 1e-3 {
        format!("{v:.3e}")
    } else {
        let digits = (3 - v.abs().log10().floor() as i32).clamp(0, 6) as usize;
        format!("{v:.digits$}")
    }
}

pub fn fmt_stat(metric: &str, s: &Stat) -> String {
    if s.n > 1 {
        format!("{} ± {}", fmt_value(metric, s.mean), fmt_value(metric, s.std))
    } else {
        fmt_value(metric, s.mean)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spearman_hand_cases() {
        assert_eq!(spearman(&[1.0, 2.0, 3.0], &[10.0, 20.0, 30.0]), Some(1.0));
        assert_eq!(spearman(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]), Some(-1.0));
        // x ranks 1,2,3,4; y = [1, 3, 2, 4] → d² = 0+1+1+0 = 2, ρ = 1 − 6·2/(4·15) = 0.8.
        let r = spearman(&[1.0, 2.0, 3.0, 4.0], &[1.0, 3.0, 2.0, 4.0]).unwrap();
        assert!((r - 0.8).abs() < 1e-12);
        assert_eq!(spearman(&[1.0, 1.0, 1.0], &[1.0, 2.0, 3.0]), None);
    }

    #[test]
    fn stats_and_formats() {
        let s = Stat::of(&[1.0, 2.0, 3.0]).unwrap();
        assert_eq!((s.mean, s.std, s.n), (2.0, 1.0, 3));
        assert_eq!(fmt_stat("accuracy", &s), "2.0 ± 1.0");
        assert_eq!(fmt_value("nc1", 0.012345), "0.01235");
        assert_eq!(fmt_value("nc1", 12.345), "12.35");
    }
}
