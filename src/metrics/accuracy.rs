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
pub fn try_accuracy(labels: &[u32], predictions: &[u32], groups: &[Group]) -> Result<AccuracyReport, MetricsError> {
    if predictions.len() != labels.len() {
        return Err(MetricsError::Shape { what: "predictions", expected: labels.len(), got: predictions.len() });
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
            return Err(MetricsError::ClassOutOfRange { what: "labels", index, value: c, num_classes });
        }
        total[c] += 1;
        if p == y {
            correct[c] += 1;
        }
    }
    let per_class: Vec<Option<f64>> = (0..num_classes).map(|c| (total[c] > 0).then(|| correct[c] as f64 / total[c] as f64)).collect();
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
    Ok(AccuracyReport { overall, balanced, per_class, head: group_acc(Group::Head), medium: group_acc(Group::Medium), tail: group_acc(Group::Tail) })
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

#[cfg(test)]
mod tests {
    use super::*;
    use Group::{Head, Medium, Tail};

    #[test]
    fn accuracy_by_hand() {
        // Class 0: 3 samples, 2 right; class 1: 2 samples, 1 right; class 2: 1 sample, wrong;
        // class 3: no sample.
        let y = [0u32, 0, 0, 1, 1, 2];
        let p = [0u32, 0, 1, 1, 0, 0];
        let r = accuracy(&y, &p, &[Head, Medium, Tail, Tail]);
        assert_eq!(r.overall, 0.5);
        assert_eq!(r.per_class, vec![Some(2.0 / 3.0), Some(0.5), Some(0.0), None]);
        // Mean over the 3 present classes: (2/3 + 1/2 + 0)/3 = 7/18.
        assert!((r.balanced - 7.0 / 18.0).abs() < 1e-15);
        assert_eq!((r.head, r.medium, r.tail), (Some(2.0 / 3.0), Some(0.5), Some(0.0)));
        // Head pools classes 0–2 sample-wise: 3/6; no sample is medium or tail.
        let r = accuracy(&y, &p, &[Head, Head, Head, Tail]);
        assert_eq!((r.head, r.medium, r.tail), (Some(0.5), None, None));
        // A prediction outside the classes is just wrong.
        assert_eq!(accuracy(&[0, 1], &[0, 9], &[Head, Tail]).overall, 0.5);
    }

    #[test]
    fn accuracy_errors() {
        assert_eq!(try_accuracy(&[], &[], &[Head]), Err(MetricsError::NoSamples));
        assert!(matches!(try_accuracy(&[0], &[0, 1], &[Head]), Err(MetricsError::Shape { .. })));
        assert!(matches!(try_accuracy(&[0, 2], &[0, 1], &[Head, Tail]), Err(MetricsError::ClassOutOfRange { index: 1, value: 2, .. })));
    }

    #[test]
    #[should_panic(expected = "accuracy")]
    fn accuracy_panics_on_invalid_input() {
        accuracy(&[0, 1], &[0], &[Head, Tail]);
    }

    #[test]
    fn groups_from_counts_and_ranks() {
        assert_eq!(groups_by_count(&[500, 100, 20, 19, 5], 100, 19), vec![Head, Head, Medium, Tail, Tail]);
        // Descending: 100(3) 50(1) 20(6) | 7(9) 5(0) 5(2) 5(5) | 5(7) 1(4) 0(8): the tie at 5
        // keeps class order, so class 7 is the one that falls into the tail.
        let counts = [5, 50, 5, 100, 1, 5, 20, 5, 0, 7];
        assert_eq!(groups_by_rank(&counts), vec![Medium, Head, Medium, Head, Tail, Medium, Head, Tail, Tail, Medium]);
        assert_eq!(groups_by_rank(&[3, 9]), vec![Medium, Medium]);
        assert_eq!(groups_by_rank(&[1, 2, 3]), vec![Tail, Medium, Head]);
        assert!(groups_by_rank(&[]).is_empty());
    }

    #[test]
    fn imbalance_summaries() {
        assert_eq!(imbalance_ratio(&[100, 0, 10, 25]), Some(10.0));
        assert_eq!(imbalance_ratio(&[0, 0]), None);
        assert_eq!(imbalance_ratio(&[]), None);
        assert_eq!(gini(&[7, 7, 7, 7]), Some(0.0));
        // [1, 3]: Σ|n_i − n_j| over the 4 ordered pairs = 4, mean 2 → 4 / (2·4·2) = 1/4.
        assert_eq!(gini(&[1, 3]), Some(0.25));
        // [0, 0, 0, 4]: 6 ordered pairs differ by 4 → 24 / (2·16·1) = 3/4 = (C−1)/C, the maximum.
        assert_eq!(gini(&[0, 0, 0, 4]), Some(0.75));
        assert_eq!(gini(&[0, 0]), None);
        assert_eq!(gini(&[]), None);
    }
}
