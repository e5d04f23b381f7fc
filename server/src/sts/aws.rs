//! `sts:AssumeRole` through aws-sdk-sts.
//!
//! The server's own identity comes from the SDK's default chain (IRSA web identity,
//! environment, profile, instance profile). `--region` picks the regional endpoint and
//! with it the partition (`cn-north-1` → `sts.cn-north-1.amazonaws.com.cn`);
//! `--sts-endpoint` overrides the URL (a VPC endpoint; moto in tests). With
//! `--assume-role-arn` the server first assumes that role and assumes pod roles from it
//! (role chaining: STS caps chained sessions at one hour). The SDK's standard retry mode
//! retries throttling and transient errors with jittered exponential backoff.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use aws_config::{BehaviorVersion, Region, retry::RetryConfig, timeout::TimeoutConfig};
use aws_sdk_sts::{
    Client,
    error::{DisplayErrorContext, ProvideErrorMetadata, SdkError},
    types::Tag,
};
use aws_smithy_http_client::tls::{Provider, rustls_provider::CryptoMode};
use futures::{FutureExt, future::BoxFuture};
use podiam_common::{protocol::Credentials, secret::Secret};

use super::{AssumeRole, Clock, SessionKey, StsError};

/// How the server reaches STS.
#[derive(Clone, Debug, Default)]
pub struct StsSettings {
    /// Region (None: from the environment or instance metadata).
    pub region: Option<String>,
    /// Endpoint URL override.
    pub endpoint: Option<String>,
    /// Role to assume first (role chaining).
    pub assume_role_arn: Option<String>,
    /// Whether `assume_role_arn` is set (pod sessions are then capped at 1 h).
    pub chained: bool,
    /// Timeout of one attempt (the SDK makes up to three).
    pub attempt_timeout: Duration,
}

/// aws-sdk-sts as the broker's [`AssumeRole`].
#[derive(Clone, Debug)]
pub struct AwsSts {
    client: Client,
    /// For checking the expiration STS gives.
    clock: Arc<dyn Clock>,
}

const MAX_ATTEMPTS: u32 = 3;
/// Latest expiration accepted from STS (its limit is 12 h).
const MAX_EXPIRY: Duration = Duration::from_secs(13 * 3600);
/// Session name of the server's own chained session.
const CHAIN_SESSION: &str = "podiam-server";

// === impl AwsSts ===

impl AwsSts {
    /// Loads the default credential chain and builds the client.
    pub async fn new(settings: &StsSettings, clock: Arc<dyn Clock>) -> Self {
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(Provider::Rustls(CryptoMode::Ring))
            .build_https();
        let attempt = settings.attempt_timeout.max(Duration::from_millis(100));
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .http_client(http)
            .retry_config(RetryConfig::standard().with_max_attempts(MAX_ATTEMPTS))
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(1).min(attempt))
                    .operation_attempt_timeout(attempt)
                    .operation_timeout(attempt * (MAX_ATTEMPTS + 1))
                    .build(),
            );
        if let Some(region) = &settings.region {
            loader = loader.region(Region::new(region.clone()));
        }
        if let Some(endpoint) = &settings.endpoint {
            loader = loader.endpoint_url(endpoint.clone());
        }
        let sdk = loader.load().await;
        let mut config = aws_sdk_sts::config::Builder::from(&sdk);
        if let Some(arn) = &settings.assume_role_arn {
            let chained = aws_config::sts::AssumeRoleProvider::builder(arn.clone())
                .session_name(CHAIN_SESSION)
                .configure(&sdk)
                .build()
                .await;
            config = config.credentials_provider(chained);
        }
        Self {
            client: Client::from_conf(config.build()),
            clock,
        }
    }

    /// The ARN the server runs as (`sts:GetCallerIdentity`), to derive the base role ARN.
    pub async fn caller_arn(&self) -> Result<String, StsError> {
        let out = self
            .client
            .get_caller_identity()
            .send()
            .await
            .map_err(sdk_error)?;
        out.arn
            .ok_or_else(|| StsError::Malformed("GetCallerIdentity returned no ARN".into()))
    }
}

impl AssumeRole for AwsSts {
    fn assume_role(&self, key: &SessionKey) -> BoxFuture<'static, Result<Credentials, StsError>> {
        let Some(first) = &key.chained_from else {
            return self.call(&self.client, &key.role_arn, key, true);
        };
        // Role chaining: the first role's session assumes the target role. The tags go on
        // the first call; transitive, they carry over to the second.
        let hop = self.call(&self.client, first, key, true);
        let (this, key) = (self.clone(), key.clone());
        async move {
            let hop = hop.await?;
            let credentials = aws_sdk_sts::config::Credentials::new(
                hop.access_key_id.clone(),
                hop.secret_access_key.expose(),
                Some(hop.session_token.expose().to_string()),
                Some(hop.expiration),
                "podiam-chain",
            );
            let config = this
                .client
                .config()
                .to_builder()
                .credentials_provider(credentials);
            let client = Client::from_conf(config.build());
            this.call(&client, &key.role_arn, &key, false).await
        }
        .boxed()
    }
}

impl AwsSts {
    /// One `AssumeRole` of `role` through `client`, with the session parameters of `key`
    /// (its tags only if `tagged`).
    fn call(
        &self,
        client: &Client,
        role: &podiam_common::arn::RoleArn,
        key: &SessionKey,
        tagged: bool,
    ) -> BoxFuture<'static, Result<Credentials, StsError>> {
        let tags: Vec<Tag> = key
            .tags
            .iter()
            .filter(|_| tagged)
            .filter_map(|(k, v)| Tag::builder().key(*k).value(v.clone()).build().ok())
            .collect();
        let request = client
            .assume_role()
            .role_arn(role.as_str())
            .role_session_name(key.session_name.as_ref())
            .duration_seconds(i32::try_from(key.duration.as_secs()).unwrap_or(i32::MAX))
            .set_external_id(key.external_id.as_deref().map(Into::into))
            .set_transitive_tag_keys(
                (key.transitive_tags && !tags.is_empty())
                    .then(|| tags.iter().map(|t| t.key().to_string()).collect()),
            )
            .set_tags((!tags.is_empty()).then_some(tags));
        let clock = self.clock.clone();
        async move {
            let out = request.send().await.map_err(sdk_error)?;
            let c = out
                .credentials
                .ok_or_else(|| StsError::Malformed("AssumeRole returned no credentials".into()))?;
            let expiration = SystemTime::try_from(c.expiration)
                .map_err(|e| StsError::Malformed(format!("expiration: {e}")))?;
            // STS issues at most 12 h; anything outside now..13 h is not to be trusted (and
            // would not format as RFC 3339 downstream).
            let now = clock.now();
            if expiration <= now || expiration > now + MAX_EXPIRY {
                return Err(StsError::Malformed(format!(
                    "expiration {} s from now is outside STS's range",
                    expiration.duration_since(now).map_or(0, |d| d.as_secs())
                )));
            }
            Ok(Credentials {
                access_key_id: c.access_key_id,
                secret_access_key: Secret::new(c.secret_access_key),
                session_token: Secret::new(c.session_token),
                expiration,
            })
        }
        .boxed()
    }
}

/// Maps an SDK error to an [`StsError`] whose code is safe as a metric label.
fn sdk_error<E, R>(err: SdkError<E, R>) -> StsError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    match &err {
        SdkError::ServiceError(service) => {
            let e = service.err();
            StsError::Service {
                code: label(e.code().unwrap_or("Unknown")),
                message: e.message().unwrap_or_default().to_string(),
            }
        }
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) => {
            StsError::Unreachable(DisplayErrorContext(&err).to_string())
        }
        _ => StsError::Malformed(DisplayErrorContext(&err).to_string()),
    }
}

/// AWS error codes are short identifiers; anything else becomes `Other` so that a
/// misbehaving endpoint cannot blow up metric cardinality.
fn label(code: &str) -> String {
    let ok = !code.is_empty()
        && code.len() <= 64
        && code.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.');
    if ok {
        code.to_string()
    } else {
        "Other".to_string()
    }
}
