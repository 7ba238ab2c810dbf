//! `rbee bench queen`: what the queen adds, each next to a baseline measured in the same run.
//!
//! - Time to first token through the queen (client → queen → worker process and back) next
//!   to a client holding its own link to the same worker process, and through the queen's
//!   HTTP gateway (a streamed `/v1/completions` on a new connection). Rounds alternate.
//! - Spawn-to-ready of an in-process tiny-model worker asked of the queen (queen → hive →
//!   worker actor, and back) next to loading the same model in this process.
//! - The queen process's CPU with many simulated workers connected (each a real QUIC link
//!   the queen dialled, kept alive by keep-alive packets, which are rbee's heartbeats) next
//!   to the same queen with none.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use rbee::actors::hive::capabilities;
use rbee::actors::hive::store::{ModelId, ModelStore};
use rbee::actors::hive::workers::{IdleTimeout, WorkerInfo, WorkerMode, WorkerState};
use rbee::actors::queen::client::QueenClient;
use rbee::actors::queen::daemon;
use rbee::actors::queen::protocol::{
    ClientRequest, ClientResponse, HiveEvent, HiveReport, Placement, QueenItem, QueenProtocol,
};
use rbee::actors::worker::actor::{self, Phase, WorkerMsg, WorkerStatus};
use rbee::actors::worker::api::{GenerateRequest, GenerationEvent, SamplingParams};
use rbee::actors::worker::engine::loader::LoadOptions;
use rbee::actors::worker::engine::tiny;
use rbee::actors::worker::remote::{RemoteWorker, WorkerProtocol};
use rbee::transport::{ClusterCa, Endpoint, Link, LinkConfig, NodeId, Role};

#[derive(Debug, Args)]
pub struct QueenBenchArgs {
    /// Generations per path for time to first token.
    #[arg(long, default_value_t = 50)]
    rounds: usize,
    /// Spawns per path.
    #[arg(long, default_value_t = 5)]
    spawns: usize,
    /// Simulated workers for the CPU measurement.
    #[arg(long, default_value_t = 1000)]
    workers: usize,
    /// Simulated hives the workers are spread over.
    #[arg(long, default_value_t = 10)]
    hives: usize,
    /// Seconds of each CPU measurement.
    #[arg(long, default_value_t = 20)]
    secs: u64,
}

/// A child `rbee` process, interrupted (then killed) when dropped.
pub(super) struct Daemon {
    pub(super) child: Child,
    ready: serde_json::Value,
}

impl Daemon {
    /// Runs `rbee ARGS` with `RBEE_HOME=home` and waits for its report line.
    pub(super) fn start(home: &Path, args: &[&str]) -> anyhow::Result<Daemon> {
        let mut child = Command::new(std::env::current_exe()?)
            .args(args)
            .env("RBEE_HOME", home)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            // Their logs would drown the table.
            .stderr(Stdio::null())
            .spawn()?;
        let stdout = child.stdout.take().context("no stdout")?;
        let line = BufReader::new(stdout).lines().next().transpose()?;
        let ready: serde_json::Value = serde_json::from_str(line.as_deref().unwrap_or("{}"))?;
        let daemon = Daemon { child, ready };
        anyhow::ensure!(
            daemon.ready.get("ready").is_some(),
            "rbee {} did not start: {}",
            args.join(" "),
            daemon.ready
        );
        Ok(daemon)
    }

    pub(super) fn addr(&self, field: &str) -> anyhow::Result<SocketAddr> {
        let text = self.ready["ready"][field].as_str().context("no address")?;
        Ok(text.parse()?)
    }

    /// CPU seconds (user + system) the process has used so far.
    fn cpu_secs(&self) -> anyhow::Result<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))?;
        // Fields after the command name, which is in parentheses and may hold spaces.
        let rest = stat.rsplit_once(')').context("odd stat")?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        Ok(ticks / hz)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SIGINT: a hive stops its workers before it exits.
        // SAFETY: a plain signal to our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        for _ in 0..150 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub(super) fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// A queen in `dir` whose links keep alive every `keep_alive_ms` (5 × that is the idle
/// timeout).
pub(super) fn queen(dir: &Path, keep_alive_ms: u64) -> anyhow::Result<Daemon> {
    let data = dir.join("queen");
    let data = data.to_str().context("a non-UTF-8 temporary path")?;
    let (keep_alive, idle) = (keep_alive_ms.to_string(), (keep_alive_ms * 5).to_string());
    Daemon::start(
        dir,
        &[
            "queen",
            "serve",
            "--data",
            data,
            "--listen",
            "127.0.0.1:0",
            "--join-listen",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--keep-alive-ms",
            &keep_alive,
            "--idle-timeout-ms",
            &idle,
        ],
    )
}

/// The default keep-alive of `rbee queen serve`, in ms.
pub(super) const DEFAULT_KEEP_ALIVE_MS: u64 = 1000;

pub(super) async fn client(
    dir: &Path,
    link: SocketAddr,
    name: &str,
) -> anyhow::Result<QueenClient> {
    let identity = daemon::client_identity(&dir.join("queen"), name)?;
    Ok(QueenClient::connect(identity, link, LinkConfig::default()).await?)
}

/// A queen and one joined hive as processes in a directory, a model in the hive's store.
/// The hive is stopped (stopping its workers) before the queen.
pub(super) struct BenchCluster {
    pub(super) hive: Daemon,
    pub(super) queen: Daemon,
    pub(super) model: ModelId,
    pub(super) model_file: std::path::PathBuf,
    pub(super) link: SocketAddr,
}

/// A [`BenchCluster`] with the tiny model.
pub(super) fn tiny_cluster(dir: &Path, hive_name: &str) -> anyhow::Result<BenchCluster> {
    let model_file = dir.join("tiny.gguf");
    tiny::write_tiny_llama(&model_file, 512)?;
    bench_cluster(dir, model_file, ModelId::new("tiny")?, hive_name)
}

/// A [`BenchCluster`] with `model_file` in the hive's store as `model`.
pub(super) fn bench_cluster(
    dir: &Path,
    model_file: std::path::PathBuf,
    model: ModelId,
    hive_name: &str,
) -> anyhow::Result<BenchCluster> {
    let hive_home = dir.join("hive");
    ModelStore::open(&hive_home)?.import(&model_file, &model)?;
    let queen = queen(dir, DEFAULT_KEEP_ALIVE_MS)?;
    let link = queen.addr("link")?;
    let token = daemon::create_token(&dir.join("queen"), Duration::from_secs(600), None)?;
    let hive = Daemon::start(
        &hive_home,
        &[
            "hive",
            "serve",
            "--join",
            &token.to_string(),
            "--name",
            hive_name,
        ],
    )?;
    Ok(BenchCluster {
        hive,
        queen,
        model,
        model_file,
        link,
    })
}

pub async fn run(args: QueenBenchArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        args.rounds >= 1 && args.spawns >= 1 && args.hives >= 1 && args.secs >= 1,
        "need --rounds, --spawns, --hives and --secs >= 1"
    );
    let dir = tempfile::tempdir()?;
    let cluster = tiny_cluster(dir.path(), "bench")?;
    let (link, model) = (cluster.link, cluster.model.clone());
    let client = client(dir.path(), link, "bench").await?;
    wait_for(&client, 1, |_| true).await?;

    println!(
        "rbee bench queen: tiny llama model, loopback, {} rounds",
        args.rounds
    );
    let http = cluster.queen.addr("http")?;
    let [direct, via_queen, via_gateway] =
        first_tokens(dir.path(), &client, http, &model, args.rounds).await?;
    let (d, q, g) = (
        median(direct.clone()),
        median(via_queen.clone()),
        median(via_gateway.clone()),
    );
    println!("\ntime to first token (max_tokens 1, greedy)   median     p90");
    println!(
        "  client → worker link (baseline)          {:>8.3} ms {:>7.3} ms",
        d,
        percentile(direct, 0.9)
    );
    println!(
        "  client → queen → worker                  {:>8.3} ms {:>7.3} ms",
        q,
        percentile(via_queen, 0.9)
    );
    println!(
        "  added by the queen                       {:>8.3} ms   (×{:.2})",
        q - d,
        q / d
    );
    println!(
        "  HTTP client → gateway (SSE) → worker     {:>8.3} ms {:>7.3} ms",
        g,
        percentile(via_gateway, 0.9)
    );
    println!(
        "  added by the gateway over the native client {:>5.3} ms   (×{:.2})",
        g - q,
        g / q
    );

    let (local, remote) = spawn_times(&client, &model, &cluster.model_file, args.spawns).await?;
    let (l, r) = (median(local), median(remote));
    println!("\nspawn to ready, in-process worker           median");
    println!("  load in this process (baseline)          {l:>8.1} ms");
    println!("  asked of the queen (queen → hive)        {r:>8.1} ms");
    println!(
        "  added by queen and hive                  {:>8.1} ms   (×{:.2})",
        r - l,
        r / l
    );
    drop(client);
    drop(cluster);

    println!(
        "\nqueen CPU over {} s, % of one core ({} simulated workers on {} hives)",
        args.secs, args.workers, args.hives
    );
    // The default, then worker links kept alive as often as hive links.
    for (keep_alive_ms, what) in [
        (DEFAULT_KEEP_ALIVE_MS, "default"),
        (
            DEFAULT_KEEP_ALIVE_MS / 2,
            "worker links at the hive links' rate",
        ),
    ] {
        let (idle, loaded) = queen_cpu(&args, keep_alive_ms).await?;
        let timing = LinkConfig {
            keep_alive: Duration::from_millis(keep_alive_ms),
            idle_timeout: Duration::from_millis(keep_alive_ms * 5),
            ..LinkConfig::default()
        };
        let workers = daemon::worker_link(&timing).keep_alive;
        println!(
            "  {what}: hive links {:?}, worker links {workers:?}",
            timing.keep_alive
        );
        println!("    no workers (baseline)                  {idle:>8.2} %");
        println!(
            "    {:>5} workers                          {loaded:>8.2} %",
            args.workers
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Waits until the queen lists at least `hives` hives and a number of routable workers
/// that satisfies `check`.
pub(super) async fn wait_for(
    client: &QueenClient,
    hives: usize,
    check: impl Fn(usize) -> bool,
) -> anyhow::Result<()> {
    for _ in 0..1200 {
        let listed = match client.call(ClientRequest::ListHives).await? {
            ClientResponse::Hives(listed) => listed.len(),
            _ => 0,
        };
        if listed >= hives && check(routable_workers(client).await?) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("the cluster did not come up within 120 s")
}

async fn routable_workers(client: &QueenClient) -> anyhow::Result<usize> {
    match client.call(ClientRequest::ListWorkers).await? {
        ClientResponse::Workers(w) => Ok(w.iter().filter(|w| w.routable).count()),
        other => anyhow::bail!("unexpected answer {other:?}"),
    }
}

fn one_token() -> GenerateRequest {
    GenerateRequest {
        sampling: SamplingParams::greedy(),
        ..GenerateRequest::text("In the", 1)
    }
}

/// Time to the first SSE chunk of a streamed `/v1/completions` request for one token, on
/// a new connection (as curl makes one); the rest of the response is read to its end.
async fn gateway_first_token(http: SocketAddr, model: &ModelId) -> anyhow::Result<Duration> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = serde_json::json!({
        "model": model.as_str(), "prompt": "In the", "max_tokens": 1,
        "temperature": 0, "stream": true,
    })
    .to_string();
    let request = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: {http}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let t = Instant::now();
    let mut stream = tokio::net::TcpStream::connect(http).await?;
    stream.set_nodelay(true)?;
    stream.write_all(request.as_bytes()).await?;
    let (mut seen, mut first, mut buffer) = (Vec::new(), None, [0u8; 8192]);
    loop {
        let n = stream.read(&mut buffer).await?;
        if n == 0 {
            break;
        }
        seen.extend_from_slice(&buffer[..n]);
        if first.is_none() && seen.windows(7).any(|w| w == b"data: {") {
            first = Some(t.elapsed());
        }
    }
    let text = String::from_utf8_lossy(&seen);
    anyhow::ensure!(
        text.starts_with("HTTP/1.1 200") && text.contains("data: [DONE]"),
        "the gateway answered: {text}"
    );
    first.context("no chunk from the gateway")
}

/// Times to first token in ms: direct to the worker, through the queen, through the
/// queen's HTTP gateway.
async fn first_tokens(
    dir: &Path,
    client: &QueenClient,
    http: SocketAddr,
    model: &ModelId,
    rounds: usize,
) -> anyhow::Result<[Vec<f64>; 3]> {
    let placement = Placement {
        mode: Some(WorkerMode::Process),
        ..Placement::of(model.clone())
    };
    let ClientResponse::Worker(view) = client.call(ClientRequest::Spawn(placement)).await? else {
        anyhow::bail!("the spawn answered something else");
    };
    let addr = view.info.addr.context("a process worker has an address")?;
    let identity = daemon::client_identity(&dir.join("queen"), "bench-direct")?;
    let endpoint = Endpoint::<WorkerProtocol>::client(
        identity,
        "127.0.0.1:0".parse()?,
        LinkConfig::default(),
    )?;
    let (link, _incoming) = endpoint.connect(addr, &[Role::Worker]).await?;
    let worker = RemoteWorker::new(link);
    let (mut direct, mut via_queen, mut via_gateway) = (Vec::new(), Vec::new(), Vec::new());
    // One unmeasured round warms every path.
    for round in 0..=rounds {
        let t = Instant::now();
        let mut generation = worker.generate(one_token()).await?;
        let mut first = None;
        while let Some(event) = generation.next().await {
            if matches!(event, GenerationEvent::Token { .. }) && first.is_none() {
                first = Some(t.elapsed());
            }
            if let GenerationEvent::Error(e) = &event {
                anyhow::bail!("direct generation failed: {e}");
            }
        }
        let direct_ttft = first.context("no token directly")?;

        let t = Instant::now();
        let mut stream = client.generate(model.clone(), one_token()).await?;
        let mut first = None;
        while let Some(item) = stream.next().await {
            match item? {
                QueenItem::Generation(GenerationEvent::Token { .. }) if first.is_none() => {
                    first = Some(t.elapsed());
                }
                QueenItem::Generation(GenerationEvent::Error(e)) => {
                    anyhow::bail!("generation through the queen failed: {e}")
                }
                _ => {}
            }
        }
        let queen_ttft = first.context("no token through the queen")?;
        let gateway_ttft = gateway_first_token(http, model).await?;
        if round > 0 {
            direct.push(direct_ttft.as_secs_f64() * 1e3);
            via_queen.push(queen_ttft.as_secs_f64() * 1e3);
            via_gateway.push(gateway_ttft.as_secs_f64() * 1e3);
        }
    }
    client.call(ClientRequest::Stop(view.key)).await?;
    Ok([direct, via_queen, via_gateway])
}

/// Spawn-to-ready in ms: (this process, an in-process worker asked of the queen).
async fn spawn_times(
    client: &QueenClient,
    model: &ModelId,
    model_file: &Path,
    spawns: usize,
) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let (mut local, mut remote) = (Vec::new(), Vec::new());
    for _ in 0..spawns {
        let t = Instant::now();
        let started =
            actor::start(model_file.to_path_buf(), LoadOptions::default(), |_| {}).await?;
        local.push(t.elapsed().as_secs_f64() * 1e3);
        started.worker.cast(WorkerMsg::Drain)?;
        let _ = started.stopped.await;

        let placement = Placement {
            mode: Some(WorkerMode::InProcess),
            ..Placement::of(model.clone())
        };
        let t = Instant::now();
        let answer = client.call(ClientRequest::Spawn(placement)).await?;
        remote.push(t.elapsed().as_secs_f64() * 1e3);
        let ClientResponse::Worker(view) = answer else {
            anyhow::bail!("the spawn answered {answer:?}");
        };
        anyhow::ensure!(view.routable, "a spawned worker is not routable: {view:?}");
        client.call(ClientRequest::Stop(view.key)).await?;
    }
    Ok((local, remote))
}

/// The queen's CPU in % of one core, keeping links alive every `keep_alive_ms`: (no
/// workers, `args.workers` simulated ones).
async fn queen_cpu(args: &QueenBenchArgs, keep_alive_ms: u64) -> anyhow::Result<(f64, f64)> {
    let dir = tempfile::tempdir()?;
    let queen = queen(dir.path(), keep_alive_ms)?;
    let link = queen.addr("link")?;
    let client = client(dir.path(), link, "bench").await?;
    let window = Duration::from_secs(args.secs);
    let busy = |before: f64, after: f64| (after - before) / window.as_secs_f64() * 100.0;

    let before = queen.cpu_secs()?;
    tokio::time::sleep(window).await;
    let idle = busy(before, queen.cpu_secs()?);

    let ca = daemon::cluster_ca(&dir.path().join("queen"))?;
    let _simulation = Simulation::start(&ca, link, args.hives, args.workers).await?;
    wait_for(&client, args.hives, |n| n >= args.workers).await?;
    // The dial burst is over; what remains is the steady cost.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = queen.cpu_secs()?;
    tokio::time::sleep(window).await;
    let loaded = busy(before, queen.cpu_secs()?);
    anyhow::ensure!(
        routable_workers(&client).await? == args.workers,
        "simulated workers were lost during the measurement"
    );
    Ok((idle, loaded))
}

/// Hives and workers that speak the node link but run no model: each worker is its own
/// QUIC endpoint with its own certificate, which the queen dials as it would a real one.
struct Simulation {
    /// Each worker endpoint's accept loop (it owns the endpoint and its links).
    accepting: Vec<tokio::task::JoinHandle<()>>,
    _hives: Vec<(Endpoint<QueenProtocol>, Link<QueenProtocol>)>,
}

impl Drop for Simulation {
    fn drop(&mut self) {
        self.accepting.iter().for_each(|task| task.abort());
    }
}

/// Accepts the queen's links to one simulated worker and keeps them open; requests on
/// them are dropped (the queen sends none while no client asks for inference).
async fn hold_links(endpoint: Endpoint<WorkerProtocol>) {
    let mut links = Vec::new();
    while let Some(accepted) = endpoint.accept().await {
        if let Ok((link, mut incoming)) = accepted {
            links.push(link);
            tokio::spawn(async move { while incoming.next().await.is_some() {} });
        }
    }
}

impl Simulation {
    async fn start(
        ca: &ClusterCa,
        queen: SocketAddr,
        hives: usize,
        workers: usize,
    ) -> anyhow::Result<Simulation> {
        let model = ModelId::new("tiny")?;
        let capabilities = capabilities::probe(None, Path::new("/"));
        let bind: SocketAddr = "127.0.0.1:0".parse()?;
        let (mut endpoints, mut links) = (Vec::new(), Vec::new());
        for h in 0..hives {
            let hive = format!("sim-{h}");
            let mut infos = Vec::new();
            // Worker n goes to hive n % hives.
            for n in (h..workers).step_by(hives) {
                let id = format!("tiny-{n}");
                let node = NodeId::new(format!("{hive}.{id}"))?;
                let config = LinkConfig {
                    accept_roles: vec![Role::Queen],
                    ..LinkConfig::default()
                };
                let endpoint =
                    Endpoint::<WorkerProtocol>::bind(ca.issue(&node, Role::Worker)?, bind, config)?;
                infos.push(simulated_worker(&id, &model, endpoint.local_addr()?));
                endpoints.push(endpoint);
            }
            let identity = ca.issue(&NodeId::new(&hive)?, Role::Hive)?;
            let endpoint =
                Endpoint::<QueenProtocol>::client(identity, bind, LinkConfig::default())?;
            let (link, incoming) = endpoint.connect(queen, &[Role::Queen]).await?;
            let report = HiveReport {
                capabilities: capabilities.clone(),
                models: Vec::new(),
                workers: infos,
                read_at: 1,
            };
            link.cast(HiveEvent::Report(report)).await?;
            // The queen asks a hive nothing unless a client does; what comes is dropped.
            tokio::spawn(async move {
                let mut incoming = incoming;
                while incoming.next().await.is_some() {}
            });
            links.push((endpoint, link));
        }
        let accepting = endpoints.into_iter().map(|e| tokio::spawn(hold_links(e)));
        Ok(Simulation {
            accepting: accepting.collect(),
            _hives: links,
        })
    }
}

fn simulated_worker(id: &str, model: &ModelId, addr: SocketAddr) -> WorkerInfo {
    WorkerInfo {
        id: id.to_string(),
        model: model.clone(),
        mode: WorkerMode::Process,
        pid: Some(std::process::id()),
        addr: Some(addr),
        device: "cpu".into(),
        state: WorkerState::Running(WorkerStatus {
            phase: Phase::Ready,
            model: None,
            slots: 2,
            kv: None,
            active: 0,
            requests: 0,
            generated_tokens: 0,
            last_finish: None,
        }),
        memory_bytes: 0,
        uptime_secs: 0,
        idle_timeout: IdleTimeout::Never,
        restarts: 0,
        last_error: None,
        read_at: 0,
    }
}
