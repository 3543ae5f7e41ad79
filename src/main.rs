//! The `reprise` binary: parse the command line and hand over to the library.

use clap::Parser;

fn main() {
    let cli = reprise::cli::Cli::parse();
    std::process::exit(reprise::cli::main_with(cli));
}
