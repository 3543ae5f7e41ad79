//! Nearest class mean on raw pixels: each class is represented by the mean of its training
//! images, and a test image gets the class whose mean is nearest (Euclidean distance) or most
//! similar (cosine). There is no training loop and no class prior, which makes it a useful
//! contrast to a trained network under class imbalance: only the means of the rare classes get
//! noisier as their counts fall.
//!
//! Everything is summed in `f64` in index order, so a run is the same bits on every machine.

use std::collections::BTreeMap;

use reprise::methods::{self, ClassRecord, EpochRecord, InputDecl, Method, MethodError, Outcome, Progress, RunRecord, TrainInputs};
use reprise::params::{DefaultValue as Dv, ParamDef, ParamKind as K, ParamStruct, Params, Schema};
use serde::Deserialize;

pub struct NearestMean;

const DISTANCES: &[&str] = &["euclidean", "cosine"];

/// A run's parameters as the code reads them; [`SCHEMA`] defines and documents each (the
/// registry checks that the two agree).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // the data parameters are read by the data cells, not by `run`
struct P {
    dataset: String,
    imbalance: f64,
    data_seed: u64,
    distance: Distance,
}

#[derive(Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
enum Distance {
    Euclidean,
    Cosine,
}

impl ParamStruct for P {
    const SCHEMA: &'static [ParamDef] = SCHEMA;
}

static SCHEMA: &[ParamDef] = &[
    ParamDef { name: "dataset", kind: K::DataName, default: Dv::Str("optdigits"), doc: "a data set declared under [data]" },
    ParamDef { name: "imbalance", kind: K::Float { min: 0.0, max: 1.0, min_exclusive: true }, default: Dv::Float(1.0), doc: "imbalance factor n_min/n_max of the training subset; 1 is balanced" },
    ParamDef { name: "data_seed", kind: K::Int { min: 0, max: i64::MAX }, default: Dv::Int(0), doc: "seed of the per-class shuffle that picks the long-tailed subset" },
    ParamDef { name: "distance", kind: K::Choice(DISTANCES), default: Dv::Str("euclidean"), doc: "how a test image is compared with a class mean" },
];

/// Percent of the balanced test set classified correctly, overall and over the rarest third of
/// the classes.
static METRICS: &[&str] = &["accuracy", "tail_accuracy"];

impl Method for NearestMean {
    fn name(&self) -> &'static str {
        "nearest_mean"
    }

    /// Raise when a change alters results (it is part of every cell key).
    fn version(&self) -> u32 {
        1
    }

    fn schema(&self) -> Schema {
        Schema::of::<P>()
    }

    fn metrics(&self) -> &'static [&'static str] {
        METRICS
    }

    fn data_params(&self) -> &'static [&'static str] {
        &["dataset", "imbalance", "data_seed"]
    }

    /// One input: `dataset` with its balanced test split and a long-tailed training subset.
    fn inputs(&self, params: &Params) -> Result<Vec<InputDecl>, MethodError> {
        Ok(vec![InputDecl::long_tail("data", params)?])
    }

    fn run(&self, params: &Params, _seed: u64, inputs: &TrainInputs, progress: &dyn Progress) -> Result<Outcome, MethodError> {
        let cosine = methods::params::<P>(params)?.distance == Distance::Cosine;
        let inputs = inputs.input("data")?;
        let data = inputs.data;
        let dim = data.channels * data.height * data.width;
        let classes = data.num_classes;
        let image = |i: usize| &data.pixels[i * dim..(i + 1) * dim];
        let means = class_means(inputs.train.iter().map(|&i| (data.labels[i] as usize, image(i))), classes, dim);
        let mut counts = vec![0usize; classes];
        for &i in inputs.train {
            counts[data.labels[i] as usize] += 1;
        }
        let (mut right, mut seen) = (vec![0usize; classes], vec![0usize; classes]);
        for &i in inputs.test {
            let label = data.labels[i] as usize;
            seen[label] += 1;
            if nearest(&means, image(i), cosine) == Some(label) {
                right[label] += 1;
            }
        }
        progress.epoch(1, 1, "");
        Ok(Outcome::Done(outputs(&counts, &right, &seen)?))
    }
}

/// The mean image of each class (`None` for a class without training images).
pub fn class_means<'a>(samples: impl Iterator<Item = (usize, &'a [f32])>, classes: usize, dim: usize) -> Vec<Option<Vec<f64>>> {
    let mut sums = vec![vec![0f64; dim]; classes];
    let mut n = vec![0usize; classes];
    for (label, x) in samples {
        n[label] += 1;
        for (s, v) in sums[label].iter_mut().zip(x) {
            *s += f64::from(*v);
        }
    }
    sums.into_iter().zip(n).map(|(s, n)| (n > 0).then(|| s.into_iter().map(|v| v / n as f64).collect())).collect()
}

/// The class whose mean is nearest to `x` (the lowest class on a tie).
pub fn nearest(means: &[Option<Vec<f64>>], x: &[f32], cosine: bool) -> Option<usize> {
    let norm = |v: &mut dyn Iterator<Item = f64>| v.map(|a| a * a).sum::<f64>().sqrt();
    let xn = norm(&mut x.iter().map(|v| f64::from(*v)));
    let mut best: Option<(usize, f64)> = None;
    for (k, m) in means.iter().enumerate() {
        let Some(m) = m else { continue };
        let score = if cosine {
            // Smaller is nearer: one minus the cosine similarity (0 for a zero vector).
            let dot: f64 = m.iter().zip(x).map(|(a, b)| a * f64::from(*b)).sum();
            let denom = norm(&mut m.iter().copied()) * xn;
            1.0 - if denom > 0.0 { dot / denom } else { 0.0 }
        } else {
            m.iter().zip(x).map(|(a, b)| (a - f64::from(*b)).powi(2)).sum()
        };
        if best.is_none_or(|(_, s)| score < s) {
            best = Some((k, score));
        }
    }
    best.map(|(k, _)| k)
}

/// `metrics.json` as a [`RunRecord`]: one analysis epoch, per-class accuracy and counts.
fn outputs(counts: &[usize], right: &[usize], seen: &[usize]) -> Result<BTreeMap<String, Vec<u8>>, MethodError> {
    let classes = counts.len();
    let pct = |r: usize, s: usize| (s > 0).then(|| 100.0 * r as f64 / s as f64);
    // The rarest third of the classes by training count (ties: the higher class index, as the
    // long-tailed subset makes the last classes rarest).
    let mut order: Vec<usize> = (0..classes).collect();
    order.sort_by_key(|&k| (counts[k], std::cmp::Reverse(k)));
    let tail: Vec<usize> = order.into_iter().take(classes.div_ceil(3)).collect();
    let total_seen: usize = seen.iter().sum();
    let mut metrics = BTreeMap::new();
    if let Some(a) = pct(right.iter().sum(), total_seen) {
        metrics.insert("accuracy".to_string(), a);
    }
    if let Some(a) = pct(tail.iter().map(|&k| right[k]).sum(), tail.iter().map(|&k| seen[k]).sum()) {
        metrics.insert("tail_accuracy".to_string(), a);
    }
    let per_class = (0..classes)
        .map(|k| ClassRecord {
            class: k,
            train_count: counts[k],
            group: if tail.contains(&k) { "tail" } else { "head" }.to_string(),
            test_accuracy: pct(right[k], seen[k]),
            classifier_norm: 0.0,
            extra: BTreeMap::new(),
        })
        .collect();
    let record = RunRecord { epochs: vec![EpochRecord { epoch: 1, metrics, per_class, ..Default::default() }], train_counts: counts.to_vec(), failure: None };
    let bytes = serde_json::to_vec_pretty(&record).map_err(|e| MethodError::Metrics(e.to_string()))?;
    Ok(BTreeMap::from([("metrics.json".to_string(), bytes)]))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two classes in two dimensions, worked out by hand: means (1, 0) and (0, 3).
    #[test]
    fn means_and_nearest_by_hand() {
        let xs: [(usize, [f32; 2]); 4] = [(0, [0.0, 0.0]), (0, [2.0, 0.0]), (1, [0.0, 2.0]), (1, [0.0, 4.0])];
        let means = class_means(xs.iter().map(|(k, x)| (*k, &x[..])), 3, 2);
        assert_eq!(means, vec![Some(vec![1.0, 0.0]), Some(vec![0.0, 3.0]), None]);
        // (1, 1.5): squared distances 2.25 and 3.25, so class 0; by angle, class 1 is nearer
        // (cosine 0.555 with (1, 0) against 0.832 with (0, 3)).
        assert_eq!(nearest(&means, &[1.0, 1.5], false), Some(0));
        assert_eq!(nearest(&means, &[1.0, 1.5], true), Some(1));
        // A tie goes to the lower class: (0.5, 1.5) is at squared distance 2.5 from both.
        assert_eq!(nearest(&means, &[0.5, 1.5], false), Some(0));
    }

    #[test]
    fn the_tail_is_the_rarest_third() {
        let counts = [30, 20, 10, 5, 5, 1];
        let right = [3, 3, 3, 1, 2, 0];
        let seen = [3; 6];
        let out = outputs(&counts, &right, &seen).unwrap();
        let r: RunRecord = serde_json::from_slice(&out["metrics.json"]).unwrap();
        let m = &r.epochs[0].metrics;
        assert!((m["accuracy"] - 100.0 * 12.0 / 18.0).abs() < 1e-12);
        // Tail: classes 5 and 4 (count 1, and 5 with the higher index first): 2 of 6 right.
        assert!((m["tail_accuracy"] - 100.0 * 2.0 / 6.0).abs() < 1e-12);
    }
}
