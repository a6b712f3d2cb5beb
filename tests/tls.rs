//! Transport security: gRPC over TLS and mutual TLS with certificates this test makes (rcgen), a renewed
//! certificate picked up without a restart, plaintext refused off loopback unless asked for, PostgreSQL over
//! TLS (`sslmode=require`, `verify-full`) and Redis over TLS (`rediss://`).
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{CommandApp, Queries};
use kiroku::v1::ListUsersRequest;
use kiroku::v1::query_service_client::QueryServiceClient;
use kiroku_platform::{Shutdown, ShutdownTrigger};
use kiroku_testkit::{binary_path, with_caller};
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// A certificate authority, and leaves it signs.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

/// A PEM certificate and its PEM key.
struct Leaf {
    cert: String,
    key: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        Ca { cert: params.self_signed(&key).unwrap(), key }
    }

    fn pem(&self) -> String {
        self.cert.pem()
    }

    fn leaf(&self, names: &[&str], usage: ExtendedKeyUsagePurpose) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>()).unwrap();
        params.extended_key_usages = vec![usage];
        params.distinguished_name.push(DnType::CommonName, names.first().copied().unwrap_or("client"));
        Leaf { cert: params.signed_by(&key, &self.cert, &self.key).unwrap().pem(), key: key.serialize_pem() }
    }
}

fn write(dir: &Path, name: &str, pem: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, pem).unwrap();
    path
}

/// The query service of `app`, serving with `extra` settings (TLS), and how to stop it.
async fn start_query(app: &CommandApp, extra: &[(&str, &str)]) -> (std::net::SocketAddr, ShutdownTrigger) {
    let env = app.env(extra);
    let source = move |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let settings = kiroku_query::config::Settings::from_source(&source).unwrap();
    let query = kiroku_query::Application::build(settings).await.unwrap();
    let address = query.local_addr();
    let (trigger, shutdown) = Shutdown::new();
    tokio::spawn(query.run_until_stopped(shutdown));
    (address, trigger)
}

/// A client of `address` over TLS trusting `ca`, presenting `identity` when given.
async fn tls_client(
    app: &CommandApp,
    address: std::net::SocketAddr,
    ca: &str,
    identity: Option<&Leaf>,
) -> Result<Queries, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)).domain_name("localhost");
    if let Some(leaf) = identity {
        tls = tls.identity(Identity::from_pem(&leaf.cert, &leaf.key));
    }
    let channel = Channel::from_shared(format!("https://localhost:{}", address.port()))
        .unwrap()
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?;
    Ok(QueryServiceClient::new(with_caller(channel, &app.caller_token(&kiroku::permissions::ALL))))
}

#[tokio::test]
async fn grpc_over_mutual_tls_refuses_clients_without_a_certificate_and_reloads_a_renewed_one() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let app = CommandApp::spawn().await;
    let dir = tempdir();
    let (servers, clients) = (Ca::new("kiroku servers"), Ca::new("kiroku clients"));
    let server = servers.leaf(&["localhost", "127.0.0.1"], ExtendedKeyUsagePurpose::ServerAuth);
    let cert = write(&dir, "server.pem", &server.cert);
    let key = write(&dir, "server.key", &server.key);
    let client_ca = write(&dir, "clients.pem", &clients.pem());
    let (address, stop) = start_query(
        &app,
        &[
            ("KIROKU_TLS_CERT", cert.to_str().unwrap()),
            ("KIROKU_TLS_KEY", key.to_str().unwrap()),
            ("KIROKU_TLS_CLIENT_CA", client_ca.to_str().unwrap()),
        ],
    )
    .await;

    // A client with a certificate of the clients' CA is served.
    let client = clients.leaf(&["billing-service"], ExtendedKeyUsagePurpose::ClientAuth);
    let mut served = tls_client(&app, address, &servers.pem(), Some(&client)).await.unwrap();
    served.list_users(ListUsersRequest::default()).await.unwrap();
    // Without one, or in plaintext, nothing gets through.
    let refused = match tls_client(&app, address, &servers.pem(), None).await {
        Err(_) => true,
        Ok(mut anonymous) => anonymous.list_users(ListUsersRequest::default()).await.is_err(),
    };
    assert!(refused, "a client without a certificate is refused");
    let plaintext = Channel::from_shared(format!("http://{address}")).unwrap().connect_timeout(Duration::from_secs(2));
    let plain = match plaintext.connect().await {
        Err(_) => true,
        Ok(channel) => QueryServiceClient::new(channel).list_users(ListUsersRequest::default()).await.is_err(),
    };
    assert!(plain, "plaintext is refused on a TLS port");

    // The certificate is renewed, by another CA: new connections get it without a restart.
    let renewed_by = Ca::new("kiroku servers 2027");
    let renewed = renewed_by.leaf(&["localhost"], ExtendedKeyUsagePurpose::ServerAuth);
    write(&dir, "server.key", &renewed.key);
    write(&dir, "server.pem", &renewed.cert);
    kiroku_testkit::eventually(Duration::from_secs(20), "the renewed certificate served", || async {
        Ok(match tls_client(&app, address, &renewed_by.pem(), Some(&client)).await {
            Ok(mut client) => client.list_users(ListUsersRequest::default()).await.ok().map(|_| ()),
            Err(_) => None,
        })
    })
    .await
    .unwrap();
    stop.trigger();
    app.stop().await;
}

fn tempdir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiroku-tls-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test]
async fn plaintext_off_loopback_and_unusable_tls_settings_stop_a_service_with_exit_64() {
    let base = [
        ("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/x"),
        ("REDIS_URL", "redis://127.0.0.1:6379/0"),
        ("KIROKU_AUTH0_ISSUER", "https://tenant.auth0.com/"),
        ("KIROKU_API_AUDIENCE", "kiroku-api"),
        ("KIROKU_MASTER_KEY", kiroku_testkit::TEST_MASTER_KEY),
    ];
    let run = |extra: &'static [(&'static str, &'static str)]| async move {
        let output = tokio::process::Command::new(binary_path("kiroku-query"))
            .env_clear()
            .envs(base.iter().chain(extra).copied())
            .output()
            .await
            .unwrap();
        (output.status.code(), String::from_utf8_lossy(&output.stderr).into_owned())
    };
    let (code, stderr) = run(&[("KIROKU_QUERY_ADDR", "0.0.0.0:0")]).await;
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("KIROKU_QUERY_ADDR") && stderr.contains("KIROKU_ALLOW_PLAINTEXT"), "{stderr}");
    let (code, stderr) =
        run(&[("KIROKU_TLS_CERT", "/nonexistent/cert.pem"), ("KIROKU_TLS_KEY", "/nonexistent/k")]).await;
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("KIROKU_TLS_CERT"), "{stderr}");
    let (code, stderr) = run(&[("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/x?sslmode=sometimes")]).await;
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("DATABASE_URL") && !stderr.contains("sometimes"), "{stderr}");
}

#[tokio::test]
async fn postgresql_over_tls_is_honoured() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca = Ca::new("postgres");
    let server = ca.leaf(&["localhost"], ExtendedKeyUsagePurpose::ServerAuth);
    let postgres = kiroku_testkit::PrivatePostgres::start_with_tls(&server.cert, &server.key).unwrap();
    let dir = tempdir();
    let root = write(&dir, "root.pem", &ca.pem());
    for url in [
        format!("postgres://postgres@localhost:{}/postgres?sslmode=require", postgres.port()),
        format!(
            "postgres://postgres@localhost:{}/postgres?sslmode=verify-full&sslrootcert={}",
            postgres.port(),
            root.display()
        ),
    ] {
        let pool = kiroku_platform::connect_postgres(&url, 1).await.unwrap();
        let tls: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert!(tls, "{url}: the connection is encrypted");
    }
}

#[tokio::test]
async fn redis_over_tls_is_honoured() {
    let app = CommandApp::spawn().await;
    let ca = Ca::new("redis");
    let server = ca.leaf(&["localhost"], ExtendedKeyUsagePurpose::ServerAuth);
    let dir = tempdir();
    let (cert, key, root) = (
        write(&dir, "redis.pem", &server.cert),
        write(&dir, "redis.key", &server.key),
        write(&dir, "ca.pem", &ca.pem()),
    );
    // This Redis answers on TLS only: a service whose health is SERVING has pinged it over TLS.
    let redis = kiroku_testkit::PrivateRedis::start_with_tls(&cert, &key).unwrap();
    let address = kiroku_testkit::free_address();
    let url = format!("rediss://localhost:{}/0", redis.port());
    let mut env = app.env(&[("REDIS_URL", &url), ("KIROKU_QUERY_ADDR", &address.to_string())]);
    // The system's trust store, pointed at the test's CA the standard way.
    env.push(("SSL_CERT_FILE".to_owned(), root.display().to_string()));
    let _query = tokio::process::Command::new(binary_path("kiroku-query"))
        .env_clear()
        .envs(env)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    kiroku_testkit::eventually(Duration::from_secs(30), "the query service SERVING over rediss://", || async {
        let Ok(channel) = Channel::from_shared(format!("http://{address}")).unwrap().connect().await else {
            return Ok(None);
        };
        let status = tonic_health::pb::health_client::HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
            .await
            .map(|r| r.into_inner().status);
        Ok((status.ok() == Some(tonic_health::pb::health_check_response::ServingStatus::Serving as i32)).then_some(()))
    })
    .await
    .unwrap();
    app.stop().await;
}
