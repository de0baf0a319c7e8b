//! The lock services measured beside dlm, shared by the benchmarks that
//! compare them (`peers`, and the cluster failover benchmark of `dlm-tests`):
//! the `LockSystem` they are driven through, Redis (a minimal RESP client,
//! `SET NX PX` and a compare-and-delete script) and etcd (its `Lock` API
//! with a lease), the servers started on loopback, and the holder that dies.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpStream, UnixStream};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Result<T> = std::result::Result<T, BoxError>;

/// A lock service as the benchmark drives it.
pub trait LockSystem: Send + Sync + 'static {
    /// One client connection.
    type Conn: Send + 'static;
    fn name(&self) -> &'static str;
    fn connect(&self) -> impl Future<Output = Result<Self::Conn>> + Send;
    /// Takes the lock on `key`, waiting (or retrying) until it is held.
    fn lock(&self, conn: &mut Self::Conn, key: &str) -> impl Future<Output = Result<LockHeld>> + Send;
    fn unlock(&self, conn: &mut Self::Conn, held: LockHeld) -> impl Future<Output = Result<()>> + Send;
}

pub enum LockHeld {
    Dlm(dlm_agent::client::LockGuard),
    Redis {
        key: String,
        token: String,
    },
    Etcd(Vec<u8>),
    /// Nothing held: the peer benchmark's echo floor, which locks nothing.
    Echo,
}

/// A minimal RESP client: enough for SET, EVALSHA and SCRIPT LOAD.
pub struct Resp {
    reader: BufReader<Box<dyn AsyncRead + Unpin + Send>>,
    writer: Box<dyn AsyncWrite + Unpin + Send>,
    line: String,
}

/// How a Redis address names its Unix socket: `unix:<path>`.
const UNIX_PREFIX: &str = "unix:";

impl Resp {
    /// Connects to `host:port` over TCP, or to `unix:<path>`.
    pub async fn connect(address: &str) -> Result<Resp> {
        let (read, writer): (Box<dyn AsyncRead + Unpin + Send>, Box<dyn AsyncWrite + Unpin + Send>) =
            match address.strip_prefix(UNIX_PREFIX) {
                Some(path) => {
                    let (read, write) = UnixStream::connect(path).await?.into_split();
                    (Box::new(read), Box::new(write))
                }
                None => {
                    let stream = TcpStream::connect(address).await?;
                    stream.set_nodelay(true)?;
                    let (read, write) = stream.into_split();
                    (Box::new(read), Box::new(write))
                }
            };
        Ok(Resp { reader: BufReader::new(read), writer, line: String::new() })
    }

    /// Sends one command and returns its reply as text (`+OK`, `:1`, `$-1`, a bulk string's content).
    pub async fn call(&mut self, args: &[&str]) -> Result<String> {
        let mut request = format!("*{}\r\n", args.len());
        for arg in args {
            request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
        }
        self.writer.write_all(request.as_bytes()).await?;
        self.line.clear();
        self.reader.read_line(&mut self.line).await?;
        let reply = self.line.trim_end().to_string();
        if let Some(len) = reply.strip_prefix('$').and_then(|n| n.parse::<i64>().ok())
            && len >= 0
        {
            self.line.clear();
            self.reader.read_line(&mut self.line).await?;
            return Ok(self.line.trim_end().to_string());
        }
        if reply.starts_with('-') {
            return Err(format!("redis: {reply}").into());
        }
        Ok(reply)
    }
}

/// Deletes the key only if it still holds our token.
pub const REDIS_UNLOCK_SCRIPT: &str =
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end";

pub struct Redis {
    /// `host:port`, or `unix:<path>` for its Unix socket.
    pub address: String,
    pub ttl_ms: String,
    /// Pause between failed attempts: `None` retries at once (the most
    /// favourable case for Redis); client libraries sleep 10 to 200 ms.
    pub retry_delay: Option<Duration>,
}

pub struct RedisConn {
    resp: Resp,
    script: String,
    next_token: u64,
    client: u64,
}

impl LockSystem for Redis {
    type Conn = RedisConn;
    fn name(&self) -> &'static str {
        if self.address.starts_with(UNIX_PREFIX) { "redis-unix" } else { "redis" }
    }
    async fn connect(&self) -> Result<RedisConn> {
        static CLIENTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let mut resp = Resp::connect(&self.address).await?;
        let script = resp.call(&["SCRIPT", "LOAD", REDIS_UNLOCK_SCRIPT]).await?;
        Ok(RedisConn {
            resp,
            script,
            next_token: 0,
            client: CLIENTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        })
    }
    async fn lock(&self, conn: &mut RedisConn, key: &str) -> Result<LockHeld> {
        conn.next_token += 1;
        let token = format!("{}-{}", conn.client, conn.next_token);
        // Redis cannot queue a waiter: the client retries until SET NX succeeds.
        loop {
            if conn.resp.call(&["SET", key, &token, "NX", "PX", &self.ttl_ms]).await? == "+OK" {
                return Ok(LockHeld::Redis { key: key.to_string(), token });
            }
            match self.retry_delay {
                Some(delay) => tokio::time::sleep(delay).await,
                None => tokio::task::yield_now().await,
            }
        }
    }
    async fn unlock(&self, conn: &mut RedisConn, held: LockHeld) -> Result<()> {
        let LockHeld::Redis { key, token } = held else { return Err("not a redis lock".into()) };
        let script = conn.script.clone();
        conn.resp.call(&["EVALSHA", &script, "1", &key, &token]).await?;
        Ok(())
    }
}

pub struct Etcd {
    pub endpoint: String,
    pub ttl_s: i64,
}

impl LockSystem for Etcd {
    type Conn = (etcd_client::Client, i64);
    fn name(&self) -> &'static str {
        "etcd"
    }
    async fn connect(&self) -> Result<Self::Conn> {
        let mut client = etcd_client::Client::connect([self.endpoint.as_str()], None).await?;
        let lease = client.lease_grant(self.ttl_s, None).await?.id();
        Ok((client, lease))
    }
    async fn lock(&self, (client, lease): &mut Self::Conn, key: &str) -> Result<LockHeld> {
        let options = etcd_client::LockOptions::new().with_lease(*lease);
        Ok(LockHeld::Etcd(client.lock(key, Some(options)).await?.key().to_vec()))
    }
    async fn unlock(&self, (client, _): &mut Self::Conn, held: LockHeld) -> Result<()> {
        let LockHeld::Etcd(key) = held else { return Err("not an etcd lock".into()) };
        client.unlock(key).await?;
        Ok(())
    }
}

/// A holder that stops without unlocking (as a dead process would): the
/// waiter gets the lock when the key's TTL or the lease expires.
pub async fn abandoned_holder<S: LockSystem>(system: &Arc<S>) -> Result<Duration> {
    let mut holder = system.connect().await?;
    let held = system.lock(&mut holder, "abandoned").await?;
    let abandoned = Instant::now();
    std::mem::forget(held);
    drop(holder);
    let mut waiter = system.connect().await?;
    let held = system.lock(&mut waiter, "abandoned").await?;
    let waited = abandoned.elapsed();
    system.unlock(&mut waiter, held).await?;
    Ok(waited)
}

pub struct Server {
    pub child: Child,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub async fn wait_for_port(port: u16, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        if Instant::now() > deadline {
            return Err(format!("{what} did not start").into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

pub fn find(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(program)).find(|p| p.exists())
}

/// Where [`start_redis`]'s server in `dir` listens on a Unix socket.
fn redis_socket(dir: &Path) -> PathBuf {
    dir.join("redis.sock")
}

/// That socket as a [`Redis`] address.
pub fn redis_unix_address(dir: &Path) -> String {
    format!("{UNIX_PREFIX}{}", redis_socket(dir).display())
}

/// Starts a Redis server on loopback TCP and on a Unix socket in `dir`
/// ([`redis_unix_address`]); returns its TCP address.
pub async fn start_redis(dir: &Path) -> Result<(Server, String)> {
    let binary = find("redis-server").ok_or("redis-server is not installed (cargo xtask bench installs it)")?;
    let port = free_port()?;
    let child = Command::new(binary)
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .arg("--unixsocket")
        .arg(redis_socket(dir))
        .args(["--unixsocketperm", "700", "--dir"])
        .arg(dir)
        .stdout(Stdio::null())
        .spawn()?;
    let server = Server { child };
    wait_for_port(port, "redis-server").await?;
    Ok((server, format!("127.0.0.1:{port}")))
}

pub async fn start_etcd(dir: &Path) -> Result<(Server, String)> {
    let binary = find("etcd").ok_or("etcd is not installed (cargo xtask bench installs etcd-server)")?;
    let (client, peer) = (free_port()?, free_port()?);
    let client_url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let child = Command::new(binary)
        .args(["--name", "bench", "--data-dir"])
        .arg(dir.join("etcd"))
        .args(["--listen-client-urls", &client_url, "--advertise-client-urls", &client_url])
        .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
        .args(["--initial-cluster", &format!("bench={peer_url}"), "--log-level", "error"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("etcd.log"))?)
        .spawn()?;
    let server = Server { child };
    wait_for_port(client, "etcd").await?;
    Ok((server, client_url))
}
