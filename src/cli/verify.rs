//! `reprise verify`: check committed reports (what is checked: [`crate::verify`]).

use std::path::PathBuf;

use clap::Args;

use super::{find_specs, load_spec, out_dir, shown, SpecOpts, EXIT_FAILED, EXIT_OK};
use crate::driver::Project;
use crate::verify;

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// Spec files (default: every reports/*.toml).
    pub specs: Vec<PathBuf>,
    #[command(flatten)]
    pub opts: SpecOpts,
    /// Recompute this many sampled training cells from scratch and compare their outputs.
    #[arg(long, default_value_t = 0)]
    pub recompute: usize,
}

pub fn verify(args: &VerifyArgs, project: &Project) -> anyhow::Result<i32> {
    let specs = find_specs(&args.specs, project)?;
    verify::remove_stale_scratch();
    let opts = args.opts.options();
    let mut failed = false;
    for path in specs {
        let spec = load_spec(&path, &args.opts, project)?;
        let v = verify::verify(&spec, &opts, args.recompute)?;
        if v.no_lock {
            let out = out_dir(&spec);
            eprintln!("FAIL {}: no lock file in {} — run `reprise run {}` and commit {}", spec.report.id, shown(&out), path.display(), shown(&out));
            failed = true;
        } else if v.ok() {
            eprintln!("ok   {}: {} files match, re-render identical, {} cells locked", spec.report.id, v.files, v.cells);
        } else {
            failed = true;
            eprintln!("FAIL {}:", spec.report.id);
            for p in &v.problems {
                eprintln!("  - {p}");
            }
        }
    }
    Ok(if failed { EXIT_FAILED } else { EXIT_OK })
}
