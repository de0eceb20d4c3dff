//! Real parts on loopback for the several-replica tests: `redis-server` (single or a 3-node
//! cluster), HAProxy (Debian's) round-robin in front of real `maestra serve` processes, and
//! PgBouncer in transaction mode. Each test starts its own on free ports with generated
//! configuration in a temporary folder, and stops them by their process id.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .args([format!("-{name}"), child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{name} {}", child.id());
}

fn wait_until(what: &str, limit: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ready() {
        assert!(Instant::now() < deadline, "{what} did not come up");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether a Redis on `port` answers PING.
fn redis_answers(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut reply = [0u8; 7];
    stream.read_exact(&mut reply).is_ok() && &reply == b"+PONG\r\n"
}

/// One `redis-server`, no persistence, on its own port and folder.
pub struct Redis {
    pub port: u16,
    dir: TempDir,
    extra: Vec<String>,
    child: Option<Child>,
}

impl Redis {
    pub fn start() -> Redis {
        Self::start_with(Vec::new())
    }

    fn start_with(extra: Vec<String>) -> Redis {
        let mut redis = Redis {
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            extra,
            child: None,
        };
        redis.spawn();
        redis
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (Debian's redis-server)");
        self.child = Some(child);
        let port = self.port;
        wait_until("redis-server", Duration::from_secs(10), || {
            redis_answers(port)
        });
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn child(&self) -> &Child {
        self.child.as_ref().expect("redis-server is running")
    }

    /// SIGSTOP: the socket stays open and nothing answers (a hung Redis).
    pub fn freeze(&self) {
        signal(self.child(), "STOP");
    }

    /// SIGKILL, even while frozen: connections drop, state is lost.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A fresh Redis on the same port (empty: nothing was saved).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            let _ = Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
        }
        self.kill();
    }
}

/// A Redis Cluster of three masters (no replicas), made with `redis-cli --cluster create`.
pub struct RedisCluster {
    pub nodes: Vec<Redis>,
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        let nodes: Vec<Redis> = (0..3)
            .map(|_| {
                Redis::start_with(
                    [
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                    ]
                    .map(str::to_owned)
                    .to_vec(),
                )
            })
            .collect();
        let addresses: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .unwrap();
        assert!(
            created.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&created.stdout)
        );
        for node in &nodes {
            let port = node.port.to_string();
            wait_until("the cluster", Duration::from_secs(15), || {
                Command::new("redis-cli")
                    .args(["-p", &port, "cluster", "info"])
                    .output()
                    .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("cluster_state:ok"))
            });
        }
        RedisCluster { nodes }
    }

    /// The seed nodes, as `MAESTRA_REDIS_URL` takes them with `MAESTRA_REDIS_CLUSTER=true`.
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(Redis::url)
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// HAProxy, round-robin over the replicas, checking `/health/ready` every 200 ms (two failed
/// checks take a replica out: one slow answer on a busy machine must not); each
/// response says which replica served it in `X-Served-By`.
pub struct HaProxy {
    pub port: u16,
    _dir: TempDir,
    child: Child,
}

impl HaProxy {
    pub fn start(replicas: &[u16]) -> HaProxy {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let servers: String = replicas
            .iter()
            .enumerate()
            .map(|(i, p)| {
                format!(
                    "    server r{} 127.0.0.1:{p} check inter 200ms fall 2 rise 1\n",
                    i + 1
                )
            })
            .collect();
        // Only a connection that was never made is retried on another replica: a request that
        // reached one may have been stored, and is the client's to retry (Idempotency-Key).
        let config = format!(
            "global\n    maxconn 2000\n\
             defaults\n    mode http\n    timeout connect 1s\n    timeout client 30s\n    timeout server 30s\n\
             \x20   timeout check 1s\n    retries 3\n    option redispatch\n    retry-on conn-failure\n\
             frontend api\n    bind 127.0.0.1:{port}\n    default_backend replicas\n\
             backend replicas\n    balance roundrobin\n    option httpchk GET /health/ready\n\
             \x20   http-response set-header X-Served-By %s\n{servers}"
        );
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, config).unwrap();
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("haproxy must be installed (Debian's haproxy)");
        wait_until("haproxy", Duration::from_secs(10), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        HaProxy {
            port,
            _dir: dir,
            child,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

impl Drop for HaProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// PgBouncer (Debian's) in transaction mode in front of the test Postgres, any database name
/// passed through, with few server connections so that clients really share them.
pub struct PgBouncer {
    pub port: u16,
    _dir: TempDir,
    child: Child,
}

impl PgBouncer {
    pub fn start(postgres: &str, pool_size: u32) -> PgBouncer {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let (host, pg_port) = postgres.split_once(':').unwrap();
        std::fs::write(dir.path().join("users.txt"), "\"postgres\" \"\"\n").unwrap();
        let config = format!(
            "[databases]\n* = host={host} port={pg_port} user=postgres\n\
             [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\n\
             unix_socket_dir =\nauth_type = trust\nauth_file = {users}\n\
             pool_mode = transaction\ndefault_pool_size = {pool_size}\nmax_client_conn = 500\n\
             ignore_startup_parameters = extra_float_digits,options\n",
            users = dir.path().join("users.txt").display(),
        );
        let path = dir.path().join("pgbouncer.ini");
        std::fs::write(&path, config).unwrap();
        let mut command = Command::new(pgbouncer_binary());
        // PgBouncer refuses to run as root (CI runs as root): it drops to `nobody`, who must
        // be able to read its files.
        if running_as_root() {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
            command.args(["-u", "nobody"]);
        }
        let child = command
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("pgbouncer must be installed (Debian's pgbouncer)");
        wait_until("pgbouncer", Duration::from_secs(10), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        PgBouncer {
            port,
            _dir: dir,
            child,
        }
    }

    /// `url` (a `postgres://…/db` URL of the test server) through this PgBouncer.
    pub fn route(&self, url: &str, postgres: &str) -> String {
        url.replacen(postgres, &format!("127.0.0.1:{}", self.port), 1)
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .is_some_and(|uids| uids.split_whitespace().next() == Some("0"))
    })
}

/// Debian installs pgbouncer in /usr/sbin, which a non-root PATH may lack.
fn pgbouncer_binary() -> PathBuf {
    let sbin = Path::new("/usr/sbin/pgbouncer");
    if sbin.exists() {
        sbin.to_path_buf()
    } else {
        PathBuf::from("pgbouncer")
    }
}

/// A real `maestra serve` in cloud mode on its own port, its log lines kept in files.
pub struct Replica {
    pub name: String,
    pub port: u16,
    dir: TempDir,
    child: Option<Child>,
}

impl Replica {
    pub async fn start(name: &str, vars: &[(&str, &str)]) -> Replica {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let stdout = std::fs::File::create(dir.path().join("stdout.log")).unwrap();
        let stderr = std::fs::File::create(dir.path().join("stderr.log")).unwrap();
        let port_text = port.to_string();
        let mut command = crate::helpers::maestra_command(dir.path(), vars);
        command
            .env("MAESTRA_MODE", "cloud")
            .env("MAESTRA_HOST", "127.0.0.1")
            .env("MAESTRA_PORT", &port_text)
            .envs(vars.iter().copied())
            .stdout(stdout)
            .stderr(stderr);
        let mut replica = Replica {
            name: name.to_owned(),
            port,
            dir,
            child: Some(command.arg("serve").spawn().unwrap()),
        };
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            assert!(Instant::now() < deadline, "{name} did not start");
            if let Some(child) = replica.child.as_mut() {
                assert!(
                    child.try_wait().unwrap().is_none(),
                    "{name} exited: {}",
                    replica.logs()
                );
            }
            let ready = client.get(replica.url("/health/ready")).send().await;
            if ready.is_ok_and(|r| r.status() == 200) {
                return replica;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Everything it logged, stdout then stderr.
    pub fn logs(&self) -> String {
        let read = |f: &str| std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default();
        format!("{}{}", read("stdout.log"), read("stderr.log"))
    }

    /// Log lines whose message contains `needle`.
    pub fn log_lines(&self, needle: &str) -> Vec<String> {
        self.logs()
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_owned)
            .collect()
    }

    pub fn kill_hard(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn terminate(&self) {
        signal(self.child.as_ref().expect("running"), "TERM");
    }

    /// Waits for the process to exit by itself; its exit status.
    pub fn wait(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        let child = self.child.as_mut()?;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill_hard();
    }
}
