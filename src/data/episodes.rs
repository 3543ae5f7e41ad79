//! Few-shot episodes: N-way K-shot tasks drawn once per seed from a pool of images, so that every
//! method of a report meets the same tasks. An episode lists its classes (a class's position in
//! the list is its label within the episode), its support images and its query images, as
//! indices into the data set.
//!
//! How shots are drawn ([`Shots`]) follows the imbalanced-episode protocol of learning to balance
//! (Lee et al., ICLR 2020): with class imbalance each class draws its own number of shots from
//! U{1..max_shot}; with task imbalance one draw serves every class of the episode; `Mixed`
//! tosses a fair coin per episode between the two. A class with fewer than shots + queries images
//! gets `N_c − queries` shots. Images are drawn without replacement within an episode.

use serde::{Deserialize, Serialize};

use super::derived::DeriveError;
use crate::rng::Rng;

/// How an episode's shots per class are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Shots {
    /// Every class `max_shot` (balanced tasks).
    Fixed,
    /// Each class its own draw from U{1..max_shot}.
    Class,
    /// One draw from U{1..max_shot} for every class of the episode.
    Task,
    /// A fair coin per episode: `Class` or `Task`.
    Mixed,
}

impl Shots {
    pub fn name(self) -> &'static str {
        match self {
            Shots::Fixed => "fixed",
            Shots::Class => "class",
            Shots::Task => "task",
            Shots::Mixed => "mixed",
        }
    }
}

/// What to draw.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EpisodeSpec {
    pub count: usize,
    pub ways: usize,
    pub max_shot: usize,
    pub queries: usize,
    pub shots: Shots,
    pub seed: u64,
}

/// One task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Episode {
    /// The data set's classes; class `classes[k]` has label `k` within the episode.
    pub classes: Vec<u32>,
    /// Support images per episode class (`support[k]` are images of `classes[k]`).
    pub support: Vec<Vec<usize>>,
    /// Query images per episode class.
    pub query: Vec<Vec<usize>>,
}

impl Episode {
    /// Shots of each episode class.
    pub fn shots(&self) -> Vec<usize> {
        self.support.iter().map(Vec::len).collect()
    }
}

/// Why episodes cannot be drawn.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EpisodeError {
    #[error("{ways}-way episodes need {ways} classes with at least queries + 1 = {need} images each, but the pool has {usable}; lower `ways` or `queries`")]
    TooFewClasses { ways: usize, need: usize, usable: usize },
    #[error("episodes need ways ≥ 1, max_shot ≥ 1, queries ≥ 1 and count ≥ 1; found ways = {ways}, max_shot = {max_shot}, queries = {queries}, count = {count}")]
    Empty { ways: usize, max_shot: usize, queries: usize, count: usize },
    #[error(transparent)]
    Pool(#[from] DeriveError),
}

/// `spec.count` episodes from `pool` (indices into `labels`). Classes with at most `queries`
/// images in the pool are never drawn. Deterministic in `spec.seed`: episode `e` draws from its
/// own stream `Rng::derive(seed, "episode-{e}")`, so the first episodes do not change when more
/// are asked for.
pub fn sample(labels: &[u32], pool: &[usize], num_classes: usize, spec: &EpisodeSpec) -> Result<Vec<Episode>, EpisodeError> {
    let EpisodeSpec { count, ways, max_shot, queries, shots, seed } = *spec;
    if ways == 0 || max_shot == 0 || queries == 0 || count == 0 {
        return Err(EpisodeError::Empty { ways, max_shot, queries, count });
    }
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); num_classes];
    let mut sorted = pool.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    for i in sorted {
        let label = *labels.get(i).ok_or(DeriveError::PoolIndexOutOfRange { index: i, len: labels.len() })?;
        by_class.get_mut(label as usize).ok_or(DeriveError::LabelOutOfRange { index: i, label, num_classes })?.push(i);
    }
    let usable: Vec<u32> = (0..num_classes as u32).filter(|&c| by_class[c as usize].len() > queries).collect();
    if usable.len() < ways {
        return Err(EpisodeError::TooFewClasses { ways, need: queries + 1, usable: usable.len() });
    }
    let mut out = Vec::with_capacity(count);
    for e in 0..count {
        let mut rng = Rng::derive(seed, &format!("episode-{e}"));
        let mut classes = usable.clone();
        rng.shuffle(&mut classes);
        classes.truncate(ways);
        let per_class = match shots {
            Shots::Mixed if rng.next_f64() > 0.5 => Shots::Class,
            Shots::Mixed => Shots::Task,
            other => other,
        };
        let one = 1 + rng.below(max_shot);
        let (mut support, mut query) = (Vec::with_capacity(ways), Vec::with_capacity(ways));
        for &c in &classes {
            let wanted = match per_class {
                Shots::Fixed => max_shot,
                Shots::Class => 1 + rng.below(max_shot),
                _ => one,
            };
            let mut images = by_class[c as usize].clone();
            rng.shuffle(&mut images);
            let shot = wanted.min(images.len() - queries);
            query.push(images[shot..shot + queries].to_vec());
            images.truncate(shot);
            support.push(images);
        }
        out.push(Episode { classes, support, query });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 20 classes; class c has 8 + c images (labels interleaved).
    fn pool() -> (Vec<u32>, Vec<usize>) {
        let mut labels = Vec::new();
        for c in 0..20u32 {
            labels.extend(std::iter::repeat_n(c, 8 + c as usize));
        }
        let mut rng = Rng::new(9);
        rng.shuffle(&mut labels);
        let pool = (0..labels.len()).collect();
        (labels, pool)
    }

    fn spec(count: usize, shots: Shots) -> EpisodeSpec {
        EpisodeSpec { count, ways: 5, max_shot: 10, queries: 5, shots, seed: 3 }
    }

    #[test]
    fn episodes_are_well_formed_and_deterministic() {
        let (labels, pool) = pool();
        let eps = sample(&labels, &pool, 20, &spec(500, Shots::Mixed)).unwrap();
        for e in &eps {
            let mut cs = e.classes.clone();
            cs.sort();
            cs.dedup();
            assert_eq!(cs.len(), 5, "classes are distinct");
            let mut all: Vec<usize> = Vec::new();
            for (k, &c) in e.classes.iter().enumerate() {
                let n_c = 8 + c as usize;
                let shots = e.support[k].len();
                assert!((1..=10).contains(&shots));
                // Truncation: never more than N_c − queries shots.
                assert!(shots <= n_c - 5, "class {c}: {shots} shots of {n_c}");
                assert_eq!(e.query[k].len(), 5);
                assert!(e.support[k].iter().chain(&e.query[k]).all(|&i| labels[i] == c));
                all.extend(&e.support[k]);
                all.extend(&e.query[k]);
            }
            let n = all.len();
            all.sort();
            all.dedup();
            assert_eq!(all.len(), n, "no image twice in an episode");
        }
        // The same seed draws the same episodes; more episodes keep the first ones.
        assert_eq!(sample(&labels, &pool, 20, &spec(500, Shots::Mixed)).unwrap(), eps);
        assert_eq!(sample(&labels, &pool, 20, &spec(800, Shots::Mixed)).unwrap()[..500], eps[..]);
        assert_ne!(sample(&labels, &pool, 20, &EpisodeSpec { seed: 4, ..spec(500, Shots::Mixed) }).unwrap(), eps);
    }

    #[test]
    fn the_share_of_equal_shot_episodes_matches_the_protocol() {
        // Class 19 has 27 images, so with 10 000 images per class no truncation happens here.
        let labels: Vec<u32> = (0..20 * 40).map(|i| (i % 20) as u32).collect();
        let pool: Vec<usize> = (0..labels.len()).collect();
        let n = 10_000;
        let equal = |shots: Shots| {
            let eps = sample(&labels, &pool, 20, &EpisodeSpec { count: n, ..spec(n, shots) }).unwrap();
            eps.iter().filter(|e| e.shots().windows(2).all(|w| w[0] == w[1])).count() as f64 / n as f64
        };
        // Mixed: ½ (task imbalance) + ½ · P(5 independent draws from 10 agree) = ½ + ½ · 10⁻⁴.
        // Binomial standard error with 10⁴ episodes: 0.005; allow four.
        let expect = 0.5 + 0.5 * 10f64.powi(-4);
        assert!((equal(Shots::Mixed) - expect).abs() < 0.02, "{} vs {expect}", equal(Shots::Mixed));
        assert_eq!(equal(Shots::Task), 1.0);
        assert_eq!(equal(Shots::Fixed), 1.0);
        assert!(equal(Shots::Class) < 0.01);
        // Class-imbalanced shots are uniform on 1..=10: the mean is 5.5 (standard error ≈ 0.013).
        let eps = sample(&labels, &pool, 20, &spec(n, Shots::Class)).unwrap();
        let all: Vec<usize> = eps.iter().flat_map(Episode::shots).collect();
        let mean = all.iter().sum::<usize>() as f64 / all.len() as f64;
        assert!((mean - 5.5).abs() < 0.06, "{mean}");
        assert_eq!((all.iter().min(), all.iter().max()), (Some(&1), Some(&10)));
    }

    #[test]
    fn too_few_usable_classes_is_an_error_saying_what_to_change() {
        let labels: Vec<u32> = (0..30).map(|i| (i % 3) as u32).collect(); // 10 images per class
        let pool: Vec<usize> = (0..30).collect();
        let e = sample(&labels, &pool, 3, &EpisodeSpec { count: 1, ways: 5, max_shot: 1, queries: 2, shots: Shots::Fixed, seed: 0 }).unwrap_err();
        assert_eq!(e, EpisodeError::TooFewClasses { ways: 5, need: 3, usable: 3 });
        assert!(e.to_string().contains("lower `ways` or `queries`"));
    }
}
