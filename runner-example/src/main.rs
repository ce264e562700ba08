//! The `runner-example` binary; see `runner-example --help`.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use runner_example::cli::Args;
use runner_example::server::{run, Drained};

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match run(args).await {
        Ok(Drained::Complete) => ExitCode::SUCCESS,
        Ok(Drained::TimedOut) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("runner-example: {e}");
            ExitCode::FAILURE
        }
    }
}
