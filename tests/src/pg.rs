//! A private PostgreSQL cluster for tests and the dev stack: the system's `initdb`,
//! `pg_ctl` and `postgres` binaries, a data directory in a fresh temp dir, a free
//! loopback port, trust auth for the `postgres` superuser. Stopped (immediate mode) and
//! deleted on drop, so a failed test leaves nothing running.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub struct TestPostgres {
    /// Holds data/, the socket dir and the server log; removed on drop.
    root: PathBuf,
    port: u16,
    bin_dir: PathBuf,
    /// uid/gid the server runs as when we are root (Postgres refuses to run as root).
    owner: Option<(u32, u32)>,
    running: bool,
    /// Extra ` -c name=value` server settings, kept for restarts.
    settings: String,
}

/// Finds the directory with `initdb`/`pg_ctl`: `PG_BIN` if set, then PATH, then
/// Debian's `/usr/lib/postgresql/<version>/bin` (newest first).
pub fn pg_bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if dir.join("initdb").is_file() && dir.join("pg_ctl").is_file() {
                return Ok(dir);
            }
        }
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    versions
        .into_iter()
        .rev()
        .find(|d| d.join("initdb").is_file())
        .context(
            "PostgreSQL binaries (initdb, pg_ctl) not found: run `make test`, which installs them",
        )
}

/// A free port on 127.0.0.1 for a server a test starts.
pub fn free_port() -> Result<u16> {
    // Ports are handed out below the kernel's ephemeral range (Linux: 32768-60999), where
    // neither `bind(0)` nor outgoing connections take them, so a port stays free between
    // this check and the server binding it. Each process starts at its own offset and
    // walks on, so parallel tests (and parallel test binaries) do not pick the same one.
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let seed = std::process::id().wrapping_mul(7_919) % SPAN;
    let _ = NEXT.compare_exchange(u32::MAX, seed, Ordering::Relaxed, Ordering::Relaxed);
    for _ in 0..SPAN {
        let port = FIRST + NEXT.fetch_add(1, Ordering::Relaxed) % SPAN;
        let port = u16::try_from(port).context("port out of range")?;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    // Every port of the range is in use: fall back to one the kernel picks.
    let listener = TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

fn unique_root() -> Result<PathBuf> {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "x402-pg-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn run(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

impl TestPostgres {
    /// initdb + start on a free port; waits (bounded) until it accepts connections.
    pub fn start() -> Result<TestPostgres> {
        Self::start_with_settings(&[])
    }

    /// Like [`Self::start`], with extra server settings (`name=value`, passed as `-c`),
    /// e.g. to preload `pg_stat_statements` for a profiling run.
    pub fn start_with_settings(settings: &[&str]) -> Result<TestPostgres> {
        let bin_dir = pg_bin_dir()?;
        let root = unique_root()?;
        let data = root.join("data");
        let owner = server_user()?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&root, Some(uid), Some(gid))?;
        }
        let mut initdb = pg_command(&bin_dir.join("initdb"), owner);
        initdb.arg("-D").arg(&data).args([
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        ]);
        run(&mut initdb, "initdb")?;
        let mut pg = TestPostgres {
            root,
            port: free_port()?,
            bin_dir,
            owner,
            running: false,
            settings: settings.iter().map(|s| format!(" -c {s}")).collect(),
        };
        pg.start_again()?;
        Ok(pg)
    }

    fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// URL of the `postgres` database.
    pub fn url(&self) -> String {
        self.database_url("postgres")
    }

    pub fn database_url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates an empty database and returns its URL.
    pub fn create_database(&self, name: &str) -> Result<String> {
        let ok = name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') && !name.is_empty();
        if !ok {
            bail!("database name must be [A-Za-z0-9_]+: {name}");
        }
        let psql = self.bin_dir.join("psql");
        let psql = if psql.is_file() {
            psql
        } else {
            PathBuf::from("psql")
        };
        run(
            Command::new(psql)
                .args([
                    "-X",
                    "-q",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-h",
                    "127.0.0.1",
                    "-U",
                    "postgres",
                    "-p",
                ])
                .arg(self.port.to_string())
                .args(["-d", "postgres", "-c"])
                .arg(format!("CREATE DATABASE {name}")),
            "CREATE DATABASE",
        )?;
        Ok(self.database_url(name))
    }

    /// Stops the server (fast shutdown); the data stays for [`Self::start_again`].
    pub fn stop(&mut self) -> Result<()> {
        if self.running {
            run(
                pg_command(&self.bin_dir.join("pg_ctl"), self.owner)
                    .arg("-D")
                    .arg(self.data_dir())
                    .args(["-m", "fast", "-w", "-t", "30", "stop"]),
                "pg_ctl stop",
            )?;
            self.running = false;
        }
        Ok(())
    }

    /// Starts the (stopped) server again on the same port.
    pub fn start_again(&mut self) -> Result<()> {
        let opts = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {} -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200",
            self.port,
            self.root.display()
        ) + &self.settings;
        run(
            pg_command(&self.bin_dir.join("pg_ctl"), self.owner)
                .arg("-D")
                .arg(self.data_dir())
                .arg("-l")
                .arg(self.root.join("server.log"))
                .args(["-o", &opts, "-w", "-t", "60", "start"]),
            "pg_ctl start",
        )?;
        self.running = true;
        wait_for_port(self.port, Duration::from_secs(30))
    }

    pub fn log_path(&self) -> PathBuf {
        self.root.join("server.log")
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        if self.running {
            let _ = pg_command(&self.bin_dir.join("pg_ctl"), self.owner)
                .arg("-D")
                .arg(self.data_dir())
                .args(["-m", "immediate", "-w", "-t", "10", "stop"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn id_of(args: &[&str]) -> Result<u32> {
    let out = Command::new("id")
        .args(args)
        .output()
        .context("running id")?;
    if !out.status.success() {
        bail!("id {args:?} failed");
    }
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .context("parsing id output")
}

/// When running as root (CI does), the server runs as the `postgres` user if it exists,
/// else `nobody`: Postgres refuses to run as root.
fn server_user() -> Result<Option<(u32, u32)>> {
    if id_of(&["-u"])? != 0 {
        return Ok(None);
    }
    for user in ["postgres", "nobody"] {
        if let (Ok(uid), Ok(gid)) = (id_of(&["-u", user]), id_of(&["-g", user])) {
            return Ok(Some((uid, gid)));
        }
    }
    bail!("running as root and neither a `postgres` nor a `nobody` user exists to run PostgreSQL")
}

/// `bin` run directly, or through `setpriv` as `owner` when we are root.
fn pg_command(bin: &Path, owner: Option<(u32, u32)>) -> Command {
    match owner {
        None => Command::new(bin),
        Some((uid, gid)) => {
            let mut cmd = Command::new("setpriv");
            cmd.arg(format!("--reuid={uid}"))
                .arg(format!("--regid={gid}"))
                .arg("--clear-groups")
                .arg("--")
                .arg(bin);
            cmd
        }
    }
}

/// Waits (bounded) until something accepts TCP connections on 127.0.0.1:port.
pub fn wait_for_port(port: u16, limit: Duration) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("nothing listening on 127.0.0.1:{port} after {limit:?}")
}
