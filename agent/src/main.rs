use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    podiam_agent::args::Cli::parse().run().await
}
