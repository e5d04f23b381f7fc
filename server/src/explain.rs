//! `podiam-server explain`: the decision for one pod, and why, computed by the same code
//! the server runs, from what the API server says now.

use std::{io::Write, net::IpAddr, sync::Arc};

use kube::{Api, api::ListParams};
use serde::Serialize;

use crate::{
    accounts::{
        AccountIndex, AccountKey,
        resources::{WatchedAssociation, WatchedServiceAccount},
    },
    args::KubeArgs,
    pods::{
        IpLookup, PodAnnotations, PodIndex, PodInfo, PodIps, PodKey, PodPhase,
        resources::{WatchedNamespace, WatchedPod},
    },
    policy::{
        Decision, Grant, PolicyConfig,
        namespace::{NamespaceIndex, NamespaceInfo},
    },
};

/// Which pod to explain.
#[derive(Clone, Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["pod", "ip", "service_account"])))]
pub struct ExplainArgs {
    /// The namespace of the pod (with --pod) or ServiceAccount (with --service-account).
    #[arg(long, short = 'n', env = "PODIAM_EXPLAIN_NAMESPACE")]
    namespace: Option<String>,

    /// The pod's name (with --namespace).
    #[arg(long, env = "PODIAM_EXPLAIN_POD", requires = "namespace")]
    pod: Option<String>,

    /// The container-credentials path: the role a pod running as this ServiceAccount
    /// gets for its token (with --namespace), from the PodIdentityAssociation objects and
    /// the ServiceAccount's eks.amazonaws.com/role-arn, under the namespace's policy.
    #[arg(long, env = "PODIAM_EXPLAIN_SERVICE_ACCOUNT", requires = "namespace", conflicts_with_all = ["pod", "ip"])]
    service_account: Option<String>,

    /// Find the pod by IP, as the server does for a request from that address.
    #[arg(long, env = "PODIAM_EXPLAIN_IP", conflicts_with_all = ["pod", "namespace"])]
    ip: Option<IpAddr>,

    /// Output format: text for people, json (one object) for scripts.
    #[arg(long, short = 'o', env = "PODIAM_EXPLAIN_OUTPUT", value_enum, default_value_t = Output::Text)]
    output: Output,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Output {
    Text,
    Json,
}

/// What explain found.
#[derive(Debug, Serialize)]
struct Report {
    #[serde(skip_serializing_if = "Option::is_none")]
    pod: Option<Box<PodSummary>>,
    #[serde(flatten)]
    verdict: Verdict,
}

#[derive(Debug, Serialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
enum Verdict {
    Allowed(Grant),
    Denied {
        reason: &'static str,
        message: String,
    },
    Undecided {
        reason: &'static str,
        message: String,
    },
}

#[derive(Debug, Serialize)]
struct PodSummary {
    namespace: String,
    name: String,
    node: Option<String>,
    ips: Vec<IpAddr>,
    phase: &'static str,
    host_network: bool,
    mirror: bool,
    service_account: Option<String>,
}

const PAGE: u32 = 500;

// === impl ExplainArgs ===

impl ExplainArgs {
    /// Explains, writes the report to `out`, and returns the exit status: 0 allowed,
    /// 1 denied, 2 undecided.
    pub async fn run(&self, kube: &KubeArgs, policy: &PolicyConfig, out: &mut dyn Write) -> u8 {
        let report = self.report(kube, policy).await;
        let written = match self.output {
            Output::Json => serde_json::to_writer(&mut *out, &report)
                .map_err(std::io::Error::from)
                .and_then(|()| writeln!(out)),
            Output::Text => report.write_text(out),
        };
        if let Err(error) = written {
            eprintln!("podiam-server explain: writing the report: {error}");
            return 2;
        }
        match report.verdict {
            Verdict::Allowed(_) => 0,
            Verdict::Denied { .. } => 1,
            Verdict::Undecided { .. } => 2,
        }
    }

    async fn report(&self, kube: &KubeArgs, policy: &PolicyConfig) -> Report {
        let config = match kube.config().await {
            Ok(config) => config,
            Err(error) => return Report::undecided("api_unreachable", format!("{error:#}")),
        };
        // Named in every "unreachable" answer: which address, from which configuration.
        let url = config.cluster_url.to_string();
        let client = match kube::Client::try_from(config) {
            Ok(client) => client,
            Err(error) => {
                return Report::undecided(
                    "api_unreachable",
                    format!("building a client for {url}: {error}"),
                );
            }
        };
        if let (Some(namespace), Some(account)) = (&self.namespace, &self.service_account) {
            return service_account_report(client, &url, namespace, account, policy).await;
        }
        let pod = match self.find_pod(client.clone(), &url).await {
            Ok(pod) => pod,
            Err(report) => return report,
        };
        let summary = Some(Box::new(PodSummary::from(&pod)));
        if let Some(reason) = not_served(&pod) {
            return Report {
                pod: summary,
                verdict: Verdict::Denied {
                    reason: "not_served",
                    message: reason,
                },
            };
        }
        let info = match namespace_info(client, &url, &pod.key.namespace, policy).await {
            Ok(info) => info,
            Err(report) => return report,
        };
        Report {
            pod: summary,
            verdict: Decision::for_pod(&pod, info.as_deref(), policy).into(),
        }
    }

    async fn find_pod(&self, client: kube::Client, url: &str) -> Result<PodInfo, Report> {
        let unreachable = |error: kube::Error| {
            Report::undecided(
                "api_unreachable",
                format!("the API server at {url}: {error}"),
            )
        };
        let info = |pod: WatchedPod| {
            pod.into_info()
                .map_err(|error| Report::undecided("invalid_object", error.to_string()))
        };
        if let (Some(namespace), Some(name)) = (&self.namespace, &self.pod) {
            let api = Api::<WatchedPod>::namespaced(client, namespace);
            return match api.get_opt(name).await.map_err(unreachable)? {
                Some(pod) => info(pod),
                None => Err(Report::undecided(
                    "pod_not_found",
                    format!("pod {namespace}/{name} does not exist"),
                )),
            };
        }
        let Some(ip) = self.ip else {
            // clap's "target" group requires --pod or --ip.
            return Err(Report::undecided(
                "usage",
                "give --namespace and --pod, or --ip".into(),
            ));
        };
        // The same index the server builds, so collisions and finished pods count alike.
        let api = Api::<WatchedPod>::all(client);
        let mut index = PodIndex::default();
        let mut params = ListParams::default().limit(PAGE);
        loop {
            let page = api.list(&params).await.map_err(unreachable)?;
            for pod in page.items {
                if let Ok(pod) = pod.into_info() {
                    index.apply(pod);
                }
            }
            match page.metadata.continue_ {
                Some(token) if !token.is_empty() => params = params.continue_token(&token),
                _ => break,
            }
        }
        match index.lookup_ip(ip) {
            IpLookup::Found(pod) => Ok((*pod).clone()),
            IpLookup::NotFound => Err(Report::undecided(
                "pod_not_found",
                format!("no live pod (not hostNetwork, not finished) has IP {ip}"),
            )),
            IpLookup::Ambiguous(keys) => Err(Report {
                pod: None,
                verdict: Verdict::Denied {
                    reason: "ambiguous_ip",
                    message: format!(
                        "IP {ip} is claimed by several live pods ({}); requests from it are refused",
                        keys.iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                },
            }),
        }
    }
}

/// The namespace as the server's index holds it (`None`: it does not exist).
async fn namespace_info(
    client: kube::Client,
    url: &str,
    namespace: &str,
    policy: &PolicyConfig,
) -> Result<Option<Arc<NamespaceInfo>>, Report> {
    let namespaces = Api::<WatchedNamespace>::all(client);
    let found = namespaces.get_opt(namespace).await.map_err(|error| {
        Report::undecided(
            "api_unreachable",
            format!("reading namespace {namespace} from the API server at {url}: {error}"),
        )
    })?;
    // The same compilation (and base ARN) as the server's namespace index.
    let mut index = NamespaceIndex::new(policy.base_role_arn.clone());
    if let Some(ns) = &found
        && let Ok(name) = ns.name()
    {
        let (permitted, allowed) = ns.policy_annotations();
        index.apply(name, permitted, allowed);
    }
    Ok(index.get(namespace))
}

/// The container-credentials path's decision for the pods of one ServiceAccount.
async fn service_account_report(
    client: kube::Client,
    url: &str,
    namespace: &str,
    account: &str,
    policy: &PolicyConfig,
) -> Report {
    let unreachable = |what: &str, error: kube::Error| {
        Report::undecided(
            "api_unreachable",
            format!("reading {what} from the API server at {url}: {error}"),
        )
    };
    let key = AccountKey::new(namespace, account);
    let accounts = Api::<WatchedServiceAccount>::namespaced(client.clone(), namespace);
    let found = match accounts.get_opt(account).await {
        Ok(Some(sa)) => sa,
        Ok(None) => {
            return Report::undecided(
                "service_account_not_found",
                format!("ServiceAccount {key} does not exist"),
            );
        }
        Err(error) => return unreachable(&format!("ServiceAccount {key}"), error),
    };
    let mut index = AccountIndex::default();
    index.apply_account(key.clone(), found.role().map(Into::into));
    let associations = Api::<WatchedAssociation>::namespaced(client.clone(), namespace);
    match associations.list(&ListParams::default()).await {
        Ok(list) => {
            for association in list
                .items
                .into_iter()
                .filter_map(|a| a.into_association().ok())
            {
                index.apply_association(association);
            }
        }
        // No CRD installed: no associations.
        Err(kube::Error::Api(status)) if status.code == 404 => {}
        Err(error) => return unreachable("PodIdentityAssociations", error),
    }
    let info = match namespace_info(client, url, namespace, policy).await {
        Ok(info) => info,
        Err(report) => return report,
    };
    // Any pod of the ServiceAccount: what tells pods apart (their token, node and UID) is
    // checked per request.
    let pod = PodInfo {
        key: PodKey {
            namespace: namespace.into(),
            name: "".into(),
        },
        uid: None,
        node_name: None,
        service_account: Some(account.into()),
        ips: PodIps::default(),
        host_network: false,
        mirror: false,
        phase: PodPhase::Running,
        annotations: PodAnnotations::default(),
        pod_identity: true,
    };
    let role = index.role_of(&key);
    Report {
        pod: None,
        verdict: Decision::for_service_account(&pod, &key, &role, info.as_deref(), policy).into(),
    }
}

impl From<Decision> for Verdict {
    fn from(decision: Decision) -> Self {
        match decision {
            Decision::Allowed(grant) => Verdict::Allowed(grant),
            Decision::Denied(denial) => Verdict::Denied {
                reason: denial.code(),
                message: denial.to_string(),
            },
        }
    }
}

/// Pods whose IP never identifies them.
fn not_served(pod: &PodInfo) -> Option<String> {
    if pod.host_network {
        return Some(
            "the pod uses the host network: requests from it come from the node's address and are never answered with a pod's credentials"
                .into(),
        );
    }
    if !pod.claims_ips() {
        return Some(format!(
            "the pod has finished (phase {}): its IP no longer identifies it",
            pod.phase.as_str()
        ));
    }
    None
}

// === impl Report ===

impl Report {
    fn undecided(reason: &'static str, message: String) -> Self {
        Self {
            pod: None,
            verdict: Verdict::Undecided { reason, message },
        }
    }

    fn write_text(&self, out: &mut dyn Write) -> std::io::Result<()> {
        if let Some(pod) = &self.pod {
            writeln!(out, "pod:        {}/{}", pod.namespace, pod.name)?;
            writeln!(
                out,
                "node:       {}",
                pod.node.as_deref().unwrap_or("(not scheduled)")
            )?;
            let ips: Vec<String> = pod.ips.iter().map(ToString::to_string).collect();
            let ips = if ips.is_empty() {
                "(none yet)".into()
            } else {
                ips.join(", ")
            };
            writeln!(out, "ips:        {ips}")?;
            writeln!(out, "phase:      {}", pod.phase)?;
            if pod.mirror {
                writeln!(out, "mirror:     yes (a static pod's mirror)")?;
            }
        }
        match &self.verdict {
            Verdict::Allowed(grant) => {
                writeln!(
                    out,
                    "role:       {} (from {})",
                    grant.role_arn, grant.role_source
                )?;
                if let Some(id) = &grant.external_id {
                    writeln!(out, "external id: {id}")?;
                }
                if let Some(name) = &grant.session_name {
                    writeln!(out, "session:    {name}")?;
                }
                if let Some(d) = grant.session_duration {
                    writeln!(out, "duration:   {}s", d.as_secs())?;
                }
                if let Some(first) = &grant.chained_from {
                    writeln!(
                        out,
                        "via:        {first} (assumed first; its session assumes the role)"
                    )?;
                }
                if grant.pod_identity_tags {
                    writeln!(
                        out,
                        "tags:       kubernetes-namespace, kubernetes-service-account, kubernetes-pod-name, kubernetes-pod-uid, and eks-cluster-name / eks-cluster-arn if the server sets them (all transitive)"
                    )?;
                }
                writeln!(out, "decision:   allowed")?;
            }
            Verdict::Denied { reason, message } => {
                writeln!(out, "decision:   denied ({reason})")?;
                writeln!(out, "why:        {message}")?;
            }
            Verdict::Undecided { reason, message } => {
                writeln!(out, "decision:   undecided ({reason})")?;
                writeln!(out, "why:        {message}")?;
            }
        }
        Ok(())
    }
}

impl From<&PodInfo> for PodSummary {
    fn from(pod: &PodInfo) -> Self {
        Self {
            namespace: pod.key.namespace.to_string(),
            name: pod.key.name.to_string(),
            node: pod.node_name.as_deref().map(Into::into),
            ips: pod.ips.iter().collect(),
            phase: pod.phase.as_str(),
            host_network: pod.host_network,
            mirror: pod.mirror,
            service_account: pod.service_account.as_deref().map(Into::into),
        }
    }
}
