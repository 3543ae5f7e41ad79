//! The `reprise` binary: the built-in methods, the command line, the library's driver.

fn main() {
    std::process::exit(reprise::cli::main_with(reprise::driver::Project::builder().build()));
}
