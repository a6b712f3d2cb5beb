//! Shutdown: SIGTERM or Ctrl-C starts it; every long-running task watches a [`Shutdown`] handle.

use tokio::sync::watch;

/// A cloneable "we are stopping" flag. Cheap to clone; `wait` resolves once shutdown has begun.
#[derive(Clone, Debug)]
pub struct Shutdown {
    receiver: watch::Receiver<bool>,
}

/// Starts shutdown for every [`Shutdown`] made from it.
#[derive(Debug)]
pub struct ShutdownTrigger {
    sender: watch::Sender<bool>,
}

impl Shutdown {
    pub fn new() -> (ShutdownTrigger, Shutdown) {
        let (sender, receiver) = watch::channel(false);
        (ShutdownTrigger { sender }, Shutdown { receiver })
    }

    pub fn is_triggered(&self) -> bool {
        *self.receiver.borrow()
    }

    /// Resolves when shutdown begins (or when the trigger is dropped, which means the same).
    pub async fn wait(&self) {
        let mut receiver = self.receiver.clone();
        let _ = receiver.wait_for(|stopping| *stopping).await;
    }
}

impl ShutdownTrigger {
    pub fn trigger(&self) {
        let _ = self.sender.send(true);
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("Ctrl-C received: shutting down"),
        () = terminate => tracing::info!("SIGTERM received: shutting down"),
    }
}

/// Runs a service until SIGTERM or Ctrl-C, then lets it stop for up to 9 s (the contract gives 10).
pub async fn run_until_signal<F>(service: impl FnOnce(Shutdown) -> F) -> anyhow::Result<()>
where
    F: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let (trigger, shutdown) = Shutdown::new();
    let running = tokio::spawn(service(shutdown));
    shutdown_signal().await;
    trigger.trigger();
    match tokio::time::timeout(std::time::Duration::from_secs(9), running).await {
        Ok(joined) => joined?,
        Err(_) => {
            tracing::warn!("shutdown took longer than 9 s; exiting anyway");
            Ok(())
        }
    }
}
