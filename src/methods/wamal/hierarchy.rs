//! The class hierarchy: which primary class each fine class belongs to (a [`Derive::Relabel`]
//! map), and the blocks of auxiliary classes the generated labels are confined to.
//!
//! [`Derive::Relabel`]: crate::methods::Derive::Relabel

use serde::Deserialize;

/// How the fine classes are grouped into primary classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Hierarchy {
    /// 10 digits → 5 classes, digit mod 5: {0,5}, {1,6}, … (two unrelated digits per class, like
    /// CIFAR's superclasses).
    Mod5,
    /// 10 digits → 5 classes, ⌊digit / 2⌋: {0,1}, {2,3}, …
    Pairs,
    /// 10 digits → 2 classes, digit mod 2.
    Parity,
    /// CIFAR-100's 100 fine classes → its 20 superclasses (the coarse byte of the binary records).
    Cifar100Coarse,
}

/// CIFAR-100's superclass of each fine class, in the fine classes' alphabetical order (the
/// coarse label the binary records store beside the fine one).
pub const CIFAR100_COARSE: [u32; 100] = [
    4, 1, 14, 8, 0, 6, 7, 7, 18, 3, 3, 14, 9, 18, 7, 11, 3, 9, 7, 11, 6, 11, 5, 10, 7, 6, 13, 15, 3, 15, 0, 11, 1, 10, 12, 14, 16, 9, 11, 5, 5, 19, 8, 8, 15, 13, 14, 17, 18, 10, 16, 4, 17, 4, 2, 0,
    17, 4, 18, 17, 10, 3, 2, 12, 12, 16, 12, 1, 9, 19, 2, 10, 0, 1, 16, 12, 9, 13, 15, 13, 16, 19, 2, 4, 6, 19, 5, 5, 8, 19, 18, 1, 2, 15, 6, 0, 17, 8, 14, 13,
];

impl Hierarchy {
    /// The primary class of each fine class.
    pub fn map(self) -> Vec<u32> {
        match self {
            Hierarchy::Mod5 => (0..10).map(|c| c % 5).collect(),
            Hierarchy::Pairs => (0..10).map(|c| c / 2).collect(),
            Hierarchy::Parity => (0..10).map(|c| c % 2).collect(),
            Hierarchy::Cifar100Coarse => CIFAR100_COARSE.to_vec(),
        }
    }

    /// The number of primary classes.
    pub fn primary_classes(self) -> usize {
        self.map().iter().max().map_or(0, |&m| m as usize + 1)
    }
}

/// The blocks B_i = [Σ_{j<i} ψ_j, Σ_{j≤i} ψ_j) of auxiliary classes, one per primary class.
pub fn blocks(psi: &[usize]) -> Vec<std::ops::Range<usize>> {
    let mut start = 0;
    psi.iter()
        .map(|&n| {
            let r = start..start + n;
            start += n;
            r
        })
        .collect()
}

/// The 0/1 masks m_y (one row of Σψ per label) of `labels`' blocks.
pub fn masks(psi: &[usize], labels: &[u32]) -> Vec<f64> {
    let b = blocks(psi);
    let k: usize = psi.iter().sum();
    let mut v = vec![0.0; labels.len() * k];
    for (i, &y) in labels.iter().enumerate() {
        for j in b[y as usize].clone() {
            v[i * k + j] = 1.0;
        }
    }
    v
}
