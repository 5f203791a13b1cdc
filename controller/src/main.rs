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
        // The reader of our output has what it wanted (`| head`): like cat, stop.
        Err(e) if e.is_stdout_closed() => std::process::ExitCode::SUCCESS,
        // SIGINT or SIGTERM: one line, and 128 + the signal, as a shell reports it.
        Err(e @ ckpt_controller::cli::CommandError::Interrupted { signal }) => {
            eprintln!("ckpt-controller: {e}");
            std::process::ExitCode::from((128 + signal) as u8)
        }
        Err(e) => {
            // The error and each of its causes, once (also where a cause from a
            // crate below repeats its own source in its message).
            eprintln!(
                "ckpt-controller: error: {}",
                ckpt_shared::report::error_chain(&e)
            );
            std::process::ExitCode::FAILURE
        }
    }
}
