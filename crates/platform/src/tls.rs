//! TLS for kiroku's gRPC servers (rustls with ring): `KIROKU_TLS_CERT` and `KIROKU_TLS_KEY` (PEM), and with
//! `KIROKU_TLS_CLIENT_CA` client certificates signed by that CA are required (mTLS). The certificate and key are
//! read again when their files change (checked every two seconds), so a renewed certificate needs no restart; a
//! pair that does not load keeps the previous one, and says so.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

use crate::Shutdown;

/// Where a server's certificate, key and (for mTLS) client CA are.
#[derive(Clone, Debug)]
pub struct TlsSettings {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn load(cert: &Path, key: &Path, provider: &CryptoProvider) -> Result<CertifiedKey> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("read {}", cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("parse the certificates of {}", cert.display()))?;
    anyhow::ensure!(!chain.is_empty(), "{} holds no certificate", cert.display());
    let key = PrivateKeyDer::from_pem_file(key).with_context(|| format!("read the key in {}", key.display()))?;
    CertifiedKey::from_der(chain, key, provider).context("the key does not match the certificate")
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// The current certificate, swapped when its files change.
#[derive(Debug)]
struct Reloading {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().map(|key| key.clone())
    }
}

/// A TLS acceptor for `settings`, its certificate reloaded in the background until `shutdown`. Fails (at
/// start-up) when the files do not load.
pub fn acceptor(settings: &TlsSettings, shutdown: Shutdown) -> Result<TlsAcceptor> {
    let provider = provider();
    let reloading =
        Arc::new(Reloading { current: RwLock::new(Arc::new(load(&settings.cert, &settings.key, &provider)?)) });
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("choose TLS versions")?;
    let builder = match &settings.client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(ca).with_context(|| format!("read {}", ca.display()))? {
                roots.add(cert.with_context(|| format!("parse {}", ca.display()))?).context("add a client CA")?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .context("build the client certificate verifier")?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(reloading.clone());
    config.alpn_protocols = vec![b"h2".to_vec()];

    let (cert, key) = (settings.cert.clone(), settings.key.clone());
    tokio::spawn(async move {
        let mut seen = (modified(&cert), modified(&key));
        loop {
            tokio::select! {
                () = shutdown.wait() => return,
                () = tokio::time::sleep(Duration::from_secs(2)) => {}
            }
            let now = (modified(&cert), modified(&key));
            if now == seen {
                continue;
            }
            seen = now;
            match load(&cert, &key, &provider) {
                Ok(fresh) => {
                    if let Ok(mut current) = reloading.current.write() {
                        *current = Arc::new(fresh);
                    }
                    tracing::info!(cert = %cert.display(), "TLS certificate reloaded");
                }
                Err(error) => tracing::warn!(
                    error = format!("{error:#}"),
                    "TLS certificate not reloaded; keeping the previous one"
                ),
            }
        }
    });
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The TLS connections of `listener`: each handshake runs on its own (a slow client delays no one), and one that
/// fails or takes longer than ten seconds is dropped.
pub fn incoming(listener: TcpListener, acceptor: TlsAcceptor) -> ReceiverStream<std::io::Result<TlsStream<TcpStream>>> {
    let (sender, receiver) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                () = sender.closed() => return,
                accepted = listener.accept() => accepted,
            };
            let (tcp, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: pause rather than spin.
                    tracing::debug!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let (acceptor, connections) = (acceptor.clone(), sender.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = connections.send(Ok(tls)).await;
                    }
                    Ok(Err(error)) => tracing::debug!(%peer, %error, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(receiver)
}
