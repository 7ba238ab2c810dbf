//! Real `rbee queen` and `rbee hive` processes on 127.0.0.1 for the cluster tests, each in
//! its own temporary directory and killed when dropped.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rbee::actors::hive::process;
use rbee::actors::hive::store::{ModelId, ModelStore};
use rbee::actors::queen::client::QueenClient;
use rbee::actors::queen::daemon;
use rbee::actors::queen::protocol::{ClientRequest, ClientResponse, QueenItem, WorkerView};
use rbee::actors::worker::api::{GenerationError, GenerationEvent, GenerationStats};
use rbee::transport::{LinkConfig, StreamReceiver};

/// Fast loss detection for the tests: a silent peer is lost within 1.5 s.
pub const TIMING: [&str; 4] = ["--keep-alive-ms", "250", "--idle-timeout-ms", "1500"];

pub fn link_config() -> LinkConfig {
    LinkConfig {
        keep_alive: Duration::from_millis(250),
        idle_timeout: Duration::from_millis(1500),
        ..LinkConfig::default()
    }
}

/// A daemon process, killed (with the worker processes it recorded) when dropped.
pub struct Daemon {
    pub child: Child,
    pub ready: serde_json::Value,
    /// Worker records of a hive, to kill its workers too.
    pub runtime: Option<PathBuf>,
}

impl Daemon {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, as a crash or a power cut would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGKILL of the daemon and every worker process it recorded: a machine that is gone.
    pub fn kill_machine(&mut self) {
        self.kill();
        if let Some(dir) = &self.runtime {
            for record in process::records(dir) {
                process::kill(&record);
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill_machine();
    }
}

/// Runs `rbee ARGS` with `RBEE_HOME=home` and waits for its first report line.
pub fn start(home: &Path, args: &[&str]) -> Result<Daemon, serde_json::Value> {
    start_command(Command::new(env!("CARGO_BIN_EXE_rbee")), home, args)
}

/// Runs `command ARGS` (`rbee`, or a wrapper that execs it) with `RBEE_HOME=home` and
/// waits for its first report line.
pub fn start_command(
    mut command: Command,
    home: &Path,
    args: &[&str],
) -> Result<Daemon, serde_json::Value> {
    let mut child = command
        .args(args)
        .env("RBEE_HOME", home)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("rbee starts");
    let stdout = child.stdout.take().unwrap();
    let line = BufReader::new(stdout)
        .lines()
        .next()
        .and_then(Result::ok)
        .unwrap_or_else(|| "{\"failed\": \"exited without a report\"}".into());
    let ready: serde_json::Value = serde_json::from_str(&line).unwrap();
    let daemon = Daemon {
        child,
        runtime: Some(home.join("hive").join("workers")),
        ready: ready.clone(),
    };
    if ready.get("ready").is_some() {
        Ok(daemon)
    } else {
        let mut daemon = daemon;
        let _ = daemon.child.wait();
        Err(ready)
    }
}

/// A queen with its data in `dir/queen`, its link on `port` (0: any).
pub fn start_queen(dir: &Path, port: u16, extra: &[&str]) -> (Daemon, SocketAddr) {
    start_queen_on(dir, "127.0.0.1", port, extra)
}

/// A queen with its data in `dir/queen`, its link and join endpoint on `ip` (the link on
/// `port`, 0: any).
pub fn start_queen_on(dir: &Path, ip: &str, port: u16, extra: &[&str]) -> (Daemon, SocketAddr) {
    let rbee = Command::new(env!("CARGO_BIN_EXE_rbee"));
    start_queen_program(rbee, dir, ip, port, extra)
}

/// [`start_queen_on`] with another program (a copy of `rbee`, as an upgrade installs).
pub fn start_queen_program(
    program: Command,
    dir: &Path,
    ip: &str,
    port: u16,
    extra: &[&str],
) -> (Daemon, SocketAddr) {
    let data = dir.join("queen");
    let listen = format!("{ip}:{port}");
    let join = format!("{ip}:0");
    let mut args = vec![
        "queen",
        "serve",
        "--data",
        data.to_str().unwrap(),
        "--listen",
        &listen,
    ];
    args.extend(["--join-listen", &join, "--http", "127.0.0.1:0"]);
    args.extend(TIMING);
    args.extend(extra);
    let queen = start_command(program, dir, &args).expect("the queen starts");
    let link = queen
        .ready
        .pointer("/ready/link")
        .unwrap()
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    (queen, link)
}

/// A join token of the queen in `dir`, valid for `ttl_secs`.
pub fn token(dir: &Path, ttl_secs: u64) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_rbee"))
        .args([
            "queen",
            "token",
            "--ttl-secs",
            &ttl_secs.to_string(),
            "--data",
        ])
        .arg(dir.join("queen"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A hive named `name` with its home in `home`, joining with `token`.
pub fn start_hive(home: &Path, token: &str, name: &str) -> Result<Daemon, serde_json::Value> {
    start_hive_with(Command::new(env!("CARGO_BIN_EXE_rbee")), home, token, name)
}

/// [`start_hive`] through `command` (`rbee`, or a wrapper that execs it).
pub fn start_hive_with(
    command: Command,
    home: &Path,
    token: &str,
    name: &str,
) -> Result<Daemon, serde_json::Value> {
    let mut args = vec!["hive", "serve", "--join", token, "--name", name];
    args.extend(TIMING);
    start_command(command, home, &args)
}

/// Puts the model file at `path` into the store under `home` as `id`.
pub fn import(home: &Path, path: &Path, id: &str) {
    ModelStore::open(home)
        .unwrap()
        .import(path, &ModelId::new(id).unwrap())
        .unwrap();
}

/// A client of the queen in `dir` at `addr`.
pub async fn client(dir: &Path, addr: SocketAddr) -> QueenClient {
    let identity = daemon::client_identity(&dir.join("queen"), "test-client").unwrap();
    QueenClient::connect(identity, addr, link_config())
        .await
        .unwrap()
}

pub async fn workers(client: &QueenClient) -> Vec<WorkerView> {
    match client.call(ClientRequest::ListWorkers).await.unwrap() {
        ClientResponse::Workers(w) => w,
        other => panic!("{other:?}"),
    }
}

/// Polls `check` every 50 ms until it holds, for at most `secs`.
pub async fn eventually<F, Fut>(secs: u64, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !check().await {
        assert!(Instant::now() < deadline, "not within {secs} s: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What a client saw of one generation.
#[derive(Debug, Default)]
pub struct Seen {
    pub assigned: Vec<String>,
    pub moved: Vec<(String, String, usize)>,
    pub queued: Vec<usize>,
    pub loading: usize,
    pub tokens: Vec<u32>,
    pub indices: Vec<u32>,
    pub text: String,
    pub done: Option<GenerationStats>,
    pub error: Option<GenerationError>,
    pub terminals: usize,
}

impl Seen {
    /// Takes one item in; true when it was the terminal one.
    pub fn take(&mut self, item: QueenItem) -> bool {
        match item {
            QueenItem::Assigned { worker } => self.assigned.push(worker),
            QueenItem::Moved {
                from,
                to,
                after_tokens,
            } => self.moved.push((from, to, after_tokens)),
            QueenItem::Queued { position } => self.queued.push(position),
            QueenItem::Loading { .. } => self.loading += 1,
            QueenItem::Generation(event) => {
                match event {
                    GenerationEvent::Token {
                        index, id, text, ..
                    } => {
                        self.tokens.push(id);
                        self.indices.push(index);
                        self.text.push_str(&text);
                    }
                    GenerationEvent::Text(text) => self.text.push_str(&text),
                    GenerationEvent::Done(stats) => {
                        self.terminals += 1;
                        self.done = Some(stats);
                    }
                    GenerationEvent::Error(e) => {
                        self.terminals += 1;
                        self.error = Some(e);
                    }
                }
                return self.terminals > 0;
            }
            other => panic!("unexpected {other:?}"),
        }
        false
    }
}

/// Reads a generation to its end (at most `secs`).
pub async fn read_all(mut stream: StreamReceiver<QueenItem>, secs: u64) -> Seen {
    let mut seen = Seen::default();
    let read = async {
        while let Some(item) = stream.next().await {
            seen.take(item.expect("the stream fails"));
        }
    };
    tokio::time::timeout(Duration::from_secs(secs), read)
        .await
        .expect("the generation did not end in time");
    assert_eq!(seen.terminals, 1, "{seen:?}");
    seen
}

/// Live (not zombie) processes whose command line mentions `dir`: worker processes keep
/// their identity under their hive's home, so this finds every worker a hive left.
pub fn processes_under(dir: &Path) -> Vec<u32> {
    let needle = dir.to_string_lossy().into_owned();
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        // Field 3 of stat, after the parenthesised name.
        let zombie = stat
            .rsplit(')')
            .next()
            .is_some_and(|s| s.trim_start().starts_with('Z'));
        if !zombie && String::from_utf8_lossy(&cmdline).contains(&needle) {
            found.push(pid);
        }
    }
    found
}

/// Sends `signal` to `pid`.
pub fn signal(pid: u32, signal: i32) {
    // SAFETY: a plain signal to a process this test started.
    assert_eq!(unsafe { libc::kill(pid as i32, signal) }, 0, "kill {pid}");
}
