//! `reprise`: regenerate the tables and figures of machine-learning papers from declarative
//! report specs.
//!
//! The modules follow the pipeline, and no stage reaches back to an earlier one:
//! spec (TOML, validated) → plan (cells and their content keys) → exec (cache lookup, run what is
//! missing, record) → frames (polars) → render (tables, figures, Markdown, HTML).
//! `data`, `models`, `train`, `methods` and `metrics` are what cells compute with. `driver` owns
//! the flow (a project's layout, a report's stages in order); `cli` and `notebook` call it.

pub mod artifacts;
pub mod cache;
pub mod cli;
pub mod data;
pub mod driver;
pub mod exec;
pub mod frames;
pub mod fs;
pub mod meta;
pub mod methods;
pub mod metrics;
pub mod models;
pub mod notebook;
pub mod params;
pub mod plan;
pub mod render;
pub mod rng;
pub mod spec;
pub mod train;
pub mod verify;
