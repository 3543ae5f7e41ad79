//! Neural-collapse and accuracy metrics (Papyan, Han & Donoho 2020, adapted to class imbalance).
//!
//! **Inputs.** Features `H` (N×D, `f32`, row-major; row `h_i`), labels `y` (N), the network's
//! predictions (N), the bias-free classifier matrix `W` (C×D, row `w_c`) and the number of
//! classes C. All arithmetic is done in `f64`.
//!
//! **Class statistics.** `μ_c` is the mean of the features of class `c` and `n_c` its count.
//! Classes with no samples are skipped everywhere below (their rows of `W` too) and counted in
//! `empty_classes`; C' is the number of non-empty classes (at least 2 are required).
//! `μ_G = Σ_c n_c μ_c / N` is the global (sample) mean and `μ_B = (1/C') Σ_c μ_c` the
//! class-balanced mean. [`Centering`] chooses the centre `μ̄` used by NC1–NC3:
//! `Global` (the default) takes `μ̄ = μ_G`, `Balanced` takes `μ̄ = μ_B`.
//!
//! **Covariances.** `Σ_W = (1/N) Σ_i (h_i − μ_{y_i})(h_i − μ_{y_i})ᵀ` and
//! `Σ_B = (1/C') Σ_c (μ_c − μ̄)(μ_c − μ̄)ᵀ`.
//!
//! **NC1** `= Tr(Σ_W Σ_B⁺) / C'`. `Σ_B` has rank at most C'−1, so its pseudo-inverse is taken in
//! the span of `M = [μ_c − μ̄]` (D×C'): eigen-decompose `MᵀM = V S² Vᵀ` (C'×C', Jacobi), keep
//! the eigenvalues `s_k² > 1e-10 · max_k s_k²`, and set `U = M V S⁻¹`. Then
//! `Tr(Σ_W Σ_B⁺) = C' · Σ_k (u_kᵀ Σ_W u_k) / s_k²` with
//! `u_kᵀ Σ_W u_k = (1/N) Σ_i (u_kᵀ (h_i − μ_{y_i}))²`, so the D×D matrix `Σ_W` is never formed.
//!
//! **NC2, equinorm.** Features: population `std / mean` of `‖μ_c − μ̄‖` over the C' classes.
//! Classifier: population `std / mean` of `‖w_c‖` over the same classes.
//!
//! **NC2, equiangularity.** The mean over ordered pairs `c ≠ c'` of
//! `|cos(v_c, v_c') + 1/(C'−1)|`, with `v = μ_c − μ̄` (features) or `v = w_c` (classifier);
//! 0 on a simplex equiangular tight frame. The cosine with a zero vector is taken as 0.
//!
//! **NC3** `= ‖ W/‖W‖_F − Mᵀ/‖M‖_F ‖²_F`, with the rows of `W` of empty classes dropped
//! (so both matrices are C'×D).
//!
//! **NC4** is the fraction of samples whose prediction differs from the nearest-class-mean
//! prediction `argmin_c ‖h_i − μ_c‖` (over non-empty classes; ties go to the lower class index).
//!
//! **Drift.** `drift_abs = ‖μ_G − μ_B‖` and `drift_norm = drift_abs / mean_c ‖μ_c − μ_B‖`
//! (scale-free; the report's headline "drift norm"). Both are independent of [`Centering`].
//! A perfect simplex with the same class counts already has `drift_norm_etf =
//! √((C Σ p_c² − 1)/(C − 1))` ([`drift_norm_etf`]); `drift_excess = drift_norm / drift_norm_etf`
//! (undefined when balanced) is what the features add beyond the class counts.
//!
//! **Minority collapse.** Given minority class indices (duplicates and empty classes ignored),
//! `minority_cosine` is the mean over unordered pairs of the cosine between their classifier
//! rows `w_c` (tends to 1 under minority collapse); `None` when fewer than 2 remain.
//!
//! **Degenerate inputs** are errors ([`MetricsError`]): shape mismatches, N = 0, class indices
//! out of range, non-finite values, fewer than 2 non-empty classes, all class means equal to
//! `μ̄` (`M = 0`), or all kept classifier rows zero.
//!
//! **Accuracy** ([`accuracy`]): `overall` is the fraction of correct predictions; `balanced`
//! the mean of the per-class accuracies over the classes present in the evaluated labels;
//! `per_class[c]` the accuracy on samples of true class `c` (`None` if there are none);
//! `head`/`medium`/`tail` the accuracy over all samples whose true class is in that
//! [`Group`] (`None` if there is no such sample). [`groups_by_count`] makes a class head when
//! `n ≥ head_min`, else tail when `n ≤ tail_max`, else medium. [`groups_by_rank`] sorts the
//! classes by descending count (ties by class index): the first ⌊C/3⌋ are head, the last
//! ⌊C/3⌋ tail, the rest medium (C = 10 gives 3/4/3).
//!
//! **Imbalance summaries.** [`imbalance_ratio`] is `max / min` over the nonzero counts.
//! [`gini`] is the Gini coefficient of the class counts `n_1..n_C` (all classes, zeros
//! included): the mean absolute difference over all C² ordered pairs divided by twice the mean,
//! `Σ_i Σ_j |n_i − n_j| / (2 C² · mean)`; 0 for balanced counts.

mod accuracy;
pub(crate) mod linalg;
mod nc;

pub use accuracy::{accuracy, gini, groups_by_count, groups_by_rank, imbalance_ratio, try_accuracy, AccuracyReport, Group};
pub use nc::{drift_norm_etf, mean_drift, neural_collapse, Centering, NcInput, NcMetrics};

/// Why a metric could not be computed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetricsError {
    #[error("no samples (N = 0)")]
    NoSamples,
    #[error("{what} has length {got}, expected {expected}")]
    Shape { what: &'static str, expected: usize, got: usize },
    #[error("{what}[{index}] = {value} is not a class index below {num_classes}")]
    ClassOutOfRange { what: &'static str, index: usize, value: usize, num_classes: usize },
    #[error("non-finite value in {what} at index {index}")]
    NonFinite { what: &'static str, index: usize },
    #[error("only {0} class(es) have samples; at least 2 are needed")]
    TooFewClasses(usize),
    #[error("every class mean equals the centre; the between-class geometry is undefined")]
    DegenerateMeans,
    #[error("the classifier rows of all non-empty classes are zero")]
    ZeroClassifier,
}
