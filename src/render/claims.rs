//! Claims: statements of the document, the literature or ours, checked on our numbers. A
//! verdict is a measurement with its uncertainty: the measured value with a 95 % interval over
//! seeds, and **holds** only when the whole interval lies on the claim's side of its threshold,
//! **does not hold** when it lies wholly on the other side, **inconclusive** otherwise (with a
//! note of the spread measured and the seeds that would separate the two sides).
//!
//! - `compare`: mean(a) − mean(b) of the final metric, Welch's interval over seeds.
//! - `change`: the mean over runs of last − first analysis epoch, a t interval.
//! - `trend`: Spearman's ρ between the parameter and the per-point mean, with a bootstrap
//!   interval that resamples each point's seeds ([`stats::spearman_interval`]).
//! - `level`: the mean over runs (those matching `a`) of the final metric, a t interval.
//! - `association`: Spearman's ρ between two per-task values within each run (those matching
//!   `a`), the mean over runs with a t interval ([`summary::task_association`]).
//!
//! One seed per side (or per point) gives no interval: such a claim is inconclusive, never
//! holds or fails on a single draw.

use super::stats::{self, Estimate};
use super::summary::{self, fmt_value, Stat};
use crate::frames::Frames;
use crate::params::ParamValue;
use crate::spec::{ClaimDecl, ClaimKind};

/// What a claim says when a side or point has one seed.
const ONE_SEED: &str = "one seed: no interval, so no verdict; run more seeds";

/// Bootstrap resamples of a trend's interval.
const RESAMPLES: usize = 2000;

/// The verdict on one claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Holds,
    DoesNotHold,
    Inconclusive,
    /// Nothing to measure (e.g. every run failed).
    NotMeasured,
}

impl Verdict {
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Holds => "holds",
            Verdict::DoesNotHold => "does not hold",
            Verdict::Inconclusive => "inconclusive",
            Verdict::NotMeasured => "not measured",
        }
    }
}

/// One claim, measured.
#[derive(Debug, Clone, PartialEq)]
pub struct ClaimResult {
    pub id: String,
    pub text: String,
    /// `document`, `literature` or `ours`.
    pub source: String,
    /// The section, sentence or citation, if the spec gives one.
    pub cite: Option<String>,
    pub verdict: Verdict,
    /// What was measured, in words (value, interval, n, threshold).
    pub measured: String,
    pub value: Option<f64>,
    /// The 95 % interval of `value`.
    pub interval: Option<(f64, f64)>,
    /// Seeds per side or per point (the smallest).
    pub n: usize,
    /// For an inconclusive verdict: the spread measured and the seeds that would decide it.
    pub power: Option<String>,
    pub gate: bool,
}

impl ClaimResult {
    pub fn verdict(&self) -> &'static str {
        self.verdict.name()
    }

    pub fn holds(&self) -> bool {
        self.verdict == Verdict::Holds
    }
}

fn bounds(c: &ClaimDecl) -> String {
    match (c.min, c.max) {
        (Some(a), Some(b)) => format!("expected in [{a}, {b}]"),
        (Some(a), None) => format!("expected ≥ {a}"),
        (None, Some(b)) => format!("expected ≤ {b}"),
        (None, None) => String::new(),
    }
}

/// Where an interval lies against the claim's bounds.
fn decide(c: &ClaimDecl, lo: f64, hi: f64) -> Verdict {
    let inside = c.min.is_none_or(|a| lo >= a) && c.max.is_none_or(|b| hi <= b);
    let outside = c.min.is_some_and(|a| hi < a) || c.max.is_some_and(|b| lo > b);
    if inside {
        Verdict::Holds
    } else if outside {
        Verdict::DoesNotHold
    } else {
        Verdict::Inconclusive
    }
}

/// The bound nearest to `v` (what an inconclusive difference must be told apart from).
fn nearest_bound(c: &ClaimDecl, v: f64) -> Option<f64> {
    [c.min, c.max].into_iter().flatten().min_by(|a, b| (a - v).abs().total_cmp(&(b - v).abs()))
}

fn interval_text(metric: &str, e: &Estimate) -> String {
    format!("95 % interval [{}, {}]", signed(metric, e.lo), signed(metric, e.hi))
}

/// The power note of an inconclusive difference: its spread over seeds (`sd`), and the seeds
/// per side a test would need to tell `value` from the nearest bound.
fn power_note(c: &ClaimDecl, value: f64, sd: f64, n: usize) -> Option<String> {
    let bound = nearest_bound(c, value)?;
    let spread = format!("spread over seeds (sd) {}", fmt_value(&c.metric, sd));
    match stats::seeds_needed(sd, value - bound) {
        Some(k) if k > n => Some(format!("{spread}; about {k} seeds per side would tell {} from {}", signed(&c.metric, value), signed(&c.metric, bound))),
        Some(_) => Some(format!("{spread}; the interval is wide for so few seeds (the t quantile): a few more seeds would decide it")),
        None => Some(format!("{spread}; the difference sits on the bound {}", signed(&c.metric, bound))),
    }
}

pub fn evaluate(c: &ClaimDecl, frames: &Frames) -> ClaimResult {
    let finals = summary::final_rows(frames, &c.experiment);
    let mut r = ClaimResult {
        id: c.id.clone(),
        text: c.text.clone(),
        source: c.source.name().to_string(),
        cite: c.cite.clone(),
        verdict: Verdict::NotMeasured,
        measured: "no usable runs".into(),
        value: None,
        interval: None,
        n: 0,
        power: None,
        gate: c.gate,
    };
    match c.kind {
        ClaimKind::Trend => {
            let x = c.x.clone().unwrap_or_default();
            // The final values of each point (value of x), in x order.
            let mut points: Vec<(f64, Vec<f64>)> = Vec::new();
            for row in finals.iter().filter(|row| row.status == "ok") {
                let (Some(xv), Some(Some(y))) = (row.params.get(&x).and_then(ParamValue::as_f64), row.metrics.get(&c.metric)) else { continue };
                if !y.is_finite() {
                    continue;
                }
                match points.iter_mut().find(|(px, _)| *px == xv) {
                    Some((_, ys)) => ys.push(*y),
                    None => points.push((xv, vec![*y])),
                }
            }
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            let xs: Vec<f64> = points.iter().map(|(x, _)| *x).collect();
            let means: Vec<f64> = points.iter().map(|(_, ys)| ys.iter().sum::<f64>() / ys.len() as f64).collect();
            let Some(rho) = summary::spearman(&xs, &means) else { return r };
            let strength = c.min_strength.unwrap_or(0.5);
            let decreasing = c.direction.as_deref() == Some("decreasing");
            r.n = points.iter().map(|(_, ys)| ys.len()).min().unwrap_or(0);
            r.value = Some(rho);
            let expected = format!("expected {} with |ρ| ≥ {strength}", c.direction.as_deref().unwrap_or("?"));
            let head = format!("Spearman ρ({x}, mean {}) = {rho:+.2} over {} points, n = {} per point", c.metric, points.len(), r.n);
            match stats::spearman_interval(&points, RESAMPLES, seed_of(&c.id)) {
                Some(e) => {
                    r.interval = Some((e.lo, e.hi));
                    // On the claim's side: ρ ≥ s (increasing) or ρ ≤ −s (decreasing).
                    let (lo, hi) = if decreasing { (-e.hi, -e.lo) } else { (e.lo, e.hi) };
                    r.verdict = if lo >= strength {
                        Verdict::Holds
                    } else if hi < strength {
                        Verdict::DoesNotHold
                    } else {
                        Verdict::Inconclusive
                    };
                    r.measured = format!("{head}; bootstrap 95 % interval [{:+.2}, {:+.2}] ({expected})", e.lo, e.hi);
                    if r.verdict == Verdict::Inconclusive {
                        r.power = Some("the interval straddles the threshold: more seeds per point narrow it".into());
                    }
                }
                None => {
                    r.verdict = Verdict::Inconclusive;
                    r.measured = format!("{head} ({expected}); {ONE_SEED}");
                }
            }
        }
        ClaimKind::Compare => {
            let (Some(a), Some(b)) = (&c.a, &c.b) else { return r };
            let pick = |sel: &toml::Table| -> Vec<f64> {
                let rows: Vec<_> = finals.iter().copied().filter(|row| crate::spec::selects(sel, &row.params)).collect();
                summary::values(&rows, &c.metric)
            };
            let (va, vb) = (pick(a), pick(b));
            let (Some(sa), Some(sb)) = (Stat::of(&va), Stat::of(&vb)) else { return r };
            let d = sa.mean - sb.mean;
            r.n = sa.n.min(sb.n);
            r.value = Some(d);
            let head = format!("{} difference {} ({} vs {}; n = {} and {}; {})", c.metric, signed(&c.metric, d), fmt_value(&c.metric, sa.mean), fmt_value(&c.metric, sb.mean), sa.n, sb.n, bounds(c));
            welch_verdict(c, &va, &vb, (&sa, &sb), head, &mut r);
        }
        ClaimKind::Change => {
            let mut diffs = Vec::new();
            for last in finals.iter().filter(|row| row.status == "ok") {
                let first = frames.results.iter().filter(|row| row.experiment == c.experiment && row.key == last.key && row.run == last.run).min_by_key(|row| row.epoch);
                if let (Some(f), Some(l)) = (first.and_then(|f| f.metrics.get(&c.metric).copied().flatten()), last.metrics.get(&c.metric).copied().flatten()) {
                    if f.is_finite() && l.is_finite() {
                        diffs.push(l - f);
                    }
                }
            }
            let Some(s) = Stat::of(&diffs) else { return r };
            r.n = s.n;
            r.value = Some(s.mean);
            let head = format!("mean change of {} from the first to the last analysis epoch {} over {} runs ({})", c.metric, signed(&c.metric, s.mean), s.n, bounds(c));
            t_verdict(c, &diffs, &s, head, |e| format!("t {}", interval_text(&c.metric, e)), &mut r);
        }
        ClaimKind::Interaction => interaction(c, &finals, &mut r),
        ClaimKind::Level => {
            let rows: Vec<_> = finals.iter().copied().filter(|row| c.a.as_ref().is_none_or(|sel| crate::spec::selects(sel, &row.params))).collect();
            let values = summary::values(&rows, &c.metric);
            let Some(s) = Stat::of(&values) else { return r };
            r.n = s.n;
            r.value = Some(s.mean);
            let head = format!("mean final {} {} over {} runs ({})", c.metric, fmt_value(&c.metric, s.mean), s.n, bounds(c));
            t_verdict(c, &values, &s, head, |e| format!("t 95 % interval [{}, {}]", fmt_value(&c.metric, e.lo), fmt_value(&c.metric, e.hi)), &mut r);
        }
        ClaimKind::Association => association(c, frames, &mut r),
    }
    r
}

/// An `association` claim: per run, Spearman's ρ between the per-task values `x` and `metric`
/// ([`summary::task_association`]); the mean over runs with a t interval.
fn association(c: &ClaimDecl, frames: &Frames, r: &mut ClaimResult) {
    let Some(x) = &c.x else { return };
    let within = c.within.as_deref() == Some("task");
    let runs = summary::task_runs(frames, &c.experiment, c.a.as_ref(), c.set.as_deref());
    let values: Vec<f64> = runs.iter().filter_map(|t| summary::task_association(&t.tasks, x, &c.metric, within)).collect();
    let Some(s) = Stat::of(&values) else {
        if !runs.is_empty() {
            r.measured = format!("no run has a defined ρ({x}, {}) (too few tasks, or a constant value)", c.metric);
        }
        return;
    };
    r.n = s.n;
    r.value = Some(s.mean);
    let over = if within { "within each task over its classes, averaged over tasks, then" } else { "over tasks," };
    let set = c.set.as_ref().map(|s| format!(" (task set `{s}`)")).unwrap_or_default();
    let head = format!("Spearman ρ({x}, {}){set} {over} mean {:+.3} over {} runs ({})", c.metric, s.mean, s.n, bounds(c));
    t_verdict(c, &values, &s, head, |e| format!("t 95 % interval [{:+.3}, {:+.3}]", e.lo, e.hi), r);
}

/// An `interaction` claim: per run d = metric − metric2 (final row), then (mean d | a) −
/// (mean d | b) with Welch's interval, which equals (a − b) on metric − (a − b) on metric2.
fn interaction(c: &ClaimDecl, finals: &[&crate::frames::ResultRow], r: &mut ClaimResult) {
    let (Some(a), Some(b), Some(m2)) = (&c.a, &c.b, &c.metric2) else { return };
    let diffs = |sel: &toml::Table| -> Vec<f64> {
        finals
            .iter()
            .filter(|row| row.status == "ok" && crate::spec::selects(sel, &row.params))
            .filter_map(|row| match (row.metrics.get(&c.metric).copied().flatten(), row.metrics.get(m2).copied().flatten()) {
                (Some(x), Some(y)) if x.is_finite() && y.is_finite() => Some(x - y),
                _ => None,
            })
            .collect()
    };
    let (va, vb) = (diffs(a), diffs(b));
    let (Some(sa), Some(sb)) = (Stat::of(&va), Stat::of(&vb)) else { return };
    let d = sa.mean - sb.mean;
    r.n = sa.n.min(sb.n);
    r.value = Some(d);
    let head = format!(
        "(a − b) on {} − (a − b) on {m2} = {} ({} − {m2}: {} vs {}; n = {} and {}; {})",
        c.metric,
        signed(&c.metric, d),
        c.metric,
        fmt_value(&c.metric, sa.mean),
        fmt_value(&c.metric, sb.mean),
        sa.n,
        sb.n,
        bounds(c)
    );
    welch_verdict(c, &va, &vb, (&sa, &sb), head, r);
}

/// The verdict of a mean (`r.value`, `r.n` already set; `s` summarises `values`) by its t
/// interval, with the power note of an inconclusive one; `head` begins the text and `interval`
/// words the interval.
fn t_verdict(c: &ClaimDecl, values: &[f64], s: &Stat, head: String, interval: impl Fn(&Estimate) -> String, r: &mut ClaimResult) {
    match stats::mean_interval(values) {
        Some(e) => {
            r.interval = Some((e.lo, e.hi));
            r.verdict = decide(c, e.lo, e.hi);
            r.measured = format!("{head}; {}", interval(&e));
            if r.verdict == Verdict::Inconclusive {
                r.power = power_note(c, s.mean, s.std, r.n);
            }
        }
        None => {
            r.verdict = Verdict::Inconclusive;
            r.measured = format!("{head}; {ONE_SEED}");
        }
    }
}

/// The verdict of a difference of means d = mean(va) − mean(vb) (`r.value`, `r.n` already set),
/// by Welch's interval, with the power note of an inconclusive one; `head` begins the text.
fn welch_verdict(c: &ClaimDecl, va: &[f64], vb: &[f64], (sa, sb): (&Stat, &Stat), head: String, r: &mut ClaimResult) {
    match stats::welch(va, vb) {
        Some(e) => {
            r.interval = Some((e.lo, e.hi));
            r.verdict = decide(c, e.lo, e.hi);
            r.measured = format!("{head}; Welch {}", interval_text(&c.metric, &e));
            if r.verdict == Verdict::Inconclusive {
                let sd = ((sa.std * sa.std + sb.std * sb.std) / 2.0).sqrt();
                r.power = power_note(c, sa.mean - sb.mean, sd, r.n);
            }
        }
        None => {
            r.verdict = Verdict::Inconclusive;
            r.measured = format!("{head}; {ONE_SEED}");
        }
    }
}

/// A fixed seed per claim, so that a report's bootstrap intervals render to the same text.
fn seed_of(id: &str) -> u64 {
    id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// A value with an explicit sign.
fn signed(metric: &str, v: f64) -> String {
    let s = fmt_value(metric, v);
    if v > 0.0 {
        format!("+{s}")
    } else {
        s
    }
}

/// "document (§3)", "literature (Papyan et al. 2020)", "ours".
pub fn source_text(r: &ClaimResult) -> String {
    match &r.cite {
        Some(c) => format!("{} ({c})", r.source),
        None => r.source.clone(),
    }
}

pub fn markdown(r: &ClaimResult) -> String {
    let mark = match r.verdict {
        Verdict::Holds => "✅ **holds**",
        Verdict::DoesNotHold => "❌ **does not hold**",
        Verdict::Inconclusive => "❔ **inconclusive**",
        Verdict::NotMeasured => "⚪ **not measured**",
    };
    let power = r.power.as_ref().map(|p| format!("  \n> power: {p}")).unwrap_or_default();
    format!("> {mark} at this scale: {}  \n> source: {}  \n> measured: {}{power}\n", r.text, source_text(r), r.measured)
}

pub fn html(r: &ClaimResult) -> String {
    let class = match r.verdict {
        Verdict::Holds => "holds",
        Verdict::DoesNotHold => "fails",
        Verdict::Inconclusive => "inconclusive",
        Verdict::NotMeasured => "unmeasured",
    };
    // `esc` also escapes `"`, so an id cannot leave its `id="…"` attribute.
    let esc = super::table::esc;
    let power = r.power.as_ref().map(|p| format!("<br><small>power: {}</small>", esc(p))).unwrap_or_default();
    format!(
        "<div class=\"claim {class}\" id=\"claim-{}\"><b>{}</b> at this scale: {}<br><small>source: {}</small><br><small>measured: {}</small>{power}</div>",
        esc(&r.id),
        r.verdict(),
        esc(&r.text),
        esc(&source_text(r)),
        esc(&r.measured)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frames::ResultRow;
    use crate::params::Params;
    use std::collections::BTreeMap;

    /// Final rows of experiment `e`: `(variant, value of m)` per run, one seed each.
    fn frames(rows: &[(&str, f64, f64)]) -> Frames {
        let results = rows
            .iter()
            .enumerate()
            .map(|(i, (variant, x, m))| ResultRow {
                experiment: "e".into(),
                run: format!("run{i}"),
                key: format!("k{i}"),
                seed: i as u64,
                status: "ok".into(),
                reason: None,
                epoch: Some(1),
                params: Params::from([("variant".to_string(), ParamValue::Str(variant.to_string())), ("x".to_string(), ParamValue::Float(*x))]),
                metrics: BTreeMap::from([("m".to_string(), Some(*m))]),
            })
            .collect();
        Frames { results, ..Default::default() }
    }

    fn compare(min: f64) -> ClaimDecl {
        toml::from_str(&format!(
            "id = \"c\"\ntext = \"a beats b\"\nsource = \"document\"\nexperiment = \"e\"\nkind = \"compare\"\nmetric = \"m\"\na = {{ variant = \"a\" }}\nb = {{ variant = \"b\" }}\nmin = {min:?}\n"
        ))
        .unwrap()
    }

    #[test]
    fn a_difference_holds_fails_or_is_inconclusive_by_its_interval() {
        // a: 10, 11, 12 (mean 11, var 1); b: 5, 6, 7 (mean 6, var 1). d = 5, se = √(2/3),
        // df = 4, t = 2.7764: interval 5 ± 2.2670 = [2.733, 7.267].
        let f = frames(&[("a", 0.0, 10.0), ("a", 0.0, 11.0), ("a", 0.0, 12.0), ("b", 0.0, 5.0), ("b", 0.0, 6.0), ("b", 0.0, 7.0)]);
        let r = evaluate(&compare(2.0), &f);
        assert_eq!(r.verdict, Verdict::Holds);
        let (lo, hi) = r.interval.unwrap();
        let half = 2.776_445_1 * (2.0f64 / 3.0).sqrt();
        assert!((lo - (5.0 - half)).abs() < 1e-5 && (hi - (5.0 + half)).abs() < 1e-5, "{lo} {hi}");
        assert_eq!((r.value, r.n, r.source.as_str()), (Some(5.0), 3, "document"));
        // Threshold 8: the whole interval lies below it.
        assert_eq!(evaluate(&compare(8.0), &f).verdict, Verdict::DoesNotHold);
        // Threshold 4: inside the interval, so inconclusive, with a power note.
        let r = evaluate(&compare(4.0), &f);
        assert_eq!(r.verdict, Verdict::Inconclusive);
        assert!(r.power.as_deref().unwrap().contains("spread over seeds (sd) 1"), "{:?}", r.power);
        // One seed a side: no interval, never a verdict either way.
        let one = frames(&[("a", 0.0, 100.0), ("b", 0.0, 0.0)]);
        let r = evaluate(&compare(2.0), &one);
        assert_eq!((r.verdict, r.interval), (Verdict::Inconclusive, None));
        assert!(r.measured.contains("one seed"), "{}", r.measured);
    }

    #[test]
    fn a_level_holds_inside_its_range_and_fails_outside() {
        // a: 0.2, 0.3, 0.4 (mean 0.3, sd 0.1, df 2, t = 4.3027): interval 0.3 ± 0.2484.
        let f = frames(&[("a", 0.0, 0.2), ("a", 0.0, 0.3), ("a", 0.0, 0.4), ("b", 0.0, 9.0)]);
        let level = |min: f64, max: f64| -> ClaimDecl {
            toml::from_str(&format!(
                "id = \"l\"\ntext = \"m stays in range\"\nsource = \"ours\"\nexperiment = \"e\"\nkind = \"level\"\nmetric = \"m\"\na = {{ variant = \"a\" }}\nmin = {min:?}\nmax = {max:?}\n"
            ))
            .unwrap()
        };
        let r = evaluate(&level(0.0, 1.0), &f);
        assert_eq!((r.verdict, r.n), (Verdict::Holds, 3));
        let (lo, hi) = r.interval.unwrap();
        let half = 4.302_652_7 * 0.1 / 3f64.sqrt();
        assert!((lo - (0.3 - half)).abs() < 1e-6 && (hi - (0.3 + half)).abs() < 1e-6, "{lo} {hi}");
        assert_eq!(evaluate(&level(1.0, 2.0), &f).verdict, Verdict::DoesNotHold);
        assert_eq!(evaluate(&level(0.25, 1.0), &f).verdict, Verdict::Inconclusive);
    }

    #[test]
    fn an_interaction_is_a_difference_of_differences_with_welch_on_per_run_differences() {
        // Runs (m, m2): a (10, 4), (12, 5), (11, 4) → d = 6, 7, 7; b (8, 6), (9, 5), (8, 5) →
        // d = 2, 4, 3. (a − b) on m = 11 − 8.333 = 2.667, on m2 = 4.333 − 5.333 = −1: 3.667.
        let row = |i: usize, v: &str, m: f64, m2: f64| crate::frames::ResultRow {
            experiment: "e".into(),
            run: format!("run{i}"),
            key: format!("k{i}"),
            seed: i as u64,
            status: "ok".into(),
            reason: None,
            epoch: Some(1),
            params: Params::from([("variant".to_string(), ParamValue::Str(v.to_string()))]),
            metrics: BTreeMap::from([("m".to_string(), Some(m)), ("m2".to_string(), Some(m2))]),
        };
        let data = [("a", 10.0, 4.0), ("a", 12.0, 5.0), ("a", 11.0, 4.0), ("b", 8.0, 6.0), ("b", 9.0, 5.0), ("b", 8.0, 5.0)];
        let f = Frames { results: data.iter().enumerate().map(|(i, &(v, m, m2))| row(i, v, m, m2)).collect(), ..Default::default() };
        let claim = |min: f64| -> ClaimDecl {
            toml::from_str(&format!(
                "id = \"i\"\ntext = \"the gain is larger on m\"\nsource = \"ours\"\nexperiment = \"e\"\nkind = \"interaction\"\nmetric = \"m\"\nmetric2 = \"m2\"\na = {{ variant = \"a\" }}\nb = {{ variant = \"b\" }}\nmin = {min:?}\n"
            ))
            .unwrap()
        };
        let r = evaluate(&claim(0.0), &f);
        assert!((r.value.unwrap() - 11.0 / 3.0).abs() < 1e-12, "{:?}", r.value);
        // d_a: mean 6.667, var 1/3; d_b: mean 3, var 1. se = √(1/9 + 1/3) = 0.6667,
        // df = (4/9)² / ((1/9)²/2 + (1/3)²/2) = 3.2: t(0.975, 3.2) ≈ 3.0: interval ≈ [1.6, 5.7].
        let (lo, hi) = r.interval.unwrap();
        let e = stats::welch(&[6.0, 7.0, 7.0], &[2.0, 4.0, 3.0]).unwrap();
        assert!((lo - e.lo).abs() < 1e-12 && (hi - e.hi).abs() < 1e-12);
        assert!(lo > 1.0 && lo < 2.0 && hi > 5.0 && hi < 6.5, "{lo} {hi}");
        assert_eq!((r.verdict, r.n), (Verdict::Holds, 3));
        // A threshold inside the interval: inconclusive; above it: does not hold.
        assert_eq!(evaluate(&claim(3.0), &f).verdict, Verdict::Inconclusive);
        assert_eq!(evaluate(&claim(8.0), &f).verdict, Verdict::DoesNotHold);
    }

    #[test]
    fn a_trend_needs_seeds_at_every_point() {
        let trend: ClaimDecl = toml::from_str(
            "id = \"t\"\ntext = \"m grows with x\"\nsource = \"ours\"\nexperiment = \"e\"\nkind = \"trend\"\nmetric = \"m\"\nx = \"x\"\ndirection = \"increasing\"\nmin_strength = 0.5\n",
        )
        .unwrap();
        // A perfect trend with one seed per point: ρ = 1 but no interval.
        let single = frames(&[("a", 1.0, 1.0), ("a", 2.0, 2.0), ("a", 3.0, 3.0), ("a", 4.0, 4.0)]);
        let r = evaluate(&trend, &single);
        assert_eq!((r.verdict, r.value, r.n), (Verdict::Inconclusive, Some(1.0), 1));
        // Two tight seeds per point: every resample keeps the order, so it holds.
        let rows: Vec<(&str, f64, f64)> = (1..=4).flat_map(|i| [("a", i as f64, i as f64 - 0.01), ("a", i as f64, i as f64 + 0.01)]).collect();
        assert_eq!(evaluate(&trend, &frames(&rows)).verdict, Verdict::Holds);
        // The opposite direction, equally tight: does not hold.
        let rows: Vec<(&str, f64, f64)> = (1..=4).flat_map(|i| [("a", i as f64, -(i as f64) - 0.01), ("a", i as f64, -(i as f64) + 0.01)]).collect();
        assert_eq!(evaluate(&trend, &frames(&rows)).verdict, Verdict::DoesNotHold);
    }
}
