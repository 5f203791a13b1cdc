use clap::Parser;

fn main() -> std::process::ExitCode {
    match ckpt_controller::cli::run(ckpt_controller::cli::Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ckpt-controller: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
