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
        // SIGINT or SIGTERM: one line, and 128 + the signal, as a shell reports it.
        Err(e) if e.is::<ckpt_agent::cancel::Interrupted>() => {
            eprintln!("ckpt-agent: {e}");
            let code = e
                .downcast_ref::<ckpt_agent::cancel::Interrupted>()
                .map_or(1, |i| i.exit_code());
            std::process::ExitCode::from(code)
        }
        Err(e) => {
            eprintln!(
                "ckpt-agent: error: {}",
                ckpt_shared::report::chain(e.chain())
            );
            std::process::ExitCode::FAILURE
        }
    }
}
