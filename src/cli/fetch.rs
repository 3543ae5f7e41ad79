//! `reprise fetch`: download the data files of a spec's profile (what is downloaded and how it
//! is checked: [`crate::data::fetch`]).

use std::collections::BTreeSet;
use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use super::{find_specs, shown, UsageError, EXIT_FAILED, EXIT_OK};
use crate::data::fetch::{fetch_manifest, FetchOptions, Outcome};
use crate::data::Manifest;
use crate::driver::{Options, Project};
use crate::spec::DEFAULT_PROFILE;

#[derive(Args, Debug)]
pub struct FetchArgs {
    /// Spec files (default: every reports/*.toml).
    pub specs: Vec<PathBuf>,
    /// Profile whose data sets are fetched, e.g. `paper`.
    #[arg(long, default_value = DEFAULT_PROFILE)]
    pub profile: String,
    /// Override a parameter, as for `run` (it may change which data sets the profile reads).
    #[arg(long = "set", value_name = "KEY.PATH=VALUE")]
    pub sets: Vec<String>,
    /// Also download files whose manifest leaves the sha256 `unpinned`, and write the hash of
    /// what was downloaded into the manifest. Check those files against their source first.
    #[arg(long)]
    pub pin: bool,
}

pub fn fetch(args: &FetchArgs, project: &Project) -> anyhow::Result<i32> {
    let specs = find_specs(&args.specs, project)?;
    let opts = Options { profile: args.profile.clone(), sets: args.sets.clone(), cache: None };
    let fetch_opts = FetchOptions { pin: args.pin, progress: std::io::stderr().is_terminal() };
    let mut done: BTreeSet<(PathBuf, String)> = BTreeSet::new();
    let (mut unpinned, mut no_url) = (0usize, 0usize);
    for path in specs {
        let spec = project.load(&path, &opts)?;
        for decl in spec.data.values() {
            if !done.insert((spec.root.clone(), decl.manifest.clone())) {
                continue;
            }
            let manifest = Manifest::load_named(&spec.root, &decl.manifest).map_err(|e| UsageError(e.to_string()))?;
            eprintln!("{} ({}):", decl.manifest, shown(&manifest.path));
            let outcomes = fetch_manifest(&spec.root, &manifest, fetch_opts).with_context(|| format!("fetching the data of manifest {}", shown(&manifest.path)))?;
            for (file, outcome) in outcomes {
                let file = file.display();
                match outcome {
                    Outcome::Present => eprintln!("  ok       {file} (already there, sha256 checked)"),
                    Outcome::Fetched => eprintln!("  fetched  {file} (sha256 checked)"),
                    Outcome::Pinned(hash) => eprintln!("  pinned   {file}: sha256 {hash} written into the manifest"),
                    Outcome::Unpinned => {
                        unpinned += 1;
                        eprintln!("  unpinned {file}: the manifest pins no sha256; check the source, then rerun with --pin to download it and pin its hash");
                    }
                    Outcome::NoUrl => {
                        no_url += 1;
                        eprintln!("  missing  {file}: the manifest gives no url; obtain it from its source ({}) and place it at this path", manifest.source);
                    }
                }
            }
        }
    }
    if unpinned + no_url > 0 {
        eprintln!("{} file(s) still missing: {unpinned} unpinned, {no_url} without a url", unpinned + no_url);
        return Ok(EXIT_FAILED);
    }
    Ok(EXIT_OK)
}
