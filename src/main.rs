use clap::Parser;

fn main() -> std::process::ExitCode {
    switchyard::cli::tune_heap();
    let args = switchyard::cli::normalize_flags(std::env::args_os());
    switchyard::cli::run(switchyard::cli::Cli::parse_from(args))
}
