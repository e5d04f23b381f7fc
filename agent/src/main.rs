//! podiam-agent: the per-node metadata endpoint. Its features land with the agent issues;
//! for now it only parses its common flags.

use clap::Parser;

/// podiam agent.
#[derive(Debug, Parser)]
#[command(name = "podiam-agent", version, about)]
struct Args {
    #[command(flatten)]
    log: podiam_common::logging::LogArgs,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    args.log.init()?;
    tracing::info!("podiam-agent has no features yet");
    Ok(())
}
