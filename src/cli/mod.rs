//! The command line: `reprise run | status | render | verify | gc | fetch`. Each subcommand is a small
//! file; this one holds the argument types and what they share (finding specs, the store, the
//! output folder, exit codes).

pub mod bench;
pub mod cell;
pub mod fetch;
pub mod gc;
pub mod notebook;
pub mod run;
pub mod status;
pub mod verify;

use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};

use crate::cache::Store;
use crate::driver::{self, DriverError, Options, Project};
use crate::spec::{self, Spec, DEFAULT_PROFILE};

#[cfg(test)]
mod tests;

/// Exit code: everything fine.
pub const EXIT_OK: i32 = 0;
/// Exit code: a check failed (verify), or cells could not be computed.
pub const EXIT_FAILED: i32 = 1;
/// Exit code: bad usage, an invalid spec or bad data.
pub const EXIT_USAGE: i32 = 2;

#[derive(Parser, Debug)]
#[command(
    name = "reprise",
    version,
    about = "Regenerate the tables and figures of ML papers from declarative report specs.",
    after_help = "Exit codes: 0 ok; 1 a check failed or cells could not be computed; 2 usage, spec or data error."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Plan, run what is missing (with progress bars on a terminal), and render.
    Run(run::RunArgs),
    /// What is cached, stale or missing, and why.
    Status(status::StatusArgs),
    /// Render from the cache only; missing cells are an error naming them.
    Render(run::RenderArgs),
    /// Check committed reports: hashes, byte-identical re-render, gated claims.
    Verify(verify::VerifyArgs),
    /// Remove store objects that no lock file or recent run refers to.
    Gc(gc::GcArgs),
    /// Download the data files a profile's manifests name, checking each sha256.
    Fetch(fetch::FetchArgs),
    /// Time training steps against PyTorch, the store's hashing and (optionally) a report.
    Bench(bench::BenchArgs),
    /// Write the report's Jupyter notebook (evcxr Rust kernel) from the cache; prints its path.
    Notebook(notebook::NotebookArgs),
    /// Compute one cell by key into the store (what a SLURM task of `run --executor slurm` runs).
    #[command(hide = true)]
    Cell(cell::CellArgs),
}

/// Options every command that reads a spec shares.
#[derive(Args, Debug, Clone)]
pub struct SpecOpts {
    /// Profile: a set of parameter overrides named in the spec (`quick` is the default).
    #[arg(long, default_value = DEFAULT_PROFILE)]
    pub profile: String,
    /// Override a parameter, e.g. `--set experiments.exp2.grid.imbalance=[0.1,0.01]` or
    /// `--set defaults.epochs=5`; repeatable, validated like the file.
    #[arg(long = "set", value_name = "KEY.PATH=VALUE")]
    pub sets: Vec<String>,
    /// Cache directory, or `s3://bucket/prefix` for S3-compatible storage (default:
    /// `artifacts/store` of the project, or $REPRISE_CACHE).
    #[arg(long, value_name = "DIR|URL")]
    pub cache: Option<PathBuf>,
}

/// The entry point of a `reprise` binary for `project`: parse the command line, run it, and
/// return the exit code. A crate with its own methods needs five lines:
///
/// ```no_run
/// // fn main() {
/// let project = reprise::driver::Project::builder() /* .with_method(MyMethod) */ .build();
/// std::process::exit(reprise::cli::main_with(project));
/// // }
/// ```
pub fn main_with(project: Project) -> i32 {
    run_cli(Cli::parse(), &project)
}

/// Run a parsed command line for `project`; returns the exit code.
pub fn run_cli(cli: Cli, project: &Project) -> i32 {
    // Checked before any work starts, so that a typo does not silently choose the default.
    if let Err(e) = crate::exec::wait_policy() {
        eprintln!("error: {e}");
        return EXIT_USAGE;
    }
    let result = match cli.command {
        Command::Run(a) => run::run(&a, project),
        Command::Render(a) => run::render_only(&a, project),
        Command::Status(a) => status::status(&a, project),
        Command::Verify(a) => verify::verify(&a, project),
        Command::Gc(a) => gc::gc(&a),
        Command::Fetch(a) => fetch::fetch(&a, project),
        Command::Bench(a) => bench::bench(&a),
        Command::Notebook(a) => notebook::notebook(&a, project),
        Command::Cell(a) => cell::cell(&a, project),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            // Spec errors carry their own formatting; others get anyhow's chain of context.
            if let Some(se) = e.downcast_ref::<spec::LoadError>().or_else(|| match e.downcast_ref::<DriverError>() {
                Some(DriverError::Spec(se)) => Some(se.as_ref()),
                _ => None,
            }) {
                eprintln!("{se}");
                return EXIT_USAGE;
            }
            eprintln!("error: {}", chain(&e));
            if e.downcast_ref::<UsageError>().is_some() || e.downcast_ref::<DriverError>().is_some_and(DriverError::is_usage) {
                EXIT_USAGE
            } else {
                EXIT_FAILED
            }
        }
    }
}

/// An error with its causes, `: `-separated, leaving out a cause whose text the message
/// before it already ends with (an I/O error that names its source would otherwise print the
/// operating system's message twice).
pub fn chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.ends_with(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// A usage or input error (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// The specs named, or every `reports/*.toml` of the current project when none is.
pub fn find_specs(given: &[PathBuf], project: &Project) -> anyhow::Result<Vec<PathBuf>> {
    if !given.is_empty() {
        for p in given {
            // Follows symlinks: a link to a spec file is a spec file.
            let problem = match std::fs::metadata(p) {
                Ok(m) if m.is_file() => continue,
                Ok(m) if m.is_dir() => "is a directory, not a spec file",
                Ok(_) => "is not a regular file (a device, FIFO or socket)",
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => "not found",
                Err(_) => "cannot be read",
            };
            return Err(UsageError(format!("spec {}: {problem} (name a report spec such as reports/<id>.toml)", p.display())).into());
        }
        return Ok(given.to_vec());
    }
    let dir = project.reports_dir();
    let mut specs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|e| UsageError(format!("no spec given and cannot read {}: {e} (run from the project root or name a spec)", dir.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    specs.sort();
    if specs.is_empty() {
        return Err(UsageError("no spec given and reports/ holds no .toml file".into()).into());
    }
    Ok(specs)
}

/// Load a spec with `project`'s methods and check its template ([`Project::load`]).
pub fn load_spec(path: &Path, opts: &SpecOpts, project: &Project) -> anyhow::Result<Spec> {
    Ok(project.load(path, &opts.options())?)
}

impl SpecOpts {
    /// The same options for the library's driver.
    pub fn options(&self) -> Options {
        Options { profile: self.profile.clone(), sets: self.sets.clone(), cache: self.cache.clone() }
    }
}

/// The store of [`Project::store_dir`], opened (created when missing).
pub fn open_store(spec_root: &Path, opts: &SpecOpts) -> anyhow::Result<Box<dyn Store>> {
    // A cache that cannot be created or written is the user's to fix (exit 2).
    Project::at(spec_root).open_store(opts.cache.as_deref()).map_err(|e| UsageError(e.to_string()).into())
}

/// Where a report's outputs go: `artifacts/<id>` for the default profile, else
/// `artifacts/<id>-<profile>`.
pub fn out_dir(spec: &Spec) -> PathBuf {
    driver::out_dir(spec)
}

/// A path relative to the current directory when it lies below it (for messages and JSON).
pub fn shown(p: &Path) -> String {
    driver::shown(p)
}
