use clap::Parser;

fn main() -> std::process::ExitCode {
    // The daemon logs what it does; the commands only what went wrong.
    let default = if std::env::args().nth(1).as_deref() == Some("serve") {
        "info"
    } else {
        "warn"
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CKPT_LOG")
                .unwrap_or_else(|_| default.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match ckpt_controller::cli::run(ckpt_controller::cli::Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // anyhow's alternate form: the error and each of its causes, once.
            let e = anyhow::Error::from(e);
            eprintln!("ckpt-controller: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
