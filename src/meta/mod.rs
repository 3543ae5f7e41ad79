//! Meta-learning building blocks the methods share.
//!
//! [`hypergradient()`] differentiates an outer objective through unrolled inner SGD steps with
//! respect to meta-parameters φ (the maths is in the [module's doc](mod@hypergradient)); a
//! method states its bilevel problem by implementing [`Problem`].

pub mod hypergradient;

pub use hypergradient::{hypergradient, unroll, unrolled_value, Hypergradient, Problem, StepSize, Unroll, HVP_EPS};

#[cfg(test)]
mod tests;
