//! Figures drawn with plotters as SVG: a metric against a parameter (`line`), metrics across
//! epochs (`epochs`), the class distribution coloured by group (`classes`), and per-task values
//! against each other (`scatter`).
//!
//! Log axes are drawn by plotting log10 of the values on a linear axis and labelling ticks
//! with the original values, which keeps one code path for every combination of axes.

use std::collections::BTreeMap;

use plotters::prelude::*;

use super::summary::{self, Stat};
use crate::frames::Frames;
use crate::params::ParamValue;
use crate::spec::{Experiment, FigureDecl, FigureKind};

const PALETTE: [RGBColor; 8] =
    [RGBColor(31, 119, 180), RGBColor(255, 127, 14), RGBColor(44, 160, 44), RGBColor(214, 39, 40), RGBColor(148, 103, 189), RGBColor(140, 86, 75), RGBColor(227, 119, 194), RGBColor(127, 127, 127)];

/// One line of a panel: name, (x, mean, std) points, and a colour when it means something
/// (the group of a class).
struct Line {
    name: String,
    points: Vec<(f64, f64, f64)>,
    color: Option<RGBColor>,
}

fn group_color(group: &str) -> RGBColor {
    match group {
        "head" => PALETTE[0],
        "medium" => PALETTE[1],
        _ => PALETTE[3],
    }
}

/// A per-class value of a `per_class` row by column name.
fn class_value(r: &crate::frames::ClassRow, name: &str) -> Option<f64> {
    match name {
        "test_accuracy" => r.test_accuracy,
        "classifier_norm" => Some(r.classifier_norm),
        "train_count" => Some(r.train_count as f64),
        other => r.extra.get(other).copied().flatten(),
    }
}

/// Errors while drawing (plotters' own errors are turned into text).
#[derive(Debug, thiserror::Error)]
#[error("figure `{id}`: {message}")]
pub struct FigureError {
    pub id: String,
    pub message: String,
}

fn tr(v: f64, log: bool) -> f64 {
    if log {
        v.max(1e-300).log10()
    } else {
        v
    }
}

fn lines_for(decl: &FigureDecl, exp: &Experiment, frames: &Frames, metric: &str) -> Vec<Line> {
    let series: Vec<String> = decl.series.as_ref().map(|s| s.to_vec()).unwrap_or_default();
    match decl.kind {
        FigureKind::Line => {
            let x = decl.x.clone().unwrap_or_default();
            let finals = summary::final_rows(frames, &exp.id);
            summary::group_by(&finals, &series)
                .into_iter()
                .map(|(label, rows)| {
                    let mut by_x: BTreeMap<String, (f64, Vec<f64>)> = BTreeMap::new();
                    for r in rows.iter().filter(|r| r.status == "ok") {
                        let (Some(xv), Some(Some(y))) = (r.params.get(&x).and_then(ParamValue::as_f64), r.metrics.get(metric)) else { continue };
                        if y.is_finite() {
                            by_x.entry(format!("{xv:e}")).or_insert((xv, Vec::new())).1.push(*y);
                        }
                    }
                    let mut points: Vec<(f64, f64, f64)> = by_x.values().filter_map(|(xv, ys)| Stat::of(ys).map(|s| (*xv, s.mean, s.std))).collect();
                    points.sort_by(|a, b| a.0.total_cmp(&b.0));
                    Line { name: series_name(&series, &label), points, color: None }
                })
                .collect()
        }
        FigureKind::ClassEpochs => {
            let rows: Vec<_> = frames.per_class.iter().filter(|r| r.experiment == exp.id).collect();
            let mut classes: Vec<(i64, String)> = rows.iter().map(|r| (r.class, r.group.clone())).collect();
            classes.sort();
            classes.dedup_by_key(|c| c.0);
            classes
                .into_iter()
                .map(|(class, group)| {
                    let mut by_epoch: BTreeMap<i64, Vec<f64>> = BTreeMap::new();
                    for r in rows.iter().filter(|r| r.class == class) {
                        if let Some(v) = class_value(r, metric).filter(|v| v.is_finite()) {
                            by_epoch.entry(r.epoch).or_default().push(v);
                        }
                    }
                    let points = by_epoch.iter().filter_map(|(e, ys)| Stat::of(ys).map(|s| (*e as f64, s.mean, s.std))).collect();
                    Line { name: format!("class {class} ({group})"), points, color: Some(group_color(&group)) }
                })
                .collect()
        }
        FigureKind::Epochs | FigureKind::Classes | FigureKind::Scatter => {
            let rows: Vec<_> = frames.results.iter().filter(|r| r.experiment == exp.id && r.status == "ok").collect();
            summary::group_by(&rows, &series)
                .into_iter()
                .map(|(label, rows)| {
                    let mut by_epoch: BTreeMap<i64, Vec<f64>> = BTreeMap::new();
                    for r in rows {
                        if let (Some(e), Some(Some(y))) = (r.epoch, r.metrics.get(metric)) {
                            if y.is_finite() {
                                by_epoch.entry(e).or_default().push(*y);
                            }
                        }
                    }
                    let points = by_epoch.iter().filter_map(|(e, ys)| Stat::of(ys).map(|s| (*e as f64, s.mean, s.std))).collect();
                    Line { name: series_name(&series, &label), points, color: None }
                })
                .collect()
        }
    }
}

fn series_name(series: &[String], label: &[String]) -> String {
    if series.is_empty() {
        "all runs".to_string()
    } else {
        series.iter().zip(label).map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(", ")
    }
}

fn fmt_tick(v: f64, log: bool) -> String {
    let x = if log { 10f64.powf(v) } else { v };
    if x == 0.0 {
        "0".into()
    } else if x.abs() >= 1e4 || x.abs() < 1e-3 {
        format!("{x:.0e}")
    } else {
        let s = format!("{x:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// Draw the figure as an SVG document.
pub fn svg(decl: &FigureDecl, exp: &Experiment, frames: &Frames) -> Result<String, FigureError> {
    let fail = |e: &dyn std::fmt::Display| FigureError { id: decl.id.clone(), message: e.to_string() };
    if decl.kind == FigureKind::Classes {
        return classes_svg(decl, exp, frames).map_err(|e| fail(&e));
    }
    if decl.kind == FigureKind::Scatter {
        return scatter_svg(decl, exp, frames).map_err(|e| fail(&e));
    }
    let metrics = decl.y.to_vec();
    let cols = metrics.len().clamp(1, 2);
    let rows_n = metrics.len().div_ceil(cols).max(1);
    // With several lines, each panel gets a legend strip right of its plot (never over a line);
    // the figure widens by the strip, so the plots keep their size.
    let series: Vec<String> = metrics.first().map(|m| lines_for(decl, exp, frames, m).iter().map(|l| legend_name(&l.name)).collect()).unwrap_or_default();
    let legend_w = if series.len() > 1 { series.iter().map(|n| n.chars().count()).max().unwrap_or(0) as u32 * 6 + 36 } else { 0 };
    let (w, h) = ((460 + legend_w) * cols as u32, 320 * rows_n as u32 + 40);
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| fail(&e))?;
        let root = root.titled(&decl.title, ("sans-serif", 18)).map_err(|e| fail(&e))?;
        let panels = root.split_evenly((rows_n, cols));
        let x_log = decl.x_log;
        let x_name = match decl.kind {
            FigureKind::Line => decl.x.clone().unwrap_or_default(),
            _ => "epoch".to_string(),
        };
        for (panel, metric) in panels.iter().zip(&metrics) {
            let lines = lines_for(decl, exp, frames, metric);
            let pts: Vec<(f64, f64)> = lines.iter().flat_map(|l| l.points.iter().map(|p| (tr(p.0, x_log), tr(p.1, decl.y_log)))).collect();
            if pts.is_empty() {
                panel.draw(&Text::new(format!("{metric}: no data"), (20, 40), ("sans-serif", 14))).map_err(|e| fail(&e))?;
                continue;
            }
            let (mut x0, mut x1) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
            let (mut y0, mut y1) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
            if x1 - x0 < 1e-12 {
                x0 -= 0.5;
                x1 += 0.5;
            }
            let pad = ((y1 - y0) * 0.08).max(1e-9);
            y0 -= pad;
            y1 += pad;
            let (panel_w, _) = panel.dim_in_pixel();
            let names: Vec<String> = lines.iter().map(|l| legend_name(&l.name)).collect();
            let (plot, legend) = panel.split_horizontally(panel_w.saturating_sub(legend_w));
            let mut chart =
                ChartBuilder::on(&plot).margin(12).caption(metric, ("sans-serif", 15)).x_label_area_size(36).y_label_area_size(56).build_cartesian_2d(x0..x1, y0..y1).map_err(|e| fail(&e))?;
            let y_log = decl.y_log;
            chart
                .configure_mesh()
                .x_desc(if x_log { format!("{x_name} (log scale)") } else { x_name.clone() })
                .x_label_formatter(&|v| fmt_tick(*v, x_log))
                .y_label_formatter(&|v| fmt_tick(*v, y_log))
                .light_line_style(WHITE.mix(0.0))
                .draw()
                .map_err(|e| fail(&e))?;
            for (i, line) in lines.iter().enumerate() {
                let color = line.color.unwrap_or(PALETTE[i % PALETTE.len()]);
                let data: Vec<(f64, f64)> = line.points.iter().map(|p| (tr(p.0, x_log), tr(p.1, decl.y_log))).collect();
                chart.draw_series(LineSeries::new(data.clone(), color.stroke_width(2))).map_err(|e| fail(&e))?;
                if lines.len() > 1 && legend_w > 0 {
                    let y = 44 + 16 * i as i32;
                    legend.draw(&PathElement::new(vec![(4, y), (22, y)], color.stroke_width(2))).map_err(|e| fail(&e))?;
                    legend.draw(&Text::new(names[i].clone(), (28, y - 6), ("sans-serif", 11))).map_err(|e| fail(&e))?;
                }
                chart.draw_series(data.iter().map(|p| Circle::new(*p, 3, color.filled()))).map_err(|e| fail(&e))?;
                // Error bars: ± one standard deviation over seeds, where there are several.
                for p in &line.points {
                    if p.2 > 0.0 && !decl.y_log {
                        let x = tr(p.0, x_log);
                        chart.draw_series(std::iter::once(PathElement::new(vec![(x, p.1 - p.2), (x, p.1 + p.2)], color.stroke_width(1)))).map_err(|e| fail(&e))?;
                    }
                }
            }
        }
        root.present().map_err(|e| fail(&e))?;
    }
    Ok(out)
}

/// A placeholder for a figure whose runs produced nothing (failed, or not in this profile).
fn no_data(title: &str) -> Result<String, String> {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (640, 120)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        root.draw(&Text::new(format!("{title}: no data (no usable run)"), (20, 50), ("sans-serif", 15))).map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(out)
}

/// Training count per class of the experiment's first run, coloured by group.
fn classes_svg(decl: &FigureDecl, exp: &Experiment, frames: &Frames) -> Result<String, String> {
    let Some(first) = frames.per_class.iter().find(|r| r.experiment == exp.id) else {
        return no_data(&decl.title);
    };
    let rows: Vec<_> = frames.per_class.iter().filter(|r| r.experiment == exp.id && r.key == first.key && r.epoch == first.epoch).collect();
    let max = rows.iter().map(|r| r.train_count).max().unwrap_or(1).max(1) as f64;
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (640, 360)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let mut chart = ChartBuilder::on(&root)
            .margin(12)
            .caption(&decl.title, ("sans-serif", 17))
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(-0.5f64..(rows.len() as f64 - 0.5), 0f64..max * 1.1)
            .map_err(|e| e.to_string())?;
        chart.configure_mesh().x_desc("class").y_desc("training images").x_label_formatter(&|v| format!("{}", v.round() as i64)).draw().map_err(|e| e.to_string())?;
        for (name, color) in [("head", PALETTE[0]), ("medium", PALETTE[1]), ("tail", PALETTE[3])] {
            let bars: Vec<_> = rows.iter().filter(|r| r.group == name).collect();
            chart
                .draw_series(bars.iter().map(|r| Rectangle::new([(r.class as f64 - 0.4, 0.0), (r.class as f64 + 0.4, r.train_count as f64)], color.filled())))
                .map_err(|e| e.to_string())?
                .label(name)
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
        }
        chart.configure_series_labels().background_style(WHITE.mix(0.85)).border_style(BLACK.mix(0.3)).draw().map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(out)
}

/// The (x, y) points of a `scatter` figure, one series per `y`: every task row (or class row)
/// of the selected runs' final epoch that has both values.
fn scatter_points(decl: &FigureDecl, exp: &Experiment, frames: &Frames) -> Vec<(String, Vec<(f64, f64)>)> {
    let x = decl.x.clone().unwrap_or_default();
    let runs = summary::task_runs(frames, &exp.id, decl.select.as_ref(), decl.set.as_deref());
    decl.y
        .to_vec()
        .into_iter()
        .map(|y| {
            let pts = runs
                .iter()
                .flat_map(|r| r.tasks.iter())
                .filter_map(|t| match (t.value(&x), t.value(&y)) {
                    (Some(a), Some(b)) if a.is_finite() && b.is_finite() && (!decl.x_log || a > 0.0) && (!decl.y_log || b > 0.0) => Some((a, b)),
                    _ => None,
                })
                .collect();
            (y, pts)
        })
        .collect()
}

/// A `scatter` figure: one panel, a series per `y`, every selected task a point.
fn scatter_svg(decl: &FigureDecl, exp: &Experiment, frames: &Frames) -> Result<String, String> {
    let series = scatter_points(decl, exp, frames);
    let all: Vec<(f64, f64)> = series.iter().flat_map(|(_, p)| p.iter().map(|&(a, b)| (tr(a, decl.x_log), tr(b, decl.y_log)))).collect();
    if all.is_empty() {
        return no_data(&decl.title);
    }
    let (mut x0, mut x1) = all.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (mut y0, mut y1) = all.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    let (xp, yp) = (((x1 - x0) * 0.04).max(0.5), ((y1 - y0) * 0.06).max(1e-6));
    (x0, x1, y0, y1) = (x0 - xp, x1 + xp, y0 - yp, y1 + yp);
    let x_name = decl.x.clone().unwrap_or_default();
    let (x_log, y_log) = (decl.x_log, decl.y_log);
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (700, 420)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let mut chart =
            ChartBuilder::on(&root).margin(12).caption(&decl.title, ("sans-serif", 16)).x_label_area_size(36).y_label_area_size(56).build_cartesian_2d(x0..x1, y0..y1).map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc(if x_log { format!("{x_name} (log scale)") } else { x_name.clone() })
            .y_desc(if y_log { "value (log scale)" } else { "value" })
            .x_label_formatter(&|v| fmt_tick(*v, x_log))
            .y_label_formatter(&|v| fmt_tick(*v, y_log))
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(|e| e.to_string())?;
        for (i, (name, pts)) in series.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            chart
                .draw_series(pts.iter().map(|&(a, b)| Circle::new((tr(a, x_log), tr(b, y_log)), 3, color.mix(0.6).filled())))
                .map_err(|e| e.to_string())?
                .label(format!("{} ({} points)", legend_name(name), pts.len()))
                .legend(move |(x, y)| Circle::new((x + 6, y), 4, color.filled()));
        }
        chart.configure_series_labels().background_style(WHITE.mix(0.85)).border_style(BLACK.mix(0.3)).draw().map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(out)
}

/// A series name as the legend strip shows it: at most 28 characters.
fn legend_name(name: &str) -> String {
    if name.chars().count() <= 28 {
        name.to_string()
    } else {
        format!("{}…", name.chars().take(27).collect::<String>())
    }
}
