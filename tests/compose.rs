//! `docker-compose.yml` against the binaries: every variable a service is given there is one the binary reads
//! (nothing misspelled, nothing silently ignored), and the binary accepts the whole environment as it stands
//! (every required setting present, every value well-formed). CI checks separately that Compose itself reads the
//! file (`docker-compose config`).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use kiroku_platform::config::{ConfigError, Setting};

/// Each service's `environment:` in the compose file, by service. The file is ours and regular: a service at two
/// spaces, `environment:` at four, its variables at six.
fn compose_environments() -> BTreeMap<String, BTreeMap<String, String>> {
    let text = std::fs::read_to_string("docker-compose.yml").unwrap();
    let mut services = BTreeMap::new();
    let (mut service, mut in_environment) = (None::<String>, false);
    for line in text.lines() {
        let indent = line.len() - line.trim_start().len();
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        match indent {
            0 => (service, in_environment) = (None, false),
            2 => (service, in_environment) = (trimmed.strip_suffix(':').map(str::to_owned), false),
            4 => in_environment = trimmed == "environment:",
            6 if in_environment => {
                let (name, value) = trimmed.split_once(": ").unwrap();
                let value = value.trim_matches('"').to_owned();
                services.entry(service.clone().unwrap()).or_insert_with(BTreeMap::new).insert(name.to_owned(), value);
            }
            _ => {}
        }
    }
    services
}

/// A value as Compose would substitute it, with what an operator would set for the required ones.
fn substituted(value: &str) -> String {
    let Some(inner) = value.strip_prefix("${").and_then(|v| v.strip_suffix('}')) else { return value.to_owned() };
    let (name, rule) = inner.split_once(":").unwrap_or((inner, ""));
    if let Some(default) = rule.strip_prefix('-') {
        return default.to_owned();
    }
    match name {
        "KIROKU_MASTER_KEY" => kiroku_testkit::TEST_MASTER_KEY.to_owned(),
        "KIROKU_AUTH0_ISSUER" => "https://tenant.example/".to_owned(),
        "KIROKU_AUTH0_AUDIENCE" => "https://kiroku.example/users".to_owned(),
        "KIROKU_API_AUDIENCE" => "https://kiroku.example/callers".to_owned(),
        other => panic!("the test does not know what an operator sets for {other}"),
    }
}

fn check(
    service: &str,
    environment: &BTreeMap<String, String>,
    settings: &[Setting],
    accept: impl Fn(&dyn kiroku_platform::config::Source) -> Result<(), ConfigError>,
) {
    for name in environment.keys() {
        assert!(settings.iter().any(|s| s.name == name), "{service}: {name} is set in compose but not read");
    }
    let values: BTreeMap<String, String> = environment.iter().map(|(k, v)| (k.clone(), substituted(v))).collect();
    let source = move |name: &str| values.get(name).cloned();
    if let Err(error) = accept(&source) {
        panic!("{service} refuses compose's environment: {error}");
    }
}

#[test]
fn every_services_environment_in_compose_is_one_its_binary_reads_and_accepts() {
    let services = compose_environments();
    check("command", &services["command"], kiroku_command::config::SETTINGS, |source| {
        kiroku_command::config::Settings::from_source(source).map(|_| ())
    });
    check("query", &services["query"], kiroku_query::config::SETTINGS, |source| {
        kiroku_query::config::Settings::from_source(source).map(|_| ())
    });
    check("projector", &services["projector"], kiroku_projector::config::SETTINGS, |source| {
        kiroku_projector::config::Settings::from_source(source).map(|_| ())
    });
    // `kiroku migrate` reads the database and the deployment's roles.
    let migrate = &services["migrate"];
    for name in migrate.keys() {
        assert!(
            ["DATABASE_URL", "KIROKU_DATABASE_ROLE_PREFIX"].contains(&name.as_str()),
            "migrate: {name} is set in compose but not read"
        );
    }
}
