//! Splits and subsets derived from a data set's labels, as seeded index lists.
//!
//! Papers rarely train on a data set as shipped: they hold out a balanced test set, or carve a
//! long-tailed training set out of a balanced one (CIFAR-LT style). Writing these subsets to disk
//! would multiply the files to pin; instead they are pure functions of the labels and a seed,
//! returning sorted indices, so the same spec gives the same subset on every machine. All
//! randomness comes from [`crate::rng::Rng`].

use crate::rng::Rng;

/// Why a split or subset cannot be formed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DeriveError {
    #[error("label {label} at position {index} is out of range for {num_classes} classes")]
    LabelOutOfRange { index: usize, label: u32, num_classes: usize },

    #[error(
        "class {class} has {have} samples but a split with {test_per_class} test samples per class \
         needs at least {} (one left for training); lower test_per_class",
        test_per_class + 1
    )]
    TooFewSamples { class: usize, have: usize, test_per_class: usize },

    #[error(
        "imbalance factor {imb_factor} leaves class {class} with 0 samples (the smallest class in the \
         pool has {n_max}); use a larger imbalance factor (closer to 1) or a larger pool"
    )]
    EmptyClass { class: usize, imb_factor: f64, n_max: usize },

    #[error("imbalance factor must be in (0, 1] (1 = balanced, 0.01 = 100:1), found {imb_factor}")]
    BadImbalanceFactor { imb_factor: f64 },

    #[error("index {index} in the pool is out of range for {len} labels")]
    PoolIndexOutOfRange { index: usize, len: usize },

    #[error("need at least one class, found num_classes = 0")]
    NoClasses,

    #[error("a per-class cap must be at least 1, found 0")]
    ZeroCap,

    #[error("the relabelling maps {len} classes but the data set has {num_classes}; give one new label per class")]
    RelabelLength { len: usize, num_classes: usize },

    #[error("class {class} is listed twice; list each class once")]
    RepeatedClass { class: u32 },

    #[error("class {class} is out of range for {num_classes} classes")]
    ClassOutOfRange { class: u32, num_classes: usize },

    #[error("no classes were kept; list at least one")]
    NoClassesKept,
}

/// Indices of `labels` (or of `pool` when given) grouped by class, in ascending order.
fn by_class(labels: &[u32], pool: Option<&[usize]>, num_classes: usize) -> Result<Vec<Vec<usize>>, DeriveError> {
    if num_classes == 0 {
        return Err(DeriveError::NoClasses);
    }
    let mut groups = vec![Vec::new(); num_classes];
    let mut put = |index: usize| -> Result<(), DeriveError> {
        let label = *labels.get(index).ok_or(DeriveError::PoolIndexOutOfRange { index, len: labels.len() })?;
        let g = groups.get_mut(label as usize).ok_or(DeriveError::LabelOutOfRange { index, label, num_classes })?;
        g.push(index);
        Ok(())
    };
    match pool {
        Some(pool) => {
            let mut sorted = pool.to_vec();
            sorted.sort_unstable();
            sorted.dedup();
            for i in sorted {
                put(i)?;
            }
        }
        None => {
            for i in 0..labels.len() {
                put(i)?;
            }
        }
    }
    Ok(groups)
}

/// A class-balanced train/test split: for each class, its indices (ascending) are shuffled with
/// one `Rng::derive(seed, "split")` stream, drawn class by class in class order, and the first
/// `test_per_class` go to test, the rest to train. Returns `(train, test)`, each sorted ascending.
/// Every class needs at least `test_per_class + 1` samples.
pub fn balanced_split(labels: &[u32], num_classes: usize, test_per_class: usize, seed: u64) -> Result<(Vec<usize>, Vec<usize>), DeriveError> {
    let groups = by_class(labels, None, num_classes)?;
    let mut rng = Rng::derive(seed, "split");
    let mut train = Vec::with_capacity(labels.len());
    let mut test = Vec::with_capacity(test_per_class * num_classes);
    for (class, mut idx) in groups.into_iter().enumerate() {
        if idx.len() < test_per_class + 1 {
            return Err(DeriveError::TooFewSamples { class, have: idx.len(), test_per_class });
        }
        rng.shuffle(&mut idx);
        test.extend_from_slice(&idx[..test_per_class]);
        train.extend_from_slice(&idx[test_per_class..]);
    }
    train.sort_unstable();
    test.sort_unstable();
    Ok((train, test))
}

/// Per-class sizes of an exponentially long-tailed set: `n_i = floor(n_max · f^(i/(C−1)))` for
/// `i = 0..C`, so class 0 is the head with `n_max` and the last class has `floor(n_max · f)`.
/// This is the profile of CIFAR-10/100-LT (Cui et al. 2019; Cao et al. 2019), and uses the same
/// floating-point expression as their reference code so the counts agree exactly. `f = 1` gives
/// `n_max` for every class; a single class gets `n_max`.
pub fn long_tail_counts(n_max: usize, num_classes: usize, imb_factor: f64) -> Vec<usize> {
    if num_classes == 1 {
        return vec![n_max];
    }
    let denom = (num_classes - 1) as f64;
    (0..num_classes).map(|i| (n_max as f64 * imb_factor.powf(i as f64 / denom)).floor() as usize).collect()
}

/// A long-tailed subset of `pool` (indices into `labels`): `n_max` is the smallest class count in
/// the pool, class `i` keeps `long_tail_counts(n_max, C, imb_factor)[i]` of its pool indices,
/// chosen by shuffling them with a per-class stream `Rng::derive(seed, "long-tail/class-{i}")`
/// and keeping the first ones. Returns sorted indices, a subset of `pool` (duplicates in `pool`
/// count once). Fails, rather than returning an empty class, when some `n_i` would be 0.
pub fn long_tail_subset(labels: &[u32], pool: &[usize], num_classes: usize, imb_factor: f64, seed: u64) -> Result<Vec<usize>, DeriveError> {
    if !(imb_factor > 0.0 && imb_factor <= 1.0) {
        return Err(DeriveError::BadImbalanceFactor { imb_factor });
    }
    let groups = by_class(labels, Some(pool), num_classes)?;
    let n_max = groups.iter().map(Vec::len).min().unwrap_or(0);
    let counts = long_tail_counts(n_max, num_classes, imb_factor);
    if let Some(class) = counts.iter().position(|&n| n == 0) {
        return Err(DeriveError::EmptyClass { class, imb_factor, n_max });
    }
    let mut out = Vec::with_capacity(counts.iter().sum());
    for (class, (mut idx, n)) in groups.into_iter().zip(counts).enumerate() {
        let mut rng = Rng::derive(seed, &format!("long-tail/class-{class}"));
        rng.shuffle(&mut idx);
        out.extend_from_slice(&idx[..n]);
    }
    out.sort_unstable();
    Ok(out)
}

/// At most `cap` indices of each class from `pool`: a class with more is cut to the first `cap`
/// of its pool indices shuffled by the per-class stream `Rng::derive(seed, "cap/class-{i}")`; a
/// class with fewer keeps all. Returns sorted indices, a subset of `pool`.
pub fn cap_per_class(labels: &[u32], pool: &[usize], num_classes: usize, cap: usize, seed: u64) -> Result<Vec<usize>, DeriveError> {
    if cap == 0 {
        return Err(DeriveError::ZeroCap);
    }
    let groups = by_class(labels, Some(pool), num_classes)?;
    let mut out = Vec::new();
    for (class, mut idx) in groups.into_iter().enumerate() {
        if idx.len() > cap {
            Rng::derive(seed, &format!("cap/class-{class}")).shuffle(&mut idx);
            idx.truncate(cap);
        }
        out.extend(idx);
    }
    out.sort_unstable();
    Ok(out)
}

/// New labels: label `c` becomes `map[c]`. The new number of classes is `max(map) + 1`. Several
/// classes may share a new label (fine → coarse); a new label nothing maps to stays empty.
pub fn relabel(labels: &[u32], num_classes: usize, map: &[u32]) -> Result<(Vec<u32>, usize), DeriveError> {
    if map.len() != num_classes {
        return Err(DeriveError::RelabelLength { len: map.len(), num_classes });
    }
    let out = labels.iter().enumerate().map(|(index, &l)| map.get(l as usize).copied().ok_or(DeriveError::LabelOutOfRange { index, label: l, num_classes })).collect::<Result<Vec<u32>, _>>()?;
    let classes = map.iter().max().map_or(0, |m| *m as usize + 1);
    Ok((out, classes))
}

/// Keep only the images of `classes` among `idx`, relabelled by their position in `classes`
/// (the first listed class becomes 0). Returns the kept indices (in `idx`'s order) and their new
/// labels.
pub fn keep_classes(labels: &[u32], idx: &[usize], num_classes: usize, classes: &[u32]) -> Result<(Vec<usize>, Vec<u32>), DeriveError> {
    if classes.is_empty() {
        return Err(DeriveError::NoClassesKept);
    }
    let mut new_label = vec![None; num_classes];
    for (k, &c) in classes.iter().enumerate() {
        let slot = new_label.get_mut(c as usize).ok_or(DeriveError::ClassOutOfRange { class: c, num_classes })?;
        if slot.is_some() {
            return Err(DeriveError::RepeatedClass { class: c });
        }
        *slot = Some(k as u32);
    }
    let mut kept = Vec::new();
    let mut kept_labels = Vec::new();
    for &i in idx {
        let label = *labels.get(i).ok_or(DeriveError::PoolIndexOutOfRange { index: i, len: labels.len() })?;
        let new = *new_label.get(label as usize).ok_or(DeriveError::LabelOutOfRange { index: i, label, num_classes })?;
        if let Some(n) = new {
            kept.push(i);
            kept_labels.push(n);
        }
    }
    Ok((kept, kept_labels))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 10 classes, `per_class` each, interleaved: label of i is i % 10.
    fn labels(per_class: usize) -> Vec<u32> {
        (0..10 * per_class).map(|i| (i % 10) as u32).collect()
    }

    #[test]
    fn long_tail_counts_match_hand_computed() {
        // floor(500 · 0.01^(i/9)), computed independently in Python with math.floor.
        assert_eq!(long_tail_counts(500, 10, 0.01), vec![500, 299, 179, 107, 64, 38, 23, 13, 8, 5]);
        // CIFAR-10-LT, imbalance 100: the published class sizes.
        assert_eq!(long_tail_counts(5000, 10, 0.01), vec![5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]);
        assert_eq!(long_tail_counts(37, 4, 1.0), vec![37; 4]);
        assert_eq!(long_tail_counts(9, 1, 0.1), vec![9]);
    }

    #[test]
    fn balanced_split_is_balanced_sorted_disjoint_and_seeded() {
        let l = labels(20);
        let (train, test) = balanced_split(&l, 10, 5, 42).unwrap();
        assert_eq!(test.len(), 50);
        assert_eq!(train.len(), 150);
        assert!(train.windows(2).all(|w| w[0] < w[1]));
        assert!(test.windows(2).all(|w| w[0] < w[1]));
        let mut per_class = [0usize; 10];
        for &i in &test {
            per_class[l[i] as usize] += 1;
        }
        assert_eq!(per_class, [5; 10]);
        let mut all: Vec<usize> = train.iter().chain(&test).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..200).collect::<Vec<_>>());
        assert_eq!(balanced_split(&l, 10, 5, 42).unwrap().1, test);
        assert_ne!(balanced_split(&l, 10, 5, 43).unwrap().1, test);
    }

    #[test]
    fn balanced_split_errors() {
        let l = labels(3);
        assert_eq!(balanced_split(&l, 10, 3, 0).unwrap_err(), DeriveError::TooFewSamples { class: 0, have: 3, test_per_class: 3 });
        let err = balanced_split(&[0, 1, 7], 3, 0, 0).unwrap_err();
        assert!(matches!(err, DeriveError::LabelOutOfRange { index: 2, label: 7, .. }));
    }

    #[test]
    fn long_tail_subset_counts_seeds_and_pool() {
        let l = labels(60);
        // The pool: every index except the first 5 of class 3, so class 3 is the smallest (55).
        let pool: Vec<usize> = (0..l.len()).filter(|&i| !(l[i] == 3 && i < 50)).collect();
        let sub = long_tail_subset(&l, &pool, 10, 0.1, 7).unwrap();
        let mut per_class = vec![0usize; 10];
        for &i in &sub {
            per_class[l[i] as usize] += 1;
        }
        assert_eq!(per_class, long_tail_counts(55, 10, 0.1));
        assert!(sub.windows(2).all(|w| w[0] < w[1]));
        assert!(sub.iter().all(|i| pool.binary_search(i).is_ok()));
        assert_eq!(long_tail_subset(&l, &pool, 10, 0.1, 7).unwrap(), sub);
        assert_ne!(long_tail_subset(&l, &pool, 10, 0.1, 8).unwrap(), sub);
    }

    #[test]
    fn long_tail_subset_errors() {
        let l = labels(10);
        let pool: Vec<usize> = (0..100).collect();
        let err = long_tail_subset(&l, &pool, 10, 0.01, 0).unwrap_err();
        assert_eq!(err, DeriveError::EmptyClass { class: 5, imb_factor: 0.01, n_max: 10 });
        let msg = err.to_string();
        assert!(msg.contains("class 5") && msg.contains("larger imbalance factor"), "{msg}");
        assert!(matches!(long_tail_subset(&l, &pool, 10, 0.0, 0), Err(DeriveError::BadImbalanceFactor { .. })));
        assert!(matches!(long_tail_subset(&l, &[1000], 10, 0.5, 0), Err(DeriveError::PoolIndexOutOfRange { index: 1000, len: 100 })));
    }

    #[test]
    fn a_cap_keeps_at_most_n_per_class_from_the_pool() {
        let l = labels(7); // 7 per class
        let pool: Vec<usize> = (0..70).filter(|i| i % 3 != 0).collect();
        let kept = cap_per_class(&l, &pool, 10, 3, 5).unwrap();
        let mut counts = [0usize; 10];
        for &i in &kept {
            assert!(pool.contains(&i));
            counts[l[i] as usize] += 1;
        }
        // Each class has 4 or 5 pool images here, all cut to 3.
        assert_eq!(counts, [3; 10]);
        assert!(kept.windows(2).all(|w| w[0] < w[1]));
        // A cap above every class count keeps the whole pool; the seed decides which survive.
        assert_eq!(cap_per_class(&l, &pool, 10, 100, 5).unwrap(), pool);
        assert_ne!(cap_per_class(&l, &pool, 10, 3, 6).unwrap(), kept);
        assert_eq!(cap_per_class(&l, &pool, 10, 0, 5), Err(DeriveError::ZeroCap));
    }

    #[test]
    fn relabelling_and_class_selection_by_hand() {
        // Fine classes 0..6 into coarse 0..2: {0,1} → 0, {2,3} → 1, {4,5} → 2.
        let (coarse, k) = relabel(&[5, 0, 3, 2, 1, 4], 6, &[0, 0, 1, 1, 2, 2]).unwrap();
        assert_eq!((coarse, k), (vec![2, 0, 1, 1, 0, 2], 3));
        assert!(matches!(relabel(&[0], 6, &[0, 1]), Err(DeriveError::RelabelLength { len: 2, num_classes: 6 })));
        // Keep classes 4 and 1, in that order: 4 → 0, 1 → 1; others dropped, order kept.
        let labels = [1, 4, 2, 4, 1, 0];
        let (kept, new) = keep_classes(&labels, &[5, 4, 3, 2, 1, 0], 5, &[4, 1]).unwrap();
        assert_eq!(kept, vec![4, 3, 1, 0]);
        assert_eq!(new, vec![1, 0, 0, 1]);
        assert_eq!(keep_classes(&labels, &[0], 5, &[1, 1]), Err(DeriveError::RepeatedClass { class: 1 }));
        assert_eq!(keep_classes(&labels, &[0], 5, &[7]), Err(DeriveError::ClassOutOfRange { class: 7, num_classes: 5 }));
        assert_eq!(keep_classes(&labels, &[0], 5, &[]), Err(DeriveError::NoClassesKept));
    }
}
