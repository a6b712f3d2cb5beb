//! Servers a test owns and may crash: a PostgreSQL cluster of its own (`initdb` + `pg_ctl` in a temporary
//! directory, on a free port) and a `redis-server` of its own, so that killing them never touches the shared
//! servers every other test uses.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::free_address;

/// A private PostgreSQL cluster, stopped and removed when dropped.
pub struct PrivatePostgres {
    dir: PathBuf,
    port: u16,
    /// More `-c name=value` options for `postgres` (TLS).
    options: String,
}

/// A PostgreSQL server tool: from `KIROKU_PG_BINDIR`, else from PATH, else from Debian's
/// `/usr/lib/postgresql/<version>/bin` (the newest version), where Debian keeps `initdb` and `pg_ctl` off PATH.
fn postgres_tool(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("KIROKU_PG_BINDIR") {
        return PathBuf::from(dir).join(name);
    }
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).map(|dir| dir.join(name)).find(|candidate| candidate.is_file()))
        .unwrap_or_default();
    if let Some(found) = on_path {
        return found;
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            Some((version, entry.path().join("bin").join(name)))
        })
        .filter(|(_, path)| path.is_file())
        .collect();
    versions.sort();
    versions.pop().map(|(_, path)| path).unwrap_or_else(|| PathBuf::from(name))
}

/// PostgreSQL refuses to run as root: as root, its tools run as the `postgres` user.
fn postgres_command(name: &str) -> Command {
    let program = postgres_tool(name);
    let is_root = Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    if is_root {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

fn run(mut command: Command, what: &str) -> Result<()> {
    let output = command.stdin(Stdio::null()).output().with_context(|| format!("run {what}"))?;
    if !output.status.success() {
        bail!("{what} failed: {}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    }
    Ok(())
}

impl PrivatePostgres {
    /// A fresh cluster (trust authentication, user `postgres`), started.
    pub fn start() -> Result<PrivatePostgres> {
        PrivatePostgres::start_with(|_| Ok(String::new()))
    }

    /// A fresh cluster that also accepts TLS, with this certificate and key (PEM).
    pub fn start_with_tls(cert: &str, key: &str) -> Result<PrivatePostgres> {
        PrivatePostgres::start_with(|dir| {
            let (cert_path, key_path) = (dir.join("server.crt"), dir.join("server.key"));
            std::fs::write(&cert_path, cert)?;
            std::fs::write(&key_path, key)?;
            // PostgreSQL refuses a key that others can read.
            for path in [&cert_path, &key_path] {
                let _ = Command::new("chown").arg("postgres").arg(path).stderr(Stdio::null()).status();
            }
            let _ = Command::new("chmod").arg("600").arg(&key_path).status();
            Ok(format!(" -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}", cert_path.display(), key_path.display()))
        })
    }

    fn start_with(options: impl FnOnce(&std::path::Path) -> Result<String>) -> Result<PrivatePostgres> {
        let dir = std::env::temp_dir().join(format!("kiroku-pg-{}", ulid::Ulid::new().to_string().to_lowercase()));
        std::fs::create_dir_all(&dir)?;
        // As root, the cluster's files belong to `postgres` (elsewhere this fails harmlessly: they are ours).
        let _ = Command::new("chown").arg("postgres").arg(&dir).stderr(Stdio::null()).status();
        let mut initdb = postgres_command("initdb");
        initdb.arg("-D").arg(dir.join("data")).args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"]);
        run(initdb, "initdb")?;
        let options = options(&dir)?;
        let postgres = PrivatePostgres { dir, port: free_address().port(), options };
        postgres.start_again()?;
        Ok(postgres)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of `database` on this cluster.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Starts the cluster (again), waiting until it accepts connections.
    pub fn start_again(&self) -> Result<()> {
        // No fsync: an immediate shutdown is a crash of PostgreSQL, not of the machine, and the WAL it wrote is
        // still in the OS's cache when it restarts and recovers. What the suite tests is PostgreSQL crashing.
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200{}",
            self.port,
            self.dir.display(),
            self.options
        );
        let mut pg_ctl = postgres_command("pg_ctl");
        pg_ctl.arg("-D").arg(self.dir.join("data")).args(["-o", &options, "-l"]).arg(self.dir.join("log"));
        pg_ctl.args(["-w", "-t", "60", "start"]);
        run(pg_ctl, "pg_ctl start")
    }

    /// `pg_ctl stop -m immediate`: every backend dies at once, nothing is flushed, recovery runs at the next start.
    pub fn crash(&self) -> Result<()> {
        let mut pg_ctl = postgres_command("pg_ctl");
        pg_ctl.arg("-D").arg(self.dir.join("data")).args(["-m", "immediate", "-w", "stop"]);
        run(pg_ctl, "pg_ctl stop -m immediate")
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self.crash();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A private `redis-server` (nothing saved to disk): killed, it comes back empty.
pub struct PrivateRedis {
    port: u16,
    child: Option<std::process::Child>,
    /// Certificate and key when it speaks TLS only.
    tls: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

impl PrivateRedis {
    pub fn start() -> Result<PrivateRedis> {
        let mut redis = PrivateRedis { port: free_address().port(), child: None, tls: None };
        redis.start_again()?;
        Ok(redis)
    }

    /// A Redis that speaks only TLS, with the PEM certificate and key at these paths (clients need no
    /// certificate of their own).
    pub fn start_with_tls(cert: &std::path::Path, key: &std::path::Path) -> Result<PrivateRedis> {
        let mut redis =
            PrivateRedis { port: free_address().port(), child: None, tls: Some((cert.to_owned(), key.to_owned())) };
        redis.start_again()?;
        Ok(redis)
    }

    pub fn url(&self, database: u8) -> String {
        format!("redis://127.0.0.1:{}/{database}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Starts it (again, empty), waiting until it answers.
    pub fn start_again(&mut self) -> Result<()> {
        let port = self.port.to_string();
        let mut command = Command::new("redis-server");
        command.args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]);
        match &self.tls {
            None => command.args(["--port", &port]),
            Some((cert, key)) => command
                .args(["--port", "0", "--tls-port", &port, "--tls-auth-clients", "no", "--tls-cert-file"])
                .arg(cert)
                .arg("--tls-key-file")
                .arg(key),
        };
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start redis-server")?;
        self.child = Some(child);
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("redis-server did not listen on {}", self.port)
    }

    /// SIGKILL: every connection drops, every key is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}
