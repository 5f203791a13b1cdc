//! The `ckpt-agent` binary: argument parsing only; the work is in the library.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = ckpt_agent::cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CKPT_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match ckpt_agent::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // The reader of our output has what it wanted (`| head`): like cat, stop.
        Err(e) if e.is::<ckpt_agent::cli::StdoutClosed>() => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "ckpt-agent: error: {}",
                ckpt_shared::report::chain(e.chain())
            );
            std::process::ExitCode::FAILURE
        }
    }
}
