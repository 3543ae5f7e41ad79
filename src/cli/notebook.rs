//! `reprise notebook`: write a report's Jupyter notebook (evcxr Rust kernel) next to its
//! rendered files, from the cache only, and print its path.

use std::path::{Path, PathBuf};

use clap::Args;

use super::{shown, SpecOpts, EXIT_OK};
use crate::driver::{Project, Report};
use crate::notebook::write_notebook;

#[derive(Args, Debug)]
pub struct NotebookArgs {
    pub spec: PathBuf,
    #[command(flatten)]
    pub opts: SpecOpts,
}

/// The crate the notebook's `:dep` names: the source tree this binary was built from.
fn crate_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

pub fn notebook(args: &NotebookArgs, project: &Project) -> anyhow::Result<i32> {
    let report = Report::open_cached_in(project, &args.spec, &args.opts.options())?;
    if !crate_dir().join("Cargo.toml").is_file() {
        eprintln!("warning: the reprise sources this binary was built from ({}) are gone; edit the notebook's `:dep` line to point at a checkout", crate_dir().display());
    }
    let path = write_notebook(&report, crate_dir())?;
    println!("{}", shown(&path));
    Ok(EXIT_OK)
}
