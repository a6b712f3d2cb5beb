//! The services' command lines: `--help` lists every setting with its environment variable and default, and an
//! argument they do not know stops them with exit code 64 before they touch anything.
#![allow(clippy::unwrap_used)]

use kiroku_platform::config::Setting;
use kiroku_testkit::binary_path;

async fn run(binary: &str, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(binary_path(binary)).args(args).env_clear().output().await.unwrap()
}

#[tokio::test]
async fn help_lists_every_environment_variable_with_its_default() {
    let services: [(&str, &[Setting]); 3] = [
        ("kiroku-command", kiroku_command::config::SETTINGS),
        ("kiroku-query", kiroku_query::config::SETTINGS),
        ("kiroku-projector", kiroku_projector::config::SETTINGS),
    ];
    for (binary, settings) in services {
        let output = run(binary, &["--help"]).await;
        assert!(output.status.success(), "{binary} --help: {:?}", output.status);
        let help = String::from_utf8(output.stdout).unwrap();
        for setting in settings {
            assert!(
                help.contains(&format!("[env: {}]", setting.name)),
                "{binary} --help lacks {}:\n{help}",
                setting.name
            );
            if let Some(default) = setting.default {
                assert!(help.contains(&format!("[default: {default}]")), "{binary} --help lacks {default}:\n{help}");
            }
        }
        for common in ["DATABASE_URL", "REDIS_URL", "KIROKU_REDIS_PREFIX", "KIROKU_MIGRATE", "RUST_LOG"] {
            assert!(help.contains(common), "{binary} --help lacks {common}");
        }
    }
}

#[tokio::test]
async fn an_unknown_argument_exits_64() {
    for binary in ["kiroku-command", "kiroku-query", "kiroku-projector", "kiroku"] {
        let output = run(binary, &["--no-such-flag"]).await;
        assert_eq!(output.status.code(), Some(64), "{binary}: {}", String::from_utf8_lossy(&output.stderr));
        assert!(String::from_utf8_lossy(&output.stderr).contains("--no-such-flag"));
    }
}

#[tokio::test]
async fn a_flag_sets_what_its_variable_would() {
    // A malformed address given as a flag is refused by name, like the same value in the environment.
    let output = run(
        "kiroku-query",
        &["--query-addr", "nowhere", "--database-url", "postgres://h/d", "--redis-url", "redis://h/0"],
    )
    .await;
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("KIROKU_QUERY_ADDR"), "{stderr}");
}

#[tokio::test]
async fn an_unknown_log_format_or_metrics_address_exits_64_naming_it() {
    let output = run("kiroku-projector", &["--log-format", "xml"]).await;
    assert_eq!(output.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&output.stderr).contains("KIROKU_LOG_FORMAT"));
    let output = run(
        "kiroku-projector",
        &["--metrics-addr", "everywhere", "--database-url", "postgres://h/d", "--redis-url", "redis://h/0"],
    )
    .await;
    assert_eq!(output.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&output.stderr).contains("KIROKU_METRICS_ADDR"));
}
