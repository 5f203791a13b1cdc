//! The `ckpt-agent` binary: argument parsing only; the work is in the library.

use clap::Parser;

fn main() {
    let cli = ckpt_agent::cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CKPT_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = ckpt_agent::cli::run(cli) {
        eprintln!("ckpt-agent: error: {e:#}");
        std::process::exit(1);
    }
}
