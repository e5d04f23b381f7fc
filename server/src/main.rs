use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use podiam_server::args::Cli;

#[tokio::main]
async fn main() -> ExitCode {
    // kiam's and kube2iam's flags get podiam's way named, not clap's nearest spelling.
    let args = std::env::args_os().map(|a| a.to_string_lossy().into_owned());
    if let Some(message) = podiam_common::legacy::unsupported(&Cli::command(), args) {
        eprintln!("podiam-server: {message}");
        return ExitCode::from(2);
    }
    Cli::parse().run().await
}
