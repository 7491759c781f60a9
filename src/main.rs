use clap::Parser;

fn main() -> std::process::ExitCode {
    switchyard::cli::run(switchyard::cli::Cli::parse())
}
