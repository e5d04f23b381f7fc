use std::time::Duration;

use podiam_common::arn::{BaseRoleArn, RoleArn};

use super::namespace::NamespaceIndex;
use super::*;
use crate::pods::{PodAnnotations, PodInfo, PodKey, PodPhase};

const ACCOUNT: &str = "123456789012";

fn base() -> BaseRoleArn {
    format!("arn:aws:iam::{ACCOUNT}:role/").parse().unwrap()
}

fn arn(name: &str) -> String {
    format!("arn:aws:iam::{ACCOUNT}:role/{name}")
}

fn config() -> PolicyConfig {
    PolicyConfig {
        base_role_arn: Some(base()),
        default_role: None,
        allow_mirror_pods: false,
    }
}

fn mk_pod(role: Option<&str>) -> PodInfo {
    PodInfo {
        key: PodKey {
            namespace: "team-a".into(),
            name: "web-0".into(),
        },
        uid: None,
        node_name: Some("node-a".into()),
        service_account: Some("default".into()),
        ips: ["10.0.0.1".parse().unwrap()].into_iter().collect(),
        host_network: false,
        mirror: false,
        phase: PodPhase::Running,
        annotations: PodAnnotations {
            role: role.map(Into::into),
            ..Default::default()
        },
        pod_identity: false,
    }
}

/// Decides for a pod in `team-a` whose namespace carries the given annotations.
fn decide_with(
    pod: &PodInfo,
    permitted: Option<&str>,
    allowed: Option<&str>,
    cfg: &PolicyConfig,
) -> Decision {
    let mut idx = NamespaceIndex::new(cfg.base_role_arn.clone());
    idx.apply("team-a", permitted, allowed);
    Decision::for_pod(pod, idx.get("team-a").as_deref(), cfg)
}

fn allowed_role(d: &Decision) -> &str {
    match d {
        Decision::Allowed(g) => g.role_arn.as_str(),
        Decision::Denied(d) => panic!("denied: {d}"),
    }
}

fn denial(d: Decision) -> Denial {
    match d {
        Decision::Denied(d) => d,
        Decision::Allowed(g) => panic!("allowed: {g:?}"),
    }
}

#[test]
fn no_role_and_no_default_is_denied() {
    let d = denial(decide_with(&mk_pod(None), Some(".*"), None, &config()));
    assert_eq!(d, Denial::NoRole);
    assert_eq!(d.code(), "no_role");
    // An empty annotation is no annotation.
    let d = denial(decide_with(
        &mk_pod(Some("  ")),
        Some(".*"),
        None,
        &config(),
    ));
    assert_eq!(d, Denial::NoRole);
}

#[test]
fn role_forms_resolve_against_the_base() {
    for (annotation, want) in [
        ("web", arn("web")),
        ("team/web", arn("team/web")),
        ("/team/web", arn("team/web")),
        (arn("web").as_str(), arn("web")),
    ] {
        let d = decide_with(&mk_pod(Some(annotation)), Some(".*"), None, &config());
        assert_eq!(allowed_role(&d), want, "{annotation}");
        assert_eq!(d.allowed().unwrap().role_source, RoleSource::Annotation);
    }
}

#[test]
fn invalid_role_is_denied_with_the_parser_reason() {
    let d = denial(decide_with(
        &mk_pod(Some("a b")),
        Some(".*"),
        None,
        &config(),
    ));
    assert_eq!(d.code(), "invalid_role");
    assert!(d.to_string().contains("role name"), "{d}");
    let no_base = PolicyConfig::default();
    let d = denial(decide_with(
        &mk_pod(Some("web")),
        Some(".*"),
        None,
        &no_base,
    ));
    assert!(matches!(
        d,
        Denial::InvalidRole {
            source: podiam_common::arn::ArnError::NoBase(_),
            ..
        }
    ));
}

#[test]
fn unknown_namespace_is_denied() {
    let d = denial(Decision::for_pod(&mk_pod(Some("web")), None, &config()));
    assert_eq!(d.code(), "namespace_not_found");
}

#[test]
fn namespace_without_policy_permits_nothing() {
    let d = denial(decide_with(&mk_pod(Some("web")), None, None, &config()));
    assert_eq!(d.code(), "namespace_no_policy");
    assert!(d.to_string().contains("permits no role"), "{d}");
}

#[test]
fn kiam_permitted_regex_is_anchored_on_the_full_arn() {
    let pod = |r| mk_pod(Some(r));
    let permitted = format!("arn:aws:iam::{ACCOUNT}:role/web");
    assert_eq!(
        allowed_role(&decide_with(&pod("web"), Some(&permitted), None, &config())),
        arn("web")
    );
    // Anchored at the end: `web` does not permit `web-admin`.
    let d = denial(decide_with(
        &pod("web-admin"),
        Some(&permitted),
        None,
        &config(),
    ));
    assert_eq!(d.code(), "role_not_permitted");
    // Anchored at the start: a regex for another account's suffix does not match.
    let d = denial(decide_with(&pod("web"), Some("role/web"), None, &config()));
    assert_eq!(d.code(), "role_not_permitted");
    // Alternation is grouped before anchoring: `^(?:a|b)$`, not `^a|b$`.
    let alt = format!("{}|nothing", arn("db"));
    let d = denial(decide_with(
        &pod("web-nothing"),
        Some(&alt),
        None,
        &config(),
    ));
    assert_eq!(d.code(), "role_not_permitted");
    assert_eq!(
        allowed_role(&decide_with(&pod("db"), Some(&alt), None, &config())),
        arn("db")
    );
    // A real regex.
    let re = r"arn:aws:iam::\d{12}:role/team-a-.*";
    assert_eq!(
        allowed_role(&decide_with(&pod("team-a-x"), Some(re), None, &config())),
        arn("team-a-x")
    );
}

#[test]
fn kiam_regex_written_for_names_gets_a_hint() {
    let d = denial(decide_with(
        &mk_pod(Some("web")),
        Some("web|db"),
        None,
        &config(),
    ));
    assert_eq!(d.code(), "role_not_permitted");
    let msg = d.to_string();
    assert!(msg.contains("matches the role name"), "{msg}");
    assert!(msg.contains("arn:aws:iam::123456789012:role/"), "{msg}");
}

#[test]
fn kube2iam_allowed_roles_globs() {
    let cfg = config();
    let pod = |r| mk_pod(Some(r));
    let list = format!(
        r#"["web", "batch-*", "{}"]"#,
        "arn:aws:iam::999999999999:role/x/*"
    );
    for ok in [
        "web",
        "batch-1",
        "batch-",
        "arn:aws:iam::999999999999:role/x/y/z",
    ] {
        let d = decide_with(&pod(ok), None, Some(&list), &cfg);
        assert!(d.allowed().is_some(), "{ok}: {d:?}");
    }
    for no in ["web2", "webbatch-1", "arn:aws:iam::999999999999:role/y"] {
        let d = denial(decide_with(&pod(no), None, Some(&list), &cfg));
        assert_eq!(d.code(), "role_not_permitted", "{no}");
    }
    // Only `*` is special: `.` is literal.
    let d = denial(decide_with(
        &pod("webxapp"),
        None,
        Some(r#"["web.app"]"#),
        &cfg,
    ));
    assert_eq!(d.code(), "role_not_permitted");
    // `*` alone means every role under the base.
    assert!(
        decide_with(&pod("anything"), None, Some(r#"["*"]"#), &cfg)
            .allowed()
            .is_some()
    );
    let other = "arn:aws:iam::999999999999:role/anything";
    let d = denial(decide_with(&pod(other), None, Some(r#"["*"]"#), &cfg));
    assert_eq!(d.code(), "role_not_permitted");
}

#[test]
fn either_annotation_may_permit() {
    let re = arn("a");
    let list = r#"["b"]"#;
    for role in ["a", "b"] {
        let d = decide_with(&mk_pod(Some(role)), Some(&re), Some(list), &config());
        assert!(d.allowed().is_some(), "{role}");
    }
    let d = denial(decide_with(
        &mk_pod(Some("c")),
        Some(&re),
        Some(list),
        &config(),
    ));
    let msg = d.to_string();
    assert!(
        msg.contains("iam.amazonaws.com/permitted") && msg.contains("allowed-roles"),
        "{msg}"
    );
}

#[test]
fn malformed_policies_deny_with_the_reason() {
    let cfg = config();
    let pod = mk_pod(Some("web"));
    let cases: &[(Option<&str>, Option<&str>, &str)] = &[
        (Some("web("), None, "not a valid regular expression"),
        (None, Some("web"), "JSON list"),
        (None, Some(r#"{"web": true}"#), "JSON list"),
        (None, Some(r#"["web", 3]"#), "JSON list"),
        // Malformed denies even though the other annotation would permit.
        (Some(".*"), Some("[web"), "JSON list"),
        (Some("(("), Some(r#"["web"]"#), "regular expression"),
    ];
    for (permitted, allowed, want) in cases {
        let d = denial(decide_with(&pod, *permitted, *allowed, &cfg));
        assert_eq!(
            d.code(),
            "namespace_policy_invalid",
            "{permitted:?} {allowed:?}"
        );
        assert!(d.to_string().contains(want), "{d}");
    }
    // Bare names need a base ARN.
    let no_base = PolicyConfig::default();
    let full = mk_pod(Some(&arn("web")));
    let d = denial(decide_with(&full, None, Some(r#"["web"]"#), &no_base));
    assert!(d.to_string().contains("--base-role-arn"), "{d}");
    // A regex too large to compile is refused, not compiled without bound.
    let huge = "a{1000}{1000}";
    let d = denial(decide_with(&pod, Some(huge), None, &cfg));
    assert_eq!(d.code(), "namespace_policy_invalid");
}

#[test]
fn default_role_is_subject_to_the_namespace_policy() {
    let cfg = PolicyConfig {
        default_role: Some(RoleArn::parse(&arn("default")).unwrap()),
        ..config()
    };
    let d = decide_with(&mk_pod(None), Some(&arn("default")), None, &cfg);
    assert_eq!(allowed_role(&d), arn("default"));
    assert_eq!(d.allowed().unwrap().role_source, RoleSource::Default);
    let d = denial(decide_with(&mk_pod(None), Some(&arn("web")), None, &cfg));
    assert_eq!(d.code(), "role_not_permitted");
    let d = denial(decide_with(&mk_pod(None), None, None, &cfg));
    assert_eq!(d.code(), "namespace_no_policy");
}

fn with_session(f: impl FnOnce(&mut PodAnnotations)) -> Decision {
    let mut pod = mk_pod(Some("web"));
    f(&mut pod.annotations);
    decide_with(&pod, Some(".*"), None, &config())
}

#[test]
fn session_annotations_are_carried() {
    let d = with_session(|a| {
        a.external_id = Some("ext-123".into());
        a.session_name = Some("my.session@x".into());
        a.session_duration = Some("1h".into());
    });
    let g = d.allowed().unwrap();
    assert_eq!(g.external_id.as_deref(), Some("ext-123"));
    assert_eq!(g.session_name.as_deref(), Some("team-a.my.session@x"));
    assert_eq!(g.session_duration, Some(Duration::from_secs(3600)));
    let g = with_session(|_| {});
    let g = g.allowed().unwrap();
    assert!(g.external_id.is_none() && g.session_name.is_none() && g.session_duration.is_none());
}

#[test]
fn session_durations() {
    for (value, secs) in [
        ("3600", 3600),
        ("3600s", 3600),
        ("90m", 5400),
        ("1h30m", 5400),
        ("30m", 1800),
        ("12h", 43200),
        ("1.5h", 5400),
    ] {
        let d = with_session(|a| a.session_duration = Some(value.into()));
        assert_eq!(
            d.allowed().unwrap().session_duration,
            Some(Duration::from_secs(secs)),
            "{value}"
        );
    }
    for bad in ["899", "15m", "29m", "13h", "soon", "-1"] {
        let d = denial(with_session(|a| a.session_duration = Some(bad.into())));
        assert_eq!(d.code(), "invalid_annotation", "{bad}");
        assert!(d.to_string().contains("session-duration"), "{d}");
    }
}

#[test]
fn session_names_and_external_ids_follow_sts_rules() {
    for bad in ["x", "has space", "semi;colon", &"n".repeat(65)] {
        let d = denial(with_session(|a| a.session_name = Some(bad.into())));
        assert!(d.to_string().contains("session-name"), "{d}");
    }
    for bad in ["x", "has space", &"e".repeat(1225)] {
        let d = denial(with_session(|a| a.external_id = Some(bad.into())));
        assert!(d.to_string().contains("external-id"), "{d}");
    }
    let ok = with_session(|a| a.external_id = Some("urn:ext/id:1".into()));
    assert!(ok.allowed().is_some());
}

#[test]
fn namespaces_with_the_same_policy_share_one_compiled_policy() {
    let mut idx = NamespaceIndex::new(Some(base()));
    for i in 0..100 {
        idx.apply(&format!("ns-{i}"), Some(".*"), None);
    }
    idx.apply("other", Some("x"), None);
    assert_eq!(idx.len(), 101);
    // Checking every namespace compiles each distinct policy once.
    let role = RoleArn::parse(&arn("web")).unwrap();
    for i in 0..100 {
        assert!(
            idx.get(&format!("ns-{i}"))
                .unwrap()
                .policy
                .check(&role)
                .is_ok()
        );
    }
    assert!(idx.get("other").unwrap().policy.check(&role).is_err());
    assert_eq!(idx.policies(), 2);
    // Changing a namespace's annotation takes effect.
    idx.apply("ns-1", Some(&arn("only")), None);
    let pod = mk_pod(Some("web"));
    let d = Decision::for_pod(&pod, idx.get("ns-1").as_deref(), &config());
    assert!(matches!(d, Decision::Denied(_)));
}

#[test]
fn compiled_policies_are_bounded_and_evicted_ones_still_decide() {
    let mut idx = NamespaceIndex::new(Some(base()));
    for i in 0..1500 {
        idx.apply(&format!("ns-{i}"), Some(&arn(&format!("app-{i}"))), None);
    }
    let role = |i: usize| RoleArn::parse(&arn(&format!("app-{i}"))).unwrap();
    for i in 0..1500 {
        let policy = &idx.get(&format!("ns-{i}")).unwrap().policy;
        assert!(policy.check(&role(i)).is_ok());
        assert!(policy.check(&role(i + 1)).is_err());
    }
    assert!(idx.policies() <= 1024, "{}", idx.policies());
    // The first namespaces' policies were evicted; they compile again and decide the same.
    let first = &idx.get("ns-0").unwrap().policy;
    assert!(first.check(&role(0)).is_ok());
    assert!(first.check(&role(1)).is_err());
}

#[test]
fn permitted_regex_cannot_escape_its_anchors() {
    // Wrapped as text, each of these closed the anchoring group and permitted any role in
    // any account. A pattern must be a whole expression on its own before it is anchored.
    let other_account = mk_pod(Some(
        "arn:aws:iam::999999999999:role/OrganizationAccountAccessRole",
    ));
    for escape in [
        "arn:aws:iam::123456789012:role/team-a-x)|(.*",
        "arn:aws:iam::123456789012:role/team-a-x)|(?:.*",
        "arn:aws:iam::123456789012:role/team-a-.*)|(.*999999999999.*",
        ".*)$|^(.*",
        "[)]|(.*",
        "(?x)arn:aws:iam::123456789012:role/team-a-.* #",
    ] {
        let d = denial(decide_with(&other_account, Some(escape), None, &config()));
        assert_eq!(d.code(), "namespace_policy_invalid", "{escape}");
        assert!(
            d.to_string().contains("not a valid regular expression"),
            "{escape}: {d}"
        );
        // The namespace's own roles are refused too: an invalid policy permits nothing.
        let own = denial(decide_with(
            &mk_pod(Some("team-a-web")),
            Some(escape),
            None,
            &config(),
        ));
        assert_eq!(own.code(), "namespace_policy_invalid", "{escape}");
    }
}

#[test]
fn session_names_cannot_impersonate_another_namespace() {
    // The pod is in team-a; without the prefix, CloudTrail and IAM conditions on the
    // session name would see kube-system's autoscaler.
    for (annotation, want) in [
        (
            "kube-system.cluster-autoscaler",
            "team-a.kube-system.cluster-autoscaler",
        ),
        ("podiam-web", "team-a.podiam-web"),
        ("batch", "team-a.batch"),
        // Already the namespace's own: kept as written.
        ("team-a.batch", "team-a.batch"),
        // A longer namespace that starts with the same letters is another namespace.
        ("team-ab.batch", "team-a.team-ab.batch"),
    ] {
        let d = with_session(|a| a.session_name = Some(annotation.into()));
        let g = d.allowed().unwrap();
        assert_eq!(g.session_name.as_deref(), Some(want), "{annotation}");
    }
}

#[test]
fn mirror_pods_get_nothing_unless_allowed() {
    let mut pod = mk_pod(Some("web"));
    pod.mirror = true;
    let d = denial(decide_with(&pod, Some(".*"), None, &config()));
    assert_eq!(d, Denial::MirrorPod);
    assert_eq!(d.code(), "mirror_pod");
    assert!(d.to_string().contains("--allow-mirror-pods"), "{d}");
    // Even with a default role and a permissive namespace.
    let cfg = PolicyConfig {
        default_role: Some(RoleArn::parse(&arn("default")).unwrap()),
        ..config()
    };
    pod.annotations.role = None;
    assert_eq!(
        denial(decide_with(&pod, Some(".*"), None, &cfg)),
        Denial::MirrorPod
    );
    // Opted in: a mirror pod is decided like any other, namespace policy included.
    let allow = PolicyConfig {
        allow_mirror_pods: true,
        ..config()
    };
    pod.annotations.role = Some("web".into());
    assert_eq!(
        allowed_role(&decide_with(&pod, Some(".*"), None, &allow)),
        arn("web")
    );
    let d = denial(decide_with(&pod, Some(&arn("other")), None, &allow));
    assert_eq!(d.code(), "role_not_permitted");
}
