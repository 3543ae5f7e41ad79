//! `custom-method`: the `reprise` command line with one more method, `nearest_mean`.

mod nearest_mean;

fn main() {
    let project = reprise::driver::Project::builder().with_method(nearest_mean::NearestMean).build();
    std::process::exit(reprise::cli::main_with(project));
}
