//! `podiam-sdk-identity`: what the AWS SDK for Rust's default credential chain resolves to
//! where it runs (the sandbox runs it in a pod: `scripts/sandbox exec POD --
//! podiam-sdk-identity`). Prints `arn <ARN>` from `sts:GetCallerIdentity` with the
//! credentials the chain found (environment, profile, web identity, the container
//! provider of `AWS_CONTAINER_CREDENTIALS_FULL_URI`, then the instance metadata service),
//! or `error <why>` and exit status 1. A test client: it ships with nothing.

use std::process::ExitCode;

use aws_config::BehaviorVersion;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    // Plain HTTP is all the sandbox has: the agents' endpoints and moto as the STS.
    let http = aws_smithy_http_client::Builder::new().build_http();
    let config = aws_config::defaults(BehaviorVersion::latest())
        .http_client(http)
        .load()
        .await;
    let sts = aws_sdk_sts::Client::new(&config);
    match sts.get_caller_identity().send().await {
        Ok(out) => {
            println!("arn {}", out.arn().unwrap_or_default());
            ExitCode::SUCCESS
        }
        Err(error) => {
            println!("error {}", aws_sdk_sts::error::DisplayErrorContext(&error));
            ExitCode::FAILURE
        }
    }
}
