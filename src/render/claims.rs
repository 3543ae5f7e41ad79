//! Claims: a document's statements checked on our numbers, each shown as holding or not at
//! this scale with the measured value.

use super::summary::{self, fmt_value, Stat};
use crate::frames::Frames;
use crate::params::{self, ParamValue};
use crate::spec::{ClaimDecl, ClaimKind};

/// The verdict on one claim.
#[derive(Debug, Clone, PartialEq)]
pub struct ClaimResult {
    pub id: String,
    pub text: String,
    /// None when there was nothing to measure (e.g. every run failed).
    pub holds: Option<bool>,
    pub measured: String,
    pub value: Option<f64>,
    pub gate: bool,
}

impl ClaimResult {
    pub fn verdict(&self) -> &'static str {
        match self.holds {
            Some(true) => "holds",
            Some(false) => "does not hold",
            None => "not measured",
        }
    }
}

fn matches(sel: &toml::Table, p: &crate::params::Params) -> bool {
    sel.iter().all(|(k, v)| match (params::from_toml(v), p.get(k)) {
        (Some(want), Some(have)) => match (want.as_f64(), have.as_f64()) {
            (Some(a), Some(b)) => a == b,
            _ => want.canonical() == have.canonical(),
        },
        _ => false,
    })
}

fn bounds(c: &ClaimDecl) -> String {
    match (c.min, c.max) {
        (Some(a), Some(b)) => format!("expected in [{a}, {b}]"),
        (Some(a), None) => format!("expected ≥ {a}"),
        (None, Some(b)) => format!("expected ≤ {b}"),
        (None, None) => String::new(),
    }
}

fn within(c: &ClaimDecl, v: f64) -> bool {
    c.min.is_none_or(|a| v >= a) && c.max.is_none_or(|b| v <= b)
}

pub fn evaluate(c: &ClaimDecl, frames: &Frames) -> ClaimResult {
    let finals = summary::final_rows(frames, &c.experiment);
    let mut r = ClaimResult { id: c.id.clone(), text: c.text.clone(), holds: None, measured: "no usable runs".into(), value: None, gate: c.gate };
    match c.kind {
        ClaimKind::Trend => {
            let x = c.x.clone().unwrap_or_default();
            let pts: Vec<(f64, f64)> = finals
                .iter()
                .filter(|row| row.status == "ok")
                .filter_map(|row| Some((row.params.get(&x).and_then(ParamValue::as_f64)?, row.metrics.get(&c.metric).copied().flatten()?)))
                .filter(|(_, y)| y.is_finite())
                .collect();
            let (xs, ys): (Vec<f64>, Vec<f64>) = pts.iter().copied().unzip();
            if let Some(rho) = summary::spearman(&xs, &ys) {
                let strength = c.min_strength.unwrap_or(0.5);
                let decreasing = c.direction.as_deref() == Some("decreasing");
                r.holds = Some(if decreasing { rho <= -strength } else { rho >= strength });
                r.value = Some(rho);
                r.measured = format!("Spearman ρ({x}, {}) = {rho:+.2} over {} runs (expected {} with |ρ| ≥ {strength})", c.metric, xs.len(), c.direction.as_deref().unwrap_or("?"));
            }
        }
        ClaimKind::Compare => {
            let (Some(a), Some(b)) = (&c.a, &c.b) else { return r };
            let pick = |sel: &toml::Table| -> Vec<f64> {
                let rows: Vec<_> = finals.iter().copied().filter(|row| matches(sel, &row.params)).collect();
                summary::values(&rows, &c.metric)
            };
            let (va, vb) = (pick(a), pick(b));
            if let (Some(sa), Some(sb)) = (Stat::of(&va), Stat::of(&vb)) {
                let d = sa.mean - sb.mean;
                r.holds = Some(within(c, d));
                r.value = Some(d);
                r.measured =
                    format!("{} difference {} ({} vs {}; n = {} and {}; {})", c.metric, signed(&c.metric, d), fmt_value(&c.metric, sa.mean), fmt_value(&c.metric, sb.mean), sa.n, sb.n, bounds(c));
            }
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
            if let Some(s) = Stat::of(&diffs) {
                r.holds = Some(within(c, s.mean));
                r.value = Some(s.mean);
                r.measured = format!("mean change of {} from the first to the last analysis epoch {} over {} runs ({})", c.metric, signed(&c.metric, s.mean), s.n, bounds(c));
            }
        }
    }
    r
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

pub fn markdown(r: &ClaimResult) -> String {
    let mark = match r.holds {
        Some(true) => "✅ **holds**",
        Some(false) => "❌ **does not hold**",
        None => "⚪ **not measured**",
    };
    format!("> {mark} at this scale: {}  \n> measured: {}\n", r.text, r.measured)
}

pub fn html(r: &ClaimResult) -> String {
    let class = match r.holds {
        Some(true) => "holds",
        Some(false) => "fails",
        None => "unmeasured",
    };
    // `esc` also escapes `"`, so an id cannot leave its `id="…"` attribute.
    let esc = super::table::esc;
    format!("<div class=\"claim {class}\" id=\"claim-{}\"><b>{}</b> at this scale: {}<br><small>measured: {}</small></div>", esc(&r.id), r.verdict(), esc(&r.text), esc(&r.measured))
}
