//! Overall, class-balanced, per-class and head/medium/tail accuracy, and summaries of how
//! imbalanced a set of class counts is; the definitions are in [`crate::metrics`].

use serde::{Deserialize, Serialize};

use super::MetricsError;

/// Frequency group of a class in a long-tailed label distribution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Group {
    Head,
    Medium,
    Tail,
}

/// Accuracies of one set of predictions; every value is a fraction in `[0, 1]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AccuracyReport {
    /// Correct predictions over all samples.
    pub overall: f64,
    /// Mean of the per-class accuracies over the classes present in the labels.
    pub balanced: f64,
    /// Accuracy on the samples of each true class; `None` for a class with no sample.
    pub per_class: Vec<Option<f64>>,
    /// Accuracy over all samples whose true class is head; `None` if there are none.
    pub head: Option<f64>,
    pub medium: Option<f64>,
    pub tail: Option<f64>,
}

/// [`try_accuracy`] for inputs known to be valid.
///
/// # Panics
/// When [`try_accuracy`] returns an error: `labels` and `predictions` differ in length, there
/// are no samples, or a label is not below `groups.len()`.
pub fn accuracy(labels: &[u32], predictions: &[u32], groups: &[Group]) -> AccuracyReport {
    match try_accuracy(labels, predictions, groups) {
        Ok(report) => report,
        Err(e) => panic!("accuracy: {e}"),
    }
}

/// Accuracy report over `groups.len()` classes (`groups[c]` is the group of class `c`).
/// A prediction outside the classes simply counts as wrong.
pub fn try_accuracy(
    labels: &[u32],
    predictions: &[u32],
    groups: &[Group],
) -> Result<AccuracyReport, MetricsError> {
    if predictions.len() != labels.len() {
        return Err(MetricsError::Shape {
            what: "predictions",
            expected: labels.len(),
            got: predictions.len(),
        });
    }
    if labels.is_empty() {
        return Err(MetricsError::NoSamples);
    }
    let num_classes = groups.len();
    let mut total = vec![0usize; num_classes];
    let mut correct = vec![0usize; num_classes];
    for (index, (&y, &p)) in labels.iter().zip(predictions).enumerate() {
        let c = y as usize;
        if c >= num_classes {
            return Err(MetricsError::ClassOutOfRange {
                what: "labels",
                index,
                value: c,
                num_classes,
            });
        }
        total[c] += 1;
        if p == y {
            correct[c] += 1;
        }
    }
    let per_class: Vec<Option<f64>> = (0..num_classes)
        .map(|c| (total[c] > 0).then(|| correct[c] as f64 / total[c] as f64))
        .collect();
    let present: Vec<f64> = per_class.iter().flatten().copied().collect();
    // At least one class is present because there is at least one sample.
    let balanced = present.iter().sum::<f64>() / present.len() as f64;
    let overall = correct.iter().sum::<usize>() as f64 / labels.len() as f64;
    let group_acc = |g: Group| {
        let (mut t, mut k) = (0usize, 0usize);
        for c in (0..num_classes).filter(|&c| groups[c] == g) {
            t += total[c];
            k += correct[c];
        }
        (t > 0).then(|| k as f64 / t as f64)
    };
    Ok(AccuracyReport {
        overall,
        balanced,
        per_class,
        head: group_acc(Group::Head),
        medium: group_acc(Group::Medium),
        tail: group_acc(Group::Tail),
    })
}

/// Groups by thresholds on the training count: head when `n ≥ head_min`, otherwise tail when
/// `n ≤ tail_max`, otherwise medium (head wins if the thresholds overlap).
pub fn groups_by_count(counts: &[usize], head_min: usize, tail_max: usize) -> Vec<Group> {
    counts
        .iter()
        .map(|&n| {
            if n >= head_min {
                Group::Head
            } else if n <= tail_max {
                Group::Tail
            } else {
                Group::Medium
            }
        })
        .collect()
}

/// Groups by rank: classes sorted by descending count (ties by class index); the first ⌊C/3⌋
/// are head, the last ⌊C/3⌋ tail, the rest medium.
pub fn groups_by_rank(counts: &[usize]) -> Vec<Group> {
    let c = counts.len();
    let mut order: Vec<usize> = (0..c).collect();
    // sort_by is stable, so equal counts keep ascending class order.
    order.sort_by(|&a, &b| counts[b].cmp(&counts[a]));
    let third = c / 3;
    let mut groups = vec![Group::Medium; c];
    for (rank, &class) in order.iter().enumerate() {
        if rank < third {
            groups[class] = Group::Head;
        } else if rank >= c - third {
            groups[class] = Group::Tail;
        }
    }
    groups
}

/// `max / min` over the nonzero counts; `None` if no count is nonzero.
pub fn imbalance_ratio(counts: &[usize]) -> Option<f64> {
    let nonzero = counts.iter().copied().filter(|&n| n > 0);
    let max = nonzero.clone().max()?;
    let min = nonzero.min()?;
    Some(max as f64 / min as f64)
}

/// Gini coefficient of the class counts, `Σ_i Σ_j |n_i − n_j| / (2 C² · mean)` over all classes
/// (zeros included); `None` when there are no classes or every count is zero.
pub fn gini(counts: &[usize]) -> Option<f64> {
    let c = counts.len() as f64;
    let sum: usize = counts.iter().sum();
    if sum == 0 {
        return None;
    }
    let mean = sum as f64 / c;
    let mut abs_diff = 0.0;
    for &a in counts {
        for &b in counts {
            abs_diff += (a as f64 - b as f64).abs();
        }
    }
    Some(abs_diff / (2.0 * c * c * mean))
}
